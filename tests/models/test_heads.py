"""Fitted hash heads: each computes what it says, survives a checkpoint rebuild, and the loop installs it."""

import numpy as np
import pytest
import torch

from dmuh.errors import DmuhError
from dmuh.models import create_model
from dmuh.models.heads import RBFHead, TreesHead, create_head


def test_rbf_head_is_a_linear_map_of_gaussian_kernel_features():
    anchors = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5]])
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
    bias = torch.tensor([0.25, -1.0])
    head = RBFHead.fitted(anchors, 1.5, weight, bias)
    x = torch.tensor([[0.5, 1.0], [2.0, -1.0]])
    by_hand = torch.stack(
        [torch.tensor([float(np.exp(-float(((xi - a) ** 2).sum()) / (2 * 1.5**2))) for a in anchors]) for xi in x]
    )
    assert torch.allclose(head(x), by_hand @ weight.t() + bias, atol=1e-6)
    assert head.config == {"kind": "rbf", "feature_dim": 2, "anchors": 3, "bits": 2}


def test_trees_head_predicts_what_scikit_learn_boosted_trees_predict():
    from sklearn.ensemble import GradientBoostingRegressor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    targets = [np.sign(x[:, 0] * x[:, 1]), np.sign(x[:, 2] + 0.3 * x[:, 3])]
    trees, base, models = [], [], []
    for y in targets:
        model = GradientBoostingRegressor(n_estimators=7, max_depth=3, learning_rate=0.3, random_state=0).fit(x, y)
        models.append(model)
        base.append(float(model.init_.constant_.reshape(-1)[0]))
        trees.append(
            [
                {
                    "feature": e.tree_.feature,
                    "threshold": e.tree_.threshold,
                    "children_left": e.tree_.children_left,
                    "children_right": e.tree_.children_right,
                    "value": e.tree_.value.reshape(-1) * model.learning_rate,
                }
                for e in model.estimators_[:, 0]
            ]
        )
    head = TreesHead.fitted(trees, base)
    expected = np.stack([m.predict(x) for m in models], axis=1)
    assert np.allclose(head(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
    rebuilt = create_head(head.config)
    rebuilt.load_state_dict(head.state_dict())
    assert torch.equal(rebuilt(torch.from_numpy(x)), head(torch.from_numpy(x)))


def test_a_network_with_an_installed_head_rebuilds_from_its_config():
    model = create_model("mlp", bits=2, input_dim=2, hidden=[])
    head = RBFHead.fitted(torch.randn(4, 2), 0.7, torch.randn(2, 4), torch.randn(2))
    model.install_head(head)
    x = torch.randn(5, 2)
    rebuilt = create_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    assert torch.allclose(model(x), head(model.features(x)))


def test_a_bad_head_config_is_one_line_error():
    with pytest.raises(DmuhError, match="hash head"):
        create_head({"kind": "rbf", "feature_dim": 0, "anchors": 3, "bits": 2})
    with pytest.raises(DmuhError):
        create_head({"kind": "nope"})
    with pytest.raises(DmuhError, match="kind"):
        create_head(["rbf"])


def test_fitted_heads_export_to_onnx_with_a_free_batch_size(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from sklearn.ensemble import GradientBoostingRegressor

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    trees, base = [], []
    for k in range(2):
        model = GradientBoostingRegressor(n_estimators=3, max_depth=2, random_state=k).fit(x, np.sign(x[:, k]))
        base.append(float(model.init_.constant_.reshape(-1)[0]))
        trees.append(
            [
                {
                    "feature": e.tree_.feature,
                    "threshold": e.tree_.threshold,
                    "children_left": e.tree_.children_left,
                    "children_right": e.tree_.children_right,
                    "value": e.tree_.value.reshape(-1) * model.learning_rate,
                }
                for e in model.estimators_[:, 0]
            ]
        )
    heads = {
        "trees": TreesHead.fitted(trees, base),
        "rbf": RBFHead.fitted(torch.randn(4, 3), 0.9, torch.randn(2, 4), torch.randn(2)),
    }
    for kind, head in heads.items():
        network = create_model("mlp", bits=2, input_dim=3, hidden=[])
        network.install_head(head)
        network.eval()
        path = tmp_path / f"{kind}.onnx"
        torch.onnx.export(
            network,
            (torch.zeros(2, 3),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["z"],
            dynamic_axes={"x": {0: "batch"}, "z": {0: "batch"}},
        )
        session = onnxruntime.InferenceSession(str(path))
        batch = x[:7]
        got = session.run(None, {"x": batch})[0]
        assert np.allclose(got, network(torch.from_numpy(batch)).detach().numpy(), atol=1e-5), kind
