"""Run configuration, declared with the schema of `dmuh.utils.schema`, filled from YAML files and
command-line flags.

Each field is declared once with its type, its allowed values and its help line (`setting`);
`check_values` checks a whole configuration against those declarations before any work starts,
and the CLI's flags are generated from them. A bad value is one `DmuhError` line naming the flag
(`--batch-size 0: ...`) or the file and field (`cfg.yaml: field 'batch_size': ...`) it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import yaml

from dmuh.data.augmentations import AUGMENTATIONS
from dmuh.data.protocols import AUTO, available_protocols
from dmuh.data.sources import SOURCE_KINDS
from dmuh.utils.io import atomic_write_text
from dmuh.utils.schema import Rule, check_values, setting  # noqa: F401  (Rule: the schema's vocabulary)

IMAGE_SIZES = (4, 4096)
LR_SCHEDULES = ("cosine", "step")  # the image sizes (pixels) dmuh decodes and exports at, smallest and largest


def _protocols() -> Sequence[str]:
    return [AUTO, *available_protocols()]


def _augmentations() -> Sequence[str]:
    return AUGMENTATIONS


@dataclass
class RunConfig:
    """What every run needs: data, split, network, optimisation and execution."""

    # data
    data: str = setting(
        "digits",
        "data source: digits, a folder or .zip (ImageFolder), idx:DIR, cifar-batches:DIR, "
        "list:FILE.txt, features:FILE.npz",
    )
    data_root: Optional[str] = setting(None, "image root of a list file's relative paths")
    allow_outside_root: bool = setting(False, "let list-file paths leave --data-root (../x, absolute paths)")
    protocol: str = setting(
        AUTO, "query/train/database split protocol; auto: one that fits the data, sized to it", choices=_protocols
    )
    protocol_params: Dict[str, Any] = setting(
        {},
        "protocol parameters, e.g. query_per_class, train_per_class, "
        "database (rest|rest-minus-train), topk (flag: --protocol-param)",
    )
    split_seed: int = setting(0, "seed of the split", minimum=0)
    image_size: Optional[int] = setting(
        None,
        "decode size in pixels; none keeps the native size (must be uniform)",
        minimum=IMAGE_SIZES[0],
        maximum=IMAGE_SIZES[1],
    )
    augment: str = setting("none", "training augmentation", choices=_augmentations)
    cache_dir: Optional[str] = setting(
        "default",
        "decoded images are cached here between runs: default ($DMUH_CACHE_DIR, else ~/.cache/dmuh), off, or a folder",
    )
    # model
    model: str = setting(
        "smallcnn",
        "backbone registered in dmuh.models (smallcnn, mlp, cnnf, alexnet, resnet18, resnet18-32, resnet50, ...), "
        "timm:NAME (any timm model) or tv:NAME (a torchvision classification model)",
    )
    model_params: Dict[str, Any] = setting({}, "model options, e.g. {width: 32} (flag: --model-param)")
    bits: int = setting(32, "code length in bits", minimum=1, maximum=1024)
    hash_norm: str = setting(
        "batchnorm", "normalisation after the hash layer (see docs/method.md)", choices=("batchnorm", "none")
    )
    pretrained: Optional[str] = setting(
        None,
        "local weights file for the backbone: a torchvision-style .pth, a .safetensors (timm's model.safetensors "
        "for timm:NAME); nothing is downloaded",
    )
    # optimisation (paper section 5.2 defaults)
    epochs: int = setting(50, "training epochs", minimum=1, maximum=100_000)
    batch_size: int = setting(128, "training batch size", minimum=1, maximum=1_000_000)
    optimizer: str = setting("sgd", "optimiser", choices=("sgd", "adamw"))
    lr: float = setting(0.05, "learning rate (start of the cosine schedule)", above=0, maximum=10)
    lr_end: float = setting(0.0005, "learning rate at the end of the schedule (<= --lr)", minimum=0, maximum=10)
    lr_schedule_epochs: Optional[int] = setting(
        None,
        "epochs the schedule spans; none: --epochs (a resumed run keeps its own, see README)",
        minimum=1,
        maximum=100_000,
    )
    lr_schedule: str = setting(
        "cosine",
        "cosine (--lr to --lr-end) or step (--lr for the first third of the schedule, then --lr-end, "
        "the DMUH paper's recipe)",
        choices=LR_SCHEDULES,
    )
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up", minimum=0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0, below=1)
    weight_decay: float = setting(1e-4, "weight decay", minimum=0, maximum=1)
    grad_clip: Optional[float] = setting(None, "clip the gradient norm to this; none: no clipping", above=0)
    # execution
    device: str = setting("cpu", "cpu or cuda[:N]")
    amp: bool = setting(True, "bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = setting(True, "channels-last memory layout on CUDA")
    compile: bool = setting(False, "torch.compile the network (CUDA; a one-off compile time)")
    seed: int = setting(0, "seed of initialisation, batches and augmentation", minimum=0)
    eval_batch_size: int = setting(1024, "batch size of encoding and evaluation", minimum=1, maximum=1_000_000)
    out: str = setting("runs/run", "run directory (config, split, log.csv, checkpoint)")

    def __post_init__(self):
        check_values(type(self), self.to_dict())

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config", origins: Optional[Mapping[str, str]] = None):
        """A config from `values`, every value checked first; `origins` names where a value came
        from (a flag such as "--lr"), else it is "`where`: field 'name'"."""
        values = dict(values)
        check_values(cls, values, where, origins)
        return cls(**values)

    def save(self, path: Path) -> None:

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class TrainConfig(RunConfig):
    """`dmuh train`: a hashing method on top of RunConfig."""

    method: str = setting("dmuh", "hashing method (see `dmuh train --list-methods`)")
    method_params: Dict[str, Any] = setting({}, "method hyper-parameters, e.g. {alpha: 0.7} (flag: --param)")
    init: str = setting(
        "auto",
        "backbone initialisation: auto (random, then a cross-entropy warm-up of --init-epochs on "
        "the training split's labels, the same for every method), scratch (random, no "
        "warm-up), a `dmuh pretrain` run directory, or a weights file",
    )
    init_epochs: Optional[int] = setting(
        None, "epochs of --init auto's warm-up; none: half of --epochs, at least 1", minimum=1, maximum=100_000
    )
    backbone_lr_scale: Optional[float] = setting(
        None,
        "learning-rate multiplier of the backbone (the hash layer keeps --lr); none: 0.1 after --init auto's "
        "warm-up, 1 with any other --init",
        minimum=0,
        maximum=100,
    )
    layer_decay: Optional[float] = setting(
        None,
        "layer-wise learning-rate decay of a timm: backbone: each block before the last trains at this "
        "times the rate of the next (timm's param_groups_layer_decay; e.g. 0.65 for a ViT); none: off",
        above=0,
        maximum=1,
    )
    freeze_stages: int = setting(
        0,
        "freeze the first N stages of a timm: backbone (1: the stem, 2: the stem and the first stage or "
        "block, ...; their norms keep their statistics); 0: none",
        minimum=0,
        maximum=10_000,
    )
    eval_every: int = setting(0, "evaluate MAP every N epochs (0: at the end only; -1: never)", minimum=-1)
    trace_items: int = setting(16, "training items whose per-bit outputs are recorded every epoch", minimum=0)
    checkpoint_every: int = setting(1, "write the checkpoint every N epochs (and after the last)", minimum=1)
    train_map_items: int = setting(
        1000, "training items whose MAP against the training split is logged (0: none)", minimum=0
    )
    label_noise: float = setting(
        0.0,
        "share of the training labels flipped to another class (uniform) before "
        "training, for label-noise studies; recorded in RUN/label_noise.json "
        "(single-label data only)",
        minimum=0,
        maximum=1,
    )
    label_noise_seed: int = setting(0, "seed of --label-noise's choice of items and classes", minimum=0)


OBJECTIVES = ("ce", "simclr", "simclr+ce")
INIT_WORDS = ("auto", "scratch")  # --init values that are not paths


@dataclass
class PretrainConfig(RunConfig):
    """`dmuh pretrain`: backbone warm-up objectives (see dmuh.engine.pretrain)."""

    objective: str = setting("simclr+ce", "pre-training objective", choices=OBJECTIVES)
    augment: str = setting(
        "flip-crop",
        "augmentation of the labeled (cross-entropy) batches; SimCLR views use simclr",
        choices=_augmentations,
    )
    unlabeled_batch_size: int = setting(
        512, "batch size of the unlabeled (SimCLR) batches", minimum=2, maximum=1_000_000
    )
    temperature: float = setting(0.2, "SimCLR temperature", above=0, maximum=100)
    projection_dim: int = setting(128, "SimCLR projection width", minimum=1, maximum=65536)
    lr: float = setting(0.1, "learning rate (start of the cosine schedule)", above=0, maximum=10)
    lr_end: float = setting(0.0, "learning rate at the end of the schedule (<= --lr)", minimum=0, maximum=10)
    weight_decay: float = setting(5e-4, "weight decay", minimum=0, maximum=1)
    warmup_epochs: int = setting(2, "epochs of linear learning-rate warm-up", minimum=0)
    epochs: int = setting(30, "pre-training epochs", minimum=1, maximum=100_000)
    out: str = setting("runs/pretrain", "run directory (config, split, backbone.safetensors)")


_PATH_FIELDS = ("data_root", "pretrained", "init")


def _absolute(text: str) -> str:
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def absolute_data_spec(spec: str) -> str:
    """A data spec with its path made absolute ("idx:data" -> "idx:/home/u/data"); "digits" and
    paths that do not exist stay as they are (the source reports them)."""

    kind, sep, target = spec.partition(":")
    if sep and kind in SOURCE_KINDS:
        return f"{kind}:{_absolute(target)}"
    return _absolute(spec) if spec != "digits" else spec


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with every path absolute (the inputs and the run folder), so the run directory's
    config.yaml works from any folder (`dmuh evaluate` elsewhere); "scratch", "digits" and missing
    input paths are kept."""
    changes = {"data": absolute_data_spec(config.data)}
    for name in _PATH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value not in INIT_WORDS:
            changes[name] = _absolute(value)
    if config.cache_dir not in (None, "default", "off", "none"):
        changes["cache_dir"] = str(Path(config.cache_dir).expanduser().resolve())
    changes["out"] = str(Path(config.out).expanduser().resolve())  # the run folder too, as the README says
    return dataclasses.replace(config, **changes)
