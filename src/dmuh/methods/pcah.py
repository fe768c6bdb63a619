"""PCAH and PCA-RR: signs of the top principal components, as they are, or randomly rotated.

Reference followed: the MATLAB toolkit willard-yuan/hashing-baseline-for-image-retrieval
(Method-PCAH/trainPCAH.m, compressPCAH.m; Method-RR/trainRR.m, compressRR.m; demo.m), the
baselines of Gong and Lazebnik's ITQ paper (CVPR 2011), where PCA-RR is "PCA + random rotation".

PCAH: project the mean-centred features on the top-`bits` principal directions W (eigs(cov(X)))
and take signs: code = sign((x - mean) W).
PCA-RR: the same projection followed by a random orthogonal bits x bits rotation R, the U of the
SVD of a Gaussian matrix (trainRR.m): code = sign((x - mean) W R). On strong frozen features
this is the 2025 "Hashing-Baseline".

Both are ITQ (`dmuh.methods.shallow`) with no rotation update: PCAH with R = I, PCA-RR with ITQ's
seeded random starting rotation (the same draw: `shallow_toolkit.random_rotation`, so `pca-rr`
equals `itq -p iterations=0` at the same seed). The hash layer is weight = (W R)^T,
bias = -mean W R.

Deviations: the toolkit centres the features by the mean of training and test items together and
computes W on the database (demo.m: trainPCAH(db_data)); dmuh fits both on the training split.
"""

from __future__ import annotations

from typing import Tuple

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import Requirements, register_method
from dmuh.methods.components.params import Param
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.methods.components.shallow_toolkit import principal_directions, random_rotation
from dmuh.utils.schema import Rule


class PrincipalProjection(ShallowMethod):
    """sign((x - mean) W R): W the top-`bits` principal directions, R = `rotation()`."""

    requires = Requirements(shallow=True, labels=False)

    def rotation(self) -> torch.Tensor:
        return torch.eye(self.bits, dtype=torch.float64)

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.check_features(features)
        if self.bits > x.shape[1]:
            raise DmuhError(
                f"{self.name}: bits={self.bits} exceeds the feature dimension {x.shape[1]} "
                "(it projects on that many principal directions)"
            )
        mean = x.mean(0)
        weight = principal_directions(x - mean, self.bits) @ self.rotation()  # (D, bits)
        return weight.t().float().contiguous(), (-(mean @ weight)).float()


@register_method("pcah", display_name="PCAH")
class PCAH(PrincipalProjection):
    """Signs of the top-`bits` principal components of the mean-centred features."""


@register_method("pca-rr", display_name="PCA-RR")
class PCARR(PrincipalProjection):
    """PCA to `bits` dimensions, then a seeded random rotation (ITQ with no iteration)."""

    hyper_parameters = {
        "seed": Param(int, Rule(minimum=0), "seed of the random rotation"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, seed: int = 0):
        super().__init__(bits, num_train, num_classes)
        self.seed = seed  # checked as declared

    def rotation(self) -> torch.Tensor:
        return random_rotation(self.bits, self.seed)
