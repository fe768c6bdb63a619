"""DBDH (Zheng et al., Neurocomputing 2020): Deep Balanced Discrete Hashing.

Reference: swuxyj/DeepHash-pytorch DBDH.py. With u = clamp(z, -1, 1):

  Theta_ij = u_i . U_j / 2             U: memory of the latest code of every training item
  L = mean_ij [log(1 + e^Theta_ij) - S_ij Theta_ij] + alpha * mean_i |mean_k u_ik|^p

DPSH's pairwise likelihood over the memory (Regu's `TrainingMemory`: the pairs with the items
seen so far, divided by n B) plus a balance term that drives every code to as many +1 as -1 bits
(p = 2, the reference's, or p = 1). The clamp is the reference's bounded output (no gradient
beyond +-1), in place of a quantisation term. Defaults: alpha = 0.1 (`balance`), p = 2 (`power`).
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("dbdh", display_name="DBDH")
class DBDH(HashingMethod):
    """DPSH's likelihood of clamp(z, -1, 1) over the training memory plus a bit-balance term."""

    hyper_parameters = {
        "balance": Param(float, Rule(minimum=0.0), "weight of the balance term (alpha)"),
        "power": Param(int, Rule(minimum=1, maximum=2), "the balance term's power p: |mean_k u_ik|^p"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, balance: float = 0.1, power: int = 2):
        super().__init__(bits, num_train, num_classes)
        self.balance, self.power = balance, power  # checked as declared
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.clamp(-1.0, 1.0)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.memory.remember(step, self.continuous_codes)
        return {
            "likelihood": self.memory.likelihood(codes, step.labels),
            "balance": self.balance * codes.mean(dim=1).abs().pow(self.power).mean(),
        }
