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
    """DPSH (Li et al., IJCAI 2016), the paper's Regu baseline: the pairwise likelihood with a quantisation
    term over a memory of training codes, as `PairwiseQuantizationMethod` defines it, at its defaults."""
