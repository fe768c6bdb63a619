"""torchrun with 2 gloo processes on the CPU: one consistent memory, the same model on every rank,
and the same losses as one process with the doubled batch."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    import dmuh.engine.trainer as T
    from dmuh.runs.config import TrainConfig

    captured = {}
    build = T.build_experiment
    def capture(*args, **kwargs):
        captured["exp"] = build(*args, **kwargs)
        return captured["exp"]
    T.build_experiment = capture

    data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = TrainConfig(data=f"features:{data}", protocol="digits", model="mlp", hash_norm="none", method="dmuh",
                         bits=16, epochs=2, batch_size=batch, lr=0.05, device="cpu", out=out, trace_items=0)
    row = T.train(config, progress=False, echo=lambda line: None)
    exp = captured["exp"]
    rank = os.environ.get("RANK", "0")
    torch.save({"row": row, "model": exp.model.state_dict(), "momentum": exp.momentum.state_dict(),
                "memory": exp.method.memory.codes, "uncertainty": exp.method.memory.uncertainty},
               os.path.join(out, f"state-rank{rank}.pt"))
    """
)


def environment():
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    # A session of its own, so a hung run is killed with all its worker processes.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(), start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory):
    digits = load_digits()
    path = tmp_path_factory.mktemp("features") / "digits.npz"
    np.savez(path, features=(digits.data / 16.0).astype(np.float32), labels=digits.target)
    return path


def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path, digits_features):
    script = tmp_path / "train_and_dump.py"
    script.write_text(SCRIPT)
    two, one = tmp_path / "two", tmp_path / "one"
    result = torchrun(str(script), str(digits_features), str(two), "32")
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, str(script), str(digits_features), str(one), "64"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    rank0, rank1 = (torch.load(two / f"state-rank{r}.pt", weights_only=False) for r in (0, 1))
    single = torch.load(one / "state-rank0.pt", weights_only=False)
    # Every rank ends with the same network, momentum network and memory.
    for key in ("model", "momentum"):
        for name, value in rank0[key].items():
            torch.testing.assert_close(value, rank1[key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    torch.testing.assert_close(rank0["memory"], rank1["memory"], rtol=0, atol=0)
    torch.testing.assert_close(rank0["uncertainty"], rank1["uncertainty"], rtol=0, atol=0)
    # The same losses and weights as one process whose batch is both ranks' batches together.
    for term in ("loss", "likelihood", "quantization", "uncertainty"):
        assert rank0["row"][term] == pytest.approx(single["row"][term], rel=1e-4), term
    assert rank0["row"]["map"] == pytest.approx(single["row"]["map"], abs=1e-3)
    for name, value in single["model"].items():
        torch.testing.assert_close(rank0["model"][name], value, rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(rank0["memory"], single["memory"], rtol=1e-3, atol=1e-5)
    # Only rank 0 wrote the run files.
    assert (two / "checkpoint.safetensors").is_file() and (two / "log.csv").is_file()


def test_torchrun_dmuh_train_on_digits_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = torchrun(
        "-m",
        "dmuh",
        "train",
        "--data",
        "digits",
        "--protocol",
        "digits",
        "--model",
        "smallcnn",
        "--model-param",
        "input_size=8",
        "--method",
        "dmuh",
        "--bits",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run ") >= 1  # rank 0's summary line
    log = (out / "log.csv").read_text().strip().splitlines()
    assert len(log) == 3
    # Resumable with a different number of processes: one process continues the two-process run.
    from dmuh.cli import main

    assert main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 0
    assert len((out / "log.csv").read_text().strip().splitlines()) == 4
