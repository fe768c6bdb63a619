"""Small pieces shared by the baseline methods (one place each, used by several losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmuh.codes.binary import sign

# The checks' home before params; methods still import them from here.
from dmuh.methods.components.params import check_choice, check_count, check_number  # noqa: F401

OUTPUT_KINDS = ("tanh", "linear")


def check_output_kind(output: str) -> str:
    """The `output` hyper-parameter of the DPSH family: "tanh" bounds h to (-1, 1), "linear" keeps z."""
    return check_choice("output", output, OUTPUT_KINDS)


def apply_output(output: str, outputs: torch.Tensor) -> torch.Tensor:
    return torch.tanh(outputs) if output == "tanh" else outputs


def random_sign_codes(count: int, bits: int, seed: int) -> torch.Tensor:
    """(count, bits) float +-1 codes, each bit +1 with probability 1/2 (Bernoulli), from a seeded
    generator so every run (and every rank) draws the same codes."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (count, bits), generator=generator).float() * 2 - 1


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(logits) to the label distribution labels / (number of labels).

    One-hot labels give the ordinary cross-entropy; multi-hot labels spread the target evenly
    over the item's labels (OrthoHash's "label_smoothing" multi-label loss). An item without any
    label has no target and adds 0. Mean over the batch.
    """
    targets = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2B rows must pick its other view among the 2B - 1 others;
    the mean cross-entropy over the 2B rows (SimCLR pre-training, CIBHash)."""
    rows = F.normalize(torch.cat([first, second]).float(), dim=1)
    logits = rows @ rows.t() / temperature
    logits = logits.masked_fill(torch.eye(rows.shape[0], dtype=torch.bool, device=rows.device), float("-inf"))
    count = first.shape[0]
    other_view = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(rows.device)
    return F.cross_entropy(logits, other_view)


class SignStraightThrough(torch.autograd.Function):
    """sign(x) forward (0 -> +1, as `dmuh.codes.binary.sign`), the identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


class BiHalf(torch.autograd.Function):
    """The bi-half layer (Li & van Gemert, AAAI 2021; `bihalf`, and `bihalf-supervised` in
    `dmuh.methods.ce`): per-column batch-median binarisation forward; straight-through plus
    gamma * (U - B) / U.numel() backward."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, gamma: float) -> torch.Tensor:
        count = values.shape[0]
        # A stable sort: tied values keep their batch order, so the codes do not depend on chance.
        order = values.sort(dim=0, descending=True, stable=True).indices
        ranked = torch.full_like(values, -1.0)
        ranked[: count // 2] = 1.0
        codes = torch.empty_like(values).scatter_(0, order, ranked)
        ctx.save_for_backward(values, codes)
        ctx.gamma = gamma
        return codes

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        values, codes = ctx.saved_tensors
        return grad_output + ctx.gamma * (values - codes) / values.numel(), None
