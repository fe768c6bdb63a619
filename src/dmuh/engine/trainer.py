"""The one training loop, for every method (CPU, one GPU, or torchrun).

prepare   `Trainer(config, resume)`: the experiment, optimiser, log and trace, resumed state
fit       `method.train_with(trainer)`: gradient epochs (`gradient_epochs`), or a closed-form
          fit of the hash layer (`fit_hash_layer`) for shallow methods
an epoch  `epoch`: `dmuh.engine.runtime.run_epoch` over `step_terms`, one step's loss terms
after it  `finish_epoch`: MAP, the uncertainty trace, log.csv and checkpoint.safetensors
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dmuh.data.protocols import AUTO, choose_protocol
from dmuh.engine.builder import (
    Experiment,
    build_experiment,
    build_networks,
    evaluate_cross_modal_map,
    evaluate_map,
    evaluate_train_map,
    open_data,
    paired_codes,
    reference_features,
    share_buffers,
)
from dmuh.engine.preflight import check_train_config
from dmuh.engine.pretrain import backbone_lr_scale_of, warm_up
from dmuh.engine.runtime import (
    autocast,
    build_optimizer,
    memory_layout,
    run_epoch,
    run_network,
    schedule_epochs,
)
from dmuh.errors import ConfigError, DmuhError, RunError
from dmuh.methods import HashingMethod, StepInputs, method_class
from dmuh.metrics.ranking import DEFAULT_TIES
from dmuh.models.finetune import layer_decay_groups
from dmuh.runs.config import TrainConfig, with_absolute_paths
from dmuh.runs.layout import (
    CHECKPOINT,
    CONFIG,
    LEGACY_CHECKPOINT,
    LOG,
    SPLIT,
    TRACE,
    VOCABULARY,
    legacy_checkpoint_message,
    legacy_method_params,
    load_checkpoint,
    read_log,
    restore_state,
    save_checkpoint,
    write_log,
)
from dmuh.utils import distributed
from dmuh.utils.io import atomic_path, check_array_file, file_lock, remove_orphans
from dmuh.utils.words import plural


def make_optimizer(config: TrainConfig, model: torch.nn.Module, method: HashingMethod) -> torch.optim.Optimizer:
    """The backbone at its learning-rate multiplier (per block with --layer-decay), the hash layer,
    the rest of the network and the method's own parameters at --lr; frozen parameters left out."""
    hash_params = list(model.hash_layer.parameters())
    hash_ids = {id(p) for p in hash_params}
    scale = backbone_lr_scale_of(config, method.requirements().labels)
    if config.layer_decay is not None:
        backbone_groups = layer_decay_groups(model, config.layer_decay, config.weight_decay, scale)
        in_groups = {id(p) for group in backbone_groups for p in group["params"]}
        rest = [p for p in model.parameters() if id(p) not in hash_ids and id(p) not in in_groups]
        backbone_groups.append({"params": rest, "lr_scale": scale})  # a fitted head, hash_norm
    else:
        backbone_params = [p for p in model.parameters() if id(p) not in hash_ids]
        backbone_groups = [{"params": backbone_params, "lr_scale": scale}]
    groups = backbone_groups + [{"params": hash_params + list(method.parameters()), "lr_scale": 1.0}]
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    return build_optimizer(config, groups)


