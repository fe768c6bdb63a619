"""What every cross-modal method shares: a text network beside the loop's image network.

The training loop's network (`--model`, over images or image feature vectors) is the image
network; a cross-modal method holds the text network, an MLP hash network over the text vector
(`dmuh.models` "mlp"), so its weights join the optimiser and the checkpoint with the method's.
Both map into one `bits`-wide Hamming space: an image query searches text codes and a text query
image codes. `text_dim` (the text vector's length) is filled in by the loop from the data.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs
from dmuh.methods.components.params import Param, check_count
from dmuh.models import create_model
from dmuh.models.momentum import MomentumNetwork
from dmuh.utils.schema import Rule


def check_hidden(name: str, value) -> list:
    """A list of MLP layer widths (a bare integer is one layer), or a DmuhError naming the parameter."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DmuhError(f"method parameter {name}={value!r}: expected a list of layer widths, e.g. [1024]")
    return [check_count(name, width) for width in value]


class CrossModalMethod(HashingMethod):
    """Base of the image-text methods: the text network, its optional momentum copy, text encoding."""

    requires = Requirements(text=True)
    hyper_parameters = {
        "text_dim": Param(int, Rule(minimum=1), "the text vector's length (set by the loop from the data)"),
        "text_dropout": Param(float, Rule(minimum=0.0), "dropout of the text network"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        text_dim: int = 1,
        text_hidden: Sequence[int] = (1024,),
        text_dropout: float = 0.0,
        text_momentum: Optional[float] = None,
    ):
        super().__init__(bits, num_train, num_classes)

        # Set by the loop from the data (`method_params_for`); 1 is a stand-in for checks without data.
        self.text_dim = text_dim  # checked as declared, with text_dropout
        hidden = check_hidden("text_hidden", text_hidden)
        self.text_network = create_model("mlp", bits=bits, input_dim=text_dim, hidden=hidden, dropout=text_dropout)
        self.text_momentum = None if text_momentum is None else MomentumNetwork(self.text_network, text_momentum)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.continuous_codes(self.text_network(text.float()).float())

    def text_outputs(self, step: StepInputs):
        """(raw text outputs, the momentum copy's raw outputs or None) of the batch's texts."""
        if step.text is None:
            raise ValueError(f"{type(self).__name__} needs the batch's text vectors (StepInputs.text)")
        if self.text_momentum is None:
            return self.text_network(step.text.float()).float(), None
        outputs, momentum = self.text_momentum.paired(lambda: self.text_network(step.text.float()), step.text.float())
        return outputs.float(), momentum.detach().float()

    def on_step_end(self) -> None:
        if self.text_momentum is not None:
            self.text_momentum.update(self.text_network)  # Eq. 5 for the text network, after every step
