"""The label-free baselines GreedyHash (unsup.), BiHalf and CIBHash: their losses on hand-computed
cases, their gradients, their hyper-parameter checks, and one tiny unlabeled run of each."""

import json
import math

import numpy as np
import pytest
import torch

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method, display_name
from dmuh.methods.bihalf import BiHalf
from dmuh.methods.cibhash import bernoulli_kl
from dmuh.methods.components.functional import nt_xent

# Four items of two bits: raw outputs z and the reference features x (hand-written).
Z = torch.tensor([[0.5, -2.0], [1.0, 1.0], [-0.5, 0.5], [2.0, -1.0]])  # sign: [1,-1], [1,1], [-1,1], [1,-1]
X = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 4.0]])  # unit rows: [1,0], [1,0], [0,1], [.6,.8]


def step(outputs, count=4, view_outputs=None):
    return StepInputs(
        outputs=outputs, labels=torch.zeros(count, 0), indices=torch.arange(count), view_outputs=view_outputs
    )


def with_reference(name, **params):
    method = create_method(name, bits=2, train_labels=torch.zeros(4, 0), **params)
    method.set_reference_features(X)
    return method


# -- GreedyHash (unsup.) ---------------------------------------------------------------------------


def test_greedyhash_unsup_loss_by_hand_official_halves():
    terms = with_reference("greedyhash-unsup")(step(Z))
    # halves: pairs (0, 2) and (1, 3).
    # (0, 2): cos(b) = ([1,-1].[-1,1]) / 2 = -1, cos(x) = [1,0].[0,1] = 0   -> (-1 - 0)^2 = 1
    # (1, 3): cos(b) = ([1,1].[1,-1]) / 2 = 0,   cos(x) = [1,0].[.6,.8] = .6 -> (0 - .6)^2 = .36
    assert terms["similarity"].item() == pytest.approx((1 + 0.36) / 2, abs=1e-3)  # fp16 reference rows
    # | |z| - 1 | = .5, 1, 0, 0, .5, .5, 1, 0 -> cubes .125 + 1 + .125 + .125 + 1 = 2.375, over 8 entries
    assert terms["quantization"].item() == pytest.approx(0.1 * 2.375 / 8, abs=1e-7)
    assert set(terms) == {"similarity", "quantization"}


def test_greedyhash_unsup_loss_by_hand_all_pairs():
    terms = with_reference("greedyhash-unsup", pairs="all")(step(Z))
    # cos(b): (0,1) 0, (0,2) -1, (0,3) 1, (1,2) 0, (1,3) 0, (2,3) -1
    # cos(x): (0,1) 1, (0,2) 0,  (0,3) .6, (1,2) 0, (1,3) .6, (2,3) .8
    # squares: 1 + 1 + .16 + 0 + .36 + 3.24 = 5.76 per triangle; 12 off-diagonal entries
    assert terms["similarity"].item() == pytest.approx(2 * 5.76 / 12, abs=2e-3)


def test_greedyhash_unsup_gradient_is_straight_through():
    method = with_reference("greedyhash-unsup", alpha=0.0)
    z = Z.clone().requires_grad_(True)
    method(step(z))["similarity"].backward()
    # The same loss with the codes b = sign(Z) as a leaf: its gradient in b is the one z receives.
    b = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]], requires_grad=True)
    method(step(b))["similarity"].backward()
    assert torch.allclose(z.grad, b.grad) and z.grad.abs().sum() > 0


def test_reference_features_are_required_and_kept_in_the_state():
    method = create_method("greedyhash-unsup", bits=2, train_labels=torch.zeros(4, 0))
    with pytest.raises(DmuhError, match="not set"):
        method(step(Z))
    method.set_reference_features(X)
    assert method.state_dict()["reference.features"].shape == (4, 2)


# -- BiHalf ----------------------------------------------------------------------------------------

U = torch.tensor([[0.3, -1.0], [0.1, 2.0], [-0.2, 0.5], [0.4, 0.0]])


def test_bihalf_forward_splits_every_bit_at_its_batch_median():
    # column 0 ranked: .4 (row 3), .3 (row 0) -> +1; .1 (row 1), -.2 (row 2) -> -1 (row 1 is > 0 yet -1)
    # column 1 ranked: 2 (row 1), .5 (row 2) -> +1; 0 (row 3), -1 (row 0) -> -1
    assert BiHalf.apply(U, 6.0).tolist() == [[1, -1], [-1, 1], [-1, 1], [1, -1]]
    # odd batch: floor(3 / 2) = 1 item gets +1, the extra one -1
    assert BiHalf.apply(torch.tensor([[0.5], [-0.1], [0.2]]), 6.0).tolist() == [[1], [-1], [-1]]


