"""dmuh.retrieval.index.names: an index's names as one UTF-8 blob and offsets."""

import json

import numpy as np
import pytest

from dmuh.errors import DmuhError
from dmuh.retrieval.index.names import NameTable

NAMES = ["a.png", "dir/é.jpg", "", "x" * 300, "中文/图.png", "a.png"]


def sections_of(table):
    return dict(table.sections())


def test_a_table_is_the_sequence_it_was_made_of():
    table = NameTable.of(NAMES)
    assert len(table) == 6 and list(table) == NAMES and table == NAMES and table[1] == "dir/é.jpg"
    assert table[-1] == "a.png" and table[1:3] == NAMES[1:3] and table.take([4, 0]) == ["中文/图.png", "a.png"]
    # "é" is 2 bytes, "中文/图" 3 per character: the offsets count bytes
    assert table.offsets.tolist() == [0, 5, 15, 15, 315, 329, 334]
    with pytest.raises(IndexError):
        table[6]
    assert NameTable() == [] and len(NameTable()) == 0


def test_subset_extended_and_positions_of():
    table = NameTable.of(NAMES)
    assert table.subset([4, 1, 1]) == [NAMES[4], NAMES[1], NAMES[1]]
    assert table.subset([]) == []
    assert table.extended(["new.png"]) == NAMES + ["new.png"]
    assert table.extended(NameTable.of(["b", "c"])).take([6, 7]) == ["b", "c"]
    assert table.positions_of({"a.png", "中文/图.png", "absent"}).tolist() == [0, 4, 5]


def test_sections_round_trip_and_the_legacy_json_list():
    table = NameTable.of(NAMES)
    assert NameTable.from_sections("f.idx", sections_of(table), 6) == table
    memory = {name: memoryview(data) for name, data in table.sections()}  # as read_index_file gives them
    assert NameTable.from_sections("f.idx", memory, 6) == NAMES
    legacy = {"names": json.dumps(NAMES, ensure_ascii=False).encode()}
    assert NameTable.from_sections("f.idx", legacy, 6) == NAMES
    assert NameTable.from_sections("f.idx", {}, 6) is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: {**s, "name_offsets": s["name_offsets"][:-3]}, "whole 64-bit"),
        (lambda s: {**s, "name_offsets": np.array([0, 9, 5, 15], "<i8").tobytes()}, "do not cut"),
        (lambda s: {**s, "name_offsets": np.array([0, 5, 14], "<i8").tobytes()}, "do not cut"),
        (lambda s: {**s, "name_offsets": np.array([0, 10, 15], "<i8").tobytes()}, "not UTF-8"),  # inside "é"
        (lambda s: {"name_offsets": np.array([0, 5, 7], "<i8").tobytes(), "name_bytes": b"a.png\xff\xfe"}, "not UTF-8"),
        (lambda s: {"name_bytes": s["name_bytes"]}, "only one of its two"),
        (lambda s: {"names": b"[1, 2]"}, "list of strings"),
        (lambda s: {"names": b"not json"}, "not JSON"),
    ],
)
def test_a_corrupted_names_section_is_one_line_naming_the_file(change, message):
    sections = change(sections_of(NameTable.of(["a.png", "dir/é.jpg"])))
    with pytest.raises(DmuhError, match=message) as caught:
        NameTable.from_sections("bad.idx", sections, 2)
    assert str(caught.value).startswith("bad.idx: ")


def test_a_count_that_differs_from_the_codes_is_refused():
    with pytest.raises(DmuhError, match="2 names for 3 codes"):
        NameTable.from_sections("bad.idx", sections_of(NameTable.of(["a", "b"])), 3)