class UncertaintyTrace:
    """Per-bit outputs of both networks for a fixed sample of training items, every epoch (Fig. 1, 3)."""

    def __init__(self, path: Path, count: int, num_train: int, resume: bool = False):
        self.path = path
        self.items = np.arange(min(count, num_train))
        self.hashing: List[np.ndarray] = []
        self.momentum: List[np.ndarray] = []
        self.epochs: List[int] = []
        if resume and path.exists():  # a new run replaces what a run stopped before its first checkpoint left
            self.load_earlier()

    def load_earlier(self) -> None:
        """The earlier epochs of a resumed run; a damaged or mismatched file is one warning line and
        a trace that starts again (it is a diagnostic: training goes on without it)."""
        import os
        import sys
        import zipfile

        try:
            check_array_file(self.path, "uncertainty trace")
            with np.load(self.path, allow_pickle=False) as f:
                hashing, momentum, epochs = f["hashing"], f["momentum"], f["epochs"]
            shape_ok = (
                hashing.ndim == 3
                and hashing.shape == momentum.shape
                and epochs.shape == hashing.shape[:1]
                and hashing.shape[1] == len(self.items)
            )
            problem = None if shape_ok else "its arrays do not fit this run's trace items"
        except (DmuhError, OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            problem = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        if problem is None:
            self.hashing, self.momentum, self.epochs = list(hashing), list(momentum), [int(e) for e in epochs]
        elif os.environ.get("RANK", "0") == "0":
            print(
                f"dmuh: warning: {self.path} is damaged ({problem}); continuing without the earlier epochs' "
                "uncertainty trace",
                file=sys.stderr,
            )

    def record(self, exp: Experiment, epoch: int, save: bool = True) -> None:
        """Measure this epoch's outputs and, with `save` (rank 0), write the trace file. Under
        torchrun every rank measures: a SyncBatchNorm network's training-mode pass is a collective."""
        if exp.momentum is None or len(self.items) == 0:
            return
        h, m = paired_codes(exp, self.items)  # as the loss sees them, without moving BatchNorm statistics
        if not save:
            return
        self.hashing.append(h.numpy())
        self.momentum.append(m.numpy())
        self.epochs.append(epoch)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                items=self.items,
                epochs=np.array(self.epochs),
                hashing=np.stack(self.hashing),
                momentum=np.stack(self.momentum),
            )

    def truncate(self, epochs: int) -> None:
        keep = [i for i, e in enumerate(self.epochs) if e <= epochs]
        self.hashing = [self.hashing[i] for i in keep]
        self.momentum = [self.momentum[i] for i in keep]
        self.epochs = [self.epochs[i] for i in keep]


