"""Uncertainty-aware re-ranking of Hamming search results.

The top candidates by Hamming distance are re-ordered by sum_k w_k [b_qk != b_xk],
w_k = exp(-u_k / (tau * mean_j u_j)), u the query's bit-level DMUH uncertainty.
`dmuh.retrieval.index.base.CodeIndex.search_reranked` applies it to an index; bench/rerank_cifar10.py measures whether
it helps on a run's split.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from dmuh.errors import DmuhError

DEFAULT_RERANK_DEPTH = 1000
DEFAULT_TAU = 1.0
_RERANK_CHUNK = 64


def uncertainty_weights(bit_uncertainty: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """w_k = exp(-u_k / (tau * mean_j u_j)), per query: a bit the query is sure of counts about 1,
    one it is unsure of (relative to its other bits) less; a bit at the query's mean uncertainty
    counts exp(-1 / tau).

    u_k = |h_k - m_k| is the query's bit-level uncertainty (DMUH Eq. 6, hashing vs momentum
    network) and mean_j u_j its image-level uncertainty (Eq. 7). Scaling by it makes tau free of
    units: the size of u differs between runs and shrinks as training settles (as the learning
    rate decays the momentum copy catches up), what matters is which bits stand out.
    """
    if not tau > 0:
        raise DmuhError(f"tau={tau!r}: expected a positive number")
    u = np.asarray(bit_uncertainty, dtype=np.float32)
    scale = np.float32(tau) * u.mean(axis=-1, keepdims=True)
    # A query with no uncertainty at all keeps plain Hamming distance (all weights 1).
    return np.exp(-np.divide(u, scale, out=np.zeros_like(u), where=scale > 0))


def rerank(query_packed: np.ndarray, bit_uncertainty: np.ndarray, candidate_packed: np.ndarray,
           candidate_positions: np.ndarray, bits: int, tau: float = DEFAULT_TAU) -> Tuple[np.ndarray, np.ndarray]:
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
