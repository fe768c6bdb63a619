"""What every shallow method shares: fitted once on features in closed form, never by gradient.

`ShallowMethod` is the base of ITQ, LSH (`dmuh.methods.shallow`), SDH, LFH, COSDISH, FastH and
the toolkit classics of issue #33 (PCAH, PCA-RR, SH, SKLSH, density-sensitive hashing, KSH, FSDH, IMH).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs


class ShallowMethod(HashingMethod):
    """A method fitted once on features (`fit`), never trained by gradient.

    `fit(features (n, D), labels (n, C))` returns (weight (bits, D), bias (bits,)) of a linear
    hash layer, or a fitted head from `dmuh.models.heads` when the out-of-sample function is not
    linear (SDH's, FSDH's and KSH's kernel maps, FastH's trees, SKLSH's cosines, SH's products of
    cosines, IMH's nearest-anchor embedding)."""

    requires = Requirements(shallow=True)

    def train_with(self, trainer):
        return trainer.fit_hash_layer(self.fit)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        raise DmuhError(f"method {self.name!r} is fitted once on backbone features (fit), not trained by gradient")

    def fit(self, features: torch.Tensor, labels: torch.Tensor):
        raise NotImplementedError  # pragma: no cover - abstract

    def check_features(self, features: torch.Tensor) -> torch.Tensor:
        """The features as float64 (n, D), or a `DmuhError` saying what is wrong with them."""
        if features.dim() != 2 or features.shape[0] < 2:
            raise DmuhError(f"{self.name}: needs features of shape (n >= 2, D), got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise DmuhError(f"{self.name}: the features contain NaN or infinite values")
        return features.detach().double().cpu()

    def check_labels(self, labels: Optional[torch.Tensor], count: int) -> torch.Tensor:
        """The training labels as float64 (count, C), or a `DmuhError` (for the supervised ones)."""
        if labels is None or labels.dim() != 2 or labels.shape[0] != count:
            raise DmuhError(
                f"{self.name}: needs labels of shape (n={count}, classes), "
                f"got {None if labels is None else tuple(labels.shape)}"
            )
        if not torch.isfinite(labels).all():
            raise DmuhError(f"{self.name}: the labels contain NaN or infinite values")
        return labels.detach().double().cpu()

    def check_enough_items(self, count: int) -> None:
        """Codes of `bits` bits need at least as many training items (the regressions and the code
        solvers are under-determined otherwise)."""
        if count < self.bits:
            raise DmuhError(
                f"{self.name}: {count} training items for bits={self.bits}: "
                "needs at least as many training items as bits"
            )