class Trainer:
    """One run of the loop: built (and resumed) by the constructor, fitted by `run`.

    Under torchrun (WORLD_SIZE > 1) every process runs the same code: `batch_size` is per process,
    each step's global batch is one slice of a permutation shared by all ranks (reseeded every
    epoch, as DistributedSampler.set_epoch does), every rank writes the whole global batch into
    the method's memory, gradients are averaged, and rank 0 alone logs and writes files.
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        echo: Callable[[str], None] = print,
        verbose: bool = False,
    ):
        self.verbose = verbose
        check_train_config(config)  # method, model and files, before any data is read
        config = with_absolute_paths(config)  # config.yaml then works from any folder
        context = distributed.init_from_environment(config.device)
        if context.enabled and method_class(config.method).requires.text:  # refused before any data is read
            raise DmuhError(f"method {config.method!r}: cross-modal methods train in one process (not under torchrun)")
        if context.enabled and config.device.startswith("cuda"):
            config = dataclasses.replace(config, device=f"cuda:{context.local_rank}")
        self.config, self.context, self.progress, self.echo = config, context, progress, echo
        self.main_process = context.is_main
        self.run_dir = run_dir = Path(config.out)
        if resume:
            checkpoint = load_checkpoint(run_dir / CHECKPOINT)
            if "method_spec" not in checkpoint:  # trained before a default changed: keep what it used
                config = dataclasses.replace(config, method_params=legacy_method_params(config))
            config = extended_schedule(config, checkpoint, echo if context.is_main else (lambda line: None))
            self.config = config
        elif (run_dir / CHECKPOINT).exists():
            raise DmuhError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        elif (run_dir / LEGACY_CHECKPOINT).exists():
            raise DmuhError(legacy_checkpoint_message(run_dir))
        elif (run_dir / CONFIG).exists() and not (run_dir / SPLIT).exists():
            # A run stopped before its first checkpoint leaves config.yaml and split.json, and is
            # started again; a config.yaml alone is someone's file, not replaced.
            raise RunError(
                f"out {run_dir} holds a {CONFIG} that no dmuh run wrote (no {SPLIT}); "
                "choose another --out or move the file",
                field="out",
            )
        if self.main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_orphans(run_dir)  # temp files of a run killed mid-write
        distributed.barrier(context)

        self.log = read_log(run_dir / LOG) if resume else []  # a damaged log fails before the data is decoded
        torch.manual_seed(config.seed)
        said = echo if context.is_main else (lambda line: None)
        data = open_data(config, run_dir, context, echo=said)
        split = data.split
        said(
            f"{'resuming' if resume else 'training'} {config.method} ({config.bits} bits, {config.model}) on "
            f"{config.data}, device {config.device}"
        )
        if config.protocol == AUTO:
            said(
                f"protocol auto chose {split.protocol}: {choose_protocol(data.source.labels).reason} (--protocol overrides)"
            )
        said(
            f"split ({split.protocol}): {len(split.query):,} query / {len(split.train):,} train / "
            f"{len(split.database):,} database items; MAP with ties {DEFAULT_TIES}"
        )
        model, method = build_networks(config, data, run_dir, checkpoint if resume else None)
        if not resume and not (run_dir / CHECKPOINT).is_file():  # a new run: --init auto's warm-up
            warm_up(config, data, model, context, progress=progress, echo=said)
        self.exp = exp = build_experiment(config, data, model, method, context)
        self.optimizer = make_optimizer(config, exp.model, exp.method)
        if self.main_process:
            for note in exp.method.notes:  # e.g. CSQ's fallback to Bernoulli centres
                echo(f"{config.method}: {note}")
        self.start_epoch = 1
        self.trace = UncertaintyTrace(run_dir / TRACE, config.trace_items, exp.train_inputs.shape[0], resume)
        if resume:
            restore_state(checkpoint, run_dir / CHECKPOINT, exp.model, exp.method, exp.momentum, self.optimizer)
            self.start_epoch = checkpoint["epoch"] + 1
            self.log = [row for row in self.log if row["epoch"] < self.start_epoch]
            self.trace.truncate(checkpoint["epoch"])
        self.needs = needs = exp.requirements  # what the method needs of this loop, read once
        vocabulary = getattr(exp.source, "vocabulary", None)
        if self.main_process and needs.text and vocabulary is not None:
            vocabulary.save(run_dir / VOCABULARY)  # `dmuh search --text` vectorises queries with it
        if self.main_process:
            config.save(run_dir / CONFIG)

    def run(self) -> Dict[str, float]:
        """Fit the method as it says (`HashingMethod.train_with`); returns the last log row."""
        return self.exp.method.train_with(self)

    # -- gradient training ----------------------------------------------------------------------

    def gradient_epochs(self) -> Dict[str, float]:
        exp, config, context = self.exp, self.config, self.context
        self.network = exp.model
        if context.enabled:
            self.network = DistributedDataParallel(
                exp.model, device_ids=[exp.device.index] if exp.device.type == "cuda" else None
            )
        num_train = exp.train_inputs.shape[0]
        needs = self.needs
        if needs.reference_features and self.start_epoch == 1:
            # A resumed run's method has them from its checkpoint (the backbone has moved since).
            exp.method.set_reference_features(reference_features(exp).to(exp.device))
        if needs.text:
            exp.method.set_train_text(exp.train_text)
        if needs.views == 2:
            if exp.train_inputs.dim() != 4:
                raise DmuhError(
                    f"method {config.method!r} learns from two augmented views of each image; "
                    f"--data {config.data} holds feature vectors"
                )
            self.view_pipeline = exp.pipeline.with_augment(needs.view_augment)
        self.batch_size = min(config.batch_size, num_train // context.world_size)
        self.global_batch = self.batch_size * context.world_size
        self.steps = num_train // self.global_batch  # drop the ragged last batch: every step sees a full batch
        last: Dict[str, float] = self.log[-1] if self.log else {}
        for epoch in range(self.start_epoch, config.epochs + 1):
            row = self.epoch(epoch)
            if exp.momentum is not None and needs.momentum_update == "epoch":
                exp.momentum.update(exp.model)  # Eq. 5 once per epoch
            evaluate = config.eval_every >= 0 and (
                (config.eval_every and epoch % config.eval_every == 0) or epoch == config.epochs
            )
            last = self.finish_epoch(row, evaluate)
            self.watch_loss()
        return last

    RISING_EPOCHS = 3

    def watch_loss(self) -> None:
        """One warning when the training loss has risen `RISING_EPOCHS` epochs in a row: the
        recipe is not learning (too high a learning rate for this data, say)."""
        losses = [row["loss"] for row in self.log[-(self.RISING_EPOCHS + 1) :]]
        rising = len(losses) == self.RISING_EPOCHS + 1 and all(b > a for a, b in zip(losses, losses[1:]))
        if rising and self.main_process and not getattr(self, "warned_rising", False):
            self.warned_rising = True
            self.echo(
                f"warning: the training loss rose {self.RISING_EPOCHS} epochs in a row "
                f"({losses[0]:.4f} -> {losses[-1]:.4f}); the run may not be learning: try a lower --lr, "
                "a --warmup-epochs, or --init from `dmuh pretrain`"
            )

    def epoch(self, epoch: int) -> Dict[str, float]:
        """One epoch of optimiser steps; the log row without MAP."""
        exp, config, context = self.exp, self.config, self.context
        # Seeds from (seed, epoch) so a resumed run draws the same batches and augmentations; the
        # permutation is shared by all ranks, augmentation and dropout differ per rank.
        epoch_seed = config.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed + 7919 * context.rank)
        shuffle = torch.Generator(device=exp.device).manual_seed(epoch_seed)
        self.augmentation = torch.Generator(device=exp.device).manual_seed(epoch_seed + 7919 * (context.rank + 1))
        exp.method.on_epoch_start(epoch, schedule_epochs(config))
        exp.model.train()
        exp.method.train()
        if self.needs.epoch_items:  # the method names this epoch's items (ADSH's sampled queries)
            items = exp.method.epoch_items(epoch).to(exp.device)
            self.steps = len(items) // self.global_batch
            if self.steps == 0:
                raise DmuhError(
                    f"method {config.method!r} runs epoch {epoch} over {len(items)} training items, "
                    f"fewer than a batch of {self.global_batch}: lower --batch-size"
                )
            self.order = items[torch.randperm(len(items), device=exp.device, generator=shuffle)]
        else:
            self.order = torch.randperm(exp.train_inputs.shape[0], device=exp.device, generator=shuffle)
        result = run_epoch(
            epoch=epoch,
            steps=self.steps,
            optimizer=self.optimizer,
            config=config,
            device=exp.device,
            loss_terms=self.step_terms,
            after_backward=self.after_backward,
            after_step=self.after_step,
            average=lambda stacked: distributed.average(context, [stacked]),
            progress=self.progress and self.main_process,
            desc="epoch",
        )
        exp.method.on_epoch_end(epoch, schedule_epochs(config))
        row: Dict[str, float] = {"epoch": epoch, "lr": result.lr, **result.means}
        row["images_per_s"] = self.steps * self.global_batch / result.seconds
        row["seconds"] = result.seconds
        return row

    def step_terms(self, step: int) -> Dict[str, torch.Tensor]:
        """One step's loss terms: the batch through both networks and the method."""
        exp, context = self.exp, self.context
        everyone = self.order[step * self.global_batch : (step + 1) * self.global_batch]
        indices = everyone[context.rank * self.batch_size : (context.rank + 1) * self.batch_size]
        needs = self.needs
        if needs.views == 2:
            # Both views in one forward pass: DDP allows one per backward, and BatchNorm sees both.
            x = torch.cat(
                [
                    self.view_pipeline(exp.train_inputs[indices], generator=self.augmentation, train=True)
                    for _ in range(2)
                ]
            )
        else:
            x = exp.pipeline(exp.train_inputs[indices], generator=self.augmentation, train=True)
        x = memory_layout(x, self.config, exp.device)

        def hashing_pass():
            return self.network(x, return_features=True) if needs.features else (self.network(x), None)

        with autocast(self.config, exp.device):
            if exp.momentum is None:
                (outputs, features), momentum_outputs = hashing_pass(), None
            else:
                (outputs, features), momentum_outputs = exp.momentum.paired(hashing_pass, x)
        momentum_outputs = None if momentum_outputs is None else momentum_outputs.float()
        view_outputs = None
        if needs.views == 2:  # the first half is the first view (two-view methods keep no momentum copy)
            outputs, view_outputs = outputs.chunk(2)
            features = None if features is None else features.chunk(2)[0]
            view_outputs = view_outputs.float()
        shared = {}
        if context.enabled:  # the whole global batch, for methods that keep a memory
            shared = dict(
                shared_indices=everyone,
                shared_outputs=distributed.all_gather(context, outputs.detach().float()),
                shared_momentum_outputs=None
                if momentum_outputs is None
                else distributed.all_gather(context, momentum_outputs),
            )
        return exp.method(
            StepInputs(
                outputs=outputs.float(),
                labels=exp.train_labels[indices],
                indices=indices,
                momentum_outputs=momentum_outputs,
                view_outputs=view_outputs,
                text=None if exp.train_text is None else exp.train_text[indices],
                features=None if features is None else features.float(),
                hash_weight=exp.model.hash_layer.weight if needs.hash_weight else None,
                **shared,
            )
        )

    def after_backward(self) -> None:
        # DDP averages the network's gradients; a method's own parameters (a classifier, say) too:
        distributed.average(self.context, [p.grad for p in self.exp.method.parameters() if p.grad is not None])
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.exp.model.parameters(), self.config.grad_clip)

    def after_step(self) -> Dict[str, torch.Tensor]:
        if self.exp.momentum is not None and self.needs.momentum_update == "step":
            self.exp.momentum.update(self.exp.model)  # Eq. 5 after every step
        self.exp.method.on_step_end()
        return self.exp.method.step_stats

    # -- closed-form fitting (shallow methods) ------------------------------------------------

    def fit_hash_layer(self, fit) -> Dict[str, float]:
        """Fit the hash function once on backbone features of the training split: `fit(features,
        labels)` returns (weight, bias) of the linear hash layer (ITQ, LSH) or a fitted head
        (`dmuh.models.heads`, e.g. SDH's kernel map) that replaces it; one log row, numbered as
        the last epoch."""
        exp = self.exp
        started = time.perf_counter()
        exp.model.eval()
        features = run_network(exp.model.features, exp.train_inputs, exp.pipeline, exp.execution)
        noted = len(exp.method.notes)
        fitted = fit(features, exp.train_labels.cpu())
        if self.main_process:
            for note in exp.method.notes[noted:]:  # remarks of the fit itself (e.g. FastH's constant bits)
                self.echo(note)
        if isinstance(fitted, torch.nn.Module):
            exp.model.install_head(fitted)
        else:
            weight, bias = fitted
            with torch.no_grad():
                exp.model.hash_layer.weight.copy_(weight)
                exp.model.hash_layer.bias.copy_(bias)
        seconds = time.perf_counter() - started
        self.log = []  # a fit replaces whatever an earlier one logged
        row = {
            "epoch": self.config.epochs,
            "loss": float("nan"),
            "seconds": seconds,
            "images_per_s": exp.train_inputs.shape[0] / seconds,
        }
        return self.finish_epoch(row, evaluate=True)

    # -- after an epoch -----------------------------------------------------------------------

    def finish_epoch(self, row: Dict[str, float], evaluate: bool) -> Dict[str, float]:
        """MAP (when asked), the trace, then on rank 0 the log, the checkpoint and the epoch line.

        Everything here measures the network the checkpoint holds: under torchrun every rank first
        takes rank 0's BatchNorm statistics (`share_buffers`), and nothing below changes a weight
        or a buffer (the trace restores the statistics its training-mode pass moves)."""
        exp, config, epoch = self.exp, self.config, int(row["epoch"])
        share_buffers(exp)
        if evaluate and self.needs.text:  # both directions; "map" is their mean
            maps = evaluate_cross_modal_map(exp)
            row["map_i2t"], row["map_t2i"] = maps["i2t"], maps["t2i"]
            row["map"] = (maps["i2t"] + maps["t2i"]) / 2
            row["ties"] = DEFAULT_TIES
        elif evaluate:
            row["map"] = evaluate_map(exp)
            if config.train_map_items:
                row["train_map"] = evaluate_train_map(exp)
            row["ties"] = DEFAULT_TIES
        self.trace.record(exp, epoch, save=self.main_process)
        if self.main_process:
            self.log.append(row)
            write_log(self.run_dir / LOG, self.log)
            # A checkpoint of ResNet-18 + momentum copy + optimiser is ~135 MB; writing it every
            # epoch of a short run costs a large share of the run. --resume restarts from the last one.
            if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
                save_checkpoint(
                    self.run_dir / CHECKPOINT,
                    epoch=epoch,
                    config=config,
                    model=exp.model,
                    method=exp.method,
                    momentum=exp.momentum,
                    optimizer=self.optimizer,
                )
            self.echo(format_row(row, self.verbose))
        distributed.barrier(self.context)
        return row


