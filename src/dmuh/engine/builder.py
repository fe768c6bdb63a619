"""An experiment: a config made concrete (data decoded, split, network, method, momentum copy),
and what is computed from one without training it (continuous codes, MAP on the split).

`dmuh train` builds one and trains it; `dmuh evaluate` and the re-ranking study rebuild a
finished run's (`load_run`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed

from dmuh.codes.binary import sign
from dmuh.data import open_source
from dmuh.data.noise import LabelNoise
from dmuh.data.pipeline import InputPipeline
from dmuh.data.protocols import Split
from dmuh.engine.runtime import (
    Execution,
    autocast,
    build_model,
    decode_all,
    memory_layout,
    resolve_device,
    run_network,
)
from dmuh.errors import ConfigError, DataError, DmuhError
from dmuh.methods import METHODS, HashingMethod, Requirements, create_method, method_class
from dmuh.metrics.ranking import DEFAULT_TIES, mean_average_precision
from dmuh.models import create_model
from dmuh.models.finetune import freeze_stages
from dmuh.models.momentum import MomentumNetwork
from dmuh.models.registry import checkpoint_model_config
from dmuh.runs.config import INIT_WORDS, TrainConfig
from dmuh.runs.layout import (
    CHECKPOINT,
    CONFIG,
    LABEL_NOISE,
    load_checkpoint,
    load_init,
    load_label_noise,
    load_run_config,
    load_split,
    rebuild_networks,
    save_feature_backbone,
)
from dmuh.utils import distributed
from dmuh.utils.words import plural


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
    context: distributed.Context = distributed.SINGLE
    train_text: Optional[torch.Tensor] = None  # (num_train, V) on the device, for methods with Requirements.text
    label_noise: Optional[LabelNoise] = None  # the flips of --label-noise: train_labels holds the noisy labels

    @property
    def execution(self) -> Execution:
        """How this experiment's networks run for inference (device, precision, layout, batch size)."""
        return Execution.of(self.config, self.device)

    @property
    def requirements(self) -> Requirements:
        """What the method needs of the loop and yields: the engine and the studies read it here."""
        return self.method.requirements()


def trained_model(
    config: TrainConfig, images: torch.Tensor, run_dir: Path, checkpoint: Optional[dict] = None
) -> torch.nn.Module:
    """The hashing network of a run. A new run's is built from the config for these images
    (`build_model`: a free input size becomes theirs); a run with a checkpoint (resumed or
    evaluated) is rebuilt as it was trained: from the checkpoint's `model_config` (with the input
    size it recorded), or, for a checkpoint older than `model_config`, from the config at the
    model's default input size, as such runs were built."""
    path = Path(run_dir) / CHECKPOINT
    if checkpoint is None and path.is_file():
        checkpoint = load_checkpoint(path)
    if checkpoint is None:
        return build_model(config, images)
    model_config = checkpoint.get("model_config")
    if model_config is None:
        return build_model(config, images, native_size=False)
    try:
        return create_model(**checkpoint_model_config(model_config))  # the weights come from the checkpoint
    except (KeyError, TypeError) as error:
        raise DmuhError(f"{path}: unreadable network specification ({error})") from None


@dataclass
class RunData:
    """A run's data as the builder reads it: the source, its split, every item decoded once (CPU),
    and the training labels (noisy ones under --label-noise) and texts the method may see."""

    source: object
    split: Split
    images: torch.Tensor
    train_labels: torch.Tensor  # (num_train, C); (num_train, 0) for a label-free method
    label_noise: Optional[LabelNoise] = None
    train_text: Optional[torch.Tensor] = None  # (num_train, V), for methods with Requirements.text


