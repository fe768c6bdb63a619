"""Load a local torchvision-style state dict into a backbone, strictly, with readable errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from dmuh.errors import DmuhError

logger = logging.getLogger("dmuh.models")

_SHOWN_KEYS = 5  # how many offending keys an error message lists


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch.save'd state dict (loaded weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise DmuhError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle with objects, wrong format
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise DmuhError(
            f"cannot read pretrained weights {path}: {type(error).__name__}: {first} (a state dict of "
            "tensors is expected; nothing else is loaded)"
        ) from None
    # Accept the common training-checkpoint wrappers around the state dict itself.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DmuhError(f"pretrained weights {path} is not a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters for another channel count (as timm does): summed for 1 channel, so a gray
    image gives the response of its RGB copy; else tiled and scaled by 3/in_channels to keep
    activations at about the same scale."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def _summary(kind: str, keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{kind} {shown}{more}"


def load_pretrained_backbone(
    backbone: nn.Module,
    path: Union[str, os.PathLike],
    model_name: str = "",
    state: Optional[Dict[str, torch.Tensor]] = None,
    what: str = "pretrained weights",
) -> None:
    """Copy the weights in `path` (or `state`, already read from it) into `backbone`; every
    backbone tensor must be covered.

    Keys under the backbone's `ignored_pretrained_keys` prefixes (a classifier head) are dropped;
    keys in `skipped_pretrained_keys` stay randomly initialised, with a warning saying why. A
    3-channel first convolution is adapted when the backbone takes another channel count.
    `what` names the file in errors (`--init`'s are "init weights").
    """
    state = read_state_dict(path) if state is None else dict(state)
    ignored_prefixes = tuple(getattr(backbone, "ignored_pretrained_keys", ()))
    skipped: Dict[str, str] = dict(getattr(backbone, "skipped_pretrained_keys", {}))
    first_conv = getattr(backbone, "first_conv", None)
    first_conv_key = f"{first_conv}.weight" if first_conv else None

    expected = backbone.state_dict()
    state = {key: value for key, value in state.items() if not key.startswith(ignored_prefixes)}
    for key, why in skipped.items():
        if key in state:
            del state[key]
            logger.warning(
                "%s: pretrained %s not loaded (%s); it keeps its random initialisation", model_name, key, why
            )

    if first_conv_key in state and first_conv_key not in skipped:
        loaded, wanted = state[first_conv_key], expected[first_conv_key]
        if loaded.shape != wanted.shape and loaded.shape[0] == wanted.shape[0] and loaded.shape[2:] == wanted.shape[2:]:
            state[first_conv_key] = _adapt_first_conv(loaded, wanted.shape[1])
            logger.info(
                "%s: adapted pretrained %s from %d to %d input channels",
                model_name,
                first_conv_key,
                loaded.shape[1],
                wanted.shape[1],
            )

    missing = [key for key in expected if key not in state and key not in skipped]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(_summary("missing keys", missing))
        if unexpected:
            problems.append(_summary("unexpected keys", unexpected))
        if mismatched:
            problems.append(_summary("shape mismatch", mismatched))
        raise DmuhError(f"{what} {path} do not fit model {model_name!r}: {'; '.join(problems)}")
    backbone.load_state_dict(state, strict=False)  # strictness checked above; skipped keys stay
