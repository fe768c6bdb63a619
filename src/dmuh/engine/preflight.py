"""Checks of a run's config that need the registries, made before any data is read or decoded:
the method and its hyper-parameters, the model's name and option names, the weights files named.

Field types and ranges are checked by the schema (`dmuh.runs.config.check_values`); this is the rest,
so a bad `-p alpha=2` fails in a second instead of after minutes of decoding.
"""

from __future__ import annotations

from pathlib import Path

from dmuh.engine.runtime import resolve_cache_dir
from dmuh.errors import ConfigError, DmuhError
from dmuh.methods import create_method
from dmuh.models.network import INPUT_OPTIONS, input_transform
from dmuh.models.registry import MODELS, missing_weights_hint
from dmuh.runs.config import INIT_WORDS, RunConfig, TrainConfig

# Arguments of create_model that are not backbone options: their own flags, or set from the data.
_OWN_FLAGS = {"bits": "--bits", "pretrained": "--pretrained", "hash_norm": "--hash-norm", "name": "--model"}
_FROM_DATA = ("in_channels", "input_dim")


def check_model(config: RunConfig) -> None:

    for key in config.model_params:
        if key in _OWN_FLAGS:
            raise ConfigError(f"model_params {key}: set it with {_OWN_FLAGS[key]}", field="model_params")
        if key in _FROM_DATA:
            raise ConfigError(f"model_params {key}: taken from the data, not set by hand", field="model_params")
    own = ("hash_init_std", *INPUT_OPTIONS)
    MODELS.check_options(config.model, [k for k in config.model_params if k not in own])
    try:
        input_transform(config.model, {k: v for k, v in config.model_params.items() if k in INPUT_OPTIONS}, {})
    except DmuhError as error:
        raise ConfigError(str(error), field="model_params") from None
    if config.pretrained is not None and not Path(config.pretrained).is_file():
        hint = missing_weights_hint(config.model)
        raise ConfigError(f"pretrained {config.pretrained}: no such file{hint}", field="pretrained")


def check_method(config: TrainConfig) -> None:
    """The method built at a stand-in size: its own checks of every hyper-parameter run now."""

    try:
        method = create_method(config.method, bits=config.bits, num_train=2, num_classes=2, **config.method_params)
    except TypeError as error:  # a factory refusing an argument the registry let through
        raise DmuhError(f"method {config.method!r}: {error}") from None
    needs = method.requirements()
    if config.label_noise and not needs.labels:
        raise ConfigError(
            f"label_noise {config.label_noise:g}: method {config.method!r} learns without labels, so "
            "there is no label to flip",
            field="label_noise",
        )
    data = str(config.data)
    vectors = data.startswith("features:") or data.lower().endswith((".npz", ".npy"))
    if needs.images and vectors:
        raise ConfigError(
            f"method {config.method}: trains an image network end to end, not on --data {config.data} "
            "(fit a shallow method such as itq on feature vectors)",
            field="method",
        )
    if needs.vectors and not vectors:
        raise ConfigError(
            f"method {config.method}: maps a fixed representation to codes and needs feature vectors "
            f"as --data (features:FILE.npz), not {config.data}",
            field="method",
        )


def check_files(config: RunConfig) -> None:

    cache = resolve_cache_dir(config.cache_dir)
    if cache is not None and cache.exists() and not cache.is_dir():
        raise ConfigError(f"cache_dir {config.cache_dir}: is a file, not a folder (or use off)", field="cache_dir")


def check_finetuning(config: TrainConfig) -> None:
    """--layer-decay and --freeze-stages read a timm: backbone's stages (dmuh.models.finetune)."""
    for field, value, off in (("layer_decay", config.layer_decay, None), ("freeze_stages", config.freeze_stages, 0)):
        if value != off and MODELS.family(config.model) is not MODELS.families.get("timm"):
            raise ConfigError(
                f"{field} {value}: needs a timm: backbone (its group_matcher names the stages); "
                f"model {config.model!r} has none",
                field=field,
            )


def check_train_config(config: TrainConfig) -> None:
    check_files(config)
    check_model(config)
    check_method(config)
    check_finetuning(config)
    if config.init not in INIT_WORDS and not Path(config.init).exists():
        hint = missing_weights_hint(config.model) if Path(config.init).suffix else ""
        raise ConfigError(
            f"init {config.init}: no such run directory or weights file{hint or ' (or use auto or scratch)'}",
            field="init",
        )


def check_pretrain_config(config: RunConfig) -> None:
    check_files(config)
    check_model(config)
