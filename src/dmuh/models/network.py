"""A hashing network: a feature backbone followed by one linear hash layer (or a fitted head)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from dmuh.errors import DmuhError

HASH_NORMS = ("none", "batchnorm")


class HashNetwork(nn.Module):
    """backbone(x) -> features (N, feature_dim); hash_layer(features) -> raw codes z (N, bits).

    z has no activation: each hashing method applies its own (tanh, sigmoid, ...) in the loss.
    The backbone must expose `feature_dim`, `input_size` (preferred square resolution, None for
    vector inputs) and `in_channels` (None for vector inputs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        bits: int,
        name: str = "",
        hash_init_std: Optional[float] = 0.01,
        hash_norm: str = "none",
    ):
        super().__init__()
        self.backbone = backbone
        self.bits = int(bits)
        self.name = name
        self.feature_dim = int(backbone.feature_dim)
        self.input_size: Optional[int] = backbone.input_size
        self.in_channels: Optional[int] = backbone.in_channels
        self.hash_layer = nn.Linear(self.feature_dim, self.bits)
        if hash_norm not in HASH_NORMS:
            raise DmuhError(f"hash_norm {hash_norm!r}: choose one of {', '.join(HASH_NORMS)}")
        # BatchNorm on z centres every bit over the batch. Without it, the common component of
        # non-negative (post-ReLU) features gives all images nearly the same code at the start,
        # and pairwise losses then collapse every code to one constant (measured on digits:
        # MAP 0.10 -> 0.9 with a linear model). It also balances the bits, as in OrthoHash.
        self.hash_norm = nn.BatchNorm1d(self.bits) if hash_norm == "batchnorm" else nn.Identity()
        if hash_init_std is not None:
            # Small weights keep tanh(z) in its near-linear range at the start of training
            # (the usual deep-hashing initialisation); None keeps PyTorch's default init.
            nn.init.normal_(self.hash_layer.weight, mean=0.0, std=hash_init_std)
            nn.init.zeros_(self.hash_layer.bias)
        # A shallow method's fitted out-of-sample function (dmuh.models.heads), used in place of
        # hash_norm(hash_layer(.)) once installed; None: the linear hash layer.
        self.head: Optional[nn.Module] = None
        # The create_model(...) arguments that rebuild this architecture (never the weights file).
        self.config: Dict[str, Any] = {}

    def install_head(self, head: nn.Module) -> None:
        """Compute raw codes with a fitted head from now on, and record it in `config` so a
        checkpoint rebuilds it (`create_model(..., head=head.config)`)."""
        self.head = head.to(self.hash_layer.weight.device)
        self.config["head"] = dict(head.config)

    def hash_outputs(self, features: torch.Tensor) -> torch.Tensor:
        """Raw codes z of backbone features, in float32 even under autocast: bf16's spacing near
        |z| = 1 (4e-3 to 8e-3) would put a floor of about 1e-3 under DMUH's u = |h - m|, ten times
        its signal, and quantise the sign of the codes near 0. The layer is small: its cost is not."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.head is not None:
                return self.head(features)
            return self.hash_norm(self.hash_layer(features))

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one input sample: (C, H, W) for images, (D,) for feature vectors."""
        if self.input_size is None:
            return (int(self.backbone.input_dim),)
        return (self.in_channels, self.input_size, self.input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features before the hash layer, (N, feature_dim)."""
        return self.backbone(x)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Raw hash-layer outputs (N, bits); with return_features also the features, in one pass."""
        features = self.backbone(x)
        codes = self.hash_outputs(features)
        return (codes, features) if return_features else codes

    def extra_repr(self) -> str:
        return f"name={self.name!r}, bits={self.bits}, feature_dim={self.feature_dim}, input_size={self.input_size}"
