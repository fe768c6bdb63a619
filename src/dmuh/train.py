"""The one training loop, for every method (CPU or one GPU)."""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dmuh import distributed

from dmuh.config import RunConfig, TrainConfig
from dmuh.data import open_source
from dmuh.data.pipeline import InputPipeline, images_to_tensor
from dmuh.data.protocols import Split, make_split
from dmuh.errors import DmuhError
from dmuh.io import atomic_path
from dmuh.methods import HashingMethod, StepInputs, create_method
from dmuh.models import create_model
from dmuh.models.momentum import MomentumNetwork

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
SPLIT = "split.json"
CONFIG = "config.yaml"
TRACE = "uncertainty_trace.npz"


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DmuhError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DmuhError(f"--device {name!r}: use cpu or cuda[:N]")
    return torch.device(name)


@dataclass
class Experiment:
    """Everything built from a config: data on the device, split, model, method."""

    config: TrainConfig
    device: torch.device
    split: Split
    source: object
    pipeline: InputPipeline
    model: torch.nn.Module
    method: HashingMethod
    momentum: Optional[MomentumNetwork]
    images: torch.Tensor  # every decoded item of the source (CPU), decoded once
    train_inputs: torch.Tensor  # the training items, on the device
    train_labels: torch.Tensor
    context: distributed.Context = distributed.Context()


def load_split(config: RunConfig, source, run_dir: Path) -> Split:
    """Reuse the run's saved split (resume, evaluate) or make it from the protocol and save it."""
    path = run_dir / SPLIT
    if path.exists():
        split = Split.load(path)
        split.check(source)
        return split
    split = make_split(config.protocol, source, seed=config.split_seed)
    split.save(path)
    return split


def decode_all(source, config: RunConfig) -> torch.Tensor:
    """Every item of the source as one tensor, decoded once (and cached on disk when asked)."""
    return images_to_tensor(source.decode(None, size=config.image_size, cache_dir=config.cache_dir))


def build_model(config: RunConfig, images: torch.Tensor) -> torch.nn.Module:
    """The configured network for these inputs: feature vectors (N, D) or images (N, C, H, W)."""
    extra = {"input_dim": images.shape[1]} if images.dim() == 2 else {"in_channels": images.shape[1]}
    return create_model(config.model, bits=config.bits, pretrained=config.pretrained, hash_norm=config.hash_norm,
                        **extra, **config.model_params)


def build_experiment(config: TrainConfig, run_dir: Path, context: distributed.Context = distributed.Context()) -> Experiment:
    device = resolve_device(config.device)
    source = open_source(config.data, root=config.data_root)
    if context.is_main:
        split = load_split(config, source, run_dir)
    distributed.barrier(context)  # rank 0 writes the split once; the others read it
    if not context.is_main:
        split = load_split(config, source, run_dir)
    images = decode_all(source, config)
    model = build_model(config, images)
    if config.init != "scratch":
        from dmuh.pretrain import load_init

        load_init(config.init, model, split)
    pipeline = InputPipeline(getattr(source, "channels", None), getattr(model, "input_size", None), config.augment)
    train_labels = torch.from_numpy(np.asarray(source.labels)[split.train]).float()
    method = create_method(config.method, bits=config.bits, train_labels=train_labels, **config.method_params)
    if context.enabled and device.type == "cuda":  # BatchNorm statistics of the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    model.to(device)
    method.to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    momentum = MomentumNetwork(model, method.momentum_alpha) if method.uses_momentum else None
    if config.compile:
        # In place, so state_dict keys stay those of the plain model (checkpoints stay portable).
        model.compile()
        if momentum is not None:
            momentum.network.compile()
    train_inputs = images[torch.from_numpy(split.train)].to(device)
    return Experiment(config, device, split, source, pipeline, model, method, momentum, images, train_inputs,
                      train_labels.to(device), context)


def build_optimizer(config: RunConfig, groups: List[dict]) -> torch.optim.Optimizer:
    """SGD or AdamW over parameter groups; each group's "lr_scale" multiplies the scheduled rate."""
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    raise DmuhError(f"--optimizer {config.optimizer!r}: choose sgd or adamw")


def make_optimizer(config: TrainConfig, model: torch.nn.Module, method: HashingMethod) -> torch.optim.Optimizer:
    hash_params = list(model.hash_layer.parameters())
    hash_ids = {id(p) for p in hash_params}
    backbone_params = [p for p in model.parameters() if id(p) not in hash_ids]
    return build_optimizer(config, [
        {"params": backbone_params, "lr_scale": config.backbone_lr_scale},
        {"params": hash_params + list(method.parameters()), "lr_scale": 1.0},
    ])