def open_data(
    config: TrainConfig,
    run_dir: Path,
    context: distributed.Context = distributed.SINGLE,
    echo: Callable[[str], None] = lambda line: None,
) -> RunData:
    """Open `config.data`, load or make (and on rank 0 save) the split in `run_dir`, decode every item
    once, and take the training labels the method may read (none for a label-free one)."""
    source = open_source(config.data, root=config.data_root, allow_outside_root=config.allow_outside_root)
    if context.is_main:
        split = load_split(config, source, run_dir)
    distributed.barrier(context)  # rank 0 writes the split once; the others read it
    if not context.is_main:
        split = load_split(config, source, run_dir)
    if context.is_main and getattr(source, "backbone", None) is not None:  # vectors of `dmuh features`
        save_feature_backbone(run_dir, source.backbone)
    images = decode_all(source, config)
    declared = method_class(config.method).requires  # known before any label is read
    if declared.labels and not source.labeled:
        raise DataError(
            f"method {config.method!r} learns from labels, and data {config.data} has none; "
            "choose a label-free method (dmuh train --list-methods)",
            field="data",
        )
    train_labels = training_labels(source, split, declared.labels)
    label_noise = None
    if declared.labels and (
        config.label_noise or (Path(run_dir) / LABEL_NOISE).exists()
    ):  # preflight refuses label-free
        label_noise = load_label_noise(config, train_labels.numpy(), run_dir, save=context.is_main)
        if label_noise is not None:
            train_labels = torch.from_numpy(label_noise.apply(train_labels.numpy())).float()
            echo(
                f"label noise: {plural(len(label_noise.positions), 'training label')} of {len(split.train)} flipped "
                f"to another class (--label-noise {label_noise.rate:g}, seed {label_noise.seed}; {LABEL_NOISE})"
            )
    if declared.text and getattr(source, "text", None) is None:
        raise DataError(
            f"method {config.method!r} learns from image-text pairs, and data {config.data} has no text; "
            "give paired data (paired:PATH: a .npz of image and text, a .mat, or images with a .txt each)",
            field="data",
        )
    train_text = torch.from_numpy(source.text[split.train]) if declared.text else None
    return RunData(source, split, images, train_labels, label_noise, train_text)


def build_networks(
    config: TrainConfig, data: RunData, run_dir: Path, checkpoint: Optional[dict] = None
) -> Tuple[torch.nn.Module, HashingMethod]:
    """The hashing network (rebuilt as trained when the run has a checkpoint; started from --init
    RUN|FILE when given) and the method, on the CPU, untrained: the trainer warms the network up
    (`dmuh.engine.pretrain.warm_up`) before `build_experiment` copies it."""
    model = trained_model(config, data.images, run_dir, checkpoint)
    if config.init not in INIT_WORDS:
        load_init(config.init, model, data.split)
    freeze_stages(model, config.freeze_stages)  # before the warm-up: it trains what is not frozen
    method = create_method(
        config.method,
        bits=config.bits,
        train_labels=data.train_labels,
        **method_params_for(config, model, data.images, data.source),
    )
    return model, method


def build_experiment(
    config: TrainConfig,
    data: RunData,
    model: torch.nn.Module,
    method: HashingMethod,
    context: distributed.Context = distributed.SINGLE,
    momentum: Optional[MomentumNetwork] = None,
) -> Experiment:
    """The experiment of built networks: on the device, in its memory layout, with the momentum copy
    the method asks for (`momentum` when the caller rebuilt it, else made from the network as it is
    now), compiled if the config says so."""
    device = resolve_device(config.device)
    pipeline = InputPipeline.for_network(model, config.augment, getattr(data.source, "channels", None))
    train_inputs = data.images[torch.from_numpy(data.split.train)].to(device)
    if context.enabled and device.type == "cuda":  # BatchNorm statistics of the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    model.to(device)
    method.to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    needs = method.requirements()
    if momentum is None and needs.uses_momentum:
        momentum = MomentumNetwork(model, needs.momentum, needs.momentum_dropout)
    if momentum is not None:
        momentum.to(device)
    if config.compile:
        # In place, so state_dict keys stay those of the plain model (checkpoints stay portable).
        model.compile()
        if momentum is not None:
            momentum.network.compile()
    train_text = data.train_text.to(device) if data.train_text is not None else None
    return Experiment(
        config,
        device,
        data.split,
        data.source,
        pipeline,
        model,
        method,
        momentum,
        data.images,
        train_inputs,
        data.train_labels.to(device),
        context,
        train_text,
        data.label_noise,
    )


