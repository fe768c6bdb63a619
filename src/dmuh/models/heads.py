"""Fitted hash heads: the out-of-sample functions of shallow methods that are not one linear layer.

A shallow method (`dmuh.methods.shallow.ShallowMethod`) fits its hash function once on backbone
features. When that function is linear, `fit` returns (weight, bias) and the loop copies them into
the network's `hash_layer`. When it is not (SDH's RBF kernel map, FastH's boosted trees), `fit`
returns a head from this registry; the loop installs it (`HashNetwork.install_head`) and the
network's forward then computes raw codes z = head(features) in place of the hash layer. A head
holds only tensors (buffers), so it is saved in the checkpoint's safetensors like any weight, and
`head.config` (its kind and sizes, plain values) is recorded in the network's `model.config`, so
`create_model(**model_config)` rebuilds an empty head of the right shape that the checkpoint fills.
Heads run in plain torch ops, so `dmuh export-onnx` exports them with the network.

A new head: a module whose constructor takes plain sizes only, whose state is buffers, and whose
`config` returns {"kind": name, **those sizes}; register it with `@register_head(name)`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dmuh.errors import DmuhError
from dmuh.utils.registry import Registry

HEADS = Registry("hash head", option_word="option")


def register_head(name: str):
    """Class decorator registering a fitted hash head under `name`."""
    return HEADS.register(name)


def create_head(config: Mapping[str, Any]) -> nn.Module:
    """An empty head (zero buffers of the right shapes) from its recorded `config`."""
    if not isinstance(config, Mapping) or "kind" not in config:
        raise DmuhError(f"hash head: expected a mapping with a 'kind', got {config!r}")
    options = {key: value for key, value in config.items() if key != "kind"}
    return HEADS.create(str(config["kind"]), {}, options)


def squared_distances(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """||x_i - a_k||^2 (N, m) by the expansion ||x||^2 - 2 x.a + ||a||^2 (one matmul), clamped at 0
    against rounding."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ anchors.t() + (anchors * anchors).sum(1)).clamp(min=0)


def _size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DmuhError(f"hash head: {name} must be an integer >= {minimum}, got {value!r}")
    return value


