"""SDH's kernel map (Shen et al., CVPR 2015; bd622/DiscretHashing), shared by the methods built on it
(`sdh`, `fsdh`): RBF features of seeded anchors with a data-driven width, seeded starting codes,
and RRC.m's ridge regression. See `dmuh.methods.sdh` for the readings."""

from __future__ import annotations

from typing import Optional, Union

import torch

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.components.params import check_number
from dmuh.models.heads import squared_distances

SIGMA_RULES = ("nearest", "mean")
CHUNK = 8192  # rows of the kernel map computed at once: bounds the n x m distance temporaries


def ridge(inputs: torch.Tensor, targets: torch.Tensor, lam: float, gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(A^T A + lam I)^-1 A^T T, by a Cholesky-backed solve (RRC.m's primal form)."""
    gram = inputs.t() @ inputs if gram is None else gram
    system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(system, inputs.t() @ targets)


def checked_sigma(sigma: Union[str, float]) -> Union[str, float]:
    """The `sigma` parameter: one of SIGMA_RULES, or a number > 0 (a `DmuhError` otherwise)."""
    if isinstance(sigma, str):
        if sigma not in SIGMA_RULES:
            raise DmuhError(
                f"method parameter sigma={sigma!r}: choose one of {', '.join(SIGMA_RULES)}, or a number > 0"
            )
        return sigma
    return check_number("sigma", sigma, 0.0, strict=True)


class RBFKernelMap:
    """Mixin of a `ShallowMethod` with attributes `anchors` (count), `sigma` (`checked_sigma`),
    `seed`, `bits` and `name`: the anchors, width, kernel features and starting codes of SDH."""

    # -- pieces, each testable on its own -----------------------------------------------------------

    def choose_anchors(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of min(anchors, n) training items drawn without replacement (seeded), as randsample."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(x.shape[0], generator=generator)[: min(self.anchors, x.shape[0])]

    def kernel_width(self, x: torch.Tensor, anchor_index: torch.Tensor) -> float:
        if not isinstance(self.sigma, str):
            return float(self.sigma)
        anchors = x[anchor_index]
        is_anchor = torch.full((x.shape[0],), -1, dtype=torch.long)
        is_anchor[anchor_index] = torch.arange(len(anchor_index))
        total, count = 0.0, 0
        for start in range(0, x.shape[0], CHUNK):
            squared = squared_distances(x[start : start + CHUNK], anchors)
            if self.sigma == "mean":
                total += float(squared.sum())
                continue
            own = is_anchor[start : start + CHUNK]
            rows = torch.nonzero(own >= 0).flatten()
            squared[rows, own[rows]] = float("inf")  # an anchor is measured to its nearest other anchor
            nearest = squared.min(dim=1).values
            finite = nearest[torch.isfinite(nearest)]  # a lone anchor has no other anchor
            total, count = total + float(finite.sqrt().sum()), count + len(finite)
        if self.sigma == "mean":
            sigma = (total / (x.shape[0] * len(anchor_index))) ** 0.5
        else:
            sigma = total / max(count, 1)
        if not sigma > 0:
            raise DmuhError(
                f"{self.name}: the training features are all equal to the anchors (sigma=0); "
                "set the kernel width with -p sigma=NUMBER"
            )
        return sigma

    def kernel_map(self, x: torch.Tensor, anchors: torch.Tensor, sigma: float) -> torch.Tensor:
        """phi(x) with its bias column, (n, m + 1) float64, in chunks."""
        phi = torch.empty(x.shape[0], anchors.shape[0] + 1, dtype=torch.float64)
        for start in range(0, x.shape[0], CHUNK):
            block = squared_distances(x[start : start + CHUNK], anchors)
            phi[start : start + CHUNK, :-1] = torch.exp(-block / (2 * sigma * sigma))
        phi[:, -1] = 1.0
        return phi

    def initial_codes(self, n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        return sign(torch.randn(n, self.bits, generator=generator, dtype=torch.float64))
