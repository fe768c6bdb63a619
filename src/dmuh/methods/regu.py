"""Regu: the DPSH pairwise-likelihood loss with a quantisation regulariser (paper Eq. 4).

Each batch is paired with every training item through a memory of the latest output of each
training item, as DPSH does.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from dmuh.codes import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, StepInputs, pairwise_similarity, register_method

OUTPUT_KINDS = ("tanh", "linear")


@register_method("regu")
@register_method("dpsh")
class Regu(HashingMethod):
    """L = [sum_ij (log(1 + e^Theta_ij) - S_ij Theta_ij) + beta * sum_i ||h_i - b_i||^2] / (n B).

    Theta_ij = h_i^T h_j / 2 over the B batch items i and the memory items j seen so far (an
    unseen item has no code yet: DPSH's zero entry adds a constant and no gradient). Dividing
    every term by n B is DPSH's official normalisation, the one its lambda = 50 (the paper's
    beta = 50) was tuned with: the likelihood is a mean over pairs, and the quantisation sum over
    bits is weighted beta / n per item. `output="tanh"` bounds h to (-1, 1) (our default, see
    docs/method.md); "linear" is DPSH's unbounded output.
    """

    def __init__(self, bits: int, train_labels: torch.Tensor, beta: float = 50.0, output: str = "tanh"):
        super().__init__(bits, train_labels)
        if output not in OUTPUT_KINDS:
            raise DmuhError(f"method parameter output={output!r}: choose one of {', '.join(OUTPUT_KINDS)}")
        self.beta = float(beta)
        self.output = output
        self.register_buffer("memory", torch.zeros(self.num_train, self.bits))
        self.register_buffer("memory_labels", train_labels.float().clone())
        self.register_buffer("seen", torch.zeros(self.num_train, dtype=torch.bool))

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs) if self.output == "tanh" else outputs

    @torch.no_grad()
    def remember(self, indices: torch.Tensor, codes: torch.Tensor) -> None:
        self.memory[indices] = codes.detach().float()
        self.seen[indices] = True

    def codes_and_remember(self, step: StepInputs) -> torch.Tensor:
        """The batch's continuous codes, after writing the global batch's codes into the memory."""
        shared_indices, shared_outputs, _ = step.shared()
        self.remember(shared_indices, self.continuous_codes(shared_outputs.float()))
        return self.continuous_codes(step.outputs.float())

    def normaliser(self, batch_size: int) -> float:
        """n B: training items times batch items, fixed, as in DPSH.

        Not the number of memory items seen so far: early in the first epoch that would make the
        quantisation term up to n / B times stronger than later, which drives the codes to the
        random signs of an untrained network before any similarity is learned.
        """
        return float(self.num_train * batch_size)

    def likelihood(self, codes: torch.Tensor, labels: torch.Tensor, pair_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Negative log-likelihood of the batch against every seen memory item, over n B.


        softplus(Theta) = log(1 + e^Theta) without overflow for large Theta.
        """
        theta = 0.5 * codes.float() @ self.memory.t()
        similar = pairwise_similarity(labels.float(), self.memory_labels)
        pair_loss = F.softplus(theta) - similar * theta
        if pair_weights is not None:
            pair_loss = pair_loss * pair_weights
        return (pair_loss * self.seen.to(pair_loss.dtype)).sum() / self.normaliser(codes.shape[0])

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.codes_and_remember(step)
        quantization = (codes - sign(codes.detach())).pow(2).sum() / self.normaliser(codes.shape[0])
        return {
            "likelihood": self.likelihood(codes, step.labels),
            "quantization": self.beta * quantization,
        }
