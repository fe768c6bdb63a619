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
seeded random starting rotation; they are registered as ITQ's variants with `iterations` fixed
at 0, so the hash layer is weight = (W R)^T, bias = -mean W R.

Deviations: the toolkit centres the features by the mean of training and test items together and
computes W on the database (demo.m: trainPCAH(db_data)); dmuh fits both on the training split.
"""

from __future__ import annotations

import torch

from dmuh.methods.base import Requirements, register_method
from dmuh.methods.shallow import ITQ


@register_method("pca-rr", display_name="PCA-RR", iterations=0)
class PCARR(ITQ):
    """PCA to `bits` dimensions, then a seeded random rotation (ITQ with no iteration)."""

    requires = Requirements(shallow=True, labels=False)


@register_method("pcah", display_name="PCAH", iterations=0, seed=0)
class PCAH(ITQ):
    """Signs of the top-`bits` principal components of the mean-centred features."""

    requires = Requirements(shallow=True, labels=False)

    def initial_rotation(self) -> torch.Tensor:
        return torch.eye(self.bits, dtype=torch.float64)
