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
