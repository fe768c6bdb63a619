"""FastH (Lin, Shen, Shi, van den Hengel and Suter, CVPR 2014): "Fast Supervised Hashing with
Decision Trees for High-Dimensional Data" (FastHash).

Reference: the authors' MATLAB code ("fasthash" by Guosheng Lin: fasthash_demo.m, fasthash_train.m,
config_train_info.m, gen_loss_info.m, train_step1, do_infer_step1.m, gen_infer_block_multiclass.m,
train_step2.m, cdboost_train.m, gen_quantize_info.m), read for the formulas and defaults, never
copied.

A shallow method: fitted once on backbone features (`fit`), nothing is trained by gradient. Bits
are learnt one after another (the code's `train_stagewise`); bit k (k = 1..bits) is two steps.

Step 1, binary code inference by block GraphCut. With H the (n, k-1) +-1 codes that the trees
of the earlier bits give the training items, a_ij = H_i . H_j, and s_ij = +1 when items i and j
share a label, -1 otherwise (`pairwise_similarity`; multi-label: at least one shared label), bit k
minimises the KSH loss over the first k bits (the code's `KSH` loss, with `update_bit_loss = k`:
the bits learnt so far, not the final bit count)

    sum_{i<j} (k s_ij - a_ij - b_i b_j)^2 / k^2   =   const + sum_{i<j} w_ij b_i b_j,
    w_ij = -4 (k s_ij - a_ij) / k^2,

a binary quadratic problem in b (n,) +-1. w_ij < 0 for every similar pair, so on a block of items
that all share a label the pairwise terms are submodular: with the rest of b fixed (their pairs
with the block become unary terms u_i = sum_{j outside} w_ij b_j) a block is solved exactly by one
min-cut (PyMaxflow, `maxflow.Graph`). Blocks: the items of each label, in seeded random order,
split into near-equal chunks of at most `block_size` (the code's gen_infer_block_multiclass: one
block per class); an item without labels is a block of its own. b starts at all +1 (as the code);
`iterations` sweeps over all blocks, in a seeded random order each sweep. Solving a block exactly
with the others fixed never increases the objective.

Step 2, the hash function: boosted trees fitted to the inferred bit, each item weighted by the
step-1 weight of its pairs, sum_j |w_ij| (the code's `data_weights`, normalised to mean 1), with
`node_features` features tried at each split (the code's "lazy" `tree_node_feat_num`). The trees'
signs on the training items, not the inferred bit, then enter a_ij for the next bits (the code's
`update_bi_code_step2`). The out-of-sample function is a `TreesHead` of all bits' trees: its
forward is the boosted classifiers' decision function, whose sign is the code.

The trees are scikit-learn's HistGradientBoostingClassifier on features quantised once into at
most `bins` per-feature quantile bins (the code quantises to uint8 for its tree learner too), so
every split "bin <= t" is exactly "x <= edge" on the raw features and the head reads raw features.
Why not GradientBoostingClassifier(loss="exponential"), the closer loss: its exact splits cost
193 s per bit against 7 s (200 trees of depth 4, 5,000 x 512 features, one core).

No n x n matrix is formed: sums over all pairs are products with H and, for single-label data,
with the label matrix (S = Y Y^T); multi-label similarity rows are computed `block_size` rows at
a time (O(n^2) time per sweep then, bounded memory). Only a block's own pairs are materialised.

Defaults (the code's fasthash_demo.m / cdboost_train.m unless said): `trees=200` boosting rounds
per bit (max_wl_num), `depth=4` (tree_depth), `node_features=200` (tree_node_feat_num),
`iterations=2` block-GraphCut sweeps (infer_iter_num), `learning_rate=1.0` (no shrinkage, as the
code's line-searched stagewise boosting; 0.1 gave MAP 0.915 against 0.958 on digits with 20 trees),
`block_size=500` (ours, see below), `bins=255` (scikit-learn's most; the code's uint8: 256),
`seed=0`.

Deviations:
- blocks are bounded by `block_size` (the code's block is a whole class, e.g. 1,000 items in its
  MNIST demo); max-flow time grows steeply with a dense block's size, and 500 is one CIFAR-10
  class of the usual 5,000-item training set; a smaller block only makes each exact move smaller;
- the loss is the code's `KSH` (its config default); its demo selects the `Hinge` loss, not
  offered here;
- the boosting: scikit-learn's histogram gradient boosting with the logistic loss (Newton leaf
  values, leaves of at least 20 items, its defaults), not the code's cdboost (exponential loss,
  discrete +-1 trees with line-searched weights, weight trimming mass_weight_thresh=0.99);
- quantile bins, not the code's 256 equal-width bins between each feature's min and max;
- a bit whose inferred values are all equal is fitted to seeded random signs (the code does the
  same, unseeded) and a line in `notes` says so.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.models.heads import TreesHead
from dmuh.utils.schema import Rule


def graphcut_block(pairwise: np.ndarray, unary: np.ndarray) -> np.ndarray:
    """The +-1 vector b minimising sum_{i<j} pairwise_ij b_i b_j + unary . b, exactly, by one min-cut.

    `pairwise` (m, m) symmetric with pairwise_ij <= 0 off the diagonal (submodular; the diagonal is
    ignored). With x = (b + 1) / 2: w b_i b_j = w - 2 w [x_i != x_j], a cut edge of capacity -2 w
    both ways, and u b_i costs u when b_i = +1, -u when b_i = -1 (shifted by |u| to be >= 0)."""
    import maxflow  # imported here: only FastH needs PyMaxflow

    m = len(unary)
    if m == 1:
        return np.where(unary[:1] > 0, -1.0, 1.0)
    rows, cols = np.triu_indices(m, 1)
    capacity = -2.0 * pairwise[rows, cols]
    if capacity.min(initial=0.0) < -1e-9 * max(1.0, np.abs(capacity).max()):
        raise DmuhError("fasth: a GraphCut block has a non-submodular pair (w_ij > 0)")
    capacity = np.maximum(capacity, 0.0)
    graph = maxflow.Graph[float](m, len(capacity))
    nodes = graph.add_grid_nodes(m)
    keep = capacity > 0
    graph.add_edges(nodes[rows[keep]], nodes[cols[keep]], capacity[keep], capacity[keep])
    # A node on the sink side cuts its source edge: the sink side is b = +1, paying max(u, 0) * 2.
    graph.add_grid_tedges(nodes, 2.0 * np.maximum(unary, 0.0), 2.0 * np.maximum(-unary, 0.0))
    graph.maxflow()
    return np.where(graph.get_grid_segments(nodes), 1.0, -1.0)


def block_energy(pairwise: np.ndarray, unary: np.ndarray, b: np.ndarray) -> float:
    """sum_{i<j} pairwise_ij b_i b_j + unary . b (the diagonal of `pairwise` ignored)."""
    return float(0.5 * (b @ pairwise @ b - np.diag(pairwise) @ (b * b)) + unary @ b)


class PairObjective:
    """Bit k's pair weights w_ij = -4 (k s_ij - H_i . H_j) / k^2 and the sums over all pairs they
    need, without an n x n matrix.

    `labels` (n, C) bool; `codes` (n, k-1) +-1 of the earlier bits. Single-label data (at most one
    label per item) has S = Y Y^T, so S v = Y (Y^T v); otherwise rows of S are formed `chunk` at a
    time."""

    def __init__(self, labels: np.ndarray, codes: np.ndarray, chunk: int = 1024):
        self.y = labels.astype(np.float64)
        self.h = codes.astype(np.float64)
        self.k = self.h.shape[1] + 1
        self.n = self.y.shape[0]
        self.chunk = max(int(chunk), 1)
        self.single_label = bool((labels.sum(axis=1) <= 1).all())
        self.has_label = labels.any(axis=1)

    def similarity_rows(self, rows: np.ndarray) -> np.ndarray:
        """S[rows] (len(rows), n) as 0/1 floats: only ever asked for a bounded number of rows."""
        return (self.y[rows] @ self.y.T > 0).astype(np.float64)

    def similarity_times(self, rows: np.ndarray, v: np.ndarray) -> np.ndarray:
        """S[rows] @ v."""
        if self.single_label:
            return self.y[rows] @ (self.y.T @ v)
        return (
            np.concatenate(
                [self.similarity_rows(rows[i : i + self.chunk]) @ v for i in range(0, len(rows), self.chunk)]
            )
            if len(rows)
            else np.zeros((0,) + v.shape[1:])
        )

    def block_weights(self, rows: np.ndarray) -> np.ndarray:
        """W[rows][:, rows] (the diagonal included: the unary terms subtract it with the block)."""
        s = 2.0 * ((self.y[rows] @ self.y[rows].T) > 0) - 1.0
        return -4.0 * (self.k * s - self.h[rows] @ self.h[rows].T) / self.k**2

    def weights_times(self, rows: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(W b)[rows] over all n items (diagonal included), W = -4 (k (2 S - 1) - H H^T) / k^2."""
        s_b = 2.0 * self.similarity_times(rows, b) - b.sum()
        return -4.0 * (self.k * s_b - self.h[rows] @ (self.h.T @ b)) / self.k**2

    def item_weights(self) -> np.ndarray:
        """sum_{j != i} |w_ij| for every item: |k s_ij - a_ij| = k - s_ij a_ij since |a_ij| < k."""
        everyone = np.arange(self.n)
        s_h = 2.0 * self.similarity_times(everyone, self.h) - self.h.sum(axis=0)
        signed = (self.h * s_h).sum(axis=1) - (2.0 * self.has_label - 1.0) * (self.k - 1)
        return 4.0 * (self.k * (self.n - 1) - signed) / self.k**2

    def objective(self, b: np.ndarray) -> float:
        """sum_{i<j} w_ij b_i b_j over all pairs (for tests and diagnostics: O(n^2) time when multi-label)."""
        everyone = np.arange(self.n)
        diagonal = -4.0 * (self.k * (2.0 * self.has_label - 1.0) - (self.k - 1)) / self.k**2
        return float(0.5 * (b @ self.weights_times(everyone, b) - diagonal.sum()))


