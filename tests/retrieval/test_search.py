"""dmuh.retrieval.index.faiss: FaissIndex (made by build_index, open_index) over FAISS binary indexes, its file
format (dmuh.retrieval.index.file), re-ranking (dmuh.retrieval.rerank); codes files (dmuh.codes.file)."""

import json
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

pytest.importorskip("faiss")

from dmuh.codes.binary import as_packed, unpack_bits  # noqa: E402
from dmuh.codes.file import Codes  # noqa: E402
from dmuh.errors import DmuhError  # noqa: E402
from dmuh.retrieval.index import SearchParams, build_index, open_index  # noqa: E402
from dmuh.retrieval.rerank import rerank, uncertainty_weights  # noqa: E402


def unpack(packed, bits):
    """(n, bytes) packed codes -> (n, bits) bool, True where the bit is 1."""
    return unpack_bits(packed, bits) > 0


def random_signs(rng, n, bits):
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(n, bits))


def hamming_matrix(query_packed, database_packed):
    """Brute force, independent of dmuh.codes.binary and FAISS: popcount of the xor, bit by bit."""
    xor = np.bitwise_xor(query_packed[:, None, :], database_packed[None, :, :])
    return np.unpackbits(xor, axis=2).sum(axis=2, dtype=np.int32)


def brute_force(query_packed, database_packed, k):
    """Nearest k by (Hamming distance, position): the order CodeIndex.search promises."""
    distances = hamming_matrix(query_packed, database_packed)
    positions = np.arange(database_packed.shape[0])
    order = np.array([np.lexsort((positions, row))[:k] for row in distances])
    return np.take_along_axis(distances, order, axis=1), order


@pytest.mark.parametrize("bits", [12, 16, 64])
def test_flat_search_equals_brute_force_including_ties(bits):
    rng = np.random.default_rng(bits)
    # Few distinct codes among many rows: nearly every distance is tied, at the k-th one too.
    distinct = random_signs(rng, 40, bits)
    database = distinct[rng.integers(0, 40, size=700)]
    queries = random_signs(rng, 25, bits)
    index = build_index(database, kind="flat")
    distances, ids = index.search(queries, k=50)
    expected_distances, expected_positions = brute_force(as_packed(queries)[0], as_packed(database)[0], 50)
    assert distances.dtype == np.int32 and ids.dtype == np.int64
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(ids, expected_positions)


def test_distances_are_hamming_distances_of_sign_codes():
    rng = np.random.default_rng(1)
    database, queries = random_signs(rng, 200, 12), random_signs(rng, 10, 12)
    distances, ids = build_index(database).search(queries, k=200)
    dot = queries @ database.T
    expected = ((12 - dot) / 2).astype(int)  # d_H = (bits - <b_q, b_x>) / 2
    np.testing.assert_array_equal(distances, np.take_along_axis(expected, ids, axis=1))


def test_user_ids_map_positions_and_add_appends():
    rng = np.random.default_rng(2)
    first, second = random_signs(rng, 100, 16), random_signs(rng, 50, 16)
    index = build_index(first, ids=np.arange(100) * 10)
    index.add(second, ids=np.arange(50) + 5000)
    assert len(index) == 150
    queries = random_signs(rng, 5, 16)
    distances, ids = index.search(queries, k=20)
    expected_distances, positions = brute_force(
        as_packed(queries)[0], as_packed(np.concatenate([first, second]))[0], 20
    )
    all_ids = np.concatenate([np.arange(100) * 10, np.arange(50) + 5000])
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(ids, all_ids[positions])


