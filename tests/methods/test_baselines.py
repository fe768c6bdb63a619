"""The baseline methods against hand-computed cases, their state, and a CPU smoke run on digits."""

import math
import warnings

import pytest
import torch

from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, available, create_method
from dmuh.methods.csq import hadamard_matrix
from dmuh.methods.greedyhash import SignStraightThrough
from dmuh.runs.config import TrainConfig

LABELS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two items of different classes
H = torch.tensor([[1.0, -0.5], [0.5, 0.5]])  # their outputs, 2 bits


def softplus(x):
    return math.log1p(math.exp(x))


def step(outputs, labels=LABELS, indices=None):
    indices = torch.arange(outputs.shape[0]) if indices is None else torch.tensor(indices)
    return StepInputs(outputs=outputs, labels=labels, indices=indices)


# DPSH's pairs of H with itself: Theta = h_i.h_j / 2 = (0,0) 0.625, (0,1) 0.125, (1,1) 0.25; S = identity.
DPSH_PAIRS = [[softplus(0.625) - 0.625, softplus(0.125)], [softplus(0.125), softplus(0.25) - 0.25]]
DPSH_LIKELIHOOD = sum(map(sum, DPSH_PAIRS)) / 4  # over n B = 2 x 2

DEEP = ["hashnet", "dhn", "dsh", "csq", "greedyhash", "dsdh", "orthohash"]


def test_available_lists_every_method():
    expected = {
        "dmuh",
        "regu",
        "hashnet",
        "dhn",
        "dsh",
        "csq",
        "greedyhash",
        "dsdh",
        "orthohash",
        "itq",
        "lsh",
        "sdh",
        "lfh",
        "cosdish",
        "ddsh",
        "fasth",
    }
    # issue #33: the methods of the toolkits users switch from (DeepHash-pytorch, FIRe, the shallow classics)
    toolkits = {
        *("dch", "dtsh", "dpn", "idhn", "isdh", "lcdsh", "dshsd", "dbdh", "pcdh", "qsmih", "dfh", "mihash", "jmlh"),
        *("ce", "orthoarc", "bihalf-supervised", "deep-sdh", "deep-sdh-c", "deep-dh", "cnnh", "cnnh-plus", "adsh"),
        *("ssdh", "tbh", "pcah", "pca-rr", "sh", "sklsh", "ksh", "fsdh", "imh", "densityhash"),
    }
    assert expected | toolkits <= set(available())


# --- HashNet ----------------------------------------------------------------------------------


def test_hashnet_class_balanced_pairwise_loss():
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.5, -1.0], [1.0, 0.2], [-0.3, 0.8]])
    method = create_method("hashnet", bits=2, train_labels=labels, alpha=0.5)
    terms = method(step(z.clone(), labels))
    h = [[math.tanh(v) for v in row] for row in z.tolist()]  # scale 1 before step 200
    theta = [[0.5 * sum(a * b for a, b in zip(h[i], h[j])) for j in range(3)] for i in range(3)]
    similar = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]
    dissimilar = [(0, 2), (2, 0), (1, 2), (2, 1)]
    expected = (
        sum(softplus(theta[i][j]) - theta[i][j] for i, j in similar) / 5
        + sum(softplus(theta[i][j]) for i, j in dissimilar) / 4
    )
    assert set(terms) == {"likelihood"}
    assert terms["likelihood"].item() == pytest.approx(expected, rel=1e-6)


def test_hashnet_default_alpha_is_ten_over_bits():
    assert create_method("hashnet", bits=16, train_labels=LABELS).alpha == pytest.approx(10 / 16)


