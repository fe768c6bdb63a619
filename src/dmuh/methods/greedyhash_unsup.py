"""GreedyHash, unsupervised (Su et al., NeurIPS 2018): codes that keep the reference cosine similarities.

Reference: ssppp/GreedyHash unsupervised_vgg.py (the official code trains a Linear(4096, L) on
frozen VGG16 fc7 features, which are also its targets).

With b = sign(z) (straight-through backward, `SignStraightThrough`) and x the reference features
of the batch items (`ReferenceFeatures`: the data's vectors, or the backbone's features when
training starts):

  L = mean_(i,j) in P ( cos(b_i, b_j) - cos(x_i, x_j) )^2  +  alpha * mean_ik | |z_ik| - 1 |^3

P, the pairs (`pairs`): "halves" (the official pairing) splits the batch of B in two and pairs item
i with item i + B/2, so B/2 pairs per batch (with odd B the last item is left out); "all" takes
every i != j pair of the batch (the off-diagonal mean of the B x B matrices), more pairs per step
for the same batch. The cubic term keeps z near +-1 so that the copied gradient is close to the
true one. Defaults: alpha = 0.1, pairs = "halves" (the official values). No label is read.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.functional import SignStraightThrough
from dmuh.methods.components.params import Param
from dmuh.methods.components.reference import PAIRINGS, ReferenceFeatures, similarity_mse
from dmuh.utils.schema import Rule


@register_method("greedyhash-unsup", display_name="GreedyHash (unsup.)")
class GreedyHashUnsupervised(HashingMethod):
    """Cosine similarities of straight-through sign codes regressed onto the reference features'."""

    requires = Requirements(labels=False, reference_features=True)

    hyper_parameters = {
        "alpha": Param(float, Rule(minimum=0.0), "weight of the cubic quantisation term"),
        "pairs": Param(str, Rule(choices=PAIRINGS), "the batch pairs compared: i with i + B/2, or all"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, alpha: float = 0.1, pairs: str = "halves"):
        super().__init__(bits, num_train, num_classes)
        self.alpha, self.pairs = alpha, pairs  # checked as declared
        self.reference = ReferenceFeatures()

    def set_reference_features(self, features: torch.Tensor) -> None:
        self.reference.set(features)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        outputs = step.outputs.float()
        binary = SignStraightThrough.apply(outputs)
        return {
            "similarity": similarity_mse(binary, self.reference.of(step.indices), self.pairs),
            "quantization": self.alpha * (outputs.abs() - 1.0).abs().pow(3).mean(),
        }
