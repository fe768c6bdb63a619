"""A run's numbers agree wherever they are read: the training log's MAP is `dmuh evaluate`'s, the codes
of `dmuh encode` are the evaluation's, bit for bit, and `dmuh export-onnx` takes the size the network
was trained at; free-size models train at the images' own size (CPU, tiny runs)."""

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmuh.engine.trainer as train_module
from dmuh.cli import main
from dmuh.codes.binary import pack_bits, sign
from dmuh.codes.file import Codes
from dmuh.engine.builder import encode_part, evaluate_train_map, load_run, trained_model
from dmuh.engine.runtime import build_model
from dmuh.engine.trainer import train
from dmuh.models import create_model
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import CHECKPOINT, LOG, load_checkpoint, read_log
from dmuh.studies.evaluate import evaluate_run

SIZE = 64  # not 32, the default size of the free-size models (and larger: resizing to 32 would lose detail)
# BatchNorm (conv blocks and hash_norm) and dropout (the fc head): everything finish_epoch could move.
SMALL = {"width": 8, "fc": [32], "dropout": 0.5}


def quiet(line):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these networks are tiny, and on a shared CPU more threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def state(exp):
    tensors = {f"model.{k}": v for k, v in exp.model.state_dict().items()}
    tensors.update({f"method.{k}": v for k, v in exp.method.state_dict().items()})
    if exp.momentum is not None:
        tensors.update({f"momentum.{k}": v for k, v in exp.momentum.state_dict().items()})
    return {k: v.detach().clone() for k, v in tensors.items()}


# -- the training log's MAP is dmuh evaluate's (task 2) ----------------------------------------------


@pytest.mark.parametrize("method", ["dmuh", "regu"])
def test_logged_map_is_the_evaluated_map(tmp_path, method, monkeypatch):
    changed = []
    finish = train_module.Trainer.finish_epoch

    def watched(self, row, evaluate):  # nothing after the epoch may move a weight or a buffer
        before = state(self.exp)
        result = finish(self, row, evaluate)
        after = state(self.exp)
        changed.extend(k for k in before if not torch.equal(before[k], after[k]))
        return result

    monkeypatch.setattr(train_module.Trainer, "finish_epoch", watched)
    run = tmp_path / method
    config = TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params=SMALL,
        method=method,
        bits=16,
        epochs=2,
        batch_size=64,
        device="cpu",
        init="scratch",
        out=str(run),
        trace_items=16,
        train_map_items=200,
    )
    train(config, progress=False, echo=quiet)
    assert changed == []
    row = read_log(run / LOG)[-1]
    report = evaluate_run(run)
    assert report["map_by_ties"][row["ties"]]["map"] == row["map"]
    exp = load_run(run)
    assert exp.model.input_size == 8  # digits at their own 8x8 (task 3)
    assert evaluate_train_map(exp, row["ties"]) == row["train_map"]


def _torchrun_rank(rank, init_file, out, errors):
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        config = TrainConfig(
            data="digits",
            protocol="digits",
            model="smallcnn",
            model_params={**SMALL, "width": 4},
            method="dmuh",
            bits=16,
            epochs=1,
            batch_size=32,
            device="cpu",
            init="scratch",
            out=out,
            trace_items=8,
            train_map_items=100,
        )
        train(config, progress=False, echo=quiet)
        torch.distributed.destroy_process_group()
        errors.put((rank, None))
    except BaseException as error:  # reported to the test, never a hung child
        errors.put((rank, repr(error)))


