"""dmuh.metrics.ranking against brute force: argsort rankings (stable sort, relevant-first/last tie breaks)
for ties="index"/"optimistic"/"pessimistic", every order of the tied items for ties="expected"."""

import itertools
import json
from math import comb

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dmuh.codes.binary import pack_bits
from dmuh.errors import DmuhError
from dmuh.metrics import ranking as metrics
from dmuh.metrics.ranking import (
    HammingRanking,
    mean_average_precision,
    pr_curve,
    precision_at_k,
    precision_within_radius,
    recall_at_k,
    retrieval_report,
)

ORDERED_TIES = ("index", "optimistic", "pessimistic")
FAST = settings(deadline=None, max_examples=50, derandomize=True)


# ------------------------------------------------------------------ brute-force references


def distances_and_relevance(query, database, query_labels, db_labels):
    distance = (query[:, None, :] != database[None, :, :]).sum(-1)
    if np.ndim(query_labels) == 1:
        relevance = np.asarray(query_labels)[:, None] == np.asarray(db_labels)[None, :]
    else:
        relevance = (np.asarray(query_labels) @ np.asarray(db_labels).T) > 0
    return distance, relevance


def order_by(distance_row, relevance_row, ties):
    if ties == "index":
        return np.argsort(distance_row, kind="stable")
    if ties == "optimistic":
        return np.lexsort((~relevance_row, distance_row))
    return np.lexsort((relevance_row, distance_row))


def every_order(distance_row):
    """Every ranking that sorts by distance: all permutations within each tie group."""
    groups = [np.flatnonzero(distance_row == value) for value in np.unique(distance_row)]
    for parts in itertools.product(*(itertools.permutations(group) for group in groups)):
        yield np.concatenate(parts)


def ap_of_ranking(ranked_relevance, k):
    top = ranked_relevance[:k]
    hits = int(top.sum())
    if hits == 0:
        return 0.0, 0
    return float(np.mean(np.arange(1, hits + 1) / (np.flatnonzero(top) + 1))), hits


def reference_ap(query, database, query_labels, db_labels, k, ties):
    """Per-query (AP@k, relevant in the top k), by sorting (or averaging over every order)."""
    distance, relevance = distances_and_relevance(query, database, query_labels, db_labels)
    k = min(k or len(database), len(database))
    ap, hits = [], []
    for row in range(len(query)):
        if ties == "expected":
            results = [ap_of_ranking(relevance[row][order], k) for order in every_order(distance[row])]
            ap.append(np.mean([r[0] for r in results]))
            hits.append(np.mean([r[1] for r in results]))
        else:
            result = ap_of_ranking(relevance[row][order_by(distance[row], relevance[row], ties)], k)
            ap.append(result[0])
            hits.append(result[1])
    return np.array(ap), np.array(hits)


def reference_map(query, database, query_labels, db_labels, k=None, ties="index", empty="zero"):
    ap, hits = reference_ap(query, database, query_labels, db_labels, k, ties)
    if empty == "drop":
        ap = ap[hits > 0]
    return float(ap.mean()) if len(ap) else 0.0


def reference_relevant_in_top_k(query, database, query_labels, db_labels, ks, ties):
    """(queries, len(ks)) relevant items among the first k (mean over every order for "expected")."""
    distance, relevance = distances_and_relevance(query, database, query_labels, db_labels)
    found = np.zeros((len(query), len(ks)))
    for row in range(len(query)):
        orders = (
            list(every_order(distance[row])) if ties == "expected" else [order_by(distance[row], relevance[row], ties)]
        )
        for column, k in enumerate(ks):
            found[row, column] = np.mean([relevance[row][order][:k].sum() for order in orders])
    return found, relevance.sum(1)


def reference_precision_at_k(query, database, query_labels, db_labels, ks, ties):
    found, _ = reference_relevant_in_top_k(query, database, query_labels, db_labels, ks, ties)
    return list((found / np.minimum(ks, len(database))).mean(0))