@register_head("rbf")
class RBFHead(nn.Module):
    """z = W phi(x) + b, phi_k(x) = exp(-||x - a_k||^2 / (2 sigma^2)) over m anchors a_k (SDH's
    kernel features; the bias is SDH's constant feature column)."""

    def __init__(self, feature_dim: int, anchors: int, bits: int):
        super().__init__()
        self.feature_dim, self.num_anchors, self.bits = (
            _size("feature_dim", feature_dim),
            _size("anchors", anchors),
            _size("bits", bits),
        )
        self.register_buffer("anchors", torch.zeros(self.num_anchors, self.feature_dim))
        self.register_buffer("sigma", torch.ones(()))
        self.register_buffer("weight", torch.zeros(self.bits, self.num_anchors))
        self.register_buffer("bias", torch.zeros(self.bits))

    @classmethod
    def fitted(cls, anchors: torch.Tensor, sigma: float, weight: torch.Tensor, bias: torch.Tensor) -> "RBFHead":
        head = cls(int(anchors.shape[1]), int(anchors.shape[0]), int(weight.shape[0]))
        with torch.no_grad():
            head.anchors.copy_(anchors)
            head.sigma.fill_(float(sigma))
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        return head

    def kernel_features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x), (N, m)."""
        squared = squared_distances(x.to(self.anchors.dtype), self.anchors)
        return torch.exp(-squared / (2 * self.sigma * self.sigma))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.kernel_features(features) @ self.weight.t() + self.bias

    @property
    def config(self) -> Dict[str, Any]:
        return {"kind": "rbf", "feature_dim": self.feature_dim, "anchors": self.num_anchors, "bits": self.bits}


@register_head("trees")
class TreesHead(nn.Module):
    """z_k = base_k + sum_t value_k,t[leaf of x in tree (k, t)]: `trees` regression trees per bit,
    each stored as arrays over at most `nodes` nodes (scikit-learn's `tree_` layout): node i tests
    x[feature_i] <= threshold_i and goes to left_i or right_i; a leaf points to itself on both
    sides, so `depth` descents from the root end at every input's leaf."""

    def __init__(self, bits: int, trees: int, nodes: int, depth: int):
        super().__init__()
        self.bits, self.trees, self.nodes = _size("bits", bits), _size("trees", trees), _size("nodes", nodes)
        self.depth = _size("depth", depth, minimum=0)
        shape = (self.bits, self.trees, self.nodes)
        self.register_buffer("feature", torch.zeros(shape, dtype=torch.long))
        # float64: scikit-learn compares float32 inputs with float64 thresholds (midpoints between
        # float32 values); a float32 threshold could round onto a training value and flip a test.
        self.register_buffer("threshold", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("left", torch.zeros(shape, dtype=torch.long))
        self.register_buffer("right", torch.zeros(shape, dtype=torch.long))
        self.register_buffer("value", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("base", torch.zeros(self.bits, dtype=torch.float64))

    @classmethod
    def fitted(cls, trees: Sequence[Sequence[Mapping[str, np.ndarray]]], base: Sequence[float]) -> "TreesHead":
        """From trees[k][t] in scikit-learn's `tree_` layout (arrays `feature`, `threshold`,
        `children_left`, `children_right` with -1 at leaves, and `value` (nodes,), already scaled
        by any learning rate) and the per-bit constant `base`."""
        bits, count = len(trees), max(len(per_bit) for per_bit in trees)
        nodes = max(len(tree["feature"]) for per_bit in trees for tree in per_bit)
        depth = max(_tree_depth(tree) for per_bit in trees for tree in per_bit)
        head = cls(bits, max(count, 1), max(nodes, 1), depth)
        # Padding: a missing tree is one leaf of value 0; a node past a tree's end is a leaf too.
        node_ids = torch.arange(head.nodes).expand(bits, head.trees, head.nodes)
        left, right = node_ids.clone(), node_ids.clone()
        with torch.no_grad():
            for k, per_bit in enumerate(trees):
                for t, tree in enumerate(per_bit):
                    size = len(tree["feature"])
                    leaf = np.asarray(tree["children_left"]) < 0
                    own = np.arange(size)
                    left[k, t, :size] = torch.from_numpy(np.where(leaf, own, tree["children_left"]).astype(np.int64))
                    right[k, t, :size] = torch.from_numpy(np.where(leaf, own, tree["children_right"]).astype(np.int64))
                    head.feature[k, t, :size] = torch.from_numpy(np.where(leaf, 0, tree["feature"]).astype(np.int64))
                    head.threshold[k, t, :size] = torch.from_numpy(np.asarray(tree["threshold"], dtype=np.float64))
                    head.value[k, t, :size] = torch.from_numpy(np.asarray(tree["value"], dtype=np.float64).reshape(-1))
            head.left.copy_(left)
            head.right.copy_(right)
            head.base.copy_(torch.as_tensor(list(base), dtype=torch.float64))
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = features.shape[0]
        x = features.to(self.threshold.dtype)
        flat = self.bits * self.trees
        feature, threshold = self.feature.reshape(flat, self.nodes), self.threshold.reshape(flat, self.nodes)
        left, right = self.left.reshape(flat, self.nodes), self.right.reshape(flat, self.nodes)
        node = torch.zeros(flat, n, dtype=torch.long, device=features.device)
        columns = torch.arange(n, device=features.device).expand(flat, n)
        for _ in range(self.depth):
            tested = torch.gather(feature, 1, node)  # (flat, n): the feature each input's node tests
            value = x.t()[tested, columns]  # (flat, n): x_j[tested feature]
            node = torch.where(
                value <= torch.gather(threshold, 1, node), torch.gather(left, 1, node), torch.gather(right, 1, node)
            )
        leaf_values = torch.gather(self.value.reshape(flat, self.nodes), 1, node)  # (flat, n)
        return (leaf_values.reshape(self.bits, self.trees, n).sum(1).t() + self.base).to(features.dtype)

    @property
    def config(self) -> Dict[str, Any]:
        return {"kind": "trees", "bits": self.bits, "trees": self.trees, "nodes": self.nodes, "depth": self.depth}


def _tree_depth(tree: Mapping[str, np.ndarray]) -> int:
    """Edges on the longest root-to-leaf path of a tree in scikit-learn's layout."""
    left, right = np.asarray(tree["children_left"]), np.asarray(tree["children_right"])
    depth, frontier = 0, [0]
    while True:
        frontier = [child for node in frontier for child in (left[node], right[node]) if child >= 0]
        if not frontier:
            return depth
        depth += 1


# -- heads of the shallow classics of the toolkits (issue #33) -------------------------------------


@register_head("cosine")
class CosineHead(nn.Module):
    """z_k = amplitude cos(w_k . x + phase_k) + offset_k: random Fourier features thresholded at
    random offsets (SKLSH, Raginsky and Lazebnik, NIPS 2009)."""

    def __init__(self, feature_dim: int, bits: int):
        super().__init__()
        self.feature_dim, self.bits = _size("feature_dim", feature_dim), _size("bits", bits)
        self.register_buffer("weight", torch.zeros(self.bits, self.feature_dim))
        self.register_buffer("phase", torch.zeros(self.bits))
        self.register_buffer("amplitude", torch.ones(()))
        self.register_buffer("offset", torch.zeros(self.bits))

    @classmethod
    def fitted(cls, weight: torch.Tensor, phase: torch.Tensor, amplitude: float, offset: torch.Tensor) -> "CosineHead":
        head = cls(int(weight.shape[1]), int(weight.shape[0]))
        with torch.no_grad():
            head.weight.copy_(weight)
            head.phase.copy_(phase)
            head.amplitude.fill_(float(amplitude))
            head.offset.copy_(offset)
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.cos(features @ self.weight.t() + self.phase) + self.offset

    @property
    def config(self) -> Dict[str, Any]:
        return {"kind": "cosine", "feature_dim": self.feature_dim, "bits": self.bits}


@register_head("spectral")
class SpectralHead(nn.Module):
    """z_k = prod_j cos(omega_kj p_j), p = P x + shift: the analytical eigenfunctions of a uniform
    distribution on a box in the principal subspace (spectral hashing, Weiss et al., NIPS 2008;
    compressSH.m's sin(p omega + pi/2) is this cosine)."""

    def __init__(self, feature_dim: int, dims: int, bits: int):
        super().__init__()
        self.feature_dim, self.dims, self.bits = (
            _size("feature_dim", feature_dim),
            _size("dims", dims),
            _size("bits", bits),
        )
        self.register_buffer("projection", torch.zeros(self.dims, self.feature_dim))
        self.register_buffer("shift", torch.zeros(self.dims))
        self.register_buffer("omegas", torch.zeros(self.bits, self.dims))

    @classmethod
    def fitted(cls, projection: torch.Tensor, shift: torch.Tensor, omegas: torch.Tensor) -> "SpectralHead":
        head = cls(int(projection.shape[1]), int(projection.shape[0]), int(omegas.shape[0]))
        with torch.no_grad():
            head.projection.copy_(projection)
            head.shift.copy_(shift)
            head.omegas.copy_(omegas)
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = features @ self.projection.t() + self.shift  # (N, dims)
        return torch.cos(projected.unsqueeze(1) * self.omegas).prod(dim=2)  # (N, bits)

    @property
    def config(self) -> Dict[str, Any]:
        return {"kind": "spectral", "feature_dim": self.feature_dim, "dims": self.dims, "bits": self.bits}


@register_head("anchor-embedding")
class AnchorEmbeddingHead(nn.Module):
    """z = sum over the k nearest anchors a_j of w_j e_j, w = softmax(-||x - a_j||^2 / bandwidth)
    over those k: the inductive out-of-sample map of IMH (Shen et al., CVPR 2013) from an embedding
    e_j of each anchor (its t-SNE coordinates)."""

    def __init__(self, feature_dim: int, anchors: int, bits: int, neighbours: int):
        super().__init__()
        self.feature_dim, self.num_anchors, self.bits = (
            _size("feature_dim", feature_dim),
            _size("anchors", anchors),
            _size("bits", bits),
        )
        self.neighbours = min(_size("neighbours", neighbours), self.num_anchors)
        self.register_buffer("anchors", torch.zeros(self.num_anchors, self.feature_dim))
        self.register_buffer("embedding", torch.zeros(self.num_anchors, self.bits))
        self.register_buffer("bandwidth", torch.ones(()))

    @classmethod
    def fitted(
        cls, anchors: torch.Tensor, embedding: torch.Tensor, neighbours: int, bandwidth: float
    ) -> "AnchorEmbeddingHead":
        head = cls(int(anchors.shape[1]), int(anchors.shape[0]), int(embedding.shape[1]), int(neighbours))
        with torch.no_grad():
            head.anchors.copy_(anchors)
            head.embedding.copy_(embedding)
            head.bandwidth.fill_(float(bandwidth))
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        squared = squared_distances(features.to(self.anchors.dtype), self.anchors)
        nearest, index = torch.topk(squared, self.neighbours, dim=1, largest=False)
        # softmax: exp(-d / bandwidth) normalised over the k, without the underflow of exp(-d / bandwidth) itself
        weights = torch.softmax(-nearest / self.bandwidth, dim=1)
        return (weights.unsqueeze(2) * self.embedding[index]).sum(dim=1)

    @property
    def config(self) -> Dict[str, Any]:
        return {
            "kind": "anchor-embedding",
            "feature_dim": self.feature_dim,
            "anchors": self.num_anchors,
            "bits": self.bits,
            "neighbours": self.neighbours,
        }
