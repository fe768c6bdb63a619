"""DMUH across modalities: the DMUH loss (Eq. 5-10) with a momentum copy of each modality's network.

For each modality x (image, text): h_x the hashing network's continuous codes, m_x its momentum
copy's (Eq. 5, after every step), u_x = |h_x - m_x| the bit-level and ubar_x = mean_k u_x the
item-level uncertainty (Eq. 6, 7). Each modality keeps a memory of its training items' latest
codes and item-level uncertainties, and Eq. 10's pairwise likelihood is summed over

    inter-modal pairs  image batch x text memory, text batch x image memory
    intra-modal pairs  image batch x image memory, text batch x text memory   (times `intra`)

each pair weighted e^(ubar_i + ubar_j) with the two items' uncertainties in their own modality,
plus per modality beta * sum_ik e^(u_ik) (h_ik - b_ik)^2 + gamma * sum_ik u_ik; every sum is
divided by n B as in `dmuh.methods.dmuh`. The weights are constants (detached), as there.

No published code does this; the choices (intra-modal pairs on by default, each modality's own
code b = sign(h_x) rather than a shared sign(h_image + h_text)) are documented in docs/method.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import Requirements, StepInputs, register_method
from dmuh.methods.components.crossmodal import CrossModalMethod
from dmuh.methods.components.functional import OUTPUT_KINDS, apply_output
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule


@register_method("dmuh-cross", display_name="DMUH (cross-modal)")
@register_method(
    "regu-cross", display_name="Regu (cross-modal)", bit_weights=False, image_weights=False, uncertainty_term=False
)
class DMUHCrossModal(CrossModalMethod):
    """`regu-cross` is the same loss without any uncertainty (no momentum copies): the baseline
    that tells what the uncertainty adds."""

    hyper_parameters = {
        "alpha": Param(
            float,
            Rule(minimum=0.0, maximum=1.0),
            "momentum of both copies' weights (Eq. 5)",
            why="Eq. 5 averages the weights",
        ),
        "beta": Param(float, Rule(minimum=0.0), "weight of the quantisation terms"),
        "gamma": Param(float, Rule(minimum=0.0), "weight of the uncertainty terms"),
        "intra": Param(float, Rule(minimum=0.0), "weight of the within-modality likelihoods"),
        "output": Param(str, Rule(choices=OUTPUT_KINDS), "tanh bounds the codes to (-1, 1); linear keeps z"),
        "bit_weights": Param(bool, help="e^u weights of the quantisation"),
        "image_weights": Param(bool, help="e^(u_i + u_j) weights of the pairs"),
        "uncertainty_term": Param(bool, help="the uncertainty terms"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        text_dim: int = 1,
        alpha: float = 0.7,
        beta: float = 50.0,
        gamma: float = 1.0,
        intra: float = 1.0,
        output: str = "tanh",
        text_hidden=(1024,),
        text_dropout: float = 0.0,
        bit_weights: bool = True,
        image_weights: bool = True,
        uncertainty_term: bool = True,
    ):
        uses_uncertainty = bit_weights or image_weights or uncertainty_term
        super().__init__(
            bits,
            num_train,
            num_classes,
            text_dim,
            text_hidden,
            text_dropout,
            text_momentum=alpha if uses_uncertainty else None,
        )
        self.alpha = alpha if uses_uncertainty else None  # the image network's momentum copy, if any
        self.beta, self.gamma, self.intra, self.output = beta, gamma, intra, output  # checked as declared
        self.bit_weights, self.image_weights, self.uncertainty_term = bit_weights, image_weights, uncertainty_term
        self.image_memory = TrainingMemory(num_train, num_classes, bits, uncertainty=True)
        self.text_memory = TrainingMemory(num_train, num_classes, bits, uncertainty=True)

    def requirements(self) -> Requirements:
        # DMUH's default reading (docs/method.md): the momentum copy draws its own dropout masks.
        return replace(self.requires, momentum=self.alpha, momentum_dropout="own")

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return apply_output(self.output, outputs)

    def modality(self, outputs: torch.Tensor, momentum_outputs, memory: TrainingMemory, indices: torch.Tensor):
        """(codes, bit-level uncertainty, item-level uncertainty) of one modality's batch, written
        into its memory."""
        codes = self.continuous_codes(outputs)
        if momentum_outputs is None:
            bits = torch.zeros_like(codes)
        else:
            bits = (codes - self.continuous_codes(momentum_outputs.detach())).abs()  # Eq. 6
        items = bits.detach().mean(dim=1)  # Eq. 7
        memory.write(indices, codes.detach(), items)
        return codes, bits, items

    def pairs(
        self, codes: torch.Tensor, items: torch.Tensor, memory: TrainingMemory, labels: torch.Tensor
    ) -> torch.Tensor:
        weights = torch.exp(items[:, None] + memory.uncertainty[None, :]) if self.image_weights else None
        return memory.likelihood(codes, labels, weights)

    def own_terms(self, codes: torch.Tensor, bits: torch.Tensor, memory: TrainingMemory) -> Dict[str, torch.Tensor]:
        normaliser = memory.normaliser(codes.shape[0])
        weight = torch.exp(bits.detach()) if self.bit_weights else 1.0
        terms = {"quantization": self.beta * (weight * (codes - sign(codes.detach())).pow(2)).sum() / normaliser}
        if self.uncertainty_term:  # "_term": the step statistics hold the mean uncertainties themselves
            terms["uncertainty_term"] = self.gamma * bits.sum() / normaliser
        return terms

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if self.alpha is not None and step.momentum_outputs is None:
            raise ValueError("DMUH across modalities needs the image momentum network's outputs")
        text_outputs, text_momentum = self.text_outputs(step)
        image, image_bits, image_items = self.modality(
            step.outputs.float(), step.momentum_outputs, self.image_memory, step.indices
        )
        text, text_bits, text_items = self.modality(text_outputs, text_momentum, self.text_memory, step.indices)
        terms = {
            "inter": self.pairs(image, image_items, self.text_memory, step.labels)
            + self.pairs(text, text_items, self.image_memory, step.labels),
        }
        if self.intra:
            terms["intra"] = self.intra * (
                self.pairs(image, image_items, self.image_memory, step.labels)
                + self.pairs(text, text_items, self.text_memory, step.labels)
            )
        for name, value in self.own_terms(image, image_bits, self.image_memory).items():
            terms[f"image_{name}"] = value
        for name, value in self.own_terms(text, text_bits, self.text_memory).items():
            terms[f"text_{name}"] = value
        if self.alpha is not None:
            self.step_stats = {"image_uncertainty": image_items.mean(), "text_uncertainty": text_items.mean()}
        return terms
