"""Run configuration: one typed schema, filled from YAML files and command-line flags.

Each field is declared once with its type, its allowed values and its help line (`setting`);
`check_values` checks a whole configuration against those declarations before any work starts,
and the CLI's flags are generated from them. A bad value is one `DmuhError` line naming the flag
(`--batch-size 0: ...`) or the file and field (`cfg.yaml: field 'batch_size': ...`) it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import yaml

from dmuh.errors import DmuhError

Choices = Union[Sequence[str], Callable[[], Sequence[str]]]
IMAGE_SIZES = (4, 4096)  # the image sizes (pixels) dmuh decodes and exports at, smallest and largest


@dataclass(frozen=True)
class Rule:
    """What a field accepts beside its type: a numeric range and/or a list of words."""

    minimum: Optional[float] = None
    maximum: Optional[float] = None
    above: Optional[float] = None  # strictly greater than
    below: Optional[float] = None  # strictly less than
    choices: Optional[Choices] = None

    def words(self) -> Sequence[str]:
        return tuple(self.choices() if callable(self.choices) else self.choices or ())

    def allowed(self) -> str:
        """The allowed values in words, for help lines and error messages."""
        if self.choices is not None:
            return "one of " + ", ".join(self.words())
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return " and ".join(parts)

    def admits(self, value) -> bool:
        if self.choices is not None:
            return value in self.words()
        return ((self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))


def setting(default, help: str, *, minimum=None, maximum=None, above=None, below=None, choices: Optional[Choices] = None):
    """A config field: its default, help line and allowed values (dicts get a fresh copy each time)."""
    metadata = {"help": help, "rule": Rule(minimum, maximum, above, below, choices)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _protocols() -> Sequence[str]:
    from dmuh.data.protocols import available_protocols

    return available_protocols()


def _augmentations() -> Sequence[str]:
    from dmuh.data.pipeline import AUGMENTATIONS

    return AUGMENTATIONS


@dataclass
class RunConfig:
    """What every run needs: data, split, network, optimisation and execution."""

    # data
    data: str = setting("digits", "data source: digits, a folder or .zip (ImageFolder), idx:DIR, cifar-batches:DIR, "
                                  "list:FILE.txt, features:FILE.npz")
    data_root: Optional[str] = setting(None, "image root of a list file's relative paths")
    allow_outside_root: bool = setting(False, "let list-file paths leave --data-root (../x, absolute paths)")
    protocol: str = setting("digits", "query/train/database split protocol", choices=_protocols)
    protocol_params: Dict[str, Any] = setting({}, "protocol parameters, e.g. query_per_class, train_per_class, "
                                                  "database (rest|rest-minus-train), topk (flag: --protocol-param)")
    split_seed: int = setting(0, "seed of the split", minimum=0)
    image_size: Optional[int] = setting(None, "decode size in pixels; none keeps the native size (must be uniform)",
                                        minimum=IMAGE_SIZES[0], maximum=IMAGE_SIZES[1])
    augment: str = setting("none", "training augmentation", choices=_augmentations)
    cache_dir: Optional[str] = setting("default", "decoded images are cached here between runs: default "
                                                  "($DMUH_CACHE_DIR, else ~/.cache/dmuh), off, or a folder")
    # model
    model: str = setting("smallcnn", "backbone registered in dmuh.models (smallcnn, mlp, cnnf, alexnet, resnet18, "
                                     "resnet18-32, resnet50, ...)")
    model_params: Dict[str, Any] = setting({}, "model options, e.g. {width: 32} (flag: --model-param)")
    bits: int = setting(32, "code length in bits", minimum=1, maximum=1024)
    hash_norm: str = setting("batchnorm", "normalisation after the hash layer (see docs/method.md)",
                             choices=("batchnorm", "none"))
    pretrained: Optional[str] = setting(None, "local torchvision-style state dict for the backbone")
    # optimisation (paper section 5.2 defaults)
    epochs: int = setting(50, "training epochs", minimum=1, maximum=100_000)
    batch_size: int = setting(128, "training batch size", minimum=1, maximum=1_000_000)
    optimizer: str = setting("sgd", "optimiser", choices=("sgd", "adamw"))
    lr: float = setting(0.05, "learning rate (start of the cosine schedule)", above=0, maximum=10)
    lr_end: float = setting(0.0005, "learning rate at the end of the schedule (<= --lr)", minimum=0, maximum=10)
    lr_schedule_epochs: Optional[int] = setting(None, "epochs the schedule spans; none: --epochs (a resumed run "
                                                      "keeps its own, see README)", minimum=1, maximum=100_000)
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
        from dmuh.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class TrainConfig(RunConfig):
    """`dmuh train`: a hashing method on top of RunConfig."""

    method: str = setting("dmuh", "hashing method (see `dmuh train --list-methods`)")
    method_params: Dict[str, Any] = setting({}, "method hyper-parameters, e.g. {alpha: 0.7} (flag: --param)")
    init: str = setting("auto", "backbone initialisation: auto (random, then a cross-entropy warm-up of --init-epochs on "
                                "the training split's labels, the same for every method), scratch (random, no "
                                "warm-up), a `dmuh pretrain` run directory, or a weights file")
    init_epochs: Optional[int] = setting(None, "epochs of --init auto's warm-up; none: half of --epochs, at "
                                               "least 1", minimum=1, maximum=100_000)
    backbone_lr_scale: Optional[float] = setting(
        None, "learning-rate multiplier of the backbone (the hash layer keeps --lr); none: 0.1 after --init auto's "
              "warm-up, 1 with any other --init", minimum=0, maximum=100)
    eval_every: int = setting(0, "evaluate MAP every N epochs (0: at the end only; -1: never)", minimum=-1)
    trace_items: int = setting(16, "training items whose per-bit outputs are recorded every epoch", minimum=0)
    checkpoint_every: int = setting(1, "write the checkpoint every N epochs (and after the last)", minimum=1)
    train_map_items: int = setting(1000, "training items whose MAP against the training split is logged (0: none)",
                                   minimum=0)
    label_noise: float = setting(0.0, "share of the training labels flipped to another class (uniform) before "
                                      "training, for label-noise studies; recorded in RUN/label_noise.json "
                                      "(single-label data only)", minimum=0, maximum=1)
    label_noise_seed: int = setting(0, "seed of --label-noise's choice of items and classes", minimum=0)


OBJECTIVES = ("ce", "simclr", "simclr+ce")
INIT_WORDS = ("auto", "scratch")  # --init values that are not paths


@dataclass
class PretrainConfig(RunConfig):
    """`dmuh pretrain`: backbone warm-up objectives (see dmuh.pretrain)."""

    objective: str = setting("simclr+ce", "pre-training objective", choices=OBJECTIVES)
    augment: str = setting("flip-crop", "augmentation of the labeled (cross-entropy) batches; SimCLR views use "
                                        "simclr", choices=_augmentations)
    unlabeled_batch_size: int = setting(512, "batch size of the unlabeled (SimCLR) batches", minimum=2,
                                        maximum=1_000_000)
    temperature: float = setting(0.2, "SimCLR temperature", above=0, maximum=100)
    projection_dim: int = setting(128, "SimCLR projection width", minimum=1, maximum=65536)
    lr: float = setting(0.1, "learning rate (start of the cosine schedule)", above=0, maximum=10)
    lr_end: float = setting(0.0, "learning rate at the end of the schedule (<= --lr)", minimum=0, maximum=10)
    weight_decay: float = setting(5e-4, "weight decay", minimum=0, maximum=1)
    warmup_epochs: int = setting(2, "epochs of linear learning-rate warm-up", minimum=0)
    epochs: int = setting(30, "pre-training epochs", minimum=1, maximum=100_000)
    out: str = setting("runs/pretrain", "run directory (config, split, backbone.safetensors)")


# -- checking values against the schema ---------------------------------------------------------

_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text", dict: "a mapping KEY: VALUE"}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)  # annotations are strings here (postponed evaluation)


def _field_kind(cls, name: str) -> Tuple[type, bool]:
    """(int | float | bool | str | dict, whether None is allowed) of a field's annotation."""
    hint = _hints(cls)[name]
    optional = False
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    return (typing.get_origin(hint) or hint), optional


