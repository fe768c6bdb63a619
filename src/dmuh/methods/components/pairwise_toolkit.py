"""Pieces shared by the pairwise and triplet deep methods of the toolkits (issue #33): DCH, DTSH,
IDHN, ISDH, LCDSH, DSHSD, DBDH and PCDH, after swuxyj/DeepHash-pytorch.

- `class_balanced_mean`: the mean loss over the similar pairs plus the mean over the dissimilar
  ones (HashNet's and DCH's class-balanced weights w = |pairs| / |similar| or |pairs| / |dissimilar|);
- `squared_distances` and `contrastive`: DSH's contrastive loss within the batch (DSHSD, PCDH);
- `soft_label_similarity`: the cosine of two items' label vectors, and `SoftSimilarityMethod`, the
  frame IDHN and ISDH share (hard pairs by likelihood, soft pairs by a squared error);
- `CodeClassifier`: a bias-free linear classifier of the codes that a method holds, so its weight
  joins the optimiser, with DeepHash-pytorch's two losses (softmax cross-entropy for single-label
  data, the summed sigmoid cross-entropy for multi-label data).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from dmuh.methods.base import HashingMethod, StepInputs
from dmuh.methods.components.functional import label_cross_entropy
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


def class_balanced_mean(pair_loss: torch.Tensor, similar: torch.Tensor) -> torch.Tensor:
    """Mean of `pair_loss` over the similar pairs plus its mean over the dissimilar pairs.

    This is sum_ij w_ij l_ij / |pairs| with w_ij = |pairs| / |similar| (S_ij = 1) or |pairs| /
    |dissimilar| (S_ij = 0); a kind of pair absent from the batch adds nothing, which is the plain
    mean over the pairs there are (DeepHash-pytorch's w = 1 in that case).
    """
    dissimilar = 1.0 - similar
    return (pair_loss * similar).sum() / similar.sum().clamp(min=1) + (
        pair_loss * dissimilar
    ).sum() / dissimilar.sum().clamp(min=1)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, B) squared Euclidean distances between the rows of x, from their differences (exact,
    never negative; the batch is small)."""
    return (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=2)


def contrastive(distance: torch.Tensor, dissimilar: torch.Tensor, margin: float, squared_hinge: bool = False):
    """DSH's contrastive loss of every pair, (B, B): D_ij / 2 for similar pairs and
    max(m - D_ij, 0) / 2 (squared with `squared_hinge`, PCDH's) for dissimilar ones."""
    hinge = (margin - distance).clamp(min=0)
    if squared_hinge:
        hinge = hinge.pow(2)
    return 0.5 * (1.0 - dissimilar) * distance + 0.5 * dissimilar * hinge


def soft_label_similarity(labels_a: torch.Tensor, labels_b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """s_ij = y_i . y_j / (||y_i|| ||y_j|| + eps): the cosine of the label vectors, in [0, 1]
    (1 for the same label set, 0 for none in common; eps as IDHN's code, so an item without labels
    has s = 0)."""
    labels_a, labels_b = labels_a.float(), labels_b.float()
    norms = labels_a.norm(dim=1, keepdim=True) @ labels_b.norm(dim=1, keepdim=True).t()
    return labels_a @ labels_b.t() / (norms + eps)


CLASSIFICATIONS = ("auto", "softmax", "sigmoid")
CLASSIFICATION_PARAM = Param(
    str,
    Rule(choices=CLASSIFICATIONS),
    "softmax cross-entropy, summed sigmoid cross-entropy, or auto (sigmoid when an item has several labels)",
)


class CodeClassifier(nn.Module):
    """W (bits -> classes, no bias) and its loss on the codes.

    softmax: the cross-entropy of softmax(W b) to the label distribution (`label_cross_entropy`;
    the ordinary one on single-label data). sigmoid: sum over classes of the binary cross-entropy
    of sigmoid(W b) to each label, mean over the batch (DeepHash-pytorch's multi-label loss). auto:
    sigmoid when some training item has more than one label (DeepHash-pytorch chooses by data set
    name), told by the training labels handed over on every start (`set_labels`).
    """

    def __init__(self, bits: int, num_classes: int, kind: str = "auto"):
        super().__init__()
        self.linear = nn.Linear(bits, num_classes, bias=False)
        self.kind = kind
        self.multi_label = False

    @torch.no_grad()
    def set_labels(self, labels: torch.Tensor) -> None:
        self.multi_label = bool((labels.sum(dim=1) > 1).any())

    @property
    def sigmoid(self) -> bool:
        return self.kind == "sigmoid" or (self.kind == "auto" and self.multi_label)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.linear(codes)
        labels = labels.float()
        if self.sigmoid:
            return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(dim=1).mean()
        return label_cross_entropy(logits, labels)


HARD_SIMILAR, HARD_DISSIMILAR = 0.99, 0.01


class SoftSimilarityMethod(HashingMethod):
    """IDHN's and ISDH's frame: soft similarity s (the cosine of label vectors) between the batch and
    a memory of training codes U, with u = z / (|z| + 1) and Theta_ij = alpha u_i . U_j:

      hard pairs (s_ij > 0.99 or s_ij < 0.01): l_ij = log(1 + e^Theta_ij) - s_ij Theta_ij
      soft pairs (the others): a squared error that each method defines (`soft_pair_loss`)
      L = sum over the seen memory items of the weighted pair losses / (n B)
          + quantization * mean_ik | |u_ik| - 1 |

    Subclasses weight the two kinds (`hard_weight`, `soft_weight`) and give the squared error.
    """

    hyper_parameters = {
        "alpha": Param(float, Rule(above=0.0), "scale of the inner product, Theta = alpha u . U"),
        "quantization": Param(float, Rule(minimum=0.0), "weight of the L1 quantisation term (lambda)"),
    }

    def __init__(self, bits: int, num_train: int, num_classes: int, alpha: float, gamma: float, quantization: float):
        super().__init__(bits, num_train, num_classes)
        self.alpha, self.gamma, self.quantization = alpha, gamma, quantization  # checked as declared
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits)

    hard_weight = soft_weight = 1.0

    def soft_pair_loss(self, theta: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs / (outputs.abs() + 1.0)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.memory.remember(step, self.continuous_codes)
        soft = soft_label_similarity(step.labels, self.memory.labels)
        hard = ((soft > HARD_SIMILAR) | (soft < HARD_DISSIMILAR)).to(codes.dtype)
        theta = self.alpha * codes @ self.memory.codes.t()
        likelihood = F.softplus(theta) - soft * theta
        pair_loss = self.hard_weight * hard * likelihood + self.soft_weight * (1.0 - hard) * self.soft_pair_loss(
            theta, soft
        )
        return {
            "pairwise": self.memory.pair_mean(pair_loss),
            "quantization": self.quantization * (codes.abs() - 1.0).abs().mean(),
        }
