"""DMUH: Deep Momentum Uncertainty Hashing (paper Eq. 5-10, Algorithm 1).

  u_i   = |h_i - m_i|                  bit-level uncertainty (Eq. 6), m from the momentum copy
  ubar_i = mean_k u_ik                 image-level uncertainty (Eq. 7)
  L = [sum_ij e^(ubar_i + ubar_j) (log(1 + e^Theta_ij) - S_ij Theta_ij)
       + beta * sum_ik e^(u_ik) (h_ik - b_ik)^2 + gamma * sum_ik u_ik] / (n B)     (Eq. 10)

with Regu's (DPSH's) normalisation by n B (seen memory items times batch items). Two readings are
options: `uncertainty_normalisation=entries` takes the gamma term as a mean over the B x bits
entries instead; `weight_scale=batch-mean` divides each weight by its batch mean (docs/method.md).

The memory keeps, beside each training item's latest code, its latest image-level uncertainty, so
e^(ubar_i + ubar_j) can be formed for memory items j. The weights e^u and e^(ubar_i + ubar_j) are
treated as constants (detached): they say how much attention a bit or pair gets, and letting the
gradient shrink them would reward the network for hiding uncertainty inside the weights instead
of through the gamma term. The gamma term keeps its gradient (through h; m has none).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import Requirements, StepInputs, register_method
from dmuh.methods.components.dpsh import PairwiseQuantizationMethod
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.models.momentum import DROPOUT_MODES
from dmuh.utils.schema import Rule

MOMENTUM_UPDATES = ("step", "epoch")
RETRIEVAL_NETWORKS = ("hashing", "momentum")
# How gamma * sum(u) is normalised: as the likelihood ("likelihood": over n B, so its push per
# entry is gamma / n) or as a mean over the batch's B x bits entries ("entries": the one reading in
# which gamma = 1 balances the other terms, as the paper says it was chosen).
UNCERTAINTY_NORMALISATIONS = ("likelihood", "entries")
# The weights e^u and e^(u_i + u_j) as Eq. 10 writes them ("raw"), or each divided by its batch mean
# ("batch-mean", mean 1): the control that separates re-weighting from a rescaled beta and loss.
WEIGHT_SCALES = ("raw", "batch-mean")


@register_method("dmuh", display_name="DMUH")
@register_method("dmuh-wo-u", uncertainty_term=False)
@register_method("dmuh-wo-eu", bit_weights=False)
@register_method("dmuh-wo-euij", image_weights=False)
class DMUH(PairwiseQuantizationMethod):
    """Regu plus bit- and image-level uncertainty from a momentum copy of the network.

    The three switches are the ablations of section 5.4: `uncertainty_term=False` is "w/o u_i",
    `bit_weights=False` is "w/o e^u_i", `image_weights=False` is "w/o e^(u_i+u_j)".
    """

    # Checkpoints written before the default reading was measured (docs/method.md) used "off".
    legacy_defaults = {"momentum_dropout": "off"}
    hyper_parameters = {
        "alpha": Param(
            float,
            Rule(minimum=0.0, maximum=1.0),
            "momentum of the copy's weights (Eq. 5)",
            why="Eq. 5 averages the weights",
        ),
        "gamma": Param(float, Rule(minimum=0.0), "weight of the uncertainty term"),
        "momentum_dropout": Param(
            str, Rule(choices=DROPOUT_MODES), "the momentum copy's dropout masks", aliases=((False, "off"),)
        ),
        "momentum_update": Param(str, Rule(choices=MOMENTUM_UPDATES), "when Eq. 5 is applied"),
        "retrieval": Param(str, Rule(choices=RETRIEVAL_NETWORKS), "whose codes are retrieved"),
        "bit_weights": Param(bool, help="e^u weights of the quantisation (off: w/o e^u_i)"),
        "image_weights": Param(bool, help="e^(u_i + u_j) weights of the pairs (off: w/o e^(u_i+u_j))"),
        "uncertainty_term": Param(bool, help="the uncertainty term (off: w/o u_i)"),
        "uncertainty_normalisation": Param(
            str, Rule(choices=UNCERTAINTY_NORMALISATIONS), "gamma * sum(u) over n B as the likelihood, or a mean"
        ),
        "weight_scale": Param(str, Rule(choices=WEIGHT_SCALES), "the weights as Eq. 10 has them, or mean 1"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        alpha: float = 0.7,
        beta: float = 50.0,
        gamma: float = 1.0,
        output: str = "tanh",
        normalisation: str = "nB",
        momentum_dropout: str = "own",
        momentum_update: str = "step",
        retrieval: str = "hashing",
        bit_weights: bool = True,
        image_weights: bool = True,
        uncertainty_term: bool = True,
        uncertainty_normalisation: str = "likelihood",
        weight_scale: str = "raw",
    ):
        super().__init__(bits, num_train, num_classes, beta=beta, output=output, normalisation=normalisation)
        # Checked as declared (`hyper_parameters`; a YAML file's `momentum_dropout: off` arrives as
        # False and reads "off"). The momentum copy and the retrieval network are hyper-parameters:
        # `requirements()` reports them.
        self.alpha = alpha
        self.dropout_reading = momentum_dropout
        self.update_reading = momentum_update
        self.retrieval = retrieval
        self.gamma = gamma
        self.bit_weights = bit_weights
        self.image_weights = image_weights
        self.uncertainty_term = uncertainty_term
        self.uncertainty_normalisation = uncertainty_normalisation
        self.weight_scale = weight_scale
        self.memory = TrainingMemory(self.num_train, self.num_classes, self.bits, uncertainty=True)

    def requirements(self) -> Requirements:
        return replace(
            self.requires,
            momentum=self.alpha,
            momentum_dropout=self.dropout_reading,
            momentum_update=self.update_reading,
            retrieval_network=self.retrieval,
        )

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if step.momentum_outputs is None:
            raise ValueError("DMUH needs the momentum network's outputs (StepInputs.momentum_outputs)")
        codes = self.continuous_codes(step.outputs.float())
        momentum_codes = self.continuous_codes(step.momentum_outputs.detach().float())
        bit_uncertainty = (codes - momentum_codes).abs()  # Eq. 6
        image_uncertainty = bit_uncertainty.detach().mean(dim=1)  # Eq. 7

        with torch.no_grad():
            shared_indices, shared_outputs, shared_momentum = step.shared()
            shared_codes = self.continuous_codes(shared_outputs.float())
            shared_uncertainty = (shared_codes - self.continuous_codes(shared_momentum.float())).abs().mean(dim=1)
            self.memory.write(shared_indices, shared_codes, shared_uncertainty)
        pair_weights = None
        if self.image_weights:
            pair_weights = torch.exp(image_uncertainty[:, None] + self.memory.uncertainty[None, :])
            if self.weight_scale == "batch-mean":  # over the pairs the likelihood sums (seen items)
                pair_weights = pair_weights / pair_weights[:, self.memory.seen].mean()
        bit_weight = torch.exp(bit_uncertainty.detach()) if self.bit_weights else None
        if bit_weight is not None and self.weight_scale == "batch-mean":
            bit_weight = bit_weight / bit_weight.mean()
        squared_gaps = (codes - sign(codes.detach())).pow(2)
        quantization = self.entry_mean(
            (squared_gaps if bit_weight is None else bit_weight * squared_gaps).sum(), codes.shape[0]
        )

        self.step_stats = {
            "bit_uncertainty": bit_uncertainty.detach().mean(),
            "image_uncertainty": image_uncertainty.mean(),
            "image_uncertainty_max": image_uncertainty.max(),
        }
        if pair_weights is not None:
            self.step_stats["pair_weight"] = pair_weights[:, self.memory.seen].mean()
        if bit_weight is not None:
            self.step_stats["bit_weight"] = bit_weight.mean()
        terms = {
            "likelihood": self.memory.likelihood(codes, step.labels, pair_weights, self.normalisation),
            "quantization": self.beta * quantization,
        }
        if self.uncertainty_term:
            if self.uncertainty_normalisation == "entries":
                terms["uncertainty"] = self.gamma * bit_uncertainty.mean()
            else:
                terms["uncertainty"] = self.gamma * self.entry_mean(bit_uncertainty.sum(), codes.shape[0])
        return terms
