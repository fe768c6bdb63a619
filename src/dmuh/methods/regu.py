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
    """L = mean_ij [log(1 + e^Theta_ij) - S_ij Theta_ij] + beta * mean_ik (h_ik - b_ik)^2.

    Theta_ij = h_i^T h_j / 2 with h_j from the memory. Both terms are means (over the seen pairs,
    and over items x bits), so beta does not depend on the batch size, training-set size or bits.
    `output="tanh"` bounds h to (-1, 1) (our default, see docs/method.md); "linear" is DPSH's
    unbounded output.
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

    def likelihood(self, codes: torch.Tensor, labels: torch.Tensor, pair_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean negative log-likelihood of the batch against every seen memory item.

        softplus(Theta) = log(1 + e^Theta) without overflow for large Theta.
        """
        theta = 0.5 * codes.float() @ self.memory.t()
        similar = pairwise_similarity(labels.float(), self.memory_labels)
        pair_loss = F.softplus(theta) - similar * theta
        if pair_weights is not None:
            pair_loss = pair_loss * pair_weights
        seen = self.seen.to(pair_loss.dtype)
        return (pair_loss * seen).sum() / (seen.sum() * codes.shape[0])

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.continuous_codes(step.outputs.float())
        self.remember(step.indices, codes)
        quantization = (codes - sign(codes.detach())).pow(2).mean()
        return {
            "likelihood": self.likelihood(codes, step.labels),
            "quantization": self.beta * quantization,
        }
