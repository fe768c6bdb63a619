"""KSH (Liu, Wang, Ji, Jiang and Chang, CVPR 2012): supervised hashing with kernels.

Reference followed: the authors' MATLAB code, ColumbiaDVMM/Supervised-Hashing-with-Kernels
(KSH_demo.m, OptProjectionFast.m; commit b0acf3b). Shallow: fitted once on backbone features.

Kernel map: m = `anchors` (300) anchors drawn at random (seeded) from the training features,
sigma = the mean squared distance of the training items to the anchors, and the centred kernel
features k(x) = exp(-||x - a_j||^2 / (2 sigma)) - mean over the training items (mvec).
Labelled subset: l = `labelled` (2000; all items when fewer) items drawn at random (seeded), with
S = bits * S0, S0_ij = 1 when items i and j share a label, -1 otherwise (multi-label included).
Bits are learned one after the other (greedily), with the residual S <- S - y y^T of the bits
before (y in {-1, 1}^l the previous bit's codes on the labelled items):
1. spectral relaxation: a_0 = the top generalised eigenvector of (K^T S K, K^T K), scaled so
   a^T K^T K a = l (K the l x m kernel features of the labelled items);
2. OptProjectionFast: minimise -phi(Ka)^T S phi(Ka), phi(v) = 2 / (1 + exp(-v)) - 1, by Nesterov's
   accelerated gradient with a backtracking step (beta doubled up to 50 times until the quadratic
   bound holds), at most `iterations` (500) steps, stopping when |cost change| / l <= 1e-2;
3. keep the optimised a unless sign(K a_0) scores higher under y^T S y (ties keep a_0).
code_k(x) = sign(a_k^T k(x)): an `RBFHead` with weight A^T, bias -A^T mvec and width sqrt(sigma).

Defaults: KSH_demo.m's m = 300 anchors, 2000 labelled items, 500 iterations.
Deviations: KSH_demo.m codes sign(0) as -1 (single(... > 0), then 0 -> -1); dmuh's sign(0) is +1.
The generalised eigenproblem is solved as a symmetric-definite one (eigh after a Cholesky factor
of K^T K + 1e-10 trace(K^T K)/m I: the tiny ridge keeps it definite when l < m or anchors repeat);
MATLAB's eig(LM, RM) is the general solver.
"""

from __future__ import annotations

from typing import Optional

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.models.heads import RBFHead, squared_distances
from dmuh.utils.schema import Rule

CHUNK = 8192


def soft_sign(v: torch.Tensor) -> torch.Tensor:
    """phi(v) = 2 / (1 + exp(-v)) - 1 (= tanh(v / 2))."""
    return 2 * torch.sigmoid(v) - 1


def projection_cost(kernel: torch.Tensor, similarity: torch.Tensor, a: torch.Tensor) -> float:
    y = soft_sign(kernel @ a)
    return float(-(y @ similarity @ y))


def optimise_projection(kernel: torch.Tensor, similarity: torch.Tensor, start: torch.Tensor, steps: int):
    """OptProjectionFast.m: (a, costs) after Nesterov's accelerated gradient with backtracking."""
    n = kernel.shape[0]
    previous, current = start.clone(), start.clone()
    costs = [projection_cost(kernel, similarity, start)]
    delta_before, delta = 0.0, 1.0
    beta = 1.0
    for _ in range(steps):
        momentum = (delta_before - 1) / delta
        probe = current + momentum * (current - previous)
        y = soft_sign(kernel @ probe)
        value = float(-(y @ similarity @ y))
        gradient = -kernel.t() @ ((similarity @ y) * (1 - y * y))
        accepted = None
        for j in range(51):
            b = 2.0**j * beta
            z = probe - gradient / b
            cost = projection_cost(kernel, similarity, z)
            step = z - probe
            if cost <= value + float(gradient @ step) + b * float(step @ step) / 2:
                accepted = (b, z, cost)
                break
        if accepted is None:
            break
        beta, z, cost = accepted
        previous, current = current, z
        costs.append(cost)
        delta_before, delta = delta, (1 + (1 + 4 * delta * delta) ** 0.5) / 2
        if abs(costs[-1] - costs[-2]) / n <= 1e-2:
            break
    return current, costs


