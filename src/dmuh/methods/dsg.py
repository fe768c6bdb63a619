"""DSG (Luo, Ma, Wu, Zhong, Chen, Ma, Deng, ICME 2021, arXiv 2105.06125): Distilled Smooth Guidance.

An unsupervised method: it never reads a label. It learns from a fixed reference representation
of the training items (`set_reference_features`: the data's vectors, or the backbone's features
of the images when training starts), turned once into pairwise targets S and pair weights W.

What is the paper's, and what is our reading. The official code is not public, so only the
abstract's words are the paper's:
- [paper] "similarity confidence weights based on the initial noisy similarity signals learned
  from local structures", and "a priority loss function for smooth similarity-preserving learning";
- [paper] "global information based on clustering is utilized to distill the image pairs by
  removing contradictory similarity signals".
Everything concrete below is our reading, taken from the same group's public training scripts of
that period (a CIMON-line file whose `generate_similarity_weight_matrix` is exactly this
"confidence + k-means de-contradiction" recipe, without its augmentation and contrastive parts):

1. Initial similarity signal (local structure). d_ij = 1 - cos(f_i, f_j) on the reference features;
   S_ij = +1 if d_ij <= t, else -1. [reading] t is the `similar_fraction` quantile of the pair
   distances (default 0.1: the closest 10% of pairs count as similar, about one pair in ten as
   in a 10-class benchmark), estimated on a seeded random sample of at most `sample_pairs` pairs
   (all pairs when there are fewer). The recipe file sets t by hand per dataset.
2. Confidence ("smooth") weights. m is the mode of the distance histogram (centre of the fullest
   of 100 bins over the sampled distances' range; the recipe uses [0, 1]). One Gaussian is fitted
   to the distances d <= m mirrored about m, one to those d > m mirrored about m, as the recipe's
   `norm.fit`: both have mean m, and std sqrt(mean((d - m)^2)) over their side. With Phi_L, Phi_R
   their CDFs:
     w1(d) = (Phi_L(t) - Phi_L(d)) / Phi_L(t)          for d <= t   (how surely "similar")
     w1(d) = (Phi_R(d) - Phi_R(t)) / (1 - Phi_R(t))    for d >  t   (how surely "dissimilar")
   clipped to [0, 1] (`confidence_weights`): a pair right at the threshold weighs 0, a pair far
   from it weighs up to 1, so the loss is smooth in the threshold.
3. Clustering distillation (global structure). k-means (k-means++, `kmeans_restarts` seeded
   restarts, `seed`) on the unit reference features gives a cluster c_i per training item;
   w2_ij = 0 where S and the clusters contradict (same cluster and S = -1, or different clusters
   and S = +1), else 1 (`distillation_weights`).
4. Priority loss, per mini-batch over its pairs i != j, with v = tanh(z) and W = w1 * w2:
     H = v v^T / bits
     L = sum_{i != j} W_ij (H_ij - S_ij)^2 / B^2   ["similarity"]
       + quantization * mean_ik (v_ik - sign(v_ik))^2   ["quantization", only when > 0]
   [reading] The recipe's sum includes the diagonal (i = j: S = +1, weight ~1, which pulls
   ||v_i||^2 / bits to 1); here it is left out, and the explicit quantisation term stands in for
   it when wanted. The recipe's "priority" is this weighting: the most confident pairs dominate.

Defaults and why: similar_fraction = 0.1 (above); clusters = 10, the number of classes of
CIFAR-10, the benchmark of this family (the recipe file used 70 for a larger dataset): k should be
about the number of semantic groups — fewer clusters drop more S = -1 pairs inside a cluster,
more clusters drop more S = +1 pairs across cluster borders; quantization = 0, since the abstract
names only the priority loss and +-1 targets on H_ij = v_i . v_j / bits already need |v| -> 1
(the recipe file's extra quantisation belongs to its contrastive variant); sample_pairs = 200,000
(the quantile and the Gaussians are estimated from a sample, not all n^2 / 2 pairs; the
sampling error of a 0.1 quantile from 200,000 pairs is about 0.0007 in probability);
kmeans_restarts = 3 (the recipe ran sklearn's old default of 10 restarts; 3 keeps the fit cheap
on 50,000 x 4,096 features).

State: the reference features (`ReferenceFeatures`), the cluster ids (n,), the threshold t and the
Gaussians' (mean, std) pairs are buffers, so a resumed or rebuilt run has the same targets.
"""

