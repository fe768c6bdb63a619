"""Models registered by name and created by name (timm-style).

A registered factory builds a *backbone*: an `nn.Module` mapping inputs to features, with
attributes `feature_dim`, `input_size` and `in_channels` (see `HashNetwork`). Optional
attributes steer pretrained loading (see `dmuh.models.pretrained`):
`first_conv` (module path of the first convolution), `ignored_pretrained_keys` (key prefixes of
a classification head to drop) and `skipped_pretrained_keys` ({key: why} left at random init).
`create_model` wraps the backbone in a `HashNetwork` with a `bits`-wide hash layer.

`timm:NAME` and `tv:NAME` are families of names (`ModelRegistry.register_family`,
`dmuh.models.external`): resolved against the library's own list when asked for, not registered
one by one.

A factory with an `input_size` option declares that the backbone works at any input size
(`takes_input_size`): `dmuh train` then builds it at the size of the decoded images unless the
user sets one, and `model.config` always records the size, so a checkpoint rebuilds (and `dmuh
encode` / `export-onnx` feed) the network at the size it was trained at. A factory without it has
a fixed size (the ImageNet networks' 224), to which the input pipeline resizes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Union

from dmuh.errors import DmuhError
from dmuh.models.heads import create_head
from dmuh.models.network import INPUT_OPTIONS, HashNetwork, input_transform
from dmuh.models.pretrained import load_pretrained_backbone
from dmuh.utils.registry import Entry, Registry


@dataclass(frozen=True)
class Family:
    """Models of another library, named `PREFIX:NAME` (`timm:vit_small_patch14_dinov2`)."""

    factory: Callable[..., object]  # factory(NAME, in_channels=..., **options) -> backbone
    names: Callable[[], List[str]]  # every NAME the library builds
    library: str  # how messages call it
    refused: Dict[str, str]  # options a caller cannot give -> why
    source: Callable[[str], str] = lambda arch: ""  # where NAME's pretrained weights are published


class ModelRegistry(Registry):
    """The model registry, plus families of names resolved when asked for: `timm:NAME` and `tv:NAME`
    are not listed one by one (timm alone has over a thousand), but checked against the library's
    own list, with a did-you-mean from it. Their options go to the library's builder as given,
    which refuses the ones it does not know (`dmuh.models.external`)."""

    def __init__(self, kind: str, option_word: str = "option"):
        super().__init__(kind, option_word)
        self.families: Dict[str, Family] = {}

    def register_family(
        self, prefix: str, factory, names, library: str, refused: Dict[str, str], source=lambda arch: ""
    ) -> None:
        self.families[prefix] = Family(factory, names, library, dict(refused), source)

    def family(self, name: str) -> Optional[Family]:
        prefix, sep, _ = str(name).partition(":")
        return self.families.get(prefix) if sep else None

    def entry(self, name: str) -> Entry:
        family = self.family(name)
        if family is None:
            if name not in self.entries:
                for prefix, other in self.families.items():  # `--model vit_b_16` for `tv:vit_b_16`
                    if str(name) in other.names():
                        raise DmuhError(f"unknown {self.kind} {name!r} (did you mean '{prefix}:{name}'?)")
            return super().entry(name)
        prefix, _, arch = str(name).partition(":")
        known = family.names()
        if arch not in known:
            # The one did-you-mean rule of every registry, over the library's names.
            catalogue = Registry(self.kind)
            catalogue.entries = dict.fromkeys(known)
            guess = catalogue.suggestion(arch)
            hint = f" (did you mean '{prefix}:{guess}'?)" if guess else ""
            raise DmuhError(
                f"unknown {self.kind} {name!r}{hint}; {family.library} knows {len(known)} names, "
                f"none named {arch!r} (see `{prefix}:NAME` in docs/models.md)"
            )
        return Entry(name, functools.partial(family.factory, arch))

    def check_options(self, name: str, options: Iterable[str], reserved: Iterable[str] = ()) -> Entry:
        family = self.family(name)
        if family is None:
            return super().check_options(name, options, reserved)
        entry = self.entry(name)
        for option in options:
            if option in family.refused:
                raise DmuhError(f"{self.kind} {name!r}: option {option!r} cannot be given ({family.refused[option]})")
        return entry


MODELS = ModelRegistry("model", option_word="option")


def register_model(name: str, **fixed):
    """Function decorator: `@register_model("resnet18-32", small_input=True)` registers a backbone
    factory under `name`, with `fixed` keyword arguments the caller cannot override. Stack it to
    register variants of one factory."""
    return MODELS.register(name, **fixed)


def available_models() -> list:
    """Names of every registered model."""
    return MODELS.names()


def weights_source(name: str) -> str:
    """Where the pretrained weights of model `name` are published (a `timm:` or `tv:` name), or ""."""
    family = MODELS.family(name)
    return family.source(str(name).partition(":")[2]) if family is not None else ""


def missing_weights_hint(name: str) -> str:
    """What to do about a weights file of model `name` that is missing, for a message that names
    its path first: nothing is downloaded, so the file goes there, fetched elsewhere from where the
    weights are published ("" for a name without published weights)."""
    source = weights_source(name)
    if not source:
        return ""
    return f"; nothing is downloaded: put the weights of {name} there, fetched elsewhere ({source})"


def takes_input_size(name: str) -> bool:
    """Whether model `name` works at any input size: its factory has an `input_size` option."""
    return "input_size" in MODELS.entry(name).options()


# The input transform every image model had before it was recorded: a timm: or tv: checkpoint
# without one was trained with it (`checkpoint_model_config`).
_UNRECORDED_TRANSFORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}


def checkpoint_model_config(model_config: dict) -> dict:
    """A checkpoint's `model_config` as `create_model` takes it: a timm: or tv: network recorded
    before its input transform was is rebuilt with the one it was trained with, not the pretrained
    config's."""
    if MODELS.family(model_config.get("name", "")) is not None and "mean" not in model_config:
        return {**_UNRECORDED_TRANSFORM, "crop_pct": 1.0, **model_config}
    return dict(model_config)


