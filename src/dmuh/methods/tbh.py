"""TBH (Shen, Qin, Chen, Yu, Liu, Zhu, Shao and Shao, CVPR 2020): Auto-encoding Twin-Bottleneck Hashing.

A label-free auto-encoder with two bottlenecks: the binary codes b of an item and a continuous
vector c. The codes of a batch build a graph, a graph convolution over it refines the continuous
bottleneck, and a decoder reconstructs the input features from the refined vector, so the codes
learn to say which items are neighbours; two discriminators pull b towards Bernoulli(1/2) and the
refined vector towards Uniform[0, 1].

As the authors' code does it (ymcidence/TBH: layer/encodec.py, layer/binary_activation.py,
layer/twin_bottleneck.py, layer/gcn.py, model/tbh.py, train/tbh_train.py):

- Encoder: a shared hidden layer (1024, ReLU), then b = [sigmoid(z) > 1/2] in {0, 1} from z, with
  the gradient of sigmoid(z) (their `binary_activation` at eps = 1/2, its distributional
  derivative), and c = sigmoid(W_c h + b_c) of 512 dimensions.
- Adjacency of the batch: A_ij = (1 - |b_i (b_j - 1)^T + (b_i - 1) b_j^T| / bits)^1.4, i.e.
  (1 - Hamming(b_i, b_j) / bits)^1.4 (self-connected).
- Graph convolution: c' = sigmoid(D^-1/2 A D^-1/2 (W_g c + b_g)), D = diag(A 1) + 1e-8.
- Decoder: x^ = ReLU(W_2 ReLU(W_1 c' + b_1) + b_2), 1024 hidden units, back to the features x.
- Discriminators: d_1(b) = sigmoid(w_1 . b + e_1), d_2(c') = sigmoid(w_2 . c' + e_2); real samples
  are fresh Bernoulli(1/2) codes and Uniform[0, 1] vectors of the batch's size. With
      adv(real, fake) = mean BCE(1, d(real)) + mean BCE(0, d(fake)),
  the encoder, graph layer and decoder minimise  l2_loss(x^ - x) - adv_1 - adv_2  (l2_loss: half
  the sum of squares over the batch), the discriminators minimise  adv_1 + adv_2; both gradients
  are taken on the same forward pass and applied together (two Adam optimisers, lr 1e-4 each).

How it maps onto dmuh. The loop's network is the encoder's binary branch: its backbone is the
shared hidden layer (`--model mlp --model-param hidden=[1024]` on feature vectors is exactly the
authors' encoder) and its hash layer gives z. The method holds the rest: the continuous head on the
backbone features (`Requirements.features`, `feature_dim` set by the loop), the graph layer, the
decoder and the two discriminators. The decoder reconstructs the fixed reference representation of
the training items (`Requirements.reference_features`: the data's vectors, as the authors' fixed
VGG features; or the backbone's features of the images when training starts), kept as given
(not normalised), float16.

The adversarial game in one optimiser step: the discriminators' inputs pass through a gradient
reversal (identity forward, -lambda times the gradient backward), so one backward gives the
discriminators the gradient of +adv and the encoder side the gradient of -lambda adv, both at the
same point, which is what the authors' two tapes compute; the run's one optimiser then applies
both (the authors' two optimisers are the same Adam with the same rate, and Adam is per
parameter). The loss terms are "reconstruction" (per item: half the sum of squares over the
features, averaged over the batch) and "adversarial" (adv_1 + adv_2, the discriminators' loss).
[reading] lambda (`adversarial`) = 1/400: the authors' reconstruction sums over their batch of
400 items, so per item their adversarial terms weigh 1/400 of it (Adam does not see the overall
scale). Their recipe (Adam 1e-4, batch 400, 100,000 steps) is the run's, as for every method.

Retrieval codes: sign(2 sigmoid(z) - 1) = the authors' b at eval (eps = 1/2), written as +-1.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.params import Param
from dmuh.utils.schema import Rule

DEGREE_MARGIN = 1e-8  # the authors' guard of D^-1/2
FLOAT16_MAX = 65504.0


def binary_bottleneck(outputs: torch.Tensor) -> torch.Tensor:
    """b = (sign(sigmoid(z) - 1/2) + 1) / 2 in {0, 1/2, 1}, with the gradient of sigmoid(z)."""
    probability = torch.sigmoid(outputs)
    code = (torch.sign(probability - 0.5) + 1.0) / 2.0
    return probability + (code - probability).detach()


def hamming_adjacency(codes: torch.Tensor, power: float) -> torch.Tensor:
    """(1 - |b (b - 1)^T + (b - 1) b^T| / bits)^power of {0, 1} codes (B, bits): 1 on the diagonal."""
    complement = codes - 1.0
    disagreements = (codes @ complement.t() + complement @ codes.t()).abs()  # minus the Hamming distance
    return (1.0 - disagreements / codes.shape[1]).pow(power)


def normalised_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with D = diag(A 1) (+ 1e-8)."""
    scale = (adjacency.sum(dim=1) + DEGREE_MARGIN).pow(-0.5)
    return scale[:, None] * adjacency * scale[None, :]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight):
        ctx.weight = weight
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


