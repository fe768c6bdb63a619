"""Every field of a codes file checked before use (issue 31, classes 2 and 3): meta of the wrong
type, arrays of the wrong shape or kind, uncertainties that are infinite or negative."""

import json

import numpy as np
import pytest

from dmuh.codes.file import Codes
from dmuh.errors import DmuhError

META = {"version": 1, "bits": 16, "count": 4, "model": {}, "image_size": 8, "channels": 1, "images": None,
        "class_names": None}  # fmt: skip


def write(path, meta=META, **over):
    arrays = {
        "format": np.array("dmuh-codes"),
        "meta": np.array(meta if isinstance(meta, str) else json.dumps(meta)),
        "codes": np.zeros((4, 2), np.uint8),
        "ids": np.array([f"a/{i}.png" for i in range(4)]),
    }
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_a_well_formed_file_loads(tmp_path):
    assert len(Codes.load(write(tmp_path / "c.npz"))) == 4


@pytest.mark.parametrize(
    "meta, message",
    [
        ("[1, 2]", "its meta is not a JSON object"),
        ('"text"', "its meta is not a JSON object"),
        ({**META, "bits": "16"}, "meta field 'bits' must be int"),
        ({k: v for k, v in META.items() if k != "bits"}, "meta field 'bits' must be int"),
        ({**META, "bits": True}, "meta field 'bits' must be int"),
        ({**META, "bits": 0}, "out of range"),
        ({**META, "count": "4"}, "meta field 'count' must be int"),
        ({**META, "model": []}, "meta field 'model' must be dict"),
        ({**META, "image_size": -3}, "meta field 'image_size' out of range"),
        ({**META, "channels": 1.5}, "meta field 'channels' must be int"),
        ({**META, "class_names": [1, 2]}, "'class_names' must be a list of strings"),
        ({**META, "version": "1" * 5000}, "codes format version"),
        ("[" * 10000 + "]" * 10000, "no readable meta"),
    ],
)
def test_meta_fields_of_the_wrong_type_are_refused(tmp_path, meta, message):
    with pytest.raises(DmuhError, match=message):
        Codes.load(write(tmp_path / "c.npz", meta))


@pytest.mark.parametrize(
    "over, message",
    [
        ({"ids": np.array([["a"], ["b"], ["c"], ["d"]])}, "ids must be a 1-D array"),
        ({"ids": np.zeros(4, np.float32)}, "ids must be a 1-D array of paths or integers"),
        ({"codes": np.zeros((4, 2), np.float32)}, r"codes must be an \(n, bytes\) uint8 array"),
        ({"codes": np.zeros((4, 2, 1), np.uint8)}, r"codes must be an \(n, bytes\) uint8 array"),
        ({"uncertainty": np.array(["x"] * 4)}, "uncertainty must be numbers"),
        ({"uncertainty": np.array([0.1, np.inf, 0.1, 0.1], np.float32)}, "uncertainty must be finite and >= 0"),
        ({"uncertainty": np.array([0.1, -0.5, 0.1, 0.1], np.float32)}, "uncertainty must be finite and >= 0"),
        ({"bit_uncertainty": np.full((4, 16), np.inf, np.float16)}, "bit uncertainty must be finite and >= 0"),
        ({"bit_uncertainty": np.full((4, 16), -1, np.float16)}, "bit uncertainty must be finite and >= 0"),
        ({"bit_uncertainty": np.full((4, 16), np.nan, np.float16)}, "bit uncertainty must be finite and >= 0"),
    ],
)
def test_arrays_of_the_wrong_shape_kind_or_range_are_refused(tmp_path, over, message):
    with pytest.raises(DmuhError, match=message):
        Codes.load(write(tmp_path / "c.npz", **over))


def test_uncertainty_reranking_refuses_infinite_query_uncertainty_and_tau_inf():
    from dmuh.retrieval.rerank import uncertainty_weights

    assert uncertainty_weights(np.full((1, 4), 0.5, np.float32)).shape == (1, 4)
    with pytest.raises(DmuhError, match="finite values >= 0"):
        uncertainty_weights(np.array([[0.1, np.inf, 0.2, 0.3]], np.float32))
    with pytest.raises(DmuhError, match="finite values >= 0"):
        uncertainty_weights(np.array([[0.1, -1, 0.2, 0.3]], np.float32))
    with pytest.raises(DmuhError, match="tau=inf: expected a finite positive number"):
        uncertainty_weights(np.full((1, 4), 0.5, np.float32), tau=float("inf"))