def top_generalised_eigenvector(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The eigenvector of the largest eigenvalue of left a = lambda right a (right symmetric positive
    semi-definite, made definite by a tiny ridge)."""
    m = right.shape[0]
    ridge = 1e-10 * float(torch.trace(right)) / m
    factor = torch.linalg.cholesky(right + ridge * torch.eye(m, dtype=right.dtype))
    inverse = torch.linalg.solve_triangular(factor, torch.eye(m, dtype=right.dtype), upper=False)
    reduced = inverse @ left @ inverse.t()
    _, vectors = torch.linalg.eigh((reduced + reduced.t()) / 2)
    return inverse.t() @ vectors[:, -1]


@register_method("ksh", display_name="KSH")
class KSH(ShallowMethod):
    """Kernel hash functions learned bit by bit to fit the code inner products to the label similarities."""

    hyper_parameters = {
        "anchors": Param(int, Rule(minimum=1), "RBF anchors"),
        "labelled": Param(int, Rule(minimum=2), "labelled items the pairwise similarities are taken over"),
        "iterations": Param(int, Rule(minimum=0), "accelerated-gradient steps per bit"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        anchors: int = 300,
        labelled: int = 2000,
        iterations: int = 500,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.anchors, self.labelled, self.iterations, self.seed = anchors, labelled, iterations, seed
        self.kept_optimised: Optional[list] = None  # per bit: the optimised a replaced the spectral one

    def kernel_features(self, x: torch.Tensor, anchors: torch.Tensor, sigma: float) -> torch.Tensor:
        return torch.cat(
            [
                torch.exp(-squared_distances(x[start : start + CHUNK], anchors) / (2 * sigma))
                for start in range(0, x.shape[0], CHUNK)
            ]
        )

    def learn_projections(self, kernel: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A (m, bits) from the centred kernel features and labels of the labelled items."""
        l = kernel.shape[0]  # noqa: E741
        similarity = self.bits * (2 * (labels @ labels.t() > 0).double() - 1)
        right = kernel.t() @ kernel
        projections, kept = [], []
        y = None
        for _ in range(self.bits):
            if y is not None:
                similarity = similarity - torch.outer(y, y)
            a = top_generalised_eigenvector(kernel.t() @ similarity @ kernel, right)
            a = a * (l / float(a @ right @ a)) ** 0.5
            optimised, _ = optimise_projection(kernel, similarity, a, self.iterations)
            y = sign(kernel @ a)
            y_optimised = sign(kernel @ optimised)
            better = float(y_optimised @ similarity @ y_optimised) > float(y @ similarity @ y)
            if better:
                a, y = optimised, y_optimised
            projections.append(a)
            kept.append(better)
        self.kept_optimised = kept
        return torch.stack(projections, dim=1)

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> RBFHead:
        x = self.check_features(features)
        y = self.check_labels(labels, x.shape[0])
        self.check_enough_items(x.shape[0])
        generator = torch.Generator().manual_seed(self.seed)
        anchors = x[torch.randperm(x.shape[0], generator=generator)[: min(self.anchors, x.shape[0])]]
        labelled = torch.randperm(x.shape[0], generator=generator)[: min(self.labelled, x.shape[0])]
        squared_sum = sum(
            float(squared_distances(x[start : start + CHUNK], anchors).sum()) for start in range(0, x.shape[0], CHUNK)
        )
        sigma = squared_sum / (x.shape[0] * anchors.shape[0])
        if not sigma > 0:
            sigma = 1.0  # every item equals every anchor: any width gives the same constant features
        kernel = self.kernel_features(x, anchors, sigma)
        centre = kernel.mean(0)
        projections = self.learn_projections(kernel[labelled] - centre, y[labelled])  # (m, bits)
        return RBFHead.fitted(anchors.float(), sigma**0.5, projections.t().float(), (-(centre @ projections)).float())
