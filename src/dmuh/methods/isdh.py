"""ISDH (Zhang et al., arXiv 2018): Instance Similarity Deep Hashing for multi-label image retrieval.

Reference: swuxyj/DeepHash-pytorch ISDH.py (after the authors' TensorFlow code,
pectinid16/ISDH-Tensorflow). IDHN's earlier version, on the same frame (`SoftSimilarityMethod`):
s_ij the cosine of label vectors, u = z / (|z| + 1), Theta_ij = alpha u_i . U_j;

  hard pairs (s = 1 or 0 within 0.01):  gamma * [log(1 + e^Theta_ij) - s_ij Theta_ij]
  soft pairs:                           (s_ij - sigmoid(Theta_ij))^2
  L = mean over pairs + lambda * mean_ik | |u_ik| - 1 |

Defaults: alpha = 0.5, gamma = 10, lambda = 0.1 (`quantization`), the reference's.
"""

from __future__ import annotations

import torch

from dmuh.methods.base import register_method
from dmuh.methods.components.pairwise_toolkit import SoftSimilarityMethod
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("isdh", display_name="ISDH")
class ISDH(SoftSimilarityMethod):
    """Weighted likelihood on hard pairs, squared error of the pair probability on soft pairs."""

    hyper_parameters = {"gamma": Param(float, Rule(minimum=0.0), "weight of the hard pairs' likelihood")}

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 0.5,
        gamma: float = 10.0,
        quantization: float = 0.1,
    ):
        super().__init__(bits, num_train, num_classes, alpha, gamma, quantization)
        self.hard_weight = gamma

    def soft_pair_loss(self, theta: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return (soft - torch.sigmoid(theta)).pow(2)