def reference_recall_at_k(query, database, query_labels, db_labels, ks, ties):
    found, total = reference_relevant_in_top_k(query, database, query_labels, db_labels, ks, ties)
    return list((found[total > 0] / total[total > 0, None]).mean(0))


def reference_expected_ap(distance_row, relevance_row, k):
    """E[AP@k] by the tie-group expectation summed position by position (no harmonic numbers) and,
    for the group cut by k, explicitly over the hypergeometric number of its relevant items taken."""
    k = min(k, len(distance_row))
    items_before = relevant_before = 0
    precision_sum = 0.0

    def group_sum(n, r, before, relevant):
        spread = (r - 1) / (n - 1) if n > 1 else 0.0
        return sum((r / n) * (relevant + 1 + (p - 1) * spread) / (before + p) for p in range(1, n + 1))

    for value in np.unique(distance_row):
        n = int((distance_row == value).sum())
        r = int(relevance_row[distance_row == value].sum())
        if items_before + n <= k:
            precision_sum += group_sum(n, r, items_before, relevant_before)
            items_before, relevant_before = items_before + n, relevant_before + r
            continue
        taken = k - items_before
        expected = 0.0
        for x in range(max(0, taken - (n - r)), min(r, taken) + 1):
            probability = comb(r, x) * comb(n - r, taken - x) / comb(n, taken)
            if relevant_before + x:
                partial = group_sum(taken, x, items_before, relevant_before)
                expected += probability * (precision_sum + partial) / (relevant_before + x)
        return expected
    return precision_sum / relevant_before if relevant_before else 0.0


def reference_expected_found(distance_row, relevance_row, k):
    k = min(k, len(distance_row))
    closer = distance_row < np.sort(distance_row)[k - 1]
    tied = distance_row == np.sort(distance_row)[k - 1]
    return relevance_row[closer].sum() + (k - closer.sum()) * relevance_row[tied].sum() / tied.sum()


def random_problem(queries, items, bits, classes=3, multi_label=True, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.choice(np.array([-1, 1], dtype=np.int8), size=(queries, bits))
    database = rng.choice(np.array([-1, 1], dtype=np.int8), size=(items, bits))
    if multi_label:
        multi_hot = lambda rows: (rng.random((rows, classes)) < 0.4).astype(np.int64)  # noqa: E731
        return query, database, multi_hot(queries), multi_hot(items)
    return query, database, rng.integers(0, classes, queries), rng.integers(0, classes, items)


@pytest.fixture(params=["numpy", "torch"])
def backend(request, monkeypatch):
    """Run a test with the CPU (numpy) kernels and again with the torch kernels the GPU uses, on the CPU."""
    if request.param == "torch":
        monkeypatch.setattr(metrics, "_resolve_device", lambda device, *inputs: torch.device("cpu"))
    return request.param


# ------------------------------------------------------------------ hand-computed cases


def test_hand_computed_ranking_with_ties():
    # query 0000; database distances [1, 0, 1, 2, 1], relevant [1, 0, 0, 1, 1]
    query = np.array([[-1, -1, -1, -1]])
    database = np.array([[1, -1, -1, -1], [-1, -1, -1, -1], [-1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, -1]])
    labels_q, labels_db = np.array([0]), np.array([0, 1, 1, 0, 0])
    ranking = HammingRanking(query, database, labels_q, labels_db)
    assert ranking.counts.tolist() == [[1, 3, 1, 0, 0]] and ranking.relevant.tolist() == [[0, 2, 1, 0, 0]]
    # index: order 1, 0, 2, 4, 3 -> relevance 0 1 0 1 1 -> (1/2 + 2/4 + 3/5) / 3
    assert ranking.mean_average_precision(ties="index") == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    # optimistic 0 1 1 0 1; pessimistic 0 0 1 1 1
    assert ranking.mean_average_precision(ties="optimistic") == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert ranking.mean_average_precision(ties="pessimistic") == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3)
    # expected: the tie group {0, 2, 4} in ranks 2-4 holds 2 relevant items, in 3 equally likely
    # places for the irrelevant one: orders (opt, idx, pes) above
    expected = ((1 / 2 + 2 / 3) + (1 / 2 + 2 / 4) + (1 / 3 + 2 / 4)) / 3 / 3 + (3 / 5) / 3
    assert ranking.mean_average_precision(ties="expected") == pytest.approx(expected)
    # top 3: index 0 1 0 -> AP 1/2; expected over the three orders: (1/2+2/3)/2, 1/2, 1/3
    assert ranking.mean_average_precision(3, "index") == pytest.approx(1 / 2)
    assert ranking.mean_average_precision(3, "expected") == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 2 + 1 / 3) / 3)
    assert ranking.precision_at_k([1, 3], "expected") == pytest.approx([0.0, (2 + 1 + 1) / 3 / 3])
    assert ranking.precision_at_k([3], "optimistic") == pytest.approx([2 / 3])
    assert ranking.precision_at_k([3], "pessimistic") == pytest.approx([1 / 3])
    # radius 0 retrieves item 1 (irrelevant), radius 1 four items (2 relevant), radius 2 all
    curve = ranking.pr_curve()
    assert curve["precision"][:3] == pytest.approx([0.0, 2 / 4, 3 / 5])
    assert curve["recall"][:3] == pytest.approx([0.0, 2 / 3, 1.0])
    assert ranking.precision_within_radius(2) == pytest.approx(3 / 5)


