"""IDHN (Zhang et al., IEEE TMM 2019): Improved Deep Hashing with Soft Pairwise Similarity for
Multi-label Image Retrieval.

Reference: swuxyj/DeepHash-pytorch IDHN.py (after the authors' TensorFlow code, pectinid16/IDHN).
The frame is `SoftSimilarityMethod`'s: s_ij the cosine of the label vectors of a batch item and a
memory item, u = z / (|z| + 1), Theta_ij = alpha u_i . U_j;

  hard pairs (s = 1 or 0 within 0.01):  log(1 + e^Theta_ij) - s_ij Theta_ij
  soft pairs:                           gamma * (Theta_ij + q - 2 q s_ij)^2,   q = bits
  L = mean over pairs + lambda * mean_ik | |u_ik| - 1 |

the squared error asks a partially similar pair's inner product for q (2 s - 1), as the reference
writes it (with Theta, which carries alpha). Defaults: alpha = 0.5, gamma = 0.1,
lambda = 0.1 (`quantization`), the reference's.
"""

from __future__ import annotations

import torch

from dmuh.methods.base import register_method
from dmuh.methods.components.pairwise_toolkit import SoftSimilarityMethod
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("idhn", display_name="IDHN")
class IDHN(SoftSimilarityMethod):
    """Likelihood on hard pairs, squared error of the inner product on soft pairs, over the memory."""

    hyper_parameters = {"gamma": Param(float, Rule(minimum=0.0), "weight of the soft pairs' squared error")}

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 0.5,
        gamma: float = 0.1,
        quantization: float = 0.1,
    ):
        super().__init__(bits, num_train, num_classes, alpha, gamma, quantization)
        self.soft_weight = gamma

    def soft_pair_loss(self, theta: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return (theta + self.bits - 2.0 * self.bits * soft).pow(2)