def test_bihalf_backward_adds_the_gamma_term():
    u = U.clone().requires_grad_(True)
    BiHalf.apply(u, 6.0).sum().backward()  # upstream gradient 1 everywhere
    # 1 + 6 (U - B) / 8:
    expected = [
        [1 + 6 * (0.3 - 1) / 8, 1 + 6 * (-1.0 + 1) / 8],  # .475, 1
        [1 + 6 * (0.1 + 1) / 8, 1 + 6 * (2.0 - 1) / 8],  # 1.825, 1.75
        [1 + 6 * (-0.2 + 1) / 8, 1 + 6 * (0.5 - 1) / 8],  # 1.6, .625
        [1 + 6 * (0.4 - 1) / 8, 1 + 6 * (0.0 + 1) / 8],
    ]  # .55, 1.75
    assert torch.allclose(u.grad, torch.tensor(expected))
    v = U.clone().requires_grad_(True)
    BiHalf.apply(v, 0.0).sum().backward()
    assert torch.equal(v.grad, torch.ones_like(U))  # gamma = 0: the plain straight-through


def test_bihalf_loss_by_hand():
    method = with_reference("bihalf")
    terms = method(step(U))
    # bi-half codes [1,-1], [-1,1], [-1,1], [1,-1]; halves pairs (0, 2), (1, 3):
    # (0, 2): cos(b) = -1, cos(x) = 0  -> 1;  (1, 3): cos(b) = -1, cos(x) = .6 -> 1.6^2 = 2.56
    assert set(terms) == {"similarity"}
    assert terms["similarity"].item() == pytest.approx((1 + 2.56) / 2, abs=2e-3)
    assert torch.equal(method.continuous_codes(U), U)  # retrieval codes: the plain sign(z)


# -- CIBHash ---------------------------------------------------------------------------------------

LOG3 = math.log(3.0)
# Bit probabilities p = sigmoid(z) of two views: z = +-log 3 gives p = .75 / .25, z = 0 gives .5.
Z1 = torch.tensor([[LOG3, LOG3], [LOG3, -LOG3]])  # p1 = [.75, .75], [.75, .25] -> codes [1, 1], [1, -1]
Z2 = torch.tensor([[LOG3, 0.0], [-LOG3, LOG3]])  # p2 = [.75, .5], [.25, .75]  -> codes [1, 1], [-1, 1]


def two_item_nt_xent(temperature):
    # rows r0 = [1,1], r1 = [1,-1] (view 1), r2 = [1,1], r3 = [-1,1] (view 2); cosines:
    # r0.r2 = 1, r1.r3 = -1, every other pair 0. Rows 0 and 2: positive logit 1/T against two 0s;
    # rows 1 and 3: positive logit -1/T against two 0s.
    e = math.exp(1 / temperature)
    return (math.log(1 + 2 / e) + math.log(1 + 2 * e)) / 2


def test_nt_xent_on_two_items():
    first, second = torch.tensor([[1.0, 1.0], [1.0, -1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    # T = 1/2: (log(1 + 2 e^-2) + log(1 + 2 e^2)) / 2
    assert nt_xent(first, second, 0.5).item() == pytest.approx(two_item_nt_xent(0.5), rel=1e-6)


def test_cibhash_loss_by_hand():
    method = create_method("cibhash", bits=2, train_labels=torch.zeros(2, 0), temperature=0.5)
    terms = method(step(Z1, count=2, view_outputs=Z2))
    assert terms["contrastive"].item() == pytest.approx(two_item_nt_xent(0.5), rel=1e-5)
    # Bernoulli KLs per bit: KL(.75||.5) = .75 ln 1.5 - .25 ln 2, KL(.5||.75) = .5 ln(4/3),
    # KL(.75||.25) = KL(.25||.75) = .5 ln 3, KL(p||p) = 0. Summed over bits, averaged over 2 items:
    kl_12 = ((0.75 * math.log(1.5) - 0.25 * math.log(2)) + (0.5 * LOG3 + 0.5 * LOG3)) / 2
    kl_21 = (0.5 * math.log(4 / 3) + (0.5 * LOG3 + 0.5 * LOG3)) / 2
    assert terms["kl"].item() == pytest.approx(0.001 * 0.5 * (kl_12 + kl_21), rel=1e-5)
    assert bernoulli_kl(torch.sigmoid(Z1), torch.sigmoid(Z2)).item() == pytest.approx(kl_12, rel=1e-5)
    assert torch.equal(method.continuous_codes(Z1), Z1)


def test_cibhash_gradient_is_straight_through_to_the_probabilities():
    method = create_method("cibhash", bits=2, train_labels=torch.zeros(2, 0), temperature=0.5)
    z1 = Z1.clone().requires_grad_(True)
    method(step(z1, count=2, view_outputs=Z2))["contrastive"].backward()
    # NT-Xent of the codes as leaves; the gradient reaches z through sigmoid only: dL/db * p (1 - p).
    b1 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], requires_grad=True)
    nt_xent(b1, torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), 0.5).backward()
    p1 = torch.tensor([[0.75, 0.75], [0.75, 0.25]])
    assert torch.allclose(z1.grad, b1.grad * p1 * (1 - p1), atol=1e-6) and z1.grad.abs().sum() > 0