def extended_schedule(config: TrainConfig, checkpoint: dict, echo: Callable[[str], None]) -> TrainConfig:
    """What `--resume --epochs N` means: N is where the run stops, not a new schedule.

    The learning-rate schedule is the one the run was started with (its `lr_schedule_epochs`, else
    its `epochs`): extending a finished 10-epoch run to 14 trains epochs 11-14 at lr_end instead
    of jumping back up the cosine; an explicit --lr-schedule-epochs replaces it. Fewer epochs than
    the checkpoint holds is an error (nothing is thrown away).
    """
    done = int(checkpoint["epoch"])
    if config.epochs < done:
        raise ConfigError(
            f"epochs {config.epochs}: the run in {config.out} has trained {plural(done, 'epoch')} already; "
            f"give --epochs {done} or more",
            field="epochs",
        )
    saved = checkpoint.get("config") or {}
    schedule = saved.get("lr_schedule_epochs") or saved.get("epochs")
    if config.lr_schedule_epochs is None and schedule and schedule != config.epochs:
        config = dataclasses.replace(config, lr_schedule_epochs=int(schedule))
        if config.epochs > schedule:
            echo(
                f"extending the run to {config.epochs} epochs: the learning-rate schedule of its {plural(int(schedule), 'epoch')} "
                f"is kept, epochs {schedule + 1}-{config.epochs} run at lr_end {config.lr_end:g} "
                f"(--lr-schedule-epochs N sets another)"
            )
    return config


