"""LCDSH (Zhu and Gao, IJCAI 2017): Locality-Constrained Deep Supervised Hashing.

Reference: swuxyj/DeepHash-pytorch LCDSH.py (there is no public code of the authors'). Over the
B x B pairs of the batch (the diagonal included, as there), with u = z and b = sign(u):

  s_ij = +1 when items i and j share a label, -1 otherwise
  Theta_ij = clamp(u_i . u_j / 2, -50, 50),  Theta^b_ij = b_i . b_j / 2
  L = mean_ij log(1 + e^(-s_ij Theta_ij)) + lambda * mean_ij (sigmoid(Theta_ij) - sigmoid(Theta^b_ij))^2

the pairwise likelihood of the continuous codes plus the consistency of its probabilities with
those of the binary codes (the "locality constraint" between continuous and binary space). The
clamp is the reference's (it bounds the exponent; outside it the likelihood has no gradient).
Default: lambda = 3 (the reference's), named `consistency`.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from dmuh.codes.binary import sign
from dmuh.methods.base import HashingMethod, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

THETA_BOUND = 50.0


@register_method("lcdsh", display_name="LCDSH")
class LCDSH(HashingMethod):
    """Pairwise likelihood of u plus the squared gap between its pair probabilities and sign(u)'s."""

    hyper_parameters = {
        "consistency": Param(float, Rule(minimum=0.0), "weight of the continuous-binary consistency term (lambda)")
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, consistency: float = 3.0):
        super().__init__(bits, num_train, num_classes)
        self.consistency = consistency  # checked as declared

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = step.outputs.float()
        signed = 2.0 * pairwise_similarity(step.labels.float(), step.labels.float()) - 1.0
        theta = (0.5 * codes @ codes.t()).clamp(-THETA_BOUND, THETA_BOUND)
        binary = sign(codes.detach())
        theta_binary = 0.5 * binary @ binary.t()
        return {
            "likelihood": F.softplus(-signed * theta).mean(),
            "consistency": self.consistency * (torch.sigmoid(theta) - torch.sigmoid(theta_binary)).pow(2).mean(),
        }
