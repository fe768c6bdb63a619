"""Backbones of other libraries by name: `timm:NAME` (any model timm builds) and `tv:NAME`
(torchvision's classification models, `torchvision.models.get_model` names).

The backbone is the library's own module with its classifier head taken off, so its state-dict
keys are the library's: a timm / Hugging Face `model.safetensors` or a torchvision `.pth` loads
into it as it is (`pretrained=FILE`), the head's keys dropped by rule (`ignored_pretrained_keys`):
- timm: built with `num_classes=0` (pooled features out); the head is the key prefix named by
  the model's `pretrained_cfg["classifier"]` (`head`, `fc`, `head.fc`, `classifier`).
- torchvision: the last `nn.Linear` with the model's `num_classes` outputs is replaced by
  `nn.Identity` (`fc`, `classifier.6`, `heads.head`, ...); its input width is the feature width.
  The auxiliary classifiers of inception_v3 and googlenet are switched off and their keys dropped.

Nothing is downloaded: both are always built with random weights (`pretrained=False`,
`weights=None`); weights only come from local files. timm is imported here only, when such a
model is built (it is not needed for the built-in networks).

`input_size` is the model's pretrained input resolution: timm's data config (or `img_size` when
given), torchvision's weights transforms' crop size (or `image_size` when given). Images of
another size are resized to it on the device by the input pipeline, as for the ImageNet networks.
An `input_size` option sets another resolution; it is not a factory argument, so these models are
not `takes_input_size` ones: `dmuh train` keeps the pretrained resolution, not the images' size.
`pretrained_data_config` keeps the input transform of those weights (mean, std, interpolation,
crop_pct): `create_model` records it (unless given) and the input pipeline applies it
(`dmuh.models.network.input_transform`, `dmuh.data.pipeline.InputPipeline`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torchvision
from torch import nn

from dmuh.errors import DmuhError
from dmuh.models.backbones import replace_conv_input
from dmuh.models.registry import MODELS

# Options a caller cannot pass: what they would change is fixed here or taken from elsewhere.
REFUSED_OPTIONS = {
    "num_classes": "the classifier head is replaced by the hash layer",
    "pretrained": "weights come from a local file: set pretrained (--pretrained FILE)",
    "weights": "weights come from a local file: set pretrained (--pretrained FILE)",
    "in_chans": "the input channels are taken from the data",
    "features_only": "the backbone gives pooled features",
}


def _square_size(name: str, size: Any) -> int:
    """One side of a square input from an int or an (H, W) / (C, H, W) tuple."""
    if isinstance(size, (tuple, list)):
        height, width = size[-2:] if len(size) > 1 else (size[0], size[0])
        if height != width:
            raise DmuhError(f"model {name!r}: input size {tuple(size)} is not square; dmuh feeds square images")
        size = height
    return int(size)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _build(name: str, build, options: Dict[str, Any]) -> nn.Module:
    """The library's builder called with the user's options; a refused keyword is a one-line error."""
    try:
        return build()
    except TypeError as error:  # an option the model's class does not take
        raise DmuhError(f"model {name!r}: {error} (options given: {', '.join(options) or 'none'})") from None


def _set_input_size(name: str, model: nn.Module, input_size: Any) -> None:
    """`input_size`: feed the network images of this size instead of its pretrained resolution (a
    convolutional network pools any size; 32 px trains far faster than 224 on a CPU). Checked by
    running one image, since a ViT's position embedding fixes its size (give it img_size /
    image_size, or timm's dynamic_img_size=True, instead)."""
    if input_size is None:
        return
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise DmuhError(f"model {name!r}: input_size must be a positive number of pixels, got {input_size!r}")
    if input_size != model.input_size:
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, model.in_channels, input_size, input_size))
        except Exception as error:
            first = (str(error).strip().splitlines() or [""])[0][:160]
            raise DmuhError(
                f"model {name!r}: does not run at input_size {input_size} ({type(error).__name__}: {first}); "
                "a ViT's size is set by its img_size or dynamic_img_size=true (timm) or image_size (torchvision) option"
            ) from None
        model.train(was_training)
    model.input_size = input_size


