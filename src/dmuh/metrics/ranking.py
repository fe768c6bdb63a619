"""Retrieval metrics of binary codes: MAP@all, MAP@k, precision@k (the Top-K curve), precision and
recall by Hamming radius, precision within Hamming radius 2. Tie-aware, multi-label aware, memory
bounded. Conventions (ties, AP@k normalisation, queries without a relevant item): docs/metrics.md.

A b-bit Hamming distance takes only b + 1 values, so every metric except ties="index" is a function
of two per-query histograms over the distance: how many database items lie at distance d and how
many of those are relevant (share a label with the query). `HammingRanking` computes them once, in
chunks (a counting kernel of `dmuh.codes.topk` on the CPU, a +-1 matmul + bincount on a GPU), and
every metric is closed-form arithmetic on them; no Q x N matrix is ever formed and nothing is sorted.
ties="index" (database order within a tie, as a stable sort gives) needs each relevant item's rank:
on the CPU a counting pass and a rank pass in database order give them in O(N) per query, memory
O(bits) per query (`_index_rank_rows`); on a GPU each query's distances are sorted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from numba import njit

from dmuh.codes.binary import (
    EXACT_FP16_BITS,
    as_packed,
    matmul_dtype,
    packed_words,
    plus_minus_dot,
    plus_minus_one,
)
from dmuh.codes.topk import DB_BLOCK, block_distances, distance_histograms, query_words_of
from dmuh.errors import DmuhError
from dmuh.metrics.ties import DEFAULT_TIES, TIES  # noqa: F401 - also this module's API
from dmuh.utils.progress import progress_bar

EMPTY_QUERY_POLICIES = ("zero", "drop")  # what a query with no relevant item scores
DEFAULT_PRECISION_KS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)

_CPU_QUERY_CHUNK = 8  # queries per distance pass: 8 x 16384 xor words stay in cache
_CPU_RELEVANT_GROUP = 64  # queries sharing one gather of their relevant items
_CPU_INDEX_CHUNK = 16  # queries sharing each database block of the ties="index" rank pass
_GPU_INDEX_PAIRS = 1 << 26  # the same on a GPU (~2 GiB of temporaries)
_GPU_PAIRS = 1 << 26  # query x item pairs per GPU chunk (~0.6 GiB of temporaries)
# torch.bincount keeps up to ~6,000 int64 bins in a block's shared memory; past that it falls back
# to global atomics, measured 20x slower on an H100, so a GPU chunk holds at most this many bins.
_GPU_SHARED_BINS = 6000
_GPU_FOLDED_SETS = 512  # database label sets up to which relevance rides in the matmul
_HYPERGEOMETRIC_CELLS = 1 << 22  # query x outcome cells per step of the expected AP@k sum
_DENSE_LABEL_KEYS = 1 << 22  # label sets found by counting when their packed keys stay below this


def _check_choice(value: str, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise DmuhError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _resolve_device(device, *inputs) -> Optional[torch.device]:
    """None for the CPU (numpy kernels); else the torch device to compute on."""
    if device is None:
        return next((x.device for x in inputs if isinstance(x, torch.Tensor) and x.device.type != "cpu"), None)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DmuhError(f"device: {device!r} is not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DmuhError(f"device: {device} requested but CUDA is not available")
    return None if device.type == "cpu" else device


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_labels(query_labels, db_labels) -> Tuple[np.ndarray, np.ndarray, int]:
    """Both label inputs as numpy, each (n,) int class indices or (n, C) bool multi-hot; and C."""
    labels = {"query_labels": _to_numpy(query_labels), "db_labels": _to_numpy(db_labels)}
    classes = 0
    for name, value in labels.items():
        if value.ndim not in (1, 2):
            raise DmuhError(
                f"{name}: expected (n,) class indices or an (n, C) multi-hot matrix, got shape {value.shape}"
            )
        if value.ndim == 1 and value.size and not np.issubdtype(value.dtype, np.integer):
            raise DmuhError(f"{name}: class indices must be integers, got {value.dtype}")
        if value.size and value.dtype != np.bool_ and value.min() < 0:
            raise DmuhError(f"{name}: labels must be non-negative (class indices or 0/1 multi-hot)")
        classes = max(classes, value.shape[1] if value.ndim == 2 else int(value.max(initial=-1)) + 1)
    for name, value in labels.items():
        if value.ndim == 2 and value.shape[1] != classes:
            raise DmuhError(f"{name}: {value.shape[1]} classes, but the other labels have {classes}")
    query, database = (value if value.ndim == 1 else value != 0 for value in labels.values())
    return query, database, classes


def _dense_ids(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct values of small non-negative integer keys and each key's index among them, by counting."""
    present = np.flatnonzero(np.bincount(keys))
    position = np.zeros(present[-1] + 1 if len(present) else 0, dtype=np.intp)
    position[present] = np.arange(len(present))
    return present, position[keys]


