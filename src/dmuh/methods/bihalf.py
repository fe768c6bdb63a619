"""Bi-half (Li & van Gemert, AAAI 2021): binarise every bit at its batch median, for maximal bit entropy.

Reference: liyunqianggyn/Deep-Unsupervised-Image-Hashing (ImageHashing/Cifar10_I.py, Cifar10_II.py
for the layer and the loss, cal_map_single.py for the retrieval codes).

The bi-half layer, on a batch U = z (B, bits):

  forward:  per bit (column), the floor(B/2) largest values -> +1, the others -> -1 (with odd B the
            extra item gets -1), so every bit is +1 for half the batch: a uniform bit, maximal entropy
  backward: dL/dU = dL/dB + gamma * (U - B) / (B * bits)

the straight-through gradient plus that of gamma / (2 B bits) * ||U - B||^2, which pulls U towards
its codes. The loss is GreedyHash-unsup's without the cubic term (x: the reference features):

  L = mean_(i,j) in P ( cos(b_i, b_j) - cos(x_i, x_j) )^2

with the same pairings P (`pairs`, see `greedyhash_unsup`). The layer depends on the batch, so the
retrieval codes are the plain sign(z), as in the official evaluation. Defaults: gamma = 6 (the
official image-hashing value), pairs = "halves" (the official pairing). No label is read.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.functional import BiHalf  # noqa: F401  (tests and callers read it here)
from dmuh.methods.components.params import Param
from dmuh.methods.components.reference import PAIRINGS, ReferenceFeatures, similarity_mse
from dmuh.utils.schema import Rule


@register_method("bihalf", display_name="BiHalf")
class BiHalfHash(HashingMethod):
    """Cosine similarities of bi-half codes regressed onto the reference features'."""

    requires = Requirements(labels=False, reference_features=True)

    hyper_parameters = {
        "gamma": Param(float, Rule(minimum=0.0), "weight of the bi-half layer's pull of U to B"),
        "pairs": Param(str, Rule(choices=PAIRINGS), "the batch pairs compared: i with i + B/2, or all"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, gamma: float = 6.0, pairs: str = "halves"):
        super().__init__(bits, num_train, num_classes)
        self.gamma, self.pairs = gamma, pairs  # checked as declared
        self.reference = ReferenceFeatures()

    def set_reference_features(self, features: torch.Tensor) -> None:
        self.reference.set(features)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        binary = BiHalf.apply(step.outputs.float(), self.gamma)
        return {"similarity": similarity_mse(binary, self.reference.of(step.indices), self.pairs)}