def test_cibhash_stochastic_codes_only_in_training():
    method = create_method("cibhash", bits=2, train_labels=torch.zeros(2, 0), stochastic=True)
    p = torch.full((2000, 2), 0.75)
    torch.manual_seed(0)
    sampled = method.binarize(p)
    assert set(sampled.unique().tolist()) == {-1.0, 1.0}
    assert (sampled == 1).float().mean().item() == pytest.approx(0.75, abs=0.03)
    method.eval()
    assert torch.equal(method.binarize(p), torch.ones_like(p))  # sign(p - 1/2)
    q = torch.full((3, 2), 0.75, requires_grad=True)
    method.train()
    (method.binarize(q) * 2.0).sum().backward()
    assert torch.equal(q.grad, torch.full_like(q, 2.0))  # straight-through


# -- the contract ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shown", [("greedyhash-unsup", "GreedyHash (unsup.)"), ("bihalf", "BiHalf"), ("cibhash", "CIBHash")]
)
def test_created_without_labels(name, shown):
    method = create_method(name, bits=8, train_labels=torch.zeros(6, 0))
    needs = method.requirements()
    assert not needs.labels and method.num_classes == 0 and display_name(name) == shown
    assert needs.reference_features == (name != "cibhash")
    assert (needs.views, needs.images) == ((2, True) if name == "cibhash" else (1, False))


@pytest.mark.parametrize(
    "name, params, word",
    [
        ("greedyhash-unsup", {"alpha": -1}, "alpha"),
        ("greedyhash-unsup", {"pairs": "x"}, "pairs"),
        ("bihalf", {"gamma": -1}, "gamma"),
        ("bihalf", {"pairs": "x"}, "pairs"),
        ("cibhash", {"temperature": 0}, "temperature"),
        ("cibhash", {"beta": -0.5}, "beta"),
        ("cibhash", {"stochastic": "yes"}, "stochastic"),
    ],
)
def test_bad_hyper_parameter_is_named(name, params, word):
    with pytest.raises(DmuhError, match=word):
        create_method(name, bits=8, train_labels=torch.zeros(6, 0), **params)


# -- end to end on unlabeled data --------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    features = (3 * rng.normal(size=(4, 16))[labels] + rng.normal(size=(120, 16))).astype(np.float32)
    np.savez(folder / "unlabeled.npz", features=features)
    np.savez(folder / "labeled.npz", features=features, labels=labels)
    return folder / "unlabeled.npz", folder / "labeled.npz"


FEATURE_RUN = [
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


@pytest.mark.parametrize("name", ["greedyhash-unsup", "bihalf"])
def test_feature_run_without_labels(tmp_path, feature_files, name):
    unlabeled, labeled = feature_files
    run = tmp_path / "run"
    assert main(["train", "--method", name, "--data", str(unlabeled), *FEATURE_RUN, "--out", str(run)]) == 0
    assert (run / "checkpoint.safetensors").is_file() and (run / "log.csv").is_file()
    # It trained on data with no labels at all; only the evaluation reads the labeled twin.
    assert main(["evaluate", "--run", str(run), "--data", str(labeled)]) == 0
    assert math.isfinite(json.loads((run / "eval.json").read_text())["map"])


def test_cibhash_image_run_and_refusal_of_features(tmp_path, feature_files, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):  # a flat folder: no class folders, so no labels
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "cibhash",
                "--data",
                str(images),
                "--protocol",
                "unsupervised",
                "--protocol-param",
                "query=8",
                "--model",
                "smallcnn",
                "--model-param",
                "width=8",
                "--init",
                "scratch",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--bits",
                "8",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert (run / "checkpoint.safetensors").is_file() and (run / "log.csv").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--method",
                "cibhash",
                "--data",
                str(feature_files[0]),
                *FEATURE_RUN,
                "--out",
                str(tmp_path / "refused"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "cibhash" in err and len(err.splitlines()) == 1, err
