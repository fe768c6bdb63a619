"""SDH and LFH (shallow supervised hashing) against hand-computed and numpy cases, and through the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from dmuh.errors import DmuhError
from dmuh.methods import create_method, display_name
from dmuh.methods.lfh import log_posterior, ridge_extension
from dmuh.methods.sdh import dcc, dcc_objective, ridge
from dmuh.models.heads import RBFHead


def clusters(n=240, dim=6, classes=3, seed=0, spread=3.0):
    """Gaussian classes: features (n, dim), one-hot labels (n, classes)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=generator) * spread
    cls = torch.arange(n) % classes
    return means[cls] + torch.randn(n, dim, generator=generator), torch.eye(classes)[cls]


def test_registered_with_their_display_names():
    assert display_name("sdh") == "SDH" and display_name("lfh") == "LFH"
    for name in ("sdh", "lfh"):
        method = create_method(name, bits=8, num_train=4, num_classes=2)
        assert method.requirements().shallow
        with pytest.raises(DmuhError, match="fitted once on backbone features"):
            method(None)


# --- SDH --------------------------------------------------------------------------------------


def test_sdh_dcc_b_step_never_increases_its_objective():
    generator = torch.Generator().manual_seed(3)
    n, bits, classes = 50, 6, 4
    y = torch.eye(classes, dtype=torch.float64)[torch.randint(0, classes, (n,), generator=generator)]
    weight = torch.randn(bits, classes, generator=generator, dtype=torch.float64)
    q = 1e-2 * torch.randn(n, bits, generator=generator, dtype=torch.float64) + y @ weight.t()
    start = torch.randn(n, bits, generator=generator, dtype=torch.float64).sign()
    trace = [dcc_objective(start, weight, q)]
    codes = dcc(start, weight, q, sweeps=10, trace=trace)
    assert all(b <= a + 1e-9 for a, b in zip(trace, trace[1:]))
    assert trace[-1] < trace[0]
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    # every column is the exact minimiser given the others: flipping any one bit does not help
    final = dcc_objective(codes, weight, q)
    for i, k in [(0, 0), (7, 3), (49, 5)]:
        flipped = codes.clone()
        flipped[i, k] *= -1
        assert dcc_objective(flipped, weight, q) >= final - 1e-9
    # the objective is ||Y - BW||^2 + nu ||B - F||^2 up to a constant over +-1 codes
    nu, f = 0.3, torch.randn(n, bits, generator=generator, dtype=torch.float64)
    q2 = nu * f + y @ weight.t()
    full = lambda b: float((y - b @ weight).pow(2).sum() + nu * (b - f).pow(2).sum())  # noqa: E731
    assert full(codes) - dcc_objective(codes, weight, q2) == pytest.approx(
        full(start) - dcc_objective(start, weight, q2)
    )


def test_sdh_f_and_g_steps_are_numpy_ridge_regressions():
    rng = np.random.default_rng(0)
    phi, codes, lam = rng.normal(size=(40, 7)), np.sign(rng.normal(size=(40, 3))), 0.01
    augmented = np.vstack([phi, math.sqrt(lam) * np.eye(7)])
    expected = np.linalg.lstsq(augmented, np.vstack([codes, np.zeros((7, 3))]), rcond=None)[0]
    got = ridge(torch.from_numpy(phi), torch.from_numpy(codes), lam)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    gram = torch.from_numpy(phi.T @ phi)
    np.testing.assert_allclose(
        ridge(torch.from_numpy(phi), torch.from_numpy(codes), lam, gram).numpy(), expected, atol=1e-10
    )


def test_sdh_kernel_map_is_the_rbf_heads_with_a_bias_column():
    x, y = clusters(n=30)
    sdh = create_method("sdh", bits=4, train_labels=y, anchors=5, sigma=2.0)
    index = sdh.choose_anchors(x.double())
    assert len(index) == 5 and len(set(index.tolist())) == 5
    phi = sdh.kernel_map(x.double(), x.double()[index], 2.0)
    by_hand = torch.exp(-((x.double()[:, None] - x.double()[index][None]) ** 2).sum(-1) / 8)
    torch.testing.assert_close(phi[:, :-1], by_hand)
    assert torch.all(phi[:, -1] == 1)
    head = RBFHead.fitted(x[index], 2.0, torch.eye(4, 5), torch.zeros(4))
    torch.testing.assert_close(head.kernel_features(x).double(), by_hand, atol=1e-5, rtol=0)