def test_hashnet_continuation_per_step_survives_state_dict():
    method = create_method("hashnet", bits=2, train_labels=LABELS, step_size=2, gamma=1.0, power=0.5)
    scales = []
    for _ in range(4):
        method(step(H.clone()))
        scales.append(method.step_stats["scale"].item())
    # scale = (1 + gamma * step) ^ power, updated at steps 2 and 4
    assert scales == pytest.approx([1.0, math.sqrt(3), math.sqrt(3), math.sqrt(5)])
    codes = method.continuous_codes(torch.tensor([[0.3, -0.2]]))
    torch.testing.assert_close(codes, torch.tanh(math.sqrt(5) * torch.tensor([[0.3, -0.2]])))
    restored = create_method("hashnet", bits=2, train_labels=LABELS, step_size=2, gamma=1.0, power=0.5)
    restored.load_state_dict(method.state_dict())
    assert restored.scale().item() == pytest.approx(math.sqrt(5))
    method.eval()
    method(step(H.clone()))  # evaluation does not advance the schedule
    assert int(method.step) == 4


# --- DHN --------------------------------------------------------------------------------------


def test_dhn_likelihood_plus_log_cosh_quantization():
    method = create_method("dhn", bits=2, train_labels=LABELS, alpha=0.3)
    terms = method(step(H.clone()))
    # |u| - 1 = [0, -0.5, -0.5, -0.5]: mean log cosh over the 4 entries
    quantization = 0.3 * 3 * math.log(math.cosh(0.5)) / 4
    assert terms["likelihood"].item() == pytest.approx(DPSH_LIKELIHOOD, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(quantization, rel=1e-6)


def test_dhn_log_cosh_is_finite_for_huge_outputs():
    method = create_method("dhn", bits=2, train_labels=LABELS)
    terms = method(step(torch.tensor([[1e4, -1e4], [200.0, 1.0]])))
    assert all(torch.isfinite(v) for v in terms.values())
    # log cosh(x) ~ |x| - log 2 for large |x|
    expected = 0.1 * ((1e4 - 1 - math.log(2)) * 2 + (199 - math.log(2)) + 0.0) / 4
    assert terms["quantization"].item() == pytest.approx(expected, rel=1e-5)


# --- DSH --------------------------------------------------------------------------------------


def test_dsh_contrastive_with_margin_two_bits_plus_l1():
    method = create_method("dsh", bits=2, train_labels=LABELS)
    terms = method(step(H.clone()))
    # D_01 = ||(0.5, -1)||^2 = 1.25 for the two dissimilar pairs, D_ii = 0; margin m = 2 x 2 = 4
    contrastive = 2 * 0.5 * max(4 - 1.25, 0) / 4  # over n B
    l1 = 0.1 * (0 + 0.5 + 0.5 + 0.5) / 4
    assert terms["contrastive"].item() == pytest.approx(contrastive, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(l1, rel=1e-6)


def test_dsh_similar_pairs_pull_together_and_far_dissimilar_pairs_cost_nothing():
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    method = create_method("dsh", bits=2, train_labels=same, margin=1.0)
    terms = method(step(H.clone(), same))
    assert terms["contrastive"].item() == pytest.approx(2 * 0.5 * 1.25 / 4, rel=1e-6)
    method = create_method("dsh", bits=2, train_labels=LABELS, margin=1.0)  # 1.25 > margin
    assert method(step(H.clone()))["contrastive"].item() == pytest.approx(0.0, abs=1e-7)


# --- CSQ --------------------------------------------------------------------------------------


def bce(p, t):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_csq_bce_to_hadamard_centres_plus_quantization():
    z = torch.tensor([[0.5, -1.0, 2.0, 0.1], [-0.4, 0.3, 0.0, -2.0]])
    method = create_method("csq", bits=4, train_labels=LABELS, quantization=0.5)
    assert method.center_kind == "hadamard" and method.notes == []
    centres = [[1, 1, 1, 1], [1, -1, 1, -1]]  # the first two rows of H_4
    torch.testing.assert_close(method.class_centers, torch.tensor(centres, dtype=torch.float32))
    terms = method(step(z.clone()))
    h = [[math.tanh(v) for v in row] for row in z.tolist()]
    center = sum(bce((h[i][k] + 1) / 2, (centres[i][k] + 1) / 2) for i in range(2) for k in range(4)) / 8
    quantization = 0.5 * sum((abs(v) - 1) ** 2 for row in h for v in row) / 8
    assert terms["center"].item() == pytest.approx(center, rel=1e-5)
    assert terms["quantization"].item() == pytest.approx(quantization, rel=1e-6)


def test_csq_multi_label_centre_is_the_sign_of_the_mean_ties_broken_by_a_fixed_vector():
    method = create_method("csq", bits=4, train_labels=LABELS)
    both = method.item_centers(torch.tensor([[1.0, 1.0]]))[0]
    # mean of [1,1,1,1] and [1,-1,1,-1] = [1, 0, 1, 0]
    assert both[0].item() == 1 and both[2].item() == 1
    assert both[1].item() == method.tie_breaker[1].item() and both[3].item() == method.tie_breaker[3].item()
    assert set(method.tie_breaker.tolist()) <= {-1.0, 1.0}


def test_csq_items_without_labels_are_left_out():
    z = torch.tensor([[0.5, -1.0, 2.0, 0.1], [9.0, 9.0, 9.0, 9.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    method = create_method("csq", bits=4, train_labels=LABELS)
    alone = method(step(z[:1].clone(), labels[:1]))["center"]
    assert method(step(z.clone(), labels))["center"].item() == pytest.approx(alone.item(), rel=1e-6)


@pytest.mark.parametrize("bits", [8, 16, 32, 64])
def test_hadamard_centres_are_half_the_bits_apart(bits):
    matrix = hadamard_matrix(bits)
    torch.testing.assert_close(matrix @ matrix.t(), bits * torch.eye(bits))
    labels = torch.eye(10)
    method = create_method("csq", bits=bits, train_labels=labels)
    centres = method.class_centers
    distance = (bits - centres @ centres.t()) / 2
    off_diagonal = distance[~torch.eye(10, dtype=torch.bool)]
    assert off_diagonal.min().item() >= bits / 2


def test_csq_falls_back_to_bernoulli_centres_with_a_note():
    labels = torch.eye(10)
    with pytest.warns(UserWarning, match="power-of-two bit length, not 12"):
        method = create_method("csq", bits=12, train_labels=labels)
    assert method.center_kind == "bernoulli"
    assert len(method.notes) == 1 and "Bernoulli" in method.notes[0]
    assert method.class_centers.shape == (10, 12) and set(method.class_centers.unique().tolist()) == {-1.0, 1.0}
    with pytest.warns(UserWarning):
        again = create_method("csq", bits=12, train_labels=labels)
    torch.testing.assert_close(again.class_centers, method.class_centers)  # seeded
    with pytest.warns(UserWarning, match="at most 8 classes"):
        create_method("csq", bits=4, train_labels=labels)
    with pytest.raises(DmuhError, match="centers='hadamard'.*power-of-two"):
        create_method("csq", bits=12, train_labels=labels, centers="hadamard")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice is not a fallback
        assert create_method("csq", bits=16, train_labels=labels, centers="bernoulli").notes == []


# --- GreedyHash -------------------------------------------------------------------------------


def test_sign_straight_through():
    x = torch.tensor([-0.3, 0.0, 2.0], requires_grad=True)
    y = SignStraightThrough.apply(x)
    assert y.tolist() == [-1.0, 1.0, 1.0]  # sign(0) = +1
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_greedyhash_classifies_the_signs_plus_cube_regulariser():
    method = create_method("greedyhash", bits=2, train_labels=LABELS, alpha=0.5)
    with torch.no_grad():
        method.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 2.0]]))
    z = torch.tensor([[0.4, -2.0], [-0.1, 1.5]], requires_grad=True)
    terms = method(step(z))
    # b = [[1, -1], [-1, 1]]; logits W b = [[1, -1.5], [-1, 1.5]]; item 0 class 0, item 1 class 1
    ce = [math.log(1 + math.exp(-1.5 - 1)), math.log(math.exp(-1) + math.exp(1.5)) - 1.5]
    assert terms["classification"].item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    cube = 0.5 * (0.6**3 + 1.0 + 0.9**3 + 0.5**3) / 4
    assert terms["quantization"].item() == pytest.approx(cube, rel=1e-6)
    # the gradient reaches z as if b were z: dCE/db = (softmax - y) W / B
    terms["classification"].backward()
    logits = torch.tensor([[1.0, -1.5], [-1.0, 1.5]])
    expected = (torch.softmax(logits, 1) - LABELS) @ method.classifier.weight.detach() / 2
    torch.testing.assert_close(z.grad, expected)


# --- DSDH -------------------------------------------------------------------------------------


def test_dsdh_likelihood_plus_pull_to_discrete_codes():
    method = create_method("dsdh", bits=2, train_labels=LABELS, eta=2.0)
    method.binary_codes.copy_(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
    terms = method(step(H.clone()))
    # (B - u)^2 = [[0, 2.25], [2.25, 0.25]], mean over 4 entries
    assert terms["likelihood"].item() == pytest.approx(DPSH_LIKELIHOOD, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(2.0 * 4.75 / 4, rel=1e-6)


def test_dsdh_epoch_update_w_step_then_discrete_cyclic_coordinate_descent():
    method = create_method("dsdh", bits=2, train_labels=LABELS, mu=1.0, nu=1.0, eta=1.0)
    method.binary_codes.copy_(torch.ones(2, 2))
    method(step(H.clone()))  # fills the memory U with H
    method.on_epoch_start(1, 3)  # nothing to learn from before the first epoch
    assert method.binary_codes.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    method.on_epoch_start(2, 3)
    # W = (B^T B + I)^-1 B^T Y = [[3, 2], [2, 3]]^-1 [[1, 1], [1, 1]] = 0.2 everywhere
    torch.testing.assert_close(method.classifier, torch.full((2, 2), 0.2))
    # P = Y W^T + U = [[1.2, -0.3], [0.7, 0.7]]; bit k: sign(P_:k - B_:other (W_other . w_k)), W_other . w_k = 0.08
    # bit 0: sign([1.2 - 0.08, 0.7 - 0.08]) = [1, 1]; bit 1 (with the new bit 0): sign([-0.3 - 0.08, 0.7 - 0.08])
    assert method.binary_codes.tolist() == [[1.0, -1.0], [1.0, 1.0]]


# --- OrthoHash --------------------------------------------------------------------------------


def test_orthohash_cosine_margin_cross_entropy_to_fixed_codes():
    method = create_method(
        "orthohash", bits=2, train_labels=LABELS, scale=4.0, margin=0.25, quantization=0.5, batch_norm=False
    )
    method.codebook.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    z = torch.tensor([[3.0, 4.0], [1.0, -2.0]])
    terms = method(step(z.clone()))
    r2 = math.sqrt(2)
    cos = [[(3 + 4) / 5 / r2, (3 - 4) / 5 / r2], [(1 - 2) / math.sqrt(5) / r2, (1 + 2) / math.sqrt(5) / r2]]
    ce = 0.0
    for i, y in enumerate([0, 1]):
        logits = [4.0 * (cos[i][c] - (0.25 if c == y else 0.0)) for c in range(2)]
        ce += math.log(sum(math.exp(v) for v in logits)) - logits[y]
    assert terms["classification"].item() == pytest.approx(ce / 2, rel=1e-6)
    # 1 - cos(v, sign v): sign v = [1, 1] and [1, -1]
    quantization = 0.5 * ((1 - cos[0][0]) + (1 - cos[1][1])) / 2
    assert terms["quantization"].item() == pytest.approx(quantization, rel=1e-6)


def test_orthohash_multi_label_spreads_the_target_over_the_labels():
    method = create_method("orthohash", bits=2, train_labels=LABELS, scale=2.0, margin=0.5, batch_norm=False)
    method.codebook.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    terms = method(step(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0]]), indices=[0]))
    r2 = math.sqrt(2)
    logits = [2.0 * (7 / 5 / r2 - 0.5), 2.0 * (-1 / 5 / r2 - 0.5)]
    log_z = math.log(sum(math.exp(v) for v in logits))
    expected = 0.5 * (log_z - logits[0]) + 0.5 * (log_z - logits[1])  # target 1/2 on each label
    assert terms["classification"].item() == pytest.approx(expected, rel=1e-6)


