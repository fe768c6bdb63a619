"""Cases the bad-input audit (bench/bad_inputs.py) found after the first round of hardening."""

import pytest

from dmuh.cli import main

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
    "--epochs",
    "1",
]


def one_error_line(capsys, code, expected_code=2):
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_yaml_key_given_twice_is_refused(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("epochs: 2\nbits: 8\nepochs: 3\n")
    err = one_error_line(capsys, main(["train", "--config", str(config), "--out", str(tmp_path / "r")]))
    assert str(config) in err and "key 'epochs' given twice (line 3)" in err


def test_cache_dir_that_is_a_file_is_refused(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    err = one_error_line(capsys, main(["train", *COMMON, "--cache-dir", str(notes), "--out", str(tmp_path / "r")]))
    assert "--cache-dir" in err and "is a file" in err
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize(
    "option, message",
    [("width=0", "width must be an integer in [1, 65536], got 0"), ("fc=[0]", "fc must be a list of positive widths")],
)
def test_model_options_out_of_range_are_refused(tmp_path, capsys, option, message):
    code = main(
        [
            "train",
            "--data",
            "digits",
            "--model",
            "smallcnn",
            "--model-param",
            option,
            "--epochs",
            "1",
            "--quiet",
            "--init",
            "scratch",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert message in one_error_line(capsys, code)


def test_train_does_not_replace_a_users_config_yaml(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# my own notes\nepochs: 7\n")
    err = one_error_line(capsys, main(["train", *COMMON, "--out", str(out)]))
    assert "no dmuh run wrote" in err
    assert (out / "config.yaml").read_text() == "# my own notes\nepochs: 7\n"


def test_compare_keeps_earlier_tables_without_force(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "results.md").write_text("my table\n")
    err = one_error_line(capsys, main(["compare", *COMMON, "--methods", "regu", "--bits", "8", "--out", str(out)]))
    assert "results.md already exists; pass --force" in err
    assert (out / "results.md").read_text() == "my table\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--opset", "999"], "--opset: expected an integer >= 7"),
        (["--image-size", "2"], "--image-size: expected an integer >= 4"),
    ],
)
def test_export_onnx_checks_its_flags_first(tmp_path, capsys, flags, message):
    pytest.importorskip("onnx")
    code = main(["export-onnx", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.onnx"), *flags])
    assert message in one_error_line(capsys, code)


def test_an_unforeseen_exception_is_one_line(monkeypatch, capsys):
    import dmuh.cli.training as training

    def broken(args):
        raise RuntimeError("something deep\nsecond line")

    monkeypatch.setattr(training, "cmd_train", broken)
    monkeypatch.delenv("DMUH_DEBUG", raising=False)
    err = one_error_line(capsys, main(["train", "--quiet"]), expected_code=1)
    assert "internal error: RuntimeError: something deep" in err and "DMUH_DEBUG=1" in err
    monkeypatch.setenv("DMUH_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["train", "--quiet"])
