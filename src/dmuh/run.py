"""A run directory and everything read from or written to it.

    RUN/config.yaml              the full config (TrainConfig or PretrainConfig)
    RUN/split.json               query/train/database indices and the data's fingerprint
    RUN/log.csv                  one row per epoch
    RUN/checkpoint.pt            network, method, momentum copy, optimiser, and the specs that rebuild them
    RUN/uncertainty_trace.npz    per-bit outputs of both networks for a few training items (DMUH)
    RUN/backbone.safetensors     a `dmuh pretrain` run's backbone
    RUN/eval.json                `dmuh evaluate`'s report

A checkpoint records `model_config` (the `create_model` arguments) and `method_spec` (the
`create_method` arguments with the method's size), so `rebuild_networks` makes the network and the
method from the checkpoint alone: no training data, labels or pretrained weights. Checkpoints
written before those keys existed are rebuilt from config.yaml, split.json and the shapes of their
tensors (`_legacy_specs`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file

from dmuh.config import RunConfig, TrainConfig, load_yaml
from dmuh.data.protocols import Split, make_split
from dmuh.errors import DmuhError
from dmuh.io import atomic_path

CONFIG = "config.yaml"
SPLIT = "split.json"
LOG = "log.csv"
CHECKPOINT = "checkpoint.pt"
TRACE = "uncertainty_trace.npz"
BACKBONE = "backbone.safetensors"
EVAL = "eval.json"


# -- resolving a run and its config -------------------------------------------------------------


def run_directory(run, flag: str = "--run", need: Sequence[str] = ()) -> Path:
    """A run directory (or the checkpoint.pt inside one) holding config.yaml and the files in `need`,
    or a one-line DmuhError naming the flag."""
    path = Path(run)
    if path.is_file() and path.name == CHECKPOINT:
        path = path.parent
    if not (path / CONFIG).is_file():
        raise DmuhError(f"{flag} {run}: not a run directory (no {CONFIG}); pass the directory `dmuh train --out` wrote")
    for name in need:
        if not (path / name).is_file():
            raise DmuhError(f"{flag} {run}: no {name} in the run directory")
    return path


def resolve_run(run, flag: str = "--run") -> Tuple[Path, Path]:
    """A run directory, or the checkpoint.pt inside one -> (run_dir, checkpoint path)."""
    run_dir = run_directory(run, flag, need=(CHECKPOINT,))
    return run_dir, run_dir / CHECKPOINT


def load_run_config(run_dir: Path, **overrides) -> TrainConfig:
    """The run's config.yaml as a TrainConfig, with `overrides` (device, ...) applied.

    The checkpoint holds every weight, so the `--init` and `--pretrained` weights are not needed
    (nor read) again; nothing is compiled for a single pass.
    """
    values = {**load_yaml(Path(run_dir) / CONFIG), "init": "scratch", "pretrained": None, "compile": False, **overrides}
    return TrainConfig.from_dict(values, where=str(Path(run_dir) / CONFIG))


def load_split(config: RunConfig, source, run_dir: Path) -> Split:
    """Reuse the run's saved split (resume, evaluate) or make it from the protocol and save it."""
    path = Path(run_dir) / SPLIT
    if path.exists():
        split = Split.load(path)
        split.check(source)
        return split
    split = make_split(config.protocol, source, seed=config.split_seed)
    split.save(path)
    return split


