"""`dmuh figure uncertainty|curves|topk` on tiny digits runs: PNGs that open, tables equal to the
run's files (log.csv, uncertainty_trace.npz) and to dmuh.metrics.ranking computed directly."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmuh.cli import main
from dmuh.codes.binary import sign
from dmuh.engine import builder as experiment
from dmuh.engine.trainer import train
from dmuh.metrics.ranking import DEFAULT_TIES, precision_at_k
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import read_log
from dmuh.studies.figures import TABLE_KS, bit_change, choose_bits, run_topk, topk_ks


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks train several times faster on one thread than on cores shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_run(root, method, **overrides):
    values = dict(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        method=method,
        bits=8,
        epochs=3,
        batch_size=64,
        eval_every=1,
        device="cpu",
        trace_items=6,
        out=str(root / method),
    )
    values.update(overrides)
    train(TrainConfig(**values), progress=False, echo=lambda line: None)
    return Path(values["out"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("figure-runs")
    return {"dmuh": digits_run(root, "dmuh"), "regu": digits_run(root, "regu")}


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("figure-features")
    digits = load_digits()
    np.savez(root / "digits.npz", features=(digits.data / 16.0).astype(np.float32), labels=digits.target)
    train(
        TrainConfig(
            data=f"features:{root / 'digits.npz'}",
            protocol="digits",
            model="mlp",
            hash_norm="none",
            method="dmuh",
            bits=8,
            epochs=2,
            batch_size=128,
            eval_every=1,
            device="cpu",
            trace_items=4,
            out=str(root / "run"),
        ),
        progress=False,
        echo=lambda line: None,
    )
    return root / "run"


def tables(path):
    """{heading: [row dicts]} of every markdown table in the file (the nearest heading above it)."""
    result, heading, lines = {}, None, path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            result[heading] = rows
            continue
        i += 1
    return result


def check_png(path):
    assert path.is_file()
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def close(cell, value, digits=4):
    return abs(float(cell) - value) <= 0.5 * 10**-digits + 1e-12


def test_choose_bits_takes_the_most_and_least_changing():
    rng = np.random.default_rng(0)
    hashing = rng.normal(size=(5, 3, 6)) * np.array([0.1, 2.0, 0.5, 0.01, 1.0, 0.3])
    assert choose_bits(hashing, 2) == ([1, 3], ["most-changing", "least-changing"])
    assert choose_bits(hashing, 3)[0] == [1, 4, 3]
    assert choose_bits(hashing, 1)[0] == [1]
    assert np.allclose(bit_change(hashing), np.abs(np.diff(hashing, axis=0)).mean(axis=(0, 1)))
    single = choose_bits(hashing[:1], 2)[0]
    assert len(set(single)) == 2  # one epoch: no change, still two different bits


def test_topk_ks_include_both_ends():
    for spacing in ("linear", "log"):
        ks = topk_ks(5000, 50, spacing)
        assert ks[0] == 1 and ks[-1] == 5000 and 40 <= len(ks) <= 52 and np.all(np.diff(ks) > 0)
    assert topk_ks(1, 50).tolist() == [1]


def test_uncertainty_figure_matches_the_trace(runs, tmp_path, monkeypatch, capsys):
    seen = {}
    real = experiment.training_uncertainty

    def recording(exp, positions, passes=1):
        seen["positions"] = np.asarray(positions)
        seen["u"] = real(exp, positions, passes=passes)
        return seen["u"]

    monkeypatch.setattr(experiment, "training_uncertainty", recording)
    out = tmp_path / "fig1"
    assert main(["figure", "uncertainty", "--run", str(runs["dmuh"]), "--gallery", "3", "--out", str(out)]) == 0
    check_png(tmp_path / "fig1.png")
    md = tables(tmp_path / "fig1.md")
    with np.load(runs["dmuh"] / "uncertainty_trace.npz") as f:
        items, hashing, momentum = f["items"], f["hashing"], f["momentum"]
    change = np.abs(np.diff(hashing, axis=0)).mean(axis=(0, 1))
    final = np.abs(hashing[-1] - momentum[-1])

    bits = md["Bits shown"]
    assert [int(r["bit"]) for r in bits] == [int(np.argmax(change)), int(np.argmin(change))]
    assert [r["role"] for r in bits] == ["most-changing", "least-changing"]
    for row in bits:
        b = int(row["bit"])
        assert close(row["mean abs change per epoch"], change[b])
        assert close(row[next(k for k in row if k.startswith("mean u at epoch"))], final[:, b].mean(), 6)

    per_item = md[next(k for k in md if k.startswith("Final-epoch outputs"))]
    assert len(per_item) == 2 * 4  # two bits, four plotted items
    for row in per_item:
        b, t = int(row["bit"]), int(row["trace item"])
        assert int(row["train position"]) == items[t]
        assert close(row["h"], hashing[-1, t, b], 6) and close(row["m"], momentum[-1, t, b], 6)
        assert close(row["u"], final[t, b], 6)

    image_u = seen["u"].detach().float().numpy().astype(np.float64).mean(axis=1)
    train_items = len(json.loads((runs["dmuh"] / "split.json").read_text())["train"])
    assert sorted(seen["positions"].tolist()) == list(range(train_items)) and len(image_u) == train_items
    summary = {r["statistic"]: r["value"] for r in md["Image-level uncertainty of the training items"]}
    assert close(summary["min"], image_u.min(), 6) and close(summary["max"], image_u.max(), 6)
    assert close(summary["median"], float(np.median(image_u)), 6)
    gallery = md["Gallery"]
    assert [r["group"] for r in gallery] == ["lowest"] * 3 + ["highest"] * 3
    order = np.argsort(image_u, kind="stable")
    assert [int(r["train position"]) for r in gallery] == order[:3].tolist() + order[-3:].tolist()
    assert "wrote" in capsys.readouterr().out


def test_uncertainty_of_a_feature_run_skips_the_gallery(feature_run, tmp_path):
    out = tmp_path / "features"
    assert main(["figure", "uncertainty", "--run", str(feature_run), "--out", str(out)]) == 0
    check_png(tmp_path / "features.png")
    text = (tmp_path / "features.md").read_text()
    md = tables(tmp_path / "features.md")
    assert "Gallery" not in md and "gallery skipped" in text
    assert len(md["Bits shown"]) == 2 and len(md["Image-level uncertainty of the training items"]) == 3


def test_curves_equal_the_logs(runs, tmp_path):
    out = tmp_path / "fig3"
    assert main(["figure", "curves", "--run", str(runs["dmuh"]), "--run", str(runs["regu"]), "--out", str(out)]) == 0
    check_png(tmp_path / "fig3.png")
    md = tables(tmp_path / "fig3.md")
    assert len(md) == 2
    for (heading, rows), method in zip(md.items(), ("dmuh", "regu")):
        assert heading.startswith(f"Run {1 if method == 'dmuh' else 2}: {method}")
        log = [r for r in read_log(runs[method] / "log.csv") if not math.isnan(r["map"])]
        assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in log] == [1, 2, 3]
        for row, expected in zip(rows, log):
            for key in ("loss", "map", "train_map"):
                assert row[key] == f"{expected[key]:.4f}"
            assert row["ties"] == expected["ties"] == DEFAULT_TIES
    assert "tie policy of map: expected" in (tmp_path / "fig3.md").read_text()


def test_curves_without_a_train_map_column_say_so(runs, tmp_path):
    old = tmp_path / "old-run"
    old.mkdir()
    shutil.copy(runs["regu"] / "config.yaml", old / "config.yaml")
    with open(runs["regu"] / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c != "train_map"]
    with open(old / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["figure", "curves", "--run", str(old)]) == 0  # default output next to the run
    check_png(old / "figure-curves.png")
    text = (old / "figure-curves.md").read_text()
    assert "no train_map column" in text
    rows_md = next(iter(tables(old / "figure-curves.md").values()))
    assert all(r["train_map"] == "n/a" for r in rows_md) and len(rows_md) == 3


def test_topk_equals_precision_at_k(runs, tmp_path):
    out = tmp_path / "fig4"
    assert (
        main(
            [
                "figure",
                "topk",
                "--run",
                str(runs["dmuh"]),
                "--run",
                str(runs["regu"]),
                "--max-k",
                "300",
                "--points",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    check_png(tmp_path / "fig4.png")
    rows = next(iter(tables(tmp_path / "fig4.md").values()))
    assert [r["method"] for r in rows] == ["dmuh", "regu"]
    for row, method in zip(rows, ("dmuh", "regu")):
        exp = experiment.load_run(runs[method])
        size = len(exp.split.database)
        labels = np.asarray(exp.source.labels)
        ks = [k for k in TABLE_KS if k <= size]
        expected = precision_at_k(
            sign(experiment.encode_part(exp, "query")),
            sign(experiment.encode_part(exp, "database")),
            labels[exp.split.query],
            labels[exp.split.database],
            ks,
            ties=DEFAULT_TIES,
        )
        assert int(row["database"]) == size
        for k, value in zip(ks, expected):
            assert row[f"P@{k}"] == f"{value:.4f}"
        assert all(row.get(f"P@{k}", "n/a") == "n/a" for k in TABLE_KS if k > size)
        if method == "dmuh":
            result = run_topk(runs[method], max_k=300, points=10)
            assert result.ks[0] == 1 and result.ks[-1] == 300
            direct = precision_at_k(
                sign(experiment.encode_part(exp, "query")),
                sign(experiment.encode_part(exp, "database")),
                labels[exp.split.query],
                labels[exp.split.database],
                result.ks.tolist(),
                ties=DEFAULT_TIES,
            )
            assert np.allclose(result.precision, direct, rtol=0, atol=1e-12)


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["figure", "uncertainty", "--run", str(runs["regu"]), "--out", str(tmp_path / "x")]) == 2
    assert "DMUH" in error_line(capsys)
    assert main(["figure", "curves", "--run", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in error_line(capsys)
    assert main(["figure", "topk", "--run", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in error_line(capsys)
    assert main(["figure", "curves"]) == 2
    assert "--run RUN is required" in error_line(capsys)
    out = tmp_path / "again"
    assert main(["figure", "curves", "--run", str(runs["regu"]), "--out", str(out)]) == 0
    capsys.readouterr()
    before = (tmp_path / "again.md").read_text()
    assert main(["figure", "curves", "--run", str(runs["regu"]), "--out", str(out)]) == 2
    assert "--force" in error_line(capsys)
    assert (
        main(["figure", "curves", "--run", str(runs["regu"]), "--run", str(runs["dmuh"]), "--out", str(out), "--force"])
        == 0
    )
    assert (tmp_path / "again.md").read_text() != before
