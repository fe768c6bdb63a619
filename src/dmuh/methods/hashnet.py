"""HashNet (Cao et al., ICCV 2017): deep learning to hash by continuation.

Reference: thuml/HashNet, pytorch/src (network.py for the continuation, loss.py
`pairwise_loss_updated` for the class-balanced loss), cross-checked with swuxyj/DeepHash-pytorch
HashNet.py.

  h = tanh(scale * z)                  scale grows during training, so tanh tends to sign
  Theta_ij = alpha * h_i . h_j         alpha = 10 / bits ("sigmoid_param")
  l_ij = log(1 + e^Theta_ij) - S_ij Theta_ij
  L = sum_ij w_ij l_ij / |pairs|,  w_ij = |pairs| / |similar| if S_ij = 1 else |pairs| / |dissimilar|

so L is the mean loss over the batch's similar pairs plus the mean over its dissimilar pairs (the
class-balanced weighting of the imbalanced similarity data). Pairs are all B x B pairs of the batch
(the official code pairs two batches; DeepHash-pytorch pairs a batch with itself).

Continuation, per training step as in the official network: every `step_size` steps,
scale = init_scale * (1 + gamma * step) ^ power. Defaults: step_size 200, gamma 0.005, power 0.5,
init_scale 1. The step counter is a buffer, so a resumed run continues the schedule.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from dmuh.methods.base import (
    HashingMethod,
    StepInputs,
    pairwise_similarity,
    register_method,
)
from dmuh.methods.components.pairwise_toolkit import class_balanced_mean
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


def class_balanced_pair_loss(theta: torch.Tensor, similar: torch.Tensor) -> torch.Tensor:
    """Mean of log(1 + e^Theta) - S Theta over similar pairs plus its mean over dissimilar pairs.

    A kind of pair absent from the batch adds nothing (no division by zero).
    """
    return class_balanced_mean(F.softplus(theta) - similar * theta, similar)


@register_method("hashnet", display_name="HashNet")
class HashNet(HashingMethod):
    """Class-balanced pairwise likelihood on tanh(scale * z), scale raised by continuation."""

    hyper_parameters = {
        "alpha": Param(float, Rule(above=0.0), "the inner-product scale (none: 10 / bits)", optional=True),
        "step_size": Param(int, Rule(minimum=1), "steps between raises of the continuation scale"),
        "gamma": Param(float, Rule(minimum=0.0), "continuation: scale = init_scale (1 + gamma step)^power"),
        "power": Param(float, Rule(minimum=0.0), "continuation power"),
        "init_scale": Param(float, Rule(above=0.0), "the scale at step 0"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: Optional[float] = None,
        step_size: int = 200,
        gamma: float = 0.005,
        power: float = 0.5,
        init_scale: float = 1.0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.alpha = 10.0 / self.bits if alpha is None else alpha  # checked as declared
        self.step_size, self.gamma, self.power, self.init_scale = step_size, gamma, power, init_scale
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def scale(self) -> torch.Tensor:
        """The continuation scale at the current step (a 0-d tensor: no host sync on a GPU)."""
        last_update = torch.div(self.step, self.step_size, rounding_mode="floor") * self.step_size
        return self.init_scale * (1.0 + self.gamma * last_update.float()) ** self.power

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.scale() * outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if self.training:
            self.step += 1
        codes = self.continuous_codes(step.outputs.float())
        theta = self.alpha * codes @ codes.t()
        similar = pairwise_similarity(step.labels.float(), step.labels.float())
        self.step_stats = {"scale": self.scale().detach()}
        return {"likelihood": class_balanced_pair_loss(theta, similar)}
