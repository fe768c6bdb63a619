"""Training configuration: one dataclass, filled from YAML files and command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from dmuh.errors import DmuhError


@dataclass
class RunConfig:
    """What every run needs: data, split, network, optimisation and execution."""

    # data
    data: str = "digits"  # a source spec for dmuh.data.open_source (path, zip, "digits", "idx:DIR", ...)
    data_root: Optional[str] = None  # image root for list files
    protocol: str = "digits"
    split_seed: int = 0
    image_size: Optional[int] = None  # decode size; None keeps the native size (must be uniform)
    augment: str = "none"
    cache_dir: Optional[str] = None  # where decoded uint8 arrays are cached between runs
    # model
    model: str = "smallcnn"
    model_params: Dict[str, Any] = field(default_factory=dict)  # e.g. {input_size: 8} for smallcnn on digits
    bits: int = 32
    hash_norm: str = "batchnorm"  # "batchnorm" after the hash layer (see docs/method.md) or "none" (the paper's net)
    pretrained: Optional[str] = None  # local torchvision-style state dict for the backbone
    # optimisation (paper section 5.2 defaults)
    epochs: int = 50
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    lr_end: float = 0.0005
    warmup_epochs: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: Optional[float] = None
    # execution
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the network (CUDA; pays a one-off compile time)
    seed: int = 0
    eval_batch_size: int = 1024
    out: str = "runs/run"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], where: str = "config"):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DmuhError(f"{where}: unknown field {unknown[0]!r}")
        return cls(**values)

    def save(self, path: Path) -> None:
        from dmuh.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class TrainConfig(RunConfig):
    """`dmuh train`: a hashing method on top of RunConfig."""

    method: str = "dmuh"
    method_params: Dict[str, Any] = field(default_factory=dict)
    init: str = "scratch"  # "scratch", a `dmuh pretrain` run directory, or a weights file
    backbone_lr_scale: float = 1.0  # learning-rate multiplier for the backbone (the hash layer keeps lr)
    eval_every: int = 0  # evaluate MAP every N epochs (0: only at the end; -1: never, for benchmarks)
    trace_items: int = 16  # training items whose per-bit outputs are recorded every epoch
    checkpoint_every: int = 1  # write checkpoint.pt every N epochs (and always after the last)
    train_map_items: int = 1000  # training items whose MAP against the training split is logged (0: none)


OBJECTIVES = ("ce", "simclr", "simclr+ce")


@dataclass
class PretrainConfig(RunConfig):
    """`dmuh pretrain`: backbone warm-up objectives (see dmuh.pretrain)."""

    objective: str = "simclr+ce"
    augment: str = "flip-crop"  # of the labeled (cross-entropy) batches; SimCLR views use "simclr"
    unlabeled_batch_size: int = 512
    temperature: float = 0.2
    projection_dim: int = 128
    lr: float = 0.1
    lr_end: float = 0.0
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    epochs: int = 30
    out: str = "runs/pretrain"


def load_yaml(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DmuhError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DmuhError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise DmuhError(f"{path}: expected a mapping of config fields")
    return values


def parse_value(text: str) -> Any:
    """Command-line values use YAML scalars: 0.7 -> float, true -> bool, 12 -> int.

    Only true and false are booleans (YAML 1.2): YAML 1.1 also reads on/off/yes/no as booleans,
    which would turn `-p momentum_dropout=off` into False; those words stay words.
    """
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def parse_params(items, flag: str = "--param") -> Dict[str, Any]:
    """["alpha=0.7", "beta=50"] -> {"alpha": 0.7, "beta": 50}."""
    params = {}
    for item in items or []:
        if "=" not in item:
            raise DmuhError(f"{flag} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        params[key.strip()] = parse_value(value)
    return params
