"""`dmuh inspect` and `--label-noise` on tiny runs (digits images, small feature vectors; CPU, seconds)."""

import csv
import json

import numpy as np
import pytest
import torch

from dmuh.cli import main
from dmuh.codes.file import Codes
from dmuh.data.noise import LabelNoise, flip_labels
from dmuh.errors import DmuhError
from dmuh.studies.inspect import detection_scores, pairwise_loss, rank_average


def train(*args):
    assert (
        main(
            [
                "train",
                *map(str, args),
                "--eval-every",
                "-1",
                "--trace-items",
                "0",
                "--train-map-items",
                "0",
                "--init",
                "scratch",
                "--cache-dir",
                "off",
                "--quiet",
            ]
        )
        == 0
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """DMUH on digits, a network without dropout (the eval reading), 10% of the labels flipped."""
    out = tmp_path_factory.mktemp("inspect") / "digits"
    train(
        "--data",
        "digits",
        "--protocol",
        "per-class",
        "--protocol-param",
        "query_per_class=5",
        "--protocol-param",
        "train_per_class=30",
        "--model",
        "smallcnn",
        "--model-param",
        "input_size=8",
        "--model-param",
        "width=8",
        "--method",
        "dmuh",
        "--bits",
        12,
        "--epochs",
        1,
        "--batch-size",
        50,
        "--label-noise",
        0.1,
        "--label-noise-seed",
        5,
        "--out",
        out,
    )
    return out


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 60)
    features = rng.normal(size=(4, 16))[labels] + 0.8 * rng.normal(size=(240, 16))
    path = tmp_path_factory.mktemp("vectors") / "vectors.npz"
    np.savez(path, features=features.astype(np.float32), labels=labels)
    return f"features:{path}"


def feature_run(out, data, method):
    """An MLP with dropout on feature vectors: the training reading."""
    train(
        "--data",
        data,
        "--protocol",
        "per-class",
        "--protocol-param",
        "query_per_class=10",
        "--protocol-param",
        "train_per_class=30",
        "--model",
        "mlp",
        "--model-param",
        "hidden=[32]",
        "--model-param",
        "dropout=0.5",
        "--method",
        method,
        "--bits",
        8,
        "--epochs",
        2,
        "--batch-size",
        40,
        "--out",
        out,
    )
    return out


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory, vectors):
    return feature_run(tmp_path_factory.mktemp("inspect") / "vectors-dmuh", vectors, "dmuh")


@pytest.fixture(scope="module")
def regu_run(tmp_path_factory, vectors):
    return feature_run(tmp_path_factory.mktemp("inspect") / "vectors-regu", vectors, "regu")


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(capsys, argv, needle):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


# -- label noise ---------------------------------------------------------------------------------


def test_flips_exactly_the_share_to_another_class_and_is_seeded():
    classes = np.random.default_rng(1).integers(0, 10, 1000)
    labels = np.eye(10, dtype=np.uint8)[classes]
    for rate in (0.1, 0.2, 0.0, 1.0):
        noisy, flipped = flip_labels(labels, rate, seed=7)
        assert noisy.shape == labels.shape and noisy.dtype == labels.dtype and (noisy.sum(1) == 1).all()
        changed = np.flatnonzero(noisy.argmax(1) != classes)
        assert len(flipped) == round(rate * 1000) and np.array_equal(changed, flipped)  # never to the same class
    again, flipped_again = flip_labels(labels, 0.2, seed=7)
    assert np.array_equal(again, flip_labels(labels, 0.2, seed=7)[0])
    assert not np.array_equal(flipped_again, flip_labels(labels, 0.2, seed=8)[1])
    # Every other class is reachable: the new classes of 2,000 flips cover all nine of class 0's others.
    zeros = np.eye(10, dtype=np.uint8)[np.zeros(2000, dtype=int)]
    assert set(flip_labels(zeros, 1.0, seed=0)[0].argmax(1)) == set(range(1, 10))
    assert len(flip_labels(labels[:7], 0.2, 0)[1]) == 1  # round(1.4)


def test_multi_label_and_bad_rates_are_refused():
    with pytest.raises(DmuhError, match="item 1 has 2 labels"):
        flip_labels(np.array([[1, 0], [1, 1]]), 0.5)
    with pytest.raises(DmuhError, match="between 0 and 1"):
        flip_labels(np.eye(3), 1.5)
    with pytest.raises(DmuhError, match="one class"):
        flip_labels(np.ones((4, 1)), 0.5)


