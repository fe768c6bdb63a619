"""DCH (Cao et al., CVPR 2018): Deep Cauchy Hashing for Hamming Space Retrieval.

Reference: swuxyj/DeepHash-pytorch DCH.py, which follows the paper's formulas (2, 6-9); the
authors' TensorFlow code (thuml/DeepHash, model/dch/dch.py) has since moved to a squared
Euclidean distance and a squared quantisation term, and is not followed (docs/methods.md).
Over the B x B pairs of the batch (the diagonal included, as the reference), with u = z:

  d(u_i, u_j) = bits / 2 * (1 - min(cos(u_i, u_j), 0.99))     the normalised Hamming distance (Eq. 6)
  l_ij = S_ij log(1 + d_ij / gamma) + (1 - S_ij) log(1 + gamma / d_ij)   Cauchy cross-entropy (Eq. 8)
  L = mean over similar pairs of l + mean over dissimilar pairs of l          class-balanced (Eq. 2)
      + lambda * mean_i log(1 + d(|u_i|, 1) / gamma)                          Cauchy quantisation (Eq. 9)

The Cauchy probability gamma / (gamma + d) is the chance that two codes are similar; the cross-
entropy of S under it is l. The class-balanced weights w = |pairs| / |similar| (or / |dissimilar|)
make the weighted mean of l the sum of the two means (HashNet's). The cosine is clamped at 0.99, so
d >= bits / 200 and a pair at cosine > 0.99 has no gradient (the reference's), and the norms'
product at 1e-4 from below. Defaults: gamma = 20, lambda = 0.1 (`quantization`), the reference's.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.methods.base import HashingMethod, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.pairwise_toolkit import class_balanced_mean
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

MAX_COSINE, MIN_NORM = 0.99, 1e-4


def normalised_hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len a, len b): bits / 2 * (1 - cos), the cosine clamped at 0.99 (DCH's Eq. 6)."""
    norms = a.norm(dim=1, keepdim=True) @ b.norm(dim=1, keepdim=True).t()
    cosine = a @ b.t() / norms.clamp(min=MIN_NORM)
    return (1.0 - cosine.clamp(max=MAX_COSINE)) * a.shape[1] / 2.0


@register_method("dch", display_name="DCH")
class DCH(HashingMethod):
    """Class-balanced Cauchy cross-entropy on the normalised Hamming distance plus Cauchy quantisation."""

    hyper_parameters = {
        "gamma": Param(float, Rule(above=0.0), "scale of the Cauchy distribution"),
        "quantization": Param(float, Rule(minimum=0.0), "weight of the Cauchy quantisation term (lambda)"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, gamma: float = 20.0, quantization: float = 0.1):
        super().__init__(bits, num_train, num_classes)
        self.gamma, self.quantization = gamma, quantization  # checked as declared

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = step.outputs.float()
        labels = step.labels.float()
        similar = pairwise_similarity(labels, labels)
        distance = normalised_hamming_distance(codes, codes)
        cauchy = similar * torch.log1p(distance / self.gamma) + (1.0 - similar) * torch.log1p(self.gamma / distance)
        to_binary = normalised_hamming_distance(codes.abs(), torch.ones(1, self.bits, device=codes.device))
        return {
            "cauchy": class_balanced_mean(cauchy, similar),
            "quantization": self.quantization * torch.log1p(to_binary / self.gamma).mean(),
        }
