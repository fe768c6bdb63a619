"""The error family: kinds, the field a message names, one first line, and the CLI naming flags."""

import pytest

from dmuh.cli import main
from dmuh.cli.common import cli_message, flag_of
from dmuh.engine.preflight import check_train_config
from dmuh.errors import ConfigError, DataError, DmuhError, RunError, SearchError, first_line
from dmuh.runs.config import TrainConfig


def test_every_kind_is_a_dmuh_error_and_carries_its_field():
    for kind in (ConfigError, DataError, RunError, SearchError):
        error = kind("lr 5: too large", field="lr")
        assert isinstance(error, DmuhError) and error.field == "lr" and str(error) == "lr 5: too large"
    assert DmuhError("plain").field is None


def test_first_line_takes_the_first_non_empty_line_and_cuts_it():
    assert first_line(ValueError("\n  bad header  \nsecond line")) == "bad header"
    assert first_line(KeyError()) == "KeyError"  # no message: the type's name
    assert first_line(ValueError("x" * 500)) == "x" * 300
    assert first_line(ValueError("abcdef"), limit=3) == "abc"


def test_the_command_line_names_the_flag_of_a_field():
    assert flag_of("init") == "--init" and flag_of("cache_dir") == "--cache-dir"
    assert flag_of("model_params") == "--model-param" and flag_of("method_params") == "--param"
    assert cli_message(ConfigError("cache_dir x: is a file", field="cache_dir")) == "--cache-dir x: is a file"
    assert cli_message(ConfigError("init: bad", field="init")) == "--init: bad"
    # Only a leading field is replaced: a message that starts otherwise, or a longer word, is kept.
    assert cli_message(ConfigError("the init run is gone", field="init")) == "the init run is gone"
    assert cli_message(ConfigError("initial x", field="init")) == "initial x"
    assert cli_message(DmuhError("init x")) == "init x"


def test_a_library_caller_reads_the_field_and_the_cli_user_the_flag(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    config = TrainConfig(data="digits", protocol="digits", init=missing, out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^init .*no-such-run: no such run directory") as caught:
        check_train_config(config)
    assert caught.value.field == "init"
    code = main(
        [
            "train",
            "--data",
            "digits",
            "--protocol",
            "digits",
            "--init",
            missing,
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert code == 2
    assert f"dmuh train: error: --init {missing}: no such run directory" in capsys.readouterr().err


def test_a_list_file_without_its_root_names_data_root(tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\n")
    code = main(
        [
            "train",
            "--data",
            f"list:{listing}",
            "--protocol",
            "digits",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert code == 2
    assert f"--data-root: {listing} is a list file, and it needs root" in capsys.readouterr().err