def test_logged_map_is_the_evaluated_map_under_torchrun(tmp_path):
    """Two gloo ranks (forked, so no second import of torch): without SyncBatchNorm each rank's running
    statistics follow its own batches; the MAP, encoded in shards, must still be the checkpoint's."""
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    run = tmp_path / "ddp"
    ranks = [
        context.Process(target=_torchrun_rank, args=(rank, str(tmp_path / "init"), str(run), errors))
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    try:
        results = dict(errors.get(timeout=240) for _ in ranks)
    finally:
        for process in ranks:
            process.join(30)
            if process.is_alive():
                process.kill()
    assert results == {0: None, 1: None}
    row = read_log(run / LOG)[-1]
    assert evaluate_run(run)["map_by_ties"][row["ties"]]["map"] == row["map"]


# -- encode and export-onnx at the run's own size (tasks 1 and 3) -------------------------------------


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A DMUH run on an ImageFolder of 64x64 PNGs (two class folders), image_size unset: the native size."""
    root = tmp_path_factory.mktemp("folder")
    images = root / "images"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (images / name).mkdir(parents=True)
        for i in range(135):  # the digits protocol: 30 query and 100 train per class
            # A random 4x4 colour grid (what tells images apart) plus pixel noise (what resizing changes).
            grid = rng.uniform(0, 255, (4, 4, 3)).repeat(SIZE // 4, axis=0).repeat(SIZE // 4, axis=1)
            pixels = np.clip(grid + rng.normal(0, 50, grid.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / name / f"{i:03d}.png")
    run = root / "run"
    # A small learning rate keeps the codes spread (a converged run gives every image of a class one
    # code, which hides a resized input); the test is about where the codes come from, not their quality.
    config = TrainConfig(
        data=str(images),
        protocol="digits",
        model="smallcnn",
        model_params={"width": 8},
        method="dmuh",
        bits=16,
        epochs=1,
        batch_size=32,
        lr=0.001,
        lr_end=0.001,
        device="cpu",
        init="scratch",
        out=str(run),
        trace_items=4,
        train_map_items=0,
        cache_dir=str(root / "cache"),
    )
    train(config, progress=False, echo=quiet)
    return run, images


def test_a_free_size_model_trains_and_is_recorded_at_the_images_size(folder_run):
    run, _ = folder_run
    assert load_checkpoint(run / CHECKPOINT)["model_config"]["input_size"] == SIZE
    assert load_run(run).model.input_size == SIZE


def test_encode_gives_the_evaluation_codes_of_a_native_size_run(folder_run, tmp_path):
    run, images = folder_run
    out = tmp_path / "codes.npz"
    assert main(["encode", "--run", str(run), "--images", str(images), "--out", str(out)]) == 0
    codes = Codes.load(out)
    exp = load_run(run)
    assert codes.ids == list(exp.source.ids)
    database = pack_bits(sign(encode_part(exp, "database")).numpy())
    assert len(np.unique(database, axis=0)) > len(database) // 10  # spread codes, which a resized input changes
    np.testing.assert_array_equal(codes.packed[exp.split.database], database)
    assert codes.image_size == SIZE


def test_export_onnx_takes_the_run_size(folder_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    run, _ = folder_run
    out = tmp_path / "hashing.onnx"
    assert main(["export-onnx", "--run", str(run), "--out", str(out)]) == 0
    model = onnx.load(str(out))
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, SIZE, SIZE]
    assert {p.key: p.value for p in model.metadata_props}["image_size"] == str(SIZE)


def test_old_runs_rebuild_at_the_size_they_were_trained_at(folder_run):
    run, _ = folder_run
    exp = load_run(run)
    config, images = exp.config, exp.images
    recorded = load_checkpoint(run / CHECKPOINT)["model_config"]
    older = {k: v for k, v in recorded.items() if k != "input_size"}  # before checkpoints recorded it
    assert trained_model(config, images, run, {"model_config": older}).input_size == 32
    assert create_model(**older).input_size == 32  # what `dmuh encode` rebuilds (dmuh.runs.layout.rebuild_networks)
    assert trained_model(config, images, run, {}).input_size == 32  # a checkpoint without model_config
    assert trained_model(config, images, Path(run) / "new").input_size == SIZE  # a new run
    # An input_size the user sets wins; fixed-size models keep theirs.
    assert build_model(TrainConfig(model="smallcnn", model_params={"input_size": 24}), images).input_size == 24
    assert build_model(TrainConfig(model="resnet18-32"), images).input_size == SIZE
    assert build_model(TrainConfig(model="resnet18"), images).input_size == 224
