"""A run directory and everything read from or written to it.

    RUN/config.yaml              the full config (TrainConfig or PretrainConfig)
    RUN/split.json               query/train/database indices and the data's fingerprint
    RUN/log.csv                  one row per epoch
    RUN/checkpoint.safetensors   network, method, momentum copy, optimiser, and the specs that rebuild them
                                 (dmuh.runs.checkpoint: no code runs from it, checksummed)
    RUN/uncertainty_trace.npz    per-bit outputs of both networks for a few training items (DMUH)
    RUN/label_noise.json         the training labels flipped by --label-noise (dmuh.data.noise.LabelNoise)
    RUN/backbone.safetensors     a `dmuh pretrain` run's backbone
    RUN/eval.json                `dmuh evaluate`'s report
    RUN/feature_backbone.json    the backbone that made the run's feature vectors (`dmuh features`)

A checkpoint records `model_config` (the `create_model` arguments) and `method_spec` (the
`create_method` arguments with the method's size), so `rebuild_networks` makes the network and the
method from the checkpoint alone: no training data, labels or pretrained weights. Checkpoints
written before those keys existed are rebuilt from config.yaml, split.json and the shapes of their
tensors (`dmuh.runs.legacy.legacy_specs`).

Runs written before that format hold `checkpoint.pt` (a pickle), which is never read in place:
`dmuh convert-checkpoint --run RUN` (`convert_legacy_checkpoint`) reads it once with torch's
allow-list unpickler (tensors and plain values only) and writes checkpoint.safetensors.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from dmuh.data.noise import LabelNoise
from dmuh.data.protocols import AUTO, Split, make_split, resolve_protocol
from dmuh.errors import ConfigError, DmuhError, RunError, first_line
from dmuh.methods import create_method
from dmuh.models import create_model
from dmuh.models.momentum import MomentumNetwork
from dmuh.models.pretrained import load_pretrained_backbone, read_state_dict
from dmuh.models.registry import checkpoint_model_config
from dmuh.runs.checkpoint import file_kind, load_state, load_weights, save_state, tensor_problem
from dmuh.runs.config import RunConfig, TrainConfig
from dmuh.runs.files import (  # noqa: F401 - a run's file names, also this module's API
    BACKBONE,
    BACKBONE_KIND,
    CHECKPOINT,
    CHECKPOINT_KIND,
    CONFIG,
    EVAL,
    FEATURE_BACKBONE,
    LABEL_NOISE,
    LEGACY_CHECKPOINT,
    LOG,
    SPLIT,
    TRACE,
    VOCABULARY,
    legacy_checkpoint_message,
    run_directory,
)
from dmuh.runs.legacy import (  # noqa: F401 - legacy_method_params is also this module's API
    legacy_method_params,
    legacy_specs,
    read_legacy_checkpoint,
)
from dmuh.utils.io import atomic_path, atomic_write_text, parse_json
from dmuh.utils.schema import load_yaml

# -- resolving a run and its config -------------------------------------------------------------


def resolve_run(run, flag: str = "--run") -> Tuple[Path, Path]:
    """A run directory, or the checkpoint.safetensors inside one -> (run_dir, checkpoint path)."""
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
        made = (split.protocol, split.seed, split.params)
        if config.protocol == AUTO:  # chosen once, from the data as the run began: the saved choice stands
            # (`dmuh evaluate` reads the items of an unlabeled run with their labels, which would choose anew)
            protocol, params = split.protocol, {**split.params, **config.protocol_params}
        else:
            protocol, params = resolve_protocol(config.protocol, source.labels, config.protocol_params)
        wanted = (protocol, config.split_seed, params)
        if made != wanted:
            raise DmuhError(
                f"{path}: made with protocol {made[0]!r}, split seed {made[1]}, parameters {made[2]}; "
                f"the config asks for {wanted[0]!r}, {wanted[1]}, {wanted[2]} (use another --out)"
            )
        split.check(source)
        return split
    split = make_split(config.protocol, source, seed=config.split_seed, **config.protocol_params)
    split.save(path)
    return split


def load_label_noise(config: TrainConfig, train_labels: np.ndarray, run_dir: Path, save: bool = True):
    """The `LabelNoise` of a run with `label_noise` > 0 (None otherwise): the run's recorded flips
    (RUN/label_noise.json, made with the same rate and seed, for the same training labels), or new
    ones from `dmuh.data.noise` (saved when `save`: rank 0 of a new run)."""

    path = Path(run_dir) / LABEL_NOISE
    if path.exists():
        noise = LabelNoise.load(path)
        if (noise.rate, noise.seed) != (float(config.label_noise), int(config.label_noise_seed)):
            raise DmuhError(
                f"{path}: made with label noise {noise.rate:g} (seed {noise.seed}); the config asks for "
                f"{config.label_noise:g} (seed {config.label_noise_seed}) (use another --out)"
            )
        noise.apply(train_labels, where=str(path))  # checks it fits these labels
        return noise
    if not config.label_noise:
        return None
    noise = LabelNoise.make(train_labels, config.label_noise, config.label_noise_seed)
    if save:
        noise.save(path)
    return noise


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
    save_state(path, state, CHECKPOINT_KIND)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A run's checkpoint.safetensors (dmuh.runs.checkpoint; no code runs from it, checksum checked).
    An old checkpoint.pt is refused with the command that converts it."""
    path = Path(path)
    if path.name == LEGACY_CHECKPOINT and path.is_file():
        raise DmuhError(legacy_checkpoint_message(path.parent))
    if not path.is_file():
        if (path.parent / LEGACY_CHECKPOINT).is_file():
            raise DmuhError(legacy_checkpoint_message(path.parent))
        raise DmuhError(f"checkpoint not found: {path}")
    state = load_state(path, CHECKPOINT_KIND)
    check_checkpoint(path, state)
    if str(map_location) != "cpu":
        state = _to_device(state, map_location)
    return state