def test_the_run_records_its_flips_and_trains_on_them(digits_run, tmp_path, capsys):
    from dmuh.engine.builder import load_run

    noise = LabelNoise.load(digits_run / "label_noise.json")
    assert (noise.rate, noise.seed, len(noise.positions)) == (0.1, 5, 30)
    exp = load_run(digits_run)
    clean = np.asarray(exp.source.labels)[exp.split.train]
    trained = exp.train_labels.numpy()
    assert np.array_equal(np.flatnonzero((trained != clean).any(1)), noise.positions)
    assert np.array_equal(exp.method.memory.labels.numpy(), trained)  # the method learned from the noisy labels
    # A run directory's record is kept: another seed in the same --out is refused.
    one_line_error(
        capsys,
        [
            "train",
            "--data",
            "digits",
            "--protocol",
            "per-class",
            "--protocol-param",
            "query_per_class=5",
            "--protocol-param",
            "train_per_class=30",
            "--model",
            "smallcnn",
            "--model-param",
            "input_size=8",
            "--method",
            "dmuh",
            "--label-noise",
            "0.1",
            "--label-noise-seed",
            "6",
            "--epochs",
            "2",
            "--resume",
            "--out",
            digits_run,
            "--quiet",
        ],
        "made with label noise 0.1 (seed 5)",
    )
    one_line_error(
        capsys,
        ["train", "--method", "itq", "--label-noise", "0.1", "--out", tmp_path / "x", "--quiet"],
        "learns without labels",
    )
    one_line_error(capsys, ["train", "--label-noise", "2", "--out", tmp_path / "y", "--quiet"], "--label-noise")


# -- inspect -------------------------------------------------------------------------------------


