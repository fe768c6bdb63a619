"""DSH (Liu et al., CVPR 2016): Deep Supervised Hashing.

Reference: swuxyj/DeepHash-pytorch DSH.py (itself after the authors' Caffe code and
weixu000/DSH-pytorch), with its memory of training outputs and its defaults.

  D_ij = ||u_i - U_j||^2               U: memory of the latest output of every training item
  L = mean_ij [ S_ij D_ij / 2 + (1 - S_ij) max(m - D_ij, 0) / 2 ] + alpha * mean_ik | |u_ik| - 1 |

a contrastive loss that pulls similar pairs together and pushes dissimilar pairs at least m apart
(m = 2 * bits by default, the paper's choice), plus the L1 regulariser that draws every output
towards +-1. Defaults: alpha = 0.1 (DeepHash-pytorch, which averages where the paper's
alpha = 0.01 multiplies sums), the raw linear output u = z.

The memory is DPSH's (the `TrainingMemory` Regu holds too): the batch is paired with every
training item seen so far and the pair term is divided by n B, the mean over all B x n pairs once every item has been seen.
Unseen items are left out (DeepHash-pytorch's zero entries would pull similar codes to 0 and push
dissimilar ones away from 0 in the first epoch).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import OUTPUT_KINDS, apply_output
from dmuh.methods.components.memory import LEGACY_MEMORY_KEYS, TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("dsh", display_name="DSH")
class DSH(HashingMethod):
    """Contrastive loss with margin m over the training memory plus an L1 regulariser."""

    legacy_state_keys = LEGACY_MEMORY_KEYS
    hyper_parameters = {
        "alpha": Param(float, Rule(minimum=0.0), "weight of the L1 regulariser"),
        "margin": Param(float, Rule(above=0.0), "the contrastive margin (none: 2 bits)", optional=True),
        "output": Param(str, Rule(choices=OUTPUT_KINDS), "tanh bounds the codes to (-1, 1); linear keeps z"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 0.1,
        margin: Optional[float] = None,
        output: str = "linear",
    ):
        super().__init__(bits, num_train, num_classes)
        self.output = output  # checked as declared
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits)
        self.alpha = alpha
        self.margin = 2.0 * self.bits if margin is None else margin

    def contrastive(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over the batch x seen-memory pairs of the contrastive term, over n B."""
        memory = self.memory.codes
        squared_norms = codes.pow(2).sum(1, keepdim=True) + memory.pow(2).sum(1)
        distance = (squared_norms - 2.0 * codes @ memory.t()).clamp(min=0)
        similar = self.memory.similarity(labels)
        pair_loss = 0.5 * similar * distance + 0.5 * (1.0 - similar) * (self.margin - distance).clamp(min=0)
        return self.memory.pair_mean(pair_loss)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return apply_output(self.output, outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.memory.remember(step, self.continuous_codes)
        return {
            "contrastive": self.contrastive(codes, step.labels),
            "quantization": self.alpha * (codes.abs() - 1.0).abs().mean(),
        }
