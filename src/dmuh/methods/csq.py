"""CSQ (Yuan et al., CVPR 2020): Central Similarity Quantization.

Reference: yuanli2333/Hadamard-Matrix-for-hashing (train.py, options.py and the hash-centre
tutorial notebook), cross-checked with swuxyj/DeepHash-pytorch CSQ.py.

Every class gets a hash centre c in {-1, +1}^bits:
- Hadamard centres (bits a power of two and classes <= 2 * bits): the rows of [H; -H], H the
  bits x bits Sylvester-Hadamard matrix, so any two centres are bits / 2 or bits apart.
- Otherwise Bernoulli centres: every bit +-1 with probability 1/2. Of `bernoulli_tries` seeded
  draws the one whose closest two centres are farthest apart is kept (the tutorial redraws until
  the closest pair is far enough). `centers="auto"` (default) falls back to them with a warning
  and a line in `self.notes`; `centers="hadamard"` refuses instead.

A multi-label item's centre is the sign of the mean of its labels' centres, ties broken by one
fixed random +-1 vector (the official `Hash_center_multilables`). With h = tanh(z):

  L = mean_ik BCE((h_ik + 1) / 2, (c_ik + 1) / 2) + quantization * mean_ik (|h_ik| - 1)^2

(h + 1) / 2 = sigmoid(2 z), so the BCE is computed from the logits 2 z without clamping. Items
without any label have no centre and are left out of the BCE. Defaults: quantization = 0.05 (the
official lambda2; lambda0 = 1 is the BCE's weight). The official train.py can also add HashNet's
pairwise loss (lambda1); that is not part of CSQ's objective in the paper and is left out.
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import torch
import torch.nn.functional as F

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import random_sign_codes
from dmuh.methods.components.params import SEED, Param
from dmuh.utils.schema import Rule

CENTER_KINDS = ("auto", "hadamard", "bernoulli")


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_matrix(order: int) -> torch.Tensor:
    """The order x order Sylvester-Hadamard matrix (order a power of two): H_2k = [[H, H], [H, -H]]."""
    if not is_power_of_two(order):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two order, not {order}")
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def hadamard_centers(num_classes: int, bits: int) -> torch.Tensor:
    """The first num_classes rows of [H; -H] (needs bits a power of two, num_classes <= 2 bits)."""
    return torch.cat([hadamard_matrix(bits), -hadamard_matrix(bits)], 0)[:num_classes]


def bernoulli_centers(num_classes: int, bits: int, seed: int, tries: int) -> torch.Tensor:
    """Random +-1 centres; of `tries` seeded draws, the one with the largest minimum pair distance."""
    best, best_distance = None, -1.0
    for attempt in range(tries):
        centers = random_sign_codes(num_classes, bits, seed + attempt)
        distance = (bits - centers @ centers.t()) / 2  # Hamming distances
        distance.fill_diagonal_(float(bits))
        closest = float(distance.min())
        if closest > best_distance:
            best, best_distance = centers, closest
    return best


@register_method("csq", display_name="CSQ")
class CSQ(HashingMethod):
    """BCE of tanh(z) to each item's hash centre plus a quantisation term."""

    hyper_parameters = {
        "quantization": Param(float, Rule(minimum=0.0), "weight of the quantisation term"),
        "centers": Param(
            str,
            Rule(choices=CENTER_KINDS),
            "Hadamard rows, Bernoulli draws, or auto (Hadamard when bits is a power of two and classes <= 2 bits)",
        ),
        "seed": SEED,
        "bernoulli_tries": Param(int, Rule(minimum=1), "Bernoulli draws, of which the most spread is kept"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        quantization: float = 0.05,
        centers: str = "auto",
        seed: int = 0,
        bernoulli_tries: int = 100,
    ):
        super().__init__(bits, num_train, num_classes)
        self.quantization = quantization  # all checked as declared
        self.notes: List[str] = []
        hadamard_fits = is_power_of_two(self.bits) and self.num_classes <= 2 * self.bits
        if centers == "hadamard" and not hadamard_fits:
            raise DmuhError(
                f"method parameter centers='hadamard': {self.why_not_hadamard()}; use centers=bernoulli or centers=auto"
            )
        if centers == "bernoulli" or not hadamard_fits:
            if centers == "auto":
                note = f"csq: {self.why_not_hadamard()}: using Bernoulli (random) hash centres"
                self.notes.append(note)
                warnings.warn(note, stacklevel=2)
            self.center_kind = "bernoulli"
            class_centers = bernoulli_centers(self.num_classes, self.bits, seed, bernoulli_tries)
        else:
            self.center_kind = "hadamard"
            class_centers = hadamard_centers(self.num_classes, self.bits)
        self.register_buffer("class_centers", class_centers)
        # Breaks the ties of multi-label centroids (a bit whose labels' centres cancel out).
        self.register_buffer("tie_breaker", random_sign_codes(1, self.bits, seed + bernoulli_tries)[0])

    def why_not_hadamard(self) -> str:
        if not is_power_of_two(self.bits):
            return f"Hadamard centres need a power-of-two bit length, not {self.bits}"
        return f"{self.bits}-bit Hadamard centres serve at most {2 * self.bits} classes, not {self.num_classes}"

    def item_centers(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, bits) centre of each item: its class's centre, or the sign of its labels' mean centre."""
        votes = labels.float() @ self.class_centers
        return torch.where(votes == 0, self.tie_breaker, sign(votes))

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        outputs = step.outputs.float()
        targets = (self.item_centers(step.labels) + 1.0) / 2.0
        labelled = (step.labels.sum(dim=1) > 0).float()[:, None]
        bce = F.binary_cross_entropy_with_logits(2.0 * outputs, targets, reduction="none")
        center = (bce * labelled).sum() / (labelled.sum() * self.bits).clamp(min=1)
        codes = self.continuous_codes(outputs)
        return {
            "center": center,
            "quantization": self.quantization * (codes.abs() - 1.0).pow(2).mean(),
        }