def test_all_ties_codes():
    # every database code equal: one tie group of n = 6 items, r = 3 relevant
    query = np.ones((1, 8), dtype=np.int8)
    database = -np.ones((6, 8), dtype=np.int8)
    labels_db = np.array([1, 0, 0, 1, 1, 0])
    args = (query, database, np.array([1]), labels_db)
    assert mean_average_precision(*args, ties="index") == pytest.approx((1 / 1 + 2 / 4 + 3 / 5) / 3)
    assert mean_average_precision(*args, ties="optimistic") == pytest.approx(1.0)
    assert mean_average_precision(*args, ties="pessimistic") == pytest.approx((1 / 4 + 2 / 5 + 3 / 6) / 3)
    for k in (None, 1, 2, 4, 6):
        assert mean_average_precision(*args, topk=k, ties="expected") == pytest.approx(
            reference_map(*args, k, "expected")
        )
    # precision at k of a random order is r / n for every k; nothing lies within radius 2
    assert precision_at_k(*args, ks=[1, 2, 5], ties="expected") == pytest.approx([0.5, 0.5, 0.5])
    assert precision_within_radius(*args) == 0.0


def test_expected_ap_of_one_large_tie_group_matches_the_position_sum():
    rng = np.random.default_rng(3)
    labels_db = (rng.random(400) < 0.3).astype(np.int64)
    query, database = np.ones((1, 16), dtype=np.int8), np.ones((400, 16), dtype=np.int8)
    for k in (None, 1, 57, 399):
        expected = reference_expected_ap(np.zeros(400), labels_db.astype(bool), k or 400)
        assert mean_average_precision(query, database, np.array([1]), labels_db, topk=k) == pytest.approx(
            expected, rel=1e-10
        )


# ------------------------------------------------------------------ against brute force


@pytest.mark.parametrize("seed", range(12))
def test_every_metric_matches_brute_force_on_tiny_tied_cases(seed, backend):
    rng = np.random.default_rng(seed)
    bits, items = int(rng.integers(1, 4)), int(rng.integers(1, 7))
    problem = random_problem(4, items, bits, multi_label=seed % 2 == 0, seed=seed)
    ranking = HammingRanking(*problem)
    for ties in ("expected",) + ORDERED_TIES:
        for k in [None] + list(range(1, items + 2)):
            for empty in ("zero", "drop"):
                assert ranking.mean_average_precision(k, ties, empty) == pytest.approx(
                    reference_map(*problem, k, ties, empty), abs=1e-12
                ), (ties, k, empty)
        ks = list(range(1, items + 2))
        assert ranking.precision_at_k(ks, ties) == pytest.approx(
            reference_precision_at_k(*problem, ks, ties), abs=1e-12
        )
        if ranking.relevant.sum() > 0:
            assert ranking.recall_at_k(ks, ties) == pytest.approx(reference_recall_at_k(*problem, ks, ties), abs=1e-12)