def method_params_for(config: TrainConfig, model: torch.nn.Module, images: torch.Tensor, source=None) -> dict:
    """The method's hyper-parameters, plus the sizes of what it builds layers on: the reference
    representation (`reference_dim`, e.g. RPH's decoder: the data's vector length, or the
    backbone's feature size), the backbone's features (`feature_dim`, e.g. TBH's continuous
    bottleneck on `StepInputs.features`) and the text vector (`text_dim`, a cross-modal method's text network).
    A method's own `seed` (its random draws: ITQ's rotation, CSQ's centres, KSH's anchors, ...) is the
    run's `--seed` unless `-p seed=` gives it, so that runs of several seeds differ in every draw.
    They are recorded in the checkpoint's method spec with the rest."""
    params = dict(config.method_params)
    options = METHODS.entry(config.method).options()
    if "seed" in options and "seed" not in params:
        params["seed"] = int(config.seed)
    if "reference_dim" in options and "reference_dim" not in params:
        params["reference_dim"] = int(images.shape[1]) if images.dim() == 2 else int(model.feature_dim)
    if "feature_dim" in options and "feature_dim" not in params:  # a head of its own on the backbone features
        params["feature_dim"] = int(model.feature_dim)
    if "text_dim" in options and getattr(source, "text", None) is not None:
        given = params.get("text_dim")
        if given is not None and int(given) != source.text.shape[1]:
            raise DmuhError(
                f"method parameter text_dim={given}: --data {config.data} has text vectors of "
                f"{source.text.shape[1]} columns"
            )
        params["text_dim"] = int(source.text.shape[1])
    return params


def training_labels(source, split: Split, uses_labels: bool = True) -> torch.Tensor:
    """The (num_train, C) float labels of the training split; for a label-free method (num_train, 0),
    so that no label column is ever read for it."""
    if not uses_labels:
        return torch.zeros(len(split.train), 0)
    return torch.from_numpy(np.asarray(source.labels)[split.train]).float()


def load_run(run: str | Path, device: str = "cpu", **data: str) -> Experiment:
    """Rebuild a run's experiment (data, saved split, model, method) with its trained weights;
    `data` (data=, data_root=) overrides where the config says the data is."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise DmuhError(f"{run}: not a run directory (no {CONFIG})")
    unknown = sorted(set(data) - {"data", "data_root"})
    if unknown:
        raise TypeError(f"load_run: unexpected keyword {unknown[0]!r}")
    config = load_run_config(run, device=device, **data)
    checkpoint = load_checkpoint(run / CHECKPOINT)
    run_data = open_data(config, run)  # reloads and checks the saved split against the data
    # The one way a finished run's networks are rebuilt (`dmuh.retrieval.encoder.load_encoder` too).
    model, method, momentum = rebuild_networks(checkpoint, run / CHECKPOINT, run, config)
    return build_experiment(config, run_data, model, method, momentum=momentum)


def encode(
    model: torch.nn.Module,
    method: HashingMethod,
    inputs: torch.Tensor,
    pipeline: InputPipeline,
    execution: Execution,
) -> torch.Tensor:
    """Continuous codes (before sign) of `inputs`, float32 on CPU; networks in eval mode."""
    was_training = model.training
    model.eval()
    method.eval()  # methods with their own layers (e.g. OrthoHash's BatchNorm) encode in eval mode
    try:
        return run_network(lambda x: method.continuous_codes(model(x).float()), inputs, pipeline, execution)
    finally:
        model.train(was_training)
        method.train(was_training)


@torch.no_grad()
def reference_features(exp: Experiment) -> torch.Tensor:
    """The fixed representation of the training split that label-free methods preserve, float32 on
    CPU: the data's own vectors for feature data, else the backbone's features of the images (no
    augmentation, eval mode) as the network stands now (after --init)."""
    if exp.train_inputs.dim() == 2:
        return exp.train_inputs.float().cpu()
    was_training = exp.model.training
    exp.model.eval()
    try:
        return run_network(exp.model.features, exp.train_inputs, exp.pipeline, exp.execution)
    finally:
        exp.model.train(was_training)


def retrieval_network(exp: Experiment) -> torch.nn.Module:
    """The network whose codes are retrieved: the hashing network, or the momentum copy's when the
    method says so (`Requirements.retrieval_network`)."""
    if exp.requirements.retrieval_network == "momentum" and exp.momentum is not None:
        return exp.momentum.network
    return exp.model


def encode_part(exp: Experiment, part: str, positions: Optional[np.ndarray] = None) -> torch.Tensor:
    """Continuous codes of one part of the split ("query", "train", "database"), or of the items at
    `positions` of it, float32 on CPU, from the retrieval network in eval mode.

    Under torchrun each rank encodes a contiguous shard and the shards are gathered on every rank.
    """
    indices = getattr(exp.split, part)
    if positions is not None:
        indices = indices[positions]
    learned = exp.method.database_codes() if part == "database" and exp.requirements.database_codes else None
    if learned is None:
        return encode_items(exp, indices)
    # The method's learned codes of the training items (ADSH's V) for the database items that are
    # training items; the network encodes the others.
    train_order = np.argsort(exp.split.train)
    slots = np.searchsorted(exp.split.train, indices, sorter=train_order).clip(max=len(train_order) - 1)
    known = exp.split.train[train_order[slots]] == indices
    codes = torch.empty(len(indices), learned.shape[1])
    codes[torch.from_numpy(known)] = learned.detach().float().cpu()[torch.from_numpy(train_order[slots[known]])]
    if not known.all():
        codes[torch.from_numpy(~known)] = encode_items(exp, indices[~known])
    return codes


def encode_items(exp: Experiment, indices: np.ndarray) -> torch.Tensor:
    """Continuous codes of the source items `indices` from the retrieval network in eval mode,
    float32 on CPU; under torchrun each rank encodes a contiguous shard and all get the whole."""
    shards = np.array_split(np.arange(len(indices)), exp.context.world_size)
    mine = torch.from_numpy(indices[shards[exp.context.rank]])
    network = retrieval_network(exp)
    codes = encode(network, exp.method, exp.images[mine], exp.pipeline, exp.execution)
    return distributed.all_gather_uneven(exp.context, codes.to(exp.device)).cpu()


def encode_text_part(exp: Experiment, part: str, positions: Optional[np.ndarray] = None) -> torch.Tensor:
    """Continuous codes of the texts of one part of the split (cross-modal methods), float32 on CPU,
    from the method's text network in eval mode."""
    indices = getattr(exp.split, part)
    if positions is not None:
        indices = indices[positions]
    return encode_text_vectors(exp.method, torch.from_numpy(exp.source.text[indices]), exp.execution)


