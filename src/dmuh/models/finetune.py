"""Fine-tuning what users fine-tune: freezing a backbone's first stages, and layer-wise
learning-rate decay over its blocks.

Both read the backbone's stages from timm's `group_matcher` (every timm model defines one): in
order, the stem (patch or convolutional embedding, position embedding, tokens), then each stage
(ResNet's layer1..4, ConvNeXt's stages) or transformer block, then what follows (a final norm).

- `freeze_stages(model, n)`: the first n of them stop training: their parameters no longer take
  gradients, and their normalisation layers stay in eval mode (their running statistics are the
  loaded ones), so 1 freezes the stem, 2 the stem and the first stage or block, ...
- `layer_decay_groups(model, decay, weight_decay)`: timm's `param_groups_layer_decay`: the last
  block trains at the backbone's rate, each block before it at `decay` times the rate of the next
  (the stem at decay^blocks); biases, norms and timm's `no_weight_decay()` parameters
  (position embeddings, tokens) without weight decay, as timm's fine-tuning recipes do.

tv: and the built-in networks have no such grouping: both are a one-line error for them.
"""

from __future__ import annotations

from typing import Dict, List

from torch import nn

from dmuh.errors import ConfigError


def _stages(backbone: nn.Module, name: str, what: str, field: str) -> Dict[int, List[str]]:
    matcher = getattr(backbone, "group_matcher", None)
    if not callable(matcher):
        raise ConfigError(
            f"{what}: model {name!r} has no stages to tell apart (a timm: network's group_matcher names them; "
            "tv: and the built-in networks have none)",
            field=field,
        )
    from timm.models import group_parameters

    groups = group_parameters(backbone, matcher(coarse=True))
    return {key: groups[key] for key in sorted(groups)}


def stage_count(model: nn.Module) -> int:
    """How many stages (stem, stages or blocks, a final norm) the backbone of `model` has."""
    return len(_stages(model.backbone, model.name, "stages", "freeze_stages"))


def freeze_stages(model: nn.Module, count: int) -> List[str]:
    """Freeze the first `count` stages of the backbone of `model` (a HashNetwork); returns the names
    of the frozen parameters."""
    if count <= 0:
        return []
    stages = list(_stages(model.backbone, model.name, f"freeze_stages {count}", "freeze_stages").values())
    if count > len(stages):
        raise ConfigError(
            f"freeze_stages {count}: model {model.name!r} has {len(stages)} stages (stem, blocks, final norm)",
            field="freeze_stages",
        )
    frozen = [param for stage in stages[:count] for param in stage]
    parameters = dict(model.backbone.named_parameters())
    for param_name in frozen:
        parameters[param_name].requires_grad_(False)
    owners = {param_name.rpartition(".")[0] for param_name in frozen}
    modules = [module for path, module in model.backbone.named_modules() if path in owners]
    model.freeze(modules)
    return frozen


def layer_decay_groups(model: nn.Module, decay: float, weight_decay: float, scale: float = 1.0) -> List[dict]:
    """Optimiser groups of the backbone of `model` with layer-wise learning-rate decay, each
    group's "lr_scale" times `scale` (the backbone's learning-rate multiplier); frozen parameters
    are left out."""
    _stages(model.backbone, model.name, f"layer_decay {decay:g}", "layer_decay")  # a timm network
    from timm.optim import param_groups_layer_decay

    no_decay = getattr(model.backbone, "no_weight_decay", None)
    groups = param_groups_layer_decay(
        model.backbone,
        weight_decay=weight_decay,
        no_weight_decay_list=tuple(no_decay()) if callable(no_decay) else (),
        layer_decay=decay,
    )
    for group in groups:
        group["lr_scale"] = float(group.get("lr_scale", 1.0)) * scale
    return [group for group in groups if group["params"]]
