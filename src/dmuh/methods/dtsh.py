"""DTSH (Wang, Shi and Kitani, ACCV 2016): Deep Supervised Hashing with Triplet Labels.

Reference: swuxyj/DeepHash-pytorch DTSH.py (after the authors' MatConvNet code, Minione/DTSH).
Every in-batch triplet (anchor i, positive j, negative k), S_ij = 1 and S_ik = 0, with Theta = u u^T:

  t_ijk = clamp(Theta_ij - Theta_ik - alpha, -100, 50)
  L = mean over anchors with a positive and a negative of [mean_jk log(1 + e^(-t_ijk))]
      + lambda * mean_ik (u_ik - sign(u_ik))^2

the negative log-likelihood that the positive is closer to the anchor than the negative by the
margin alpha, averaged per anchor and then over the anchors, plus the quantisation term. As in the
reference, an anchor is its own positive (S_ii = 1) and the clamp bounds t (outside it, no
gradient). Defaults: alpha = 5 (`margin`), lambda = 1 (`quantization`), the raw linear output u = z.

All B^3 triplets are one tensor: 2 M entries at B = 128 (8 MB each in float32).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from dmuh.codes.binary import sign
from dmuh.methods.base import HashingMethod, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

TRIPLET_BOUNDS = (-100.0, 50.0)


def triplet_likelihood(codes: torch.Tensor, similar: torch.Tensor, margin: float) -> torch.Tensor:
    """DTSH's triplet term: per anchor the mean of log(1 + e^-t) over its (positive, negative)
    pairs, then the mean over the anchors that have both (0 when none has)."""
    theta = codes @ codes.t()
    triplet = (theta.unsqueeze(2) - theta.unsqueeze(1) - margin).clamp(*TRIPLET_BOUNDS)  # [anchor, pos, neg]
    dissimilar = 1.0 - similar
    pairs = similar.unsqueeze(2) * dissimilar.unsqueeze(1)
    count = pairs.sum(dim=(1, 2))
    per_anchor = (F.softplus(-triplet) * pairs).sum(dim=(1, 2)) / count.clamp(min=1)
    anchors = (count > 0).to(codes.dtype)
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)


@register_method("dtsh", display_name="DTSH")
class DTSH(HashingMethod):
    """Triplet likelihood over every in-batch triplet plus a quantisation term."""

    hyper_parameters = {
        "margin": Param(float, Rule(minimum=0.0), "the triplet margin alpha on inner products"),
        "quantization": Param(float, Rule(minimum=0.0), "weight of the quantisation term (lambda)"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, margin: float = 5.0, quantization: float = 1.0):
        super().__init__(bits, num_train, num_classes)
        self.margin, self.quantization = margin, quantization  # checked as declared

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = step.outputs.float()
        labels = step.labels.float()
        return {
            "triplet": triplet_likelihood(codes, pairwise_similarity(labels, labels), self.margin),
            "quantization": self.quantization * (codes - sign(codes.detach())).pow(2).mean(),
        }
