"""Exact Hamming top-k of packed binary codes: the k nearest database codes of each query, ordered by
(distance, position), ties at the k-th distance going to the lower position (the order the index
contract, `dmuh.retrieval.index.base`, defines).

    distances, positions = hamming_topk(query_packed, packed_words(db_packed), k, threads=2)

A b-bit Hamming distance takes only b + 1 values, so no sort is needed. Each query keeps a buffer of
candidates in database order and a bound: only a code strictly nearer than the bound can still
enter (an equal distance at a later position loses the tie). When the buffer fills, a counting pass
over the distances finds the k-th distance t of the (distance, position) order and keeps the codes
nearer than t plus the first codes at t, k in all; t becomes the bound. A last counting sort by
distance, stable in database order, lays out the result. The distances of a block of the database
are computed for a group of queries while the block stays in cache (one hardware popcount per
64-bit word, vectorised by LLVM for this machine), and a block whose nearest code is not nearer
than a query's bound is skipped without a branch per code.

The kernel is compiled with numba (on first use, then from numba's on-disk cache) and releases the
GIL, so groups of queries run on plain Python threads: no OpenMP pool that spins on shared cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from dmuh.errors import DmuhError

DB_BLOCK = 2048  # database codes per block: W x 16 KiB of words and a 16 KiB distance buffer stay in L1/L2
_MAX_GROUP = 64  # queries sharing each database block (cache reuse); several groups per thread balance the load
_GROUP_BUFFER_BYTES = 32 << 20  # candidate buffers of one group of queries stay under this
_MAX_DEFAULT_THREADS = 16  # past this, memory bandwidth, not cores, bounds a flat scan


def default_threads() -> int:
    """Threads a search uses unless told: the cores this process may run on, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_DEFAULT_THREADS))


@intrinsic
def _popcount(typingctx, word):
    """LLVM's ctpop on a uint64 (as int64): the popcnt / vpopcntq instruction where the CPU has it."""
    signature = types.int64(types.uint64)

    def codegen(context, builder, sig, args):
        function = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(function, args)

    return signature, codegen


@njit(nogil=True, cache=True)
def block_distances(query_words, query, db_words, start, size, out):
    """Hamming distances of query row `query` of query_words (nq, W) to database codes start..start+size-1
    of db_words (W, n), into out[:size] (int64): one popcount per word, vectorised over the block.
    Returns the smallest of them."""
    n_words = db_words.shape[0]
    if n_words > 1:
        row = db_words[0, start : start + size]
        word = query_words[query, 0]
        for j in range(size):
            out[j] = _popcount(word ^ row[j])
        for w in range(1, n_words - 1):
            row = db_words[w, start : start + size]
            word = query_words[query, w]
            for j in range(size):
                out[j] += _popcount(word ^ row[j])
    row = db_words[n_words - 1, start : start + size]
    word = query_words[query, n_words - 1]
    nearest = 64 * n_words
    for j in range(size):
        d = _popcount(word ^ row[j])
        if n_words > 1:
            d += out[j]
        out[j] = d
        nearest = min(nearest, d)
    return nearest


@njit(nogil=True, cache=True)
def _keep_best(buffer_pos, buffer_dist, count, k, histogram):
    """Keep the first k of buffer[:count] (in database order) by (distance, position), in place;
    returns (how many are kept, the distance of the k-th), the bound past which nothing enters."""
    histogram[:] = 0
    for i in range(count):
        histogram[buffer_dist[i]] += 1
    below = 0
    t = 0
    while below + histogram[t] < k:
        below += histogram[t]
        t += 1
    at_t = k - below  # codes at distance t that make the cut: the first ones, in database order
    kept = 0
    for i in range(count):
        d = buffer_dist[i]
        if d < t or (d == t and at_t > 0):
            if d == t:
                at_t -= 1
            buffer_pos[kept] = buffer_pos[i]
            buffer_dist[kept] = d
            kept += 1
    return kept, t


