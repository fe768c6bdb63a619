"""DSG: confidence weights, clustering distillation, the priority loss, state and the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method
from dmuh.methods.dsg import confidence_weights, distillation_weights, fit_half_gaussians, priority_loss


def phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_confidence_weights_by_hand():
    t, (ml, sl), (mr, sr) = 0.3, (0.55, 0.2), (0.65, 0.25)
    d = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    left_t, right_t = phi((t - ml) / sl), phi((t - mr) / sr)
    expected = [
        (left_t - phi((0.1 - ml) / sl)) / left_t,
        0.0,  # at the threshold: no confidence either way
        (phi((0.5 - mr) / sr) - right_t) / (1 - right_t),
        (phi((0.9 - mr) / sr) - right_t) / (1 - right_t),
    ]
    got = confidence_weights(d, t, (ml, sl), (mr, sr))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert ((got >= 0) & (got <= 1)).all()
    # A threshold far below the left Gaussian: Phi_L(t) underflows, the division is guarded.
    assert torch.isfinite(confidence_weights(d, -50.0, (ml, sl), (mr, sr))).all()


def test_half_gaussians_are_fitted_about_the_mode():
    d = torch.tensor([0.0, 0.5, 0.5, 0.5, 1.0], dtype=torch.float64)
    mode, left, right = fit_half_gaussians(d)
    assert mode == pytest.approx(0.505)  # centre of the fullest of 100 bins on [0, 1]
    assert left == pytest.approx(math.sqrt((0.505**2 + 3 * 0.005**2) / 4))
    assert right == pytest.approx(0.495)


def circle_points(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin(), torch.zeros_like(radians)], dim=1).float()


def test_clustering_removes_exactly_the_contradictory_pairs():
    # Two tight clusters of three points on a circle (0, 4, 20 and 90, 94, 98 degrees). The
    # threshold (the 0.25 quantile of the 15 pairs) falls between 8 and 16 degrees apart, so the
    # 16- and 20-degree pairs inside the first cluster are "dissimilar": contradictions.
    points = circle_points([0, 4, 20, 90, 94, 98])
    method = create_method("dsg", bits=4, train_labels=torch.zeros(6, 0), clusters=2, similar_fraction=0.25)
    method.set_reference_features(points)
    ids = method.cluster_ids
    assert ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5]
    similarity, weights = method.pair_targets(torch.arange(6))

    def zeros_of(matrix):
        return {(i, j) for i in range(6) for j in range(i + 1, 6) if matrix[i, j] == 0}

    assert similarity[0, 1] == 1 and similarity[1, 2] == -1 and similarity[0, 2] == -1
    assert zeros_of(weights) == {(0, 2), (1, 2)}
    assert torch.equal(weights, weights.t())
    # A pair called similar across the clusters is a contradiction too.
    similarity[2, 3] = similarity[3, 2] = 1.0
    assert zeros_of(distillation_weights(similarity, ids, ids)) == {(0, 2), (1, 2), (2, 3)}


def test_priority_loss_by_hand():
    v = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.2, -1.0]])
    s = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    w = torch.tensor([[1.0, 0.5, 1.0], [0.5, 1.0, 0.25], [1.0, 0.25, 1.0]])  # diagonal left out
    # H_01 = 0, H_02 = -0.15, H_12 = -0.55
    expected = 2 * (0.5 * (0 - 1) ** 2 + 1.0 * (-0.15 + 1) ** 2 + 0.25 * (-0.55 + 1) ** 2) / 9
    assert float(priority_loss(v, s, w)) == pytest.approx(expected)
    method = create_method("dsg", bits=2, train_labels=torch.zeros(3, 0))
    method.pair_targets = lambda indices: (s, w)
    outputs = torch.atanh(v.clamp(-0.999999, 0.999999).double()).float()  # tanh(z) = v
    terms = method(StepInputs(outputs=outputs, labels=torch.zeros(3, 0), indices=torch.arange(3)))
    assert float(terms["similarity"]) == pytest.approx(expected, rel=1e-4)


def clustered(n, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=generator) * 3
    labels = torch.arange(n) % 3
    return centres[labels] + 0.3 * torch.randn(n, dim, generator=generator), labels


def test_forward_gradients_and_state_round_trip():
    features, _ = clustered(60, 8, 0)
    method = create_method("dsg", bits=8, train_labels=torch.zeros(60, 0), clusters=3, quantization=0.1)
    method.set_reference_features(features)
    outputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    step = StepInputs(outputs=outputs, labels=torch.zeros(16, 0), indices=torch.arange(16) * 3)
    terms = method(step)
    assert set(terms) == {"similarity", "quantization"}
    loss = sum(terms.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert outputs.grad is not None and outputs.grad.abs().sum() > 0
    fresh = create_method("dsg", bits=8, train_labels=torch.zeros(60, 0), clusters=3, quantization=0.1)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.cluster_ids, method.cluster_ids)
    again = sum(fresh(StepInputs(outputs=outputs.detach(), labels=torch.zeros(16, 0), indices=step.indices)).values())
    assert float(again) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_bad_hyper_parameters_are_named():
    for params, name in [
        ({"clusters": 0}, "clusters"),
        ({"similar_fraction": 1.0}, "similar_fraction"),
        ({"quantization": -1}, "quantization"),
        ({"sample_pairs": 0}, "sample_pairs"),
    ]:
        with pytest.raises(DmuhError, match=name):
            create_method("dsg", bits=8, train_labels=torch.zeros(4, 0), **params)
    method = create_method("dsg", bits=8, train_labels=torch.zeros(4, 0), clusters=5)
    with pytest.raises(DmuhError, match="clusters=5"):
        method.set_reference_features(torch.randn(4, 3))


def test_train_and_evaluate_through_the_cli(tmp_path, capsys):
    features, labels = clustered(120, 16, 2)
    unlabeled, labeled = tmp_path / "x.npz", tmp_path / "xy.npz"
    np.savez(unlabeled, features=features.numpy())
    np.savez(labeled, features=features.numpy(), labels=labels.numpy())
    run = tmp_path / "run"
    common = [
        "train",
        "--method",
        "dsg",
        "--data",
        str(unlabeled),
        "--protocol",
        "unsupervised",
        "--protocol-param",
        "query=20",
        "--model",
        "mlp",
        "--model-param",
        "hidden=[]",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--bits",
        "8",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main([*common, "--out", str(run), "-p", "clusters=3"]) == 0
    assert main(["evaluate", "--run", str(run), "--data", str(labeled)]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert math.isfinite(report["map"]) and 0.0 <= report["map"] <= 1.0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "-p", "clusters=0"]) == 2
    assert "clusters=0" in capsys.readouterr().err
