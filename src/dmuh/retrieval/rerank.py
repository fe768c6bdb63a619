"""Re-ranking of Hamming search results, as objects wrapped around an index.

    searcher = RerankedIndex(index, UncertaintyReranker(tau=1.0), depth=1000)   # like FAISS's IndexRefine
    result = searcher.search(Query(codes, bit_uncertainty=u), k=10, params=SearchParams(nprobe=8))

A `Reranker` has one contract, `rerank(query, candidates) -> Reranked`: it orders each query's
candidates (the top `depth` codes by Hamming distance, `Candidates`) by its own score.

`UncertaintyReranker`: the candidates re-ordered by sum_k w_k [b_qk != b_xk],
w_k = exp(-u_k / (tau * mean_j u_j)), u the query's bit-level DMUH uncertainty (`rerank`);
bench/rerank_cifar10.py measures whether it helps on a run's split.

`DecoderReranker`: rank-preserving hashing's re-ranking, by the cosine of each query's own features
to the candidates' features decoded from their codes (`dmuh.models.decoder.FeatureDecoder`).

`reranker_for(mode, index, tau)` makes the reranker of a mode name (`RERANK_MODES`); the search
service, behind `dmuh search` and `dmuh serve`, goes through it. This module imports no index:
`RerankedIndex` takes any index of the contract (`dmuh.retrieval.index.base.CodeIndex`).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import numpy as np

from dmuh.errors import DmuhError
from dmuh.retrieval.options import DEFAULT_RERANK_DEPTH, DEFAULT_TAU, RERANK_MODES  # noqa: F401 - also this module's API

_RERANK_CHUNK = 64
_DECODE_CHUNK = 64  # queries whose candidates' decoded features are held at once (decoder re-ranking)


def uncertainty_weights(bit_uncertainty: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """w_k = exp(-u_k / (tau * mean_j u_j)), per query: a bit the query is sure of counts about 1,
    one it is unsure of (relative to its other bits) less; a bit at the query's mean uncertainty
    counts exp(-1 / tau).

    u_k = |h_k - m_k| is the query's bit-level uncertainty (DMUH Eq. 6, hashing vs momentum
    network) and mean_j u_j its image-level uncertainty (Eq. 7). Scaling by it makes tau free of
    units: the size of u differs between runs and shrinks as training settles (as the learning
    rate decays the momentum copy catches up), what matters is which bits stand out.
    """
    if not 0 < tau < math.inf:  # tau = inf weighs every bit 1: plain Hamming order, not a re-ranking
        raise DmuhError(f"tau={tau!r}: expected a finite positive number")
    u = np.asarray(bit_uncertainty, dtype=np.float32)
    if not (np.isfinite(u).all() and (u >= 0).all()):
        raise DmuhError("bit uncertainty: expected finite values >= 0 (|h - m|), got an infinite, NaN or negative one")
    scale = np.float32(tau) * u.mean(axis=-1, keepdims=True)
    # A query with no uncertainty at all keeps plain Hamming distance (all weights 1).
    return np.exp(-np.divide(u, scale, out=np.zeros_like(u), where=scale > 0))


def rerank(
    query_packed: np.ndarray,
    bit_uncertainty: np.ndarray,
    candidate_packed: np.ndarray,
    candidate_positions: np.ndarray,
    bits: int,
    tau: float = DEFAULT_TAU,
) -> Tuple[np.ndarray, np.ndarray]:
    """Order each query's candidates by the uncertainty-weighted Hamming distance.

    d_w(q, x) = sum_k w_k [b_qk != b_xk], w from `uncertainty_weights`. Ties go by Hamming
    distance, then position; missing candidates (position -1) go last.
    query_packed (nq, B), bit_uncertainty (nq, bits), candidate_packed (nq, R, B),
    candidate_positions (nq, R). Returns (order (nq, R) into the candidates, weighted (nq, R)).
    """
    weights = uncertainty_weights(bit_uncertainty, tau)
    weighted = np.empty(candidate_positions.shape, dtype=np.float32)
    hamming = np.empty(candidate_positions.shape, dtype=np.int64)
    for start in range(0, query_packed.shape[0], _RERANK_CHUNK):  # bounds the (chunk, R, bits) temporary
        rows = slice(start, start + _RERANK_CHUNK)
        # np.unpackbits order is dmuh.codes.binary' packing order: column k is bit k, as in the weights.
        differ = np.unpackbits(np.bitwise_xor(candidate_packed[rows], query_packed[rows, None, :]), axis=2, count=bits)
        weighted[rows] = np.einsum("nrk,nk->nr", differ.astype(np.float32), weights[rows])
        hamming[rows] = differ.sum(axis=2, dtype=np.int64)
    missing = candidate_positions < 0
    weighted[missing] = np.inf
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, candidate_positions), hamming, weighted), axis=1)
    return order, weighted


# -- re-rankers as objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """Queries as re-ranking sees them: their codes (packed (nq, B) uint8 once `RerankedIndex`
    has checked them) and what a reranker reads, per query: bit uncertainty (nq, bits) or own
    features (nq, D)."""

    codes: np.ndarray
    bit_uncertainty: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Candidates:
    """Each query's candidates by Hamming distance, in (distance, position) order: distances int32
    (nq, R), positions int64 (nq, R; -1: no candidate), their packed codes (nq, R, B; a zero code
    at -1) and the bit length."""

    distances: np.ndarray
    positions: np.ndarray
    codes: np.ndarray
    bits: int


@dataclass(frozen=True)
class Reranked:
    """A reranker's answer: order (nq, R), indices into the candidates, best first, and its score
    of each candidate (nq, R, in candidate order)."""

    order: np.ndarray
    scores: np.ndarray


class Reranker(abc.ABC):
    """Re-orders Hamming candidates; `score` names its score column in results."""

    mode = ""
    score = ""

    def check(self, query: Query, bits: int) -> None:  # noqa: B027 - an optional hook
        """Refuse queries this reranker cannot re-rank (DmuhError), before any search."""

    @abc.abstractmethod
    def rerank(self, query: Query, candidates: Candidates) -> Reranked:
        """Each query's candidates in this reranker's order."""


class UncertaintyReranker(Reranker):
    """DMUH's uncertainty-weighted Hamming distance (`rerank`, `uncertainty_weights`); ties by
    Hamming distance, then position."""

    mode = "uncertainty"
    score = "weighted"

    def __init__(self, tau: float = DEFAULT_TAU):
        self.tau = tau

    def check(self, query: Query, bits: int) -> None:
        nq = np.asarray(query.codes).shape[0]
        shape = None if query.bit_uncertainty is None else np.asarray(query.bit_uncertainty).shape
        if shape != (nq, bits):
            raise DmuhError(f"bit uncertainty: expected shape {(nq, bits)}, got {shape}")

    def rerank(self, query: Query, candidates: Candidates) -> Reranked:
        uncertainty = np.asarray(query.bit_uncertainty, dtype=np.float32)
        order, weighted = rerank(
            query.codes, uncertainty, candidates.codes, candidates.positions, candidates.bits, self.tau
        )
        return Reranked(order, weighted)


class DecoderReranker(Reranker):
    """Rank-preserving hashing: the cosine of each query's features (nq, D) to the candidates'
    features decoded from their codes (each candidate decoded once); ties by Hamming distance,
    then position."""

    mode = "decoder"
    score = "cosine"

    def __init__(self, decoder):
        if decoder is None:
            raise DmuhError(
                "this index holds no decoder; build it from the codes of a run that trains one (e.g. --method rph)"
            )
        self.decoder = decoder

    def check(self, query: Query, bits: int) -> None:
        nq = np.asarray(query.codes).shape[0]
        features = None if query.features is None else np.asarray(query.features, dtype=np.float32)
        if features is None or features.shape != (nq, self.decoder.dim) or not np.isfinite(features).all():
            raise DmuhError(
                f"query features: expected {nq} finite rows of {self.decoder.dim} values, "
                f"got shape {None if features is None else features.shape}"
            )

    def rerank(self, query: Query, candidates: Candidates) -> Reranked:
        positions, distances = candidates.positions, candidates.distances
        features = np.asarray(query.features, dtype=np.float32)
        found = positions >= 0
        _, first, inverse = np.unique(positions[found], return_index=True, return_inverse=True)
        decoded = self.decoder.decode_packed(candidates.codes[found][first])  # each candidate decoded once
        slot = np.zeros(positions.shape, dtype=np.int64)
        slot[found] = inverse  # row of `decoded` per candidate
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        queries = features / np.where(norms > 0, norms, 1)
        cosine = np.empty(positions.shape, dtype=np.float32)
        for start in range(0, len(queries), _DECODE_CHUNK):  # bounds the (chunk, depth, D) temporary
            rows = slice(start, start + _DECODE_CHUNK)
            cosine[rows] = np.einsum("nrd,nd->nr", decoded[slot[rows]], queries[rows])
        cosine[~found] = -np.inf
        order = np.lexsort((np.where(found, positions, np.iinfo(np.int64).max), distances, -cosine), axis=1)
        return Reranked(order, cosine)


def reranker_for(mode: str, index, tau: Optional[float] = None) -> Reranker:
    """The reranker of a mode of `RERANK_MODES` over `index` (decoder: the index's decoder)."""
    if mode == "uncertainty":
        return UncertaintyReranker(DEFAULT_TAU if tau is None else tau)
    if mode == "decoder":
        return DecoderReranker(index.decoder)
    raise DmuhError(f"rerank {mode!r}: choose {' or '.join(RERANK_MODES)}")


def candidate_codes(index, positions: np.ndarray) -> np.ndarray:
    """The stored codes at search result positions (nq, R, B); empty slots (-1) get a zero code,
    which the re-rankers ignore."""
    found = positions >= 0
    codes = np.zeros((*positions.shape, (int(index.bits) + 7) // 8), dtype=np.uint8)
    if found.any():
        codes[found] = index.codes_at(positions[found])
    return codes


class RerankedIndex:
    """An index (`dmuh.retrieval.index.base.CodeIndex`) whose top `depth` candidates by Hamming
    distance a `Reranker` re-orders, as FAISS's IndexRefine wraps a base index."""

    def __init__(self, index, reranker: Reranker, depth: int = DEFAULT_RERANK_DEPTH):
        self.index = index
        self.reranker = reranker
        self.depth = depth

    def search(self, query: Query, k: int, params=None) -> Dict[str, np.ndarray]:
        """The k best of each query's top max(depth, k) codes by Hamming distance, in the reranker's
        order: {score (`reranker.score`): float32 (nq, k), "distances": int32 Hamming, "positions":
        int64, "ids": int64}. `params` (`SearchParams`) apply to the Hamming search."""
        index = self.index
        query = replace(query, codes=index.packed_queries(query.codes))
        self.reranker.check(query, index.bits)
        index.check_k(k)
        depth = min(max(int(self.depth), int(k)), len(index))
        distances, positions = index.search_positions(query.codes, depth, params)
        candidates = Candidates(distances, positions, candidate_codes(index, positions), index.bits)
        ranked = self.reranker.rerank(query, candidates)
        order = ranked.order[:, :k]
        result = {
            self.reranker.score: np.take_along_axis(ranked.scores, order, axis=1),
            "distances": np.take_along_axis(distances, order, axis=1),
            "positions": np.take_along_axis(positions, order, axis=1),
        }
        result["ids"] = index.ids_at(result["positions"])
        return result
