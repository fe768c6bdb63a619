"""GreedyHash (Su et al., NeurIPS 2018): sign in the forward pass, straight-through backward.

Reference: ssppp/GreedyHash cifar1.py (supervised), cross-checked with swuxyj/DeepHash-pytorch
GreedyHash.py.

  b = sign(z)                          forward; the backward pass copies the gradient to z
  L = CE(W b, y) + alpha * mean_ik | |z_ik| - 1 |^3

W is a bias-free linear classifier (bits -> classes) owned by the method, so it joins the
optimiser. The cube term keeps z near +-1 so that the copied gradient is close to the true one.
Multi-label items use the cross-entropy to their label distribution (`label_cross_entropy`).
Defaults: alpha = 0.1 (the official CIFAR-10 value).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import SignStraightThrough, label_cross_entropy
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("greedyhash", display_name="GreedyHash")
class GreedyHash(HashingMethod):
    """Classification of the binary codes themselves, trained through a straight-through sign."""

    hyper_parameters = {"alpha": Param(float, Rule(minimum=0.0), "weight of the cubic quantisation term")}

    def __init__(self, bits: int, num_train: int, num_classes: int, alpha: float = 0.1):
        super().__init__(bits, num_train, num_classes)
        self.alpha = alpha  # checked as declared
        self.classifier = nn.Linear(self.bits, self.num_classes, bias=False)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        outputs = step.outputs.float()
        binary = SignStraightThrough.apply(outputs)
        return {
            "classification": label_cross_entropy(self.classifier(binary), step.labels.float()),
            "quantization": self.alpha * (outputs.abs() - 1.0).abs().pow(3).mean(),
        }
