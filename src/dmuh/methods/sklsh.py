"""SKLSH (Raginsky and Lazebnik, NIPS 2009): locality-sensitive binary codes from shift-invariant kernels.

Reference followed: the authors' code as shipped in the MATLAB toolkit
willard-yuan/hashing-baseline-for-image-retrieval (Method-SKLSH/RF_train.m, RF_compress.m, and
demo.m's call with gamma = 1 on data that utils/construct_data.m centres and scales).

Random Fourier features of the Gaussian kernel exp(-gamma ||x - y||^2 / 2), thresholded at random
offsets, one bit each:
    w_k ~ N(0, gamma I),  b_k ~ U[0, 2 pi),  t_k ~ U[-1, 1],
    code_k(x) = sign(sqrt(2) cos(w_k . x + b_k) + sqrt(2) t_k)
drawn (seeded) in that order, R = randn(D, bits) * sqrt(gamma) as RF_train.m. Nothing is fitted
but the data scale below. The out-of-sample function is a `CosineHead`.

Readings (the toolkit's data preparation made part of the method, since dmuh's features are
neither centred nor scaled):
- construct_data.m centres the data and divides it by the mean, over 100 random training items,
  of the distance to their 50th nearest training item (the item itself counted), "so that the
  target distance is 1"; demo.m then uses gamma = 1. `scale="neighbours"` (default) computes that
  distance s on the training features (seeded) and uses w_k ~ N(0, gamma / s^2 I), which is RF_train
  on the scaled data; a number sets s.
- The centring is folded into the phase: cos(w_k . (x - mean) + b_k) = cos(w_k . x + b_k - w_k . mean).
Deviation: sign(0) = +1 where MATLAB's sign gives 0 (a bit 0 in compactbit(Z > 0)).
"""

from __future__ import annotations

import math
from typing import Union

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import Requirements, register_method
from dmuh.methods.components.params import SEED, Param, check_number
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.methods.components.shallow_toolkit import neighbour_distance_scale
from dmuh.models.heads import CosineHead
from dmuh.utils.schema import Rule

SCALE_RULES = ("neighbours",)


@register_method("sklsh", display_name="SKLSH")
class SKLSH(ShallowMethod):
    """Signs of random Fourier features of a Gaussian kernel plus random thresholds."""

    requires = Requirements(shallow=True, labels=False)
    hyper_parameters = {
        "gamma": Param(float, Rule(above=0.0), "Gaussian kernel bandwidth on the scaled data"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        gamma: float = 1.0,
        scale: Union[str, float] = "neighbours",
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.gamma, self.seed = gamma, seed
        if isinstance(scale, str):
            if scale not in SCALE_RULES:
                raise DmuhError(f"method parameter scale={scale!r}: choose neighbours, or a number > 0")
            self.scale: Union[str, float] = scale
        else:
            self.scale = check_number("scale", scale, 0.0, strict=True)

    def draws(self, dim: int):
        """(R (D, bits) ~ N(0, 1), phases b (bits,), thresholds t (bits,)), as RF_train.m draws them
        (before the sqrt(gamma) / scale factor)."""
        generator = torch.Generator().manual_seed(self.seed)
        r = torch.randn(dim, self.bits, generator=generator, dtype=torch.float64)
        b = torch.rand(self.bits, generator=generator, dtype=torch.float64) * 2 * math.pi
        t = (torch.rand(self.bits, generator=generator, dtype=torch.float64) * 2 - 1) * math.sqrt(2)
        return r, b, t

    def data_scale(self, x: torch.Tensor) -> float:
        if not isinstance(self.scale, str):
            return float(self.scale)
        scale = neighbour_distance_scale(x, torch.Generator().manual_seed(self.seed + 1))
        if not scale > 0:
            raise DmuhError(
                f"{self.name}: the training features have no spread (neighbour distance 0); "
                "set the data scale with -p scale=NUMBER"
            )
        return scale

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> CosineHead:
        x = self.check_features(features)
        r, b, t = self.draws(x.shape[1])
        weight = r.t() * math.sqrt(self.gamma) / self.data_scale(x)  # (bits, D)
        phase = b - weight @ x.mean(0)
        return CosineHead.fitted(weight.float(), phase.float(), math.sqrt(2), t.float())