def train(
    config: TrainConfig, resume: bool = False, progress: bool = True, echo=print, verbose: bool = False
) -> Dict[str, float]:
    """Train `config.method`; write config, split, log, checkpoint and trace to `config.out`. Each
    epoch's line names the loss and the headline figures (`verbose`: every term); log.csv has all.

    Returns the last log row (MAP included, under `row["ties"]`'s tie policy).
    """
    # One writer per run directory: a second `train --out SAME` (or --resume) refuses at once.
    lock = file_lock(config.out, "run directory") if distributed.environment_rank() == 0 else contextlib.nullcontext()
    with lock:
        return Trainer(config, resume, progress, echo, verbose).run()


_NOT_LOSS_TERMS = frozenset(
    {"epoch", "lr", "loss", "images_per_s", "seconds", "map", "train_map", "ties", "map_i2t", "map_t2i"}
)


def format_row(row: Dict[str, float], verbose: bool = False) -> str:
    """One epoch as a line: the epoch, the loss, the mean and largest uncertainty of a method with a
    momentum copy (u: mean, max: the largest image's), images/s and MAP (ties as the start line says),
    within 100 columns; `verbose` adds every loss term and step
    statistic (log.csv always has them). The image-level mean uncertainty equals the bit-level one
    (both are the mean over items and bits), so it is printed once, as u."""
    parts = [f"epoch {int(row['epoch'])}"]
    if not math.isnan(row["loss"]):
        parts.append(f"loss {row['loss']:.4f}")
    if isinstance(row.get("bit_uncertainty"), float) and not math.isnan(row["bit_uncertainty"]):
        u = f"u {row['bit_uncertainty']:.4f}"
        if isinstance(row.get("image_uncertainty_max"), float):
            u += f", max {row['image_uncertainty_max']:.4f}"
        parts.append(u)
    if verbose:
        shown = {"bit_uncertainty", "image_uncertainty", "image_uncertainty_max"}
        for key, value in row.items():  # the method's loss terms and step statistics
            if key not in _NOT_LOSS_TERMS | shown and isinstance(value, float) and not math.isnan(value):
                parts.append(f"{key} {value:.4f}")
    parts.append(f"{row['images_per_s']:,.0f} img/s")
    if "map" in row and not math.isnan(row["map"]):
        train = f", train {row['train_map']:.4f}" if "train_map" in row else ""
        if "map_i2t" in row:
            train += f", I->T {row['map_i2t']:.4f}, T->I {row['map_t2i']:.4f}"
        ties = row.get("ties", DEFAULT_TIES)
        parts.append(f"MAP {row['map']:.4f}{train}" + ("" if ties == DEFAULT_TIES else f" (ties {ties})"))
    return " | ".join(parts)
