"""JMLH (Shen et al., ICCVW 2019): Embarrassingly Simple Binary Representation Learning, stochastic
binary codes read by a classifier, with a KL pull of the bit probabilities to Bernoulli(1/2).

Reference: CISiPLab/cisip-FIRe (functions/loss/jmlh.py, models/architectures/arch_jmlh.py,
models/layers/activation.py `JMLHBinaryActivation`, configs/templates/jmlh.yaml), cross-checked
with the first author's TensorFlow version in ymcidence/TBH (model/jmlh.py, train/jmlh_train.py,
layer/binary_activation.py).

With q = sigmoid(z) and eps ~ U(0, 1) per bit (`stochastic`; 1/2 otherwise and at evaluation):

  b = (sign(q - eps) + 1) / 2 in {0, 1}        forward; backward dL/dz = q (1 - q) dL/db
  L = CE(W b + c, y) + kl * mean_i sum_k KL(Bernoulli(q_ik) || Bernoulli(1/2))

b is a sample of Bernoulli(q), and its gradient the distributional derivative of its expectation.
W, c: the method's own linear classifier (bits -> classes, with a bias), trained with it.
Multi-label items use the cross-entropy to labels / (number of labels) (FIRe's multiclass branch).
The retrieval codes are sign(z): b at eps = 1/2. The KL is computed from log-sigmoids, without
FIRe's 1e-7 inside the logarithms (no difference but near saturation). Defaults (FIRe's):
stochastic = true, kl = 0.1; the TBH repository trains with eps = 1/2 and kl = 0.2
(`-p stochastic=false -p kl=0.2`).
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import label_cross_entropy
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


class StochasticBinary(torch.autograd.Function):
    """(sign(sigmoid(z) - eps) + 1) / 2 forward; sigmoid'(z) times the incoming gradient backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        prob = torch.sigmoid(logits)
        ctx.save_for_backward(prob)
        return (torch.sign(prob - eps) + 1.0) / 2.0

    @staticmethod
    def backward(ctx, grad_code: torch.Tensor):
        (prob,) = ctx.saved_tensors
        return prob * (1.0 - prob) * grad_code, None


def bernoulli_kl_to_half(logits: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(z)) || Bernoulli(1/2)) per element: q log q + (1 - q) log(1 - q) + log 2."""
    prob = torch.sigmoid(logits)
    return prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits) + math.log(2.0)


@register_method("jmlh", display_name="JMLH")
class JMLH(HashingMethod):
    """Cross-entropy of a classifier over stochastic binary codes, plus KL to Bernoulli(1/2)."""

    hyper_parameters = {
        "kl": Param(float, Rule(minimum=0.0), "weight of the KL of the bit probabilities to Bernoulli(1/2)"),
        "stochastic": Param(bool, help="sample the codes in training (eps ~ U(0, 1)); false: eps = 1/2"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, kl: float = 0.1, stochastic: bool = True):
        super().__init__(bits, num_train, num_classes)
        self.kl, self.stochastic = kl, stochastic  # checked as declared
        self.classifier = nn.Linear(self.bits, self.num_classes)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        logits = step.outputs.float()
        eps = torch.rand_like(logits) if self.training and self.stochastic else torch.full_like(logits, 0.5)
        codes = StochasticBinary.apply(logits, eps)
        return {
            "classification": label_cross_entropy(self.classifier(codes), step.labels.float()),
            "kl": self.kl * bernoulli_kl_to_half(logits).sum(dim=1).mean(),
        }
