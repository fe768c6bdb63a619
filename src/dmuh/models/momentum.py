"""The momentum (weight-averaged) copy of a hashing network, paper Eq. 5."""

from __future__ import annotations

import copy
from typing import Callable, Tuple, TypeVar

import torch
from torch import nn

DROPOUT_MODES = ("off", "own", "shared")
T = TypeVar("T")


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class MomentumNetwork(nn.Module):
    """theta_m <- alpha * theta_m + (1 - alpha) * theta_h (`update`, after every optimiser step or
    once per epoch, as the method says).

    Mode: the copy runs with batch statistics like the hashing network it is compared to (so the
    gap h - m measures how the weights moved, not a train/eval difference). Its dropout
    (`dropout`): "off" (dropout noise is not uncertainty about the weights), "own" (its own random
    masks, like a second sample of the network) or "shared" (the masks the hashing network drew
    for the same batch, replayed from the random state: `paired`). Its buffers (BatchNorm running
    statistics) are its own: they start as the hashing network's when the copy is made and then
    follow its own passes over the training batches, so that `retrieval=momentum` encodes with the
    statistics of the weights it has (copying the hashing network's at every update, as before,
    paired lagged weights with another network's statistics). No gradient ever flows into it.
    """

    def __init__(self, network: nn.Module, alpha: float, dropout: str = "off"):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"momentum alpha must be in [0, 1], got {alpha}")
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"momentum dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
        self.alpha = float(alpha)
        self.dropout = dropout
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

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        self.network.train()
        if self.dropout == "off":
            for module in self.network.modules():
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.eval()
        return self.network(*args, **kwargs)

    def paired(self, run_hashing: Callable[[], T], x: torch.Tensor) -> Tuple[T, torch.Tensor]:
        """(run_hashing(), this copy's outputs for x): the hashing network's pass and this one's.

        With dropout="shared" the copy replays the random state the hashing pass started from, so
        both draw the same dropout masks (same architecture, same order of random draws; not
        guaranteed under torch.compile), and the random stream continues as after the hashing pass.
        """
        if self.dropout != "shared":
            return run_hashing(), self(x)
        state = _rng_state(x.device)
        hashing = run_hashing()
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], x.device)
            momentum = self(x)
        return hashing, momentum
