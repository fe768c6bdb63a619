"""`dmuh encode --shards`: shards and a manifest equal to one codes file, and a rerun that encodes
only the missing shards (after deleting one, after a killed encode). torchrun: test_encode_torchrun.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dmuh.cli import main
from dmuh.codes.file import MANIFEST, Codes, read_manifest
from dmuh.engine.trainer import train
from dmuh.runs.config import TrainConfig
from dmuh.utils.io import file_sha256


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "regu"
    config = TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8, "width": 8},
        method="regu",
        bits=16,
        epochs=1,
        batch_size=100,
        out=str(out),
        eval_every=-1,
        trace_items=0,
    )
    train(config, progress=False, echo=lambda line: None)
    return out


@pytest.fixture(scope="module")
def one_file(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "digits.npz"
    assert main(["encode", "--run", str(run), "--images", "digits", "--out", str(out), "--quiet"]) == 0
    return Codes.load(out)


def assert_same_codes(a, b):
    np.testing.assert_array_equal(a.packed, b.packed)
    assert a.ids == b.ids and a.bits == b.bits and a.model == b.model
    np.testing.assert_array_equal(a.labels, b.labels)


def encode_shards(run, folder, *extra):
    return main(["encode", "--run", str(run), "--images", "digits", "--shards", str(folder), "--quiet", *extra])


def environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_shards_equal_one_file_and_a_rerun_encodes_only_the_missing(run, one_file, tmp_path, capsys):
    folder = tmp_path / "shards"
    assert encode_shards(run, folder, "--shard-size", "400") == 0
    assert capsys.readouterr().out.strip() == (
        f"encoded 1797 items in 5 shards (5 encoded now, 0 already complete): {folder / MANIFEST}"
    )
    assert_same_codes(Codes.load(folder), one_file)
    manifest = read_manifest(folder)
    assert [s["count"] for s in manifest["shards"]] == [400, 400, 400, 400, 197] and manifest["count"] == 1797

    (folder / "shard-00002.npz").unlink()  # lost
    damaged = folder / "shard-00004.npz"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # cut short (not by dmuh: its writes are atomic)
    kept = {n: (folder / f"shard-0000{n}.npz").stat().st_mtime_ns for n in (0, 1, 3)}
    assert encode_shards(run, folder, "--shard-size", "400") == 0
    assert "(2 encoded now, 3 already complete)" in capsys.readouterr().out
    assert {n: (folder / f"shard-0000{n}.npz").stat().st_mtime_ns for n in (0, 1, 3)} == kept
    assert_same_codes(Codes.load(folder / MANIFEST), one_file)
    assert all(file_sha256(folder / s["file"]) == s["sha256"] for s in read_manifest(folder)["shards"])

    (folder / "shard-00001.npz").write_bytes((folder / "shard-00000.npz").read_bytes())  # another slice's codes
    assert encode_shards(run, folder, "--shard-size", "400") == 2
    assert "shard-00001.npz holds another encode's codes" in capsys.readouterr().err
    assert encode_shards(run, folder, "--shard-size", "300") == 2  # another --shard-size: other slices
    capsys.readouterr()
    assert encode_shards(run, folder, "--shard-size", "400", "--force") == 0
    assert "(5 encoded now, 0 already complete)" in capsys.readouterr().out
    assert_same_codes(Codes.load(folder), one_file)

    assert main(["index", "build", "--codes", str(folder / MANIFEST), "--out", str(tmp_path / "db.dmuhidx")]) == 0
    assert "1797 codes of 16 bits" in capsys.readouterr().out


def test_encode_flags_are_checked(run, tmp_path, capsys, monkeypatch):
    for argv, needle in (
        ([], "give where to write: --out FILE"),
        (["--out", tmp_path / "a.npz", "--shards", tmp_path], "give where to write"),
        (["--out", tmp_path / "a.npz", "--shard-size", "5"], "--shard-size applies to --shards"),
        (["--shards", tmp_path / "s", "--shard-size", "0"], "--shard-size: expected a positive integer"),
    ):
        assert main(["encode", "--run", str(run), "--images", "digits", *map(str, argv)]) == 2
        assert needle in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["encode", "--run", str(run), "--images", "digits", "--out", str(tmp_path / "a.npz")]) == 2
    assert "under torchrun (2 processes) give --shards DIR" in capsys.readouterr().err


def test_a_killed_encode_resumes_with_the_missing_shards(run, one_file, tmp_path, capsys):
    folder = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "dmuh",
        "encode",
        "--run",
        str(run),
        "--images",
        "digits",
        "--shards",
        str(folder),
        "--shard-size",
        "100",
        "--quiet",
    ]
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 120
    try:
        while not list(folder.glob("shard-*.npz")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # mid-way: the first shard is there, most are not
        process.wait()
    complete = len(list(folder.glob("shard-*.npz")))
    assert 0 < complete < 18 and not (folder / MANIFEST).exists(), (complete, process.stderr.read()[-2000:])
    assert encode_shards(run, folder, "--shard-size", "100") == 0
    out = capsys.readouterr().out
    assert f"in 18 shards ({18 - complete} encoded now, {complete} already complete)" in out, out
    assert_same_codes(Codes.load(folder), one_file)


def test_a_manifest_is_checked_shard_by_shard(tmp_path):
    from dmuh.codes.file import write_manifest
    from dmuh.errors import DmuhError

    shards = []
    for number in range(2):
        path = tmp_path / f"shard-0000{number}.npz"
        Codes(np.full((3, 1), number, dtype=np.uint8), 8, [f"{number}-{i}" for i in range(3)]).save(path)
        shards.append({"file": path.name, "count": 3, "sha256": file_sha256(path)})
    write_manifest(tmp_path, shards, 8, 3, {}, None)
    assert Codes.load(tmp_path).ids == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    Codes(np.zeros((3, 1), dtype=np.uint8), 8, ["x", "y", "z"]).save(tmp_path / "shard-00001.npz")
    with pytest.raises(DmuhError, match="shard-00001.npz changed since the manifest was written"):
        Codes.load(tmp_path / MANIFEST)
    (tmp_path / "shard-00001.npz").unlink()
    with pytest.raises(DmuhError, match="shard-00001.npz is missing"):
        Codes.load(tmp_path)
    (tmp_path / MANIFEST).write_text(
        '{"format": "dmuh-codes-manifest", "version": 1, "bits": 8, "count": 3, '
        '"shards": [{"file": "../shard-00000.npz", "count": 3, "sha256": "0"}]}'
    )
    with pytest.raises(DmuhError, match="corrupted manifest"):
        Codes.load(tmp_path)
