"""The DPSH-family method that Regu, DMUH and DistillHash build on: a memory of training codes,
the pairwise likelihood against it (`dmuh.methods.components.pairwise`) and a quantisation term.

Each batch is paired with every training item through a memory of the latest output of each
training item (`TrainingMemory`), as DPSH does.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import HashingMethod, StepInputs
from dmuh.methods.components.functional import OUTPUT_KINDS, apply_output
from dmuh.methods.components.memory import LEGACY_MEMORY_KEYS, TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

NORMALISATIONS = ("nB", "batch")


class PairwiseQuantizationMethod(HashingMethod):
    """L = [sum_ij (log(1 + e^Theta_ij) - S_ij Theta_ij) + beta * sum_i ||h_i - b_i||^2] / (n B).

    Theta_ij = h_i^T h_j / 2 over the B batch items i and the memory items j seen so far (an
    unseen item has no code yet: DPSH's zero entry adds a constant and no gradient). Dividing
    every term by n B is DPSH's official normalisation, the one its lambda = 50 (the paper's
    beta = 50) was tuned with: the likelihood is a mean over pairs, and the quantisation sum over
    bits is weighted beta / n per item. `normalisation="batch"` instead makes every term a mean
    over its own entries (pairs of the batch with seen items; batch items x bits). `output="tanh"`
    bounds h to (-1, 1) (our default, see docs/method.md); "linear" is DPSH's unbounded output.
    """

    legacy_state_keys = LEGACY_MEMORY_KEYS
    hyper_parameters = {
        "beta": Param(float, Rule(), "weight of the quantisation term (DPSH's lambda)"),
        "output": Param(str, Rule(choices=OUTPUT_KINDS), "tanh bounds the codes to (-1, 1); linear keeps z"),
        "normalisation": Param(
            str,
            Rule(choices=NORMALISATIONS),
            "nB: every term over n B (DPSH's); batch: each a mean over its own entries",
        ),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        beta: float = 50.0,
        output: str = "tanh",
        normalisation: str = "nB",
    ):
        super().__init__(bits, num_train, num_classes)
        self.output, self.normalisation, self.beta = output, normalisation, beta  # checked as declared
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return apply_output(self.output, outputs)

    def entry_mean(self, total: torch.Tensor, batch_size: int) -> torch.Tensor:
        """A sum over the batch's items x bits, normalised: over n B, or its mean over B x bits."""
        if self.normalisation == "batch":
            return total / (batch_size * self.bits)
        return total / self.memory.normaliser(batch_size)

    def quantization(self, codes: torch.Tensor) -> torch.Tensor:
        """beta * sum_i ||h_i - b_i||^2, normalised as the likelihood."""
        return self.beta * self.entry_mean((codes - sign(codes.detach())).pow(2).sum(), codes.shape[0])

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.memory.remember(step, self.continuous_codes)
        return {
            "likelihood": self.memory.likelihood(codes, step.labels, normalisation=self.normalisation),
            "quantization": self.quantization(codes),
        }
