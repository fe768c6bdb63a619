"""How a run executes, for every command that runs a network: the device, bf16 autocast, the
network and optimiser built from a config, the learning-rate schedule, batched inference, and the
epoch scaffolding that `dmuh train` and `dmuh pretrain` share."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from dmuh.data.pipeline import InputPipeline, images_to_tensor
from dmuh.data.sources import ArraySource, FeatureSource
from dmuh.errors import ConfigError, DmuhError
from dmuh.models import create_model
from dmuh.models.registry import takes_input_size
from dmuh.runs.config import RunConfig
from dmuh.utils.progress import progress_bar


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: CUDA is not available on this machine", field="device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"device {name!r}: use cpu or cuda[:N]", field="device")
    return torch.device(name)


def autocast(config: RunConfig, device: torch.device):
    enabled = config.amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def memory_layout(x: torch.Tensor, config: RunConfig, device: torch.device) -> torch.Tensor:
    """Image batches in channels_last on CUDA when the config asks (faster convolutions)."""
    if device.type == "cuda" and config.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def resolve_cache_dir(value) -> Optional[Path]:
    """The folder of the decoded-data cache (`RunConfig.cache_dir`), or None for no cache.

    "default": $DMUH_CACHE_DIR if set (itself "off" or "none" to turn the cache off), else
    $XDG_CACHE_HOME/dmuh, else ~/.cache/dmuh; "off", "none" (or None, an older config's) and ""
    turn it off; anything else is the folder.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "off", "none"):
        return None
    if text.lower() != "default":
        return Path(text).expanduser()
    chosen = os.environ.get("DMUH_CACHE_DIR", "").strip()
    if chosen:
        return None if chosen.lower() in ("off", "none") else Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):  # the XDG spec ignores a relative one
        return Path(xdg) / "dmuh"
    return Path.home() / ".cache" / "dmuh"


def _worth_caching(source, size: Optional[int]) -> bool:
    """Whether decoding reads files or resizes: an in-memory array at its own size, or feature
    vectors, would only be copied into the cache."""

    source = getattr(source, "image", source)  # paired data decodes its image modality
    if isinstance(source, FeatureSource):
        return False
    if isinstance(source, ArraySource):
        return size is not None and tuple(source.images.shape[1:3]) != (size, size)
    return True


def decode_all(source, config: RunConfig) -> torch.Tensor:
    """Every item of the source as one tensor, decoded once (and cached in `resolve_cache_dir`'s
    folder, when it is on and decoding reads files)."""
    cache_dir = resolve_cache_dir(config.cache_dir)
    if cache_dir is not None and not _worth_caching(source, config.image_size):
        cache_dir = None
    return images_to_tensor(source.decode(None, size=config.image_size, cache_dir=cache_dir))


def build_model(config: RunConfig, images: torch.Tensor, native_size: bool = True) -> torch.nn.Module:
    """The configured network for these inputs: feature vectors (N, D) or images (N, C, H, W).

    A model that works at any input size (`dmuh.models.registry.takes_input_size`: smallcnn,
    resnet18-32, resnet50-32) is built at the images' own (square) size unless `model_params`
    sets `input_size`, so 8x8 digits are not upscaled to 32; `native_size=False` keeps the model's
    default, as runs were built before their checkpoints recorded the size. A fixed-size model
    (the ImageNet networks' 224) keeps its size and the input pipeline resizes to it.
    """
    extra = {"input_dim": images.shape[1]} if images.dim() == 2 else {"in_channels": images.shape[1]}
    if (
        native_size
        and images.dim() == 4
        and images.shape[-1] == images.shape[-2] > 0
        and "input_size" not in config.model_params
        and takes_input_size(config.model)
    ):
        extra["input_size"] = int(images.shape[-1])
    return create_model(
        config.model,
        bits=config.bits,
        pretrained=config.pretrained,
        hash_norm=config.hash_norm,
        **extra,
        **config.model_params,
    )


def build_optimizer(config: RunConfig, groups: List[dict]) -> torch.optim.Optimizer:
    """SGD or AdamW over parameter groups; each group's "lr_scale" multiplies the scheduled rate."""
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"optimizer {config.optimizer!r}: choose sgd or adamw", field="optimizer")


def schedule_epochs(config: RunConfig) -> int:
    """The epochs the learning-rate schedule spans: `lr_schedule_epochs`, else `epochs`. A run
    extended by `--resume --epochs N` keeps its own (`dmuh.engine.trainer.Trainer`), so the added epochs
    run at lr_end instead of jumping back up the cosine."""
    return config.lr_schedule_epochs or config.epochs


def learning_rate(config: RunConfig, progress: float) -> float:
    """Linear warm-up, then over `schedule_epochs` a cosine decay from lr to lr_end, or lr for the
    first third and lr_end after it (`lr_schedule="step"`), then lr_end (progress in epochs,
    fractional)."""
    if config.warmup_epochs and progress < config.warmup_epochs:
        return config.lr * (progress + 1e-3) / config.warmup_epochs
    span = max(schedule_epochs(config) - config.warmup_epochs, 1e-9)
    t = min(max((progress - config.warmup_epochs) / span, 0.0), 1.0)
    if config.lr_schedule == "step":
        return config.lr if t < 1 / 3 else config.lr_end
    return config.lr_end + 0.5 * (config.lr - config.lr_end) * (1.0 + math.cos(math.pi * t))