def test_sdh_sigma_rules():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [10.0, 0.0]], dtype=torch.float64)
    y = torch.eye(2)[[0, 0, 1, 1]]
    sdh = create_method("sdh", bits=2, train_labels=y)  # 1000 anchors: all 4 items
    index = sdh.choose_anchors(x)
    assert sorted(index.tolist()) == [0, 1, 2, 3]
    # each item to its nearest *other* anchor: 3, 3, 4, 7
    assert sdh.kernel_width(x, index) == pytest.approx((3 + 3 + 4 + 7) / 4)
    mean = create_method("sdh", bits=2, train_labels=y, sigma="mean")
    squared = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert mean.kernel_width(x, index) == pytest.approx(float(squared.mean()) ** 0.5)
    assert create_method("sdh", bits=2, train_labels=y, sigma=0.7).kernel_width(x, index) == 0.7


def test_sdh_fit_returns_an_rbf_head_that_reproduces_its_training_codes():
    x, y = clusters()
    sdh = create_method("sdh", bits=12, train_labels=y, anchors=60)
    head = sdh.fit(x, y)
    assert isinstance(head, RBFHead) and head.config == {"kind": "rbf", "feature_dim": 6, "anchors": 60, "bits": 12}
    z = head(x)
    agree = (torch.where(z >= 0, 1.0, -1.0).double() == sdh.fitted_codes).double().mean()
    assert agree > 0.9
    # the codes follow the classes: items of a class share most bits
    for c in range(3):
        rows = sdh.fitted_codes[y[:, c] == 1]
        assert (rows == rows.mean(0).sign()).double().mean() > 0.9
    again = create_method("sdh", bits=12, train_labels=y, anchors=60).fit(x, y)
    torch.testing.assert_close(again.weight, head.weight)
    other = create_method("sdh", bits=12, train_labels=y, anchors=60, seed=1).fit(x, y)
    assert not torch.equal(other.anchors, head.anchors)


# --- LFH --------------------------------------------------------------------------------------


def test_lfh_full_update_never_decreases_the_log_posterior():
    x, y = clusters(n=45)
    y[0, 1] = 1.0  # one multi-label item
    lfh = create_method("lfh", bits=6, train_labels=y, columns=64, iterations=6)  # n <= columns: LFH-Full
    start = lfh.initial_factors(45)
    trace = [log_posterior(start, y, lfh.beta)]
    u = lfh.factorise(y, trace)
    assert all(b >= a - 1e-9 for a, b in zip(trace, trace[1:]))
    assert trace[-1] > trace[0]
    codes = u.sign()
    same = y @ y.t() > 0
    hamming = (codes.shape[1] - codes @ codes.t()) / 2
    assert hamming[same].mean() < hamming[~same].mean()


def test_lfh_log_posterior_by_chunks_is_the_dense_one():
    x, y = clusters(n=20)
    u = torch.randn(20, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = u @ u.t() / 2
    s = (y @ y.t() > 0).double()
    terms = s * theta - torch.log1p(torch.exp(theta))
    dense = float(terms.sum() - terms.diagonal().sum()) - float(u.pow(2).sum()) / (2 * 3.0)
    assert log_posterior(u, y, 3.0) == pytest.approx(dense)


def test_lfh_out_of_sample_is_numpy_ridge_with_an_unpenalised_bias():
    rng = np.random.default_rng(1)
    x, codes, lam = rng.normal(size=(50, 5)) + 3.0, np.sign(rng.normal(size=(50, 4))), 2.0
    weight, bias = ridge_extension(torch.from_numpy(x), torch.from_numpy(codes), lam)
    # minimise ||X W + 1 b - B||^2 + lam ||W||^2 (b free): lstsq on [X 1; sqrt(lam) I 0]
    design = np.vstack([np.hstack([x, np.ones((50, 1))]), np.hstack([math.sqrt(lam) * np.eye(5), np.zeros((5, 1))])])
    solution = np.linalg.lstsq(design, np.vstack([codes, np.zeros((5, 4))]), rcond=None)[0]
    np.testing.assert_allclose(weight.numpy(), solution[:5].T, atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), solution[5], atol=1e-10)


