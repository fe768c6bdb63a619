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

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from dmuh.config import OBJECTIVES, PretrainConfig
from dmuh.data import open_source
from dmuh.data.pipeline import InputPipeline
from dmuh.errors import DmuhError
from dmuh.io import atomic_path
from dmuh.run import BACKBONE, CONFIG, LOG, load_split, write_log
from dmuh.runtime import autocast, build_model, build_optimizer, decode_all, memory_layout, resolve_device, run_epoch



def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2B - 1 other views."""
    z = F.normalize(torch.cat([first, second]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    n = first.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy for single-label data, binary cross-entropy for multi-label."""
    if bool((labels.sum(1) == 1).all()):
        return F.cross_entropy(logits.float(), labels.argmax(1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels)


def pretrain(config: PretrainConfig, progress: bool = True, echo=print) -> Dict[str, float]:
    if config.objective not in OBJECTIVES:
        raise DmuhError(f"--objective {config.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    run_dir = Path(config.out)
    if (run_dir / BACKBONE).exists():
        raise DmuhError(f"{run_dir} already holds a pre-trained backbone; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    source = open_source(config.data, root=config.data_root)
    split = load_split(config, source, run_dir)
    config.save(run_dir / CONFIG)
    images = decode_all(source, config)
    model = build_model(config, images).to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    labels_all = torch.from_numpy(np.asarray(source.labels)).float()

    use_ce, use_simclr = "ce" in config.objective.split("+"), "simclr" in config.objective.split("+")
    heads = nn.ModuleDict()
    if use_ce:
        heads["classifier"] = nn.Linear(model.feature_dim, labels_all.shape[1])
    if use_simclr:
        heads["projector"] = nn.Sequential(
            nn.Linear(model.feature_dim, model.feature_dim), nn.BatchNorm1d(model.feature_dim), nn.ReLU(inplace=True),
            nn.Linear(model.feature_dim, config.projection_dim),
        )
    heads.to(device)
    optimizer = build_optimizer(config, [{"params": list(model.backbone.parameters()) + list(heads.parameters()), "lr_scale": 1.0}])

    labeled = images[torch.from_numpy(split.train)].to(device)
    labeled_targets = labels_all[split.train].to(device)
    unlabeled_index = np.setdiff1d(split.database, split.query)  # never a query image
    unlabeled = images[torch.from_numpy(unlabeled_index)].to(device) if use_simclr else None
    channels = images.shape[1] if images.dim() == 4 else None
    labeled_pipeline = InputPipeline(channels, model.input_size, config.augment)
    view_pipeline = InputPipeline(channels, model.input_size, "simclr")

    labeled_batch = min(config.batch_size, labeled.shape[0])
    unlabeled_batch = min(config.unlabeled_batch_size, unlabeled.shape[0]) if use_simclr else 0
    steps = unlabeled.shape[0] // unlabeled_batch if use_simclr else labeled.shape[0] // labeled_batch
    items_per_step = (labeled_batch if use_ce else 0) + 2 * unlabeled_batch
    log: List[Dict[str, float]] = []
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
                    batch = labeled_order[start : start + labeled_batch]
                    x = memory_layout(labeled_pipeline(labeled[batch], generator=generator, train=True), config, device)
                    terms["cross_entropy"] = classification_loss(heads["classifier"](model.features(x)), labeled_targets[batch])
                if use_simclr:
                    batch = unlabeled[unlabeled_order[step * unlabeled_batch : (step + 1) * unlabeled_batch]]
                    views = torch.cat([view_pipeline(batch, generator=generator, train=True) for _ in range(2)])
                    projections = heads["projector"](model.features(memory_layout(views, config, device)).float())
                    terms["contrastive"] = nt_xent(*projections.chunk(2), config.temperature)
            return terms

        result = run_epoch(epoch=epoch, steps=steps, optimizer=optimizer, config=config, device=device,
                           loss_terms=loss_terms, progress=progress, desc="pretrain")
        row = {"epoch": epoch, "lr": result.lr, **result.means,
               "images_per_s": steps * items_per_step / result.seconds, "seconds": result.seconds}
        log.append(row)
        write_log(run_dir / LOG, log)
        with atomic_path(run_dir / BACKBONE) as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in model.backbone.state_dict().items()}, str(tmp))
        echo(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return row
