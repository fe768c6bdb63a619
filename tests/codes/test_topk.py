"""dmuh.codes.topk: the exact Hamming top-k kernel equals FAISS's IndexBinaryFlat and an independent
numpy reference, ties at the k-th distance included (by (distance, position)), on random and
clustered codes, at several bit lengths, k from 1 to past the database, on one and several threads."""

import numpy as np
import pytest

from dmuh.codes.binary import pack_bits, packed_words
from dmuh.codes.topk import default_threads, hamming_topk
from dmuh.errors import DmuhError

faiss = pytest.importorskip("faiss")

KS = [1, 10, 100, 1000]


def random_packed(rng, n, bits):
    return pack_bits(rng.integers(0, 2, size=(n, bits)).astype(bool))


def clustered_packed(rng, n, bits, centres=5, flip=0.03):
    """Codes near a few centres, with many exact duplicates: long runs of tied distances."""
    centre_bits = rng.integers(0, 2, size=(centres, bits)).astype(bool)
    unpacked = centre_bits[rng.integers(0, centres, size=n)]
    unpacked ^= rng.random((n, bits)) < flip
    unpacked[::3] = centre_bits[0]  # every third code the same
    return pack_bits(unpacked)


def reference_topk(queries, database, k):
    """Every distance by numpy, then a stable sort: the (distance, position) order; -1 past the database."""
    xor = queries[:, None, :] ^ database[None, :, :]
    distances = np.unpackbits(xor, axis=2).sum(axis=2).astype(np.int32)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(distances, order, axis=1)
    missing = k - order.shape[1]
    pad = np.full((len(queries), missing), -1)
    return np.hstack([kept, pad]).astype(np.int32), np.hstack([order, pad]).astype(np.int64)


def faiss_topk(queries, database, k):
    """FAISS's IndexBinaryFlat, its slots past the database as (-1, -1)."""
    index = faiss.IndexBinaryFlat(8 * database.shape[1])
    index.add(database)
    distances, positions = index.search(queries, k)
    distances[positions < 0] = -1
    return distances, positions


@pytest.mark.parametrize("bits", [8, 24, 48, 64, 128, 1024])
@pytest.mark.parametrize("codes", ["random", "clustered"])
def test_the_kernel_equals_faiss_flat_and_a_stable_sort(bits, codes):
    rng = np.random.default_rng(bits + (codes == "clustered"))
    make = random_packed if codes == "random" else clustered_packed
    n = 1500 if bits < 1024 else 600
    database, queries = make(rng, n, bits), make(rng, 12, bits)
    words = packed_words(database)
    for k in KS + [n, n + 7]:
        want = reference_topk(queries, database, k)
        got = hamming_topk(queries, words, k, threads=1)
        for a, b, c in zip(got, want, faiss_topk(queries, database, k)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
        for a, b in zip(hamming_topk(queries, words, k, threads=3), got):
            np.testing.assert_array_equal(a, b)


def test_ties_at_the_kth_distance_go_to_the_lower_positions():
    database = np.zeros((5000, 8), dtype=np.uint8)  # every code at distance 0 from the query
    database[4321] = 255  # one far code
    distances, positions = hamming_topk(database[:2], packed_words(database), 700)
    assert (distances == 0).all()
    np.testing.assert_array_equal(positions, np.tile(np.arange(700), (2, 1)))
    distances, positions = hamming_topk(database[4321:4322], packed_words(database), 3)
    assert distances.tolist() == [[0, 64, 64]] and positions.tolist() == [[4321, 0, 1]]


def test_many_queries_split_over_threads_keep_their_rows():
    rng = np.random.default_rng(7)
    database, queries = clustered_packed(rng, 3000, 64), clustered_packed(rng, 301, 64)
    words = packed_words(database)
    one = hamming_topk(queries, words, 50, threads=1)
    for a, b in zip(hamming_topk(queries, words, 50, threads=4), one):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(one, reference_topk(queries, database, 50)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_refused_with_one_line():
    database = np.zeros((10, 8), dtype=np.uint8)
    words = packed_words(database)
    with pytest.raises(DmuhError, match="k=0"):
        hamming_topk(database, words, 0)
    with pytest.raises(DmuhError, match="threads=0"):
        hamming_topk(database, words, 1, threads=0)
    with pytest.raises(DmuhError, match="queries of 16 bytes"):
        hamming_topk(np.zeros((1, 16), dtype=np.uint8), words, 1)
    assert default_threads() >= 1
