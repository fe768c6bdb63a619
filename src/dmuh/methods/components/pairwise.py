"""DPSH's pairwise likelihood, shared by the DPSH family (Regu, DMUH, DistillHash, DHN, DSDH, DCMH).

The negative log-likelihood of a pair (i, j) is log(1 + e^Theta_ij) - S_ij Theta_ij. As
pytorch-metric-learning injects `distance=` and `reducer=` into a loss, `similarity` (how Theta is
made of two sets of codes) and `reduction` (how the (B, n) pair losses become one number) are
callables given to `pair_likelihood`; the defaults are DPSH's: Theta_ij = h_i^T U_j / 2, and the
sum over the memory items seen so far divided by n B.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (pair_loss (B, n), seen (n,) bool, num_train n) -> the loss
Reduction = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def half_inner_product(codes: torch.Tensor, other_codes: torch.Tensor) -> torch.Tensor:
    """DPSH's Theta (B, n): Theta_ij = h_i^T U_j / 2."""
    return 0.5 * codes.float() @ other_codes.float().t()


def pair_nll(
    codes: torch.Tensor, other_codes: torch.Tensor, similar: torch.Tensor, similarity: Similarity = half_inner_product
) -> torch.Tensor:
    """DPSH's negative log-likelihood of every pair (i, j), (B, n): log(1 + e^Theta_ij) - S_ij Theta_ij
    with Theta = similarity(codes, other_codes), h_i^T U_j / 2 by default (softplus: no overflow)."""
    theta = similarity(codes, other_codes)
    return F.softplus(theta) - similar * theta


def mean_over_nb(pair_loss: torch.Tensor, seen: torch.Tensor, num_train: int) -> torch.Tensor:
    """Sum over the seen memory items divided by n B, fixed (DPSH's normalisation, "nB")."""
    total = (pair_loss * seen.to(pair_loss.dtype)).sum()
    return total / float(num_train * pair_loss.shape[0])


def mean_over_seen_pairs(pair_loss: torch.Tensor, seen: torch.Tensor, num_train: int) -> torch.Tensor:
    """Mean over the batch x seen pairs, the pairs that exist yet ("batch")."""
    seen = seen.to(pair_loss.dtype)
    total = (pair_loss * seen).sum()
    return total / (pair_loss.shape[0] * seen.sum()).clamp(min=1)


def reduction_of(normalisation: str) -> Reduction:
    """The reduction a `normalisation` word names: "batch", or DPSH's "nB" (any other word)."""
    return mean_over_seen_pairs if normalisation == "batch" else mean_over_nb


def pair_likelihood(
    codes: torch.Tensor,
    other_codes: torch.Tensor,
    similar: torch.Tensor,
    seen: torch.Tensor,
    pair_weights: Optional[torch.Tensor] = None,
    similarity: Similarity = half_inner_product,
    reduction: Reduction = mean_over_nb,
) -> torch.Tensor:
    """The batch's (B, bits) codes against the memory's (n, bits), S (B, n) given, weighted pairwise
    when `pair_weights` (B, n) is given, reduced over the `seen` memory items."""
    pair_loss = pair_nll(codes, other_codes, similar, similarity)
    if pair_weights is not None:
        pair_loss = pair_loss * pair_weights
    return reduction(pair_loss, seen, other_codes.shape[0])