def _label_sets(labels: np.ndarray, classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct label rows (U, C) bool and the index (n,) of each item's row among them."""
    if labels.ndim == 1:  # class indices: the sets are the classes present
        present, inverse = _dense_ids(labels.astype(np.intp, copy=False))
        sets = np.zeros((len(present), classes), dtype=bool)
        sets[np.arange(len(present)), present] = True
        return sets, inverse
    packed = np.packbits(labels, axis=1)
    keys = np.zeros((labels.shape[0], -(-packed.shape[1] // 8) * 8), dtype=np.uint8)
    keys[:, : packed.shape[1]] = packed
    keys = keys.view(np.uint64)
    if keys.shape[1] == 1 and keys.size and keys.max() < _DENSE_LABEL_KEYS:  # up to ~20 classes: count, don't sort
        _, inverse = _dense_ids(keys[:, 0].astype(np.intp))
        representative = np.empty(inverse.max() + 1, dtype=np.intp)
        representative[inverse] = np.arange(len(inverse))  # any item of the set will do
    else:
        _, representative, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return labels[representative], inverse.reshape(-1)


class _Inputs:
    """Validated inputs: packed codes on the compute device and the relevance structure.

    Relevance goes through label sets: items with identical label rows form one set, and a query
    set and a database set are relevant when they share a label. This keeps single-label data
    (a handful of sets) cheap and handles any multi-label data the same way.
    """

    def __init__(self, query_codes, db_codes, query_labels, db_labels, device, bits):
        self.device = _resolve_device(device, query_codes, db_codes)
        query, query_bits = as_packed(query_codes, bits, "query_codes")
        database, db_bits = as_packed(db_codes, bits, "db_codes")
        if query_bits != db_bits:
            raise DmuhError(f"db_codes: {db_bits} bits, but query_codes have {query_bits}")
        if query.shape[0] == 0 or database.shape[0] == 0:
            raise DmuhError("query_codes: need at least one query and one database item")
        query_labels, db_labels, classes = _check_labels(query_labels, db_labels)
        for name, labels, codes in (("query_labels", query_labels, query), ("db_labels", db_labels, database)):
            if labels.shape[0] != codes.shape[0]:
                raise DmuhError(f"{name}: {labels.shape[0]} rows for {codes.shape[0]} codes")
        self.bits = query_bits
        if self.device is None:
            self.query, self.database = _to_numpy(query), _to_numpy(database)
        else:
            self.query = torch.as_tensor(query).to(self.device)
            self.database = torch.as_tensor(database).to(self.device)
        query_sets, self.query_set = _label_sets(query_labels, classes)
        db_sets, self.db_set = _label_sets(db_labels, classes)
        self._query_sets = query_sets.astype(np.float32)
        self._db_sets_t = db_sets.astype(np.float32).T
        self.db_set_sizes = np.bincount(self.db_set, minlength=db_sets.shape[0])

    @property
    def num_queries(self) -> int:
        return self.query.shape[0]

    @property
    def num_items(self) -> int:
        return self.database.shape[0]

    def relevant_sets(self, query_set_ids: np.ndarray) -> np.ndarray:
        """Bool (len(ids), database sets): which database label sets each query label set matches."""
        return (self._query_sets[query_set_ids] @ self._db_sets_t) > 0

    def relevant_items(self, query_set: int) -> np.ndarray:
        """Bool (N,): the database items relevant to a query of this label set."""
        return self.relevant_sets([query_set])[0][self.db_set]

    def queries_by_set(self) -> List[Tuple[int, np.ndarray]]:
        """(query label set, its queries) for each query label set."""
        order = np.argsort(self.query_set, kind="stable")
        set_ids, starts = np.unique(self.query_set[order], return_index=True)
        return list(zip(set_ids.tolist(), np.split(order, starts[1:])))


def _run_tasks(tasks: List[Tuple[float, Callable[[], None]]], threads: int, bar=None) -> None:
    """Run (cost, job) pairs on `threads` threads, largest first (numpy and torch release the GIL);
    `bar` (a tqdm, see `_progress`) advances by each job's cost as it finishes."""
    ordered = sorted(tasks, key=lambda task: -task[0])
    if threads <= 1 or len(ordered) <= 1:
        for cost, job in ordered:
            job()
            if bar is not None:
                bar.update(cost)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {pool.submit(job): cost for cost, job in ordered}
        for future in as_completed(futures):
            future.result()
            if bar is not None:
                bar.update(futures[future])


def _progress(inputs: "_Inputs", tasks: List[Tuple[float, Callable[[], None]]], desc: str):
    """A progress bar over the tasks' cost (query x item pairs) when `HammingRanking(progress=True)`
    and the database is large (dmuh.utils.progress: shown on a terminal only)."""

    return progress_bar(
        float(sum(cost for cost, _ in tasks)),
        desc,
        unit="pair",
        size=inputs.num_items,
        enabled=getattr(inputs, "progress", False),
        unit_scale=True,
    )


def _chunks(indices: np.ndarray, size: int):
    return (indices[start : start + size] for start in range(0, len(indices), size))


# ---------------------------------------------------------------------------------------------
# Pass over the database: per-query histograms (CPU and GPU)


def _cpu_histograms(inputs: _Inputs, threads: int) -> Tuple[np.ndarray, np.ndarray]:
    """All items per distance from one pass over the database; relevant items per distance from a
    pass over each query label set's relevant items only (a tenth of the database for 10 classes)."""
    query_words = query_words_of(inputs.query, -(-inputs.query.shape[1] // 8))
    db_words = packed_words(inputs.database)
    counts = np.zeros((inputs.num_queries, inputs.bits + 1), dtype=np.int64)
    relevant = np.zeros_like(counts)

    def count_all(queries):
        counts[queries] = distance_histograms(query_words[queries], db_words, inputs.bits)

    def count_relevant(query_set, queries):
        items = np.flatnonzero(inputs.relevant_items(query_set))
        if len(items) == 0:
            return
        relevant_words = db_words[:, items]
        for chunk in _chunks(queries, _CPU_QUERY_CHUNK):
            relevant[chunk] = distance_histograms(query_words[chunk], relevant_words, inputs.bits)

    tasks = [
        (len(chunk) * inputs.num_items, lambda chunk=chunk: count_all(chunk))
        for chunk in _chunks(np.arange(inputs.num_queries), _CPU_QUERY_CHUNK)
    ]
    for query_set, queries in inputs.queries_by_set():
        num_relevant = inputs.relevant_sets([query_set])[0] @ inputs.db_set_sizes
        for group in _chunks(queries, _CPU_RELEVANT_GROUP):  # groups keep threads busy; each gathers its items once
            tasks.append((len(group) * num_relevant, lambda s=query_set, q=group: count_relevant(s, q)))
    with _progress(inputs, tasks, "MAP: Hamming distances") as bar:
        _run_tasks(tasks, threads, bar)
    return counts, relevant


def _gpu_distance_keys(
    inputs: _Inputs, query_pm, db_pm, db_set, queries: np.ndarray
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(2 x distance, relevance) of a chunk of queries against every item, on the device."""
    twice_distance = inputs.bits - plus_minus_dot(query_pm[queries], db_pm)
    relevant_sets = torch.from_numpy(inputs.relevant_sets(inputs.query_set[queries])).to(inputs.device)
    return twice_distance, relevant_sets[:, db_set]


def _gpu_histograms(inputs: _Inputs) -> Tuple[np.ndarray, np.ndarray]:
    """Key 2 d + relevant, offset by 2 (b + 1) per query row, then one bincount per chunk of queries.

    With few database label sets the relevance is folded into the matmul:
    <[q, -relevant_sets(q)], [x, one_hot(set(x))]> = <q, x> - relevant(q, x), so bits - dot is the
    key itself (exact in fp16: the extra columns add 0 or -1). Otherwise it is gathered from the
    (query set, database set) table.
    """
    dtype = matmul_dtype(inputs.device)
    bits, num_sets = inputs.bits, len(inputs.db_set_sizes)
    query_pm, db_pm = plus_minus_one(inputs.query, bits, dtype), plus_minus_one(inputs.database, bits, dtype)
    db_set = torch.from_numpy(inputs.db_set).to(inputs.device)
    keys_per_query = 2 * (bits + 1)
    chunk = max(1, min(_GPU_PAIRS // inputs.num_items, _GPU_SHARED_BINS // keys_per_query))
    fold = num_sets <= _GPU_FOLDED_SETS and bits < EXACT_FP16_BITS  # partial sums stay within bits + 1
    if fold:
        relevant_sets = torch.from_numpy(inputs.relevant_sets(inputs.query_set)).to(inputs.device, dtype)
        padding = -(bits + num_sets) % 8  # tensor cores want a multiple of 8 columns
        query_pm = torch.nn.functional.pad(torch.cat([query_pm, -relevant_sets], 1), (0, padding))
        db_one_hot = torch.nn.functional.one_hot(db_set, num_sets).to(dtype)
        db_pm = torch.nn.functional.pad(torch.cat([db_pm, db_one_hot], 1), (0, padding))
    key_dtype = torch.int16 if chunk * keys_per_query < 2**15 else torch.int32
    row_offsets = torch.arange(chunk, device=inputs.device, dtype=key_dtype)[:, None] * keys_per_query
    histograms = []
    for queries in _chunks(np.arange(inputs.num_queries), chunk):
        offsets = row_offsets[: len(queries)]
        if fold:
            keys = (query_pm[queries] @ db_pm.T).to(key_dtype)
            torch.sub(offsets + bits, keys, out=keys)
        else:
            twice_distance, relevance = _gpu_distance_keys(inputs, query_pm, db_pm, db_set, queries)
            keys = twice_distance.add_(relevance).add_(offsets)
        histograms.append(torch.bincount(keys.view(-1), minlength=len(queries) * keys_per_query))
    histogram = torch.cat(histograms).view(inputs.num_queries, bits + 1, 2).cpu().numpy()
    return histogram.sum(axis=2), histogram[:, :, 1].copy()


# ---------------------------------------------------------------------------------------------
# Pass over the database in database order (ties="index"): ranks of the relevant items


@njit(nogil=True, cache=True)
def _index_rank_rows(query_words, db_words, relevant_positions, found, cutoffs, ks, ap_out, hits_out):
    """AP@c per cutoff and relevant-in-top-k per k of queries (q, W) against db_words (W, n), database
    order within a tie (a stable sort's ranks), without sorting: a counting pass gives each distance's
    first rank, then a pass in database order hands out the ranks. found (q, W * 64 + 1): the relevant
    items at each distance (`distance_histograms` of the relevant items alone); overwritten.

    A relevant item at distance d is the (seen[d] + 1)-th of its distance and the (found[d] + 1)-th
    relevant one of it, so its rank is items_before[d] + seen[d] + 1 and its precision
    (relevant_before[d] + found[d] + 1) / rank. cutoffs and ks ascend; memory is O(q x bits).
    """
    n = db_words.shape[1]
    nq = query_words.shape[0]
    values = 64 * db_words.shape[0] + 1
    seen = np.zeros((nq, values), dtype=np.int64)  # pass 1: items per distance; pass 2: next rank - 1
    distances = np.empty(DB_BLOCK, dtype=np.int64)
    for start in range(0, n, DB_BLOCK):
        size = min(DB_BLOCK, n - start)
        for q in range(nq):
            block_distances(query_words, q, db_words, start, size, distances)
            for j in range(size):
                seen[q, distances[j]] += 1
    for q in range(nq):  # counts -> items (relevant items) before each distance
        items, hits = 0, 0
        for d in range(values):
            items, seen[q, d] = items + seen[q, d], items
            hits, found[q, d] = hits + found[q, d], hits
    n_cut, n_k = len(cutoffs), len(ks)
    sums = np.zeros((nq, n_cut + 1))  # precision sums of the relevant items ranked in (cutoff[i-1], cutoff[i]]
    hit_counts = np.zeros((nq, n_cut + 1), dtype=np.int64)
    k_counts = np.zeros((nq, n_k + 1), dtype=np.int64)
    rank = np.empty(DB_BLOCK, dtype=np.int64)  # each item's rank (the block's relevant ones are read)
    first_relevant = 0
    for start in range(0, n, DB_BLOCK):
        size = min(DB_BLOCK, n - start)
        last_relevant = first_relevant
        while last_relevant < len(relevant_positions) and relevant_positions[last_relevant] < start + size:
            last_relevant += 1
        for q in range(nq):
            block_distances(query_words, q, db_words, start, size, distances)
            for j in range(size):  # every item takes the next rank of its distance, without a branch
                rank[j] = seen[q, distances[j]] + 1
                seen[q, distances[j]] = rank[j]
            for r in range(first_relevant, last_relevant):
                j = relevant_positions[r] - start
                d = distances[j]
                hit = found[q, d] + 1
                found[q, d] = hit
                i = 0
                while i < n_cut and cutoffs[i] < rank[j]:
                    i += 1
                sums[q, i] += hit / rank[j]
                hit_counts[q, i] += 1
                i = 0
                while i < n_k and ks[i] < rank[j]:
                    i += 1
                k_counts[q, i] += 1
        first_relevant = last_relevant
    for q in range(nq):
        total, hits = 0.0, 0
        for i in range(n_cut):
            total += sums[q, i]
            hits += hit_counts[q, i]
            ap_out[q, i] = total / hits if hits else 0.0
        hits = 0
        for i in range(n_k):
            hits += k_counts[q, i]
            hits_out[q, i] = hits


def _cpu_index_stats(inputs: _Inputs, cutoffs, ks, threads: int) -> Tuple[np.ndarray, np.ndarray]:
    """ties="index" AP@c and hits@k of every query by `_index_rank_rows`, a chunk of queries of one
    label set per task."""
    query_words = query_words_of(inputs.query, -(-inputs.query.shape[1] // 8))
    db_words = packed_words(inputs.database)
    ap = np.zeros((inputs.num_queries, len(cutoffs)))
    hits = np.zeros((inputs.num_queries, len(ks)), dtype=np.int64)
    cutoff_array, k_array = np.asarray(cutoffs, dtype=np.int64), np.asarray(ks, dtype=np.int64)

    def rank_chunk(query_set, queries):
        relevance = inputs.relevant_items(query_set)
        found = distance_histograms(query_words[queries], db_words[:, relevance], 64 * db_words.shape[0])
        rows_ap = np.zeros((len(queries), len(cutoffs)))
        rows_hits = np.zeros((len(queries), len(ks)), dtype=np.int64)
        _index_rank_rows(
            query_words[queries], db_words, np.flatnonzero(relevance), found, cutoff_array, k_array, rows_ap, rows_hits
        )
        ap[queries], hits[queries] = rows_ap, rows_hits

    tasks = [
        (len(chunk) * inputs.num_items, lambda s=query_set, q=chunk: rank_chunk(s, q))
        for query_set, queries in inputs.queries_by_set()
        for chunk in _chunks(queries, _CPU_INDEX_CHUNK)
    ]
    with _progress(inputs, tasks, "MAP: ranking (ties index)") as bar:
        _run_tasks(tasks, threads, bar)
    return ap, hits


def _gpu_index_stats(inputs: _Inputs, cutoffs, ks) -> Tuple[np.ndarray, np.ndarray]:
    dtype = matmul_dtype(inputs.device)
    query_pm, db_pm = (
        plus_minus_one(inputs.query, inputs.bits, dtype),
        plus_minus_one(inputs.database, inputs.bits, dtype),
    )
    db_set = torch.from_numpy(inputs.db_set).to(inputs.device)
    positions = torch.arange(1, inputs.num_items + 1, device=inputs.device, dtype=torch.float64)
    ap, hits = [], []
    for queries in _chunks(np.arange(inputs.num_queries), max(1, _GPU_INDEX_PAIRS // inputs.num_items)):
        twice_distance, relevance = _gpu_distance_keys(inputs, query_pm, db_pm, db_set, queries)
        if inputs.bits < 2**14:  # fewer radix passes
            twice_distance = twice_distance.to(torch.int16)
        order = torch.sort(twice_distance, dim=1, stable=True).indices
        ranked_relevance = relevance.gather(1, order)
        del twice_distance, order
        hits_so_far = ranked_relevance.cumsum(1, dtype=torch.int32)
        precision_at_hits = torch.where(ranked_relevance, hits_so_far / positions, 0.0)
        rows_ap = torch.zeros((len(queries), len(cutoffs)), dtype=torch.float64, device=inputs.device)
        for column, cutoff in enumerate(cutoffs):  # no hit in the top k: the sum is 0, so AP is 0
            rows_ap[:, column] = precision_at_hits[:, :cutoff].sum(1) / hits_so_far[:, cutoff - 1].clamp(min=1)
        ap.append(rows_ap.cpu())
        hits.append(hits_so_far[:, [k - 1 for k in ks]].cpu())
    return torch.cat(ap).numpy(), torch.cat(hits).numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Metrics from the histograms


def _harmonic_numbers(n: int) -> np.ndarray:
    """H[i] = 1 + 1/2 + ... + 1/i for i = 0..n (H[0] = 0)."""
    harmonic = np.zeros(n + 1)
    np.cumsum(1.0 / np.arange(1, n + 1), out=harmonic[1:])
    return harmonic


def _expected_precision_sum(before_items, before_relevant, size, size_relevant, harmonic):
    """E[sum of the precisions at the relevant items] of one tie group in random order (He et al. 2018).

    The group fills ranks N+1..N+n (N = before_items, n = size) after R = before_relevant relevant
    items. Rank N+p holds a relevant item with probability r/n, and then (p-1)(r-1)/(n-1) other
    relevant items precede it within the group on average, so the sum is
    (r/n) sum_p (R + 1 + (p-1)(r-1)/(n-1)) / (N+p), in closed form with harmonic numbers:
    sum_p 1/(N+p) = H(N+n) - H(N) and sum_p (p-1)/(N+p) = n - (N+1)(H(N+n) - H(N)).
    """
    group_harmonic = harmonic[before_items + size] - harmonic[before_items]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(size > 0, size_relevant / size, 0.0)
        spread = np.where(size > 1, (size_relevant - 1) / (size - 1), 0.0)
    return share * ((before_relevant + 1) * group_harmonic + spread * (size - (before_items + 1) * group_harmonic))


class _Cut:
    """Where rank k falls: every query's buckets (distances) before `bucket` are inside the top k
    whole, `taken` of the `size` items of `bucket` are inside (1 <= taken <= size)."""

    def __init__(self, counts: np.ndarray, relevant: np.ndarray, k: int):
        self.before_items = np.cumsum(counts, axis=1) - counts
        self.before_relevant = np.cumsum(relevant, axis=1) - relevant
        self.bucket = (self.before_items + counts < k).sum(axis=1)
        rows = np.arange(counts.shape[0])
        self.size = counts[rows, self.bucket]
        self.size_relevant = relevant[rows, self.bucket]
        self.items_before = self.before_items[rows, self.bucket]
        self.relevant_before = self.before_relevant[rows, self.bucket]
        self.taken = k - self.items_before
        self.whole = np.arange(counts.shape[1])[None, :] < self.bucket[:, None]

    def relevant_taken(self, ties: str) -> np.ndarray:
        """Relevant items of the cut bucket inside the top k: expected number, or the bound."""
        if ties == "expected":
            return self.taken * self.size_relevant / self.size
        if ties == "optimistic":
            return np.minimum(self.size_relevant, self.taken)
        return np.maximum(0, self.taken - (self.size - self.size_relevant))


def _ordered_ap(counts, relevant, cut: _Cut, harmonic, relevant_first: bool) -> np.ndarray:
    """AP@k with the relevant items first (optimistic) or last (pessimistic) in every tie group.

    A group's relevant items taken, x, sit at ranks s+1..s+x after R relevant items, s = N or
    N + n - r: their precisions sum to sum_j (R+j)/(s+j) = x + (R - s)(H(s+x) - H(s)).
    """
    taken = np.where(cut.whole, relevant, 0)
    rows = np.arange(counts.shape[0])
    taken[rows, cut.bucket] = cut.relevant_taken("optimistic" if relevant_first else "pessimistic")
    start = cut.before_items if relevant_first else cut.before_items + counts - relevant
    precision_sums = taken + (cut.before_relevant - start) * (harmonic[start + taken] - harmonic[start])
    found = taken.sum(axis=1)
    return np.divide(precision_sums.sum(axis=1), found, out=np.zeros(len(found)), where=found > 0)


def _hypergeometric_window(cut: _Cut) -> Tuple[np.ndarray, np.ndarray]:
    """Per query, the outcomes x (relevant items of the cut group inside the top k) worth summing.

    x is hypergeometric: k - N of the group's n items drawn, r of them relevant. Outcomes further
    than 5 sqrt(m) + 1 from the mean m r / n (m items drawn) are dropped: by Hoeffding's bound their
    total probability is below 2 exp(-50) ~ 4e-22, far below float64 rounding of an AP.
    """
    low = np.maximum(0, cut.taken - (cut.size - cut.size_relevant))
    high = np.minimum(cut.size_relevant, cut.taken)
    mean, reach = cut.taken * cut.size_relevant / cut.size, 5 * np.sqrt(cut.taken) + 1
    return np.maximum(low, np.floor(mean - reach)).astype(np.int64), np.minimum(high, np.ceil(mean + reach)).astype(
        np.int64
    )


def _hypergeometric_weights(first: np.ndarray, last: np.ndarray, size, size_relevant, taken, width: int) -> np.ndarray:
    """P(x) for x = first..first+width-1 (0 beyond last), from the ratio P(x+1)/P(x) =
    (r-x)(m-x) / ((x+1)(n-r-m+x+1)), normalised over the window (no factorials, no overflow)."""
    x = first[:, None] + np.arange(width - 1)[None, :]
    step_inside = x < last[:, None]
    x = np.minimum(x, last[:, None])
    with np.errstate(divide="ignore"):  # log 0 only on steps past `last`, masked below
        log_ratio = np.log((size_relevant - x) * (taken - x)) - np.log((x + 1) * (size - size_relevant - taken + x + 1))
    log_weight = np.concatenate(
        [np.zeros((len(first), 1)), np.cumsum(np.where(step_inside, log_ratio, -np.inf), axis=1)], axis=1
    )
    weight = np.exp(log_weight - log_weight.max(axis=1, keepdims=True))
    return weight / weight.sum(axis=1, keepdims=True)


def _expected_ap(counts, relevant, cut: _Cut, harmonic) -> np.ndarray:
    """E[AP@k] over all orders of the tied items.

    Whole groups before the cut add their expected precision sums S. In the cut group, the number
    x of its relevant items inside the top k is hypergeometric; given x, those x sit uniformly
    among the taken ranks, and AP@k divides by R + x, so
    E[AP@k] = sum_x P(x) (S + E[partial sum | x]) / (R + x), with 0 where R + x = 0.
    For MAP@all the cut group is taken whole and x = r: one term.
    """
    group_sums = _expected_precision_sum(cut.before_items, cut.before_relevant, counts, relevant, harmonic)
    whole_sums = np.where(cut.whole, group_sums, 0.0).sum(axis=1)
    first, last = _hypergeometric_window(cut)
    ap = np.zeros(counts.shape[0])
    by_width = np.argsort(last - first, kind="stable")
    start = 0
    while start < len(by_width):  # chunks of similar width bound the (queries x outcomes) grid
        queries = by_width[
            start : start + max(1, _HYPERGEOMETRIC_CELLS // int(last[by_width[start]] - first[by_width[start]] + 1))
        ]
        width = int((last[queries] - first[queries]).max()) + 1
        size, size_relevant, taken = (x[queries, None] for x in (cut.size, cut.size_relevant, cut.taken))
        probability = _hypergeometric_weights(first[queries], last[queries], size, size_relevant, taken, width)
        outcomes = np.minimum(first[queries, None] + np.arange(width)[None, :], last[queries, None])
        partial_sums = _expected_precision_sum(
            cut.items_before[queries, None], cut.relevant_before[queries, None], taken, outcomes, harmonic
        )
        found = cut.relevant_before[queries, None] + outcomes
        ap_given_outcome = np.divide(
            whole_sums[queries, None] + partial_sums, found, out=np.zeros(found.shape), where=found > 0
        )
        ap[queries] = (probability * ap_given_outcome).sum(axis=1)
        start += len(queries)
    return ap


# ---------------------------------------------------------------------------------------------
# Public API


class HammingRanking:
    """Every query's Hamming ranking of the database, reduced to what the metrics need.

    Build it once and read any metric from it; `retrieval_report` does this. Codes: (n, b) {-1,+1}
    or {0,1} arrays/tensors, or packed uint8 (`bits` for lengths that are not a multiple of 8);
    labels: (n,) class indices or (n, C) multi-hot; a database item is relevant to a query when
    they share a label. `device`: None (a GPU if the codes are CUDA tensors, else the CPU),
    "cpu" or "cuda[:N]".

    The histograms (`counts`, `relevant`: (Q, b+1) int64, items and relevant items at each
    distance) are computed on first use; ties="index" metrics make their own pass. `progress`: a
    progress bar for the CPU passes over a large database (dmuh.utils.progress).
    """

    def __init__(
        self,
        query_codes,
        db_codes,
        query_labels,
        db_labels,
        device=None,
        bits: Optional[int] = None,
        progress: bool = False,
    ):
        self.inputs = _Inputs(query_codes, db_codes, query_labels, db_labels, device, bits)
        self.inputs.progress = progress
        self.bits, self.num_queries, self.num_items = self.inputs.bits, self.inputs.num_queries, self.inputs.num_items
        self.threads = max(1, torch.get_num_threads())
        self._histograms: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._harmonic: Optional[np.ndarray] = None
        self._index_ap: Dict[int, np.ndarray] = {}
        self._index_hits: Dict[int, np.ndarray] = {}

    # -- the two passes over the database

    @property
    def counts(self) -> np.ndarray:
        return self.histograms()[0]

    @property
    def relevant(self) -> np.ndarray:
        return self.histograms()[1]

    def histograms(self) -> Tuple[np.ndarray, np.ndarray]:
        """(items, relevant items) at each Hamming distance 0..b per query, (Q, b+1) int64 each."""
        if self._histograms is None:
            if self.inputs.device is None:
                self._histograms = _cpu_histograms(self.inputs, self.threads)
            else:
                self._histograms = _gpu_histograms(self.inputs)
        return self._histograms

    def rank_by_index(self, cutoffs: Sequence[int] = (), ks: Sequence[int] = ()) -> None:
        """One ties="index" pass for several AP cut-offs and precision ks (what is missing only).
        Each AP cut-off also records its relevant-in-top-k count (the "drop" rule needs it)."""
        cutoffs = sorted({self._clip(c) for c in cutoffs} - set(self._index_ap))
        ks = sorted(({self._clip(k) for k in ks} | set(cutoffs)) - set(self._index_hits))
        if not cutoffs and not ks:
            return
        if self.inputs.device is None:
            ap, hits = _cpu_index_stats(self.inputs, cutoffs, ks, self.threads)
        else:
            ap, hits = _gpu_index_stats(self.inputs, cutoffs, ks)
        self._index_ap.update({c: ap[:, i] for i, c in enumerate(cutoffs)})
        self._index_hits.update({k: hits[:, i] for i, k in enumerate(ks)})

    def _clip(self, k: Optional[int]) -> int:
        """The rank cut-off: k itself, or the database size for None (MAP@all) or a larger k."""
        if k is None:
            return self.num_items
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DmuhError(f"topk: expected a positive integer or None, got {k!r}")
        return min(int(k), self.num_items)

    def _harmonic_numbers(self) -> np.ndarray:
        if self._harmonic is None:
            self._harmonic = _harmonic_numbers(self.num_items)
        return self._harmonic

    # -- metrics

    def average_precision(self, topk: Optional[int] = None, ties: str = DEFAULT_TIES) -> Tuple[np.ndarray, np.ndarray]:
        """Per-query AP@k (k = topk, or all) and number of relevant items in the top k (expected
        number for ties="expected"). AP@k = (1 / relevant in the top k) x sum over the relevant
        items in the top k of the precision at their rank; 0 when the top k holds none."""
        _check_choice(ties, TIES, "ties")
        k = self._clip(topk)
        if ties == "index":
            self.rank_by_index(cutoffs=[k], ks=[k])
            return self._index_ap[k], self._index_hits[k].astype(np.float64)
        counts, relevant = self.histograms()
        cut = _Cut(counts, relevant, k)
        found = cut.relevant_before + cut.relevant_taken(ties)
        if ties == "expected":
            return _expected_ap(counts, relevant, cut, self._harmonic_numbers()), found.astype(np.float64)
        return _ordered_ap(counts, relevant, cut, self._harmonic_numbers(), ties == "optimistic"), found.astype(
            np.float64
        )

    def mean_average_precision(
        self, topk: Optional[int] = None, ties: str = DEFAULT_TIES, empty: str = "zero"
    ) -> float:
        """MAP over the queries. empty="zero": a query without a relevant item in its top k counts
        as AP 0 (DPSH, DeepHash-pytorch); "drop": such queries are left out (HashNet); 0.0 if all are."""
        _check_choice(empty, EMPTY_QUERY_POLICIES, "empty")
        ap, found = self.average_precision(topk, ties)
        if empty == "drop":
            ap = ap[found > 0]
        return float(ap.mean()) if len(ap) else 0.0

    def relevant_in_top_k(self, k: int, ties: str = DEFAULT_TIES) -> np.ndarray:
        """Per query, the number of relevant items among the first k (expected for ties="expected")."""
        _check_choice(ties, TIES, "ties")
        k = self._clip(k)
        if ties == "index":
            self.rank_by_index(ks=[k])
            return self._index_hits[k].astype(np.float64)
        cut = _Cut(*self.histograms(), k)
        return (cut.relevant_before + cut.relevant_taken(ties)).astype(np.float64)

    def precision_at_k(self, ks: Sequence[int] = DEFAULT_PRECISION_KS, ties: str = DEFAULT_TIES) -> List[float]:
        """Mean over queries of (relevant in the top k) / k, one value per k; a k beyond the
        database size is clipped to it."""
        if ties == "index":
            self.rank_by_index(ks=ks)
        return [float(self.relevant_in_top_k(k, ties).mean() / self._clip(k)) for k in ks]

    def recall_at_k(self, ks: Sequence[int] = DEFAULT_PRECISION_KS, ties: str = DEFAULT_TIES) -> List[float]:
        """Mean over queries of (relevant in the top k) / (relevant in the database); queries
        without any relevant item are left out (their recall is 0/0)."""
        if ties == "index":
            self.rank_by_index(ks=ks)
        total = self.relevant.sum(axis=1)
        has_relevant = total > 0
        if not has_relevant.any():
            return [0.0 for _ in ks]
        return [float((self.relevant_in_top_k(k, ties)[has_relevant] / total[has_relevant]).mean()) for k in ks]

    def pr_curve(self) -> Dict[str, List[float]]:
        """Precision and recall of "every item within Hamming radius r", r = 0..b, averaged over
        queries. A query retrieving nothing has precision 0; recall leaves out queries without
        relevant items. Ties do not matter: a radius takes whole tie groups."""
        counts, relevant = self.histograms()
        retrieved, found = np.cumsum(counts, axis=1), np.cumsum(relevant, axis=1)
        precision = np.divide(found, retrieved, out=np.zeros(found.shape), where=retrieved > 0).mean(axis=0)
        has_relevant = found[:, -1] > 0
        recall = (
            (found[has_relevant] / found[has_relevant, -1:]).mean(axis=0)
            if has_relevant.any()
            else np.zeros(self.bits + 1)
        )
        return {"radius": list(range(self.bits + 1)), "precision": precision.tolist(), "recall": recall.tolist()}

    def precision_within_radius(self, radius: int = 2) -> float:
        """Mean over queries of the precision of the items within Hamming distance <= radius; a
        query retrieving nothing counts as 0."""
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise DmuhError(f"radius: expected a non-negative integer, got {radius!r}")
        return self.pr_curve()["precision"][min(int(radius), self.bits)]


def mean_average_precision(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    topk: Optional[int] = None,
    ties: str = DEFAULT_TIES,
    device=None,
    *,
    empty: str = "zero",
    bits: Optional[int] = None,
) -> float:
    """MAP@all (topk=None) or MAP@topk of a Hamming ranking; see `HammingRanking` for the inputs.

    ties: "expected" (default; the expected AP over all orders of tied items, He et al. 2018),
    "index" (ties in database order, as a stable sort gives), "optimistic" / "pessimistic"
    (relevant items first / last within a tie). empty: "zero" (a query whose top k holds no
    relevant item counts as 0) or "drop" (left out, as HashNet). Queries' AP@k is normalised by
    the number of relevant items inside the top k.
    """
    _check_choice(ties, TIES, "ties")
    _check_choice(empty, EMPTY_QUERY_POLICIES, "empty")
    ranking = HammingRanking(query_codes, db_codes, query_labels, db_labels, device, bits)
    return ranking.mean_average_precision(topk, ties, empty)


def precision_at_k(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    ks: Sequence[int] = DEFAULT_PRECISION_KS,
    ties: str = DEFAULT_TIES,
    device=None,
    *,
    bits: Optional[int] = None,
) -> List[float]:
    """Precision of the top k for each k (the Top-K curve), averaged over queries."""
    _check_choice(ties, TIES, "ties")
    return HammingRanking(query_codes, db_codes, query_labels, db_labels, device, bits).precision_at_k(ks, ties)


def recall_at_k(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    ks: Sequence[int] = DEFAULT_PRECISION_KS,
    ties: str = DEFAULT_TIES,
    device=None,
    *,
    bits: Optional[int] = None,
) -> List[float]:
    """Recall of the top k for each k, averaged over queries that have a relevant item."""
    _check_choice(ties, TIES, "ties")
    return HammingRanking(query_codes, db_codes, query_labels, db_labels, device, bits).recall_at_k(ks, ties)


def pr_curve(
    query_codes, db_codes, query_labels, db_labels, device=None, *, bits: Optional[int] = None
) -> Dict[str, List[float]]:
    """{"radius": [0..b], "precision": [...], "recall": [...]} of retrieval within each Hamming radius."""
    return HammingRanking(query_codes, db_codes, query_labels, db_labels, device, bits).pr_curve()


def precision_within_radius(
    query_codes, db_codes, query_labels, db_labels, radius: int = 2, device=None, *, bits: Optional[int] = None
) -> float:
    """Precision of the items within Hamming radius `radius` (2 by default); nothing retrieved counts 0."""
    return HammingRanking(query_codes, db_codes, query_labels, db_labels, device, bits).precision_within_radius(radius)


def retrieval_report(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    topk: Optional[int] = None,
    ties: Union[str, Sequence[str]] = DEFAULT_TIES,
    precision_ks: Sequence[int] = DEFAULT_PRECISION_KS,
    device=None,
    *,
    empty: str = "zero",
    bits: Optional[int] = None,
    progress: bool = False,
) -> Dict:
    """Every metric in one JSON-serialisable dict, from one pass over the database (two with "index");
    `progress` shows a bar for a large database (`HammingRanking`).

    `ties` is one mode or a list (the first is the headline). Keys: map (MAP@all), map_at_k
    (MAP@topk, null without topk), topk, ties, empty, map_by_ties ({mode: {map, map_at_k}} for the
    modes asked for plus the optimistic and pessimistic bounds), precision_ks, precision_at_k,
    recall_at_k, pr_curve ({radius, precision, recall}), precision_radius2, counts.
    """
    modes = [ties] if isinstance(ties, str) else list(ties)
    if not modes:
        raise DmuhError("ties: give at least one mode")
    for mode in modes:
        _check_choice(mode, TIES, "ties")
    _check_choice(empty, EMPTY_QUERY_POLICIES, "empty")
    ranking = HammingRanking(query_codes, db_codes, query_labels, db_labels, device, bits, progress=progress)
    headline = modes[0]
    if topk is not None:
        ranking._clip(topk)  # validates topk before any pass
    if "index" in modes:
        ranking.rank_by_index(cutoffs=[None, topk] if topk is not None else [None], ks=list(precision_ks))
    map_by_ties = {}
    for mode in dict.fromkeys(modes + ["optimistic", "pessimistic"]):
        map_by_ties[mode] = {
            "map": ranking.mean_average_precision(None, mode, empty),
            "map_at_k": ranking.mean_average_precision(topk, mode, empty) if topk is not None else None,
        }
    total_relevant = ranking.relevant.sum(axis=1)
    return {
        "map": map_by_ties[headline]["map"],
        "map_at_k": map_by_ties[headline]["map_at_k"],
        "topk": topk,
        "ties": headline,
        "empty": empty,
        "map_by_ties": map_by_ties,
        "precision_ks": [int(k) for k in precision_ks],
        "precision_at_k": ranking.precision_at_k(precision_ks, headline),
        "recall_at_k": ranking.recall_at_k(precision_ks, headline),
        "pr_curve": ranking.pr_curve(),
        "precision_radius2": ranking.precision_within_radius(2),
        "counts": {
            "queries": ranking.num_queries,
            "database": ranking.num_items,
            "bits": ranking.bits,
            "queries_without_relevant": int((total_relevant == 0).sum()),
            "mean_relevant_per_query": float(total_relevant.mean()),
        },
    }


def ranked_metrics(relevant, topk: Optional[int] = None, ks: Sequence[int] = ()) -> Dict[str, float]:
    """MAP (@topk, or over the whole ranking) and P@k of rankings already made.

    `relevant` is bool (nq, n), numpy or torch: row q is query q's ranking, in rank order, True
    where that item is relevant. AP@k follows docs/metrics.md: the mean precision at the relevant
    ranks within the cut (normalised by R_k), a query with no relevant item there counts 0
    (empty="zero"). Returns {"map": ..., "p@k": ...} for each k no larger than n.
    """
    relevant = torch.as_tensor(relevant if isinstance(relevant, torch.Tensor) else np.asarray(relevant))
    if relevant.dim() != 2:
        raise DmuhError(f"relevant: expected a 2-D (queries, ranked items) array, got shape {tuple(relevant.shape)}")
    depth = relevant.shape[1] if topk is None else min(topk, relevant.shape[1])
    top = relevant[:, :depth].float()
    hits = top.cumsum(dim=1)
    ranks = torch.arange(1, depth + 1, device=top.device, dtype=torch.float32)
    found = top.sum(dim=1)
    ap = (top * hits / ranks).sum(dim=1) / found.clamp(min=1)
    out = {"map": float(ap.mean())}
    for k in ks:
        if k <= relevant.shape[1]:
            out[f"p@{k}"] = float(relevant[:, :k].float().mean())
    return out


# ---------------------------------------------------------------------------------------------
# Nearest-neighbour search quality (no labels): how many of the original features' neighbours a
# search over codes returns.

_NEIGHBOUR_CHUNK = 1024  # queries per similarity block: bounds the (chunk, n) temporary


@torch.no_grad()
def true_neighbours(query_features, db_features, k: int) -> np.ndarray:
    """(nq, k) int64 positions of each query's k nearest database rows by cosine similarity
    (ties: the lower position first), in order."""
    queries = torch.as_tensor(np.asarray(query_features), dtype=torch.float32)
    database = torch.as_tensor(np.asarray(db_features), dtype=torch.float32)
    if queries.dim() != 2 or database.dim() != 2 or queries.shape[1] != database.shape[1]:
        raise DmuhError(
            f"features: query {tuple(queries.shape)} and database {tuple(database.shape)} must be (n, D) of the same D"
        )
    queries, database = torch.nn.functional.normalize(queries, dim=1), torch.nn.functional.normalize(database, dim=1)
    if not 1 <= k <= database.shape[0]:
        raise DmuhError(f"k={k}: expected 1 to {database.shape[0]} (the database size)")
    rows = []
    for start in range(0, queries.shape[0], _NEIGHBOUR_CHUNK):
        similarity = queries[start : start + _NEIGHBOUR_CHUNK] @ database.t()
        # A stable descending order puts the lower position first among equal similarities.
        rows.append(torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(rows).numpy().astype(np.int64)


def neighbour_recall(retrieved, neighbours, k: Optional[int] = None) -> float:
    """Recall@k of nearest-neighbour search: the mean over queries of |retrieved[:k] & neighbours[:k]| / k,
    the share of each query's k true nearest neighbours (`true_neighbours`) among its first k
    results (positions; -1, no result, never counts)."""
    retrieved, neighbours = np.asarray(retrieved), np.asarray(neighbours)
    if retrieved.ndim != 2 or neighbours.ndim != 2 or retrieved.shape[0] != neighbours.shape[0] or not len(retrieved):
        raise DmuhError(f"recall: retrieved {retrieved.shape} and neighbours {neighbours.shape} need one row per query")
    k = neighbours.shape[1] if k is None else int(k)
    if not 1 <= k <= min(retrieved.shape[1], neighbours.shape[1]):
        raise DmuhError(f"recall@{k}: needs at least k results and k neighbours per query")
    hits = [
        len(set(row[:k][row[:k] >= 0].tolist()) & set(truth[:k].tolist())) for row, truth in zip(retrieved, neighbours)
    ]
    return float(np.mean(hits) / k)
