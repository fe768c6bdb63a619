"""A hashing network: a feature backbone followed by one linear hash layer (or a fitted head)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from dmuh.errors import DmuhError

HASH_NORMS = ("none", "batchnorm")

# How images become the network's input (`dmuh.data.pipeline.InputPipeline`): model options that
# `create_model` takes and records, never passed to a backbone's factory.
INPUT_OPTIONS = ("mean", "std", "interpolation", "crop_pct")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Resampling filters of PIL-based pretrained configs that have no device resize: the nearest one.
_NEAREST_INTERPOLATION = {"lanczos": "bicubic", "hamming": "bilinear", "box": "bilinear"}


def input_transform(name: str, values: Dict[str, Any], derived: Dict[str, Any]) -> Dict[str, Any]:
    """The checked input transform of model `name`: `values` (given by the user) over `derived`
    (the pretrained weights' data config). mean and std: one number or one per channel, in 0..1
    units; interpolation: one of INTERPOLATIONS; crop_pct in (0, 1]: the centre crop of the image's
    side that is resized to the input size (timm's and torchvision's eval transform). Lists, so the
    checkpoint's JSON gives the same config back."""
    derived = dict(derived)
    if derived.get("interpolation") in _NEAREST_INTERPOLATION:
        derived["interpolation"] = _NEAREST_INTERPOLATION[derived["interpolation"]]
    merged = {**derived, **values}
    out: Dict[str, Any] = {}
    for key in ("mean", "std"):
        if merged.get(key) is None:
            continue
        value = merged[key]
        numbers = list(value) if isinstance(value, (list, tuple)) else [value]
        if (
            not numbers
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in numbers)
            or (key == "std" and any(v <= 0 for v in numbers))
        ):
            what = "positive numbers" if key == "std" else "numbers"
            raise DmuhError(f"model {name!r}: {key} must be one or a list of {what} (0..1 units), got {value!r}")
        out[key] = [float(v) for v in numbers]
    interpolation = merged.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise DmuhError(
            f"model {name!r}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
        )
    out["interpolation"] = interpolation
    crop = merged.get("crop_pct", 1.0)
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
        raise DmuhError(f"model {name!r}: crop_pct must be a number > 0 and <= 1, got {crop!r}")
    out["crop_pct"] = float(crop)
    return out


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
        # How images are made its input (`input_transform`: mean, std, interpolation, crop_pct);
        # None: the input pipeline's defaults (ImageNet statistics, bilinear, no crop).
        self.input_transform: Optional[Dict[str, Any]] = None

    def freeze(self, modules) -> None:
        """Keep `modules` (of frozen stages, `dmuh.models.finetune.freeze_stages`) in eval mode, so
        their normalisation layers keep the loaded running statistics while the rest trains."""
        self._frozen_modules = list(modules)
        self.train(self.training)

    def train(self, mode: bool = True) -> "HashNetwork":
        super().train(mode)
        for module in getattr(self, "_frozen_modules", ()):
            module.eval()
        return self

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
