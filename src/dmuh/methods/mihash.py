"""MIHash (Cakir et al., ICCV 2017; deep version TPAMI 2019): maximise the mutual information
between the Hamming distances of a batch's codes and their neighbour relation, through a
differentiable histogram of the distances.

Reference: fcakir/deep-mihash (mihash/mi_forward.m, mihash/mi_backward.m, get_opts.m;
MATLAB/MatConvNet), cross-checked with CISiPLab/cisip-FIRe functions/loss/mihash.py.

For every item i of the batch (as a query) against the B - 1 others j:

  phi = 2 sigmoid(a z) - 1 in (-1, 1)^bits,   d_ij = (bits - phi_i . phi_j) / 2   (relaxed Hamming distance)
  histogram over L = nbins + 1 bins at c_l = l * Delta, Delta = bits / nbins, with the triangular
  kernel delta_l(d) = max(1 - |d - c_l| / Delta, 0) (on (c_l - Delta, c_l + Delta]):
    p(D = l | +) = sum_(j similar) delta_l(d_ij) / N+_i,   p(D = l | -) likewise over the dissimilar,
    p(D = l) = sum_(j != i) delta_l(d_ij) / (B - 1),   p(+) = N+_i / (B - 1), p(-) = 1 - p(+)
  MI_i = H(D) - p(+) H(D | +) - p(-) H(D | -)          (entropies in bits, 0 log 0 = 0)
  L = -R_i(MI_i)

R is the mean over the batch (`reduction=mean`, default: the scale the shared recipe's learning
rate fits) or the sum (`reduction=sum`, the authors' `top.x = sum(...)`, whose hand-written
gradient is that of -sum MI). An item with no similar or no dissimilar other has MI_i = 0 (the
authors' `invalid` rows). The authors' backward pass is the gradient of this forward pass: the
bins at 0, Delta, ..., bits form a partition of unity on [0, bits], so the histograms' sums do not
depend on the codes (FIRe's bins stop one short of `bits`; it also minimises MI rather than
maximising it). Defaults (get_opts.m): nbins = bits / 2 (bits // 2), sharpness a = 1.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from dmuh.methods.base import HashingMethod, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

REDUCTIONS = ("mean", "sum")


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """-sum_l p_l log2 p_l per row, with 0 log 0 = 0 (and a zero gradient there)."""
    positive = p > 0
    log_p = torch.where(positive, torch.log2(torch.where(positive, p, torch.ones_like(p))), torch.zeros_like(p))
    return -(p * log_p).sum(dim=1)


def normalised_rows(counts: torch.Tensor) -> torch.Tensor:
    """Each row over its sum; a row that sums to 0 stays 0."""
    total = counts.sum(dim=1, keepdim=True)
    return torch.where(total > 0, counts / torch.where(total > 0, total, torch.ones_like(total)), counts)


@register_method("mihash", display_name="MIHash")
class MIHash(HashingMethod):
    """Mutual information of a differentiable histogram of in-batch Hamming distances and the labels."""

    hyper_parameters = {
        "nbins": Param(
            int, Rule(minimum=1), "histogram bins (nbins + 1 centres from 0 to bits); none: bits // 2", optional=True
        ),
        "sharpness": Param(float, Rule(above=0.0), "a of phi = 2 sigmoid(a z) - 1"),
        "reduction": Param(str, Rule(choices=REDUCTIONS), "mean or sum (the authors') of the items' MI"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        nbins: Optional[int] = None,
        sharpness: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__(bits, num_train, num_classes)
        self.nbins = max(1, self.bits // 2) if nbins is None else nbins  # checked as declared
        self.sharpness, self.reduction = sharpness, reduction

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.sharpness * outputs) - 1.0

    def mutual_information(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) MI_i of each item's relaxed distances to the others and its neighbour relation."""
        count = codes.shape[0]
        distance = (self.bits - codes @ codes.t()) / 2.0
        others = ~torch.eye(count, dtype=torch.bool, device=codes.device)
        similar = pairwise_similarity(labels, labels) > 0
        positive, negative = (similar & others).float(), (~similar & others).float()
        width = self.bits / self.nbins
        centres = torch.arange(self.nbins + 1, dtype=codes.dtype, device=codes.device) * width
        offset = distance[:, :, None] - centres  # (B, B, L)
        inside = (offset > -width) & (offset <= width)
        pulse = (1.0 - offset.abs() / width) * inside.to(codes.dtype)
        given_positive = torch.einsum("ijl,ij->il", pulse, positive)
        given_negative = torch.einsum("ijl,ij->il", pulse, negative)
        p_positive = positive.sum(dim=1) / max(count - 1, 1)
        p_distance = (given_positive + given_negative) / max(count - 1, 1)
        conditional = p_positive * entropy_bits(normalised_rows(given_positive)) + (1.0 - p_positive) * entropy_bits(
            normalised_rows(given_negative)
        )
        return entropy_bits(p_distance) - conditional

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        information = self.mutual_information(self.continuous_codes(step.outputs.float()), step.labels.float())
        return {"information": -(information.sum() if self.reduction == "sum" else information.mean())}
