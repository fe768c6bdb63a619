"""SDH (Shen, Shen, Liu and Shen, CVPR 2015): Supervised Discrete Hashing.

Reference followed: the authors' MATLAB code bd622/DiscretHashing (SDH.m, RRC.m, demo_SDH.m), the
L2-loss variant of the paper. Shallow: fitted once on backbone features (`ShallowMethod`).

Kernel features: m = `anchors` (default 1000; all training items when there are fewer) anchors
a_k drawn at random (seeded) from the training features,
    phi(x) = [exp(-||x - a_1||^2 / (2 sigma^2)), ..., exp(-||x - a_m||^2 / (2 sigma^2)), 1],
the last column the bias. With labels Y (n x C) and codes B (n x bits, +-1), SDH minimises
    ||Y - B W||^2 + g_lambda ||W||^2 + nu ||B - phi P||^2      (+ f_lambda ||P||^2 in the F-step)
alternating, after one G-step and one F-step from seeded random codes B = sign(randn):
    B-step  discrete cyclic coordinate descent (DCC), one bit (column) at a time:
            B_:k = sign(Q_:k - B_:-k W_-k w_k^T),  Q = nu phi P + Y W^T,
            at most `dcc_iter` (10) sweeps over the bits, stopping early when a sweep changes the
            codes by less than 1e-6 relatively (||B - B_0||_F < 1e-6 ||B_0||_F: for +-1 codes,
            when no bit changed);
    G-step  W = (B^T B + g_lambda I)^-1 B^T Y              (RRC.m: ridge regression of Y on B)
    F-step  P = (phi^T phi + f_lambda I)^-1 phi^T B        (RRC.m: ridge regression of B on phi)
for `iterations` (5) rounds, stopping early as SDH.m does when ||B - phi P||_F < tol ||B||_F or
||P - P_0||_F < tol ||P_0||_F. The out-of-sample function is an `RBFHead`: raw codes
z = P^T phi(x), weight = P[:m]^T, bias = P[m].

Defaults (demo_SDH.m): anchors 1000, iterations 5, g_lambda 1, f_lambda 0.01, nu 1e-5, tol 1e-5,
10 DCC sweeps.

Deviations from the reference:
- sigma: demo_SDH.m fixes sigma = 0.4 for unit-length features (prepare_dataset.m normalises them);
  dmuh's features are not normalised, so sigma is data-driven: `sigma="nearest"` (default) is the
  mean over training items of the distance to their nearest anchor (the formula left commented
  out in demo_SDH.m, `mean(min(Dis,[],2).^0.5)`), where an item that is itself an anchor is
  measured to its nearest *other* anchor (otherwise, with every item an anchor, sigma would be 0);
  `sigma="mean"` is the other commented-out formula, the root of the mean squared distance to the
  anchors; a number sets sigma.
- The B-step starts DCC from the current codes (the paper's Algorithm 1) rather than from zeros
  as SDH.m does, so each B-step never increases its objective ||B W||^2 - 2 tr(B^T Q).
- sign(0) = +1 (dmuh.codes.binary.sign), where MATLAB's sign gives 0.
- Only the L2 (ridge) G-step; SDH.m's hinge-loss variant (liblinear) is not implemented.

Memory: phi is n x (m + 1) float64 (800 MB at n = 100,000, m = 1000), computed in chunks; nothing
n x n is formed. Everything runs in float64 on the CPU.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.rbf_kernel import RBFKernelMap, checked_sigma, ridge
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.models.heads import RBFHead
from dmuh.utils.schema import Rule


def dcc_objective(codes: torch.Tensor, weight: torch.Tensor, q: torch.Tensor) -> float:
    """The B-step's objective ||B W||^2 - 2 tr(B^T Q): ||Y - B W||^2 + nu ||B - F||^2 less the terms
    that are constant over +-1 codes."""
    return float((codes @ weight).pow(2).sum() - 2 * (codes * q).sum())


def dcc(
    codes: torch.Tensor, weight: torch.Tensor, q: torch.Tensor, sweeps: int, trace: Optional[list] = None
) -> torch.Tensor:
    """Discrete cyclic coordinate descent from `codes` (n, bits): B_:k = sign(Q_:k - B_:-k W_-k w_k^T),
    at most `sweeps` sweeps, stopping when one changes B by less than 1e-6 relatively (SDH.m).
    `trace`, when a list, gets the objective after every bit update (for the tests)."""
    codes = codes.clone()
    gram = weight @ weight.t()  # (bits, bits): W_-k w_k^T is column k of W W^T without its k-th entry
    for _ in range(sweeps):
        before = codes.clone()
        for k in range(codes.shape[1]):
            # B_:-k W_-k w_k^T = B (W w_k^T) - B_:k (w_k w_k^T): one matvec instead of a copy without column k
            others = codes @ gram[:, k] - codes[:, k] * gram[k, k]
            codes[:, k] = sign(q[:, k] - others)
            if trace is not None:
                trace.append(dcc_objective(codes, weight, q))
        if torch.linalg.norm(codes - before) < 1e-6 * torch.linalg.norm(before):
            break
    return codes


@register_method("sdh", display_name="SDH")
class SDH(RBFKernelMap, ShallowMethod):
    """Codes by discrete cyclic coordinate descent against a ridge classifier, out-of-sample by an RBF kernel map."""

    hyper_parameters = {
        "anchors": Param(int, Rule(minimum=1), "RBF anchors"),
        "iterations": Param(int, Rule(minimum=0), "outer iterations"),
        "g_lambda": Param(float, Rule(above=0.0), "ridge of the classifier G"),
        "f_lambda": Param(float, Rule(above=0.0), "ridge of the hash function F"),
        "nu": Param(float, Rule(minimum=0.0), "weight of the fit of B to phi P"),
        "dcc_iter": Param(int, Rule(minimum=1), "discrete cyclic coordinate passes"),
        "tol": Param(float, Rule(minimum=0.0), "stop when the objective changes less"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        anchors: int = 1000,
        sigma: Union[str, float] = "nearest",
        iterations: int = 5,
        g_lambda: float = 1.0,
        f_lambda: float = 0.01,
        nu: float = 1e-5,
        dcc_iter: int = 10,
        tol: float = 1e-5,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.anchors = anchors
        self.sigma = checked_sigma(sigma)
        self.iterations = iterations
        self.g_lambda = g_lambda
        self.f_lambda = f_lambda
        self.nu = nu
        self.dcc_iter = dcc_iter
        self.tol = tol
        self.seed = seed
        self.fitted_codes: Optional[torch.Tensor] = None  # the training codes B of the last fit (not state)

    # -- the fit ------------------------------------------------------------------------------------

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> RBFHead:
        x = self.check_features(features)
        labels = self.check_labels(labels, x.shape[0])
        self.check_enough_items(x.shape[0])
        y = labels.detach().double().cpu()
        anchor_index = self.choose_anchors(x)
        anchors = x[anchor_index]
        sigma = self.kernel_width(x, anchor_index)
        phi = self.kernel_map(x, anchors, sigma)
        phi_gram = phi.t() @ phi  # the F-step's Gram matrix is the same every round

        codes = self.initial_codes(x.shape[0])
        weight = ridge(codes, y, self.g_lambda)  # G-step, (bits, C)
        projection = ridge(phi, codes, self.f_lambda, phi_gram)  # F-step, (m + 1, bits)
        for _ in range(self.iterations):
            q = self.nu * (phi @ projection) + y @ weight.t()
            codes = dcc(codes, weight, q, self.dcc_iter)
            weight = ridge(codes, y, self.g_lambda)
            previous = projection
            projection = ridge(phi, codes, self.f_lambda, phi_gram)
            if torch.linalg.norm(codes - phi @ projection) < self.tol * torch.linalg.norm(codes):
                break
            if torch.linalg.norm(projection - previous) < self.tol * torch.linalg.norm(previous):
                break
        self.fitted_codes = codes
        return RBFHead.fitted(anchors.float(), sigma, projection[:-1].t().float(), projection[-1].float())
