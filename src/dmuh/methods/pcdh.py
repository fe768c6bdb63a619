"""PCDH (Chen et al., Neurocomputing 2020): Deep discrete hashing with pairwise correlation learning.

Reference: swuxyj/DeepHash-pytorch PCDH.py (no code of the authors' is public). The network there
is backbone features f -> h = tanh(hash layer) -> a discrete hash layer b = binary(V h + c) -> a
bias-free classifier W b. In dmuh the hash layer is the network's (z, h = tanh(z)) and the method
holds the discrete hash layer V and the classifier W, so both join the optimiser; the backbone
features come from the loop (`Requirements.features`). Over the B x B pairs of the batch:

  contrastive(x)_ij = S_ij D_ij / 2 + (1 - S_ij) max(m - D_ij, 0)^2 / 2,   D_ij = ||x_i - x_j||^2
  L = mean_ij contrastive(h) + alpha * mean_ij contrastive(f) + beta * CE(W b, y)

the pairwise correlation of the hash-like codes h and of the features f (the same margin m = 2
bits for both, squared hinge, as the reference), and the classification of the binary codes.

b = sign(V h + c) (the reference's hard sigmoid clamp((x + 1) / 2, 0, 1) thresholded at 1/2,
mapped to +-1), and the retrieval codes are b (`continuous_codes` gives V h + c). The reference's
threshold passes no gradient, so there V and c never learn and the codes stay a random projection
of h (its log reports MAP 0.166 on CIFAR-10); `straight_through=true` (the default) passes the
gradient of the hard sigmoid's output to x where |x| < 1 (the straight-through estimator of
binary networks, b = hardtanh(x) forward-replaced by sign(x)); `straight_through=false` is the
reference as written. CE: softmax on single-label data, summed sigmoid on multi-label data
(`classification=auto`; the reference chooses by data set name). Defaults: alpha = 1, beta = 1,
m = 2 bits.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.pairwise_toolkit import (
    CLASSIFICATION_PARAM,
    CodeClassifier,
    contrastive,
    squared_distances,
)
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("pcdh", display_name="PCDH")
class PCDH(HashingMethod):
    """Contrastive loss on tanh(z) and on the backbone features plus the classification of the
    discrete hash layer's binary codes."""

    requires = Requirements(features=True)
    hyper_parameters = {
        "alpha": Param(float, Rule(minimum=0.0), "weight of the contrastive term on the backbone features"),
        "beta": Param(float, Rule(minimum=0.0), "weight of the classification of the binary codes"),
        "margin": Param(float, Rule(above=0.0), "the contrastive margin (none: 2 bits)", optional=True),
        "classification": CLASSIFICATION_PARAM,
        "straight_through": Param(
            bool, help="pass the gradient through the binary codes (false: the reference's none)"
        ),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 1.0,
        beta: float = 1.0,
        margin: Optional[float] = None,
        classification: str = "auto",
        straight_through: bool = True,
    ):
        super().__init__(bits, num_train, num_classes)
        self.alpha, self.beta, self.straight_through = alpha, beta, straight_through  # all checked as declared
        self.margin = 2.0 * self.bits if margin is None else margin
        self.discrete_layer = nn.Linear(self.bits, self.bits)
        self.classifier = CodeClassifier(self.bits, self.num_classes, classification)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.discrete_layer(torch.tanh(outputs))

    def binary_codes(self, logits: torch.Tensor) -> torch.Tensor:
        """sign(x); with the straight-through estimator its gradient is hardtanh's (1 where |x| < 1)."""
        if not self.straight_through:
            return sign(logits.detach())
        bounded = F.hardtanh(logits)
        return bounded + (sign(logits.detach()) - bounded).detach()

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if step.features is None:
            raise DmuhError(f"method {self.name!r} needs the backbone features of the batch (StepInputs.features)")
        hashed = torch.tanh(step.outputs.float())
        labels = step.labels.float()
        dissimilar = 1.0 - pairwise_similarity(labels, labels)
        binary = self.binary_codes(self.discrete_layer(hashed))
        features = contrastive(squared_distances(step.features.float()), dissimilar, self.margin, squared_hinge=True)
        return {
            "contrastive": contrastive(squared_distances(hashed), dissimilar, self.margin, squared_hinge=True).mean(),
            "features": self.alpha * features.mean(),
            "classification": self.beta * self.classifier(binary, labels),
        }
