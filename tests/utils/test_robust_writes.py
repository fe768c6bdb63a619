"""Failed writes, orphaned temporary files, damaged run files and --force: every failure is one
line naming the file, and nothing is overwritten or left behind (dmuh.utils.io, dmuh.runs.layout's log)."""

import errno
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.runs.layout import EMPTY, read_log, write_log
from dmuh.utils.io import atomic_path, atomic_write_text, is_orphan, remove_orphans, temp_prefix

ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def one_line_error(capsys, argv, *needles):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def temp_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """scikit-learn's digits as 64-dimensional feature vectors: an MLP trains on them in a blink."""
    from dmuh.data import DigitsSource

    digits = DigitsSource()
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, features=digits.images.reshape(len(digits), -1).astype(np.float32) / 255, labels=digits.labels)
    return f"features:{path}"


@pytest.fixture(scope="module")
def dmuh_run(tmp_path_factory, features):
    """A 2-epoch DMUH run (an MLP on digits features) that evaluates at epoch 2 only, so epoch 1's MAP
    cells are empty, with an uncertainty trace of 4 items."""
    out = tmp_path_factory.mktemp("runs") / "dmuh"
    assert (
        main(
            [
                "train",
                "--data",
                features,
                "--protocol",
                "digits",
                "--model",
                "mlp",
                "--model-param",
                "hidden=[32]",
                "--bits",
                "16",
                "--batch-size",
                "100",
                "--method",
                "dmuh",
                "--epochs",
                "2",
                "--eval-every",
                "2",
                "--trace-items",
                "4",
                "--train-map-items",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def copy_of(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


# -- 1. a failed write names the file and keeps the old one -------------------------------------


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EFBIG, "file too large"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_a_failed_write_names_the_file_and_the_reason(tmp_path, code, words):
    target = tmp_path / "codes.npz"
    target.write_bytes(b"old")
    with pytest.raises(DmuhError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new, half written")
            raise OSError(code, os.strerror(code))
    assert str(caught.value) == f"cannot write {target}: {words} (the previous file, if any, is kept)"
    assert target.read_bytes() == b"old" and temp_files(tmp_path) == []


def test_a_writers_wrapped_error_and_one_that_is_not_a_write(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(DmuhError, match=r"checkpoint.pt: no space left on device"):
        with atomic_path(target):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as error:  # torch and safetensors wrap the OSError in their own exception
                raise RuntimeError("PytorchStreamWriter failed writing file data/0") from error
    with pytest.raises(DmuhError, match=r"checkpoint.pt: write failed \(\[enforce fail"):
        with atomic_path(target):  # no errno anywhere, and appending works: the writer's words
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(ValueError, match="cannot serialise"):  # not a failed write: as it is
        with atomic_path(target):
            raise ValueError("cannot serialise this")
    monkeypatch.setattr("tempfile.mkstemp", lambda **kw: (_ for _ in ()).throw(PermissionError(errno.EACCES, "x")))
    with pytest.raises(DmuhError, match=r"cannot write .*checkpoint.pt: permission denied"):
        atomic_write_text(target, "x")
    assert not target.exists() and temp_files(tmp_path) == []


def _limited(limit):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, so no kill)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


# Under the limit, in one interpreter (torch imports once): `dmuh encode` and `dmuh index build`
# over their earlier outputs with --force, then torch's, numpy's and safetensors' writers.
LIMITED_SCRIPT = """
import json, sys
import numpy as np, torch
from safetensors.torch import save_file
from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.utils.io import atomic_path

for argv in json.loads(sys.argv[1]):
    print("exit", main(argv), flush=True)

def npy(tmp):
    with open(tmp, "wb") as f:
        np.save(f, np.zeros(100000))

writers = {"t.pt": lambda tmp: torch.save({"a": torch.zeros(100000)}, tmp), "n.npy": npy,
           "s.safetensors": lambda tmp: save_file({"a": torch.zeros(100000)}, str(tmp))}
for name, write in writers.items():
    try:
        with atomic_path(name) as tmp:
            write(tmp)
    except DmuhError as error:
        print(error)
"""


def test_file_too_large_for_real_keeps_the_old_files(dmuh_run, features, tmp_path):
    codes = tmp_path / "codes.npz"
    assert main(["encode", "--run", str(dmuh_run), "--images", features, "--out", str(codes)]) == 0
    index = tmp_path / "digits.dmuhidx"
    assert main(["index", "build", "--codes", str(codes), "--out", str(index)]) == 0
    old_codes, old_index = codes.read_bytes(), index.read_bytes()
    commands = [
        ["encode", "--run", str(dmuh_run), "--images", features, "--out", str(codes), "--force"],
        ["index", "build", "--codes", str(codes), "--kind", "hnsw", "--out", str(index), "--force"],
    ]
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_SCRIPT, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=work,
        env=ENV,
        preexec_fn=_limited(4096),
    )  # the outputs are tens of kB
    assert result.returncode == 0, result.stderr
    kept = "(the previous file, if any, is kept)"
    assert result.stderr.splitlines() == [
        f"dmuh encode: error: cannot write {codes}: file too large {kept}",
        f"dmuh index: error: cannot write {index}: file too large {kept}",
    ]
    assert result.stdout.splitlines() == ["exit 2", "exit 2"] + [
        f"cannot write {name}: file too large {kept}" for name in ("t.pt", "n.npy", "s.safetensors")
    ]
    assert codes.read_bytes() == old_codes and index.read_bytes() == old_index
    assert temp_files(tmp_path) == [] and list(work.iterdir()) == []


# -- 2. temporary files of killed writers ---------------------------------------------------------


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphans_of_dead_writers_go_live_ones_stay(tmp_path):
    host = temp_prefix("x").split("@", 1)[1].rstrip(".")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            "dead": f".codes.npz.{dead_pid()}@{host}.abc123_x.tmp",
            "mine": f".codes.npz.{os.getpid()}@{host}.k2j3h4g5.tmp",
            "live": f".log.csv.{sleeper.pid}@{host}.zz99yy88.tmp",
            "dead_without_host": f".log.csv.{dead_pid()}.q1w2e3r4.tmp",
            "old_style_old": ".config.yaml.a1b2c3d4.tmp",
            "old_style_young": ".split.json.e5f6g7h8.tmp",
            "other_host_young": f".eval.json.{dead_pid()}@not-{host}.m1n2b3v4.tmp",
            "other_host_old": f".eval.json.{dead_pid()}@not-{host}.p0o9i8u7.tmp",
            "not_ours": "notes.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_text("partial")
        hours_ago = time.time() - 2 * 3600
        for key in ("old_style_old", "other_host_old"):
            os.utime(tmp_path / names[key], (hours_ago, hours_ago))
        removed = {p.name for p in remove_orphans(tmp_path)}
        assert removed == {names[k] for k in ("dead", "dead_without_host", "old_style_old", "other_host_old")}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            names[k] for k in ("mine", "live", "old_style_young", "other_host_young", "not_ours")
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert is_orphan(tmp_path / names["live"])  # its writer is gone now
    atomic_write_text(tmp_path / "eval.json", "{}")  # every atomic write clears its folder first
    assert not (tmp_path / names["live"]).exists() and (tmp_path / names["mine"]).exists()
    assert remove_orphans(tmp_path / "no such folder") == []


def test_kill_9_in_the_middle_of_a_write_leaves_an_orphan_that_is_then_removed(tmp_path):
    script = (
        "import sys, time\nfrom dmuh.utils.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n    print(tmp, flush=True)\n    time.sleep(60)\n"
    )
    target = tmp_path / "checkpoint.safetensors"
    target.write_text("old")
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True, env=ENV)
    temp = Path(writer.stdout.readline().strip())
    assert temp.exists() and temp.name.startswith(f".checkpoint.safetensors.{writer.pid}@")
    assert remove_orphans(tmp_path) == [] and temp.exists()  # alive: kept
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    assert temp.exists()
    assert remove_orphans(tmp_path) == [temp] and not temp.exists()
    assert target.read_text() == "old"


# -- 3. --force everywhere ----------------------------------------------------------------------


def test_evaluate_json_refuses_to_overwrite_without_force(dmuh_run, tmp_path, capsys):
    run = copy_of(dmuh_run, tmp_path)
    unrelated = tmp_path / "notes.json"
    unrelated.write_text("my notes")
    one_line_error(
        capsys, ["evaluate", "--run", run, "--json", unrelated], f"--json {unrelated} already exists; pass --force"
    )
    assert unrelated.read_text() == "my notes"
    assert main(["evaluate", "--run", str(run), "--json", str(unrelated), "--force", "--quiet"]) == 0
    assert '"map"' in unrelated.read_text()
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    before = (run / "eval.json").read_text()
    # Asked again, the stored report is shown (not recomputed, not replaced); --force recomputes it.
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "the stored report" in shown and "--force recomputes" in shown and "MAP@all" in shown
    assert (run / "eval.json").read_text() == before
    # Moved data is a new question: the stored report is not replaced without --force.
    one_line_error(capsys, ["evaluate", "--run", run, "--data", "digits"], "eval.json already exists", "--force")
    assert (run / "eval.json").read_text() == before


def test_figure_and_demo_outputs_refuse_without_force(dmuh_run, tmp_path, capsys):
    (tmp_path / "c.md").write_text("keep")
    one_line_error(capsys, ["figure", "curves", "--run", dmuh_run, "--out", tmp_path / "c"], "already exists")
    assert (tmp_path / "c.md").read_text() == "keep" and not (tmp_path / "c.png").exists()
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "results.md").write_text("keep")
    one_line_error(capsys, ["demo", "--out", tmp_path / "demo"], "results.md already exists; pass --force")
    (tmp_path / "file").write_text("keep")
    one_line_error(capsys, ["demo", "--out", tmp_path / "file"], "is a file, not a folder")


# -- 4. log.csv and the uncertainty trace on --resume ---------------------------------------------


def test_log_cells_empty_when_not_evaluated_nan_when_computed(tmp_path):
    path = tmp_path / "log.csv"
    write_log(
        path,
        [
            {"epoch": 1, "loss": 0.5},
            {"epoch": 2, "loss": 0.4, "map": float("nan"), "ties": "expected"},
            {"epoch": 3, "loss": 0.3, "map": 0.25, "ties": "expected"},
        ],
    )
    text = path.read_text()
    assert text.splitlines()[1:] == ["1,0.5,,", "2,0.4,nan,expected", "3,0.3,0.25,expected"]
    rows = read_log(path)
    assert rows[0]["map"] is EMPTY and math.isnan(rows[0]["map"]) and rows[0]["ties"] == ""
    assert math.isnan(rows[1]["map"]) and rows[1]["map"] is not EMPTY and rows[2]["map"] == 0.25
    write_log(path, rows)
    assert path.read_text() == text  # a resumed run rewrites its log as it was
    path.write_text("epoch,loss,map,ties\n1,0.5,nan,\n")  # what an earlier dmuh's resume wrote
    assert read_log(path)[0]["map"] is EMPTY


def test_resume_keeps_the_empty_map_cells_of_unevaluated_epochs(dmuh_run, tmp_path):
    run = copy_of(dmuh_run, tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet"]) == 0
    lines = (run / "log.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [c["epoch"] for c in cells] == ["1", "2", "3"]
    assert cells[0]["map"] == "" and cells[0]["ties"] == ""
    assert float(cells[1]["map"]) >= 0 and float(cells[2]["map"]) >= 0 and cells[2]["ties"] == "expected"


@pytest.mark.parametrize(
    "damage, where",
    [
        (lambda text: text.encode() + b"\xff\xfe\x00garbage\x93\n", "line 4: bytes that are not text"),
        (lambda text: text.replace("\n2,", "\n2x,", 1).encode(), "line 3: '2x' in column epoch is not a number"),
        (lambda text: text.replace("\n2,", "\n2.5,", 1).encode(), "line 3: epoch '2.5' is not a whole number"),
        (
            lambda text: (
                text.rstrip("\n") + "\n3" + ",oops" * (len(text.splitlines()[0].split(",")) - 1) + "\n"
            ).encode(),
            "line 4: 'oops' in column",
        ),
        (lambda text: text.replace("epoch,", "epoc,", 1).encode(), "line 1: no epoch column in the header"),
        (lambda text: (text + "3,1\n").encode(), "line 4: 2 cells, the header has"),
    ],
)
def test_resume_with_a_damaged_log_is_one_line(dmuh_run, tmp_path, capsys, damage, where):
    run = copy_of(dmuh_run, tmp_path)
    log = run / "log.csv"
    log.write_bytes(damage(log.read_text()))
    before = log.read_bytes()
    err = one_line_error(
        capsys, ["train", "--resume", "--out", run, "--epochs", "3", "--quiet"], f"{log} {where}", "delete log.csv"
    )
    assert "repair" in err and log.read_bytes() == before


def test_resume_with_a_damaged_trace_warns_once_and_goes_on(dmuh_run, tmp_path, capsys):
    run = copy_of(dmuh_run, tmp_path)
    trace = run / "uncertainty_trace.npz"
    with np.load(trace) as f:
        assert f["epochs"].tolist() == [1, 2]
    trace.write_bytes(trace.read_bytes()[:40])  # truncated
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(trace) in warnings[0] and "continuing without" in warnings[0]
    with np.load(trace) as f:
        assert f["epochs"].tolist() == [3] and f["hashing"].shape == (1, 4, 16)


# -- 5. progress bars and the decoded-data cache ---------------------------------------------------


def test_resolve_cache_dir(monkeypatch, tmp_path):
    from dmuh.engine.runtime import resolve_cache_dir

    monkeypatch.setenv("DMUH_CACHE_DIR", str(tmp_path / "mine"))
    assert resolve_cache_dir("default") == tmp_path / "mine"
    for off in ("off", "none", "OFF", "", None):
        assert resolve_cache_dir(off) is None
    assert resolve_cache_dir(str(tmp_path / "else")) == tmp_path / "else"
    monkeypatch.setenv("DMUH_CACHE_DIR", "off")
    assert resolve_cache_dir("default") is None
    monkeypatch.delenv("DMUH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir("default") == tmp_path / "xdg" / "dmuh"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir("default") == tmp_path / "home" / ".cache" / "dmuh"


def test_decode_all_caches_image_files_by_default_not_in_memory_arrays(monkeypatch, tmp_path):
    from PIL import Image

    from dmuh.data import open_source
    from dmuh.engine.runtime import decode_all
    from dmuh.runs.config import TrainConfig

    cache = tmp_path / "cache"
    monkeypatch.setenv("DMUH_CACHE_DIR", str(cache))
    for i in range(6):
        (tmp_path / "images" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / "images" / str(i % 2) / f"{i}.png")
    first = decode_all(open_source(str(tmp_path / "images")), TrainConfig())
    assert len(list(cache.glob("decoded-*.npy"))) == 1
    assert np.array_equal(decode_all(open_source(str(tmp_path / "images")), TrainConfig()), first)
    shutil.rmtree(cache)
    decode_all(open_source("digits"), TrainConfig())
    decode_all(open_source(str(tmp_path / "images")), TrainConfig(cache_dir="off"))
    assert not cache.exists()


class FakeTerminal:
    def __init__(self):
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bars_only_for_large_steps_on_a_terminal_and_not_quiet(monkeypatch):
    import torch

    from dmuh.engine.runtime import Execution, run_network
    from dmuh.metrics.ranking import HammingRanking
    from dmuh.runs.config import TrainConfig
    from dmuh.utils import progress

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    config = TrainConfig(eval_batch_size=1000)

    def encode(count):
        return run_network(lambda x: x, torch.zeros(count, 4), lambda x: x, Execution.of(config, "cpu"))

    encode(100)
    assert "".join(terminal.text) == ""  # a few items: no bar
    encode(progress.MIN_ITEMS + 1)
    assert "encoding" in "".join(terminal.text)
    terminal.text.clear()
    progress.set_quiet(True)
    try:
        encode(progress.MIN_ITEMS + 1)
    finally:
        progress.set_quiet(False)
    assert "".join(terminal.text) == ""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, (progress.MIN_ITEMS + 100, 16)) * 2 - 1
    labels = rng.integers(0, 3, progress.MIN_ITEMS + 100)
    HammingRanking(codes[:20], codes, labels[:20], labels, progress=True).histograms()
    assert "MAP: Hamming distances" in "".join(terminal.text)


def test_decoding_a_large_image_source_shows_a_bar(monkeypatch, tmp_path):
    from PIL import Image

    from dmuh.data import open_source
    from dmuh.utils import progress

    for i in range(70):
        (tmp_path / str(i % 2)).mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4), i, dtype=np.uint8)).save(tmp_path / str(i % 2) / f"{i}.png")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "MIN_ITEMS", 50)
    assert open_source(str(tmp_path)).decode().shape[0] == 70
    assert "decoding images" in "".join(terminal.text)


def test_a_stored_report_that_is_stale_or_damaged_is_not_shown(dmuh_run, tmp_path, capsys):
    run = copy_of(dmuh_run, tmp_path)
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    report = run / "eval.json"
    checkpoint = run / "checkpoint.safetensors"
    os.utime(checkpoint, (report.stat().st_mtime + 10, report.stat().st_mtime + 10))  # trained since
    one_line_error(capsys, ["evaluate", "--run", run], "eval.json is older than the run's checkpoint", "--force")
    later = checkpoint.stat().st_mtime + 10
    for damaged in ("[1, 2]", '{"map_by_ties": {"index": 3}}', "{not json", '{"map_by_ties": {"x": {}}}'):
        report.write_text(damaged)
        os.utime(report, (later, later))
        one_line_error(capsys, ["evaluate", "--run", run], "eval.json: unreadable report", "--force")
    assert main(["evaluate", "--run", str(run), "--force", "--quiet"]) == 0  # --force recomputes
    assert '"map_by_ties"' in report.read_text()