@pytest.mark.parametrize("bits", [12, 24, 32, 48, 64, 128])
def test_bit_lengths_match_brute_force(bits, backend):
    problem = random_problem(12, 300, bits, classes=4, multi_label=bits % 3 == 0, seed=bits)
    # fewer distinct distances at short codes; force many ties at long ones by repeating items
    query, database, query_labels, db_labels = problem
    database = np.concatenate([database, database[:60]])
    db_labels = np.concatenate([db_labels, db_labels[:60][::-1]])
    problem = (query, database, query_labels, db_labels)
    ranking = HammingRanking(pack_bits(query), pack_bits(database), query_labels, db_labels, bits=bits)
    distance, relevance = distances_and_relevance(*problem)
    for k in (None, 1, 10, 100, 359):
        for ties in ORDERED_TIES:
            assert ranking.mean_average_precision(k, ties) == pytest.approx(reference_map(*problem, k, ties), abs=1e-12)
        expected = np.mean([reference_expected_ap(distance[i], relevance[i], k or 360) for i in range(len(query))])
        assert ranking.mean_average_precision(k, "expected") == pytest.approx(expected, abs=1e-10)
    ks = [1, 5, 50, 360, 1000]
    for ties in ORDERED_TIES:
        assert ranking.precision_at_k(ks, ties) == pytest.approx(
            reference_precision_at_k(*problem, ks, ties), abs=1e-12
        )
        assert ranking.recall_at_k(ks, ties) == pytest.approx(reference_recall_at_k(*problem, ks, ties), abs=1e-12)
    # expected relevant count in the top k: whole groups, plus k - N of the cut group's n at rate r / n
    expected_found = [[reference_expected_found(distance[i], relevance[i], k) for k in ks] for i in range(len(query))]
    expected_precision = (np.array(expected_found) / np.minimum(ks, 360)).mean(0)
    assert ranking.precision_at_k(ks, "expected") == pytest.approx(list(expected_precision), abs=1e-12)
    check_radius_metrics(ranking, distance, relevance)


def test_codes_longer_than_255_bits(backend):
    problem = random_problem(5, 70, 300, seed=11)  # distances no longer fit uint8
    for ties in ORDERED_TIES:
        assert mean_average_precision(*problem, ties=ties) == pytest.approx(
            reference_map(*problem, None, ties), abs=1e-12
        )


def check_radius_metrics(ranking, distance, relevance):
    for radius in range(ranking.bits + 1):
        within = distance <= radius
        retrieved, found = within.sum(1), (within & relevance).sum(1)
        precision = np.where(retrieved > 0, found / np.maximum(retrieved, 1), 0.0).mean()
        has = relevance.sum(1) > 0
        recall = (found[has] / relevance.sum(1)[has]).mean()
        curve = ranking.pr_curve()
        assert curve["precision"][radius] == pytest.approx(precision, abs=1e-12)
        assert curve["recall"][radius] == pytest.approx(recall, abs=1e-12)
    assert ranking.precision_within_radius(2) == pytest.approx(ranking.pr_curve()["precision"][2])