from __future__ import annotations

from typing import Dict, Tuple, Union

import torch

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.reference import ReferenceFeatures, sample_pair_distances
from dmuh.utils.schema import Rule

Number = Union[float, torch.Tensor]
HISTOGRAM_BINS = 100
STD_FLOOR = 1e-6  # a Gaussian fitted to one repeated distance
TINY = 1e-12  # guards the divisions of the confidence weights


def fit_half_gaussians(distances: torch.Tensor, bins: int = HISTOGRAM_BINS) -> Tuple[float, float, float]:
    """(mode, left std, right std): m the centre of the fullest histogram bin; a Gaussian of mean m
    fitted to the distances <= m mirrored about m, and one to those > m (maximum likelihood, as
    scipy's norm.fit of the mirrored samples: std = sqrt(mean((d - m)^2)) of that side)."""
    distances = distances.double().flatten()
    low, high = float(distances.min()), float(distances.max())
    if high - low <= 0:
        return low, STD_FLOOR, STD_FLOOR
    counts = torch.histc(distances, bins=bins, min=low, max=high)
    mode = low + (int(counts.argmax()) + 0.5) * (high - low) / bins
    left, right = distances[distances <= mode], distances[distances > mode]
    stds = [float((side - mode).pow(2).mean().sqrt()) if side.numel() else None for side in (left, right)]
    if stds[0] is None:
        stds[0] = stds[1]
    if stds[1] is None:
        stds[1] = stds[0]
    return mode, max(stds[0], STD_FLOOR), max(stds[1], STD_FLOOR)


def confidence_weights(
    distances: torch.Tensor, threshold: Number, left: Tuple[Number, Number], right: Tuple[Number, Number]
) -> torch.Tensor:
    """w1: (Phi_L(t) - Phi_L(d)) / Phi_L(t) for d <= t, (Phi_R(d) - Phi_R(t)) / (1 - Phi_R(t)) for
    d > t, clipped to [0, 1]; `left`, `right` the (mean, std) of the two Gaussians."""
    like = dict(dtype=distances.dtype, device=distances.device)
    t = torch.as_tensor(threshold, **like)
    left_mean, left_std = (torch.as_tensor(x, **like) for x in left)
    right_mean, right_std = (torch.as_tensor(x, **like) for x in right)
    left_cdf = torch.special.ndtr((distances - left_mean) / left_std)
    left_cdf_t = torch.special.ndtr((t - left_mean) / left_std)
    right_cdf = torch.special.ndtr((distances - right_mean) / right_std)
    right_cdf_t = torch.special.ndtr((t - right_mean) / right_std)
    similar = (left_cdf_t - left_cdf) / left_cdf_t.clamp(min=TINY)
    dissimilar = (right_cdf - right_cdf_t) / (1.0 - right_cdf_t).clamp(min=TINY)
    return torch.where(distances <= t, similar, dissimilar).clamp(0.0, 1.0)


def similarity_signal(distances: torch.Tensor, threshold: Number) -> torch.Tensor:
    """S: +1 where d <= t, -1 elsewhere."""
    t = torch.as_tensor(threshold, dtype=distances.dtype, device=distances.device)
    return torch.where(distances <= t, 1.0, -1.0).to(distances.dtype)


def distillation_weights(similarity: torch.Tensor, clusters_a: torch.Tensor, clusters_b: torch.Tensor) -> torch.Tensor:
    """w2: 0 where S contradicts the clusters (same cluster but S = -1, different ones but S = +1), else 1."""
    same = clusters_a[:, None] == clusters_b[None, :]
    return (same == (similarity > 0)).to(similarity.dtype)


