"""`dmuh compare --methods paper|anchors`: the named lists of methods."""

import pytest

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.methods import available, method_class
from dmuh.studies.paper import PAPER_METHODS
from dmuh.studies.presets import anchor_methods, expand_methods


def test_anchors_are_the_supervised_deep_image_methods_once_each_dmuh_first():
    anchors = anchor_methods()
    assert anchors[0] == "dmuh" and len(anchors) == len(set(anchors))
    assert {"dsh", "dhn", "hashnet", "csq", "dsdh", "ddsh", "greedyhash", "orthohash", "dpsh"} <= set(anchors)
    # regu is dpsh under DMUH's paper's name; the dmuh-wo-* rows are DMUH's ablations
    assert "regu" not in anchors and not any(name.startswith("dmuh-wo") for name in anchors)
    # shallow, label-free and cross-modal methods are not supervised deep image methods
    assert not {"itq", "sdh", "lfh", "cosdish", "fasth", "bihalf", "cibhash", "dcmh", "dmuh-cross", "rph"} & set(
        anchors
    )
    for name in anchors:
        needs = method_class(name).requires
        assert needs.labels and not needs.shallow and not needs.text


def test_expand_methods_replaces_presets_and_drops_repeats():
    assert expand_methods(["paper"]) == PAPER_METHODS
    mixed = expand_methods(["itq", "anchors", "dmuh"])
    assert mixed[0] == "itq" and mixed[1:] == anchor_methods()
    with pytest.raises(DmuhError, match="--methods"):
        expand_methods([])
    assert set(expand_methods(["anchors"])) <= set(available())


def test_compare_expands_anchors_before_checking_the_methods(tmp_path, capsys):
    """An unknown name beside a preset is refused before anything trains."""
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "anchors,nope", "--data", "digits", "--bits", "8", "--out", str(out)])
    assert code != 0
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not out.exists()
