"""DPN (Fan et al., IJCAI 2020): Deep Polarized Network, a hinge that polarises every output bit
towards a fixed random target code of its class.

Reference: kamwoh/DPN (scripts/train_hashing.py: `calculate_loss`, `update_centroid`; main.py:
the defaults), cross-checked with swuxyj/DeepHash-pytorch DPN.py (the multi-label merge of
the targets) and CISiPLab/cisip-FIRe (functions/loss/dpn.py, configs/templates/dpn.yaml).

Each class c has a target t_c in {-1, +1}^bits (Bernoulli bits, seeded: the authors' default "N",
the sign of a Gaussian). With v = z (the hash layer's output) and a margin m:

  L = mean_i sum_k max(m - v_ik t_ik, 0) + reg * mean_ik v_ik^2

the polarisation loss: every bit pushed past +-m on its target's side. t_i, a multi-label item's
target (`multi_label`):
- "merge" (default, the issue's reading and DeepHash-pytorch's `label2center`): the sign of the sum
  of its labels' targets, a tie broken by one fixed random +-1 vector; for one label t_i = t_y;
- "sum" (the authors' and FIRe's multiclass loss): the hinge to each of its labels' targets, summed.
An item without labels has no target and adds 0.

Target update (`update_every` N > 0; the authors' `--centroid-update-time`, default 0 = never):
after every N epochs, each class's target becomes the sign of the mean sign code of its training
items (by their first label, as the authors' argmax), of the `update_rate` fraction of them whose
codes are nearest the current target in the hinge distance sum_k max(m - sign(v_k) t_k, 0). The
codes are those of the epoch, kept in a memory of the latest output of every training item.

Defaults (the authors' main.py): margin = 1, reg = 0 (FIRe's template uses 0.1), update_every = 0,
update_rate = 1. The authors' optional cross-entropy of a second head over the backbone features
(`--ce`, default 0) is not part of it.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import random_sign_codes
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import SEED, Param
from dmuh.utils.schema import Rule

MULTI_LABEL_TARGETS = ("merge", "sum")


@register_method("dpn", display_name="DPN")
class DPN(HashingMethod):
    """Polarisation hinge of the outputs to fixed random per-class target codes."""

    hyper_parameters = {
        "margin": Param(float, Rule(minimum=0.0), "m of the hinge max(m - v t, 0)"),
        "reg": Param(float, Rule(minimum=0.0), "weight of mean v^2"),
        "multi_label": Param(
            str, Rule(choices=MULTI_LABEL_TARGETS), "merge: one target, the sign of the labels' sum; sum: one per label"
        ),
        "update_every": Param(int, Rule(minimum=0), "epochs between updates of the targets from the codes; 0: never"),
        "update_rate": Param(float, Rule(above=0.0, maximum=1.0), "fraction of a class's codes nearest its target"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        margin: float = 1.0,
        reg: float = 0.0,
        multi_label: str = "merge",
        update_every: int = 0,
        update_rate: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.margin, self.reg, self.multi_label = margin, reg, multi_label  # all checked as declared
        self.update_every, self.update_rate = update_every, update_rate
        self.register_buffer("targets", random_sign_codes(self.num_classes, self.bits, seed))
        # Breaks the ties of merged multi-label targets (a bit whose labels' targets cancel out).
        self.register_buffer("tie_breaker", random_sign_codes(1, self.bits, seed + 1)[0])
        # The epoch's codes, for the target update only.
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits) if update_every else None

    def item_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, bits) merged target of each item: its class's, or the sign of its labels' sum."""
        votes = labels @ self.targets
        return torch.where(votes == 0, self.tie_breaker, sign(votes))

    def hinge(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """sum_k max(m - v_k t_k, 0) of every (item, target) pair, broadcast over the leading dimensions."""
        return torch.relu(self.margin - outputs * targets).sum(dim=-1)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        outputs = step.outputs.float() if self.memory is None else self.memory.remember(step, self.continuous_codes)
        labels = step.labels.float()
        if self.multi_label == "sum":
            per_label = self.hinge(outputs[:, None, :], self.targets[None, :, :])  # (B, classes)
            polarization = (per_label * labels).sum(dim=1).mean()
        else:
            labelled = (labels.sum(dim=1) > 0).float()
            polarization = (self.hinge(outputs, self.item_targets(labels)) * labelled).mean()
        terms = {"polarization": polarization}
        if self.reg:
            terms["reg"] = self.reg * outputs.pow(2).mean()
        return terms

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        # The memory holds the codes of the epochs before; the authors update after every N-th epoch.
        if self.update_every and epoch > 1 and (epoch - 1) % self.update_every == 0:
            self.update_targets()

    @torch.no_grad()
    def update_targets(self) -> None:
        """Each class's target <- sign of the mean sign code of its nearest `update_rate` items; a tied
        bit keeps its target, and so does a class without any code (the authors' would be 0 or NaN)."""
        memory = self.memory
        codes = sign(memory.codes)
        first_label = memory.labels.argmax(dim=1)
        has_label = memory.labels.sum(dim=1) > 0
        for c in range(self.num_classes):
            mine = codes[memory.seen & has_label & (first_label == c)]
            keep = int(self.update_rate * mine.shape[0])
            if keep == 0:
                continue
            distance = self.hinge(mine, self.targets[c])
            nearest = mine[torch.argsort(distance, stable=True)[:keep]]
            mean = nearest.mean(dim=0)
            self.targets[c] = torch.where(mean == 0, self.targets[c], sign(mean))