def priority_loss(codes: torch.Tensor, similarity: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_{i != j} W_ij (v_i . v_j / bits - S_ij)^2 / B^2 of continuous codes v (B, bits)."""
    batch, bits = codes.shape
    inner = codes @ codes.t() / bits
    off_diagonal = 1.0 - torch.eye(batch, dtype=codes.dtype, device=codes.device)
    return (weights * off_diagonal * (inner - similarity).pow(2)).sum() / batch**2


def kmeans_clusters(features: torch.Tensor, clusters: int, restarts: int, seed: int) -> torch.Tensor:
    """(n,) long cluster ids of k-means (k-means++ starts, seeded) on the rows."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    points = features.float().cpu().numpy()
    with warnings.catch_warnings():  # fewer distinct points than clusters: k-means says so, ids stay valid
        warnings.simplefilter("ignore", ConvergenceWarning)
        ids = KMeans(n_clusters=clusters, init="k-means++", n_init=restarts, random_state=seed).fit_predict(points)
    return torch.from_numpy(ids).long()


@register_method("dsg", display_name="DSG")
class DSG(HashingMethod):
    """Confidence- and cluster-weighted pairwise loss to thresholded reference similarities."""

    requires = Requirements(labels=False, reference_features=True)

    hyper_parameters = {
        "similar_fraction": Param(float, Rule(above=0.0, below=1.0), "fraction of the pairs taken as similar"),
        "clusters": Param(int, Rule(minimum=2), "k-means clusters of the reference"),
        "quantization": Param(float, Rule(minimum=0.0), "weight of the quantisation term"),
        "sample_pairs": Param(int, Rule(minimum=1), "pairs sampled to fit the similarity distributions"),
        "kmeans_restarts": Param(int, Rule(minimum=1), "k-means restarts"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        similar_fraction: float = 0.1,
        clusters: int = 10,
        quantization: float = 0.0,
        sample_pairs: int = 200_000,
        kmeans_restarts: int = 3,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.similar_fraction = similar_fraction
        # One cluster would drop every dissimilar pair, and the codes would collapse.
        self.clusters = clusters
        self.quantization = quantization
        self.sample_pairs = sample_pairs
        self.kmeans_restarts = kmeans_restarts
        self.seed = seed
        self.reference = ReferenceFeatures()
        self.register_buffer("cluster_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("left", torch.ones(2))  # (mean, std) of the Gaussian below the mode
        self.register_buffer("right", torch.ones(2))  # (mean, std) of the Gaussian above it

    @torch.no_grad()
    def set_reference_features(self, features: torch.Tensor) -> None:
        if features.dim() == 2 and features.shape[0] != self.num_train:
            raise DmuhError(
                f"method 'dsg': reference features of {features.shape[0]} items, "
                f"built for {self.num_train} training items"
            )
        if self.clusters > features.shape[0]:
            raise DmuhError(
                f"method parameter clusters={self.clusters}: more clusters than the {features.shape[0]} training items"
            )
        self.reference.set(features)
        unit = self.reference.all()  # the rows the loss will read (float16-rounded)
        distances = sample_pair_distances(unit, self.sample_pairs, self.seed)
        threshold = float(torch.quantile(distances, self.similar_fraction))
        mode, left_std, right_std = fit_half_gaussians(distances)
        self.threshold.fill_(threshold)
        self.left.copy_(torch.tensor([mode, left_std]))
        self.right.copy_(torch.tensor([mode, right_std]))
        self.cluster_ids = kmeans_clusters(unit, self.clusters, self.kmeans_restarts, self.seed).to(
            self.threshold.device
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = state_dict.get(prefix + "cluster_ids")
        if saved is not None:  # its size is the data's, known only from the checkpoint
            self.cluster_ids = torch.zeros(saved.shape, dtype=torch.long, device=self.cluster_ids.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def pair_targets(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(S, W) of the (B, B) pairs of the training items at `indices`."""
        indices = indices.to(self.cluster_ids.device)
        features = self.reference.of(indices)
        distances = (1.0 - features @ features.t()).clamp(0.0, 2.0)
        similarity = similarity_signal(distances, self.threshold)
        confidence = confidence_weights(distances, self.threshold, tuple(self.left), tuple(self.right))
        ids = self.cluster_ids[indices]
        return similarity, confidence * distillation_weights(similarity, ids, ids)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        codes = self.continuous_codes(step.outputs.float())
        similarity, weights = self.pair_targets(step.indices)
        similarity, weights = similarity.to(codes.device), weights.to(codes.device)
        off_diagonal = 1.0 - torch.eye(codes.shape[0], device=codes.device)
        pairs = off_diagonal.sum().clamp(min=1)
        self.step_stats = {
            "similar_pairs": ((similarity > 0).float() * off_diagonal).sum() / pairs,
            "kept_pairs": ((weights > 0).float() * off_diagonal).sum() / pairs,
        }
        terms = {"similarity": priority_loss(codes, similarity, weights)}
        if self.quantization:
            terms["quantization"] = self.quantization * (codes - sign(codes.detach())).pow(2).mean()
        return terms
