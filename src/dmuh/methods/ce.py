"""CE: a classifier over the code layer, the baseline Sablayrolles et al. (ICASSP 2017) and FIRe
report; with the bi-half layer in front of the classifier it is FIRe's supervised BiHalf.

Reference: CISiPLab/cisip-FIRe (functions/loss/ce.py, models/architectures/arch_ce.py,
configs/templates/ce.yaml, configs/templates/bihalf-supervised.yaml, models/layers/bihalf.py).

  b = z                      (`code_layer=identity`, `ce`)
  b = BiHalf_gamma(z)        (`code_layer=bihalf`, `bihalf-supervised`: per bit, the batch's upper
                              half -> +1, the rest -> -1; backward: straight-through plus
                              gamma (z - b) / (B bits), `dmuh.methods.components.functional.BiHalf`)
  L = CE(W b + c, y)

W, c: the method's own linear classifier (bits -> classes, with a bias, as FIRe's `ce_fc`), so it
joins the optimiser and the checkpoint. Multi-label items use the cross-entropy to labels /
(number of labels) (`label_cross_entropy`, FIRe's multiclass branch). The retrieval codes are
sign(z): FIRe's bi-half layer passes z through unchanged outside training. Default gamma = 6
(FIRe's `bihalf_gamma`, the BiHalf authors' value).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import BiHalf, label_cross_entropy
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

CODE_LAYERS = ("identity", "bihalf")


@register_method("ce", display_name="CE")
@register_method("bihalf-supervised", display_name="BiHalf (supervised)", code_layer="bihalf")
class ClassifierHash(HashingMethod):
    """Cross-entropy of a linear classifier over the code layer's outputs (or their bi-half codes)."""

    hyper_parameters = {
        "code_layer": Param(str, Rule(choices=CODE_LAYERS), "what the classifier reads: z, or its bi-half codes"),
        "gamma": Param(float, Rule(minimum=0.0), "bi-half layer: weight of its pull of z to its codes"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, code_layer: str = "identity", gamma: float = 6.0):
        super().__init__(bits, num_train, num_classes)
        self.code_layer, self.gamma = code_layer, gamma  # checked as declared
        self.classifier = nn.Linear(self.bits, self.num_classes)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = step.outputs.float()
        if self.code_layer == "bihalf":
            codes = BiHalf.apply(codes, self.gamma)
        return {"classification": label_cross_entropy(self.classifier(codes), step.labels.float())}
