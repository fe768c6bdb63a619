"""Deep hashing of Liong et al. (CVPR 2015, "Deep Hashing for Compact Binary Codes Learning"): DH,
its supervised SDH, and FIRe's SDH-C. Named `deep-dh`, `deep-sdh` and `deep-sdh-c` so that they
do not clash with the shallow `sdh` (Shen et al.'s supervised discrete hashing).

Reference: CISiPLab/cisip-FIRe functions/loss/sdh.py (SDHLoss, SDHLossC) with
scripts/train_helper.py (the criterion's weight is the hash layer's linear weight) and
configs/templates/sdh.yaml / sdhc.yaml (the defaults); the authors released no code. Written
from those formulas, not copied.

With h = tanh(z) the batch's codes (B x K) and W (K x d) the linear hash layer's weight
(`Requirements.hash_weight`), the paper's objective J = J1 - lambda1 J2 + lambda2 J3 (+ weight
decay, left to the optimiser) reads, as FIRe computes it:

- `deep-sdh` (FIRe's SDHLoss; `deep-dh` is it with alpha = 0 and no label read):
    J1 = mean_i ||h_i - sign(h_i)||^2                      quantisation
    J2 = (tr(H^T H) / B + alpha (D - S)) / 2                bit variance (+ the supervised term)
         D, S: mean ||h_i - h_j||^2 over the batch's dissimilar / similar ordered pairs (i = j
         counts as similar, as in FIRe)
    J3 = ||W W^T - T||^2 / 2                                orthogonality of the projection
  loss = quantization J1 - variance J2 + orthogonality J3 (FIRe's lmbd0, lmbd1, lmbd2).
- `deep-sdh-c` (FIRe's SDHLossC: the supervised term is a classifier's cross-entropy):
    J1 = mean_ik (h_ik - sign(h_ik))^2,  J2 = tr(H^T H) / (2 K),  J3 = mean (W W^T - T)^2
  loss = quantization J1 - variance J2 + alpha CE(classifier(h), y) + orthogonality J3.

Readings and deviations (docs/methods.md, "Two-stage and asymmetric deep methods"):
- T, the target of W W^T: the paper's identity I by default (`ortho_target=identity`); FIRe
  writes `torch.ones_like` (every entry 1), available as `ortho_target=ones`.
- tr(H^T H) of `deep-sdh` / `deep-dh` over the batch's items (`variance_reduction=mean`): the
  paper's tr(H H^T) / N. FIRe's SDHLoss sums it (`variance_reduction=sum`), which at its lmbd1 = 1
  outweighs every other term (on digits, 16 bits, 10 epochs: MAP 0.18 against 0.85 with the mean).
  `deep-sdh-c` keeps FIRe's tr(H^T H) / K (`sum`, its default; SDH-C is FIRe's own variant).
- FIRe's SDH template puts tanh in the network (hash_fc_output: tanh) and SDHLoss applies tanh
  again; here tanh is applied once (the paper's h = tanh(W x + c)).
- FIRe's SDH-C reads one class per item (argmax of the one-hot label); multi-label items here
  spread the target over their labels (`label_cross_entropy`), the same on single-label data.
- Codes at evaluation: sign(tanh(z)).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.functional import label_cross_entropy
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

ORTHO_TARGETS = ("identity", "ones")
VARIANCE_REDUCTIONS = ("mean", "sum")


def projection_orthogonality(weight: torch.Tensor, target: str) -> torch.Tensor:
    """(W W^T - T) of the hash layer's weight W (K x d): T = I (the paper's) or all ones (FIRe's)."""
    gram = weight.float() @ weight.float().t()
    if target == "ones":
        return gram - torch.ones_like(gram)
    return gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def pair_spread(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean ||h_i - h_j||^2 over the batch's dissimilar ordered pairs minus the mean over its
    similar ones (i = j included, as FIRe's SDHLoss counts it); an empty set adds 0."""
    distances = (codes.unsqueeze(1) - codes.unsqueeze(0)).pow(2).sum(dim=2)
    similar = pairwise_similarity(labels.float(), labels.float())
    within = (distances * similar).sum() / (similar.sum() + 1e-7)
    between = (distances * (1 - similar)).sum() / ((1 - similar).sum() + 1e-7)
    return between - within


@register_method("deep-sdh", display_name="SDH (deep)")
class DeepSDH(HashingMethod):
    """Quantisation, bit variance and between-minus-within pair spread of tanh codes, plus
    orthogonality of the hash projection (FIRe's SDHLoss)."""

    requires = Requirements(hash_weight=True)
    hyper_parameters = {
        "quantization": Param(float, Rule(minimum=0.0), "weight of ||h - sign(h)||^2 (FIRe's lmbd0)"),
        "variance": Param(float, Rule(minimum=0.0), "weight of the bit variance term J2 (lmbd1)"),
        "orthogonality": Param(float, Rule(minimum=0.0), "weight of ||W W^T - T||^2 on the hash layer (lmbd2)"),
        "alpha": Param(float, Rule(minimum=0.0), "weight of the supervised term inside J2"),
        "ortho_target": Param(str, Rule(choices=ORTHO_TARGETS), "T: identity (the paper's) or ones (FIRe's)"),
        "variance_reduction": Param(
            str, Rule(choices=VARIANCE_REDUCTIONS), "tr(H^T H) over the batch: mean (the paper's 1/N) or sum (FIRe's)"
        ),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        quantization: float = 0.001,
        variance: float = 1.0,
        orthogonality: float = 0.001,
        alpha: float = 1.0,
        ortho_target: str = "identity",
        variance_reduction: str = "mean",
    ):
        super().__init__(bits, num_train, num_classes)
        self.quantization, self.variance, self.orthogonality = quantization, variance, orthogonality
        self.alpha, self.ortho_target, self.variance_reduction = alpha, ortho_target, variance_reduction

    def trace(self, h: torch.Tensor) -> torch.Tensor:
        """tr(H^T H) of the batch, over its items (`variance_reduction=mean`) or summed."""
        return h.pow(2).sum() / (h.shape[0] if self.variance_reduction == "mean" else 1)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def orthogonality_term(self, step: StepInputs) -> torch.Tensor:
        if step.hash_weight is None:
            raise DmuhError(f"method {self.name!r} needs the hash layer's weight (StepInputs.hash_weight)")
        return self.orthogonality * projection_orthogonality(step.hash_weight, self.ortho_target).pow(2).sum() / 2

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        h = self.continuous_codes(step.outputs.float())
        terms = {
            "quantization": self.quantization * (h - sign(h.detach())).pow(2).sum(dim=1).mean(),
            "variance": -self.variance * self.trace(h) / 2,
        }
        if self.alpha:
            terms["pairwise"] = -self.variance * self.alpha * pair_spread(h, step.labels) / 2
        terms["orthogonality"] = self.orthogonality_term(step)
        return terms


@register_method("deep-dh", display_name="DH", alpha=0.0)
class DeepDH(DeepSDH):
    """Liong et al.'s unsupervised DH: deep SDH without its supervised term, reading no label."""

    requires = Requirements(hash_weight=True, labels=False)


@register_method("deep-sdh-c", display_name="SDH-C (deep)")
class DeepSDHC(DeepSDH):
    """Deep SDH whose supervised term is a linear classifier's cross-entropy on the codes (FIRe's SDHLossC)."""

    hyper_parameters = {"alpha": Param(float, Rule(minimum=0.0), "weight of the classifier's cross-entropy")}

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        quantization: float = 0.001,
        variance: float = 0.001,
        orthogonality: float = 0.001,
        alpha: float = 1.0,
        ortho_target: str = "identity",
        variance_reduction: str = "sum",
    ):
        super().__init__(
            bits, num_train, num_classes, quantization, variance, orthogonality, alpha, ortho_target, variance_reduction
        )
        self.classifier = nn.Linear(self.bits, self.num_classes)  # FIRe's ce_fc (with a bias) on the tanh codes

    def orthogonality_term(self, step: StepInputs) -> torch.Tensor:
        if step.hash_weight is None:
            raise DmuhError(f"method {self.name!r} needs the hash layer's weight (StepInputs.hash_weight)")
        return self.orthogonality * projection_orthogonality(step.hash_weight, self.ortho_target).pow(2).mean()

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        h = self.continuous_codes(step.outputs.float())
        return {
            "quantization": self.quantization * (h - sign(h.detach())).pow(2).mean(),
            "variance": -self.variance * self.trace(h) / (2 * self.bits),
            "classification": self.alpha * label_cross_entropy(self.classifier(h), step.labels.float()),
            "orthogonality": self.orthogonality_term(step),
        }