MAX_EPOCH = 1_000_000


def check_checkpoint(path: Path, state: dict) -> None:
    """The fields of a checkpoint, before any is used: a whole epoch in [0, MAX_EPOCH], the
    networks' weights as dicts of dense, finite tensors (a NaN weight would score silently), the
    optimiser's state as torch writes it. A one-line RunError naming the file and field otherwise."""
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise RunError(f"{path}: field 'epoch' must be an integer from 0 to {MAX_EPOCH:,}, got {str(epoch)[:40]}")
    for key in ("model", "method", "momentum"):
        value = state.get(key)
        if value is None and key != "model":
            continue
        if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
            raise RunError(f"{path}: field {key!r} must be a dict of tensors (the network's weights)")
        problem = tensor_problem(value, key)
        if problem:
            raise RunError(f"{path}: {problem}; the checkpoint cannot be used")
    optimizer = state.get("optimizer")
    if optimizer is not None and (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("state", {}), dict)
        or not isinstance(optimizer.get("param_groups", []), list)
    ):
        raise RunError(f"{path}: field 'optimizer' is not an optimiser state (state, param_groups)")
    problem = tensor_problem(optimizer, "optimizer", finite=False)
    if problem:
        raise RunError(f"{path}: {problem}")


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def convert_legacy_checkpoint(run, force: bool = False) -> Tuple[Path, Path, dict]:
    """RUN/checkpoint.pt -> RUN/checkpoint.safetensors, the tree copied as is (so a checkpoint
    older than `model_config`/`method_spec` still rebuilds through `dmuh.runs.legacy.legacy_specs`); the old file is
    kept. Read with torch's allow-list unpickler: tensors and plain values only, no code runs.
    Returns (old path, new path, state)."""
    run_dir = run_directory(run)
    old, new = run_dir / LEGACY_CHECKPOINT, run_dir / CHECKPOINT
    if not old.is_file():
        there = f"; it already holds {CHECKPOINT}" if new.is_file() else ""
        raise DmuhError(f"{run_dir}: no {LEGACY_CHECKPOINT} to convert{there}")
    if new.exists() and not force:
        raise DmuhError(f"{new} already exists; pass --force to replace it")
    state = read_legacy_checkpoint(old)
    save_state(new, dict(state), CHECKPOINT_KIND)
    return old, new, state


