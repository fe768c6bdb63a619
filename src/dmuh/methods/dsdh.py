"""DSDH (Li et al., NeurIPS 2017): Deep Supervised Discrete Hashing.

Reference: TreezzZ/DSDH_PyTorch (dsdh.py, models/dsdh_loss.py: one W-step and one B-step after
every epoch of network updates), cross-checked with swuxyj/DeepHash-pytorch DSDH.py (which
updates B and W at every step).

The method keeps discrete codes B (n x bits, +-1) of all training items and a linear classifier W
(bits x classes) that predicts the labels Y from B. Alternating:

- network step (every batch):
    L = mean_ij [log(1 + e^Theta_ij) - S_ij Theta_ij] + eta * mean_ik (B_ik - u_ik)^2,
  Theta_ij = u_i . U_j / 2 over the memory U of training outputs (DPSH's likelihood over the
  same `TrainingMemory` as Regu);
- at the start of every epoch after the first, from U:
    W-step  W = (B^T B + (nu / mu) I)^-1 B^T Y               (ridge regression of Y on B)
    B-step  discrete cyclic coordinate descent on
            mu ||Y - B W||^2 + nu ||W||^2 + eta ||B - U||^2, one bit (column of B) at a time:
            B_:k = sign(P_:k - B_:-k W_-k w_k),  P = Y W^T + (eta / mu) U
  repeated `dcc_iter` times.

B starts as random signs (seeded). Codes at evaluation are sign(z). Defaults (TreezzZ's): mu =
0.01, nu = 1, eta = 0.01, dcc_iter = 1, the raw linear output u = z.
"""

from __future__ import annotations

from typing import Dict

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import HashingMethod, StepInputs, register_method
from dmuh.methods.components.functional import OUTPUT_KINDS, apply_output, random_sign_codes
from dmuh.methods.components.memory import LEGACY_MEMORY_KEYS, TrainingMemory
from dmuh.methods.components.params import SEED, Param
from dmuh.utils.schema import Rule


@register_method("dsdh", display_name="DSDH")
class DSDH(HashingMethod):
    """DPSH's likelihood plus a pull of the outputs to discrete codes that a linear classifier reads."""

    legacy_state_keys = LEGACY_MEMORY_KEYS
    hyper_parameters = {
        "mu": Param(float, Rule(above=0.0), "weight of the classification of the codes, mu ||Y - B W||^2"),
        "nu": Param(float, Rule(minimum=0.0), "ridge on the classifier W, nu ||W||^2"),
        "eta": Param(float, Rule(minimum=0.0), "weight of the pull of the codes B to the outputs U"),
        "dcc_iter": Param(int, Rule(minimum=1), "discrete cyclic coordinate passes per B step"),
        "output": Param(str, Rule(choices=OUTPUT_KINDS), "tanh bounds the codes to (-1, 1); linear keeps z"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        mu: float = 0.01,
        nu: float = 1.0,
        eta: float = 0.01,
        dcc_iter: int = 1,
        output: str = "linear",
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.output = output  # all checked as declared
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits)
        self.mu, self.nu, self.eta, self.dcc_iter = mu, nu, eta, dcc_iter
        self.register_buffer("binary_codes", random_sign_codes(self.num_train, self.bits, seed))
        self.register_buffer("classifier", torch.zeros(self.bits, self.num_classes))

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if epoch > 1:  # the memory holds the outputs of the previous epoch
            self.update_codes()

    @torch.no_grad()
    def update_codes(self) -> None:
        """`dcc_iter` rounds of the W-step and the B-step (discrete cyclic coordinate descent)."""
        labels, outputs, codes = self.memory.labels, self.memory.codes, self.binary_codes
        ridge = (self.nu / self.mu) * torch.eye(self.bits, device=codes.device)
        for _ in range(self.dcc_iter):
            classifier = torch.linalg.solve(codes.t() @ codes + ridge, codes.t() @ labels)
            target = labels @ classifier.t() + (self.eta / self.mu) * outputs
            for k in range(self.bits):
                w_k = classifier[k]
                # B_:-k W_-k w_k = B W w_k minus bit k's own share, B_:k (w_k . w_k)
                others = codes @ (classifier @ w_k) - codes[:, k] * (w_k @ w_k)
                codes[:, k] = sign(target[:, k] - others)
        self.classifier.copy_(classifier)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return apply_output(self.output, outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        outputs = self.memory.remember(step, self.continuous_codes)
        return {
            "likelihood": self.memory.likelihood(outputs, step.labels),
            "quantization": self.eta * (self.binary_codes[step.indices] - outputs).pow(2).mean(),
        }
