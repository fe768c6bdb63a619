"""FastH: block GraphCut reaches the exact optimum of its submodular blocks, never climbs, and the
boosted trees (a TreesHead) reproduce the inferred codes; end to end through the CLI."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from dmuh.errors import DmuhError
from dmuh.methods import create_method
from dmuh.methods.fasth import (
    PairObjective,
    block_energy,
    graphcut_block,
    infer_bit,
    label_blocks,
    quantile_edges,
    quantize,
    tree_layout,
)
from dmuh.models.heads import TreesHead, create_head

pytest.importorskip("maxflow")

FAST = {"trees": 5, "node_features": 8}  # few, small trees: the tests check behaviour, not accuracy


def brute_force_minimum(pairwise, unary):
    return min(
        block_energy(pairwise, unary, np.array(b, dtype=float))
        for b in itertools.product((-1.0, 1.0), repeat=len(unary))
    )


def random_codes(rng, n, bits):
    return np.where(rng.random((n, bits)) < 0.5, 1.0, -1.0)


def dense_weights(labels, codes):
    """W (n, n) of bit k = codes.shape[1] + 1 by its definition, diagonal zero, for small checks."""
    k = codes.shape[1] + 1
    s = 2.0 * (labels.astype(float) @ labels.T.astype(float) > 0) - 1.0
    weights = -4.0 * (k * s - codes @ codes.T) / k**2
    np.fill_diagonal(weights, 0.0)
    return weights


@pytest.mark.parametrize("seed", range(4))
def test_graphcut_reaches_the_brute_force_optimum_of_a_submodular_block(seed):
    rng = np.random.default_rng(seed)
    pairwise = -rng.uniform(0.0, 1.0, (8, 8))
    pairwise = (pairwise + pairwise.T) / 2
    unary = rng.normal(scale=2.0, size=8)
    best = graphcut_block(pairwise, unary)
    assert set(best) <= {-1.0, 1.0}
    assert block_energy(pairwise, unary, best) == pytest.approx(brute_force_minimum(pairwise, unary), abs=1e-9)


def test_graphcut_optimum_on_fasth_own_block_objective():
    # 8 items of one class inside 30: the block's pairs and its unary terms from the other 22.
    rng = np.random.default_rng(5)
    labels = np.eye(3, dtype=bool)[np.r_[np.zeros(8, int), rng.integers(0, 3, 22)]]
    pairs = PairObjective(labels, random_codes(rng, 30, 3))
    b = random_codes(rng, 30, 1)[:, 0]
    rows = np.arange(8)
    within = pairs.block_weights(rows)
    assert (within[~np.eye(8, dtype=bool)] < 0).all()  # same-label pairs: submodular
    unary = pairs.weights_times(rows, b) - within @ b[rows]
    best = graphcut_block(within, unary)
    assert block_energy(within, unary, best) == pytest.approx(brute_force_minimum(within, unary), abs=1e-9)
    # The block energy is the whole objective up to a constant of the items outside.
    moved = b.copy()
    moved[rows] = best
    assert pairs.objective(moved) - pairs.objective(b) == pytest.approx(
        block_energy(within, unary, best) - block_energy(within, unary, b[rows]), abs=1e-9
    )


@pytest.mark.parametrize("multi_label", [False, True])
def test_pair_objective_sums_match_the_dense_matrix(multi_label):
    rng = np.random.default_rng(2)
    n = 40
    labels = rng.random((n, 3)) < 0.4 if multi_label else np.eye(3, dtype=bool)[rng.integers(0, 3, n)]
    labels[:2] = False  # items without labels are dissimilar to everyone
    codes = random_codes(rng, n, 4)
    pairs = PairObjective(labels, codes, chunk=7)
    assert pairs.single_label is not multi_label
    weights = dense_weights(labels, codes)
    b = random_codes(rng, n, 1)[:, 0]
    assert pairs.objective(b) == pytest.approx(0.5 * b @ weights @ b)
    assert np.allclose(pairs.item_weights(), np.abs(weights).sum(axis=1))
    rows = np.arange(5, 12)
    assert np.allclose(
        pairs.weights_times(rows, b) - pairs.block_weights(rows) @ b[rows],
        weights[rows] @ b - weights[np.ix_(rows, rows)] @ b[rows],
    )


@pytest.mark.parametrize("multi_label", [False, True])
def test_block_graphcut_never_increases_the_objective(multi_label):
    rng = np.random.default_rng(3)
    n = 60
    labels = rng.random((n, 4)) < 0.35 if multi_label else np.eye(4, dtype=bool)[rng.integers(0, 4, n)]
    pairs = PairObjective(labels, random_codes(rng, n, 2))
    blocks = label_blocks(labels, 6, rng)
    for start in [np.ones(n), random_codes(rng, n, 1)[:, 0]]:
        b, values = start, [pairs.objective(start)]
        for _ in range(3):
            b = infer_bit(pairs, blocks, 1, rng, initial=b)
            values.append(pairs.objective(b))
        assert all(later <= earlier + 1e-9 for earlier, later in zip(values, values[1:]))
        assert values[-1] < values[0]


def test_blocks_share_a_label_are_bounded_and_cover_every_item():
    rng = np.random.default_rng(4)
    labels = rng.random((50, 3)) < 0.4
    labels[:3] = False
    blocks = label_blocks(labels, 7, rng)
    assert max(len(block) for block in blocks) <= 7
    assert set(np.concatenate(blocks)) == set(range(50))
    for block in blocks:
        assert len(block) == 1 or labels[block].all(axis=0).any()  # one label all of them carry
    unlabelled = [block[0] for block in blocks if not labels[block].any()]
    assert sorted(unlabelled) == list(np.flatnonzero(~labels.any(axis=1))) and {0, 1, 2} <= set(unlabelled)


def clustered(n=240, dim=12, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    classes_of = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, dim))[classes_of] * 1.5 + rng.normal(size=(n, dim))
    return torch.from_numpy(x.astype(np.float32)), torch.eye(classes)[classes_of]


def test_trees_on_quantised_features_are_exact_thresholds_on_raw_features():
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    x[:, 3] = np.round(x[:, 3])  # few distinct values: edges between them
    edges = quantile_edges(x, 16)
    model = HistGradientBoostingClassifier(
        max_iter=6,
        max_depth=3,
        max_leaf_nodes=None,
        max_bins=16,
        learning_rate=0.5,
        early_stopping=False,
        random_state=0,
    )
    model.fit(quantize(x, edges), x[:, 0] * x[:, 1] + x[:, 3] > 0)
    head = TreesHead.fitted(
        [[tree_layout(p.nodes, edges) for (p,) in model._predictors]],
        [float(np.asarray(model._baseline_prediction).reshape(-1)[0])],
    )
    unseen = np.concatenate([rng.normal(scale=2.0, size=(200, 4)), x[:50] + 1e-3]).astype(np.float32)
    for inputs in (x, unseen):
        expected = model.decision_function(quantize(inputs, edges))
        assert np.allclose(head(torch.from_numpy(inputs))[:, 0].double().numpy(), expected, atol=1e-5)


def test_fitted_trees_reproduce_the_inferred_codes_and_survive_a_rebuild():
    x, labels = clustered()
    method = create_method("fasth", bits=6, train_labels=labels, **FAST)
    assert method.requirements().shallow
    head = method.fit(x, labels)
    z = head(x)
    assert z.shape == (240, 6)
    codes = torch.where(z >= 0, 1, -1).numpy()
    assert (codes == method.inferred_codes).mean() > 0.9
    # Similar items end up closer in Hamming space than dissimilar ones.
    affinity = codes @ codes.T
    similar = (labels @ labels.t() > 0).numpy()
    assert affinity[similar].mean() > affinity[~similar].mean() + 2
    rebuilt = create_head(head.config)
    rebuilt.load_state_dict(head.state_dict())
    assert torch.equal(rebuilt(x), z)
    again = create_method("fasth", bits=6, train_labels=labels, **FAST).fit(x, labels)
    assert torch.equal(again(x), z)  # seeded: the same fit twice


def test_bad_parameters_and_inputs_are_one_line_errors():
    labels = torch.eye(2)[[0, 1] * 5]
    for params, flagged in [
        ({"trees": 0}, "trees"),
        ({"depth": 1.5}, "depth"),
        ({"block_size": 0}, "block_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"iterations": 0}, "iterations"),
        ({"bins": 300}, "bins"),
        ({"seed": -1}, "seed"),
        ({"node_features": "x"}, "node_features"),
    ]:
        with pytest.raises(DmuhError, match=flagged) as error:
            create_method("fasth", bits=4, train_labels=labels, **params)
        assert "\n" not in str(error.value)
    method = create_method("fasth", bits=4, train_labels=labels, **FAST)
    x = torch.randn(10, 3)
    with pytest.raises(DmuhError, match="NaN"):
        method.fit(torch.where(torch.arange(30).reshape(10, 3) == 4, math.nan, x), labels)
    with pytest.raises(DmuhError, match="n >= 2"):
        method.fit(x[:1], labels[:1])
    with pytest.raises(DmuhError, match="labels"):
        method.fit(x, None)
    with pytest.raises(DmuhError, match="labels"):
        method.fit(x, labels[:4])


DIGITS = [
    "--data",
    "digits",
    "--protocol",
    "digits",
    "--model",
    "smallcnn",
    "--model-param",
    "input_size=8",
    "--model-param",
    "width=16",
    "--bits",
    "16",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--trace-items",
    "0",
    "--quiet",
]


def test_fasth_on_digits_through_the_cli_and_its_checkpoint_rebuilds_the_trees(tmp_path):
    from dmuh.cli import main
    from dmuh.runs.layout import read_log

    out = tmp_path / "x"
    assert main(["train", "--method", "fasth", *DIGITS, "-p", "trees=10", "--out", str(out)]) == 0
    trained = read_log(out / "log.csv")[-1]["map"]
    assert trained > 0.15  # 10 balanced classes: chance is about 0.1
    assert main(["evaluate", "--run", str(out), "--quiet"]) == 0
    assert json.loads((out / "eval.json").read_text())["map"] == pytest.approx(trained, abs=1e-6)


def write_vectors(path, nan=False):
    x, labels = clustered(n=200, dim=16, classes=5, seed=1)
    features = x.numpy()
    if nan:
        features[3, 2] = np.nan
    np.savez(path, features=features, labels=labels.argmax(1).numpy())


VECTORS = [
    "--protocol",
    "per-class",
    "--protocol-param",
    "query_per_class=5",
    "--protocol-param",
    "train_per_class=20",
    "--model",
    "mlp",
    "--model-param",
    "hidden=[]",
    "--bits",
    "8",
    "--quiet",
]


def test_fasth_on_vectors_through_the_cli(tmp_path):
    from dmuh.cli import main
    from dmuh.runs.layout import read_log

    write_vectors(tmp_path / "v.npz")
    out = tmp_path / "v"
    assert (
        main(
            [
                "train",
                "--method",
                "fasth",
                "--data",
                f"features:{tmp_path / 'v.npz'}",
                *VECTORS,
                "-p",
                "trees=5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_log(out / "log.csv")[-1]["map"] > 0.5  # 5 well-separated clusters


@pytest.mark.parametrize(
    "nan, params, message",
    [
        (True, ["-p", "trees=5"], "NaN"),
        (False, ["-p", "trees=0"], "trees"),
        (False, ["-p", "block_size=-3"], "block_size"),
        (False, ["-p", "leaves=3"], "leaves"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, nan, params, message):
    from dmuh.cli import main

    write_vectors(tmp_path / "v.npz", nan=nan)
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--method",
                "fasth",
                "--data",
                f"features:{tmp_path / 'v.npz'}",
                *VECTORS,
                *params,
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
