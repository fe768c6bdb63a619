"""DDSH (Jiang, Cui and Li, TIP 2018): Deep Discrete Supervised Hashing.

Reference: the authors' MATLAB code jiangqy/DDSH-TIP2018 (trainDDSH.m, Solve.m, load_data.m for
the CIFAR-10 settings); written from its formulas, not copied.

The method keeps discrete codes B (n x q, +-1) of all training items (seeded random signs at
first) and, every `iterations` epochs, samples `columns` training items Omega (default 100, the
code's sample_column; seeded by (seed, sampling round)). Their similarity to every item, S~
(n x |Omega|), is +1 when two items share a label (multi-label: at least one) and -r otherwise,
r = #similar / #dissimilar over the block. One epoch of dmuh is one of the code's iterations:

- at its start (`on_epoch_start`), B_Omega is solved bit by bit from the codes B_Gamma of the
  other items: the binary quadratic program of `dmuh.methods.components.discrete` (the authors' equal-size
  clustering 2-approximation, plus a swap search);
- every batch, the network output h = tanh(z) of every item i outside Omega is pulled to the
  discrete codes of the sampled items through

      L = sum_{i in batch, i not in Omega} ||q S~_i - B_Omega h_i||^2 / (B (n - |Omega|))

  (the code's gradient -2q S_Gamma B_Omega + 2 h B_Omega^T B_Omega, divided by batch size times
  |Gamma| as its update_net does); items of Omega add nothing (the code skips them), and each
  item's code B_i becomes sign(h_i) of that forward pass, so the next epoch's B_Omega step sees
  the network's codes.

Codes at evaluation: sign(tanh(z)). The authors' recipe (CIFAR-10, VGG-F): 50 samplings x 3
iterations = 150 passes over the training set (`--epochs 150`, the default `iterations=3`),
batch 128, plain SGD with weight decay 5e-4, the learning rate log-spaced from 1e-2 to 1e-4 over
the 150 iterations; in dmuh `--batch-size 128 --optimizer sgd --momentum 0 --weight-decay 5e-4
--lr 0.01 --lr-end 0.0001` (the schedule is dmuh's cosine, not the log-spacing).

Deviations:
- the solver's swap search and current-bit candidate (`search_starts=0` is the authors' solver);
- the learning-rate schedule is the loop's cosine from --lr to --lr-end, not log-spaced;
- a batch holds items of Omega too (dmuh's loop runs over every training item); they add no loss
  and keep their solved codes; the code's network pass runs over the others only;
- the code suggests, for multi-label data (NUS-WIDE), a dissimilar value of 0 for pairs of
  multi-label items; here they are -r like every dissimilar pair.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import (
    HashingMethod,
    Requirements,
    StepInputs,
    pairwise_similarity,
    register_method,
)
from dmuh.methods.components.discrete import (
    SEARCH_STARTS,
    check_columns,
    dissimilar_weight,
    solve_sampled_codes,
)
from dmuh.methods.components.functional import random_sign_codes
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.two_stage import TrainingLabels
from dmuh.utils.schema import Rule


@register_method("ddsh", display_name="DDSH")
class DDSH(HashingMethod):
    """Discrete codes of sampled items solved bit by bit; the network regresses the others onto them."""

    requires = Requirements(images=True)

    hyper_parameters = {
        "columns": Param(int, Rule(minimum=2), "training items sampled as columns per block"),
        "iterations": Param(int, Rule(minimum=1), "epochs between samplings of the columns"),
        "search_starts": Param(int, Rule(minimum=0), "random starts of the discrete code search"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        columns: int = 100,
        iterations: int = 3,
        search_starts: int = SEARCH_STARTS,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.columns = columns
        self.iterations = iterations
        self.search_starts = search_starts
        self.seed = seed
        self.train_labels = TrainingLabels(self.num_train, self.num_classes)
        self.register_buffer("binary_codes", random_sign_codes(self.num_train, self.bits, seed))
        self.register_buffer("omega", torch.zeros(self.columns, dtype=torch.long))
        self.register_buffer("in_omega", torch.zeros(self.num_train, dtype=torch.bool))
        self.register_buffer("dissimilar", torch.zeros(()))  # r of the sampled block: S~ = -r for dissimilar pairs
        self.register_buffer("sampled", torch.zeros((), dtype=torch.bool))

    def set_train_labels(self, labels: torch.Tensor) -> None:
        super().set_train_labels(labels)
        check_columns(self.name, self.columns, self.num_train)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        check_columns(self.name, self.columns, self.num_train)
        if (epoch - 1) % self.iterations == 0 or not bool(self.sampled):
            self.sample_columns((epoch - 1) // self.iterations)
        self.update_sampled_codes()

    @torch.no_grad()
    def sample_columns(self, round_: int) -> None:
        """Omega for sampling round `round_` (the same on every rank and on resuming), and its r."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_)
        omega = torch.randperm(self.num_train, generator=generator)[: self.columns].to(self.omega.device)
        self.omega.copy_(omega)
        self.in_omega.zero_()
        self.in_omega[omega] = True
        labels = self.train_labels.labels
        self.dissimilar.fill_(dissimilar_weight(pairwise_similarity(labels, labels[omega])))
        self.sampled.fill_(True)

    def similarity(self, labels: torch.Tensor) -> torch.Tensor:
        """S~ (rows x |Omega|): +1 similar, -r dissimilar."""
        similar = pairwise_similarity(labels.float(), self.train_labels.labels[self.omega])
        return similar * (1.0 + self.dissimilar) - self.dissimilar

    @torch.no_grad()
    def update_sampled_codes(self) -> None:
        """B_Omega bit by bit from the codes of the other items (the code's "Update nB_Omega")."""
        q, codes = self.bits, self.binary_codes
        gamma = ~self.in_omega
        target_gamma = q * self.similarity(self.train_labels.labels[gamma])  # (n - |Omega|) x |Omega|
        codes_gamma = codes[gamma]
        target_omega = q * self.similarity(self.train_labels.labels[self.omega])
        solved = solve_sampled_codes(
            target_omega.cpu(),
            (target_gamma.t() @ codes_gamma).cpu(),
            (codes_gamma.t() @ codes_gamma).cpu(),
            codes[self.omega].cpu(),
            self.search_starts,
        )
        codes[self.omega] = solved.to(codes)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if self.training:  # the codes of the global batch's items outside Omega: sign(h) of this pass
            indices, outputs, _ = step.shared()
            outside = ~self.in_omega[indices]
            self.binary_codes[indices[outside]] = sign(outputs[outside].float()).to(self.binary_codes)
        h = self.continuous_codes(step.outputs.float())
        residual = self.bits * self.similarity(step.labels) - h @ self.binary_codes[self.omega].t()
        outside = (~self.in_omega[step.indices]).to(h.dtype)
        normaliser = h.shape[0] * max(self.num_train - self.columns, 1)
        return {"pairwise": (residual.pow(2).sum(dim=1) * outside).sum() / normaliser}
