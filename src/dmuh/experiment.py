"""An experiment: a config made concrete (data decoded, split, network, method, momentum copy),
and what is computed from one without training it (continuous codes, MAP on the split).

`dmuh train` builds one and trains it; `dmuh evaluate` and the re-ranking study rebuild a
finished run's (`load_run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dmuh import distributed
from dmuh.codes import sign
from dmuh.config import TrainConfig
from dmuh.data import open_source
from dmuh.data.pipeline import InputPipeline
from dmuh.data.protocols import Split
from dmuh.errors import DmuhError
from dmuh.methods import HashingMethod, create_method
from dmuh.metrics import DEFAULT_TIES, mean_average_precision
from dmuh.models.momentum import MomentumNetwork
from dmuh.run import CHECKPOINT, CONFIG, load_checkpoint, load_init, load_run_config, load_split, restore_state
from dmuh.runtime import build_model, decode_all, resolve_device, run_network


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


def load_run(run: str | Path, device: str = "cpu") -> Experiment:
    """Rebuild a run's experiment (data, saved split, model, method) with its trained weights."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise DmuhError(f"{run}: not a run directory (no {CONFIG})")
    config = load_run_config(run, device=device)
    checkpoint = load_checkpoint(run / CHECKPOINT)
    exp = build_experiment(config, run)  # reloads and checks the saved split against the data
    restore_state(checkpoint, run / CHECKPOINT, exp.model, exp.method, exp.momentum)
    return exp


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


def encode_part(exp: Experiment, part: str) -> torch.Tensor:
    """Continuous codes of one part of the split ("query", "train", "database"), float32 on CPU.

    Under torchrun each rank encodes a contiguous shard and the shards are gathered on every rank.
    """
    indices = getattr(exp.split, part)
    shards = np.array_split(np.arange(len(indices)), exp.context.world_size)
    mine = torch.from_numpy(indices[shards[exp.context.rank]])
    codes = encode(exp.model, exp.method, exp.images[mine], exp.pipeline, exp.config, exp.device)
    return distributed.all_gather_uneven(exp.context, codes.to(exp.device)).cpu()


def evaluate_map(exp: Experiment, ties: str = DEFAULT_TIES) -> float:
    """MAP of the protocol (MAP@all or MAP@k) with sign codes of query and database (rank 0 computes it)."""
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
