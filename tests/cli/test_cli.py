"""The `dmuh` command end to end on digits, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from dmuh.cli import main

COMMON = [
    "--data",
    "digits",
    "--protocol",
    "digits",
    "--model",
    "smallcnn",
    "--model-param",
    "input_size=8",
    "--bits",
    "16",
    "--batch-size",
    "64",
    "--quiet",
]


def run_cli(*args):
    """Run `python -m dmuh` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "dmuh", *args], capture_output=True, text=True)


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *COMMON, "--method", "dmuh", "--epochs", "2", "-p", "alpha=0.8", "--out", str(out)]) == 0
    assert "map" in capsys.readouterr().out
    assert "alpha: 0.8" in (out / "config.yaml").read_text()
    assert main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 0
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 3
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert 0.0 <= report["map"] <= 1.0 and report["method"] == "dmuh" and report["bits"] == 16
    assert "map" in printed


def test_yaml_config_with_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "data: digits\nprotocol: digits\nmodel: smallcnn\nmodel_params: {input_size: 8}\n"
        "method: regu\nbits: 12\nepochs: 1\nbatch_size: 64\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--bits", "8", "--out", str(out), "--quiet"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "bits: 8" in saved and "method: regu" in saved


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--protocol", "nope"], "nope"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--data", "/no/such/data.zip"], "/no/such/data.zip"),
        (["-p", "delta=1"], "no parameter 'delta'"),
        (["--augment", "twirl"], "--augment: expected one of none, flip"),
        (["--device", "tpu"], "--device: expected cpu or cuda[:N], got 'tpu'"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, args, message):
    code = main(["train", *COMMON, "--epochs", "1", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err


def test_bad_config_file_and_wrong_label_width(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0 1\nb.png 1 0 0\n")
    assert (
        main(
            ["train", *COMMON, "--data", f"list:{listing}", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "list.txt" in err and "line 2" in err


def test_evaluate_missing_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_help_of_each_command():
    for command in ("train", "evaluate", "demo", "pretrain"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: dmuh " + command in result.stdout


def test_demo_prints_a_map_table(tmp_path):
    result = run_cli("demo", "--bits", "8", "--epochs", "2", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "| regu |" in result.stdout and "| dmuh |" in result.stdout


def test_compare_writes_tables(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                *COMMON,
                "--methods",
                "regu,csq",
                "--bits",
                "8,16",
                "--epochs",
                "1",
                "--jobs",
                "2",
                "--checkpoint-every",
                "5",
                "-p",
                "csq.quantization=0.1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| Regu |" in printed and "| CSQ |" in printed and "8 bits" in printed and "16 bits" in printed
    assert (out / "results.csv").is_file()
    assert "quantization: 0.1" in (out / "csq-16bits" / "config.yaml").read_text()
    assert main(["compare", "--methods", "regu", "-p", "beta=3", *COMMON, "--out", str(out)]) == 2
    assert "name the method" in capsys.readouterr().err
    assert main(["compare", "--methods", "regu", "--jobs", "0", *COMMON, "--out", str(out)]) == 2
    assert "--jobs must be a positive integer" in capsys.readouterr().err


def test_pretrain_then_train_with_init_through_the_cli(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--data",
                "digits",
                "--protocol",
                "digits",
                "--model",
                "smallcnn",
                "--model-param",
                "input_size=8",
                "--objective",
                "ce",
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--quiet",
                "--out",
                str(pre),
            ]
        )
        == 0
    )
    assert f"dmuh train --init {pre}" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", *COMMON, "--epochs", "1", "--init", str(pre), "--out", str(out)]) == 0
    assert f"init: {pre}" in (out / "config.yaml").read_text()
    assert main(["pretrain", "--data", "digits", "--objective", "mae", "--out", str(tmp_path / "x")]) == 2
    assert "--objective: expected one of ce, simclr" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    from pathlib import Path

    from dmuh.runs.config import PretrainConfig, TrainConfig
    from dmuh.utils.schema import load_yaml

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config_class = PretrainConfig if "pretrain" in path.name else TrainConfig
        config_class.from_dict(load_yaml(path), where=str(path))