def set_learning_rate(optimizer: torch.optim.Optimizer, config: RunConfig, progress: float) -> float:
    lr = learning_rate(config, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


@dataclass(frozen=True)
class Execution:
    """How a network runs for inference: the device, bf16 autocast on CUDA (`amp`), channels_last on
    CUDA and the batch size. A run's config gives the defaults (`Execution.of`); a caller changes a
    copy (`dataclasses.replace`), never the validated config."""

    device: torch.device
    batch_size: int = 1024
    amp: bool = True
    channels_last: bool = True

    @classmethod
    def of(cls, config: RunConfig, device) -> "Execution":
        return cls(torch.device(device), int(config.eval_batch_size), bool(config.amp), bool(config.channels_last))


@torch.no_grad()
def run_network(
    network,
    inputs: torch.Tensor,
    pipeline: InputPipeline,
    execution: Execution,
    desc: str = "encoding",
) -> torch.Tensor:
    """`network(x)` over `inputs` (uint8 images or features, any device) in batches; float32 on CPU.
    More than `dmuh.utils.progress.MIN_ITEMS` inputs show a progress bar (`desc`) on a terminal."""
    out = []
    with progress_bar(inputs.shape[0], desc, unit="item") as bar:
        for start in range(0, inputs.shape[0], execution.batch_size):
            batch = inputs[start : start + execution.batch_size].to(execution.device, non_blocking=True)
            x = memory_layout(pipeline(batch), execution, execution.device)
            with autocast(execution, execution.device):
                out.append(network(x).float().cpu())
            bar.update(batch.shape[0])
    return torch.cat(out)


class FiniteGuard:
    """Remembers, per loss term, the first step where it was NaN or Inf, without a device sync.

    `check` (every 100 steps and at the end of an epoch) raises for the term that broke first.
    """

    NEVER = 2**62

    def __init__(self, device: torch.device):
        self.device = device
        self.first_bad: Dict[str, torch.Tensor] = {}

    def observe(self, step: int, terms: Dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            first = self.first_bad.get(name)
            if first is None:
                first = self.first_bad[name] = torch.full((), self.NEVER, dtype=torch.int64, device=self.device)
            bad = ~torch.isfinite(value.detach())
            self.first_bad[name] = torch.where(bad & (first == self.NEVER), torch.full_like(first, step), first)

    def check(self, epoch: int) -> None:
        if not self.first_bad:
            return
        names = list(self.first_bad)
        steps = torch.stack([self.first_bad[name] for name in names]).tolist()
        first = min(range(len(names)), key=lambda i: steps[i])
        if steps[first] != self.NEVER:
            raise DmuhError(
                f"epoch {epoch}: loss term {names[first]!r} became non-finite at step {steps[first] + 1}; "
                "the last good checkpoint is kept - lower the learning rate or check the data"
            )


@dataclass
class EpochResult:
    means: Dict[str, float]  # per-step mean of "loss", every term and every extra statistic
    lr: float  # the learning rate of the last step
    seconds: float


def run_epoch(
    *,
    epoch: int,
    steps: int,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    device: torch.device,
    loss_terms: Callable[[int], Dict[str, torch.Tensor]],
    after_backward: Optional[Callable[[], None]] = None,
    after_step: Optional[Callable[[], Dict[str, torch.Tensor]]] = None,
    average: Optional[Callable[[torch.Tensor], None]] = None,
    progress: bool = True,
    desc: str = "epoch",
) -> EpochResult:
    """One epoch of `steps` optimiser steps: schedule, loss, backward, step, running means.

    loss_terms(step) returns the named terms whose sum is the loss; after_backward runs before the
    optimiser step (gradient averaging, clipping), after_step after it and returns extra numbers
    for the log (a method's statistics); average all-reduces the stacked sums (torchrun). Sums
    stay on the device and are read once, at the end.
    """
    sums: Dict[str, torch.Tensor] = {}
    guard = FiniteGuard(device)
    lr = set_learning_rate(optimizer, config, epoch - 1)
    started = time.perf_counter()
    # A bar on a terminal only (tqdm's disable=None): a log file gets the epoch lines, not carriage returns.
    bars = None if progress else True
    for step in tqdm(range(steps), desc=f"{desc} {epoch}/{config.epochs}", leave=False, disable=bars):
        lr = set_learning_rate(optimizer, config, epoch - 1 + step / steps)
        terms = loss_terms(step)
        guard.observe(step, terms)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        extra = after_step() if after_step is not None else {}
        if step == 0 and set(extra) & set(terms):  # a statistic would be summed into a loss term's column
            raise ValueError(f"step statistics named like loss terms: {sorted(set(extra) & set(terms))}")
        for name, value in {"loss": loss, **terms, **extra}.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value
        if step % 100 == 99:
            guard.check(epoch)
    guard.check(epoch)
    names = sorted(sums)
    if names and average is not None:
        stacked = torch.stack([sums[name] for name in names])
        average(stacked)
        sums = dict(zip(names, stacked))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return EpochResult({name: float(value) / steps for name, value in sums.items()}, lr, seconds)
