"""The GPU benchmark scripts, run on the CPU at toy size so that a GPU session never finds them broken."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_dmuh_vs_regu_table_with_pretraining_and_two_workers(tmp_path):
    out = tmp_path / "table"
    result = run_bench(
        "cifar10_dmuh_vs_regu.py",
        "--data",
        "digits",
        "--protocol",
        "digits",
        "--model",
        "smallcnn",
        "--device",
        "cpu",
        "--methods",
        "regu,dmuh",
        "--bits",
        "8",
        "--epochs",
        "1",
        "--pretrain-epochs",
        "1",
        "--objective",
        "ce",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr
    assert "| Regu |" in result.stdout and "| DMUH |" in result.stdout
    assert (out / "pretrain-ce-1" / "backbone.safetensors").is_file()
    assert "init: " + str(out / "pretrain-ce-1") in (out / "dmuh-8bits" / "config.yaml").read_text()


def test_train_speed_prints_its_table():
    result = run_bench(
        "train_speed.py",
        "--data",
        "digits",
        "--protocol",
        "digits",
        "--device",
        "cpu",
        "--cases",
        "smallcnn",
        "--methods",
        "dmuh",
        "--epochs",
        "2",
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("| smallcnn | dmuh | 128 | False | ")
    assert float(last.split("|")[5].replace(",", "")) > 0


def test_shallow_fit_prints_a_row_per_method_and_skips_unknown_names():
    result = run_bench(
        "shallow_fit.py", "--n", "400", "--dim", "16", "--bits", "8", "--methods", "sdh,itq,nope", "--timeout", "120"
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["sdh", "itq"]
    assert "nope" in result.stdout  # named as skipped


def test_search_backends_prints_both_tables():
    pytest.importorskip("faiss")
    pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus and milvus-lite")
    result = run_bench(
        "search_backends.py",
        "--n",
        "3000",
        "--queries",
        "20",
        "--k",
        "10",
        "--skip-hnsw",
        "--repeats",
        "1",
        "--encode-items",
        "40",
        "--encode-procs",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    milvus = next(row for row in rows if row.startswith("| Milvus Lite 2.5.1 | BIN_FLAT | exact"))
    assert milvus.rstrip(" |").endswith("| 1.000 | 1.000")  # exact: the same codes as FAISS flat
    assert any(row.startswith("| Milvus Lite 2.5.1 | BIN_IVF_FLAT | not run") for row in rows)
    assert any(row.startswith("| 1 | 40 | ") for row in rows)  # one torchrun process encoded the 40 items


def test_serve_load_answers_every_good_request_and_refuses_every_malformed_one():
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    result = run_bench("serve_load.py", "--n", "2000", "--hnsw-n", "0", "--seconds", "0.5", "--clients", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| flat")]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [
        ("codes", "0%"),
        ("codes", "30%"),
        ("image", "0%"),
        ("image", "30%"),
    ]
    for row in rows:
        ok, good = (int(v.replace(",", "")) for v in row[6].split("/"))
        refused, bad = (int(v.replace(",", "")) for v in row[7].split("/"))
        assert good > 0 and ok == good and refused == bad
    assert all(int(row[7].split("/")[1].replace(",", "")) > 0 for row in rows if row[2].strip() == "30%")


def _bad_inputs_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "bench" / "bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bad_inputs", module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules["bad_inputs"])
    return sys.modules["bad_inputs"]


def test_bad_inputs_measures_each_commands_peak_memory(tmp_path):
    bench = _bad_inputs_module()
    env = dict(os.environ)
    small = bench.run_measured([sys.executable, "-c", "pass"], tmp_path, env, 60, True)
    large = bench.run_measured([sys.executable, "-c", "x = bytearray(300 << 20); x[::4096] = b'1' * len(x[::4096])"],
                               tmp_path, env, 60, True)  # fmt: skip
    assert small[0] == 0 and large[0] == 0
    assert small[4] < 100 and large[4] > 300, (small[4], large[4])
    hung = bench.run_measured([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, env, 1, True)
    assert hung[0] is None and hung[3] < 30


def test_bad_inputs_counts_a_long_or_internal_error_line_as_unclear():
    bench = _bad_inputs_module()
    assert bench.is_clear("dmuh train: error: --bits: expected an integer\n")
    assert not bench.is_clear("dmuh train: error: " + "x" * 600 + "\n")
    assert not bench.is_clear("dmuh train: internal error: ValueError: x (set DMUH_DEBUG=1 ...)\n")
    if not bench.CASES:
        bench.define_cases()
    names = [c.name for c in bench.CASES]
    new = [
        n for n in names if n.split("/")[0] in ("amplify", "fields", "silent", "inputs", "serve-flags", "concurrent")
    ]
    assert len(new) >= 60 and len(set(names)) == len(names)


def test_bad_inputs_peak_memory_is_the_commands_not_its_callers(tmp_path):
    """A caller holding 600 MB (as a test run does) must not show up in a small command's peak."""
    bench = _bad_inputs_module()
    ballast = bytearray(600 << 20)
    ballast[::4096] = b"1" * len(ballast[::4096])
    small = bench.run_measured([sys.executable, "-c", "pass"], tmp_path, dict(os.environ), 60, True)
    assert small[0] == 0 and small[4] < 100, small[4]
    del ballast