def test_orthohash_batch_norm_balances_the_bits():
    torch.manual_seed(0)
    method = create_method("orthohash", bits=4, train_labels=torch.eye(3))
    z = torch.randn(64, 4) * 3 + 5  # every bit would be +1 for every item without centring
    codes = method.continuous_codes(z)
    torch.testing.assert_close(codes.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    assert (codes > 0).float().mean(0).min() > 0.2
    method.eval()  # encoding uses the running statistics
    assert not torch.allclose(method.continuous_codes(z), codes)


# --- every deep method ------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEEP)
def test_state_dict_round_trip(name):
    labels = torch.eye(3)[[0, 1, 2, 0]]
    torch.manual_seed(1)
    z = torch.randn(4, 8)
    original = create_method(name, bits=8, train_labels=labels)
    original(step(z.clone(), labels))
    original.on_epoch_start(2, 3)
    restored = create_method(name, bits=8, train_labels=labels)
    restored.load_state_dict(original.state_dict())
    for key, value in original.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, msg=key)
    a, b = original(step(z.clone() * 0.5, labels)), restored(step(z.clone() * 0.5, labels))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    original.eval(), restored.eval()
    torch.testing.assert_close(original.continuous_codes(z), restored.continuous_codes(z))


@pytest.mark.parametrize(
    "name, params, flagged",
    [
        ("hashnet", {"step_size": 0}, "step_size"),
        ("hashnet", {"alpha": -1.0}, "alpha"),
        ("dhn", {"alpha": "much"}, "alpha"),
        ("dhn", {"output": "relu"}, "output"),
        ("dsh", {"margin": 0}, "margin"),
        ("csq", {"centers": "random"}, "centers"),
        ("csq", {"quantization": -0.1}, "quantization"),
        ("greedyhash", {"alpha": float("nan")}, "alpha"),
        ("dsdh", {"mu": 0}, "mu"),
        ("dsdh", {"dcc_iter": 1.5}, "dcc_iter"),
        ("orthohash", {"batch_norm": "yes"}, "batch_norm"),
        ("orthohash", {"scale": 0}, "scale"),
        ("itq", {"iterations": -1}, "iterations"),
        ("lsh", {"seed": -2}, "seed"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_them(name, params, flagged):
    with pytest.raises(DmuhError, match=f"parameter {flagged}="):
        create_method(name, bits=8, train_labels=torch.eye(3), **params)


# --- ITQ and LSH ------------------------------------------------------------------------------


def anisotropic_features(n=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.1, 0.1])
    return torch.randn(n, 6, generator=generator) * scales + torch.tensor([10.0, -4.0, 0.0, 1.0, 2.0, 3.0])


def quantization_error(features, weight, bias):
    projected = features @ weight.t() + bias
    return (torch.where(projected >= 0, 1.0, -1.0) - projected).pow(2).sum().item()


def test_itq_is_a_centred_rotated_pca_that_lowers_the_quantization_error():
    features = anisotropic_features()
    itq = create_method("itq", bits=3, train_labels=torch.eye(2)[[0] * 300])
    assert itq.requirements().shallow
    weight, bias = itq.fit(features, torch.zeros(300, 2))
    assert weight.shape == (3, 6) and bias.shape == (3,)
    torch.testing.assert_close(weight @ weight.t(), torch.eye(3), atol=1e-5, rtol=0)  # (W R)^T, W and R orthonormal
    torch.testing.assert_close(features.mean(0) @ weight.t() + bias, torch.zeros(3), atol=1e-4, rtol=0)  # centred
    # the rows span the top-3 principal subspace: the 3 large-variance coordinates
    assert weight[:, :3].pow(2).sum().item() == pytest.approx(3.0, abs=0.02)
    codes = (features @ weight.t() + bias >= 0).float()
    assert ((codes.mean(0) > 0.2) & (codes.mean(0) < 0.8)).all()  # balanced-ish bits
    unrotated = create_method("itq", bits=3, train_labels=torch.eye(2), iterations=0).fit(features, None)
    assert quantization_error(features, weight, bias) < quantization_error(features, *unrotated)
    again = create_method("itq", bits=3, train_labels=torch.eye(2)).fit(features, None)
    torch.testing.assert_close(again[0], weight)


def test_itq_needs_no_more_bits_than_feature_dimensions():
    itq = create_method("itq", bits=8, train_labels=torch.eye(2))
    with pytest.raises(DmuhError, match="bits=8 exceeds the feature dimension 6"):
        itq.fit(anisotropic_features(), None)


def test_lsh_is_a_seeded_centred_gaussian_projection():
    features = anisotropic_features()
    lsh = create_method("lsh", bits=5, train_labels=torch.eye(2))
    weight, bias = lsh.fit(features, None)
    assert weight.shape == (5, 6) and bias.shape == (5,)
    torch.testing.assert_close(features.mean(0) @ weight.t() + bias, torch.zeros(5), atol=1e-4, rtol=0)
    same = create_method("lsh", bits=5, train_labels=torch.eye(2)).fit(features, None)
    torch.testing.assert_close(same[0], weight)
    other = create_method("lsh", bits=5, train_labels=torch.eye(2), seed=1).fit(features, None)
    assert not torch.allclose(other[0], weight)


@pytest.mark.parametrize("name", ["itq", "lsh"])
def test_shallow_methods_are_not_trained_by_gradient(name):
    method = create_method(name, bits=2, train_labels=LABELS)
    with pytest.raises(DmuhError, match="fitted once on backbone features"):
        method(step(H.clone()))
    assert not create_method("hashnet", bits=2, train_labels=LABELS).requirements().shallow


# --- the training loop, on digits -------------------------------------------------------------


def digits_config(tmp_path, method, **overrides):
    values = dict(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8, "width": 16},
        method=method,
        bits=16,
        epochs=2,
        batch_size=64,
        device="cpu",
        out=str(tmp_path / method),
        trace_items=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("name", DEEP + ["itq", "lsh"])
def test_training_smoke_on_digits_through_the_cli(tmp_path, name):
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


# --- dmuh.studies.compare -----------------------------------------------------------------------------


def test_compare_writes_paper_shaped_tables_and_reuses_finished_runs(tmp_path):
    from dmuh.studies.compare import compare

    base = digits_config(tmp_path, "unused")
    lines = []
    rows = compare(["lsh", "itq"], [8, 128], base, tmp_path / "cmp", echo=lines.append)
    assert [(r["method"], r["bits"]) for r in rows] == [("lsh", 8), ("lsh", 128), ("itq", 8), ("itq", 128)]
    assert all(math.isfinite(r["map"]) for r in rows[:3])
    # smallcnn(width=16) has 64 features: ITQ cannot project on 128 principal directions
    assert "exceeds the feature dimension" in rows[3]["error"] and math.isnan(rows[3]["map"])
    markdown = (tmp_path / "cmp" / "results.md").read_text()
    assert "| Method | 8 bits | 128 bits |" in markdown
    assert "| ITQ | " in markdown and "| failed |" in markdown and "- itq at 128 bits: itq: bits=128" in markdown
    csv_lines = (tmp_path / "cmp" / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "method,8 bits,128 bits"
    assert csv_lines[1].startswith("lsh,") and csv_lines[2].endswith(",")  # the failed cell is empty
    assert float(csv_lines[1].split(",")[1]) == pytest.approx(rows[0]["map"])

    lines.clear()
    again = compare(["lsh"], [8], base, tmp_path / "cmp", echo=lines.append)
    assert again[0]["map"] == pytest.approx(rows[0]["map"]) and "reused" in lines[0]
    with pytest.raises(DmuhError, match="another config \\(seed"):
        compare(["lsh"], [8], digits_config(tmp_path, "unused", seed=1), tmp_path / "cmp", echo=lines.append)


def test_compare_resumes_an_interrupted_run(tmp_path):
    from dmuh.studies.compare import compare

    def interrupt_after_epoch_1(line):
        if line.startswith("epoch 1 "):
            raise KeyboardInterrupt

    base = digits_config(tmp_path, "unused")
    with pytest.raises(KeyboardInterrupt):
        compare(["greedyhash"], [8], base, tmp_path / "cmp", echo=interrupt_after_epoch_1)
    lines = []
    rows = compare(["greedyhash"], [8], base, tmp_path / "cmp", echo=lines.append)
    assert "resuming" in lines[0] and any(line.startswith("epoch 2 ") for line in lines)
    assert math.isfinite(rows[0]["map"])


def test_compare_in_worker_processes_matches_one_after_another(tmp_path):
    from dmuh.studies.compare import compare, worker_threads

    base = digits_config(tmp_path, "unused", epochs=1)
    methods, bits = ["regu", "dmuh", "itq"], [8, 128]
    lines = []
    parallel = compare(methods, bits, base, tmp_path / "parallel", echo=lines.append, jobs=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(3))  # the summation order of the workers
    try:
        serial = compare(methods, bits, base, tmp_path / "serial", echo=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert [(r["method"], r["bits"]) for r in parallel] == [(r["method"], r["bits"]) for r in serial]
    for a, b in zip(parallel, serial):
        assert a.get("error") == b.get("error")
        if math.isfinite(b["map"]):
            assert a["map"] == pytest.approx(b["map"], abs=1e-6), (a["method"], a["bits"])
    assert "exceeds the feature dimension" in parallel[-1]["error"]  # a DmuhError in a worker is a failed cell
    assert sum("(worker)" in line for line in lines) == 6
    assert "| ITQ | " in (tmp_path / "parallel" / "results.md").read_text()
    with pytest.raises(DmuhError, match="--jobs must be a positive integer"):
        compare(methods, bits, base, tmp_path / "parallel", jobs=0)


def test_compare_checks_its_arguments_before_training(tmp_path):
    from dmuh.studies.compare import compare

    base = digits_config(tmp_path, "unused")
    with pytest.raises(DmuhError, match="unknown method 'nope'"):
        compare(["lsh", "nope"], [8], base, tmp_path)
    with pytest.raises(DmuhError, match="positive integers"):
        compare(["lsh"], [0], base, tmp_path)
    with pytest.raises(DmuhError, match="per method"):
        compare(["lsh"], [8], digits_config(tmp_path, "unused", method_params={"seed": 1}), tmp_path)
    assert not list(tmp_path.iterdir())


def test_write_tables_bolds_nothing_one_seed_cannot_support(tmp_path):
    from dmuh.studies.compare import write_tables

    rows = [
        {"method": "dmuh", "bits": 12, "map": 0.772, "seconds": 10.0},
        {"method": "dmuh", "bits": 24, "map": 0.5, "seconds": 12.0},
        {"method": "dsh", "bits": 12, "map": 0.644, "seconds": 9.0},
        {"method": "dsh", "bits": 24, "map": 0.742, "seconds": 11.0},
    ]
    write_tables(rows, tmp_path, caption="protocol cifar10")
    markdown = (tmp_path / "results.md").read_text()
    assert "| DMUH | 0.7720 | 0.5000 |" in markdown  # one seed a cell: a difference is an anecdote
    assert "| DSH | 0.6440 | 0.7420 |" in markdown
    assert "protocol cifar10" in markdown and "One seed per cell" in markdown