def encode_text_vectors(method: HashingMethod, text: torch.Tensor, execution: Execution) -> torch.Tensor:
    """Continuous codes of (n, V) text vectors by a cross-modal method's text network (eval mode)."""
    was_training = method.training
    method.eval()
    try:
        return run_network(
            method.encode_text, text, InputPipeline(None, None, "none"), execution, desc="encoding texts"
        )
    finally:
        method.train(was_training)


CROSS_MODAL_DIRECTIONS = ("i2t", "t2i")


def evaluate_cross_modal_map(exp: Experiment, ties: str = DEFAULT_TIES) -> dict:
    """{"i2t": MAP of image queries against the database's texts, "t2i": text queries against its
    images} of the protocol (MAP@all or MAP@k); NaN on data without labels."""
    if not exp.source.labeled:
        return {direction: float("nan") for direction in CROSS_MODAL_DIRECTIONS}
    images = encode_part(exp, "query"), encode_part(exp, "database")
    texts = encode_text_part(exp, "query"), encode_text_part(exp, "database")
    return {
        "i2t": _protocol_map(exp, images[0], texts[1], exp.split.query, exp.split.database, ties),
        "t2i": _protocol_map(exp, texts[0], images[1], exp.split.query, exp.split.database, ties),
    }


def _protocol_map(
    exp: Experiment,
    query: torch.Tensor,
    database: torch.Tensor,
    query_items: np.ndarray,
    database_items: np.ndarray,
    ties: str,
) -> float:
    """MAP (the protocol's @k, clipped to the database) of sign codes; rank 0 computes, all get it."""
    value = float("nan")
    if exp.context.is_main:
        labels = torch.from_numpy(np.asarray(exp.source.labels))
        topk = None if exp.split.topk is None else min(exp.split.topk, len(database_items))
        value = float(
            mean_average_precision(
                sign(query),
                sign(database),
                labels[query_items],
                labels[database_items],
                topk=topk,
                ties=ties,
                device=exp.device,
            )
        )
    return distributed.broadcast_float(exp.context, value, exp.device)


def evaluate_map(exp: Experiment, ties: str = DEFAULT_TIES) -> float:
    """MAP of the protocol (MAP@all or MAP@k) with sign codes of query and database; NaN on data
    without labels (nothing to score against)."""
    if not exp.source.labeled:
        return float("nan")
    query, database = encode_part(exp, "query"), encode_part(exp, "database")
    return _protocol_map(exp, query, database, exp.split.query, exp.split.database, ties)


def train_map_positions(exp: Experiment) -> np.ndarray:
    """The fixed training items whose MAP against the training split is logged (evenly spaced)."""
    count = min(int(exp.config.train_map_items), len(exp.split.train))
    return (
        np.unique(np.linspace(0, len(exp.split.train) - 1, count).round().astype(np.int64))
        if count
        else np.zeros(0, np.int64)
    )


