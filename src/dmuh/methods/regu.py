"""Regu: the DPSH pairwise-likelihood loss with a quantisation regulariser (paper Eq. 4).

Each batch is paired with every training item through a memory of the latest output of each
training item (`TrainingMemory`), as DPSH does. The loss is
`dmuh.methods.components.dpsh.PairwiseQuantizationMethod`'s, which DMUH and DistillHash extend.
"""

from __future__ import annotations

from dmuh.methods.base import register_method
from dmuh.methods.components.dpsh import NORMALISATIONS, PairwiseQuantizationMethod  # noqa: F401


@register_method("regu", display_name="Regu")
@register_method("dpsh", display_name="DPSH")
class Regu(PairwiseQuantizationMethod):
    """L = [sum_ij (log(1 + e^Theta_ij) - S_ij Theta_ij) + beta * sum_i ||h_i - b_i||^2] / (n B).

    Theta_ij = h_i^T h_j / 2 over the B batch items i and the memory items j seen so far (an
    unseen item has no code yet: DPSH's zero entry adds a constant and no gradient). Dividing
    every term by n B is DPSH's official normalisation, the one its lambda = 50 (the paper's
    beta = 50) was tuned with: the likelihood is a mean over pairs, and the quantisation sum over
    bits is weighted beta / n per item. `normalisation="batch"` instead makes every term a mean
    over its own entries (pairs of the batch with seen items; batch items x bits). `output="tanh"`
    bounds h to (-1, 1) (our default, see docs/method.md); "linear" is DPSH's unbounded output.
    """
