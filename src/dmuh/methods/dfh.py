"""DFH (Li and van Gemert, BMVC 2019): Push for Quantization: Deep Fisher Hashing.

Reference: liyunqianggyn/Push-for-Quantization-Deep-Fisher-Hashing (Main.py, center.py:
`Discretecenter`, `Relaxcenter`, models/DFH_loss.py), cross-checked with swuxyj/DeepHash-pytorch
DFH.py and CISiPLab/cisip-FIRe functions/loss/dfh.py.

The method keeps class centres C (bits x classes, starting at 0) and, as DPSH, a memory U of the
latest output of every training item. At every step, with u the batch's outputs and y its labels
divided by their number (the authors' multi-label scaling):

  B-step   b = sign(mu C y + u)                     (the binary targets of the batch)
  C-step   (centres, no gradient) discrete cyclic coordinate descent on
           ||b - C y||^2 + vul sum_(c != c') C_c . C_c', class by class:
             C_c = sign(q_c - C_-c^T Y_-c y_c - vul C_-c^T 1),  q = Y b^T      (`centers=discrete`)
           or 200 gradient steps on a relaxed V, C = sign(V) (`centers=relaxed`, DeepHash-pytorch's):
             mean (V y - b)^2 + vul mean (V^T V - bits (2 I - 1 1^T))^2 + nta mean (V - sign V)^2
  U-step   (the network)
           L = mean_ij [(1 - S_ij) log(1 + e^(m + Theta_ij)) + S_ij log(1 + e^(m - Theta_ij))]
               + eta mean_ik (b_ik - u_ik)^2,   Theta_ij = u_i . U_j / 2

the pairs over the memory items seen so far, divided by n B (DPSH's normalisation, as the
authors' mean over the whole n x B matrix whose unseen columns are zero: a constant apart). b is
computed with the centres before the step's C-step, as the authors'. A centre bit whose sum is
exactly 0 stays 0 (torch.sign, as the authors'); it only shifts b. Defaults (the authors' Main.py):
margin m = 0 (their loss with the margin, at 0; DeepHash-pytorch uses m = 3, FIRe m = 1), mu = 1
(DeepHash-pytorch 0.1), vul = 1, eta = 0.5, nta = 1, centers = discrete (their C-step; the relaxed
one is commented out there). The logistic is a softplus, so the authors' clamp of Theta to
[-100, 50] against overflow is not needed (it would stop the gradient beyond those values).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from dmuh.codes.binary import sign
from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

CENTER_STEPS = ("discrete", "relaxed")
# DeepHash-pytorch's relaxed C-step: 200 gradient steps at 0.03, a tenth of it from step 150, a
# hundredth from step 180.
RELAXED_STEPS, RELAXED_RATE, RELAXED_DECAY_AT = 200, 0.03, (149, 179)


@register_method("dfh", display_name="DFH")
class DFH(HashingMethod):
    """Margin pairwise logistic over a memory, plus a pull to binary targets set by class centres."""

    hyper_parameters = {
        "margin": Param(float, Rule(minimum=0.0), "m of the pairwise logistic"),
        "mu": Param(float, Rule(minimum=0.0), "weight of the centres in the targets b = sign(mu C y + u)"),
        "vul": Param(float, Rule(minimum=0.0), "weight of the centres' mutual inner products (C-step)"),
        "eta": Param(float, Rule(minimum=0.0), "weight of the quantisation term (b - u)^2"),
        "centers": Param(str, Rule(choices=CENTER_STEPS), "C-step: the authors' discrete one, or relaxed"),
        "nta": Param(float, Rule(minimum=0.0), "relaxed C-step: weight of (V - sign V)^2"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        margin: float = 0.0,
        mu: float = 1.0,
        vul: float = 1.0,
        eta: float = 0.5,
        centers: str = "discrete",
        nta: float = 1.0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.margin, self.mu, self.vul, self.eta = margin, mu, vul, eta  # all checked as declared
        self.center_step, self.nta = centers, nta
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits)
        self.register_buffer("centers", torch.zeros(self.bits, self.num_classes))
        if centers == "relaxed":
            self.register_buffer("relaxed_centers", torch.zeros(self.bits, self.num_classes))

    @torch.no_grad()
    def discrete_centers(self, labels: torch.Tensor, targets: torch.Tensor) -> None:
        """One pass of discrete cyclic coordinate descent over the classes (the authors' Discretecenter)."""
        rows = self.centers.t().clone()  # (classes, bits)
        per_class = labels.t()  # (classes, B)
        q = per_class @ targets  # (classes, bits)
        for c in range(self.num_classes):
            others = torch.arange(self.num_classes, device=rows.device) != c
            co_occurrence = per_class[others] @ per_class[c]  # (classes - 1,)
            rows[c] = torch.sign(q[c] - rows[others].t() @ co_occurrence - self.vul * rows[others].sum(dim=0))
        self.centers.copy_(rows.t())

    @torch.no_grad()
    def relaxed_step(self, labels: torch.Tensor, targets: torch.Tensor) -> None:
        """DeepHash-pytorch's Center_gradient: gradient steps on V, then C = sign(V). The gradient of
        its three means is written out (no autograd graph per step)."""
        gram_target = self.bits * (2 * torch.eye(self.num_classes, device=labels.device) - 1)
        relaxed, rate = self.relaxed_centers.clone(), RELAXED_RATE
        for iteration in range(RELAXED_STEPS):
            intra = 2 * (relaxed @ labels.t() - targets.t()) @ labels / targets.numel()
            inter = 4 * relaxed @ (relaxed.t() @ relaxed - gram_target) / gram_target.numel()
            quantization = 2 * (relaxed - relaxed.sign()) / relaxed.numel()
            if iteration in RELAXED_DECAY_AT:
                rate *= 0.1
            relaxed = relaxed - rate * (intra + self.vul * inter + self.nta * quantization)
        self.relaxed_centers.copy_(relaxed)
        self.centers.copy_(relaxed.sign())

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        outputs = self.memory.remember(step, self.continuous_codes)
        labels = step.labels.float()
        scaled = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
        with torch.no_grad():
            targets = sign(self.mu * scaled @ self.centers.t() + outputs)  # (B, bits)
            if self.center_step == "relaxed":
                self.relaxed_step(scaled, targets)
            else:
                self.discrete_centers(scaled, targets)
        theta = 0.5 * outputs @ self.memory.codes.t()  # (B, n)
        similar = self.memory.similarity(labels)
        pairs = (1 - similar) * F.softplus(self.margin + theta) + similar * F.softplus(self.margin - theta)
        return {
            "metric": self.memory.pair_mean(pairs),
            "quantization": self.eta * (targets - outputs).pow(2).mean(),
        }
