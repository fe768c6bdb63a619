"""SH (Weiss, Torralba and Fergus, NIPS 2008): spectral hashing.

Reference followed: the authors' trainSH.m / compressSH.m as shipped in the MATLAB toolkit
willard-yuan/hashing-baseline-for-image-retrieval (Method-SH/, with Method-PCAH/trainPCAH.m for the
principal directions, demo.m's 'SH' case).

Fit on the mean-centred training features X:
1. PCA: P = the top d = min(bits, D) principal directions; V = X P.
2. A uniform distribution on the box [mn, mx] of V: mn = min(V) - eps, mx = max(V) + eps per
   dimension (trainSH.m computes the 5th/95th percentiles and overwrites them with these).
3. The analytical eigenfunctions of that box, one per mode vector m (m_j >= 0, at most one
   non-zero entry): phi_m(v) = prod_j cos(pi m_j (v_j - mn_j) / R_j), R = mx - mn, with eigenvalue
   ordered by sum_j (pi m_j / R_j)^2. Dimension j offers modes 1 .. ceil((bits + 1) R_j / max R) - 1.
   The `bits` modes with the smallest sum (after the constant mode), MATLAB's stable sort breaking
   ties in enumeration order (dimension by dimension, mode by mode), are the bits.
code_k(x) = sign(prod_j cos(omega_kj ((x - mean) P - mn)_j)), omega = modes * pi / R: a
`SpectralHead` (compressSH.m's sin(. + pi/2)).

Deviations: the toolkit centres by the mean of training and test items and computes P on the
database (trainPCAH(db_data)); dmuh fits everything on the training split. sign(0) = +1 where
compressSH.m's U > 0 gives bit 0. eps is float64's (MATLAB's eps).
"""

from __future__ import annotations

import math

import torch

from dmuh.methods.base import Requirements, register_method
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.methods.components.shallow_toolkit import principal_directions
from dmuh.models.heads import SpectralHead

EPS = 2.0**-52  # MATLAB's eps


def spectral_modes(span: torch.Tensor, bits: int) -> torch.Tensor:
    """The (bits, d) integer mode matrix of trainSH.m for a box of side lengths `span` (d,)."""
    d = span.shape[0]
    max_mode = torch.ceil((bits + 1) * span / span.max()).long()
    rows = [torch.zeros(d, dtype=torch.float64)]  # the constant mode first
    for j in range(d):
        for mode in range(1, int(max_mode[j])):
            row = torch.zeros(d, dtype=torch.float64)
            row[j] = mode
            rows.append(row)
    modes = torch.stack(rows)
    frequencies = ((modes * (math.pi / span)) ** 2).sum(1)
    order = torch.sort(frequencies, stable=True).indices
    return modes[order[1 : bits + 1]]


@register_method("sh", display_name="SH")
class SH(ShallowMethod):
    """Products of cosines along the principal directions: the eigenfunctions of a uniform box."""

    requires = Requirements(shallow=True, labels=False)

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> SpectralHead:
        x = self.check_features(features)
        mean = x.mean(0)
        projection = principal_directions(x - mean, min(self.bits, x.shape[1]))  # (D, d)
        projected = (x - mean) @ projection
        low, high = projected.min(0).values - EPS, projected.max(0).values + EPS
        span = high - low
        modes = spectral_modes(span, self.bits)
        omegas = modes * (math.pi / span)
        shift = -(mean @ projection) - low
        return SpectralHead.fitted(projection.t().float(), shift.float(), omegas.float())