def create_model(
    name: str,
    bits: int,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    in_channels: Optional[int] = None,
    hash_init_std: Optional[float] = 0.01,
    hash_norm: str = "none",
    head: Optional[dict] = None,
    **options,
) -> HashNetwork:
    """Build the registered backbone `name` plus a `bits`-wide hash layer.

    pretrained: a local state dict (.pth/.pt or .safetensors: torchvision's key names, timm's for
        `timm:NAME`) loaded into the backbone; nothing is ever downloaded.
    in_channels: input channels for image models (default: the model's own, 3); not for `mlp`.
    hash_init_std: the hash layer's weights start as N(0, std^2), bias 0; None keeps PyTorch's init.
    hash_norm: "none" or "batchnorm" (a BatchNorm1d on the hash-layer outputs; see HashNetwork).
    head: the recorded config of a fitted hash head (`dmuh.models.heads`), rebuilt empty for a
        checkpoint to fill; None: the linear hash layer.
    options: model-specific keyword arguments (e.g. `small_input`, `input_dim`, `hidden`,
        `input_size` for the models that take any size; see `takes_input_size`), and the input
        transform (`INPUT_OPTIONS`: mean, std, interpolation, crop_pct; `dmuh.models.network.
        input_transform`), which a timm: or tv: backbone takes from its pretrained data config
        unless given; it is recorded in `model.config` and `model.input_transform`.

    `model.config` holds the arguments that rebuild the architecture (`create_model(**model.config)`),
    never the weights file.
    """
    MODELS.entry(name)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
        raise DmuhError(f"model {name!r}: bits must be a positive integer, got {bits!r}")
    if in_channels is not None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
            raise DmuhError(f"model {name!r}: in_channels must be a positive integer, got {in_channels!r}")
        options["in_channels"] = in_channels
    given_transform = {key: options.pop(key) for key in INPUT_OPTIONS if key in options}
    backbone = MODELS.create(name, {}, options)
    if pretrained is not None:
        if isinstance(pretrained, bool):
            source = weights_source(name)
            where = f"; get its weights elsewhere ({source}) and give the file" if source else ""
            raise DmuhError(
                f"model {name!r}: pretrained must be the path of a local weights file (nothing is downloaded){where}"
            )
        if not os.path.isfile(pretrained):
            raise DmuhError(f"pretrained weights file not found: {pretrained}{missing_weights_hint(name)}")
        load_pretrained_backbone(backbone, pretrained, model_name=name)
    model = HashNetwork(backbone, bits, name=name, hash_init_std=hash_init_std, hash_norm=hash_norm)
    derived_transform = getattr(backbone, "pretrained_data_config", None) or {}
    if given_transform or derived_transform:
        model.input_transform = input_transform(name, given_transform, derived_transform)
        options.update(model.input_transform)
    if takes_input_size(name) or MODELS.family(name) is not None:
        # The size it is built for, given or the default (for timm: and tv: names, the pretrained
        # config's, which another library version might change): what a checkpoint rebuilds.
        options["input_size"] = int(backbone.input_size)
    model.config = {"name": name, "bits": bits, "hash_init_std": hash_init_std, "hash_norm": hash_norm, **options}
    if head is not None:
        model.install_head(create_head(head))
    return model
