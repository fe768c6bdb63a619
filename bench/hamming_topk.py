"""dmuh's exact Hamming top-k kernel against FAISS's IndexBinaryFlat and the popcount floor, and
linear-time MAP (ties="index") against the per-query sort it replaced; one run, interleaved.

    PYTHONPATH=src python bench/hamming_topk.py                     # the tables of docs/results.md
    PYTHONPATH=src python bench/hamming_topk.py --items 100000 --repeats 1   # a quick look

k-NN: --queries random queries against --items random codes, at 64 and 128 bits, k = 10 and 100, on
1 and 2 threads. Each repeat runs every case once, in turn (FAISS, dmuh, floor), so load on the
shared machine falls on all of them alike; the table shows medians. FAISS: `faiss.IndexBinaryFlat`
with `faiss.omp_set_num_threads(T)`; dmuh: `dmuh.codes.topk.hamming_topk(threads=T)`; floor: the
same blocked popcount of every (query, code) pair with nothing selected (a sum keeps it from being
optimised away). Every dmuh result is checked equal to FAISS's (distances and positions, after
FAISS's rows are put in (distance, position) order).

MAP: random 64-bit codes, 10 classes, ties="index", MAP@all: `HammingRanking.mean_average_precision`
(counting + rank passes) against the per-query stable sort dmuh used before (reproduced here:
distances by `dmuh.codes.binary.distance_rows`, `np.argsort(kind="stable")`, ranks of the relevant
items), both on torch.get_num_threads() threads; the two MAPs are checked equal to 1e-12.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from dmuh.codes.binary import distance_dtype, distance_rows, packed_words
from dmuh.codes.topk import DB_BLOCK, block_distances, hamming_topk, query_words_of
from dmuh.metrics import ranking as metrics
from dmuh.metrics.ranking import HammingRanking
from dmuh.retrieval.index.base import ordered_by_distance_then_position

GROUP = 64


@njit(nogil=True)
def _popcount_rows(query_words, db_words, first, last, out):
    n = db_words.shape[1]
    distances = np.empty(DB_BLOCK, dtype=np.int64)
    for start in range(0, n, DB_BLOCK):
        size = min(DB_BLOCK, n - start)
        for q in range(first, last):
            block_distances(query_words, q, db_words, start, size, distances)
            total = 0
            for j in range(size):
                total += distances[j]
            out[q] += total


def popcount_floor(query_packed, db_words, threads):
    """Every (query, code) distance by the kernel's blocked popcount, summed per query: no selection."""
    queries = query_words_of(query_packed, db_words.shape[0])
    out = np.zeros(len(queries), dtype=np.int64)
    starts = range(0, len(queries), GROUP)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for job in [
            pool.submit(_popcount_rows, queries, db_words, s, min(s + GROUP, len(queries)), out) for s in starts
        ]:
            job.result()
    return out


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def knn_table(args) -> None:
    import faiss

    rng = np.random.default_rng(0)
    cases, seconds = [], {}
    data = {}
    for bits in (64, 128):
        database = rng.integers(0, 256, size=(args.items, bits // 8), dtype=np.uint8)
        queries = rng.integers(0, 256, size=(args.queries, bits // 8), dtype=np.uint8)
        index = faiss.IndexBinaryFlat(bits)
        index.add(database)
        data[bits] = (queries, index, packed_words(database))
        cases += [(bits, k, t) for k in (10, 100) for t in (1, 2)]
    # warm-up: numba's compiled kernels loaded, FAISS's pages touched
    hamming_topk(data[64][0][:2], data[64][2], 10)
    popcount_floor(data[64][0][:2], data[64][2], 1)
    for _ in range(args.repeats):
        for bits, k, t in cases:
            queries, index, words = data[bits]
            faiss.omp_set_num_threads(t)
            faiss_s, (fd, fp) = timed(index.search, queries, k)
            dmuh_s, (dd, dp) = timed(hamming_topk, queries, words, k, threads=t)
            floor_s, _ = timed(popcount_floor, queries, words, t)
            fd, fp = ordered_by_distance_then_position(fd, fp)
            assert np.array_equal(fd, dd) and np.array_equal(fp, dp), (bits, k, t)
            for name, value in (("faiss", faiss_s), ("dmuh", dmuh_s), ("floor", floor_s)):
                seconds.setdefault((bits, k, t, name), []).append(value)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    print(f"\nk-NN: {args.queries:,} queries x {args.items:,} codes, median of {args.repeats} interleaved runs")
    print("| bits | k | threads | FAISS IndexBinaryFlat s | dmuh kernel s | popcount floor s | FAISS / dmuh |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for bits, k, t in cases:
        f, d, p = (median[(bits, k, t, name)] for name in ("faiss", "dmuh", "floor"))
        print(f"| {bits} | {k} | {t} | {f:.3f} | {d:.3f} | {p:.3f} | {f / d:.2f}x |")
    print("\nAt each side's best thread count:")
    print("| bits | k | FAISS best s (threads) | dmuh best s (threads) | FAISS best / dmuh best |")
    print("|---:|---:|---:|---:|---:|")
    for bits in (64, 128):
        for k in (10, 100):
            f_t = min((1, 2), key=lambda t: median[(bits, k, t, "faiss")])
            d_t = min((1, 2), key=lambda t: median[(bits, k, t, "dmuh")])
            f, d = median[(bits, k, f_t, "faiss")], median[(bits, k, d_t, "dmuh")]
            print(f"| {bits} | {k} | {f:.3f} ({f_t}) | {d:.3f} ({d_t}) | {f / d:.2f}x |")


def sorted_index_map(ranking: HammingRanking, threads: int) -> float:
    """MAP@all, ties="index", as dmuh computed it before: each query's distances stable-sorted."""
    inputs = ranking.inputs
    query_words, db_words = packed_words(inputs.query), packed_words(inputs.database)
    ap = np.zeros(inputs.num_queries)
    chunk_size = max(1, min(8, (1 << 24) // inputs.num_items))

    def rank_chunk(query_set, queries):
        distances = np.empty((len(queries), inputs.num_items), dtype=distance_dtype(inputs.bits))
        distance_rows(query_words[:, queries], db_words, distances)
        relevance = inputs.relevant_items(query_set)
        for row, query in enumerate(queries):
            ranks = np.flatnonzero(relevance[np.argsort(distances[row], kind="stable")]) + 1
            ap[query] = np.mean(np.arange(1, len(ranks) + 1) / ranks) if len(ranks) else 0.0

    tasks = [
        (len(chunk) * inputs.num_items, lambda s=query_set, q=chunk: rank_chunk(s, q))
        for query_set, queries in inputs.queries_by_set()
        for chunk in metrics._chunks(queries, chunk_size)
    ]
    metrics._run_tasks(tasks, threads)
    return float(ap.mean())


def index_map(ranking: HammingRanking) -> float:
    return ranking.mean_average_precision(ties="index")


def map_table(args) -> None:
    rng = np.random.default_rng(1)
    sizes = [(1000, 59000), (100, 1_000_000)]
    problems = {}
    for nq, n in sizes:
        problems[(nq, n)] = (
            rng.integers(0, 256, size=(nq, 8), dtype=np.uint8),
            rng.integers(0, 256, size=(n, 8), dtype=np.uint8),
            rng.integers(0, 10, nq),
            rng.integers(0, 10, n),
        )
    threads = torch.get_num_threads()
    HammingRanking(*(x[:50] for x in problems[sizes[0]]), bits=64).mean_average_precision(ties="index")  # warm-up
    seconds = {}
    for _ in range(args.repeats):
        for size in sizes:
            new_s, new = timed(index_map, HammingRanking(*problems[size], bits=64))
            old_s, old = timed(sorted_index_map, HammingRanking(*problems[size], bits=64), threads)
            assert abs(new - old) < 1e-12, (size, new, old)
            seconds.setdefault((size, "new"), []).append(new_s)
            seconds.setdefault((size, "old"), []).append(old_s)
    print(f'\nMAP@all, ties="index", 64 bits, 10 classes, {threads} threads, median of {args.repeats} interleaved runs')
    print("| queries x database | per-query sort s | counting + rank passes s | speed-up |")
    print("|---|---:|---:|---:|")
    for size in sizes:
        old, new = (statistics.median(seconds[(size, name)]) for name in ("old", "new"))
        print(f"| {size[0]:,} x {size[1]:,} | {old:.3f} | {new:.3f} | {old / new:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-map", action="store_true", help="only the k-NN table")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    knn_table(args)
    if not args.skip_map:
        map_table(args)


if __name__ == "__main__":
    main()