def set_learning_rate(optimizer: torch.optim.Optimizer, config: RunConfig, progress: float) -> float:
    lr = learning_rate(config, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


def learning_rate(config: RunConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay from lr to lr_end (progress in epochs, fractional)."""
    if config.warmup_epochs and progress < config.warmup_epochs:
        return config.lr * (progress + 1e-3) / config.warmup_epochs
    span = max(config.epochs - config.warmup_epochs, 1e-9)
    t = min(max((progress - config.warmup_epochs) / span, 0.0), 1.0)
    return config.lr_end + 0.5 * (config.lr - config.lr_end) * (1.0 + math.cos(math.pi * t))


def autocast(config: RunConfig, device: torch.device):
    enabled = config.amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def run_network(
    network,
    inputs: torch.Tensor,
    pipeline: InputPipeline,
    config: RunConfig,
    device: torch.device,
) -> torch.Tensor:
    """`network(x)` over `inputs` (uint8 images or features, any device) in batches; float32 on CPU."""
    out = []
    for start in range(0, inputs.shape[0], config.eval_batch_size):
        batch = inputs[start : start + config.eval_batch_size].to(device, non_blocking=True)
        x = pipeline(batch)
        if device.type == "cuda" and config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(config, device):
            out.append(network(x).float().cpu())
    return torch.cat(out)


def encode(
    model: torch.nn.Module,
    method: HashingMethod,
    inputs: torch.Tensor,
    pipeline: InputPipeline,
    config: TrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """Continuous codes (before sign) of `inputs`, float32 on CPU; networks in eval mode."""
    was_training = model.training
    model.eval()
    method.eval()  # methods with their own layers (e.g. OrthoHash's BatchNorm) encode in eval mode
    try:
        return run_network(lambda x: method.continuous_codes(model(x).float()), inputs, pipeline, config, device)
    finally:
        model.train(was_training)
        method.train(was_training)


def fit_shallow(exp: Experiment) -> None:
    """Shallow methods (ITQ, LSH): fit the hash layer once on backbone features of the training split."""
    exp.model.eval()
    features = run_network(exp.model.features, exp.train_inputs, exp.pipeline, exp.config, exp.device)
    weight, bias = exp.method.fit(features, exp.train_labels.cpu())
    with torch.no_grad():
        exp.model.hash_layer.weight.copy_(weight)
        exp.model.hash_layer.bias.copy_(bias)


def encode_part(exp: Experiment, part: str) -> torch.Tensor:
    """Continuous codes of one part of the split ("query", "train", "database"), float32 on CPU.

    Under torchrun each rank encodes a contiguous shard and the shards are gathered on every rank.
    """
    indices = getattr(exp.split, part)
    shards = np.array_split(np.arange(len(indices)), exp.context.world_size)
    mine = torch.from_numpy(indices[shards[exp.context.rank]])
    codes = encode(exp.model, exp.method, exp.images[mine], exp.pipeline, exp.config, exp.device)
    return distributed.all_gather_uneven(exp.context, codes.to(exp.device)).cpu()


def evaluate_map(exp: Experiment, ties: str = "index") -> float:
    """MAP of the protocol (MAP@all or MAP@k) with sign codes of query and database (rank 0 computes it)."""
    from dmuh.codes import sign
    from dmuh.metrics import mean_average_precision

    query, database = encode_part(exp, "query"), encode_part(exp, "database")
    value = float("nan")
    if exp.context.is_main:
        labels = torch.from_numpy(np.asarray(exp.source.labels))
        value = float(
            mean_average_precision(
                sign(query), sign(database), labels[exp.split.query], labels[exp.split.database],
                topk=exp.split.topk, ties=ties, device=exp.device,
            )
        )
    return distributed.broadcast_float(exp.context, value, exp.device)


def save_checkpoint(run_dir: Path, exp: Experiment, optimizer, epoch: int) -> None:
    state = {
        "epoch": epoch,
        "config": exp.config.to_dict(),
        "model": exp.model.state_dict(),
        "method": exp.method.state_dict(),
        "momentum": exp.momentum.state_dict() if exp.momentum is not None else None,
        "optimizer": optimizer.state_dict(),
    }
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise DmuhError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise DmuhError(f"{path}: not a readable dmuh checkpoint ({type(exc).__name__})") from None


def restore_state(exp: Experiment, checkpoint: dict, path: Path, optimizer=None) -> None:
    """Load a checkpoint's weights (and optimiser state) into a freshly built experiment."""
    try:
        exp.model.load_state_dict(checkpoint["model"])
        exp.method.load_state_dict(checkpoint["method"])
        if exp.momentum is not None:
            exp.momentum.load_state_dict(checkpoint["momentum"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else type(exc).__name__)
        raise DmuhError(f"{path}: does not match the run's config.yaml ({detail[:200]})") from None


def write_log(path: Path, rows: List[Dict[str, float]]) -> None:
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_log(path: Path) -> List[Dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]
    for row in rows:  # whole numbers, so a resumed run rewrites its log as it first wrote it
        row["epoch"] = int(row["epoch"])
    return rows


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


class UncertaintyTrace:
    """Per-bit outputs of both networks for a fixed sample of training items, every epoch (Fig. 1, 3)."""

    def __init__(self, path: Path, count: int, num_train: int, resume: bool = False):
        self.path = path
        self.items = np.arange(min(count, num_train))
        self.hashing: List[np.ndarray] = []
        self.momentum: List[np.ndarray] = []
        self.epochs: List[int] = []
        if resume and path.exists():  # a new run replaces what a run stopped before its first checkpoint left
            with np.load(path) as f:
                self.hashing = list(f["hashing"])
                self.momentum = list(f["momentum"])
                self.epochs = list(f["epochs"])

    @torch.no_grad()
    def record(self, exp: Experiment, epoch: int) -> None:
        if exp.momentum is None or len(self.items) == 0:
            return
        x = exp.pipeline(exp.train_inputs[torch.from_numpy(self.items).to(exp.device)])
        with autocast(exp.config, exp.device):
            h = exp.method.continuous_codes(exp.model(x).float())
            m = exp.method.continuous_codes(exp.momentum(x).float())
        self.hashing.append(h.float().cpu().numpy())
        self.momentum.append(m.float().cpu().numpy())
        self.epochs.append(epoch)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, items=self.items, epochs=np.array(self.epochs), hashing=np.stack(self.hashing), momentum=np.stack(self.momentum))

    def truncate(self, epochs: int) -> None:
        keep = [i for i, e in enumerate(self.epochs) if e <= epochs]
        self.hashing = [self.hashing[i] for i in keep]
        self.momentum = [self.momentum[i] for i in keep]
        self.epochs = [self.epochs[i] for i in keep]


def train(config: TrainConfig, resume: bool = False, progress: bool = True, echo=print) -> Dict[str, float]:
    """Train `config.method`; write config, split, log, checkpoint and trace to `config.out`.

    Under torchrun (WORLD_SIZE > 1) every process runs this same function: `batch_size` is per
    process, each step's global batch is one slice of a permutation shared by all ranks (reseeded
    every epoch, as DistributedSampler.set_epoch does), every rank writes the whole global batch
    into the method's memory, gradients are averaged, and rank 0 alone logs and writes files.
    Returns the last log row (MAP included).
    """
    if config.checkpoint_every < 1:
        raise DmuhError(f"--checkpoint-every {config.checkpoint_every}: must be 1 or more")
    context = distributed.init_from_environment(config.device)
    if context.enabled and config.device.startswith("cuda"):
        config = dataclasses.replace(config, device=f"cuda:{context.local_rank}")
    main_process = context.is_main
    run_dir = Path(config.out)
    if resume:
        checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    elif (run_dir / CHECKPOINT).exists():
        raise DmuhError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(context)

    torch.manual_seed(config.seed)
    exp = build_experiment(config, run_dir, context)
    optimizer = make_optimizer(config, exp.model, exp.method)
    if main_process:
        for note in getattr(exp.method, "notes", []):  # e.g. CSQ's fallback to Bernoulli centres
            echo(f"{config.method}: {note}")
    start_epoch = 1
    log = read_log(run_dir / LOG) if resume else []
    trace = UncertaintyTrace(run_dir / TRACE, config.trace_items, exp.train_inputs.shape[0], resume)
    if resume:
        restore_state(exp, checkpoint, run_dir / CHECKPOINT, optimizer)
        start_epoch = checkpoint["epoch"] + 1
        log = [row for row in log if row["epoch"] < start_epoch]
        trace.truncate(checkpoint["epoch"])
    if main_process:
        config.save(run_dir / CONFIG)

    if exp.method.shallow:
        started = time.perf_counter()
        fit_shallow(exp)
        seconds = time.perf_counter() - started
        row = {"epoch": config.epochs, "loss": float("nan"), "seconds": seconds,
               "images_per_s": exp.train_inputs.shape[0] / seconds, "map": evaluate_map(exp)}
        if main_process:
            write_log(run_dir / LOG, [row])
            save_checkpoint(run_dir, exp, optimizer, config.epochs)
            echo(format_row(row))
        distributed.barrier(context)
        return row

    network = exp.model
    if context.enabled:
        network = DistributedDataParallel(exp.model, device_ids=[exp.device.index] if exp.device.type == "cuda" else None)
    num_train = exp.train_inputs.shape[0]
    batch_size = min(config.batch_size, num_train // context.world_size)
    global_batch = batch_size * context.world_size
    steps = num_train // global_batch  # drop the ragged last batch: every step sees a full batch
    last: Dict[str, float] = log[-1] if log else {}
    for epoch in range(start_epoch, config.epochs + 1):
        # Seeds from (seed, epoch) so a resumed run draws the same batches and augmentations; the
        # permutation is shared by all ranks, augmentation and dropout differ per rank.
        epoch_seed = config.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed + 7919 * context.rank)
        shuffle = torch.Generator(device=exp.device).manual_seed(epoch_seed)
        augmentation = torch.Generator(device=exp.device).manual_seed(epoch_seed + 7919 * (context.rank + 1))
        exp.method.on_epoch_start(epoch, config.epochs)
        exp.model.train()
        exp.method.train()
        order = torch.randperm(num_train, device=exp.device, generator=shuffle)
        sums: Dict[str, torch.Tensor] = {}
        guard = FiniteGuard(exp.device)
        started = time.perf_counter()
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not (progress and main_process))
        for step in bar:
            lr = set_learning_rate(optimizer, config, epoch - 1 + step / steps)
            everyone = order[step * global_batch : (step + 1) * global_batch]
            indices = everyone[context.rank * batch_size : (context.rank + 1) * batch_size]
            x = exp.pipeline(exp.train_inputs[indices], generator=augmentation, train=True)
            if exp.device.type == "cuda" and config.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(config, exp.device):
                if exp.method.uses_features:
                    outputs, features = network(x, return_features=True)
                else:
                    outputs, features = network(x), None
                momentum_outputs = exp.momentum(x) if exp.momentum is not None else None
            momentum_outputs = None if momentum_outputs is None else momentum_outputs.float()
            shared = {}
            if context.enabled:  # the whole global batch, for methods that keep a memory
                shared = dict(
                    shared_indices=everyone,
                    shared_outputs=distributed.all_gather(context, outputs.detach().float()),
                    shared_momentum_outputs=None if momentum_outputs is None else distributed.all_gather(context, momentum_outputs),
                )
            terms = exp.method(
                StepInputs(outputs=outputs.float(), labels=exp.train_labels[indices], indices=indices,
                           momentum_outputs=momentum_outputs,
                           features=None if features is None else features.float(), **shared)
            )
            guard.observe(step, terms)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # DDP averages the network's gradients; a method's own parameters (a classifier, say) too:
            distributed.average(context, [p.grad for p in exp.method.parameters() if p.grad is not None])
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(exp.model.parameters(), config.grad_clip)
            optimizer.step()
            if exp.momentum is not None:
                exp.momentum.update(exp.model)
            for name, value in {"loss": loss, **terms, **exp.method.step_stats}.items():
                value = value.detach().float()
                sums[name] = sums[name] + value if name in sums else value
            if step % 100 == 99:
                guard.check(epoch)
        guard.check(epoch)
        names = sorted(sums)
        if names:
            stacked = torch.stack([sums[name] for name in names])
            distributed.average(context, [stacked])
            sums = dict(zip(names, stacked))
        if exp.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        row: Dict[str, float] = {"epoch": epoch, "lr": lr}
        row.update({name: float(value) / steps for name, value in sums.items()})
        row["images_per_s"] = steps * global_batch / seconds
        row["seconds"] = seconds
        if config.eval_every >= 0 and ((config.eval_every and epoch % config.eval_every == 0) or epoch == config.epochs):
            row["map"] = evaluate_map(exp)
        if main_process:
            trace.record(exp, epoch)
            log.append(row)
            write_log(run_dir / LOG, log)
            # A checkpoint of ResNet-18 + momentum copy + optimiser is ~135 MB; writing it every
            # epoch of a short run costs a large share of the run. --resume restarts from the last one.
            if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
                save_checkpoint(run_dir, exp, optimizer, epoch)
            echo(format_row(row))
        distributed.barrier(context)
        last = row
    return last


def format_row(row: Dict[str, float]) -> str:
    parts = [f"epoch {int(row['epoch'])}"]
    if not math.isnan(row["loss"]):
        parts.append(f"loss {row['loss']:.4f}")
    for key in ("likelihood", "quantization", "uncertainty", "image_uncertainty"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    if "map" in row and not math.isnan(row["map"]):
        parts.append(f"MAP {row['map']:.4f}")
    return " | ".join(parts)
