"""Building blocks of the shallow classics of the MATLAB toolkits (issue #33): the principal
directions, the toolkit's data scale, and Deng Cai's `litekmeans` (used by density-sensitive
hashing). All in float64 on the CPU, seeded by a `torch.Generator`."""

from __future__ import annotations

from typing import Tuple

import torch

from dmuh.models.heads import squared_distances

CHUNK = 8192  # rows of a distance matrix computed at once


def principal_directions(centred: torch.Tensor, count: int) -> torch.Tensor:
    """The top `count` eigenvectors of the scatter matrix of mean-centred rows, (D, count), in
    descending order of eigenvalue (MATLAB's `eigs(cov(X), count)`; a column's sign is arbitrary
    there as here)."""
    _, eigenvectors = torch.linalg.eigh(centred.t() @ centred)  # ascending
    return eigenvectors[:, -count:].flip(1)


def random_rotation(bits: int, seed: int) -> torch.Tensor:
    """A random orthogonal bits x bits matrix: the U of the SVD of a seeded Gaussian matrix
    (ITQ.m's starting rotation, trainRR.m's rotation)."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(bits, bits, generator=generator, dtype=torch.float64)
    u, _, _ = torch.linalg.svd(gaussian)
    return u


def neighbour_distance_scale(x: torch.Tensor, generator: torch.Generator, sample: int = 100, rank: int = 50) -> float:
    """The data scale of the toolkits' `construct_data.m`: the mean, over `sample` training items
    drawn at random, of the distance to their `rank`-th nearest training item (the item itself
    counted first, as MATLAB's sort of a distance row does). The toolkits divide the data by it
    ("scale data so that the target distance is 1") before SKLSH's kernel of bandwidth 1."""
    n = x.shape[0]
    rows = x[torch.randperm(n, generator=generator)[: min(sample, n)]]
    k = min(rank, n)
    nearest = torch.cat(
        [squared_distances(rows, x[start : start + CHUNK]).sqrt() for start in range(0, n, CHUNK)],
        dim=1,
    )
    return float(nearest.sort(dim=1).values[:, k - 1].mean())


def lite_kmeans(
    x: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deng Cai's litekmeans.m (start 'sample', one replicate): centres drawn from the items without
    replacement, then at most `iterations` rounds of (assign each item to its nearest centre; give
    every empty cluster one of the items farthest from their centre; centres = cluster means),
    stopping early when no label changes. Returns (labels (n,), centres (clusters, D))."""
    n = x.shape[0]
    centres = x[torch.randperm(n, generator=generator)[:clusters]].clone()
    squared_norms = (x * x).sum(1)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        # ||c||^2 - 2 x.c: the squared distance less ||x||^2, as litekmeans assigns
        partial = (centres * centres).sum(1) - 2 * x @ centres.t()
        values, new = partial.min(dim=1)
        missing = [k for k in range(clusters) if not bool((new == k).any())]
        if missing:
            # litekmeans: the items farthest from their centre, in descending order, fill the
            # empty clusters in increasing cluster order
            farthest = torch.sort(values + squared_norms, descending=True, stable=True).indices
            new[farthest[: len(missing)]] = torch.tensor(missing, dtype=torch.long)
        changed = not torch.equal(new, labels)
        labels = new
        counts = torch.bincount(labels, minlength=clusters).to(x.dtype)
        centres = torch.zeros(clusters, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts[:, None]
        if not changed:
            break
    return labels, centres
