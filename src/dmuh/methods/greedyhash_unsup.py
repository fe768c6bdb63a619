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
import torch.nn.functional as F

from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.functional import check_choice, check_number
from dmuh.methods.components.reference import ReferenceFeatures, cosine_pairs
from dmuh.methods.greedyhash import SignStraightThrough

PAIRINGS = ("halves", "all")


def similarity_mse(codes: torch.Tensor, reference: torch.Tensor, pairs: str) -> torch.Tensor:
    """Mean squared difference of the codes' and the reference's cosine similarities over the
    batch pairs `pairs` ("halves": i with i + B/2; "all": every i != j)."""
    count = codes.shape[0]
    if count < 2:
        raise DmuhError(f"similarity of codes: a batch of {count} item has no pair (use --batch-size >= 2)")
    if pairs == "halves":
        half = count // 2
        first, second = slice(0, half), slice(half, 2 * half)
        code_cos = F.cosine_similarity(codes[first], codes[second], dim=1)
        reference_cos = F.cosine_similarity(reference[first], reference[second], dim=1)
        return F.mse_loss(code_cos, reference_cos)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=codes.device)
    difference = cosine_pairs(codes, codes) - cosine_pairs(reference, reference)
    return difference[off_diagonal].pow(2).mean()


@register_method("greedyhash-unsup", display_name="GreedyHash (unsup.)")
class GreedyHashUnsupervised(HashingMethod):
    """Cosine similarities of straight-through sign codes regressed onto the reference features'."""

    requires = Requirements(labels=False, reference_features=True)

    def __init__(self, bits: int, num_train: int, num_classes: int, alpha: float = 0.1, pairs: str = "halves"):
        super().__init__(bits, num_train, num_classes)
        self.alpha = check_number("alpha", alpha, 0.0)
        self.pairs = check_choice("pairs", pairs, PAIRINGS)
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
