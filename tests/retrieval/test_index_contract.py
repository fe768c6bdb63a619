"""The index contract (dmuh.retrieval.index.base.CodeIndex) and its factories, build_index and open_index."""

import numpy as np
import pytest

pytest.importorskip("faiss")

from dmuh.errors import DmuhError  # noqa: E402
from dmuh.retrieval.index import CodeIndex, FaissIndex, build_index, open_index  # noqa: E402
from dmuh.retrieval.index.file import read_index_file, write_index_file  # noqa: E402


def random_codes(seed, n, bits=32):
    return np.random.default_rng(seed).integers(0, 2, size=(n, bits)).astype(bool)


def test_the_contract_is_abstract():
    with pytest.raises(TypeError):
        CodeIndex()
    missing = {name for name in CodeIndex.__abstractmethods__}
    assert {"search_positions", "add", "remove", "save", "info", "__len__", "codes_at", "ids_at"} <= missing


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_build_index_makes_a_faiss_index_and_open_index_reads_it_back(tmp_path, kind):
    database = random_codes(1, 400)
    index = build_index(database, kind=kind, names=[f"{i}.jpg" for i in range(400)])
    assert isinstance(index, FaissIndex) and isinstance(index, CodeIndex)
    assert (index.backend, index.kind, index.bits, index.count) == ("faiss", kind, 32, 400)
    index.save(tmp_path / "i.dmuhidx")
    loaded = open_index(tmp_path / "i.dmuhidx")
    assert isinstance(loaded, FaissIndex) and loaded.kind == kind and loaded.count == 400
    for a, b in zip(index.search(database[:5], 10), loaded.search(database[:5], 10)):
        np.testing.assert_array_equal(a, b)


def test_build_index_refuses_an_unknown_backend_or_kind():
    with pytest.raises(DmuhError, match="index backend 'annoy'"):
        build_index(random_codes(2, 10), backend="annoy")
    with pytest.raises(DmuhError, match="index kind 'lsh'"):
        build_index(random_codes(2, 10), kind="lsh")


def test_an_index_file_written_before_backends_were_named_still_opens(tmp_path):
    """Files of the first format version name no backend (and no next id): they are FAISS indexes."""
    database = random_codes(3, 50)
    build_index(database, ids=np.arange(50) + 5).save(tmp_path / "new.dmuhidx")
    header, sections = read_index_file(tmp_path / "new.dmuhidx", ("flat",))
    old = {key: value for key, value in header.items()
           if key not in ("backend", "next_id", "decoder", "sections", "payload_size", "payload_sha256")}
    write_index_file(tmp_path / "old.dmuhidx", old, list(sections.items()))
    loaded = open_index(tmp_path / "old.dmuhidx")
    assert isinstance(loaded, FaissIndex) and loaded.next_id == 55
    np.testing.assert_array_equal(loaded.search(database[:3], 1)[1][:, 0], [5, 6, 7])


def test_open_index_refuses_an_unknown_backend(tmp_path):
    build_index(random_codes(4, 20)).save(tmp_path / "a.dmuhidx")
    header, sections = read_index_file(tmp_path / "a.dmuhidx", ("flat",))
    header = {key: value for key, value in header.items() if key not in ("sections", "payload_size", "payload_sha256")}
    write_index_file(tmp_path / "b.dmuhidx", {**header, "backend": "annoy"}, list(sections.items()))
    with pytest.raises(DmuhError, match="index backend 'annoy'"):
        open_index(tmp_path / "b.dmuhidx")
