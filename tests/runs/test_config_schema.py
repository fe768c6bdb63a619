"""The typed config schema: every bad flag or YAML value is one line naming it, before any work."""

import math

import pytest

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.runs.config import PretrainConfig, TrainConfig
from dmuh.utils.schema import help_line, parse_flag

COMMON = [
    "--data",
    "digits",
    "--model",
    "smallcnn",
    "--model-param",
    "width=8",
    "--bits",
    "8",
    "--batch-size",
    "64",
    "--quiet",
]


def run_train(tmp_path, capsys, *args):
    out = tmp_path / "r"
    code = main(["train", "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    return code, err, out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
        (["--eval-batch-size", "0"], "--eval-batch-size: expected an integer >= 1"),
        (["--lr", "-0.05"], "--lr: expected a number > 0 and <= 10, got -0.05"),
        (["--lr", "nan"], "--lr: expected a number > 0 and <= 10, got nan"),
        (["--lr", "1e9"], "--lr: expected a number > 0 and <= 10"),
        (["--lr", "0.05abc"], "--lr: expected a number > 0 and <= 10, got '0.05abc'"),
        (["--weight-decay", "-1"], "--weight-decay: expected a number >= 0 and <= 1, got -1.0"),
        (["--momentum", "2"], "--momentum: expected a number >= 0 and < 1, got 2.0"),
        (["--warmup-epochs", "-1"], "--warmup-epochs: expected an integer >= 0"),
        (["--epochs", "0"], "--epochs: expected an integer >= 1"),
        (["--epochs", "1.5"], "--epochs: expected an integer >= 1 and <= 100000, got '1.5'"),
        (["--bits", "0"], "--bits: expected an integer >= 1 and <= 1024, got 0"),
        (["--bits", "100000"], "--bits: expected an integer >= 1 and <= 1024, got 100000"),
        (["--lr-end", "0.5", "--lr", "0.1"], "--lr-end: expected a number <= lr 0.1, got 0.5"),
        (["--amp", "maybe"], "--amp: expected true or false, got 'maybe'"),
        (["--image-size", "2"], "--image-size: expected an integer >= 4 and <= 4096 or none, got 2"),
        (["--hash-norm", "layer"], "--hash-norm: expected one of batchnorm, none, got 'layer'"),
        (["--seed", "-3"], "--seed: expected an integer >= 0, got -3"),
        (["-p", "alpha=abc"], "method parameter alpha='abc': expected a number"),
        (["-p", "alpha=2"], "method parameter alpha=2.0: must be <= 1"),
        (["-p", "=3"], "--param '=3': expected KEY=VALUE"),
        (["--model-param", "bits=4"], "--model-param bits: set it with --bits"),
        (["--model-param", "widht=4"], "model 'smallcnn' has no option 'widht'"),
        (["--init", "/no/such/run"], "--init /no/such/run: no such run directory"),
        (["--protocol-param", "topk=0"], "topk"),
    ],
)
def test_bad_flag_is_one_line_before_any_work(tmp_path, capsys, args, message):
    code, err, out = run_train(tmp_path, capsys, *COMMON, *args)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (out / "config.yaml").exists()  # refused before the run directory was written


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("model_params: 8\n", "field 'model_params': expected a mapping KEY: VALUE, got 8"),
        ("lr: 0.05abc\n", "field 'lr': expected a number > 0 and <= 10, got '0.05abc'"),
        ('epochs: "1"\n', "field 'epochs': expected an integer >= 1 and <= 100000, got '1'"),
        ("epochs: 1.5\n", "field 'epochs': expected an integer >= 1 and <= 100000, got 1.5"),
        ("method_params: {alpha: [1, 2]}\n", "method parameter alpha=[1, 2]: expected a number"),
        ("amp: maybe\n", "field 'amp': expected true or false, got 'maybe'"),
        ("bits: null\n", "field 'bits': expected an integer"),
        ("batch_size: true\n", "field 'batch_size': expected an integer"),
        ("colour: red\n", "unknown field 'colour'"),
        ("- a\n- b\n", "expected a mapping of config fields"),
        ("lr: [0.1\n", "not valid YAML"),
    ],
)
def test_bad_yaml_value_names_file_and_field(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    epochs = [] if "epochs" in yaml_text else ["--epochs", "1"]
    code, err, out = run_train(tmp_path, capsys, "--config", str(config), *epochs)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    if "field" in message:
        assert str(config) in err
    assert not out.exists()


def test_optional_fields_parse_by_their_type():
    # A None default no longer makes a flag text: --image-size 8 is the integer 8.
    assert parse_flag(TrainConfig, "image_size", "8", "--image-size") == 8
    assert parse_flag(TrainConfig, "image_size", "none", "--image-size") is None
    # "none" is a word of --hash-norm, not Python's None.
    assert parse_flag(TrainConfig, "hash_norm", "none", "--hash-norm") == "none"
    assert TrainConfig.from_dict({"hash_norm": "none"}).hash_norm == "none"
    assert parse_flag(TrainConfig, "grad_clip", "null", "--grad-clip") is None
    assert parse_flag(TrainConfig, "amp", "off", "--amp") is False
    with pytest.raises(DmuhError, match="--image-size: expected an integer"):
        parse_flag(TrainConfig, "image_size", "8px", "--image-size")


def test_ints_for_numbers_become_floats_and_constructed_configs_are_checked():
    assert isinstance(TrainConfig.from_dict({"lr": 1}).lr, float)
    with pytest.raises(DmuhError, match="field 'momentum'"):
        TrainConfig(momentum=1.0)
    with pytest.raises(DmuhError, match="field 'temperature'"):
        PretrainConfig(temperature=0.0)
    assert math.isclose(PretrainConfig().lr, 0.1)


def test_every_config_flag_has_a_help_line_with_allowed_values_and_default():
    import dataclasses

    for config_class in (TrainConfig, PretrainConfig):
        for field in dataclasses.fields(config_class):
            line = help_line(config_class, field.name)
            assert line.endswith("]") and "[default: " in line and "(" in line, (field.name, line)
    assert "(an integer >= 1 and <= 1024) [default: 32]" in help_line(TrainConfig, "bits")
    assert "one of sgd, adamw" in help_line(TrainConfig, "optimizer")


def test_per_class_protocol_takes_its_parameters_from_flags_and_yaml(tmp_path, capsys):
    import json

    out = tmp_path / "pc"
    args = [
        "train",
        *COMMON,
        "--method",
        "regu",
        "--epochs",
        "1",
        "--protocol",
        "per-class",
        "--protocol-param",
        "query_per_class=5",
        "--protocol-param",
        "train_per_class=20",
        "--out",
        str(out),
    ]
    assert main(args) == 0, capsys.readouterr().err
    split = json.loads((out / "split.json").read_text())
    assert len(split["query"]) == 50 and len(split["train"]) == 200
    assert split["params"] == {"query_per_class": 5, "train_per_class": 20}
    # YAML too; a missing parameter names it.
    config = tmp_path / "pc.yaml"
    config.write_text("protocol: per-class\nprotocol_params: {query_per_class: 5}\n")
    code, err, _ = run_train(tmp_path, capsys, *COMMON, "--config", str(config), "--epochs", "1")
    assert code == 2 and "train_per_class" in err and len(err.splitlines()) == 1, err


def test_resume_extending_a_finished_run_keeps_its_schedule(tmp_path, capsys):
    from dmuh.runs.layout import LOG, read_log

    out = tmp_path / "ext"
    base = ["train", *COMMON, "--method", "regu", "--lr", "0.05", "--lr-end", "0.001", "--out", str(out)]
    assert main([*base, "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--epochs", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "epochs 3-4 run at lr_end 0.001" in printed
    rows = read_log(out / LOG)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == pytest.approx(0.001) and rows[3]["lr"] == pytest.approx(0.001)  # no jump back up
    assert "lr_schedule_epochs: 2" in (out / "config.yaml").read_text()
    # Fewer epochs than the run has trained is refused, naming the flag.
    assert main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 3: the run in" in err and "trained 4 epochs" in err


def test_config_yaml_stores_absolute_paths(tmp_path, monkeypatch, capsys):
    import numpy as np
    import yaml
    from sklearn.datasets import load_digits

    digits = load_digits()
    work = tmp_path / "work"
    work.mkdir()
    np.savez(work / "feat.npz", features=digits.data[:400].astype(np.float32), labels=digits.target[:400])
    monkeypatch.chdir(work)
    assert (
        main(
            [
                "train",
                "--data",
                "features:feat.npz",
                "--protocol",
                "per-class",
                "--protocol-param",
                "query_per_class=5",
                "--protocol-param",
                "train_per_class=20",
                "--model",
                "mlp",
                "--bits",
                "8",
                "--method",
                "regu",
                "--epochs",
                "1",
                "--batch-size",
                "50",
                "--out",
                "run",
                "--quiet",
            ]
        )
        == 0
    )
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["data"] == f"features:{work / 'feat.npz'}"
    # Evaluated from another folder, the run still finds its data.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(work / "run")]) == 0, capsys.readouterr().err


def test_yaml_tags_that_would_build_python_objects_are_refused(tmp_path, capsys):
    # load_yaml's loader is a SafeLoader: a tag naming a Python callable is an error, never a call.
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err, out = run_train(tmp_path, capsys, "--config", str(config))
    assert code == 2 and "not valid YAML" in err and len(err.splitlines()) == 1, err
    assert not marker.exists() and not out.exists()


def test_config_yaml_stores_the_run_folder_absolute(tmp_path, monkeypatch):
    """README: paths are stored absolute, the run folder included, so a run's config works from anywhere."""
    import yaml

    from dmuh.engine.trainer import train

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        method="regu",
        bits=8,
        epochs=1,
        out="runs/relative",
    )
    train(config, progress=False, echo=lambda line: None)
    stored = yaml.safe_load((tmp_path / "runs" / "relative" / "config.yaml").read_text())
    assert stored["out"] == str(tmp_path / "runs" / "relative")
