"""Backbone warm-up before hashing (`dmuh pretrain`), for data without fitting pretrained weights.

Objectives (all applied to the backbone only, so any hashing method can start from the result):
- "ce": cross-entropy on the labels of the training split (binary cross-entropy for multi-label);
- "simclr": SimCLR's contrastive loss (NT-Xent) on two augmented views of unlabeled images of the
  database split; the query split is never used, for any protocol;
- "simclr+ce": both at every step (a labeled batch and an unlabeled batch), summed.
The run directory holds `backbone.safetensors`, the split it was made with and a log; `dmuh train
--init RUN` loads it and refuses it when its query split differs (its images may have been seen).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmuh.data import open_source
from dmuh.data.pipeline import InputPipeline
from dmuh.engine.builder import RunData, training_labels
from dmuh.engine.preflight import check_pretrain_config
from dmuh.engine.runtime import (
    autocast,
    build_model,
    build_optimizer,
    decode_all,
    memory_layout,
    resolve_device,
    run_epoch,
)
from dmuh.errors import ConfigError, DataError, DmuhError
from dmuh.methods import method_class
from dmuh.methods.components.functional import nt_xent
from dmuh.runs.checkpoint import save_state
from dmuh.runs.config import (
    OBJECTIVES,
    PretrainConfig,
    TrainConfig,
    with_absolute_paths,
)
from dmuh.runs.layout import BACKBONE, BACKBONE_KIND, CONFIG, LOG, load_split, write_log
from dmuh.utils import distributed
from dmuh.utils.io import file_lock, remove_orphans
from dmuh.utils.words import plural


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy for single-label data, binary cross-entropy for multi-label."""
    if bool((labels.sum(1) == 1).all()):
        return F.cross_entropy(logits.float(), labels.argmax(1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels)


def pretrain(config: PretrainConfig, progress: bool = True, echo=print) -> Dict[str, float]:
    with file_lock(config.out, "run directory"):  # one writer per run directory
        return _pretrain(config, progress, echo)


def _pretrain(config: PretrainConfig, progress: bool, echo) -> Dict[str, float]:
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"objective {config.objective!r}: choose one of {', '.join(OBJECTIVES)}", field="objective")
    run_dir = Path(config.out)
    if (run_dir / BACKBONE).exists():
        raise DmuhError(f"{run_dir} already holds a pre-trained backbone; choose another --out")
    check_pretrain_config(config)
    config = with_absolute_paths(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(run_dir)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    source = open_source(config.data, root=config.data_root, allow_outside_root=config.allow_outside_root)
    split = load_split(config, source, run_dir)
    config.save(run_dir / CONFIG)
    images = decode_all(source, config)
    model = build_model(config, images).to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    labels_all = torch.from_numpy(np.asarray(source.labels)).float()
    unlabeled_index = np.setdiff1d(split.database, split.query)  # never a query image
    log: List[Dict[str, float]] = []

    def after_epoch(row: Dict[str, float]) -> None:
        log.append(row)
        write_log(run_dir / LOG, log)
        # A plain state dict (safetensors' load_file reads it) with dmuh's checksum in its metadata.
        save_state(
            run_dir / BACKBONE,
            {k: v.detach().float().cpu() for k, v in model.backbone.state_dict().items()},
            BACKBONE_KIND,
        )
        echo(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    unlabeled = images[torch.from_numpy(unlabeled_index)].to(device) if "simclr" in config.objective else None
    return train_backbone(
        model,
        config,
        device,
        images[torch.from_numpy(split.train)].to(device),
        labels_all[split.train].to(device),
        unlabeled,
        progress=progress,
        after_epoch=after_epoch,
    )


def train_backbone(
    model: nn.Module,
    config: PretrainConfig,
    device: torch.device,
    labeled: torch.Tensor,
    labeled_targets: torch.Tensor,
    unlabeled: Optional[torch.Tensor] = None,
    progress: bool = True,
    after_epoch: Optional[Callable[[Dict[str, float]], None]] = None,
    desc: str = "pretrain",
) -> Dict[str, float]:
    """Train `model.backbone` by `config.objective` for `config.epochs` on the labeled items (and,
    for SimCLR, the unlabeled ones), with heads that are thrown away afterwards; returns the last
    epoch's row. `dmuh pretrain` and `--init auto`'s warm-up (`cross_entropy_warmup`) both run it."""
    use_ce, use_simclr = "ce" in config.objective.split("+"), "simclr" in config.objective.split("+")
    heads = nn.ModuleDict()
    if use_ce:
        heads["classifier"] = nn.Linear(model.feature_dim, labeled_targets.shape[1])
    if use_simclr:
        heads["projector"] = nn.Sequential(
            nn.Linear(model.feature_dim, model.feature_dim),
            nn.BatchNorm1d(model.feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(model.feature_dim, config.projection_dim),
        )
    heads.to(device)
    optimizer = build_optimizer(
        config, [{"params": list(model.backbone.parameters()) + list(heads.parameters()), "lr_scale": 1.0}]
    )

    channels = labeled.shape[1] if labeled.dim() == 4 else None
    labeled_pipeline = InputPipeline.for_network(model, config.augment, channels)
    view_pipeline = labeled_pipeline.with_augment("simclr")

    labeled_batch = min(config.batch_size, labeled.shape[0])
    unlabeled_batch = min(config.unlabeled_batch_size, unlabeled.shape[0]) if use_simclr else 0
    if use_simclr and unlabeled_batch < 2:
        raise ConfigError(
            f"objective {config.objective}: SimCLR needs at least 2 unlabeled (database, non-query) items",
            field="objective",
        )
    steps = unlabeled.shape[0] // unlabeled_batch if use_simclr else labeled.shape[0] // labeled_batch
    items_per_step = (labeled_batch if use_ce else 0) + 2 * unlabeled_batch
    row: Dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        generator = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)
        model.train()
        heads.train()
        labeled_order = torch.randperm(labeled.shape[0], device=device, generator=generator)
        unlabeled_order = torch.randperm(unlabeled.shape[0], device=device, generator=generator) if use_simclr else None

        def loss_terms(step: int) -> Dict[str, torch.Tensor]:
            terms: Dict[str, torch.Tensor] = {}
            with autocast(config, device):
                if use_ce:
                    start = (step * labeled_batch) % (labeled.shape[0] - labeled_batch + 1)
                    batch = labeled_order[start : start + labeled_batch]  # noqa: B023 - called within this iteration
                    x = memory_layout(labeled_pipeline(labeled[batch], generator=generator, train=True), config, device)  # noqa: B023 - called within this iteration
                    terms["cross_entropy"] = classification_loss(
                        heads["classifier"](model.features(x)), labeled_targets[batch]
                    )
                if use_simclr:
                    batch = unlabeled[unlabeled_order[step * unlabeled_batch : (step + 1) * unlabeled_batch]]  # noqa: B023 - called within this iteration
                    views = torch.cat([view_pipeline(batch, generator=generator, train=True) for _ in range(2)])  # noqa: B023 - called within this iteration
                    projections = heads["projector"](model.features(memory_layout(views, config, device)).float())
                    terms["contrastive"] = nt_xent(*projections.chunk(2), config.temperature)
            return terms

        result = run_epoch(
            epoch=epoch,
            steps=steps,
            optimizer=optimizer,
            config=config,
            device=device,
            loss_terms=loss_terms,
            progress=progress,
            desc=desc,
        )
        row = {
            "epoch": epoch,
            "lr": result.lr,
            **result.means,
            "images_per_s": steps * items_per_step / result.seconds,
            "seconds": result.seconds,
        }
        if after_epoch is not None:
            after_epoch(row)
    return row


def warmup_epochs_of(config: TrainConfig) -> int:
    """`--init auto`'s warm-up length: `init_epochs`, else half of --epochs (at least 1).

    Half, not a tenth: on natural images a warm-up of a tenth left the pairwise phase to learn the
    features it then fails to learn (docs/method.md, "The default start")."""
    return config.init_epochs if config.init_epochs is not None else max(1, round(config.epochs / 2))


AUTO_WARMUP_BACKBONE_LR_SCALE = 0.1


def auto_warmup_applies(config: TrainConfig, uses_labels: bool = True) -> bool:
    """Whether `--init auto` warms the backbone up on the training labels: for every method that
    learns from labels; for a label-free one (`HashingMethod.uses_labels` false) only when
    --init-epochs asks for it, since the warm-up reads labels the method itself never sees."""
    return config.init == "auto" and (uses_labels or bool(config.init_epochs))


def backbone_lr_scale_of(config: TrainConfig, uses_labels: bool = True) -> float:
    """The backbone's learning-rate multiplier: `backbone_lr_scale`, else 0.1 after `--init auto`'s
    warm-up and 1 with any other start. After the warm-up the hashing phase fine-tunes the backbone
    10x slower than the new hash layer (HashNet's recipe), which keeps what the warm-up taught;
    measured for `--init auto` only (docs/method.md), so a pretrain run or weights file keeps 1."""
    if config.backbone_lr_scale is not None:
        return float(config.backbone_lr_scale)
    return AUTO_WARMUP_BACKBONE_LR_SCALE if auto_warmup_applies(config, uses_labels) else 1.0


def cross_entropy_warmup(
    config: TrainConfig,
    model: nn.Module,
    device: torch.device,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    progress: bool = True,
    after_epoch: Optional[Callable[[Dict[str, float]], None]] = None,
) -> Dict[str, float]:
    """`--init auto`: a cross-entropy warm-up of the backbone on the training split's labels,
    the same for every method, before hashing starts (a randomly initialised backbone gives the
    pairwise losses codes without structure to start from, and they fail quietly; docs/method.md).

    It uses the run's optimiser settings, batch size, augmentation and seed, a cosine from --lr to
    --lr-end over its own epochs, and no labels but the training split's."""
    warmup = PretrainConfig(
        objective="ce",
        augment=config.augment,
        epochs=warmup_epochs_of(config),
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        lr=config.lr,
        lr_end=config.lr_end,
        warmup_epochs=0,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        device=config.device,
        amp=config.amp,
        channels_last=config.channels_last,
        seed=config.seed,
        eval_batch_size=config.eval_batch_size,
    )
    return train_backbone(
        model, warmup, device, inputs, targets, progress=progress, after_epoch=after_epoch, desc="warm-up"
    )


def warm_up(
    config: TrainConfig,
    data: RunData,
    model: nn.Module,
    context: distributed.Context = distributed.SINGLE,
    progress: bool = False,
    echo: Callable[[str], None] = lambda line: None,
) -> None:
    """`--init auto` on a new run: the cross-entropy warm-up of the backbone on the training labels
    (`data`: the builder's RunData), before the momentum copy is made from it. Label-free methods
    get none unless --init-epochs asks, and then they are told that the run is not label-free."""
    uses_labels = method_class(config.method).requires.labels
    if config.init != "auto":
        return
    if not auto_warmup_applies(config, uses_labels):
        if data.images.dim() == 4:  # a vector model has no backbone to speak of
            echo(
                f"init auto: {config.method!r} learns without labels, so its backbone gets no cross-entropy "
                "warm-up (start it from `dmuh pretrain --objective simclr` with --init RUN, or train on feature vectors)"
            )
        return
    if not data.source.labeled:
        raise DataError(
            f"init_epochs {config.init_epochs}: the warm-up of --init auto trains on labels, and "
            f"--data {config.data} has none; give --init scratch or --init RUN",
            field="init_epochs",
        )
    warmup_labels = data.train_labels
    if not uses_labels:  # asked for with --init-epochs: the backbone sees labels, the method still none
        echo(
            f"init auto: --init-epochs {config.init_epochs} warms the backbone up on the training labels, "
            f"so this run of label-free {config.method!r} is not label-free"
        )
        warmup_labels = training_labels(data.source, data.split)
    # Rank 0 warms up with the global batch (as one process would), the others take its weights.
    device = resolve_device(config.device)
    model.to(device)
    if context.is_main:
        warmup = dataclasses.replace(config, batch_size=config.batch_size * context.world_size)
        train_inputs = data.images[torch.from_numpy(data.split.train)].to(device)
        epochs = warmup_epochs_of(config)
        echo(
            f"init auto: {plural(epochs, 'epoch')} of cross-entropy warm-up on the training split first "
            "(--init scratch skips it)"
        )

        def say_epoch(row: Dict[str, float]) -> None:  # a line an epoch: a long warm-up is not silent
            echo(
                f"warm-up epoch {int(row['epoch'])}/{epochs} | cross_entropy {row['cross_entropy']:.4f} | "
                f"{row['images_per_s']:,.0f} img/s"
            )

        row = cross_entropy_warmup(
            warmup, model, device, train_inputs, warmup_labels.to(device), progress=progress, after_epoch=say_epoch
        )
        echo(
            f"init auto: warm-up done (cross_entropy {row['cross_entropy']:.4f}); {config.method}'s own loss starts now, on another scale than the warm-up's"
        )
    distributed.broadcast_module(context, model)