# -- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(path: Path, *, epoch: int, config: RunConfig, model, method, momentum, optimizer) -> None:
    state = {
        "epoch": epoch,
        "config": config.to_dict(),
        "model_config": dict(model.config),
        "method_spec": method.spec(),
        "model": model.state_dict(),
        "method": method.state_dict(),
        "momentum": momentum.state_dict() if momentum is not None else None,
        "optimizer": optimizer.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise DmuhError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)  # no code runs from a file
    except Exception as exc:  # a truncated or foreign file
        raise DmuhError(f"{path}: not a readable dmuh checkpoint ({type(exc).__name__})") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def restore_state(checkpoint: dict, path: Path, model, method, momentum=None, optimizer=None) -> None:
    """Load a checkpoint's weights (and optimiser state) into freshly built modules."""
    try:
        model.load_state_dict(checkpoint["model"])
        method.load_state_dict(checkpoint["method"])
        if momentum is not None:
            momentum.load_state_dict(checkpoint["momentum"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else _first_line(exc)
        raise DmuhError(f"{path}: does not match the run's config.yaml ({detail[:200]})") from None


def rebuild_networks(checkpoint: dict, path: Path, run_dir: Path, config: TrainConfig):
    """(model, method, momentum copy or None) of a checkpoint, with its weights, in eval mode on the CPU."""
    from dmuh.methods import create_method
    from dmuh.models import create_model
    from dmuh.models.momentum import MomentumNetwork

    model_config, method_spec = checkpoint.get("model_config"), checkpoint.get("method_spec")
    if model_config is None or method_spec is None:
        model_config, method_spec = _legacy_specs(checkpoint, config, run_dir)
    try:
        model = create_model(**model_config)
        method = create_method(method_spec["name"], bits=method_spec["bits"], num_train=method_spec["num_train"],
                               num_classes=method_spec["num_classes"], **method_spec["params"])
    except (KeyError, TypeError) as error:
        raise DmuhError(f"{path}: unreadable network specification ({_first_line(error)})") from None
    momentum = None
    if method.uses_momentum and checkpoint.get("momentum") is not None:
        momentum = MomentumNetwork(model, method.momentum_alpha)
    restore_state(checkpoint, path, model, method, momentum)
    for module in (model, method, momentum):
        if module is not None:
            module.eval()
            module.requires_grad_(False)
    return model, method, momentum


# Buffers whose shape tells a legacy checkpoint's class count: key -> dimension.
_CLASS_SIZED = {"memory_labels": 1, "class_centers": 0, "codebook": 0, "classifier.weight": 0, "classifier": 1}


def _legacy_specs(checkpoint: dict, config: TrainConfig, run_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The specs of a checkpoint written before it recorded them: the network's input channels or
    width from its first weight, the method's size from split.json and its class-sized buffers."""
    from dmuh.models import create_model

    state, method_state = checkpoint.get("model") or {}, checkpoint.get("method") or {}
    weights = [v for k, v in state.items() if k.startswith("backbone.") and k.endswith("weight") and v.dim() in (2, 4)]
    first = weights[0] if weights else state.get("hash_layer.weight")
    if first is None:
        raise DmuhError(f"{run_dir / CHECKPOINT}: holds no network weights")
    extra = {"in_channels": int(first.shape[1])} if first.dim() == 4 else {"input_dim": int(first.shape[1])}
    model_config = create_model(config.model, bits=config.bits, hash_norm=config.hash_norm,
                                **extra, **config.model_params).config
    if "memory_labels" in method_state:
        num_train = int(method_state["memory_labels"].shape[0])
    elif (Path(run_dir) / SPLIT).is_file():
        num_train = len(Split.load(Path(run_dir) / SPLIT).train)
    else:
        num_train = 1
    num_classes = next((int(method_state[k].shape[d]) for k, d in _CLASS_SIZED.items() if k in method_state), 1)
    method_spec = {"name": config.method, "bits": config.bits, "num_train": num_train, "num_classes": num_classes,
                   "params": legacy_method_params(config)}
    return model_config, method_spec


def legacy_method_params(config: TrainConfig) -> Dict[str, Any]:
    """The run's method_params plus the old defaults of its method (`HashingMethod.legacy_defaults`),
    for a checkpoint written before checkpoints recorded their method's spec."""
    from dmuh.methods import method_class

    return {**method_class(config.method).legacy_defaults, **config.method_params}


# -- the log ------------------------------------------------------------------------------------


def write_log(path: Path, rows: List[Dict[str, float]]) -> None:
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# Log columns that hold words, not numbers: the tie policy of the row's MAP (dmuh.metrics.TIES).
TEXT_COLUMNS = ("ties",)


def read_log(path: Path) -> List[Dict[str, float]]:
    """log.csv's rows: numbers as floats (empty cells NaN), `TEXT_COLUMNS` as text ("" when empty).

    A row with a MAP but no "ties" comes from a run before dmuh recorded it: ties="index" then.
    """
    if not path.exists():
        return []

    def value(key, text):
        if key in TEXT_COLUMNS:
            return text or ""
        return float(text) if text not in ("", None) else float("nan")

    with open(path, newline="") as f:
        rows = [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    for row in rows:  # whole numbers, so a resumed run rewrites its log as it first wrote it
        row["epoch"] = int(row["epoch"])
    return rows


# -- initialisation from a pre-training ---------------------------------------------------------


def load_init(init: str, model: torch.nn.Module, split: Split) -> str:
    """Load `--init` (a `dmuh pretrain` run directory or a weights file) into the model's backbone.

    A pretrain run must have been made with the same query split as this run (same data and
    query indices), since its self-supervised part may have seen every non-query image.
    Returns a one-line description for the log.
    """
    path = Path(init)
    if path.is_dir():
        if not (path / BACKBONE).is_file():
            raise DmuhError(f"--init {init}: no {BACKBONE} in this directory (is it a `dmuh pretrain` run?)")
        init_split = Split.load(path / SPLIT)
        if init_split.fingerprint != split.fingerprint or not np.array_equal(init_split.query, split.query):
            raise DmuhError(
                f"--init {init}: pre-trained on a different query split (protocol {init_split.protocol}, seed "
                f"{init_split.seed}); use the same --data, --protocol and --split-seed so no query image was seen"
            )
        weights_file = path / BACKBONE
    elif path.is_file():
        weights_file = path
    else:
        raise DmuhError(f"--init {init}: no such run directory or weights file")
    if weights_file.suffix == ".safetensors":
        state = load_file(str(weights_file))
    else:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DmuhError(f"--init {weights_file}: not a readable state dict ({type(exc).__name__})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
    # A whole hashing-network state dict (backbone.* and hash_layer.*) or a backbone's.
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        result = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise DmuhError(f"--init {weights_file}: does not fit model backbone ({str(exc).splitlines()[1].strip()})") from None
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[:3]
        kind = "missing" if result.missing_keys else "unexpected"
        raise DmuhError(f"--init {weights_file}: does not fit model backbone ({kind} keys: {', '.join(first)})")
    return f"backbone initialised from {weights_file}"