def test_packed_and_unpacked_inputs_agree_and_12_bit_padding_stays_zero():
    rng = np.random.default_rng(3)
    signs = random_signs(rng, 30, 12)
    packed, bits = as_packed(signs)
    assert bits == 12 and packed.shape == (30, 2) and packed.dtype == np.uint8
    assert not (packed[:, 1] & 0x0F).any()  # the 4 padding bits
    np.testing.assert_array_equal(unpack(packed, 12), signs > 0)
    a = build_index(signs).search(signs[:3], k=5)
    b = build_index(packed, bits=12).search(packed[:3], k=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # Set padding bits are zeroed (dmuh.codes.binary' rule), so they never change a distance.
    dirty = packed.copy()
    dirty[:, 1] |= 0x0F
    c = build_index(dirty, bits=12).search(dirty[:3], k=5)
    np.testing.assert_array_equal(a[0], c[0])


@pytest.mark.parametrize("kind, params", [("flat", {}), ("ivf", {"nlist": 8, "nprobe": 8}), ("hnsw", {"m": 8})])
def test_save_load_round_trip(tmp_path, kind, params):
    rng = np.random.default_rng(4)
    database, queries = random_signs(rng, 400, 24), random_signs(rng, 7, 24)
    names = [f"img/{i}.png" for i in range(400)]
    index = build_index(
        database, kind=kind, ids=np.arange(400) + 7, names=names, meta={"model": {"bits": 24}}, **params
    )
    before = index.search(queries, k=15)
    path = tmp_path / f"{kind}.dmuhidx"
    index.save(path)
    loaded = open_index(path)
    assert (loaded.kind, loaded.bits, len(loaded), loaded.params) == (kind, 24, 400, index.params)
    assert loaded.names == names and loaded.meta == {"model": {"bits": 24}}
    after = loaded.search(queries, k=15)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(loaded.codes_at(np.arange(400)), as_packed(database)[0])
    info = loaded.info()
    assert info["count"] == 400 and info["bits"] == 24 and info["version"] == 1


@pytest.mark.parametrize("kind, params", [("ivf", {"nlist": 16, "nprobe": 4}), ("hnsw", {})])
def test_approximate_indexes_find_most_neighbours_with_true_distances(kind, params):
    rng = np.random.default_rng(5)
    centres = random_signs(rng, 16, 32)
    flips = rng.random((1600, 32)) < 0.06  # clustered codes, as trained codes are
    database = centres[np.arange(1600) % 16] * np.where(flips, -1.0, 1.0)
    queries = database[:40] * np.where(rng.random((40, 32)) < 0.03, -1.0, 1.0)
    index = build_index(database, kind=kind, **params)
    distances, ids = index.search(queries, k=10)
    true = hamming_matrix(as_packed(queries)[0], as_packed(database)[0])
    np.testing.assert_array_equal(distances, np.take_along_axis(true, ids, axis=1))
    assert (np.diff(distances, axis=1) >= 0).all()
    exact = np.sort(true, axis=1)[:, 9:10]
    recall = (distances <= exact).mean()
    assert recall > 0.8


def test_search_parameters_apply_to_their_kind_only():
    rng = np.random.default_rng(6)
    database = random_signs(rng, 100, 16)
    with pytest.raises(DmuhError, match="no parameter 'nlist'"):
        build_index(database, kind="hnsw", nlist=4)
    with pytest.raises(DmuhError, match="index kind 'lsh'"):
        build_index(database, kind="lsh")
    with pytest.raises(DmuhError, match="nprobe applies to ivf"):
        build_index(database).search(database[:1], k=3, nprobe=2)
    ivf = build_index(database, kind="ivf", nlist=2)
    assert ivf.search(database[:2], k=3, nprobe=2)[0].shape == (2, 3)


@pytest.mark.parametrize("bits", [8, 48, 128])
def test_the_flat_kernels_dmuh_and_faiss_give_the_same_results(bits):
    """dmuh's counting kernel (the flat default) and FAISS's IndexBinaryFlat search, on heavily tied codes,
    before and after adding and removing codes."""
    rng = np.random.default_rng(bits)
    database = random_signs(rng, 40, bits)[rng.integers(0, 40, size=900)]
    queries = random_signs(rng, 30, bits)
    index = build_index(database, ids=np.arange(900) + 100)
    for k in (1, 10, 100, 900):
        dmuh = index.search(queries, k)
        for a, b in zip(dmuh, index.search(queries, k, SearchParams(kernel="faiss"))):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(dmuh, index.search(queries, k, SearchParams(kernel="dmuh", threads=2))):
            np.testing.assert_array_equal(a, b)
    index.add(queries[:5])
    index.remove(np.arange(100, 400))
    after = index.search(queries, 20)
    np.testing.assert_array_equal(after[1][:5, 0], np.arange(1000, 1005))  # the added codes themselves
    for a, b in zip(after, index.search(queries, 20, SearchParams(kernel="faiss"))):
        np.testing.assert_array_equal(a, b)


def test_concurrent_flat_searches_on_the_dmuh_kernel_match_the_sequential_ones():
    """The service searches one index from several threads at once: each call's kernel threads are its own."""
    rng = np.random.default_rng(9)
    database = random_signs(rng, 5000, 64)
    index = build_index(database)
    batches = [random_signs(rng, 40, 64) for _ in range(6)]
    expected = [index.search(queries, 25, SearchParams(kernel="faiss")) for queries in batches]
    failures = []
    barrier = threading.Barrier(len(batches))

    def run(queries, want):
        barrier.wait()
        for _ in range(5):
            got = index.search(queries, 25, SearchParams(threads=2))
            if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
                failures.append(1)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(batches, expected)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_kernel_and_threads_apply_to_flat_faiss_indexes_only():
    rng = np.random.default_rng(8)
    database = random_signs(rng, 200, 16)
    hnsw = build_index(database, kind="hnsw", m=8)
    with pytest.raises(DmuhError, match="kernel applies to flat indexes of the faiss backend, not faiss hnsw"):
        hnsw.search(database[:1], 3, SearchParams(kernel="dmuh"))
    with pytest.raises(DmuhError, match="threads applies to flat"):
        hnsw.search(database[:1], 3, SearchParams(threads=2))
    with pytest.raises(DmuhError, match="threads applies to the dmuh kernel"):
        build_index(database).search(database[:1], 3, SearchParams(kernel="faiss", threads=2))
    with pytest.raises(DmuhError, match="kernel='annoy'"):
        SearchParams(kernel="annoy")
    with pytest.raises(DmuhError, match="threads=0"):
        SearchParams(threads=0)
    assert SearchParams.of(SearchParams(kernel="faiss"), nprobe=2) == SearchParams(nprobe=2, kernel="faiss")


def test_dmuh_search_kernel_and_threads_flags(tmp_path):
    """`dmuh search --kernel faiss|dmuh --threads N` on a flat index: the same results, each flag checked."""
    make_codes(n=300, bits=24).save(tmp_path / "db.npz")
    queries = make_codes(n=4, bits=24)
    queries.save(tmp_path / "q.npz")
    build = subprocess.run(
        [sys.executable, "-m", "dmuh", "index", "build", "--codes", tmp_path / "db.npz", "--out", tmp_path / "i.idx"],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr

    def search(*flags):
        return subprocess.run(
            [sys.executable, "-m", "dmuh", "search", "--index", tmp_path / "i.idx", "--queries", tmp_path / "q.npz"]
            + ["--k", "7", "--json", *flags],
            capture_output=True,
            text=True,
        )

    results = [search(*flags) for flags in ([], ["--kernel", "faiss"], ["--kernel", "dmuh", "--threads", "2"])]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    reports = [json.loads(r.stdout)["queries"] for r in results]
    assert reports[0] == reports[1] == reports[2] and len(reports[0]) == 4
    refused = search("--threads", "0")
    assert refused.returncode == 2 and "--threads" in refused.stderr and "Traceback" not in refused.stderr
    refused = search("--kernel", "faiss", "--threads", "2")
    assert refused.returncode == 2 and "threads applies to the dmuh kernel" in refused.stderr


def test_k_and_bit_length_are_checked():
    rng = np.random.default_rng(7)
    index = build_index(random_signs(rng, 10, 16))
    with pytest.raises(DmuhError, match="k=11 is larger than the index, which holds 10 codes"):
        index.search(random_signs(rng, 1, 16), k=11)
    with pytest.raises(DmuhError, match="k=0"):
        index.search(random_signs(rng, 1, 16), k=0)
    with pytest.raises(DmuhError, match="query codes: has 12 bits but bits=16"):
        index.search(random_signs(rng, 1, 12), k=1)
    with pytest.raises(DmuhError, match="3 packed bytes cannot hold bits=16"):
        index.search(np.zeros((1, 3), dtype=np.uint8), k=1)
    with pytest.raises(DmuhError, match="ids: expected 2 integers"):
        index.add(random_signs(rng, 2, 16), ids=[1])


# -- the index file -----------------------------------------------------------------------------


@pytest.fixture
def saved_index(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "db.dmuhidx"
    build_index(random_signs(rng, 300, 16), names=[f"{i}.jpg" for i in range(300)]).save(path)
    return path


def test_truncated_index_is_refused(saved_index):
    data = saved_index.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 30, 5, 0):
        saved_index.write_bytes(data[:cut])
        with pytest.raises(DmuhError, match=rf"{saved_index.name}: (truncated|not a dmuh index)"):
            open_index(saved_index)


def test_corrupted_index_is_refused(saved_index):
    data = bytearray(saved_index.read_bytes())
    for position, what in ((len(data) - 100, "payload checksum"), (40, "header checksum")):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x10
        saved_index.write_bytes(bytes(corrupted))
        with pytest.raises(DmuhError, match=f"{saved_index.name}: corrupted index \\({what} mismatch\\)"):
            open_index(saved_index)


def test_foreign_and_future_index_files_are_refused(tmp_path, saved_index):
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x00" * 100)
    with pytest.raises(DmuhError, match="not a dmuh index file"):
        open_index(other)
    with pytest.raises(DmuhError, match="index file not found"):
        open_index(tmp_path / "missing.dmuhidx")
    data = saved_index.read_bytes()
    magic, size, _ = struct.unpack_from("<8sII", data)
    header = json.loads(data[16 : 16 + size])
    header["version"] = 99
    new_header = json.dumps(header, sort_keys=True).encode()
    saved_index.write_bytes(
        struct.pack("<8sII", magic, len(new_header), zlib.crc32(new_header)) + new_header + data[16 + size :]
    )
    with pytest.raises(DmuhError, match="index format version 99; this dmuh reads version 1"):
        open_index(saved_index)


def test_save_does_not_overwrite_unless_asked(saved_index):
    before = saved_index.read_bytes()
    index = build_index(np.ones((3, 8), dtype=np.float32))
    with pytest.raises(DmuhError, match="already exists; pass --force"):
        index.save(saved_index, overwrite=False)
    assert saved_index.read_bytes() == before
    index.save(saved_index)
    assert len(open_index(saved_index)) == 3


# -- re-ranking ---------------------------------------------------------------------------------


def test_weights_down_weight_bits_uncertain_relative_to_the_query():
    u = np.array([[0.0, 0.1, 0.5], [0.0, 0.01, 0.05], [0.0, 0.0, 0.0]])  # row 1 = row 0 / 10
    weights = uncertainty_weights(u, tau=0.5)
    np.testing.assert_allclose(weights[0], np.exp(-u[0] / (0.5 * 0.2)), rtol=1e-6)  # mean u = 0.2
    np.testing.assert_allclose(weights[1], weights[0], rtol=1e-5)  # free of the scale of u
    np.testing.assert_array_equal(weights[2], [1.0, 1.0, 1.0])  # no uncertainty: plain Hamming
    with pytest.raises(DmuhError, match="tau"):
        uncertainty_weights(np.zeros((1, 3)), tau=0.0)


def test_rerank_prefers_mismatches_on_uncertain_bits():
    query = np.array([[1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.float32)
    candidates = np.array(
        [
            [-1, 1, 1, 1, 1, 1, 1, 1],  # differs on bit 0 (certain)
            [1, 1, 1, 1, 1, 1, 1, -1],  # differs on bit 7 (uncertain)
            [1, 1, 1, 1, 1, 1, 1, 1],  # identical
        ],
        dtype=np.float32,
    )
    uncertainty = np.array([[0, 0, 0, 0, 0, 0, 0, 0.8]], dtype=np.float32)
    index = build_index(candidates)
    plain_distances, plain_ids = index.search(query, k=3)
    assert plain_ids.tolist() == [[2, 0, 1]] and plain_distances.tolist() == [[0, 1, 1]]
    result = index.search_reranked(query, uncertainty, k=3, depth=3, tau=1.0)
    assert result["ids"].tolist() == [[2, 1, 0]]
    assert result["distances"].tolist() == [[0, 1, 1]]
    np.testing.assert_allclose(result["weighted"], [[0.0, np.exp(-8.0), 1.0]], rtol=1e-5)  # mean u = 0.1


def test_rerank_with_zero_uncertainty_keeps_the_hamming_order():
    rng = np.random.default_rng(9)
    database, queries = random_signs(rng, 500, 16), random_signs(rng, 12, 16)
    index = build_index(database)
    distances, ids = index.search(queries, k=30)
    result = index.search_reranked(queries, np.zeros((12, 16), np.float32), k=30, depth=100)
    np.testing.assert_array_equal(result["ids"], ids)
    np.testing.assert_array_equal(result["distances"], distances)
    np.testing.assert_allclose(result["weighted"], distances)
    # Direct use: the order returned indexes the candidates.
    positions = np.tile(np.arange(4), (1, 1))
    order, weighted = rerank(
        as_packed(queries[:1])[0], np.zeros((1, 16), np.float32), index.codes_at(positions), positions, 16
    )
    assert order.shape == (1, 4) and weighted.shape == (1, 4)


def test_rerank_needs_one_uncertainty_per_query_bit():
    rng = np.random.default_rng(10)
    index = build_index(random_signs(rng, 50, 16))
    with pytest.raises(DmuhError, match=r"bit uncertainty: expected shape \(2, 16\)"):
        index.search_reranked(random_signs(rng, 2, 16), np.zeros((2, 12)), k=5)


# -- codes files --------------------------------------------------------------------------------


def make_codes(n=20, bits=12, **extra):
    rng = np.random.default_rng(11)
    return Codes(
        as_packed(random_signs(rng, n, bits))[0],
        bits,
        [f"a/{i}.png" for i in range(n)],
        model={"checkpoint_sha256": "ab" * 32, "bits": bits},
        image_size=8,
        channels=1,
        **extra,
    )


def test_codes_file_round_trip(tmp_path):
    rng = np.random.default_rng(12)
    codes = make_codes(
        labels=np.eye(20, 3, dtype=np.uint8),
        class_names=["a", "b", "c"],
        uncertainty=rng.random(20),
        bit_uncertainty=rng.random((20, 12)),
    )
    codes.save(tmp_path / "codes.npz")
    loaded = Codes.load(tmp_path / "codes.npz")
    np.testing.assert_array_equal(loaded.packed, codes.packed)
    assert loaded.bits == 12 and loaded.ids == codes.ids and loaded.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded.labels, codes.labels)
    assert loaded.uncertainty.dtype == np.float32 and loaded.bit_uncertainty.dtype == np.float16
    np.testing.assert_array_equal(loaded.bit_uncertainty, codes.bit_uncertainty)
    assert loaded.model == codes.model and loaded.image_size == 8
    index = build_index(loaded)  # a Codes object brings its bits, names and identity
    assert index.names == codes.ids and index.meta["model"] == codes.model


def test_truncated_or_corrupted_codes_file_is_refused(tmp_path):
    path = tmp_path / "codes.npz"
    make_codes(n=200).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DmuhError, match="codes.npz: truncated or corrupted codes file"):
        Codes.load(path)
    start = data.find(b"codes.npy")  # flip a byte inside the codes array
    corrupted = bytearray(data)
    corrupted[start + 200] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(DmuhError, match="codes.npz: truncated or corrupted codes file"):
        Codes.load(path)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DmuhError, match="not a dmuh codes file"):
        Codes.load(tmp_path / "other.npz")
    with pytest.raises(DmuhError, match="already exists; pass --force"):
        make_codes().save(tmp_path / "other.npz", overwrite=False)