def reverse_gradient(inputs: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; backward, -weight times the gradient (the other player of a minimax game)."""
    return _ReverseGradient.apply(inputs, weight)


def adversarial_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """mean BCE(1, d(real)) + mean BCE(0, d(fake)) of a discriminator giving logits."""
    real_logits, fake_logits = discriminator(real), discriminator(fake)
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


@register_method("tbh", display_name="TBH")
class TBH(HashingMethod):
    """Twin-bottleneck auto-encoder of the reference features, with adversarial priors on both bottlenecks."""

    requires = Requirements(labels=False, reference_features=True, features=True)

    hyper_parameters = {
        "continuous_dim": Param(int, Rule(minimum=1), "size of the continuous bottleneck"),
        "hidden": Param(int, Rule(minimum=1), "hidden width of the decoder"),
        "adjacency_power": Param(float, Rule(above=0.0), "power of 1 - Hamming / bits in the graph"),
        "adversarial": Param(float, Rule(minimum=0.0), "weight of the adversarial terms in the encoder's loss"),
        "reference_dim": Param(int, Rule(minimum=1), "the reference representation's length (set by the loop)"),
        "feature_dim": Param(int, Rule(minimum=1), "the backbone's feature size (set by the loop)"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        reference_dim: int = 1,
        feature_dim: int = 1,
        continuous_dim: int = 512,
        hidden: int = 1024,
        adjacency_power: float = 1.4,
        adversarial: float = 1 / 400,
    ):
        super().__init__(bits, num_train, num_classes)
        self.adjacency_power = adjacency_power
        self.adversarial = adversarial
        self.continuous = nn.Linear(feature_dim, continuous_dim)
        self.graph = nn.Linear(continuous_dim, continuous_dim)
        self.decoder = nn.Sequential(
            nn.Linear(continuous_dim, hidden), nn.ReLU(), nn.Linear(hidden, reference_dim), nn.ReLU()
        )
        self.binary_critic = nn.Linear(bits, 1)
        self.continuous_critic = nn.Linear(continuous_dim, 1)
        self.register_buffer("targets", torch.zeros(0, reference_dim, dtype=torch.float16))

    @torch.no_grad()
    def set_reference_features(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape != (self.num_train, self.decoder[2].out_features):
            raise DmuhError(
                f"method 'tbh': reference features of shape {tuple(features.shape)}, built for "
                f"{(self.num_train, self.decoder[2].out_features)}"
            )
        if not torch.isfinite(features).all() or float(features.abs().max()) > FLOAT16_MAX:
            raise DmuhError("method 'tbh': reference features with NaN, infinite or beyond-float16 values")
        self.targets = features.to(device=self.targets.device, dtype=torch.float16)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = state_dict.get(prefix + "targets")
        if saved is not None:  # its length is the training split's, known only from the checkpoint
            self.targets = torch.zeros(saved.shape, dtype=torch.float16, device=self.targets.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(outputs) - 1.0

    def bottlenecks(self, outputs: torch.Tensor, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(b, c'): the binary bottleneck and the continuous one refined over the codes' graph."""
        codes = binary_bottleneck(outputs)
        continuous = torch.sigmoid(self.continuous(features))
        adjacency = normalised_adjacency(hamming_adjacency(codes, self.adjacency_power))
        return codes, torch.sigmoid(adjacency @ self.graph(continuous))

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if step.features is None:
            raise DmuhError("method 'tbh' needs the backbone features of the batch (Requirements.features)")
        if step.features.shape[1] != self.continuous.in_features:
            raise DmuhError(
                f"method parameter feature_dim={self.continuous.in_features}: the backbone gives "
                f"{step.features.shape[1]} features (leave it out: the loop sets it)"
            )
        if self.targets.shape[0] == 0:
            raise DmuhError("method 'tbh': reference features not set (the loop sets them before the first step)")
        codes, refined = self.bottlenecks(step.outputs.float(), step.features.float())
        targets = self.targets[step.indices.to(self.targets.device)].float().to(codes.device)
        reconstruction = 0.5 * (self.decoder(refined) - targets).pow(2).sum(dim=1).mean()
        # The priors' samples: Bernoulli(1/2) codes and Uniform[0, 1] vectors (the loop seeds the draws).
        real_codes = (torch.rand_like(codes) > 0.5).to(codes.dtype)
        real_continuous = torch.rand_like(refined)
        adversarial = adversarial_loss(
            self.binary_critic, real_codes, reverse_gradient(codes, self.adversarial)
        ) + adversarial_loss(self.continuous_critic, real_continuous, reverse_gradient(refined, self.adversarial))
        return {"reconstruction": reconstruction, "adversarial": adversarial}
