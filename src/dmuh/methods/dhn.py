"""DHN (Zhu et al., AAAI 2016): Deep Hashing Network.

Reference: swuxyj/DeepHash-pytorch DHN.py (the official code, thulab/DeepHash, is TensorFlow and
has since drifted from the paper; DeepHash-pytorch follows the paper's two terms).

  Theta_ij = u_i . U_j / 2             U: memory of the latest output of every training item
  L = mean_ij [log(1 + e^Theta_ij) - S_ij Theta_ij] + alpha * mean_ik log cosh(|u_ik| - 1)

The pairwise likelihood is DPSH's, so it holds the same `TrainingMemory` as Regu (same pairing
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

from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import OUTPUT_KINDS, apply_output
from dmuh.methods.components.memory import LEGACY_MEMORY_KEYS, TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) without overflow: |x| + log(1 + e^(-2|x|)) - log 2."""
    magnitude = x.abs()
    return magnitude + F.softplus(-2.0 * magnitude) - math.log(2.0)


@register_method("dhn", display_name="DHN")
class DHN(HashingMethod):
    """DPSH's pairwise likelihood over the training memory plus a log-cosh quantisation term."""

    legacy_state_keys = LEGACY_MEMORY_KEYS
    hyper_parameters = {
        "alpha": Param(float, Rule(minimum=0.0), "weight of the quantisation term"),
        "output": Param(str, Rule(choices=OUTPUT_KINDS), "tanh bounds the codes to (-1, 1); linear keeps z"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, alpha: float = 0.1, output: str = "linear"):
        super().__init__(bits, num_train, num_classes)
        self.output, self.alpha = output, alpha  # checked as declared
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return apply_output(self.output, outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.memory.remember(step, self.continuous_codes)
        return {
            "likelihood": self.memory.likelihood(codes, step.labels),
            "quantization": self.alpha * log_cosh(codes.abs() - 1.0).mean(),
        }
