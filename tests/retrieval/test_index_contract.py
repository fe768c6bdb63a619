"""The index contract (dmuh.retrieval.index.base.CodeIndex), its factories (build_index, open_index), search
parameters per call (SearchParams) and re-rankers wrapped around an index (dmuh.retrieval.rerank)."""

import dataclasses
import threading

import numpy as np
import pytest

pytest.importorskip("faiss")

from dmuh.errors import DmuhError  # noqa: E402
from dmuh.retrieval.index import CodeIndex, FaissIndex, SearchParams, build_index, open_index  # noqa: E402
from dmuh.retrieval.index.file import read_index_file, write_index_file  # noqa: E402
from dmuh.retrieval.rerank import (  # noqa: E402
    Query,
    Reranked,
    RerankedIndex,
    Reranker,
    UncertaintyReranker,
    reranker_for,
)
from dmuh.retrieval.service import SearchService  # noqa: E402


def random_codes(seed, n, bits=32):
    return np.random.default_rng(seed).integers(0, 2, size=(n, bits)).astype(bool)


def test_the_contract_is_abstract():
    with pytest.raises(TypeError):
        CodeIndex()
    missing = {name for name in CodeIndex.__abstractmethods__}
    assert {"_search_packed", "add", "remove", "save", "info", "__len__", "codes_at", "ids_at"} <= missing


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
    old = {
        key: value
        for key, value in header.items()
        if key not in ("backend", "next_id", "decoder", "sections", "payload_size", "payload_sha256")
    }
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


# -- search parameters per call ---------------------------------------------------------------------


def test_search_params_are_a_frozen_checked_value():
    params = SearchParams(nprobe=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.nprobe = 8
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DmuhError, match="expected a positive integer"):
            SearchParams(ef_search=bad)
    assert SearchParams.of(params, ef_search=9) == SearchParams(nprobe=4, ef_search=9)
    assert SearchParams.of(None, nprobe=3) == SearchParams(nprobe=3)


def ivf_and_hnsw(seed=5, n=3000):
    database = random_codes(seed, n, bits=64)
    return (
        database,
        build_index(database, kind="ivf", nlist=32, nprobe=1),
        build_index(database, kind="hnsw", m=8, ef_construction=40, ef_search=16),
    )


def test_search_params_apply_to_one_call_and_leave_the_index_as_built():
    database, ivf, hnsw = ivf_and_hnsw()
    queries = database[:50] ^ (np.random.default_rng(0).random(database[:50].shape) < 0.2)
    default = ivf.search(queries, 10)
    every_list = ivf.search(queries, 10, SearchParams(nprobe=32))
    np.testing.assert_array_equal(every_list[0], build_index(database).search(queries, 10)[0])  # nprobe = nlist: exact
    assert not np.array_equal(default[0], every_list[0])  # nprobe=1 misses some
    assert ivf.faiss_index.nprobe == 1  # the FAISS object is not changed by a search
    for a, b in zip(default, ivf.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ivf.search(queries, 10, nprobe=32)[1], every_list[1])  # the shortcut
    wide = hnsw.search(queries, 10, SearchParams(ef_search=200))
    assert hnsw.faiss_index.hnsw.efSearch == 16
    np.testing.assert_array_equal(hnsw.search(queries, 10, ef_search=200)[1], wide[1])
    with pytest.raises(DmuhError, match="nprobe applies to ivf indexes, not hnsw"):
        hnsw.search(queries, 10, SearchParams(nprobe=2))
    with pytest.raises(DmuhError, match="ef_search applies to hnsw indexes, not ivf"):
        ivf.search(queries, 10, SearchParams(ef_search=2))


def test_concurrent_searches_with_different_params_match_the_sequential_results():
    database, ivf, hnsw = ivf_and_hnsw(seed=6)
    queries = database[::7][:200] ^ (np.random.default_rng(1).random((200, 64)) < 0.25)
    calls = [
        (ivf, SearchParams(nprobe=1)),
        (ivf, SearchParams(nprobe=16)),
        (hnsw, SearchParams(ef_search=10)),
        (hnsw, SearchParams(ef_search=300)),
    ]
    expected = [index.search(queries, 20, params) for index, params in calls]
    assert not np.array_equal(expected[0][1], expected[1][1]) and not np.array_equal(expected[2][1], expected[3][1])
    failures = []
    barrier = threading.Barrier(2 * len(calls))

    def run(index, params, want):
        barrier.wait()
        for _ in range(15):
            got = index.search(queries, 20, params)
            if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
                failures.append(params)

    threads = [
        threading.Thread(target=run, args=(index, params, want))
        for (index, params), want in zip(calls + calls, expected + expected)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# -- re-rankers wrapped around an index ------------------------------------------------------------


def test_rerankers_wrap_any_index_and_match_the_index_methods():
    database, ivf, hnsw = ivf_and_hnsw(seed=7, n=800)
    queries = database[:20] ^ (np.random.default_rng(2).random((20, 64)) < 0.2)
    uncertainty = np.random.default_rng(3).random((20, 64)).astype(np.float32)
    for index in (build_index(database), ivf, hnsw):
        searcher = RerankedIndex(index, UncertaintyReranker(tau=0.5), depth=50)
        result = searcher.search(
            Query(queries, bit_uncertainty=uncertainty),
            10,
            SearchParams.of(None, nprobe=4 if index.kind == "ivf" else None),
        )
        expected = index.search_reranked(
            queries, uncertainty, 10, depth=50, tau=0.5, nprobe=4 if index.kind == "ivf" else None
        )
        assert list(result) == list(expected) == ["weighted", "distances", "positions", "ids"]
        for key in expected:
            np.testing.assert_array_equal(result[key], expected[key])
    assert isinstance(reranker_for("uncertainty", ivf, 2.0), UncertaintyReranker)
    with pytest.raises(DmuhError, match="holds no decoder"):
        reranker_for("decoder", ivf)
    with pytest.raises(DmuhError, match="choose uncertainty or decoder"):
        reranker_for("cosine", ivf)


def test_a_reranker_of_ones_own_goes_through_the_same_contract():
    class Farthest(Reranker):
        score = "hamming"

        def rerank(self, query, candidates):
            order = np.argsort(-candidates.distances, axis=1, kind="stable")
            return Reranked(order, candidates.distances.astype(np.float32))

    database = random_codes(8, 100)
    result = RerankedIndex(build_index(database), Farthest(), depth=100).search(Query(database[:3]), 5)
    everything = build_index(database).search(database[:3], 100)[0]
    np.testing.assert_array_equal(result["distances"], result["hamming"])
    assert (result["distances"][:, 0] == everything[:, -1]).all()


def test_the_search_service_searches_concurrently_with_per_call_params():
    """No lock around the index: `dmuh serve` and `dmuh search` share SearchService.search_batch."""
    database, ivf, _ = ivf_and_hnsw(seed=9)
    service = SearchService(ivf, index_path="ivf.dmuhidx")
    queries = Query(database[::11][:100] ^ (np.random.default_rng(4).random((100, 64)) < 0.25))
    settings = [SearchParams(nprobe=n) for n in (1, 3, 32)]
    expected = [service.search_batch(queries, 15, params=params)["results"] for params in settings]
    assert expected[0] != expected[2]
    failures = []

    def run(params, want):
        for _ in range(10):
            if service.search_batch(queries, 15, params=params)["results"] != want:
                failures.append(params)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(settings * 2, expected * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
