"""The one registry class: a mistyped name gets the likely one."""

import pytest

from dmuh.errors import DmuhError
from dmuh.methods import create_method
from dmuh.models import create_model
from dmuh.utils.registry import Registry


def test_a_name_in_another_case_or_misspelt_is_suggested():
    registry = Registry("thing")
    for name in ("dpsh", "dmuh", "dmuh-wo-u"):
        registry.register(name)(dict)
    assert registry.suggestion("DPSH") == "dpsh"
    assert registry.suggestion("dmhu") == "dmuh"
    assert registry.suggestion("xyz") is None
    with pytest.raises(DmuhError, match=r"^unknown thing 'DPSH' \(did you mean 'dpsh'\?\); available: dmuh, "):
        registry.entry("DPSH")
    with pytest.raises(DmuhError, match=r"^unknown thing 'xyz'; available: dmuh, dmuh-wo-u, dpsh$"):
        registry.entry("xyz")


def test_methods_and_models_suggest_through_the_cli(capsys):
    from dmuh.cli import main

    with pytest.raises(DmuhError, match=r"unknown method 'DPSH' \(did you mean 'dpsh'\?\)"):
        create_method("DPSH", bits=8, num_train=2, num_classes=2)
    with pytest.raises(DmuhError, match=r"unknown model 'ResNet18' \(did you mean 'resnet18'\?\)"):
        create_model("ResNet18", bits=8)
    assert main(["train", "--method", "DPSH", "--epochs", "1", "--quiet"]) == 2
    assert "did you mean 'dpsh'?" in capsys.readouterr().err
