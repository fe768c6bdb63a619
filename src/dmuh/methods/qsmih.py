"""QSMIH (Passalis and Tefas, Signal Processing: Image Communication 2021): deep supervised hashing
with quadratic spherical mutual information.

Reference: passalis/qsmi (hashing/qmi_hashing.py: `qmi_loss`, `train_model_qmi`; demo.py),
cross-checked with swuxyj/DeepHash-pytorch QSMIH.py.

Over the B x B pairs of the batch (the item with itself included, as the authors'):

  Y_ij = (cos(z_i, z_j) + 1) / 2              (z / (||z|| + 1e-8), the authors' cosine)
  D_ij = S_ij (the pair shares a label),      M = B^2 / sum_ij D_ij   (the number of "information needs")
  square clamp (default):  Q_ij = (D_ij Y_ij - 1)^2 + Y_ij^2 / M      (minimised)
  plain QSMI:              Q_ij = Y_ij / M - D_ij Y_ij                (-QSMI, minimised)
  L = R(Q) + alpha R(| |z| - 1 |)

R is the mean (`reduction=mean`, default: DeepHash-pytorch's, the scale the shared recipe's SGD
learning rate fits) or the sum (`reduction=sum`, the authors', who train with Adam, which does not
see the scale). The hashing regulariser is on the raw outputs z as the authors' (DeepHash-pytorch
applies it to the normalised z). Defaults: alpha = 0.01 (the authors' demo and DeepHash-pytorch),
square_clamp = true.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.methods.base import HashingMethod, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

REDUCTIONS = ("mean", "sum")


@register_method("qsmih", display_name="QSMIH")
class QSMIH(HashingMethod):
    """Quadratic spherical mutual information between the codes' cosine similarities and the labels."""

    hyper_parameters = {
        "alpha": Param(float, Rule(minimum=0.0), "weight of the hashing regulariser | |z| - 1 |"),
        "square_clamp": Param(bool, help="the authors' square-clamped loss; false: -QSMI itself"),
        "reduction": Param(str, Rule(choices=REDUCTIONS), "mean (DeepHash-pytorch) or sum (the authors') of the terms"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 0.01,
        square_clamp: bool = True,
        reduction: str = "mean",
    ):
        super().__init__(bits, num_train, num_classes)
        self.alpha, self.square_clamp, self.reduction = alpha, square_clamp, reduction  # checked as declared

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values.sum() if self.reduction == "sum" else values.mean()

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        outputs = step.outputs.float()
        unit = outputs / (outputs.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8)
        similarity = 0.5 * (unit @ unit.t() + 1.0)
        same = pairwise_similarity(step.labels.float(), step.labels.float())
        needs = same.numel() / same.sum().clamp(min=1.0)
        if self.square_clamp:
            pairs = (same * similarity - 1.0).pow(2) + similarity.pow(2) / needs
        else:
            pairs = similarity / needs - same * similarity
        return {
            "information": self.reduce(pairs),
            "quantization": self.alpha * self.reduce((outputs.abs() - 1.0).abs()),
        }
