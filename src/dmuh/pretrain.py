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

import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dmuh.config import OBJECTIVES, PretrainConfig
from dmuh.data import open_source
from dmuh.data.pipeline import InputPipeline
from dmuh.data.protocols import Split
from dmuh.errors import DmuhError
from dmuh.io import atomic_path
from dmuh.train import (
    CONFIG, LOG, SPLIT, autocast, build_model, build_optimizer, decode_all, load_split, resolve_device,
    set_learning_rate, write_log,
)

BACKBONE = "backbone.safetensors"


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

    def prepare(x):
        if device.type == "cuda" and config.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    labeled_batch = min(config.batch_size, labeled.shape[0])
    unlabeled_batch = min(config.unlabeled_batch_size, unlabeled.shape[0]) if use_simclr else 0
    steps = unlabeled.shape[0] // unlabeled_batch if use_simclr else labeled.shape[0] // labeled_batch
    log: List[Dict[str, float]] = []
    row: Dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        generator = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)
        model.train()
        heads.train()
        labeled_order = torch.randperm(labeled.shape[0], device=device, generator=generator)
        unlabeled_order = torch.randperm(unlabeled.shape[0], device=device, generator=generator) if use_simclr else None
        sums: Dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        seen = 0
        for step in tqdm(range(steps), desc=f"pretrain {epoch}/{config.epochs}", leave=False, disable=not progress):
            lr = set_learning_rate(optimizer, config, epoch - 1 + step / steps)
            terms: Dict[str, torch.Tensor] = {}
            with autocast(config, device):
                if use_ce:
                    start = (step * labeled_batch) % (labeled.shape[0] - labeled_batch + 1)
                    batch = labeled_order[start : start + labeled_batch]
                    x = prepare(labeled_pipeline(labeled[batch], generator=generator, train=True))
                    terms["cross_entropy"] = classification_loss(heads["classifier"](model.features(x)), labeled_targets[batch])
                    seen += labeled_batch
                if use_simclr:
                    batch = unlabeled[unlabeled_order[step * unlabeled_batch : (step + 1) * unlabeled_batch]]
                    views = torch.cat([view_pipeline(batch, generator=generator, train=True) for _ in range(2)])
                    projections = heads["projector"](model.features(prepare(views)).float())
                    terms["contrastive"] = nt_xent(*projections.chunk(2), config.temperature)
                    seen += 2 * unlabeled_batch
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        row = {"epoch": epoch, "lr": lr, **{k: float(v) / steps for k, v in sums.items()},
               "images_per_s": seen / seconds, "seconds": seconds}
        if not all(np.isfinite(v) for v in row.values()):
            raise DmuhError(f"pretrain epoch {epoch}: the loss became non-finite; lower --lr")
        log.append(row)
        write_log(run_dir / LOG, log)
        with atomic_path(run_dir / BACKBONE) as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in model.backbone.state_dict().items()}, str(tmp))
        echo(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return row


def load_init(init: str, model: nn.Module, split: Split) -> str:
    """Load `--init` (a `dmuh pretrain` run directory or a weights file) into the model's backbone.

    A pretrain run must have been made with the same query split as this run (same data and
    query indices), since its self-supervised part may have seen every non-query image.
    Returns a one-line description for the log.
    """
    path = Path(init)
    if path.is_dir():
        if not (path / BACKBONE).is_file():
            raise DmuhError(f"--init {init}: no {BACKBONE} in this directory (is it a `dmuh pretrain` run?)")
        init_split = Split.load(path / SPLIT)
        if init_split.fingerprint != split.fingerprint or not np.array_equal(init_split.query, split.query):
            raise DmuhError(
                f"--init {init}: pre-trained on a different query split (protocol {init_split.protocol}, seed "
                f"{init_split.seed}); use the same --data, --protocol and --split-seed so no query image was seen"
            )
        weights_file = path / BACKBONE
    elif path.is_file():
        weights_file = path
    else:
        raise DmuhError(f"--init {init}: no such run directory or weights file")
    if weights_file.suffix == ".safetensors":
        state = load_file(str(weights_file))
    else:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DmuhError(f"--init {weights_file}: not a readable state dict ({type(exc).__name__})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
    # A whole hashing-network state dict (backbone.* and hash_layer.*) or a backbone's.
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        result = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise DmuhError(f"--init {weights_file}: does not fit model backbone ({str(exc).splitlines()[1].strip()})") from None
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[:3]
        kind = "missing" if result.missing_keys else "unexpected"
        raise DmuhError(f"--init {weights_file}: does not fit model backbone ({kind} keys: {', '.join(first)})")
    return f"backbone initialised from {weights_file}"