def evaluate_train_map(exp: Experiment, ties: str = DEFAULT_TIES) -> float:
    """MAP of `train_map_positions` training items against the whole training split (Fig. 3's
    training curve: how well the codes fit the data they were trained on)."""
    positions = train_map_positions(exp)
    if len(positions) == 0 or not exp.source.labeled:
        return float("nan")
    database = encode_part(exp, "train")
    return _protocol_map(
        exp, database[torch.from_numpy(positions)], database, exp.split.train[positions], exp.split.train, ties
    )


@torch.no_grad()
def share_buffers(exp: Experiment) -> None:
    """Under torchrun, give every rank rank 0's buffers (BatchNorm running statistics) of the
    network and the momentum copy; a no-op in one process.

    Without SyncBatchNorm (the CPU, gloo) each rank's running statistics follow its own batches,
    so after an epoch the ranks hold different ones (DDP broadcasts rank 0's only at the start of
    the next forward pass). The MAP is encoded in shards, one per rank: without this it mixed
    codes of networks that differ from the checkpoint, which is rank 0's.
    """
    if not exp.context.enabled:
        return
    for module in (exp.model, exp.momentum):
        if module is not None:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)


@contextlib.contextmanager
def buffers_kept(*modules: torch.nn.Module) -> Iterator[None]:
    """Run networks in training mode for a measurement without moving their BatchNorm statistics."""
    saved = [[buffer.clone() for buffer in module.buffers()] for module in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(modules, saved):
                for buffer, value in zip(module.buffers(), buffers):
                    buffer.copy_(value)


@torch.no_grad()
def paired_codes(
    exp: Experiment, positions: np.ndarray, inputs: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Continuous codes (h, m) of the training items at `positions` (or of `inputs[positions]`,
    other items on the training device) from the hashing network and the momentum copy as the
    loss sees them: training mode (batch statistics, dropout as the method's reading says), no
    augmentation; nothing is updated.

    Batch statistics depend on the batch, so the batches are made like training batches: the
    items in a seeded random order (a split is often sorted by class, and a one-class batch
    shifts every output), and a batch smaller than `batch_size` is filled up with random
    training items whose outputs are dropped.
    """
    if exp.momentum is None:
        raise DmuhError(f"method {exp.config.method!r} keeps no momentum network, so it has no uncertainty")
    positions = np.asarray(positions, dtype=np.int64)
    items = exp.train_inputs if inputs is None else inputs
    rng = np.random.default_rng(0)
    order = rng.permutation(len(positions))
    num_train = exp.train_inputs.shape[0]
    size = max(exp.config.eval_batch_size, exp.config.batch_size)
    hashing = torch.empty(len(positions), exp.config.bits)
    momentum = torch.empty(len(positions), exp.config.bits)
    was_training = exp.model.training
    exp.model.train()
    try:
        with buffers_kept(exp.model, exp.momentum):
            for start in range(0, len(positions), size):
                mine = order[start : start + size]
                fill = rng.integers(0, num_train, max(0, min(exp.config.batch_size, num_train) - len(mine)))
                chosen = items[torch.from_numpy(positions[mine]).to(items.device)].to(exp.train_inputs.device)
                batch = torch.cat([chosen, exp.train_inputs[torch.from_numpy(fill).to(exp.train_inputs.device)]])
                x = memory_layout(exp.pipeline(batch), exp.config, exp.device)
                with autocast(exp.config, exp.device):
                    h, m = exp.momentum.paired(lambda: exp.model(x), x)  # noqa: B023 - called within this iteration
                keep = torch.from_numpy(mine)
                hashing[keep] = exp.method.continuous_codes(h.float()).cpu()[: len(mine)]
                momentum[keep] = exp.method.continuous_codes(m.float()).cpu()[: len(mine)]
    finally:
        exp.model.train(was_training)
    return hashing, momentum


def training_uncertainty(
    exp: Experiment,
    positions: np.ndarray,
    passes: int = 1,
    inputs: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Bit-level uncertainty |h - m| (Eq. 6) of the training items at `positions` (or of
    `inputs[positions]`, see `paired_codes`), (n, bits), as the loss sees it, averaged over
    `passes` (dropout readings draw new masks each pass); its mean over bits is the image-level
    uncertainty (Eq. 7). `progress` is called after each pass."""
    if passes < 1:
        raise ConfigError(f"passes {passes}: expected a positive integer", field="passes")
    total = None
    for _ in range(passes):
        h, m = paired_codes(exp, positions, inputs)
        if progress is not None:
            progress()
        u = (h - m).abs()
        total = u if total is None else total + u
    return total / passes
