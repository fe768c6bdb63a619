"""The memory of training codes that DPSH-family methods hold (DPSH's U), and the losses over it.

Each batch is paired with every training item through the latest continuous code of each item, as
DPSH does; an item not seen yet has no code (DPSH's zero entry adds a constant and no gradient), so
it is left out. Every pair sum is divided by n B (training items times batch items, fixed): DPSH's
official normalisation, the one its lambda = 50 (the paper's beta = 50) was tuned with.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from dmuh.methods.base import StepInputs, pairwise_similarity
from dmuh.methods.components.pairwise import (  # noqa: F401  (pair_nll: dmuh.studies.inspect reads it here)
    Reduction,
    Similarity,
    half_inner_product,
    pair_likelihood,
    pair_nll,
    reduction_of,
)


class TrainingMemory(nn.Module):
    """codes (n, bits), labels (n, C), seen (n,) and, when asked, image-level uncertainty (n,)."""

    def __init__(self, num_train: int, num_classes: int, bits: int, uncertainty: bool = False):
        super().__init__()
        self.register_buffer("codes", torch.zeros(num_train, bits))
        self.register_buffer("labels", torch.zeros(num_train, num_classes))
        self.register_buffer("seen", torch.zeros(num_train, dtype=torch.bool))
        if uncertainty:
            self.register_buffer("uncertainty", torch.zeros(num_train))

    @property
    def num_train(self) -> int:
        return self.codes.shape[0]

    @torch.no_grad()
    def set_labels(self, labels: torch.Tensor) -> None:
        self.labels.copy_(labels.float())

    @torch.no_grad()
    def write(self, indices: torch.Tensor, codes: torch.Tensor, uncertainty: Optional[torch.Tensor] = None) -> None:
        self.codes[indices] = codes.detach().float()
        self.seen[indices] = True
        if uncertainty is not None:
            self.uncertainty[indices] = uncertainty.detach().float()

    def remember(self, step: StepInputs, continuous_codes: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The batch's continuous codes, after writing the global batch's (all ranks') into the memory."""
        indices, outputs, _ = step.shared()
        self.write(indices, continuous_codes(outputs.float()))
        return continuous_codes(step.outputs.float())

    def normaliser(self, batch_size: int) -> float:
        """n B: training items times batch items, fixed, as in DPSH.

        Not the number of memory items seen so far: early in the first epoch that would make the
        quantisation term up to n / B times stronger than later, which drives the codes to the
        random signs of an untrained network before any similarity is learned.
        """
        return float(self.num_train * batch_size)

    def similarity(self, labels: torch.Tensor) -> torch.Tensor:
        """S (B, n) of the batch against every memory item."""
        return pairwise_similarity(labels.float(), self.labels)

    def pair_mean(
        self, pair_loss: torch.Tensor, normalisation: str = "nB", reduction: Optional[Reduction] = None
    ) -> torch.Tensor:
        """Sum of a (B, n) pair loss over the seen memory items, over n B ("nB", DPSH's) or over the
        number of batch x seen pairs ("batch": the mean over the pairs that exist yet); a given
        `reduction` (`dmuh.methods.components.pairwise`) replaces the word."""
        return (reduction or reduction_of(normalisation))(pair_loss, self.seen, self.num_train)

    def likelihood(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        pair_weights: Optional[torch.Tensor] = None,
        normalisation: str = "nB",
        similarity: Similarity = half_inner_product,
        reduction: Optional[Reduction] = None,
    ) -> torch.Tensor:
        """DPSH's negative log-likelihood of the batch against the memory, S from the labels."""
        return self.pair_likelihood(codes, self.similarity(labels), pair_weights, normalisation, similarity, reduction)

    def pair_likelihood(
        self,
        codes: torch.Tensor,
        similar: torch.Tensor,
        pair_weights: Optional[torch.Tensor] = None,
        normalisation: str = "nB",
        similarity: Similarity = half_inner_product,
        reduction: Optional[Reduction] = None,
    ) -> torch.Tensor:
        """DPSH's negative log-likelihood of the batch against the memory for a given S (B, n)
        (normalised as `pair_mean`); label-free methods bring their own S.

        Theta_ij = h_i^T U_j / 2 by default (`similarity`); softplus(Theta) = log(1 + e^Theta) without overflow.
        """
        return pair_likelihood(
            codes, self.codes, similar, self.seen, pair_weights, similarity, reduction or reduction_of(normalisation)
        )


LEGACY_MEMORY_KEYS = {
    "memory": "memory.codes",
    "memory_labels": "memory.labels",
    "seen": "memory.seen",
    "memory_uncertainty": "memory.uncertainty",
}
"""State-dict keys of checkpoints written before the memory was a component (dmuh 0.1 runs)."""
