"""DSHSD (Wu et al., IEEE Access 2019): Deep Supervised Hashing Based on Stable Distribution.

Reference: swuxyj/DeepHash-pytorch DSHSD.py (DSH's contrastive loss plus a classifier of the codes).
With u = tanh(z), over the B x B pairs of the batch (the diagonal included, as there):

  D_ij = ||u_i - u_j||^2,  dissimilar_ij = 1 when items i and j share no label
  L = alpha * mean_ij [(1 - dissimilar_ij) D_ij / 2 + dissimilar_ij max(m - D_ij, 0) / 2] + CE(W u, y)

W is the method's own bias-free linear classifier (bits -> classes), so it joins the optimiser.
CE is the softmax cross-entropy on single-label data (the paper's Eq. 7) and the summed sigmoid
cross-entropy on multi-label data (Eq. 8); the reference chooses by data set name, dmuh by the
training labels (`classification=auto`: sigmoid when an item has several labels).
Defaults: alpha = 0.05, m = 2 bits (the reference's).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from dmuh.methods.base import HashingMethod, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.pairwise_toolkit import (
    CLASSIFICATION_PARAM,
    CodeClassifier,
    contrastive,
    squared_distances,
)
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("dshsd", display_name="DSHSD")
class DSHSD(HashingMethod):
    """DSH's contrastive loss on tanh(z) within the batch plus a classifier of the codes."""

    hyper_parameters = {
        "alpha": Param(float, Rule(minimum=0.0), "weight of the contrastive term"),
        "margin": Param(float, Rule(above=0.0), "the contrastive margin (none: 2 bits)", optional=True),
        "classification": CLASSIFICATION_PARAM,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 0.05,
        margin: Optional[float] = None,
        classification: str = "auto",
    ):
        super().__init__(bits, num_train, num_classes)
        self.alpha = alpha  # all checked as declared
        self.margin = 2.0 * self.bits if margin is None else margin
        self.classifier = CodeClassifier(self.bits, self.num_classes, classification)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.continuous_codes(step.outputs.float())
        labels = step.labels.float()
        dissimilar = 1.0 - pairwise_similarity(labels, labels)
        pairs = contrastive(squared_distances(codes), dissimilar, self.margin)
        return {
            "contrastive": self.alpha * pairs.mean(),
            "classification": self.classifier(codes, labels),
        }