def timm_names() -> List[str]:
    """Every architecture, and every `architecture.tag` of its pretrained weights (the tag picks
    the pretrained config: input size, mean, std)."""
    import timm

    return sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True)))


def timm_weights_source(arch: str) -> str:
    """Where the weights of `arch` (`architecture.tag`; its default tag) are published, or ""."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return f"model.safetensors of https://huggingface.co/{hub}" if hub else ""


def timm_backbone(arch: str, in_channels: int = 3, **options) -> nn.Module:
    """timm model `arch` with random weights and no classifier (pooled features)."""
    import timm

    name = f"timm:{arch}"
    input_size = options.pop("input_size", None)
    model = _build(
        name,
        lambda: timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels, **options),
        options,
    )
    data_config = timm.data.resolve_model_data_config(model)
    model.feature_dim = int(model.num_features)
    model.in_channels = in_channels
    # img_size (ViTs) changes the resolution, but not the data config, which describes the weights.
    model.input_size = _square_size(name, options.get("img_size", data_config["input_size"]))
    model.pretrained_data_config = {
        key: data_config[key] for key in ("interpolation", "mean", "std", "crop_pct") if key in data_config
    }
    classifier = model.pretrained_cfg.get("classifier")
    classifiers = classifier if isinstance(classifier, (tuple, list)) else (classifier,) if classifier else ()
    model.ignored_pretrained_keys = tuple(f"{prefix}." for prefix in classifiers)
    first_conv = model.pretrained_cfg.get("first_conv")
    if isinstance(first_conv, str):
        model.first_conv = first_conv
    model.weights_source = timm_weights_source(arch)
    _set_input_size(name, model, input_size)
    return model


def torchvision_names() -> List[str]:
    return torchvision.models.list_models(module=torchvision.models)


def torchvision_weights_source(arch: str) -> str:
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT.url
    except (ValueError, AttributeError, KeyError):  # a model without published weights
        return ""


def _classifier(model: nn.Module, num_classes: int) -> Tuple[str, nn.Linear]:
    """The path and module of the last Linear layer with `num_classes` outputs: the head."""
    heads = [
        (path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    return heads[-1] if heads else ("", None)


def torchvision_backbone(arch: str, in_channels: int = 3, **options) -> nn.Module:
    """torchvision classification model `arch` with random weights, its head replaced by Identity."""
    name = f"tv:{arch}"
    input_size = options.pop("input_size", None)
    model = _build(name, lambda: torchvision.models.get_model(arch, weights=None, **options), options)
    path, head = _classifier(model, 1000)
    if head is None:
        raise DmuhError(f"model {name!r}: has no linear classifier head to replace, so no pooled features to hash")
    _set_submodule(model, path, nn.Identity())
    ignored = [f"{path}."]
    if getattr(model, "aux_logits", False):  # inception_v3, googlenet: training-time side heads
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if getattr(model, aux, None) is not None:
                setattr(model, aux, None)
                ignored.append(f"{aux}.")
    first_conv = next(path for path, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if in_channels != 3:
        _set_submodule(model, first_conv, replace_conv_input(model.get_submodule(first_conv), in_channels))
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    transforms = weights.transforms()
    model.weights_source = torchvision_weights_source(arch)
    model.feature_dim = int(head.in_features)
    model.in_channels = in_channels
    model.input_size = _square_size(name, options.get("image_size", transforms.crop_size))
    model.pretrained_data_config = {
        "interpolation": transforms.interpolation.value,
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
        "crop_pct": transforms.crop_size[0] / transforms.resize_size[0],
    }
    model.ignored_pretrained_keys = tuple(ignored)
    model.first_conv = first_conv
    _set_input_size(name, model, input_size)
    return model


MODELS.register_family("timm", timm_backbone, timm_names, "timm", REFUSED_OPTIONS, timm_weights_source)
MODELS.register_family(
    "tv", torchvision_backbone, torchvision_names, "torchvision", REFUSED_OPTIONS, torchvision_weights_source
)