def test_inspect_matches_encode_and_reports_the_flips(digits_run, tmp_path, capsys):
    out = tmp_path / "review"
    assert main(["inspect", str(digits_run), "--out", str(out), "--top", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "eval reading (one pass)" in printed and "flipped labels found by loss: AUROC" in printed
    rows = read_rows(out / "items.csv")
    assert len(rows) == 300 and (out / "gallery.png").stat().st_size > 0
    u = np.array([float(r["uncertainty"]) for r in rows])
    assert (np.diff(u) <= 0).all() and [int(r["rank"]) for r in rows] == list(range(1, 301))
    # The numbers `dmuh encode --uncertainty` stores for the same images.
    assert (
        main(
            [
                "encode",
                "--run",
                str(digits_run),
                "--images",
                "digits",
                "--uncertainty",
                "--out",
                str(tmp_path / "codes.npz"),
            ]
        )
        == 0
    )
    codes = Codes.load(tmp_path / "codes.npz")
    index = np.array([int(r["index"]) for r in rows])
    np.testing.assert_allclose(u, codes.uncertainty[index], rtol=1e-6, atol=0)
    noise = LabelNoise.load(digits_run / "label_noise.json")
    flipped = {int(r["position"]) for r in rows if r["flipped"] == "1"}
    assert flipped == set(noise.positions.tolist())
    assert all((r["label"] != r["original_label"]) == (r["flipped"] == "1") for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reading"] == "eval" and summary["label_noise"]["flipped_items"] == 30
    assert set(summary["label_noise"]["detection"]) == {"uncertainty", "loss", "rank_average"}
    # Existing outputs need --force; --top 0 and a missing run are one line each.
    one_line_error(capsys, ["inspect", digits_run, "--out", out], "already exists; pass --force")
    assert main(["inspect", str(digits_run), "--out", str(out), "--force", "--sort", "loss", "--quiet"]) == 0
    loss = [float(r["loss"]) for r in read_rows(out / "items.csv")]
    assert loss == sorted(loss, reverse=True)
    one_line_error(
        capsys, ["inspect", digits_run, "--out", tmp_path / "b", "--top", "0"], "--top 0: expected a positive integer"
    )
    one_line_error(capsys, ["inspect", tmp_path / "nothing", "--out", tmp_path / "c"], "not a run directory")
    one_line_error(capsys, ["inspect", digits_run], "--out DIR is required")
    one_line_error(
        capsys,
        ["inspect", digits_run, "--out", tmp_path / "d", "--reading", "eval", "--passes", "2"],
        "--passes applies to --reading training",
    )


def test_vectors_get_the_training_reading_and_no_gallery(vector_run, tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["inspect", "--run", str(vector_run), "--out", str(out), "--passes", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "no gallery" in printed and "training reading (3 passes)" in printed
    assert not (out / "gallery.png").exists()
    rows = read_rows(out / "items.csv")
    assert len(rows) == 120 and "flipped" not in rows[0] and rows[0]["id"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reading"] == "training" and summary["passes"] == 3 and summary["uncertainty"]["median"] > 0.01
    # --reading eval on the same run is `dmuh encode --uncertainty`'s number, far smaller without dropout.
    assert (
        main(
            [
                "inspect",
                str(vector_run),
                "--out",
                str(tmp_path / "e"),
                "--reading",
                "eval",
                "--split",
                "query",
                "--quiet",
            ]
        )
        == 0
    )
    rows = read_rows(tmp_path / "e" / "items.csv")
    data = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert len(rows) == 40 and data["split"] == "query"
    assert (
        main(
            [
                "encode",
                "--run",
                str(vector_run),
                "--images",
                str(_config_data(vector_run)),
                "--uncertainty",
                "--out",
                str(tmp_path / "codes.npz"),
            ]
        )
        == 0
    )
    codes = Codes.load(tmp_path / "codes.npz")
    np.testing.assert_allclose(
        [float(r["uncertainty"]) for r in rows], codes.uncertainty[[int(r["index"]) for r in rows]], rtol=1e-6
    )


def _config_data(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]


def test_a_run_without_momentum_copy_gets_the_loss_only(regu_run, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["inspect", str(regu_run), "--out", str(out), "--split", "database", "--quiet"]) == 0
    assert "keeps no momentum copy: no uncertainty, items sorted by loss" in capsys.readouterr().out
    rows = read_rows(out / "items.csv")
    assert "uncertainty" not in rows[0] and len(rows) == 200
    loss = [float(r["loss"]) for r in rows]
    assert loss == sorted(loss, reverse=True)
    for flags in (["--sort", "uncertainty"], ["--reading", "training"]):
        one_line_error(capsys, ["inspect", regu_run, "--out", tmp_path / "s", *flags], "keeps no momentum copy")


def test_pairwise_loss_is_the_dpsh_likelihood_against_the_other_training_items():
    torch.manual_seed(0)
    codes, labels = torch.tanh(torch.randn(5, 6)), torch.eye(3)[[0, 1, 2, 0, 1]]
    self_positions = np.array([0, 1, 2, 3, 4])
    loss = pairwise_loss(codes, labels, codes, labels, self_positions)
    expected = []
    for i in range(5):
        terms = []
        for j in range(5):
            if j != i:
                theta = float(codes[i] @ codes[j]) / 2
                terms.append(np.log1p(np.exp(theta)) - float(labels[i] @ labels[j] > 0) * theta)
        expected.append(np.mean(terms))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # An item outside the training set is scored against all of it.
    outside = pairwise_loss(codes[:1], labels[:1], codes, labels, np.array([-1]))
    assert outside[0] != pytest.approx(loss[0])


def test_detection_scores_and_rank_average():
    positive = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    perfect = detection_scores(np.arange(10)[::-1], positive)
    assert perfect["auroc"] == 1.0 and perfect["top"] == 1 and perfect["top_precision"] == 1.0
    assert detection_scores(np.arange(10), positive)["auroc"] == 0.0
    np.testing.assert_allclose(rank_average([3, 1, 2], [1, 2, 3]), [2.0, 1.5, 2.5])


def test_inspect_and_the_figure_say_which_uncertainty_reading_they_print(capsys, tmp_path):
    """The same items get other numbers from `dmuh inspect` and `dmuh figure uncertainty`: both say why."""
    from dmuh.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--protocol",
                "digits",
                "--model",
                "smallcnn",
                "--model-param",
                "input_size=8",
                "--model-param",
                "dropout=0.5",
                "--method",
                "dmuh",
                "--epochs",
                "1",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(run), "--out", str(tmp_path / "review"), "--reading", "eval", "--quiet"]) == 0
    assert "uncertainty values depend on the reading" in capsys.readouterr().out
    assert main(["figure", "uncertainty", "--run", str(run), "--out", str(tmp_path / "fig")]) == 0
    assert "so its values for the same items differ" in capsys.readouterr().out
