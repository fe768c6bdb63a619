"""DistillHash (Yang, Liu, Deng, Liu and Tao, CVPR 2019): hashing from a distilled set of pairs.

No code of the authors is public and the method section could not be read here, so this is a
reading of the abstract's three steps (docs/method.md, "Label-free methods"):

1. Initial similarity signals from the local structure of pre-trained features: the symmetric
   cosine K-nearest-neighbour graph of the reference features (`dmuh.methods.components.reference`):
   s_ij = 1 when j is among the K nearest neighbours of i or i among those of j, else 0.
2. Distillation: a pair is kept only when its neighbourhoods agree with its signal. With
   eta_ij = |N_K(i) & N_K(j)| / K, the share of nearest neighbours the two items have in common,
       similar pairs     s_ij = 1 and eta_ij >= p   (`similar_threshold`, default 0.3)
       dissimilar pairs  s_ij = 0 and eta_ij <= o   (`dissimilar_threshold`, default 0: no
                                                     neighbour in common)
   and every other pair (neighbours that share too few neighbours, non-neighbours that share
   some) is left out: its signal is the unconfident one. An item is similar to itself.
3. A Bayesian pairwise likelihood on the distilled pairs: DPSH's
       L = [sum_(i,j) kept (log(1 + e^Theta_ij) - s_ij Theta_ij) + beta sum_i ||h_i - b_i||^2] / (n B),
   Theta_ij = h_i^T h_j / 2, over the batch against a memory of every training item's latest
   code, exactly as Regu (the two differ only in where S comes from).

Only the K-NN table (n, K) is kept in the state; the batch's S and weights are made from it at
every step from it and its transpose (B K^2 additions), so nothing of size n^2 is ever held.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import Requirements, StepInputs, register_method
from dmuh.methods.components.dpsh import PairwiseQuantizationMethod
from dmuh.methods.components.params import Param
from dmuh.methods.components.reference import ReferenceFeatures, cosine_knn
from dmuh.utils.schema import Rule


def reverse_neighbours(knn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pointers (n + 1,), items): items[pointers[a]:pointers[a + 1]] are the items that list a
    among their K nearest neighbours (a CSR table of the transposed K-NN graph)."""
    n, k = knn.shape
    listed = knn.reshape(-1)
    order = torch.argsort(listed, stable=True)
    items = torch.arange(n, device=knn.device).repeat_interleave(k)[order]
    pointers = torch.zeros(n + 1, dtype=torch.int64, device=knn.device)
    pointers[1:] = torch.cumsum(torch.bincount(listed, minlength=n), 0)
    return pointers, items


def _rows_of(pointers: torch.Tensor, items: torch.Tensor, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(which key, item) for every item of the CSR rows of `keys` (a flat batch of rows)."""
    starts, counts = pointers[keys], pointers[keys + 1] - pointers[keys]
    which = torch.arange(len(keys), device=keys.device).repeat_interleave(counts)
    offsets = torch.arange(int(counts.sum()), device=keys.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    return which, items[starts[which] + offsets]


def distilled_pairs(
    knn: torch.Tensor,
    reverse: Tuple[torch.Tensor, torch.Tensor],
    batch: torch.Tensor,
    similar_threshold: float,
    dissimilar_threshold: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S (B, n), kept (B, n)), both 0/1 float, of the batch items against every training item;
    `reverse` is `reverse_neighbours(knn)`. B K^2 additions: nothing of size n^2."""
    n, k = knn.shape
    rows = torch.arange(len(batch), device=batch.device)
    signal = torch.zeros(len(batch), n, device=knn.device)
    signal[rows.repeat_interleave(k), knn[batch].reshape(-1)] = 1.0  # j among the neighbours of i
    which, item = _rows_of(*reverse, batch)
    signal[which, item] = 1.0  # i among the neighbours of j
    # |N(i) & N(j)|: for each neighbour a of i, every j that lists a too.
    pair, neighbour = rows.repeat_interleave(k), knn[batch].reshape(-1)
    which, item = _rows_of(*reverse, neighbour)
    shared = torch.zeros(len(batch), n, device=knn.device)
    shared.index_put_((pair[which], item), torch.ones(len(item), device=knn.device), accumulate=True)
    shared /= k  # eta_ij
    signal[rows, batch] = 1.0  # an item is similar to itself
    shared[rows, batch] = 1.0
    similar = (signal > 0) & (shared >= similar_threshold)
    dissimilar = (signal == 0) & (shared <= dissimilar_threshold)
    return similar.float(), (similar | dissimilar).float()


@register_method("distillhash", display_name="DistillHash")
class DistillHash(PairwiseQuantizationMethod):
    """Regu's likelihood and quantisation on the distilled pairs of the reference features' K-NN graph."""

    requires = Requirements(labels=False, reference_features=True)

    hyper_parameters = {
        "neighbours": Param(int, Rule(minimum=1), "nearest neighbours in the reference per item"),
        "similar_threshold": Param(float, Rule(minimum=0.0), "distilled similar pairs' threshold"),
        "dissimilar_threshold": Param(float, Rule(minimum=0.0), "distilled dissimilar pairs' threshold"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        neighbours: int = 20,
        similar_threshold: float = 0.3,
        dissimilar_threshold: float = 0.0,
        beta: float = 50.0,
        output: str = "tanh",
        normalisation: str = "nB",
    ):
        super().__init__(bits, num_train, num_classes, beta=beta, output=output, normalisation=normalisation)
        self.neighbours = neighbours
        self.similar_threshold = similar_threshold
        self.dissimilar_threshold = dissimilar_threshold
        if not self.dissimilar_threshold < self.similar_threshold <= 1:
            raise DmuhError(
                f"method parameters dissimilar_threshold={dissimilar_threshold!r}, similar_threshold="
                f"{similar_threshold!r}: need 0 <= dissimilar_threshold < similar_threshold <= 1"
            )
        self.reference = ReferenceFeatures()
        self.register_buffer("knn", torch.zeros(0, self.neighbours, dtype=torch.int64))
        self._reverse: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # reverse_neighbours(knn), on first use

    def set_reference_features(self, features: torch.Tensor) -> None:
        if self.neighbours >= features.shape[0]:
            raise DmuhError(
                f"method parameter neighbours={self.neighbours}: needs more training items than "
                f"neighbours, got {features.shape[0]}"
            )
        self.reference.set(features)
        self.knn = cosine_knn(self.reference.all(), self.neighbours)
        self._reverse = None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = state_dict.get(prefix + "knn")
        if saved is not None:  # the table's length is the training split's
            self.knn = torch.zeros(saved.shape, dtype=torch.int64, device=self.knn.device)
            self._reverse = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if self._reverse is None or self._reverse[0].device != self.knn.device:
            self._reverse = reverse_neighbours(self.knn)
        codes = self.memory.remember(step, self.continuous_codes)
        similar, kept = distilled_pairs(
            self.knn, self._reverse, step.indices, self.similar_threshold, self.dissimilar_threshold
        )
        return {
            "likelihood": self.memory.pair_likelihood(codes, similar, kept, normalisation=self.normalisation),
            "quantization": self.quantization(codes),
        }
