"""Readers of what earlier dmuh versions wrote, in one place: the pickled checkpoint.pt (converted
once by `dmuh convert-checkpoint`, never loaded), and checkpoints written before they recorded their
network's and method's specs (rebuilt from config.yaml, split.json and the tensors' shapes)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from dmuh.data.protocols import Split
from dmuh.errors import DmuhError, RunError, first_line
from dmuh.methods import method_class
from dmuh.models import create_model
from dmuh.runs.checkpoint import tensor_problem
from dmuh.runs.config import TrainConfig
from dmuh.runs.files import CHECKPOINT, LEGACY_CHECKPOINT, SPLIT, legacy_checkpoint_message  # noqa: F401 - also this module's API


def read_legacy_checkpoint(old: Path) -> dict:
    """The state of an old checkpoint.pt, read with torch's allow-list unpickler: tensors and plain
    values only, no code runs; anything else is a one-line refusal."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's business
            warnings.simplefilter("ignore")
            state = torch.load(old, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # it names a class or function (code could run): refused
        raise RunError(
            f"{old}: refused: torch's allow-list unpickler loads only tensors and plain values, and this "
            f"file needs more ({_unpickler_reason(error)}); nothing in it was run"
        ) from None
    except Exception as error:  # truncated, not a torch file
        raise RunError(
            f"{old}: not a readable checkpoint ({type(error).__name__}: {first_line(error)[:160]})"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{old}: not a dmuh checkpoint (no network weights)")
    problem = tensor_problem(state, finite=False)  # NaN weights are refused when the checkpoint is read
    if problem:
        raise RunError(f"{old}: not a dmuh checkpoint ({problem})")
    return state


def _unpickler_reason(error: BaseException) -> str:
    """The line of torch's weights_only refusal that names what the file needs (a GLOBAL ...),
    not its advice to load the file unrestricted."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "nsupported" in line]
    return (named or lines or [type(error).__name__])[0][:200].rstrip(".")


# Buffers whose shape tells a legacy checkpoint's class count: key -> dimension.
_CLASS_SIZED = {"memory_labels": 1, "class_centers": 0, "codebook": 0, "classifier.weight": 0, "classifier": 1}


def legacy_specs(checkpoint: dict, config: TrainConfig, run_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The specs of a checkpoint written before it recorded them: the network's input channels or
    width from its first weight, the method's size from split.json and its class-sized buffers."""

    state, method_state = checkpoint.get("model") or {}, checkpoint.get("method") or {}
    weights = [v for k, v in state.items() if k.startswith("backbone.") and k.endswith("weight") and v.dim() in (2, 4)]
    first = weights[0] if weights else state.get("hash_layer.weight")
    if first is None:
        raise DmuhError(f"{run_dir / CHECKPOINT}: holds no network weights")
    extra = {"in_channels": int(first.shape[1])} if first.dim() == 4 else {"input_dim": int(first.shape[1])}
    model_config = create_model(
        config.model, bits=config.bits, hash_norm=config.hash_norm, **extra, **config.model_params
    ).config
    if "memory_labels" in method_state:
        num_train = int(method_state["memory_labels"].shape[0])
    elif (Path(run_dir) / SPLIT).is_file():
        num_train = len(Split.load(Path(run_dir) / SPLIT).train)
    else:
        num_train = 1
    num_classes = next((int(method_state[k].shape[d]) for k, d in _CLASS_SIZED.items() if k in method_state), 1)
    method_spec = {
        "name": config.method,
        "bits": config.bits,
        "num_train": num_train,
        "num_classes": num_classes,
        "params": legacy_method_params(config),
    }
    return model_config, method_spec


def legacy_method_params(config: TrainConfig) -> Dict[str, Any]:
    """The run's method_params plus the old defaults of its method (`HashingMethod.legacy_defaults`),
    for a checkpoint written before checkpoints recorded their method's spec."""

    return {**method_class(config.method).legacy_defaults, **config.method_params}
