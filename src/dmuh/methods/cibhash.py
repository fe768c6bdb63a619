"""CIBHash (Qiu et al., IJCAI 2021): contrastive learning of binary codes with an information bottleneck.

Reference: qiuzx2/CIBHash (model/CIBHash.py, main.py).

Two augmented views of every image (`views = 2`, SimCLR's augmentations) give raw outputs z1, z2;
with p = sigmoid(z) each bit's probability of +1 and b = sign(p - 1/2) (straight-through backward,
`SignStraightThrough`, so the gradient reaches p unchanged):

  L = NT-Xent(b1, b2; T) + beta * 1/2 * ( KL(p1 || sg p2) + KL(p2 || sg p1) )

  NT-Xent: over the 2B codes, logits cos(b_m, b_n) / T for n != m, the other view of the same
           item the positive; cross-entropy summed over the 2B rows and divided by 2B
  KL(p || q) = mean_i sum_k [ p log((p + eps) / (q + eps)) + (1 - p) log((1 - p + eps) / (1 - q + eps)) ]

the Bernoulli KL of the two views' bit probabilities, summed over the bits and averaged over the
batch; sg stops the gradient, so each view is pulled towards the other. eps = 1e-8 as in the
official code. The official code binarises deterministically, as here; the paper's stochastic
binary layer (b = +1 where p > u, u ~ U(0, 1), straight-through) is `stochastic=True`, in training
only. The retrieval code sign(z) = sign(sigmoid(z) - 1/2), so `continuous_codes` is the identity.
Defaults: temperature = 0.3, beta = 0.001 (the official values), stochastic = False. It learns the
image network end to end from its views, so it needs images (`Requirements.images`), and reads no label.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.functional import SignStraightThrough, nt_xent
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

EPS = 1e-8


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) summed over the bits, averaged over the batch (eps-smoothed logs)."""
    ones = p * (torch.log(p + EPS) - torch.log(q + EPS))
    zeros = (1 - p) * (torch.log(1 - p + EPS) - torch.log(1 - q + EPS))
    return (ones + zeros).sum(dim=1).mean()


@register_method("cibhash", display_name="CIBHash")
class CIBHash(HashingMethod):
    """NT-Xent between the binary codes of two views, plus their bit distributions' symmetric KL."""

    requires = Requirements(labels=False, views=2, view_augment="simclr", images=True)

    hyper_parameters = {
        "temperature": Param(float, Rule(above=0.0), "NT-Xent temperature"),
        "beta": Param(float, Rule(minimum=0.0), "weight of the views' symmetric KL"),
        "stochastic": Param(bool, help="sample the codes from Bernoulli(p) instead of sign (training only)"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        temperature: float = 0.3,
        beta: float = 0.001,
        stochastic: bool = False,
    ):
        super().__init__(bits, num_train, num_classes)
        self.temperature, self.beta, self.stochastic = temperature, beta, stochastic  # checked as declared

    def binarize(self, probabilities: torch.Tensor) -> torch.Tensor:
        """+-1 codes of bit probabilities, straight-through to them."""
        if self.stochastic and self.training:
            threshold = torch.rand_like(probabilities)
        else:
            threshold = torch.full_like(probabilities, 0.5)
        return SignStraightThrough.apply(probabilities - threshold)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if step.view_outputs is None:
            raise DmuhError("method 'cibhash': needs the second view's outputs (StepInputs.view_outputs)")
        first, second = torch.sigmoid(step.outputs.float()), torch.sigmoid(step.view_outputs.float())
        kl = 0.5 * (bernoulli_kl(first, second.detach()) + bernoulli_kl(second, first.detach()))
        return {
            "contrastive": nt_xent(self.binarize(first), self.binarize(second), self.temperature),
            "kl": self.beta * kl,
        }
