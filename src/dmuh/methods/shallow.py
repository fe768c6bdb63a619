"""Shallow (unsupervised) hashing on fixed features: ITQ and LSH.

Both are fitted once on backbone features of the training split (or on vectors given as data)
and are a linear hash layer: code = sign(W x + b). `fit` returns that layer's weight (bits, D)
and bias (bits,); the training loop calls it (through `train_with`, in place of gradient epochs)
and copies them into `model.hash_layer`.

ITQ (Gong and Lazebnik, CVPR 2011; reference: the authors' MATLAB ITQ.m, also in
swuxyj/DeepHash-pytorch's ITQ baselines): centre the features, project them on the top-`bits`
principal directions W (PCA), then alternate `iterations` times (default 50)
    B = sign(V R)                     codes of the projected data V = (X - mean) W
    U S A^T = svd(B^T V),  R = A U^T   the orthogonal rotation closest to mapping V onto B
starting from a random orthogonal R (seeded). The hash layer is weight = (W R)^T,
bias = -mean W R.

LSH (Charikar, STOC 2002; random-hyperplane hashing): a Gaussian random projection (seeded),
centred by the feature mean so every bit splits the data near its middle: weight = P,
bias = -P mean.
"""

from __future__ import annotations

from typing import Tuple

import torch

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import Requirements, register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.methods.components.shallow_toolkit import random_rotation
from dmuh.utils.schema import Rule


@register_method("itq", display_name="ITQ")
class ITQ(ShallowMethod):
    """PCA to `bits` dimensions, then the rotation that makes sign() lose least (Iterative Quantization)."""

    requires = Requirements(shallow=True, labels=False)
    hyper_parameters = {
        "iterations": Param(int, Rule(minimum=0), "rotation updates (B, then R)"),
        "seed": SEED,
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, iterations: int = 50, seed: int = 0):
        super().__init__(bits, num_train, num_classes)
        self.iterations, self.seed = iterations, seed  # checked as declared

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.check_features(features)
        if self.bits > x.shape[1]:
            raise DmuhError(
                f"{self.name}: bits={self.bits} exceeds the feature dimension {x.shape[1]} "
                "(ITQ projects on that many principal directions)"
            )
        mean = x.mean(dim=0)
        centred = x - mean
        # eigh sorts eigenvalues ascending: the last `bits` eigenvectors are the top principal directions.
        _, eigenvectors = torch.linalg.eigh(centred.t() @ centred)
        projection = eigenvectors[:, -self.bits :].flip(1)
        projected = centred @ projection
        rotation = self.initial_rotation()
        for _ in range(self.iterations):
            binary = sign(projected @ rotation)
            u, _, a_t = torch.linalg.svd(binary.t() @ projected)
            rotation = a_t.t() @ u.t()
        weight = projection @ rotation  # (D, bits)
        return weight.t().float().contiguous(), (-(mean @ weight)).float()

    def initial_rotation(self) -> torch.Tensor:
        """A random orthogonal bits x bits matrix (the U of the SVD of a Gaussian matrix, as ITQ.m)."""
        return random_rotation(self.bits, self.seed)


@register_method("lsh", display_name="LSH")
class LSH(ShallowMethod):
    """Signs of a seeded Gaussian random projection of the mean-centred features."""

    requires = Requirements(shallow=True, labels=False)
    hyper_parameters = {
        "seed": SEED,
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, seed: int = 0):
        super().__init__(bits, num_train, num_classes)
        self.seed = seed  # checked as declared

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.check_features(features)
        generator = torch.Generator().manual_seed(self.seed)
        weight = torch.randn(self.bits, x.shape[1], generator=generator, dtype=torch.float64)
        return weight.float(), (-(weight @ x.mean(dim=0))).float()
