"""CNNH (Xia, Pan, Lai, Liu and Yan, AAAI 2014): Supervised Hashing for Image Retrieval via
Image Representation Learning. Two stages:

1. target codes H (n x q, +-1) of the training items from their similarity S (+1 when two items
   share a label, -1 otherwise) by coordinate descent on ||S - H H^T / q||^2 with H relaxed to
   [-1, 1], then H = sign (`dmuh.methods.components.two_stage.cnnh_stage_one`, `sweeps` passes);
2. the network regresses its outputs on H: loss = mean_ik (z_ik - H_ik)^2 over the batch.

Reference: swuxyj/DeepHash-pytorch CNNH.py (CNNHLoss: stage_one, forward), written from its
formulas, not copied. Defaults: its T = 10 sweeps; its recipe is Adam at lr 1e-5, batch 128, 150
epochs. Codes at evaluation: sign(z).

Stage 1 reads every training label, so it runs before the first step of a new run (at the start
of the first epoch, from the labels `set_train_labels` handed over), seeded by `seed`; H is a
buffer, so a checkpoint restores it and a resumed run does not solve it again.

`cnnh-plus` is the paper's CNNH+: the output layer also has c class units whose targets are the
item's binary labels, i.e. a linear map of the backbone features (`Requirements.features`; its
size `reference_dim` is filled in from the network) regressed on Y; both parts are one Euclidean
loss over the q + c units, so each term is divided by B (q + c).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.params import Param
from dmuh.methods.components.two_stage import TrainingLabels, cnnh_stage_one
from dmuh.utils.schema import Rule

# Stage 1 holds the n x n similarity (float32): 30,000 items are 3.6 GB.
MAX_STAGE_ONE_ITEMS = 30_000


@register_method("cnnh", display_name="CNNH")
class CNNH(HashingMethod):
    """Target codes from the training similarity (stage 1), then regression of the outputs on them."""

    hyper_parameters = {
        "sweeps": Param(int, Rule(minimum=1), "coordinate-descent sweeps of stage 1 (the reference's T)"),
        "seed": Param(int, Rule(minimum=0), "seed of stage 1's start and order"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, sweeps: int = 10, seed: int = 0):
        super().__init__(bits, num_train, num_classes)
        self.sweeps, self.seed = sweeps, seed
        self.train_labels = TrainingLabels(self.num_train, self.num_classes)
        self.register_buffer("target_codes", torch.zeros(self.num_train, self.bits))
        self.register_buffer("solved", torch.zeros((), dtype=torch.bool))
        self.notes.append("stage 1 learns the target codes before the first epoch (once: a checkpoint keeps them)")

    def set_train_labels(self, labels: torch.Tensor) -> None:
        super().set_train_labels(labels)
        if self.num_train > MAX_STAGE_ONE_ITEMS:
            raise DmuhError(
                f"method {self.name!r}: stage 1 holds the n x n similarity of the training split, "
                f"{self.num_train:,} items here; train on at most {MAX_STAGE_ONE_ITEMS:,} (a --protocol with fewer)"
            )

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if not bool(self.solved):
            self.learn_target_codes()

    @torch.no_grad()
    def learn_target_codes(self) -> None:
        """Stage 1: H = sign of the coordinate-descent solution, seeded (the same on every rank)."""
        labels = self.train_labels.labels.cpu()
        similar = pairwise_similarity(labels, labels) * 2 - 1
        generator = torch.Generator().manual_seed(self.seed)
        codes = cnnh_stage_one(similar, self.bits, self.sweeps, generator)
        self.target_codes.copy_(sign(codes).to(self.target_codes))
        self.solved.fill_(True)

    def regression(self, step: StepInputs, units: int) -> torch.Tensor:
        residual = step.outputs.float() - self.target_codes[step.indices]
        return residual.pow(2).sum() / (residual.shape[0] * units)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        return {"regression": self.regression(step, self.bits)}


@register_method("cnnh-plus", display_name="CNNH+")
class CNNHPlus(CNNH):
    """CNNH with c more output units regressed on the item's labels (the paper's CNNH+)."""

    requires = Requirements(features=True)
    hyper_parameters = {"reference_dim": Param(int, Rule(minimum=1), "backbone feature size (filled in)")}

    def __init__(
        self, bits: int, num_train: int, num_classes: int, sweeps: int = 10, seed: int = 0, reference_dim: int = 512
    ):
        super().__init__(bits, num_train, num_classes, sweeps, seed)
        self.reference_dim = reference_dim
        self.class_units = nn.Linear(reference_dim, self.num_classes)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        units = self.bits + self.num_classes
        residual = self.class_units(step.features.float()) - step.labels.float()
        return {
            "regression": self.regression(step, units),
            "labels": residual.pow(2).sum() / (residual.shape[0] * units),
        }
