"""Rank-preserving unsupervised hashing (Karaman, Lin, Hu and Chang, ICMR 2019), with its decoder.

A network maps a real-valued representation x (feature vectors given as data) to codes so that,
with every training item as a query, retrieval with the codes returns what retrieval with x
returns; a decoder learns to reconstruct x from the binary codes, and at search time the
candidates of a graph search over the codes are re-ranked with the decoded features
(`dmuh.retrieval.index.faiss.Index.search_decoded`), never with the database's original ones.

The authors' code is not public and their method section could not be read here; this is a
reading of the abstract (docs/method.md, "Label-free methods"). Over a batch of B items with unit
reference features x and relaxed codes u = tanh(z), each item q a query over the other B - 1:

    P_q(i) = softmax_i(x_q^T x_i / tau)                 the ranking by the original features
    Q_q(i) = softmax_i(u_q^T u_i / (bits tau))          the ranking by the codes (cosine, as u -> b)
    rank = mean_q KL(P_q || Q_q)                         ListNet's top-one cross-entropy, less H(P)
    quantization = mean (u - sign(u))^2
    reconstruction = mean_q (1 - cos(decoder(b_q), x_q))  b = sign(u)

L = rank + gamma quantization + lambda reconstruction; tau = 0.05 (`temperature`), gamma = 0.1
(`quantization`), lambda = 1 (`reconstruction`). The decoder (bits -> hidden -> D, `hidden` =
1024) reads the binary codes it will read at search time, and learns the direction of x: search
re-ranks by cosine, and a squared error summed over D made SGD at the default --lr 0.05 diverge
in the first epoch on digits (the cosine is bounded and scale-free). By default it learns on codes it does
not shape (`joint=False`: b is detached): the ranking alone makes the codes, and the decoder
inverts them. `joint=True` lets the reconstruction shape the codes too, through a
straight-through sign.
`reference_dim` (D) is set by the loop from the data.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.functional import SignStraightThrough
from dmuh.methods.components.params import Param
from dmuh.methods.components.reference import ReferenceFeatures
from dmuh.models.decoder import FeatureDecoder
from dmuh.utils.schema import Rule


def rank_divergence(reference: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean_q KL(P_q || Q_q) of the batch's rankings: `reference` unit rows (B, D), `codes` (B, bits)."""
    if reference.shape[0] < 2:
        raise DmuhError("rph: a batch needs at least 2 items to rank")
    off_diagonal = ~torch.eye(reference.shape[0], dtype=torch.bool, device=reference.device)
    target = (reference @ reference.t() / temperature)[off_diagonal].view(reference.shape[0], -1)
    learned = (codes @ codes.t() / (codes.shape[1] * temperature))[off_diagonal].view(codes.shape[0], -1)
    log_p, log_q = F.log_softmax(target, dim=1), F.log_softmax(learned, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


@register_method("rph", display_name="RPH")
class RankPreservingHashing(HashingMethod):
    """Codes whose rankings keep the reference features' rankings, plus a decoder of the features."""

    requires = Requirements(labels=False, reference_features=True, vectors=True, decoder=True)

    hyper_parameters = {
        "temperature": Param(float, Rule(above=0.0), "softmax temperature of the rank distributions"),
        "quantization": Param(float, Rule(minimum=0.0), "weight of the quantisation term"),
        "reconstruction": Param(float, Rule(minimum=0.0), "weight of the decoder's reconstruction of the reference"),
        "reference_dim": Param(
            int, Rule(minimum=1), "the reference representation's length (set by the loop from the data)"
        ),
        "hidden": Param(int, Rule(minimum=1), "hidden width of the decoder"),
        "joint": Param(bool, help="let the reconstruction shape the codes too (false: b detached)"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        reference_dim: int = 1,
        temperature: float = 0.05,
        quantization: float = 0.1,
        reconstruction: float = 1.0,
        hidden: int = 1024,
        joint: bool = False,
    ):
        super().__init__(bits, num_train, num_classes)
        self.temperature = temperature
        self.quantization_weight = quantization
        self.reconstruction_weight = reconstruction
        self.decoder = FeatureDecoder(self.bits, reference_dim, hidden)
        self.joint = joint
        self.reference = ReferenceFeatures()

    def set_reference_features(self, features: torch.Tensor) -> None:
        if features.shape[1] != self.decoder.dim:
            raise DmuhError(
                f"rph: reference features of dimension {features.shape[1]}, the decoder was built "
                f"for {self.decoder.dim}"
            )
        self.reference.set(features)

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.continuous_codes(step.outputs.float())
        reference = self.reference.of(step.indices)
        binary = SignStraightThrough.apply(codes) if self.joint else sign(codes.detach())
        decoded = self.decoder(binary)
        return {
            "rank": rank_divergence(reference, codes, self.temperature),
            "quantization": self.quantization_weight * (codes - sign(codes.detach())).pow(2).mean(),
            "reconstruction": self.reconstruction_weight * (1 - F.cosine_similarity(decoded, reference, dim=1)).mean(),
        }
