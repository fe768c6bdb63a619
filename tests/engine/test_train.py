"""The training loop end to end on scikit-learn's digits (CPU, a few seconds per run)."""

import csv
import math

import numpy as np
import pytest
import torch

from dmuh.engine.pretrain import pretrain
from dmuh.engine.runtime import learning_rate
from dmuh.engine.trainer import train
from dmuh.errors import DmuhError
from dmuh.methods import HashingMethod, base
from dmuh.runs.config import PretrainConfig, TrainConfig
from dmuh.runs.layout import load_checkpoint
from dmuh.utils.registry import Entry


def digits_config(tmp_path, name="run", **overrides):
    values = dict(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        bits=16,
        epochs=3,
        batch_size=64,
        device="cpu",
        out=str(tmp_path / name),
        trace_items=4,
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quiet(line):
    pass


@pytest.mark.parametrize("method", ["regu", "dmuh"])
def test_training_learns_codes_better_than_chance(tmp_path, method):
    row = train(digits_config(tmp_path, method=method, epochs=8), progress=False, echo=quiet)
    # 10 balanced classes: random codes give MAP about 0.1.
    assert row["map"] > 0.5
    rows = read_rows(tmp_path / "run" / "log.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    columns = set(rows[0])
    assert {"loss", "likelihood", "quantization", "lr", "images_per_s"} <= columns
    if method == "dmuh":
        assert {"uncertainty", "bit_uncertainty", "image_uncertainty"} <= columns
        with np.load(tmp_path / "run" / "uncertainty_trace.npz") as trace:
            assert trace["hashing"].shape == (8, 4, 16) == trace["momentum"].shape
            assert trace["epochs"].tolist() == list(range(1, 9))


def test_resume_gives_the_same_next_epoch_as_an_uninterrupted_run(tmp_path):
    whole = digits_config(tmp_path, "whole", method="dmuh", epochs=3)
    train(whole, progress=False, echo=quiet)
    part = digits_config(tmp_path, "part", method="dmuh", epochs=3)

    def interrupt_after_epoch_2(line):
        if line.startswith("epoch 2 "):
            raise KeyboardInterrupt  # as a user's Ctrl-C after the epoch-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(part, progress=False, echo=interrupt_after_epoch_2)
    assert len(read_rows(tmp_path / "part" / "log.csv")) == 2
    train(part, resume=True, progress=False, echo=quiet)
    a, b = read_rows(tmp_path / "whole" / "log.csv"), read_rows(tmp_path / "part" / "log.csv")
    assert len(a) == len(b) == 3
    for key in ("loss", "likelihood", "quantization", "uncertainty"):
        assert float(a[2][key]) == pytest.approx(float(b[2][key]), rel=1e-5), key


def test_resume_with_sparse_checkpoints_restarts_from_the_last_one(tmp_path):
    whole = digits_config(tmp_path, "whole", method="dmuh", epochs=4)
    train(whole, progress=False, echo=quiet)
    part = digits_config(tmp_path, "part", method="dmuh", epochs=4, checkpoint_every=2)

    def interrupt_after_epoch_3(line):
        if line.startswith("epoch 3 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(part, progress=False, echo=interrupt_after_epoch_3)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")["epoch"] == 2
    train(part, resume=True, progress=False, echo=quiet)  # epoch 3 again, then 4
    a, b = read_rows(tmp_path / "whole" / "log.csv"), read_rows(tmp_path / "part" / "log.csv")
    assert [row["epoch"] for row in b] == ["1", "2", "3", "4"]
    for key in ("loss", "likelihood", "uncertainty"):
        assert float(a[3][key]) == pytest.approx(float(b[3][key]), rel=1e-5), key
    with np.load(tmp_path / "part" / "uncertainty_trace.npz") as trace:
        assert trace["epochs"].tolist() == [1, 2, 3, 4]


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path):
    config = digits_config(tmp_path, method="dmuh", epochs=2, checkpoint_every=5)

    def interrupt_after_epoch_1(line):
        if line.startswith("epoch 1 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, echo=interrupt_after_epoch_1)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    train(config, progress=False, echo=quiet)  # nothing to resume: the run starts again
    assert [row["epoch"] for row in read_rows(tmp_path / "run" / "log.csv")] == ["1", "2"]
    with np.load(tmp_path / "run" / "uncertainty_trace.npz") as trace:
        assert trace["epochs"].tolist() == [1, 2]


def test_checkpoint_every_must_be_positive(tmp_path):
    with pytest.raises(DmuhError, match="field 'checkpoint_every': expected an integer >= 1, got 0"):
        train(digits_config(tmp_path, epochs=1, checkpoint_every=0), progress=False, echo=quiet)


def test_existing_run_is_not_overwritten(tmp_path):
    config = digits_config(tmp_path, epochs=1)
    train(config, progress=False, echo=quiet)
    with pytest.raises(DmuhError, match="already holds a run"):
        train(config, progress=False, echo=quiet)


class ExplodingLoss(HashingMethod):
    def forward(self, step):
        return {"likelihood": step.outputs.sum() * 0, "quantization": step.outputs.sum() * float("inf")}


def test_non_finite_loss_stops_with_epoch_and_term(tmp_path, monkeypatch):
    monkeypatch.setitem(base.METHODS.entries, "exploding", Entry("exploding", ExplodingLoss))
    with pytest.raises(DmuhError, match=r"epoch 1: loss term .quantization. became non-finite at step 1"):
        train(digits_config(tmp_path, method="exploding", epochs=1), progress=False, echo=quiet)


def test_learning_rate_schedule_decays_from_lr_to_lr_end():
    config = TrainConfig(lr=0.05, lr_end=0.0005, epochs=10, warmup_epochs=1)
    assert learning_rate(config, 0.5) == pytest.approx(0.05 * 0.501)
    assert learning_rate(config, 1.0) == pytest.approx(0.05)
    assert learning_rate(config, 10.0) == pytest.approx(0.0005)
    assert 0.0005 < learning_rate(config, 5.0) < 0.05


def test_step_schedule_keeps_lr_for_a_third_then_lr_end():
    config = TrainConfig(lr=0.05, lr_end=0.0005, epochs=30, lr_schedule="step")
    assert [learning_rate(config, e) for e in (0.0, 9.99, 10.0, 29.0, 40.0)] == [0.05, 0.05, 0.0005, 0.0005, 0.0005]


def test_pretrain_then_init(tmp_path):
    pre = PretrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        objective="simclr+ce",
        epochs=1,
        batch_size=64,
        unlabeled_batch_size=128,
        device="cpu",
        out=str(tmp_path / "pre"),
    )
    row = pretrain(pre, progress=False, echo=quiet)
    assert math.isfinite(row["cross_entropy"]) and math.isfinite(row["contrastive"])
    assert (tmp_path / "pre" / "backbone.safetensors").is_file()
    config = digits_config(tmp_path, init=str(tmp_path / "pre"), epochs=1)
    assert math.isfinite(train(config, progress=False, echo=quiet)["map"])
    # A different query split could have leaked query images into pre-training: refused.
    other = digits_config(tmp_path, "other", init=str(tmp_path / "pre"), split_seed=1, epochs=1)
    with pytest.raises(DmuhError, match="different query split"):
        train(other, progress=False, echo=quiet)


def test_init_errors(tmp_path):
    with pytest.raises(DmuhError, match="no such run directory or weights file"):
        train(digits_config(tmp_path, init=str(tmp_path / "missing")), progress=False, echo=quiet)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(DmuhError, match="init weights .*wrong.pth do not fit model .smallcnn.: missing keys"):
        train(digits_config(tmp_path, "b", init=str(wrong)), progress=False, echo=quiet)


def test_a_loss_rising_three_epochs_in_a_row_warns_once():
    from types import SimpleNamespace

    from dmuh.engine.trainer import Trainer

    lines = []
    trainer = SimpleNamespace(log=[], main_process=True, echo=lines.append, RISING_EPOCHS=Trainer.RISING_EPOCHS)
    for loss in (0.6, 1.0, 0.9, 1.1, 1.2):  # falls once, then rises twice: no warning yet
        trainer.log.append({"loss": loss})
        Trainer.watch_loss(trainer)
    assert lines == []
    for loss in (1.3, 1.4, 1.5):
        trainer.log.append({"loss": loss})
        Trainer.watch_loss(trainer)
    assert len(lines) == 1 and "rose 3 epochs in a row (0.9000 -> 1.3000)" in lines[0]


def test_the_default_start_warms_up_half_the_epochs_then_trains_the_backbone_ten_times_slower(tmp_path):
    from dmuh.engine.pretrain import backbone_lr_scale_of, warmup_epochs_of
    from dmuh.engine.trainer import make_optimizer
    from dmuh.methods import create_method
    from dmuh.models import create_model

    assert warmup_epochs_of(TrainConfig(epochs=50)) == 25
    assert warmup_epochs_of(TrainConfig(epochs=1)) == 1
    assert warmup_epochs_of(TrainConfig(epochs=50, init_epochs=3)) == 3
    assert backbone_lr_scale_of(TrainConfig()) == 0.1  # --init auto
    assert backbone_lr_scale_of(TrainConfig(init="scratch")) == 1.0
    assert backbone_lr_scale_of(TrainConfig(init=str(tmp_path))) == 1.0  # a pretrain run keeps the full rate
    assert backbone_lr_scale_of(TrainConfig(backbone_lr_scale=1.0)) == 1.0
    model = create_model("mlp", bits=4, input_dim=3, hidden=[5])
    method = create_method("regu", bits=4, num_train=2, num_classes=2)
    groups = make_optimizer(TrainConfig(lr=0.05), model, method).param_groups
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[1]["params"]} >= {id(p) for p in model.hash_layer.parameters()}
    lines = []
    train(
        digits_config(tmp_path, epochs=4, method="regu", trace_items=0, train_map_items=0),
        progress=False,
        echo=lines.append,
    )
    assert any(line.startswith("init auto: 2 epochs of cross-entropy warm-up") for line in lines), lines