def restore_state(checkpoint: dict, path: Path, model, method, momentum=None, optimizer=None) -> None:
    """Load a checkpoint's weights (and optimiser state) into freshly built modules."""
    try:
        model.load_state_dict(checkpoint["model"])
        method.load_state_dict(checkpoint["method"])
        if momentum is not None:
            momentum.load_state_dict(checkpoint["momentum"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
            _check_optimizer_shapes(optimizer)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else first_line(exc)
        raise DmuhError(f"{path}: does not match the run's config.yaml ({detail[:200]})") from None


def _check_optimizer_shapes(optimizer) -> None:
    """Each parameter's optimiser state (Adam's moments, SGD's momentum) of the parameter's shape:
    a mismatch would fail at the first step, as an internal error."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"optimizer state {name!r} of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(param.shape)}"
                    )


def rebuild_networks(checkpoint: dict, path: Path, run_dir: Path, config: TrainConfig):
    """(model, method, momentum copy or None) of a checkpoint, with its weights, in eval mode on the CPU."""

    saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    run_values = config.to_dict()
    differ = [key for key in ("method", "bits", "model") if key in saved and saved[key] != run_values.get(key)]
    if differ:  # the checkpoint of another run: its network, read with this run's data, would mis-score
        key = differ[0]
        raise RunError(
            f"{path}: trained with {key} {str(saved[key])[:40]!r}, but {Path(run_dir) / CONFIG} says "
            f"{str(run_values.get(key))[:40]!r}: the checkpoint and the config are of different runs"
        )
    model_config, method_spec = checkpoint.get("model_config"), checkpoint.get("method_spec")
    if model_config is None or method_spec is None:
        model_config, method_spec = legacy_specs(checkpoint, config, run_dir)
    try:
        model = create_model(**checkpoint_model_config(model_config))
        method = create_method(
            method_spec["name"],
            bits=method_spec["bits"],
            num_train=method_spec["num_train"],
            num_classes=method_spec["num_classes"],
            **method_spec["params"],
        )
    except (KeyError, TypeError) as error:
        raise DmuhError(f"{path}: unreadable network specification ({first_line(error)})") from None
    momentum = None
    needs = method.requirements()
    if needs.uses_momentum and checkpoint.get("momentum") is not None:
        momentum = MomentumNetwork(model, needs.momentum, needs.momentum_dropout)
    restore_state(checkpoint, path, model, method, momentum)
    for module in (model, method, momentum):
        if module is not None:
            module.eval()
            module.requires_grad_(False)
    return model, method, momentum


# -- the log ------------------------------------------------------------------------------------


class EmptyCell(float):
    """An empty log.csv cell as `read_log` returns it: NaN to arithmetic and `math.isnan`, and an
    empty cell again to `write_log`. One convention for MAP cells: an epoch without evaluation has
    an empty cell (its row has no "map", or this); a MAP that was computed and is NaN is a plain
    float NaN, written "nan"."""

    def __new__(cls):
        return super().__new__(cls, "nan")


EMPTY = EmptyCell()


def write_log(path: Path, rows: List[Dict[str, float]]) -> None:
    """log.csv: one row per epoch, the union of the rows' keys as columns; a key a row lacks (or
    None, or `EMPTY`) is an empty cell, a NaN number "nan"."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [{k: "" if v is None or isinstance(v, EmptyCell) else v for k, v in row.items()} for row in rows]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(cells)


# Log columns that hold words, not numbers: the tie policy of the row's MAP (dmuh.metrics.ranking.TIES).
TEXT_COLUMNS = ("ties",)
# Columns computed only by an evaluation: empty in the epochs that did not evaluate.
EVALUATED_COLUMNS = ("map", "train_map")


def _damaged_log(path: Path, line: int, problem: str) -> DmuhError:
    return DmuhError(
        f"{path} line {line}: {problem}; repair that line or delete {path.name} "
        f"(a resumed run then logs only the epochs it trains)"
    )


def read_log(path: Path) -> List[Dict[str, float]]:
    """log.csv's rows: numbers as floats (empty cells `EMPTY`, a NaN that `write_log` writes back
    as an empty cell), `TEXT_COLUMNS` as text ("" when empty), "epoch" as an int.

    A damaged file (bytes that are not text, no epoch column, a cell that is not a number, a row
    of the wrong length) is a DmuhError naming the file and the line. A "nan" MAP in a row whose
    "ties" is empty was not computed (an earlier dmuh wrote empty cells back as "nan"): `EMPTY`.
    """
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DmuhError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _damaged_log(path, data[: error.start].count(b"\n") + 1, "bytes that are not text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header or "epoch" not in header:
            raise _damaged_log(path, 1, "no epoch column in the header" if header else "no header (the file is empty)")
        rows = []
        for cells in reader:
            if not cells:
                continue
            line = reader.line_num
            if len(cells) != len(header):
                raise _damaged_log(path, line, f"{len(cells)} cells, the header has {len(header)} columns")
            row: Dict[str, Any] = {}
            for key, cell in zip(header, cells):
                if key in TEXT_COLUMNS:
                    row[key] = cell
                elif cell.strip() == "":
                    row[key] = EMPTY
                else:
                    try:
                        row[key] = float(cell)
                    except ValueError:
                        raise _damaged_log(path, line, f"{cell[:40]!r} in column {key} is not a number") from None
            epoch = row["epoch"]
            if isinstance(epoch, EmptyCell) or not math.isfinite(epoch) or epoch != int(epoch) or epoch < 0:
                raise _damaged_log(path, line, f"epoch {cells[header.index('epoch')][:40]!r} is not a whole number")
            row["epoch"] = int(epoch)  # whole numbers, so a resumed run rewrites its log as it first wrote it
            if row.get("ties", None) == "":
                for key in EVALUATED_COLUMNS:
                    if key in row and math.isnan(row[key]):
                        row[key] = EMPTY
            rows.append(row)
    except csv.Error as error:
        raise _damaged_log(path, reader.line_num, f"not CSV ({error})") from None
    return rows


# -- the backbone of a run trained on `dmuh features` vectors ------------------------------------


def save_feature_backbone(run_dir: Path, record: dict) -> None:
    """Keep the record of the backbone that made the run's feature vectors, so the run encodes images."""
    atomic_write_text(Path(run_dir) / FEATURE_BACKBONE, json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_feature_backbone(run_dir: Path):
    """The run's feature backbone record, or None (a run on images, or on vectors without one)."""
    path = Path(run_dir) / FEATURE_BACKBONE
    if not path.is_file():
        return None
    try:
        record = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunError(f"{path}: cannot read it ({first_line(error)})") from None
    if not isinstance(record, dict):
        raise RunError(f"{path}: not a backbone record (a JSON object)")
    return record


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
            raise ConfigError(
                f"init {init}: no {BACKBONE} in this directory (is it a `dmuh pretrain` run?)", field="init"
            )
        init_split = Split.load(path / SPLIT)
        if init_split.fingerprint != split.fingerprint or not np.array_equal(init_split.query, split.query):
            raise ConfigError(
                f"init {init}: pre-trained on a different query split (protocol {init_split.protocol}, seed "
                f"{init_split.seed}); use the same --data, --protocol and --split-seed so no query image was seen",
                field="init",
            )
        weights_file = path / BACKBONE
    elif path.is_file():
        weights_file = path
    else:
        raise ConfigError(f"init {init}: no such run directory or weights file", field="init")
    if weights_file.suffix == ".safetensors" and file_kind(weights_file) is not None:
        # A dmuh file (backbone or a run's checkpoint) is checked against its checksum.
        if file_kind(weights_file) == CHECKPOINT_KIND:
            state = load_state(weights_file, CHECKPOINT_KIND).get("model")
            if not isinstance(state, dict):
                raise ConfigError(f"init {weights_file}: holds no network weights", field="init")
        else:
            state = load_weights(weights_file, BACKBONE_KIND)
    else:
        # A foreign state dict (a timm / Hugging Face model.safetensors, a torchvision .pth): a
        # backbone's is loaded as --pretrained loads it, its classifier head dropped by the model's rule.
        try:
            state = read_state_dict(weights_file)
        except DmuhError as error:
            raise ConfigError(f"init: {first_line(error)}", field="init") from None
        if not any(k.startswith("backbone.") for k in state):
            name = getattr(model, "name", "")
            try:
                load_pretrained_backbone(model.backbone, weights_file, name, state=state, what="init weights")
            except DmuhError as error:
                raise ConfigError(str(error), field="init") from None
            return f"backbone initialised from {weights_file}"
    # A whole hashing-network state dict (backbone.* and hash_layer.*) or a backbone's.
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        result = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise ConfigError(
            f"init {weights_file}: does not fit model backbone ({str(exc).splitlines()[1].strip()})", field="init"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[:3]
        kind = "missing" if result.missing_keys else "unexpected"
        raise ConfigError(
            f"init {weights_file}: does not fit model backbone ({kind} keys: {', '.join(first)})", field="init"
        )
    return f"backbone initialised from {weights_file}"
