"""A run's split.json is made once and found again: protocol 'auto' resolves to the same protocol
on the same data, and a config that asks for another split is refused."""

import pytest

from dmuh.data import DigitsSource
from dmuh.errors import DmuhError
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import SPLIT, load_split


def test_auto_split_is_saved_concrete_and_found_again(tmp_path):
    source = DigitsSource()
    config = TrainConfig(data="digits")  # protocol auto: the default
    made = load_split(config, source, tmp_path)
    assert made.protocol == "per-class" and (tmp_path / SPLIT).is_file()
    again = load_split(config, source, tmp_path)  # resume and evaluate read the saved one
    assert (again.query == made.query).all() and (again.train == made.train).all()
    with pytest.raises(DmuhError, match="made with protocol 'per-class'.*asks for 'digits'"):
        load_split(TrainConfig(data="digits", protocol="digits"), source, tmp_path)


def test_an_auto_split_made_without_labels_is_found_again_with_them(tmp_path):
    """`auto` chooses once: a run trained on `unlabeled:` data (unsupervised split) is evaluated on
    the same items read with their labels, where `auto` alone would choose per-class."""
    import numpy as np

    from dmuh.cli import main
    from dmuh.data import open_source

    digits = DigitsSource()
    np.savez(tmp_path / "f.npz", features=digits.decode()[:400].reshape(400, -1) / 16.0, labels=digits.labels[:400])
    unlabeled = open_source(f"unlabeled:{tmp_path / 'f.npz'}")
    made = load_split(TrainConfig(data="unlabeled:f.npz"), unlabeled, tmp_path)
    assert made.protocol == "unsupervised"
    again = load_split(TrainConfig(data="f.npz"), open_source(str(tmp_path / "f.npz")), tmp_path)
    assert again.protocol == "unsupervised" and (again.query == made.query).all()
    run = tmp_path / "run"
    common = ["--method", "itq", "--model", "mlp", "--model-param", "hidden=[]", "--bits", "8", "--quiet"]
    assert main(["train", "--data", f"unlabeled:{tmp_path / 'f.npz'}", *common, "--out", str(run)]) == 0
    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path / "f.npz")]) == 0