@functools.lru_cache(maxsize=None)
def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def expected(cls, name: str) -> str:
    """"an integer >= 1", "one of sgd, adamw", ...: what a field accepts, in words."""
    kind, optional = _field_kind(cls, name)
    rule: Rule = _fields(cls)[name].metadata.get("rule", Rule())
    allowed = rule.allowed()
    words = allowed if rule.choices is not None else " ".join(w for w in (_KIND_WORDS[kind], allowed) if w)
    return words + (" or none" if optional else "")


def help_line(cls, name: str) -> str:
    """A field's help line: what it is, what it accepts, its default (one style for every flag)."""
    f = _fields(cls)[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata.get('help', '')} ({expected(cls, name)}) [default: {default}]"


def _checked(cls, name: str, value: Any, label: str) -> Any:
    kind, optional = _field_kind(cls, name)
    rule: Rule = _fields(cls)[name].metadata.get("rule", Rule())

    def refuse():
        return DmuhError(f"{label}: expected {expected(cls, name)}, got {value!r}")

    if value is None:
        if optional:
            return None
        raise refuse()
    if kind is bool:
        if not isinstance(value, bool):
            raise refuse()
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse()
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise refuse()
        value = float(value)
    elif kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `out: 2024` in a YAML file is a folder name
        if not isinstance(value, str):
            raise refuse()
    elif kind is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise refuse()
        value = dict(value)
    if kind is not dict and not rule.admits(value):
        raise refuse()
    return value


