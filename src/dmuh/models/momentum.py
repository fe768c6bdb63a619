"""The momentum (weight-averaged) copy of a hashing network, paper Eq. 5."""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumNetwork(nn.Module):
    """theta_m <- alpha * theta_m + (1 - alpha) * theta_h, after every optimiser step.

    Mode: the copy runs with batch statistics like the hashing network it is compared to
    (so the gap h - m measures how the weights moved, not a train/eval difference), but its
    dropout is off (dropout noise is not uncertainty about the weights). Its buffers (BatchNorm
    running statistics) are copied from the hashing network, since they are averages already.
    No gradient ever flows into it.
    """

    def __init__(self, network: nn.Module, alpha: float):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"momentum alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.network = copy.deepcopy(network)
        for p in self.network.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        own = [p for p in self.network.parameters()]
        online = [p.detach() for p in network.parameters()]
        if len(own) != len(online):
            raise ValueError("momentum network and hashing network have different parameters")
        # lerp: m + (1 - alpha) * (h - m) == alpha * m + (1 - alpha) * h
        torch._foreach_lerp_(own, online, 1.0 - self.alpha)
        for b_m, b_h in zip(self.network.buffers(), network.buffers()):
            b_m.copy_(b_h)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        self.network.train()
        for module in self.network.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
        return self.network(*args, **kwargs)
