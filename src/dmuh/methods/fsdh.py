"""FSDH (Gui, Liu, Sun, Tao and Tan, TPAMI 2018): fast supervised discrete hashing.

Reference followed: the paper (arXiv 1904.03556), Algorithm 1; the authors' MATLAB code was not
in the stored index here (goukoutaki/FSDH is a different method of the same name, renamed HC-SDH
by its authors), so the steps below are the paper's, on SDH's kernel map (`dmuh.methods.sdh`),
the code FSDH builds on. Shallow: fitted once on backbone features.

SDH regresses the labels on the codes (||Y - B W||^2), so its B-step needs discrete cyclic
coordinate descent. FSDH regresses the codes on the labels instead:
    min_{B, W, P}  ||B - Y W||^2 + lambda ||W||^2 + nu ||B - phi(X) P||^2,  B in {-1, 1}^{n x bits}
and every step is closed form. From seeded random codes B = sign(randn), `iterations` (5) rounds of
    F-step  P = (phi^T phi + f_lambda I)^-1 phi^T B        (as SDH's, RRC.m's ridge regression)
    W-step  W = (Y^T Y + lambda I)^-1 Y^T B                (C x bits)
    B-step  B = sign(Y W + nu phi P)
and a last F-step on the final codes. The out-of-sample function is SDH's `RBFHead` z = P^T phi(x).

Defaults (SDH's, which the paper keeps): anchors 1000, lambda 1, f_lambda 0.01, nu 1e-5,
5 iterations; the kernel width sigma as `sdh`'s (`sigma="nearest"`, see there).
Deviation: sign(0) = +1.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.rbf_kernel import RBFKernelMap, checked_sigma, ridge
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.models.heads import RBFHead
from dmuh.utils.schema import Rule


@register_method("fsdh", display_name="FSDH")
class FSDH(RBFKernelMap, ShallowMethod):
    """SDH with the regression reversed (codes on labels): every step closed form, no DCC."""

    hyper_parameters = {
        "anchors": Param(int, Rule(minimum=1), "RBF anchors"),
        "iterations": Param(int, Rule(minimum=0), "outer iterations"),
        "lam": Param(float, Rule(above=0.0), "ridge of the label-to-code regression W"),
        "f_lambda": Param(float, Rule(above=0.0), "ridge of the hash function F"),
        "nu": Param(float, Rule(minimum=0.0), "weight of the fit of B to phi P"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        anchors: int = 1000,
        sigma: Union[str, float] = "nearest",
        iterations: int = 5,
        lam: float = 1.0,
        f_lambda: float = 0.01,
        nu: float = 1e-5,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.sigma = checked_sigma(sigma)
        self.anchors, self.iterations, self.lam = anchors, iterations, lam
        self.f_lambda, self.nu, self.seed = f_lambda, nu, seed
        self.fitted_codes: Optional[torch.Tensor] = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> RBFHead:
        x = self.check_features(features)
        y = self.check_labels(labels, x.shape[0])
        self.check_enough_items(x.shape[0])
        anchor_index = self.choose_anchors(x)
        anchors = x[anchor_index]
        sigma = self.kernel_width(x, anchor_index)
        phi = self.kernel_map(x, anchors, sigma)
        phi_gram = phi.t() @ phi
        codes = self.initial_codes(x.shape[0])
        for _ in range(self.iterations):
            projection = ridge(phi, codes, self.f_lambda, phi_gram)
            weight = ridge(y, codes, self.lam)  # (C, bits)
            codes = sign(y @ weight + self.nu * (phi @ projection))
        projection = ridge(phi, codes, self.f_lambda, phi_gram)
        self.fitted_codes = codes
        return RBFHead.fitted(anchors.float(), sigma, projection[:-1].t().float(), projection[-1].float())
