"""DCMH: Deep Cross-Modal Hashing (Jiang and Li, CVPR 2017), the supervised cross-modal baseline.

With F (n, bits) the image network's outputs of every training item, G the text network's and
B = sign(F + G) the items' one shared code:

    J = -sum_ij (S_ij Theta_ij - log(1 + e^Theta_ij)) + gamma (||B - F||^2 + ||B - G||^2)
        + eta (||F^T 1||^2 + ||G^T 1||^2),        Theta_ij = F_i^T G_j / 2

over image-text pairs (i, j) with S_ij = 1 when they share a label. As in the authors' code,
each network's batch is paired with the other modality's memory (F and G are memories of the
latest outputs, `TrainingMemory`), the balance term sums the memory with the batch's rows
replaced by the batch's outputs, every term is divided by n B, and B is recomputed from the
memories once per epoch (random signs before the first). The outputs are linear (DCMH's).

One reading differs: the authors train the image network for an epoch, then the text network,
then update B; here both networks take a step on every batch (one optimiser over both), each
against the other's memory as it stands.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import StepInputs, register_method
from dmuh.methods.components.crossmodal import CrossModalMethod
from dmuh.methods.components.functional import random_sign_codes
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("dcmh", display_name="DCMH")
class DCMH(CrossModalMethod):
    hyper_parameters = {
        "gamma": Param(float, Rule(minimum=0.0), "weight of the pull of both outputs to the shared codes"),
        "eta": Param(float, Rule(minimum=0.0), "weight of the bit balance terms"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        text_dim: int = 1,
        gamma: float = 1.0,
        eta: float = 1.0,
        text_hidden=(8192,),
        text_dropout: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes, text_dim, text_hidden, text_dropout)
        self.gamma, self.eta = gamma, eta  # checked as declared
        self.image_memory = TrainingMemory(num_train, num_classes, bits)
        self.text_memory = TrainingMemory(num_train, num_classes, bits)
        self.register_buffer("shared_codes", random_sign_codes(num_train, bits, seed))

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if epoch > 1:  # B = sign(F + G) from the last epoch's outputs (a resumed run: from its memories)
            with torch.no_grad():
                both = self.image_memory.codes + self.text_memory.codes
                seen = self.image_memory.seen & self.text_memory.seen
                self.shared_codes[seen] = sign(both[seen])

    def balance(self, memory: TrainingMemory, indices: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """||column sums of the memory with the batch's rows replaced by its outputs||^2."""
        others = memory.codes.sum(0) - memory.codes[indices].sum(0)
        return (others + outputs.sum(0)).pow(2).sum()

    def modality_terms(
        self, outputs: torch.Tensor, other: TrainingMemory, own: TrainingMemory, step: StepInputs
    ) -> Dict[str, torch.Tensor]:
        normaliser = own.normaliser(outputs.shape[0])
        return {
            "likelihood": other.likelihood(outputs, step.labels),
            "quantization": self.gamma * (self.shared_codes[step.indices] - outputs).pow(2).sum() / normaliser,
            "balance": self.eta * self.balance(own, step.indices, outputs) / normaliser,
        }

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        image_outputs = step.outputs.float()
        text_outputs, _ = self.text_outputs(step)
        self.image_memory.write(step.indices, image_outputs)
        self.text_memory.write(step.indices, text_outputs)
        image = self.modality_terms(image_outputs, self.text_memory, self.image_memory, step)
        text = self.modality_terms(text_outputs, self.image_memory, self.text_memory, step)
        return {**{f"image_{k}": v for k, v in image.items()}, **{f"text_{k}": v for k, v in text.items()}}
