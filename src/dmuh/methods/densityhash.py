"""Density-sensitive hashing (Jin, Li, Lin and Cai, IEEE Trans. Cybernetics 2014; "DSH" in the
papers and toolkits, registered as `densityhash` since `dsh` is Liu et al.'s deep supervised hashing).

Reference followed: Yue Lin's DSH_learn / DSH_compress as shipped in the MATLAB toolkit
willard-yuan/hashing-baseline-for-image-retrieval (Method-DSH/trainDSH.m, compressDSH.m,
litekmeans.m). Unsupervised; hyperplanes between neighbouring k-means centres, chosen by how
evenly they split the data.

Fit on the training features X (mean-centred, as the toolkit's data):
1. k-means with round(alpha * bits) clusters (alpha = 1.5), `kmeans_iter` = 3 rounds of
   litekmeans (centres drawn from the items, seeded); p_c = share of the items in cluster c.
2. For every centre, its r = 3 nearest other centres (squared distances); each such pair (a, b)
   is a candidate hyperplane w = u_a - u_b through the midpoint, t = (u_a + u_b)/2 . w. Candidates
   are the distinct pair distances (MATLAB's unique), each standing for the first pair at that
   distance in column-major order (find(Du == d, 1, 'first'): a > b).
3. A candidate's entropy score is min(P, 1 - P) / max(P, 1 - P), P = the summed p_c of the clusters
   whose centre lies on the positive side (u_c . w > t).
4. The `bits` candidates with the highest scores (ties: the first in distance order) are the bits:
   code_k(x) = sign(w_k . x - t_k), a linear hash layer.

Deviations: dmuh centres by the training mean (the toolkit by the mean of training and test
items). A threshold value exactly on a centre's projection counts it on the negative side, as
DD > th. sign(0) = +1 where compressDSH.m's U > res gives 0.
"""

from __future__ import annotations

from typing import Tuple

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import Requirements, register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.methods.components.shallow_toolkit import lite_kmeans
from dmuh.models.heads import squared_distances
from dmuh.utils.schema import Rule


def candidate_hyperplanes(centres: torch.Tensor, shares: torch.Tensor, neighbours: int):
    """(pairs [(a, b)], scores (P,)) of trainDSH.m's candidates, in increasing distance order."""
    k = centres.shape[0]
    distances = squared_distances(centres, centres)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.sort(dim=1).values[:, :neighbours]
    values = torch.unique(nearest[torch.isfinite(nearest)])  # sorted ascending, as MATLAB's unique
    pairs, scores = [], []
    for value in values:
        # find(Du == value, 1, 'first') in column-major order: the smallest column, then row
        rows, cols = torch.nonzero(distances == value, as_tuple=True)
        first = torch.argmin(cols * k + rows)
        a, b = int(rows[first]), int(cols[first])
        normal = centres[a] - centres[b]
        threshold = (centres[a] + centres[b]) / 2 @ normal
        positive = float(shares[centres @ normal > threshold].sum())
        negative = 1.0 - positive
        pairs.append((a, b))
        scores.append(min(positive, negative) / max(positive, negative))
    return pairs, torch.tensor(scores, dtype=torch.float64)


@register_method("densityhash", display_name="Density-sensitive DSH")
class DensityHash(ShallowMethod):
    """Hyperplanes between neighbouring k-means centres, the most balanced ones first."""

    requires = Requirements(shallow=True, labels=False)
    hyper_parameters = {
        "alpha": Param(float, Rule(above=0.0), "clusters per bit (k-means with round(alpha * bits) clusters)"),
        "neighbours": Param(int, Rule(minimum=1), "nearest centres paired with each centre (r)"),
        "kmeans_iter": Param(int, Rule(minimum=1), "litekmeans rounds"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 1.5,
        neighbours: int = 3,
        kmeans_iter: int = 3,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.alpha, self.neighbours, self.kmeans_iter, self.seed = alpha, neighbours, kmeans_iter, seed

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.check_features(features)
        mean = x.mean(0)
        centred = x - mean
        clusters = int(self.alpha * self.bits + 0.5)  # MATLAB's round: halves away from zero
        if clusters > x.shape[0] or clusters < 2:
            raise DmuhError(
                f"{self.name}: k-means with round(alpha * bits) = {clusters} clusters needs "
                f"2 <= clusters <= training items ({x.shape[0]})"
            )
        labels_, centres = lite_kmeans(centred, clusters, self.kmeans_iter, torch.Generator().manual_seed(self.seed))
        shares = torch.bincount(labels_, minlength=clusters).double() / x.shape[0]
        pairs, scores = candidate_hyperplanes(centres, shares, min(self.neighbours, clusters - 1))
        if len(pairs) < self.bits:
            raise DmuhError(
                f"{self.name}: only {len(pairs)} distinct candidate hyperplanes for bits={self.bits}; "
                "raise alpha or neighbours"
            )
        # the highest scores first; stable, so equal scores keep their distance order (find 'first')
        chosen = torch.sort(-scores, stable=True).indices[: self.bits]
        normals = torch.stack([centres[pairs[i][0]] - centres[pairs[i][1]] for i in chosen.tolist()])
        thresholds = torch.stack([(centres[pairs[i][0]] + centres[pairs[i][1]]) / 2 for i in chosen.tolist()])
        thresholds = (thresholds * normals).sum(1)
        # on the raw features: w . (x - mean) - t = w . x - (t + w . mean)
        return normals.float(), (-(thresholds + normals @ mean)).float()