def label_blocks(labels: np.ndarray, block_size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """The items of each label in random order, split into near-equal chunks of at most
    `block_size`; every item without a label alone. Every pair inside a block shares a label."""
    blocks = []
    for c in range(labels.shape[1]):
        members = rng.permutation(np.flatnonzero(labels[:, c]))
        if len(members):
            blocks.extend(np.array_split(members, -(-len(members) // block_size)))
    blocks.extend(np.array([i]) for i in np.flatnonzero(~labels.any(axis=1)))
    return blocks


def infer_bit(
    pairs: PairObjective,
    blocks: Sequence[np.ndarray],
    iterations: int,
    rng: np.random.Generator,
    initial: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Block GraphCut on bit k's objective: `iterations` sweeps over the blocks (random order each),
    each block solved exactly with the other items fixed; starts from `initial` (default all +1)."""
    b = np.ones(pairs.n) if initial is None else np.asarray(initial, dtype=np.float64).copy()
    for _ in range(iterations):
        for index in rng.permutation(len(blocks)):
            rows = blocks[index]
            within = pairs.block_weights(rows)
            unary = pairs.weights_times(rows, b) - within @ b[rows]  # pairs with items outside the block
            new = graphcut_block(within, unary)
            # The cut is exact; the comparison only keeps float rounding from undoing a sweep's descent.
            if block_energy(within, unary, new) < block_energy(within, unary, b[rows]):
                b[rows] = new
    return b


def quantile_edges(x: np.ndarray, bins: int) -> List[np.ndarray]:
    """Per feature, the distinct quantiles splitting the training values into at most `bins` bins."""
    levels = np.quantile(x.astype(np.float64), np.linspace(0.0, 1.0, bins + 1)[1:-1], axis=0)
    return [np.unique(levels[:, d]) for d in range(x.shape[1])]


def quantize(x: np.ndarray, edges: Sequence[np.ndarray]) -> np.ndarray:
    """Bin indices: code(x) = how many edges lie below x, so code(x) <= m exactly when x <= edges[m]."""
    x = x.astype(np.float64)
    return np.stack([np.searchsorted(e, x[:, d], side="left") for d, e in enumerate(edges)], axis=1).astype(np.float32)


def tree_layout(nodes: np.ndarray, edges: Sequence[np.ndarray]) -> dict:
    """One scikit-learn histogram-boosting tree (its predictor's `nodes` record array, root first, leaf
    values already shrunk by the learning rate), trained on `quantize`d features, in the raw-feature
    `tree_` layout `TreesHead.fitted` reads (x[feature] <= threshold goes left, -1 children at leaves):
    a split code <= t (t a midpoint between integer codes) is x <= edges[floor(t)]."""
    leaf = nodes["is_leaf"].astype(bool)
    # The node indices are unsigned there: widen them before writing -1.
    feature, left, right = (nodes[name].astype(np.int64) for name in ("feature_idx", "left", "right"))
    threshold = np.zeros(len(nodes))
    for node in np.flatnonzero(~leaf):
        threshold[node] = edges[feature[node]][int(np.floor(nodes["num_threshold"][node]))]
    return {
        "feature": np.where(leaf, -2, feature),
        "threshold": threshold,
        "children_left": np.where(leaf, -1, left),
        "children_right": np.where(leaf, -1, right),
        "value": nodes["value"].astype(np.float64),
    }


@register_method("fasth", display_name="FastH")
class FastH(ShallowMethod):
    """Bit by bit: block-GraphCut inference of the bit on the KSH loss, then boosted trees fitted to it."""

    hyper_parameters = {
        "trees": Param(int, Rule(minimum=1), "boosting rounds per bit"),
        "depth": Param(int, Rule(minimum=1), "depth of every tree"),
        "node_features": Param(int, Rule(minimum=1), "features tried per split"),
        "learning_rate": Param(float, Rule(above=0.0), "boosting learning rate"),
        "block_size": Param(int, Rule(minimum=1), "items per block of the code inference (one min-cut each)"),
        "iterations": Param(int, Rule(minimum=1), "sweeps of the code inference over all blocks"),
        "bins": Param(int, Rule(minimum=2, maximum=255), "histogram bins of the trees (at most 255)"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        trees: int = 200,
        depth: int = 4,
        node_features: int = 200,
        learning_rate: float = 1.0,
        block_size: int = 500,
        iterations: int = 2,
        bins: int = 255,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.trees = trees
        self.depth = depth
        self.node_features = node_features
        self.learning_rate = learning_rate
        self.block_size = block_size
        self.iterations = iterations
        self.bins = bins
        self.seed = seed

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> TreesHead:
        # float32, as the network hands features to the head (TreesHead compares them in float64).
        x = self.check_features(features).float().numpy()
        y = (self.check_labels(labels, x.shape[0]) > 0).numpy()
        # Quantised once (the code's uint8 features): histogram trees then never re-bin, and every
        # split maps back to an exact threshold on the raw features.
        edges = quantile_edges(x, self.bins)
        codes_x = quantize(x, edges)
        rng = np.random.default_rng(self.seed)
        blocks = label_blocks(y, self.block_size, rng)
        codes = np.zeros((x.shape[0], 0))
        trees, base = [], []
        self.inferred_codes = np.zeros((x.shape[0], self.bits), dtype=np.int8)  # step-1 bits, for diagnostics
        for k in range(self.bits):
            pairs = PairObjective(y, codes, chunk=self.block_size)
            bit = infer_bit(pairs, blocks, self.iterations, rng)
            self.inferred_codes[:, k] = bit
            weights = pairs.item_weights()
            model = self.fit_trees(codes_x, bit, weights / weights.mean(), k, rng)
            codes = np.concatenate([codes, np.where(model.decision_function(codes_x) >= 0, 1.0, -1.0)[:, None]], axis=1)
            trees.append([tree_layout(predictor.nodes, edges) for (predictor,) in model._predictors])
            base.append(float(np.asarray(model._baseline_prediction).reshape(-1)[0]))
        return TreesHead.fitted(trees, base)

    def fit_trees(self, x: np.ndarray, bit: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator):
        """Bit k's boosted trees: `trees` rounds, full trees of `depth`, `node_features` features per split."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        target = bit > 0
        if target.all() or not target.any():
            # One value for every item: a constant bit carries nothing, so fit random signs (as the code).
            target = rng.random(len(bit)) < 0.5
            self.notes.append(f"{self.name}: bit {k + 1} was inferred constant; fitted to random signs")
        options = dict(
            max_iter=self.trees,
            max_bins=self.bins,
            max_depth=self.depth,
            max_leaf_nodes=None,
            learning_rate=self.learning_rate,
            early_stopping=False,
            random_state=self.seed + k,
        )
        fraction = min(1.0, self.node_features / x.shape[1])
        if fraction < 1.0:
            if "max_features" not in HistGradientBoostingClassifier().get_params():
                raise DmuhError(
                    f"{self.name}: node_features={self.node_features} < {x.shape[1]} features "
                    "needs scikit-learn >= 1.4 (max_features); upgrade it or set node_features large"
                )
            options["max_features"] = fraction
        return HistGradientBoostingClassifier(**options).fit(x, target, sample_weight=weights)