def test_multi_label_relevance_is_any_shared_label():
    query = np.array([[1, 1], [1, 1]])
    database = np.array([[1, 1], [-1, -1], [1, -1]])
    query_labels = np.array([[1, 0, 1], [0, 1, 0]])
    db_labels = np.array([[0, 0, 1], [1, 1, 0], [0, 1, 0]])
    ranking = HammingRanking(query, database, query_labels, db_labels)
    # query 0 shares a label with items 0 and 1, query 1 with items 1 and 2
    assert ranking.relevant.sum(1).tolist() == [2, 2]
    assert ranking.average_precision(ties="index")[0] == pytest.approx([(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2])


def test_class_indices_equal_one_hot_labels():
    query, database, query_labels, db_labels = random_problem(10, 80, 8, classes=5, multi_label=False, seed=4)
    one_hot = np.eye(5, dtype=np.int64)
    for ties in ("expected", "index"):
        assert mean_average_precision(query, database, query_labels, db_labels, ties=ties) == pytest.approx(
            mean_average_precision(query, database, one_hot[query_labels], one_hot[db_labels], ties=ties)
        )


def test_chunking_does_not_change_results(monkeypatch, backend):
    problem = random_problem(23, 157, 20, seed=6)
    ranking = HammingRanking(*problem)
    before = [ranking.mean_average_precision(k, ties) for k in (None, 30) for ties in ("expected",) + ORDERED_TIES]
    small_chunks = {
        "_CPU_QUERY_CHUNK": 3,
        "_CPU_RELEVANT_GROUP": 2,
        "_CPU_INDEX_CHUNK": 3,
        "_GPU_INDEX_PAIRS": 300,
        "_GPU_PAIRS": 200,
        "_GPU_SHARED_BINS": 100,
        "_GPU_FOLDED_SETS": 0,
        "_HYPERGEOMETRIC_CELLS": 3,
    }
    for name, value in small_chunks.items():
        monkeypatch.setattr(metrics, name, value)
    ranking = HammingRanking(*problem)
    ranking.threads = 1
    after = [ranking.mean_average_precision(k, ties) for k in (None, 30) for ties in ("expected",) + ORDERED_TIES]
    assert after == pytest.approx(before, abs=1e-12)


def test_a_database_of_several_kernel_blocks_matches_the_reference():
    """Past one database block of the CPU kernels (dmuh.codes.topk.DB_BLOCK codes), at 48 bits (padded
    words) with heavy ties, single- and multi-label: ties="index" and "expected" against the references."""
    for multi_label in (True, False):
        query, database, query_labels, db_labels = random_problem(9, 5000, 48, multi_label=multi_label, seed=12)
        database[1::2] = database[::2]  # every code twice: ties within and across blocks
        problem = (query, database, query_labels, db_labels)
        ranking = HammingRanking(query, database, query_labels, db_labels)
        for k in (None, 7, 3000):
            want = reference_map(query, database, query_labels, db_labels, k, "index")
            assert ranking.mean_average_precision(k, "index") == pytest.approx(want, abs=1e-12)
        assert ranking.mean_average_precision(None, "expected") == pytest.approx(
            np.mean([reference_expected_ap(*rows, 5000) for rows in zip(*distances_and_relevance(*problem))]),
            abs=1e-12,
        )


def test_bounds_order_expected_between_pessimistic_and_optimistic():
    problem = random_problem(30, 200, 6, seed=7)
    ranking = HammingRanking(*problem)
    low, mid, high = (ranking.mean_average_precision(None, ties) for ties in ("pessimistic", "expected", "optimistic"))
    assert low <= mid <= high and low < high
    for k in (1, 17, 100):
        low, mid, high = (ranking.precision_at_k([k], ties)[0] for ties in ("pessimistic", "expected", "optimistic"))
        assert low <= mid + 1e-12 and mid <= high + 1e-12


def test_a_query_without_relevant_items():
    query, database = np.ones((2, 4)), np.ones((3, 4))
    query_labels, db_labels = np.array([[1, 0], [0, 1]]), np.array([[1, 0], [1, 0], [1, 0]])
    assert mean_average_precision(query, database, query_labels, db_labels) == pytest.approx(0.5)
    assert mean_average_precision(query, database, query_labels, db_labels, empty="drop") == pytest.approx(1.0)
    assert mean_average_precision(query[1:], database, query_labels[1:], db_labels, empty="drop") == 0.0
    report = retrieval_report(query, database, query_labels, db_labels)
    assert report["counts"]["queries_without_relevant"] == 1 and report["recall_at_k"][0] == pytest.approx(1 / 3)


# ------------------------------------------------------------------ properties


@st.composite
def problems(draw, max_items=40, max_bits=10):
    queries = draw(st.integers(1, 6))
    items = draw(st.integers(1, max_items))
    bits = draw(st.integers(1, max_bits))
    seed = draw(st.integers(0, 2**31))
    return random_problem(
        queries, items, bits, classes=draw(st.integers(1, 4)), multi_label=draw(st.booleans()), seed=seed
    )


@FAST
@given(problems(), st.sampled_from(("expected",) + ORDERED_TIES), st.integers(1, 50))
def test_map_is_within_0_and_1(problem, ties, k):
    for topk in (None, k):
        value = mean_average_precision(*problem, topk=topk, ties=ties)
        assert 0.0 <= value <= 1.0 + 1e-12


@FAST
@given(problems(), st.integers(1, 50), st.randoms(use_true_random=False))
def test_tie_aware_map_is_unchanged_by_permuting_the_database(problem, k, random):
    query, database, query_labels, db_labels = problem
    permutation = list(range(len(database)))
    random.shuffle(permutation)
    for topk in (None, k):
        for ties in ("expected", "optimistic", "pessimistic"):
            permuted = mean_average_precision(
                query, database[permutation], query_labels, db_labels[permutation], topk, ties
            )
            assert permuted == pytest.approx(
                mean_average_precision(query, database, query_labels, db_labels, topk, ties), abs=1e-12
            )


@FAST
@given(st.integers(1, 8), st.integers(1, 30), st.sampled_from([4, 12, 64]), st.integers(0, 2**31))
def test_perfect_codes_give_map_1(classes, items, bits, seed):
    assume(classes < bits)
    rng = np.random.default_rng(seed)
    class_codes = np.ones((classes, bits), dtype=np.int8)
    for c in range(classes):  # a distinct code per class: its first c bits flipped
        class_codes[c, :c] = -1
    db_labels = rng.integers(0, classes, items)
    query_labels = rng.permutation(db_labels)[: max(1, items // 3)]
    args = (class_codes[query_labels], class_codes[db_labels], query_labels, db_labels)
    for ties in ("expected",) + ORDERED_TIES:
        assert mean_average_precision(*args, ties=ties) == pytest.approx(1.0)
        assert mean_average_precision(*args, topk=5, ties=ties) == pytest.approx(1.0)


@FAST
@given(problems(max_items=6, max_bits=3), st.integers(1, 7))
def test_expected_map_is_the_mean_over_every_tie_order(problem, k):
    for topk in (None, k):
        for empty in ("zero", "drop"):
            assert mean_average_precision(*problem, topk=topk, ties="expected", empty=empty) == pytest.approx(
                reference_map(*problem, topk, "expected", empty), abs=1e-12
            )


# ------------------------------------------------------------------ report, devices, errors


def test_retrieval_report_is_json_and_agrees_with_the_functions(monkeypatch):
    problem = random_problem(15, 120, 16, seed=8)
    index_passes = []
    cpu_index_stats = metrics._cpu_index_stats
    monkeypatch.setattr(metrics, "_cpu_index_stats", lambda *args: index_passes.append(1) or cpu_index_stats(*args))
    report = retrieval_report(*problem, topk=50, ties=["expected", "index"], precision_ks=(1, 10, 500))
    assert len(index_passes) == 1  # one sorted pass serves every "index" number
    json.dumps(report)
    assert report["map"] == pytest.approx(mean_average_precision(*problem))
    assert report["map_at_k"] == pytest.approx(mean_average_precision(*problem, topk=50))
    assert report["map_by_ties"]["index"]["map_at_k"] == pytest.approx(reference_map(*problem, 50, "index"))
    assert set(report["map_by_ties"]) == {"expected", "index", "optimistic", "pessimistic"}
    assert report["precision_at_k"] == pytest.approx(precision_at_k(*problem, ks=(1, 10, 500)))
    assert report["recall_at_k"] == pytest.approx(recall_at_k(*problem, ks=(1, 10, 500)))
    assert report["pr_curve"] == pr_curve(*problem)
    assert report["precision_radius2"] == pytest.approx(precision_within_radius(*problem, radius=2))
    assert report["counts"]["queries"] == 15 and report["counts"]["database"] == 120 and report["counts"]["bits"] == 16
    assert retrieval_report(*problem)["map_at_k"] is None


def test_tensor_and_packed_inputs_give_the_same_map():
    query, database, query_labels, db_labels = random_problem(10, 90, 13, seed=9)
    reference = mean_average_precision(query, database, query_labels, db_labels)
    tensors = [torch.from_numpy(x) for x in (query, database, query_labels, db_labels)]
    assert mean_average_precision(*tensors) == pytest.approx(reference)
    assert mean_average_precision(tensors[0].float(), tensors[1].float(), *tensors[2:], device="cpu") == pytest.approx(
        reference
    )
    packed = mean_average_precision(pack_bits(query), pack_bits(database), query_labels, db_labels, bits=13)
    assert packed == pytest.approx(reference)
    assert mean_average_precision(query > 0, database > 0, query_labels, db_labels) == pytest.approx(reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bits", [12, 64, 128])
def test_gpu_matches_cpu(bits):
    problem = random_problem(40, 3000, bits, classes=5, multi_label=bits == 64, seed=bits)
    cpu = retrieval_report(*problem, topk=100, ties=["expected", "index"], device="cpu")
    cuda_inputs = [torch.from_numpy(x).cuda() for x in problem]
    gpu = retrieval_report(*cuda_inputs, topk=100, ties=["expected", "index"])
    assert json.dumps(gpu)
    for key in ("map", "map_at_k", "precision_at_k", "recall_at_k", "precision_radius2"):
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-10), key
    assert gpu["map_by_ties"]["index"]["map"] == pytest.approx(cpu["map_by_ties"]["index"]["map"], abs=1e-10)


def test_bad_arguments_name_the_argument():
    problem = random_problem(3, 10, 8, seed=10)
    with pytest.raises(DmuhError, match="ties: 'random'"):
        mean_average_precision(*problem, ties="random")
    with pytest.raises(DmuhError, match="empty: 'skip'"):
        mean_average_precision(*problem, empty="skip")
    with pytest.raises(DmuhError, match="topk"):
        mean_average_precision(*problem, topk=0)
    with pytest.raises(DmuhError, match="radius"):
        precision_within_radius(*problem, radius=-1)
    query, database, query_labels, db_labels = problem
    with pytest.raises(DmuhError, match="db_labels: 9 rows for 10 codes"):
        mean_average_precision(query, database, query_labels, db_labels[:9])
    with pytest.raises(DmuhError, match="db_codes: 16 bits"):
        mean_average_precision(query, np.ones((10, 16)), query_labels, db_labels)
    with pytest.raises(DmuhError, match="query_codes: expected binary codes"):
        mean_average_precision(query * 0.5, database, query_labels, db_labels)
    with pytest.raises(DmuhError, match="query_labels: labels must be non-negative"):
        mean_average_precision(query, database, -np.ones(3, dtype=int), db_labels)
    with pytest.raises(DmuhError, match="device"):
        mean_average_precision(*problem, device="tpu")


def test_ranked_metrics_of_a_hand_made_ranking():
    from dmuh.metrics.ranking import ranked_metrics

    relevant = np.array([[True, False, True], [False, False, False]])
    out = ranked_metrics(relevant, ks=(1, 2, 5))
    assert out["map"] == pytest.approx(((1 / 1 + 2 / 3) / 2 + 0.0) / 2)
    assert out["p@1"] == pytest.approx(0.5) and out["p@2"] == pytest.approx(0.25) and "p@5" not in out
    assert ranked_metrics(relevant, topk=1)["map"] == pytest.approx(0.5)
