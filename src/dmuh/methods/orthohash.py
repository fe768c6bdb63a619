"""OrthoHash (Hoe et al., NeurIPS 2021): one loss, cosine-margin cross-entropy to fixed codes.

Reference: kamwoh/orthohash (functions/loss/orthohash.py, models/alexnet.py, main.py,
scripts/train_hashing.py).

Each class has a fixed binary code c_y (Bernoulli +-1 bits, the official default codebook "B",
drawn from a seeded generator). With v = BatchNorm(z):

  cos_iy = v_i . c_y / (||v_i|| ||c_y||)
  L = CE(s * (cos_i - m * y_i), y_i)   [+ quantization * mean_i (1 - cos(v_i, sign(v_i)))]

the additive cosine margin m pulls v towards its class's code, which makes the codes both
discriminative and close to binary. The BatchNorm (the method's own, so it is trained with the
method and used in eval mode when encoding) centres every bit over the data, which balances the
bits. Multi-label items use the official "label_smoothing" loss: the margin on every label and
the cross-entropy to labels / (number of labels) (`label_cross_entropy`). Defaults: s = 8,
m = 0.2, quantization = 0 (the official defaults: the quantisation term is optional).

OrthoArc (`margin_type=arc`, registered as `orthoarc`; CISiPLab/cisip-FIRe functions/loss/orthoarc.py,
configs/templates/orthoarc.yaml): ArcFace's additive angular margin instead of the cosine margin,

  L = CE(s * cos(arccos(clamp(cos_i, -0.99999, 0.99999)) + m * y_i), y_i)

with FIRe's template values s = 8, m = 0.2, the same codebook and BatchNorm.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from dmuh.codes.binary import sign
from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import label_cross_entropy, random_sign_codes
from dmuh.methods.components.params import SEED, Param
from dmuh.utils.schema import Rule

MARGIN_TYPES = ("cos", "arc")
# FIRe's clamp of the cosine before arccos: the angle's gradient is infinite at +-1.
ARC_CLAMP = 0.99999


@register_method("orthohash", display_name="OrthoHash")
@register_method("orthoarc", display_name="OrthoArc", margin_type="arc")
class OrthoHash(HashingMethod):
    """Cosine-margin cross-entropy of BatchNorm(z) to one fixed binary code per class."""

    hyper_parameters = {
        "scale": Param(float, Rule(above=0.0), "the cosine logits' scale"),
        "margin": Param(float, Rule(minimum=0.0), "the margin of the true class (cosine, or angle for arc)"),
        "margin_type": Param(str, Rule(choices=MARGIN_TYPES), "cos: s (cos - m); arc: s cos(angle + m) (ArcFace)"),
        "quantization": Param(float, Rule(minimum=0.0), "weight of the quantisation term"),
        "batch_norm": Param(bool, help="BatchNorm of z before the codes"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        scale: float = 8.0,
        margin: float = 0.2,
        quantization: float = 0.0,
        batch_norm: bool = True,
        seed: int = 0,
        margin_type: str = "cos",
    ):
        super().__init__(bits, num_train, num_classes)
        self.scale, self.margin, self.quantization = scale, margin, quantization  # checked as declared
        self.margin_type = margin_type
        self.batch_norm = nn.BatchNorm1d(self.bits, momentum=0.1) if batch_norm else nn.Identity()
        self.register_buffer("codebook", random_sign_codes(self.num_classes, self.bits, seed))

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.batch_norm(outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.continuous_codes(step.outputs.float())
        labels = step.labels.float()
        cosine = F.normalize(codes, dim=1) @ F.normalize(self.codebook, dim=1).t()
        if self.margin_type == "arc":
            angle = torch.acos(cosine.clamp(-ARC_CLAMP, ARC_CLAMP))
            logits = self.scale * torch.cos(angle + self.margin * labels)
        else:
            logits = self.scale * (cosine - self.margin * labels)
        terms = {"classification": label_cross_entropy(logits, labels)}
        if self.quantization:
            away_from_binary = 1.0 - F.cosine_similarity(codes, sign(codes.detach()), dim=1)
            terms["quantization"] = self.quantization * away_from_binary.mean()
        return terms
