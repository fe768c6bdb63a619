"""SSDH (Yang, Deng, Liu, Liu and Tao, IJCAI 2018): Semantic Structure-based unsupervised Deep Hashing.

A label-free method: pseudo similarity labels come once from the cosine distances of a fixed
reference representation of the training items (the paper's pre-trained VGG fc7 features; here
`set_reference_features`: the data's vectors, or the backbone's features of the images when
training starts), and the network learns codes whose inner products match them.

As the authors' code does it (yangerkun/IJCAI2018_SSDH, main.py):

1. Distances d_ij = 1 - cos(f_i, f_j) of every entry of the n x n matrix (the diagonal's zeros
   included). Their histogram in bins of width 0.01 from -1e-8; m is the START of the fullest bin.
2. Two Gaussians: the distances d <= m, mirrored about m, and those d > m, mirrored about m, each
   fitted by maximum likelihood (scipy's norm.fit): both have mean m, and std
   sigma_L = sqrt(mean_{d <= m} (d - m)^2), sigma_R = sqrt(mean_{d > m} (d - m)^2).
3. Pseudo labels: S_ij = +1 where d_ij < m - a sigma_L, -1 where d_ij > m + a sigma_R, 0 between
   (a pair left out), with a = 2 (`deviations`).
4. Loss per mini-batch of B items, v = tanh(z):
       L = mean_{i, j in the batch} |S_ij| (v_i . v_j / bits - S_ij)^2
   over all B^2 entries (the diagonal and the left-out pairs count in the mean, as tf.reduce_mean).

Where we differ, and why: the authors fit on all n^2 entries (n = 10,000 there). The fit here uses
`sample_pairs` pairs i != j drawn with a seeded generator when there are more (every pair i < j
otherwise, `dmuh.methods.components.reference.sample_pair_distances`), plus the diagonal's zeros with their share
1 / (n - 1) of the pairs as a weight, so on a small set the fit is the authors' to float precision.
The histogram extends past 1 in bins of the same width when distances do (the authors' 100 bins
end at 1: their ReLU features have no distance above 1). The recipe (Adam, lr 1e-3, epsilon 1,
batch 24, 10 epochs in their script) is the run's, as for every method.

State: the reference features (`ReferenceFeatures`) and (m, sigma_L, sigma_R) are buffers, so a
resumed or rebuilt run has the same pseudo labels.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.params import Param
from dmuh.methods.components.reference import ReferenceFeatures, sample_pair_distances
from dmuh.utils.schema import Rule

BIN_WIDTH = 0.01  # the authors' histogram: 100 bins over [0, 1)
BIN_START = -1e-8  # their first bin starts just below 0, so the diagonal's zeros fall in it


def fit_two_gaussians(distances: torch.Tensor, zeros: float = 0.0) -> Tuple[float, float, float]:
    """(m, sigma_L, sigma_R) of the distances plus `zeros` entries of distance 0 (the diagonal,
    as a weight): m the start of the fullest histogram bin (the first one on a tie), sigma_L and
    sigma_R the maximum-likelihood stds about m of the entries d <= m and d > m."""
    distances = distances.double().flatten()
    bins = max(int(1.0 / BIN_WIDTH), math.ceil((float(distances.max()) - BIN_START) / BIN_WIDTH))
    which = torch.floor((distances - BIN_START) / BIN_WIDTH).long().clamp(0, bins - 1)
    counts = torch.bincount(which, minlength=bins).double()
    counts[int(math.floor(-BIN_START / BIN_WIDTH))] += zeros
    mode = BIN_START + int(counts.argmax()) * BIN_WIDTH
    left, right = distances <= mode, distances > mode
    spreads = []
    for side, zeros_here in ((left, zeros if 0.0 <= mode else 0.0), (right, zeros if 0.0 > mode else 0.0)):
        count = float(side.sum()) + zeros_here
        squares = float((distances[side] - mode).pow(2).sum()) + zeros_here * mode**2
        spreads.append(math.sqrt(squares / count) if count > 0 else 0.0)
    return mode, spreads[0], spreads[1]


def pseudo_labels(distances: torch.Tensor, mode: float, left_std: float, right_std: float, deviations: float):
    """S: +1 where d < m - a sigma_L, -1 where d > m + a sigma_R, 0 elsewhere (a pair left out)."""
    similar = (distances < mode - deviations * left_std).to(distances.dtype)
    dissimilar = (distances > mode + deviations * right_std).to(distances.dtype)
    return similar - dissimilar


def ssdh_loss(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean over all B^2 entries of |S| (v v^T / bits - S)^2, v = continuous codes (B, bits)."""
    inner = codes @ codes.t() / codes.shape[1]
    return (labels.abs() * (inner - labels).pow(2)).mean()


@register_method("ssdh", display_name="SSDH")
class SSDH(HashingMethod):
    """Pairwise loss of tanh codes to pseudo labels from a two-Gaussian fit of reference distances."""

    requires = Requirements(labels=False, reference_features=True)

    hyper_parameters = {
        "deviations": Param(float, Rule(minimum=0.0), "stds from the mode beyond which a pair is labelled"),
        "sample_pairs": Param(int, Rule(minimum=1), "pairs sampled to fit the distance distribution"),
        "seed": Param(int, Rule(minimum=0), "seed of the pair sample"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        deviations: float = 2.0,
        sample_pairs: int = 1_000_000,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.deviations = deviations
        self.sample_pairs = sample_pairs
        self.seed = seed
        self.reference = ReferenceFeatures()
        self.register_buffer("gaussians", torch.zeros(3, dtype=torch.float64))  # (m, sigma_L, sigma_R)

    @torch.no_grad()
    def set_reference_features(self, features: torch.Tensor) -> None:
        if features.dim() == 2 and features.shape[0] != self.num_train:
            raise DmuhError(
                f"method 'ssdh': reference features of {features.shape[0]} items, "
                f"built for {self.num_train} training items"
            )
        self.reference.set(features)
        n = features.shape[0]
        distances = sample_pair_distances(self.reference.all(), self.sample_pairs, self.seed)
        self.gaussians.copy_(torch.tensor(fit_two_gaussians(distances, zeros=distances.numel() / (n - 1))))

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def batch_labels(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, B) pseudo labels of the training items at `indices`."""
        features = self.reference.of(indices.to(self.reference.features.device))
        distances = (1.0 - features @ features.t()).double()
        distances.fill_diagonal_(0.0)  # an item's own distance is 0 (its float16 row is not exactly unit)
        mode, left_std, right_std = self.gaussians.tolist()
        return pseudo_labels(distances, mode, left_std, right_std, self.deviations).float()

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.continuous_codes(step.outputs.float())
        labels = self.batch_labels(step.indices).to(codes.device)
        self.step_stats = {
            "similar_pairs": (labels > 0).float().mean(),
            "dissimilar_pairs": (labels < 0).float().mean(),
        }
        return {"similarity": ssdh_loss(codes, labels)}