def test_lfh_stochastic_fit_is_seeded_and_follows_the_classes():
    x, y = clusters(n=300)
    lfh = create_method("lfh", bits=8, train_labels=y, columns=32)  # n > columns: LFH-Stochastic
    weight, bias = lfh.fit(x, y)
    assert weight.shape == (8, 6) and bias.shape == (8,)
    codes = lfh.fitted_factors.sign()
    for c in range(3):
        rows = codes[y[:, c] == 1]
        assert (rows == rows.mean(0).sign()).double().mean() > 0.8
    again = create_method("lfh", bits=8, train_labels=y, columns=32).fit(x, y)
    torch.testing.assert_close(again[0], weight)
    other = create_method("lfh", bits=8, train_labels=y, columns=32, seed=5).fit(x, y)
    assert not torch.allclose(other[0], weight)


# --- bad parameters and input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, flagged",
    [
        ("sdh", {"anchors": 0}, "anchors"),
        ("sdh", {"sigma": "wide"}, "sigma"),
        ("sdh", {"sigma": -1.0}, "sigma"),
        ("sdh", {"nu": float("nan")}, "nu"),
        ("sdh", {"g_lambda": 0}, "g_lambda"),
        ("sdh", {"dcc_iter": 1.5}, "dcc_iter"),
        ("sdh", {"seed": -1}, "seed"),
        ("lfh", {"beta": 0}, "beta"),
        ("lfh", {"columns": 0}, "columns"),
        ("lfh", {"iterations": -1}, "iterations"),
        ("lfh", {"lam": "much"}, "lam"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_them(name, params, flagged):
    with pytest.raises(DmuhError, match=f"parameter {flagged}=") as error:
        create_method(name, bits=8, train_labels=torch.eye(3), **params)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["sdh", "lfh"])
def test_bad_input_is_a_one_line_error(name):
    x, y = clusters(n=30)
    method = create_method(name, bits=8, train_labels=y)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DmuhError, match=f"{name}: the features contain NaN"):
        method.fit(bad, y)
    with pytest.raises(DmuhError, match=f"{name}: 5 training items for bits=8"):
        method.fit(x[:5], y[:5])
    with pytest.raises(DmuhError, match="needs labels of shape"):
        method.fit(x, y[:10])


# --- through the CLI --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdh", "lfh"])
def test_training_on_digits_through_the_cli_and_evaluate_agrees(tmp_path, name, capsys):
    from dmuh.cli import main
    from dmuh.runs.layout import read_log

    out = tmp_path / name
    assert (
        main(
            [
                "train",
                "--method",
                name,
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
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = read_log(out / "log.csv")[-1]
    assert math.isfinite(row["map"]) and row["map"] > 0.15  # 10 balanced classes: chance is about 0.1
    # the checkpoint rebuilds the fitted function (SDH's RBF head, LFH's linear layer)
    assert main(["evaluate", "--run", str(out), "--quiet"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["map"] == pytest.approx(row["map"], abs=1e-6)


def write_vectors(path, nan=False):
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = digits.data[:400].astype(np.float32)
    if nan:
        features[7, 3] = np.nan
    np.savez(path, features=features, labels=digits.target[:400])


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
    "16",
    "--epochs",
    "1",
    "--quiet",
]


@pytest.mark.parametrize("name", ["sdh", "lfh"])
def test_training_on_feature_vectors(tmp_path, name):
    from dmuh.cli import main
    from dmuh.runs.layout import read_log

    write_vectors(tmp_path / "feat.npz")
    out = tmp_path / name
    assert (
        main(["train", "--method", name, "--data", f"features:{tmp_path / 'feat.npz'}", *VECTORS, "--out", str(out)])
        == 0
    )
    assert read_log(out / "log.csv")[-1]["map"] > 0.3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sdh", "-p", "sigma=wide"], "parameter sigma="),
        (["--method", "lfh", "-p", "beta=-3"], "parameter beta="),
        (["--method", "sdh", "--nan"], "NaN"),
    ],
)
def test_bad_input_through_the_cli_is_one_line(tmp_path, capsys, args, message):
    from dmuh.cli import main

    nan = "--nan" in args
    args = [a for a in args if a != "--nan"]
    write_vectors(tmp_path / "feat.npz", nan=nan)
    capsys.readouterr()
    assert (
        main(["train", *args, "--data", f"features:{tmp_path / 'feat.npz'}", *VECTORS, "--out", str(tmp_path / "run")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
