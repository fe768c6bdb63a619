"""DHN (Zhu et al., AAAI 2016): Deep Hashing Network.

Reference: swuxyj/DeepHash-pytorch DHN.py (the official code, thulab/DeepHash, is TensorFlow and
has since drifted from the paper; DeepHash-pytorch follows the paper's two terms).

  Theta_ij = u_i . U_j / 2             U: memory of the latest output of every training item
  L = mean_ij [log(1 + e^Theta_ij) - S_ij Theta_ij] + alpha * mean_ik log cosh(|u_ik| - 1)

The pairwise likelihood is DPSH's, so the memory and the likelihood are `Regu`'s (same pairing
with seen memory items, same division by n B, which is the mean over the B x n pairs once every
item has been seen). The quantisation term is a mean over the batch's entries, as in
DeepHash-pytorch. Defaults: alpha = 0.1 and the raw linear output u = z (`output="linear"`), as
DeepHash-pytorch.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from dmuh.methods.base import StepInputs, register_method
from dmuh.methods.helpers import check_number
from dmuh.methods.regu import Regu


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) without overflow: |x| + log(1 + e^(-2|x|)) - log 2."""
    magnitude = x.abs()
    return magnitude + F.softplus(-2.0 * magnitude) - math.log(2.0)


@register_method("dhn")
class DHN(Regu):
    """DPSH's pairwise likelihood over the training memory plus a log-cosh quantisation term."""

    def __init__(self, bits: int, train_labels: torch.Tensor, alpha: float = 0.1, output: str = "linear"):
        super().__init__(bits, train_labels, beta=0.0, output=output)
        self.alpha = check_number("alpha", alpha, 0.0)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.codes_and_remember(step)
        return {
            "likelihood": self.likelihood(codes, step.labels),
            "quantization": self.alpha * log_cosh(codes.abs() - 1.0).mean(),
        }