def check_values(cls, values: Dict[str, Any], where: str = "config", origins: Optional[Mapping[str, str]] = None) -> None:
    """Check (and normalise in place: ints given for numbers become floats) config values of `cls`.

    `origins` maps a field to the flag it came from; other fields are named "`where`: field 'x'".
    """
    origins = origins or {}
    fields = _fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DmuhError(f"{where}: unknown field {unknown[0]!r}")

    def label(name: str) -> str:
        return origins.get(name) or f"{where}: field {name!r}"

    for name in list(values):
        values[name] = _checked(cls, name, values[name], label(name))

    def current(name: str):
        if name in values:
            return values[name]
        f = fields[name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    if current("lr_end") > current("lr"):
        raise DmuhError(f"{label('lr_end')}: expected a number <= lr {current('lr'):g}, got {current('lr_end')!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", current("device")):
        raise DmuhError(f"{label('device')}: expected cpu or cuda[:N], got {current('device')!r}")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_flag(cls, name: str, text: str, flag: str) -> Any:
    """A flag's text as the value of field `name` (then checked by `check_values`): none/null for an
    optional field is None; words for a text field stay words (`--hash-norm none` is "none")."""
    kind, optional = _field_kind(cls, name)
    stripped = text.strip()
    if optional and stripped.lower() in ("none", "null"):
        return None
    if kind is str:
        return text
    if kind is bool:
        if stripped.lower() in _TRUE + _FALSE:
            return stripped.lower() in _TRUE
    elif kind is int:
        if re.fullmatch(r"[+-]?\d+", stripped):
            return int(stripped)
    elif kind is float:
        try:
            return float(stripped)
        except ValueError:
            pass
    raise DmuhError(f"{flag}: expected {expected(cls, name)}, got {text!r}")


# -- reading YAML and KEY=VALUE options -----------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (line "
                                                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DmuhError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DmuhError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise DmuhError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(values, dict):
        raise DmuhError(f"{path}: expected a mapping of config fields")
    return values


def parse_value(text: str) -> Any:
    """Command-line values use YAML scalars: 0.7 -> float, true -> bool, 12 -> int.

    Only true and false are booleans (YAML 1.2): YAML 1.1 also reads on/off/yes/no as booleans,
    which would turn `-p momentum_dropout=off` into False; those words stay words.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()  # `-p name=a: b` is the text it reads as
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def parse_params(items, flag: str = "--param") -> Dict[str, Any]:
    """["alpha=0.7", "beta=50"] -> {"alpha": 0.7, "beta": 50}."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DmuhError(f"{flag} {item!r}: expected KEY=VALUE")
        params[key.strip()] = parse_value(value)
    return params


# -- paths that stay valid from any folder --------------------------------------------------------

_PATH_FIELDS = ("data_root", "pretrained", "init")


def _absolute(text: str) -> str:
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def absolute_data_spec(spec: str) -> str:
    """A data spec with its path made absolute ("idx:data" -> "idx:/home/u/data"); "digits" and
    paths that do not exist stay as they are (the source reports them)."""
    from dmuh.data.sources import SOURCE_KINDS

    kind, sep, target = spec.partition(":")
    if sep and kind in SOURCE_KINDS:
        return f"{kind}:{_absolute(target)}"
    return _absolute(spec) if spec != "digits" else spec


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with every input path absolute, so the run directory's config.yaml works from
    any folder (`dmuh evaluate` elsewhere); "scratch", "digits" and missing paths are kept."""
    changes = {"data": absolute_data_spec(config.data)}
    for name in _PATH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value not in INIT_WORDS:
            changes[name] = _absolute(value)
    if config.cache_dir not in (None, "default", "off", "none"):
        changes["cache_dir"] = str(Path(config.cache_dir).expanduser().resolve())
    return dataclasses.replace(config, **changes)