@njit(nogil=True, cache=True)
def _topk_group(query_words, db_words, k, first, last, out_dist, out_pos):
    """Top-k of queries first..last-1 (query_words (nq, W), db_words (W, n) uint64) into out rows."""
    n_words, n = db_words.shape
    group = last - first
    max_distance = 64 * n_words
    capacity = k + max(k, 256)
    buffer_pos = np.empty((group, capacity), dtype=np.int64)
    buffer_dist = np.empty((group, capacity), dtype=np.int32)
    counts = np.zeros(group, dtype=np.int64)
    bounds = np.full(group, max_distance + 1, dtype=np.int64)
    histogram = np.zeros(max_distance + 2, dtype=np.int64)
    distances = np.empty(DB_BLOCK, dtype=np.int64)
    for start in range(0, n, DB_BLOCK):
        size = min(DB_BLOCK, n - start)
        for g in range(group):
            nearest = block_distances(query_words, first + g, db_words, start, size, distances)
            bound = bounds[g]
            if nearest >= bound:
                continue
            count = counts[g]
            for j in range(size):
                d = distances[j]
                if d < bound:
                    buffer_pos[g, count] = start + j
                    buffer_dist[g, count] = d
                    count += 1
                    if count == capacity:
                        count, bound = _keep_best(buffer_pos[g], buffer_dist[g], count, k, histogram)
            counts[g] = count
            bounds[g] = bound
    for g in range(group):
        query = first + g
        count = counts[g]
        if count > k:
            count, _ = _keep_best(buffer_pos[g], buffer_dist[g], count, k, histogram)
        # stable counting sort by distance: ties stay in database order
        histogram[:] = 0
        for i in range(count):
            histogram[buffer_dist[g, i] + 1] += 1
        for d in range(1, max_distance + 2):
            histogram[d] += histogram[d - 1]
        for i in range(count):
            d = buffer_dist[g, i]
            slot = histogram[d]
            histogram[d] = slot + 1
            out_dist[query, slot] = d
            out_pos[query, slot] = buffer_pos[g, i]
        for slot in range(count, k):
            out_dist[query, slot] = -1
            out_pos[query, slot] = -1


@njit(nogil=True, cache=True)
def _histogram_rows(query_words, db_words, out):
    n = db_words.shape[1]
    distances = np.empty(DB_BLOCK, dtype=np.int64)
    for start in range(0, n, DB_BLOCK):
        size = min(DB_BLOCK, n - start)
        for query in range(query_words.shape[0]):
            block_distances(query_words, query, db_words, start, size, distances)
            for j in range(size):
                out[query, distances[j]] += 1


def distance_histograms(query_words: np.ndarray, db_words: np.ndarray, bits: int) -> np.ndarray:
    """(q, bits + 1) int64: how many database codes lie at each Hamming distance from each query.

    query_words (q, W) and db_words (W, n) uint64 (`query_words_of`, `dmuh.codes.binary.packed_words`);
    no distance matrix is formed. Runs in the calling thread (GIL released: callers thread it).
    """
    out = np.zeros((query_words.shape[0], 64 * db_words.shape[0] + 1), dtype=np.int64)
    _histogram_rows(np.ascontiguousarray(query_words), np.ascontiguousarray(db_words), out)
    return out[:, : bits + 1]


def query_words_of(packed: np.ndarray, n_words: int) -> np.ndarray:
    """Packed uint8 codes (n, bytes) as (n, n_words) uint64 rows, zero-padded (padding adds no distance)."""
    n, nbytes = packed.shape
    padded = np.zeros((n, n_words * 8), dtype=np.uint8)
    padded[:, :nbytes] = packed
    return padded.view(np.uint64)


def hamming_topk(
    query_packed: np.ndarray, db_words: np.ndarray, k: int, threads: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """The k nearest database codes of each query by (Hamming distance, position).

    query_packed: (nq, bytes) uint8 packed codes; db_words: the database as `dmuh.codes.binary.packed_words`
    lays it out, (W, n) uint64 with W = ceil(bytes / 8). Returns (distances int32 (nq, k), positions
    int64 (nq, k)); where k exceeds the database the last slots hold position -1 and distance -1.
    threads: how many threads share the queries (default `default_threads()`).
    """
    query_packed = np.asarray(query_packed)
    db_words = np.ascontiguousarray(db_words, dtype=np.uint64)
    if query_packed.ndim != 2 or query_packed.dtype != np.uint8 or db_words.ndim != 2:
        raise DmuhError("hamming_topk: expected packed uint8 queries (nq, bytes) and database words (W, n)")
    n_words = db_words.shape[0]
    if -(-query_packed.shape[1] // 8) != n_words:
        raise DmuhError(
            f"hamming_topk: queries of {query_packed.shape[1]} bytes against a database of {n_words} 64-bit words"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DmuhError(f"k={k!r}: expected a positive integer")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise DmuhError(f"threads={threads}: expected a positive integer")
    k = int(k)
    queries = query_words_of(query_packed, n_words)
    nq = queries.shape[0]
    out_dist = np.empty((nq, k), dtype=np.int32)
    out_pos = np.empty((nq, k), dtype=np.int64)
    if nq == 0:
        return out_dist, out_pos
    capacity = k + max(k, 256)
    group = max(1, min(_MAX_GROUP, _GROUP_BUFFER_BYTES // (12 * capacity), -(-nq // (4 * threads))))
    starts = range(0, nq, group)
    if threads == 1 or len(starts) == 1:
        for first in starts:
            _topk_group(queries, db_words, k, first, min(first + group, nq), out_dist, out_pos)
        return out_dist, out_pos
    with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
        jobs = [
            pool.submit(_topk_group, queries, db_words, k, first, min(first + group, nq), out_dist, out_pos)
            for first in starts
        ]
        for job in jobs:
            job.result()
    return out_dist, out_pos
