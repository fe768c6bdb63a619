"""The one contract every hashing method implements, and the registry that names them.

A method is a small `nn.Module` (like a pytorch-metric-learning loss): the training loop hands it a
`StepInputs` per batch and gets back a dict of named loss terms whose sum is the loss. Anything the
method needs beyond the network (a memory of training outputs, hash centres, a classifier) lives
inside it, so its parameters join the optimiser and its buffers join the checkpoint.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

from dmuh.errors import DmuhError


@dataclass
class StepInputs:
    """What the training loop knows about one batch."""

    outputs: torch.Tensor  # (B, bits) raw hash-layer outputs z of the hashing network
    labels: torch.Tensor  # (B, C) float multi-hot
    indices: torch.Tensor  # (B,) positions in the training split (for memories)
    momentum_outputs: Optional[torch.Tensor] = None  # (B, bits) raw outputs of the momentum copy
    features: Optional[torch.Tensor] = None  # (B, D) backbone features, for methods that ask
    # Under torchrun: the whole global batch of all ranks (detached). A method that keeps a memory
    # of training outputs writes it from `shared()`, so every rank holds the same memory.
    shared_indices: Optional[torch.Tensor] = None
    shared_outputs: Optional[torch.Tensor] = None
    shared_momentum_outputs: Optional[torch.Tensor] = None

    def shared(self):
        """(indices, outputs, momentum_outputs) of the global batch: all ranks', or this batch's."""
        if self.shared_indices is None:
            return self.indices, self.outputs.detach(), None if self.momentum_outputs is None else self.momentum_outputs.detach()
        return self.shared_indices, self.shared_outputs, self.shared_momentum_outputs


class HashingMethod(nn.Module):
    """Base class. Subclasses set the flags below and implement `forward`."""

    name: str = ""
    uses_momentum: bool = False  # the loop keeps a momentum copy and passes its outputs
    uses_features: bool = False  # the loop passes backbone features
    shallow: bool = False  # fitted once on backbone features (`fit`), not trained by gradient

    def __init__(self, bits: int, train_labels: torch.Tensor):
        super().__init__()
        self.bits = int(bits)
        self.num_train, self.num_classes = train_labels.shape
        # Per-step numbers for the log (e.g. mean uncertainty), as 0-d tensors: read once per epoch.
        self.step_stats: Dict[str, torch.Tensor] = {}

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Hook for schedules inside the loss (HashNet's continuation, DSDH's code update)."""

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        """Map raw outputs to the real-valued codes whose sign is the binary code."""
        return outputs


def pairwise_similarity(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """S_ij = 1 when items share at least one label (single- and multi-label alike)."""
    return (labels_a @ labels_b.t() > 0).to(labels_a.dtype)


_REGISTRY: Dict[str, Callable[..., HashingMethod]] = {}


def register_method(name: str, **fixed):
    """Class decorator: `@register_method("dmuh-wo-u", use_uncertainty_term=False)` registers a variant."""

    def decorate(cls):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")

        def factory(**params):
            return cls(**{**params, **fixed})

        factory.cls = cls
        factory.fixed = fixed
        _REGISTRY[name] = factory
        return cls

    return decorate


def available() -> list:
    """Names of every registered method."""
    return sorted(_REGISTRY)


def method_class(name: str):
    if name not in _REGISTRY:
        raise DmuhError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name].cls


def create_method(name: str, bits: int, train_labels: torch.Tensor, **params) -> HashingMethod:
    """Create a registered method; unknown hyper-parameters are an error naming them."""
    method_class(name)  # validates the name
    factory = _REGISTRY[name]
    accepted = set(inspect.signature(factory.cls.__init__).parameters) - {"self", "bits", "train_labels"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise DmuhError(
            f"method {name!r} has no parameter {unknown[0]!r} (--param); it takes: {', '.join(sorted(accepted - set(factory.fixed)))}"
        )
    method = factory(bits=bits, train_labels=train_labels, **params)
    method.name = name
    return method
