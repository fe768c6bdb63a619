"""Every field of an index file checked before use (issue 31, class 2): a file whose checksums were
recomputed after its header or sections were changed is refused in one line, naming the field."""

import json

import numpy as np
import pytest

from dmuh.errors import DmuhError
from dmuh.retrieval.index import build_index, open_index
from dmuh.retrieval.index.file import read_index_file, write_index_file

pytest.importorskip("faiss")


@pytest.fixture()
def saved(tmp_path):
    rng = np.random.default_rng(3)
    index = build_index(rng.integers(0, 256, (60, 2), dtype=np.uint8), bits=16, names=[f"a/{i}.png" for i in range(60)],
                        kind="hnsw")  # fmt: skip
    path = tmp_path / "i.dmuhidx"
    index.save(path)
    return path


def rewrite(path, header_change=None, sections_change=None):
    header, sections = read_index_file(path, ("flat", "ivf", "hnsw"))
    for key in ("sections", "payload_size", "payload_sha256"):
        header.pop(key)
    if header_change:
        header_change(header)
    if sections_change:
        sections_change(sections)
    write_index_file(path, header, list(sections.items()))


def test_an_untouched_rewrite_opens(saved):
    rewrite(saved)
    with open_index(saved) as index:
        assert len(index) == 60


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h.__setitem__("params", {"ef_search": "128", "m": 32, "ef_construction": 64}), "'params' must be"),
        (lambda h: h.__setitem__("params", []), "'params' must be"),
        (lambda h: h.__setitem__("params", {"ef_search": 2**40, "m": 32, "ef_construction": 64}), "'params' must be"),
        (lambda h: h.__setitem__("bits", "16"), "'bits' must be"),
        (lambda h: h.__setitem__("bits", 2**70), "'bits' must be"),
        (lambda h: h.__setitem__("count", -1), "'count' must be"),
        (lambda h: h.__setitem__("count", True), "'count' must be"),
        (lambda h: h.__setitem__("meta", "x"), "'meta' must be an object"),
        (lambda h: h.__setitem__("next_id", 2**70), "'next_id' must be a 64-bit integer"),
        (lambda h: h.__setitem__("kind", ["flat"]), "header lacks a known kind|'kind' must be"),
    ],
)
def test_header_fields_of_the_wrong_type_are_refused(saved, change, message):
    try:
        rewrite(saved, change)
    except TypeError:  # the header cannot even be written (an unhashable kind): nothing to read
        return
    with pytest.raises(DmuhError, match=message):
        open_index(saved)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.__setitem__("ids", s["ids"] + b"\x01\x02\x03"), "ids section is not whole 64-bit integers"),
        (lambda s: s.__setitem__("names", json.dumps({"a": 1}).encode()), "names section must be a list of strings"),
        (lambda s: s.__setitem__("names", b"\xff\xfe not json"), "names section is not JSON"),
        (lambda s: s.__setitem__("names", json.dumps([1] * 60).encode()), "names section must be a list of strings"),
        (lambda s: s.__setitem__("names", ("[" * 5000 + "]" * 5000).encode()), "names section is not JSON"),
        (lambda s: s.pop("ids"), "ids section"),
        (lambda s: s.__setitem__("name_offsets", s["name_offsets"][:-8]), "name offsets do not cut"),
        (lambda s: s.pop("name_bytes"), "only one of its two names sections"),
        (lambda s: s.__setitem__("name_bytes", s["name_bytes"][:-1] + b"\xff"), "names are not UTF-8"),
    ],
)
def test_sections_of_the_wrong_shape_are_refused(saved, change, message):
    rewrite(saved, sections_change=change)
    with pytest.raises(DmuhError, match=message):
        open_index(saved)


def test_a_header_that_is_not_an_object_is_refused(saved):
    import struct
    import zlib

    header = b"[1, 2, 3]"
    saved.write_bytes(struct.pack("<8sII", b"DMUHIDX\n", len(header), zlib.crc32(header)) + header)
    with pytest.raises(DmuhError, match="its header is not a JSON object"):
        open_index(saved)


@pytest.mark.parametrize("content", ["folder", b"\x00garbage" * 100, b"SQLite format 3\x00" + bytes(84)])
def test_a_milvus_lite_uri_that_is_no_database_is_refused(tmp_path, content):
    from dmuh.retrieval.index.milvus import check_lite_file

    uri = tmp_path / "x.db"
    if content == "folder":
        uri.mkdir()
    else:
        uri.write_bytes(content)
    with pytest.raises(DmuhError, match="is a folder|not a Milvus Lite database|truncated"):
        check_lite_file(str(uri))


def test_a_truncated_milvus_lite_database_is_refused(tmp_path):
    import sqlite3

    from dmuh.retrieval.index.milvus import check_lite_file

    db = tmp_path / "whole.db"
    with sqlite3.connect(db) as connection:
        connection.execute("create table t (x)")
        connection.executemany("insert into t values (?)", [(b"x" * 2000,)] * 50)
    check_lite_file(str(db))
    cut = tmp_path / "cut.db"
    cut.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    with pytest.raises(DmuhError, match="truncated Milvus Lite database"):
        check_lite_file(str(cut))
