"""COSDISH and DDSH: their shared bit-wise discrete solver against brute force, COSDISH's fit and
ridge regression, DDSH's loss against a hand computation, and both through the CLI."""

import itertools
import math

import numpy as np
import pytest
import torch

from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method
from dmuh.methods.components.discrete import (
    bit_problem,
    bqp_objective,
    sampled_objective,
    sampled_similarity,
    solve_bqp,
    solve_sampled_codes,
)


def balanced_codes(size):
    """Every b in {-1,+1}^size with floor(size / 2) entries +1, as columns."""
    return torch.tensor(
        [
            [1.0 if i in chosen else -1.0 for i in range(size)]
            for chosen in itertools.combinations(range(size), size // 2)
        ],
        dtype=torch.float64,
    ).t()


def random_bqp(generator, size):
    a = torch.randn(size, size, generator=generator, dtype=torch.float64)
    quadratic = a + a.t()
    quadratic.fill_diagonal_(0.0)
    return quadratic, 3 * torch.randn(size, generator=generator, dtype=torch.float64)


# --- the solver ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [6, 7])
def test_bqp_solver_reaches_the_balanced_brute_force_optimum_and_never_worsens_the_current_bit(size):
    generator = torch.Generator().manual_seed(size)
    candidates = balanced_codes(size)
    for _ in range(40):
        quadratic, linear = random_bqp(generator, size)
        values = bqp_objective(quadratic, linear, candidates)
        code = solve_bqp(quadratic, linear)
        assert int((code > 0).sum()) == size // 2  # balanced, as the authors' equal-size clustering
        assert bqp_objective(quadratic, linear, code).item() == pytest.approx(values.min().item(), abs=1e-9)
        current = candidates[:, int(torch.randint(candidates.shape[1], (1,), generator=generator))]
        for starts in (0, 8):  # the authors' candidates alone, and with the swap search
            solved = solve_bqp(quadratic, linear, current, starts=starts)
            assert bqp_objective(quadratic, linear, solved) <= bqp_objective(quadratic, linear, current) + 1e-9


def authors_solve(quadratic, linear, lam=10000.0):
    """Solve.m's construction, literally: {0,1} substitution, homogenising variable, normalised
    matrix, Cholesky factor P of lambda I - Q~, nearest points to each point, best cluster cost."""
    size = len(linear)
    q4 = 4 * quadratic
    p2 = 2 * linear - 2 * (quadratic.sum(1) + quadratic.sum(0))
    full = np.block([[q4, p2[:, None] / 2], [p2[None, :] / 2, np.zeros((1, 1))]])
    full = full / np.abs(full).max()
    factor = np.linalg.cholesky(lam * np.eye(size + 1) - full).T
    points, half = size + 1, int(np.floor((size + 1) / 2 + 0.5))  # MATLAB's round
    dist = (factor[:, :size] ** 2).sum(0)[:, None] + (factor**2).sum(0)[None, :] - 2 * factor[:, :size].T @ factor
    best, best_cost = None, np.inf
    for centre in range(points):
        choose = np.zeros(points)
        choose[np.argsort(dist[:, centre], kind="stable")[: half - 1]] = 1
        choose[size] = 1
        members = factor[:, choose == 1]
        cost = ((members - members.sum(1, keepdims=True) / half) ** 2).sum()
        if cost < best_cost:
            best, best_cost = choose[:size] * 2 - 1, cost
    return best


def test_solver_candidates_are_the_authors_cholesky_clustering():
    generator = torch.Generator().manual_seed(11)
    for size in (6, 7, 10, 16):
        for _ in range(5):
            quadratic, linear = random_bqp(generator, size)
            ours = solve_bqp(quadratic, linear, starts=0).numpy()
            theirs = authors_solve(quadratic.numpy(), linear.numpy())
            objective = lambda b: b @ quadratic.numpy() @ b + linear.numpy() @ b  # noqa: E731, B023 - called within this iteration
            assert objective(ours) == pytest.approx(objective(theirs), abs=1e-6)


def test_bit_wise_solver_on_6_items_3_bits_reaches_the_brute_force_optimum():
    # two classes of three items, all sampled (no other items): r = 18 / 18, S~ = +-1
    labels = torch.eye(2)[[0, 0, 0, 1, 1, 1]]
    similarity, r = sampled_similarity(labels, labels)
    assert r == 1.0
    q = 3
    target = q * similarity.double()
    start = torch.tensor(
        [[1, 1, 1], [-1, 1, -1], [1, -1, -1], [1, 1, -1], [-1, -1, 1], [-1, 1, 1]], dtype=torch.float64
    )
    codes = solve_sampled_codes(target, torch.zeros(6, q), torch.zeros(q, q), start)
    # brute force over all 2^18 codes of ||q S~ - B B^T||^2
    every = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=18)), dtype=torch.float64).reshape(-1, 6, q)
    brute = (target - every @ every.transpose(1, 2)).pow(2).sum((1, 2)).min().item()
    none = torch.zeros(0, 6, dtype=torch.float64)  # no other items
    assert sampled_objective(none, target, none[:, :q], codes) == pytest.approx(brute) == 0.0
    # each bit is the brute-force optimum of its own problem (the residual of the bits before it)
    for k in range(q):
        quadratic, linear = bit_problem(target, torch.zeros(6, q), torch.zeros(q, q), codes, k)
        best = bqp_objective(quadratic, linear, balanced_codes(6)).min().item()
        assert bqp_objective(quadratic, linear, codes[:, k]).item() == pytest.approx(best)


def test_bit_problem_is_the_sampled_objective_of_one_bit_up_to_a_constant():
    generator = torch.Generator().manual_seed(3)
    labels = torch.eye(3)[torch.randint(0, 3, (9,), generator=generator)]
    omega, gamma = torch.arange(4), torch.arange(4, 9)
    block, _ = sampled_similarity(labels, labels[omega])
    q = 3
    target_gamma, target_omega = q * block[gamma].double(), q * block[omega].double()
    codes = (torch.randint(0, 2, (9, q), generator=generator) * 2 - 1).double()
    k = 1  # bits 0..k-1 fitted, the later ones left out (the authors' residual)
    quadratic, linear = bit_problem(
        target_omega, target_gamma.t() @ codes[gamma], codes[gamma].t() @ codes[gamma], codes[omega], k
    )

    def objective(bit):
        b_omega = torch.cat([codes[omega][:, :k], bit[:, None]], dim=1)
        return sampled_objective(target_gamma, target_omega, codes[gamma][:, : k + 1], b_omega)

    bits = balanced_codes(4).t()
    differences = [objective(b) - bqp_objective(quadratic, linear, b).item() for b in bits]
    assert max(differences) - min(differences) == pytest.approx(0.0, abs=1e-9)


# --- COSDISH --------------------------------------------------------------------------------------


def clustered(n=240, dim=6, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=generator)
    centres = 3 * torch.randn(classes, dim, generator=generator)
    return centres[y] + torch.randn(n, dim, generator=generator), torch.eye(classes)[y]


def test_cosdish_codes_fit_every_sampled_block_far_better_than_the_random_start():
    features, labels = clustered()
    method = create_method("cosdish", bits=8, train_labels=labels)
    codes = method.fit_codes(labels.double())
    start = create_method("cosdish", bits=8, train_labels=labels, iterations=0).fit_codes(labels.double())
    assert len(method.objectives) == 10 and all(len(row) == 4 for row in method.objectives)  # 10 x (start + 3)
    generator = torch.Generator().manual_seed(5)
    for _ in range(5):  # fresh blocks of 8 columns, as the fit samples them
        omega = torch.randperm(240, generator=generator)[:8]
        target = 8 * sampled_similarity(labels, labels[omega])[0].double()
        fitted = (target - codes @ codes[omega].t()).pow(2).sum().item()
        assert fitted < 0.5 * (target - start @ start[omega].t()).pow(2).sum().item()
    # every iteration ends below where its random start began, and the fit is seeded
    assert method.objectives[-1][-1] < method.objectives[0][0]
    again = create_method("cosdish", bits=8, train_labels=labels).fit_codes(labels.double())
    torch.testing.assert_close(again, codes)


def test_cosdish_out_of_sample_is_the_ridge_regression_on_standardised_features():
    features, labels = clustered(n=120, dim=5)
    features[:, 2] = 7.0  # a constant dimension: centred, not scaled
    method = create_method("cosdish", bits=6, train_labels=labels)
    weight, bias = method.fit(features, labels)
    codes = method.fit_codes(labels.double()).numpy()
    x = features.double().numpy()
    mean, std = x.mean(0), x.std(0, ddof=1)
    std[std == 0] = 1.0
    z = (x - mean) / std
    w = np.linalg.solve(z.T @ z + np.eye(5), z.T @ codes)  # W = (X^T X + I)^-1 X^T B
    np.testing.assert_allclose(weight.numpy(), (w / std[:, None]).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), -(mean / std) @ w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((features @ weight.t() + bias).numpy(), z @ w, rtol=1e-3, atol=1e-4)
    agreement = ((z @ w >= 0) == (codes > 0)).mean()
    assert agreement > 0.9  # the linear layer reproduces most training codes on separable data


def test_cosdish_refuses_bad_input_in_one_line():
    features, labels = clustered(n=12)
    with pytest.raises(DmuhError, match=r"columns=16 .*got 12 \(lower -p columns\)"):
        create_method("cosdish", bits=16, train_labels=labels).fit(features, labels)
    features[3, 1] = float("nan")
    with pytest.raises(DmuhError, match="features contain NaN"):
        create_method("cosdish", bits=4, train_labels=labels).fit(features, labels)
    with pytest.raises(DmuhError, match="fitted once on backbone features"):
        create_method("cosdish", bits=4, train_labels=labels)(
            StepInputs(outputs=torch.zeros(2, 4), labels=labels[:2], indices=torch.arange(2))
        )


@pytest.mark.parametrize(
    "name, params, flagged",
    [
        ("cosdish", {"columns": 1}, "columns"),
        ("cosdish", {"iterations": -1}, "iterations"),
        ("cosdish", {"alternations": 0}, "alternations"),
        ("cosdish", {"ridge": 0}, "ridge"),
        ("cosdish", {"search_starts": -1}, "search_starts"),
        ("cosdish", {"seed": 1.5}, "seed"),
        ("ddsh", {"columns": "many"}, "columns"),
        ("ddsh", {"iterations": 0}, "iterations"),
        ("ddsh", {"search_starts": True}, "search_starts"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_them(name, params, flagged):
    with pytest.raises(DmuhError, match=f"parameter {flagged}="):
        create_method(name, bits=8, num_train=2, num_classes=2, **params)


# --- DDSH ---------------------------------------------------------------------------------------


DDSH_LABELS = torch.eye(2)[[0, 0, 1, 1, 0, 1]]  # six items, two classes


def test_ddsh_samples_columns_and_solves_their_codes_balanced_each_round():
    method = create_method("ddsh", bits=4, train_labels=DDSH_LABELS, columns=4, iterations=2)
    assert method.requirements().images
    method.on_epoch_start(1, 4)
    first = method.omega.clone()
    assert int(method.in_omega.sum()) == 4 and method.in_omega[first].all()
    assert ((method.binary_codes[first] > 0).sum(0) == 2).all()  # every bit of Omega half +1
    method.on_epoch_start(2, 4)  # same round: the same columns
    assert torch.equal(method.omega, first)
    method.on_epoch_start(3, 4)  # a new round, seeded by (seed, round)
    again = create_method("ddsh", bits=4, train_labels=DDSH_LABELS, columns=4, iterations=2)
    again.on_epoch_start(3, 4)
    assert torch.equal(again.omega, method.omega)
    with pytest.raises(DmuhError, match="columns=6 sampled columns need more training items than that, got 6"):
        create_method("ddsh", bits=4, train_labels=DDSH_LABELS, columns=6)


def test_ddsh_loss_is_the_squared_loss_to_the_sampled_codes_and_its_gradient_the_authors():
    method = create_method("ddsh", bits=2, train_labels=DDSH_LABELS, columns=2)
    method.on_epoch_start(1, 1)
    omega = method.omega.tolist()
    codes_omega = method.binary_codes[omega].clone()
    # by hand: r over the 6 x 2 block, S~ = +1 / -r
    same = [[float(DDSH_LABELS[i].argmax() == DDSH_LABELS[j].argmax()) for j in omega] for i in range(6)]
    similar = sum(map(sum, same))
    r = similar / (12 - similar)
    batch = [0, 2, 3, omega[0]] if omega[0] not in (0, 2, 3) else [0, 2, 3]
    z = torch.tensor([[0.3, -0.8], [1.2, 0.4], [-0.5, -0.1], [0.9, 0.7]][: len(batch)], requires_grad=True)
    expected = 0.0
    for row, i in enumerate(batch):
        if i in omega:
            continue  # sampled items add nothing
        for col in range(2):
            s = 1.0 if same[i][col] else -r
            fit = sum(codes_omega[col, k].item() * math.tanh(z[row, k].item()) for k in range(2))
            expected += (2 * s - fit) ** 2
    expected /= len(batch) * (6 - 2)  # batch size times |Gamma|
    terms = method(StepInputs(outputs=z, labels=DDSH_LABELS[batch], indices=torch.tensor(batch)))
    assert set(terms) == {"pairwise"}
    assert terms["pairwise"].item() == pytest.approx(expected, rel=1e-6)
    # the gradient of trainDDSH.m: (-2q S B_Omega + 2 h B_Omega^T B_Omega) (1 - h^2) / (batch |Gamma|)
    terms["pairwise"].backward()
    h = torch.tanh(z.detach())
    s = 2 * method.similarity(DDSH_LABELS[batch])
    outside = (~method.in_omega[torch.tensor(batch)]).float()[:, None]
    authors = (-2 * s @ codes_omega + 2 * h @ (codes_omega.t() @ codes_omega)) * (1 - h * h) * outside
    authors = authors / (len(batch) * 4)
    torch.testing.assert_close(z.grad, authors)
    # the items outside Omega take sign(h) as their code; the sampled ones keep theirs
    for row, i in enumerate(batch):
        wanted = codes_omega[omega.index(i)] if i in omega else torch.where(z[row] >= 0, 1.0, -1.0)
        torch.testing.assert_close(method.binary_codes[i], wanted.detach())
    torch.testing.assert_close(method.continuous_codes(z.detach()), h)


def test_ddsh_state_dict_round_trip():
    method = create_method("ddsh", bits=4, train_labels=DDSH_LABELS, columns=3)
    method.on_epoch_start(1, 2)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    method(StepInputs(outputs=z, labels=DDSH_LABELS, indices=torch.arange(6)))
    restored = create_method("ddsh", bits=4, train_labels=DDSH_LABELS, columns=3)
    restored.load_state_dict(method.state_dict())
    method.on_epoch_start(2, 2), restored.on_epoch_start(2, 2)  # same round: resumes with the saved columns
    for key, value in method.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, msg=key)
    method.eval(), restored.eval()
    step = StepInputs(outputs=z * 0.5, labels=DDSH_LABELS, indices=torch.arange(6))
    torch.testing.assert_close(method(step)["pairwise"], restored(step)["pairwise"])


# --- through the CLI ------------------------------------------------------------------------------


def train_args(method, data, out, *extra):
    return [
        "train",
        "--method",
        method,
        "--data",
        data,
        *extra,
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


DIGITS = ["--protocol", "digits", "--model", "smallcnn", "--model-param", "input_size=8", "--model-param", "width=16"]


@pytest.mark.parametrize("name", ["cosdish", "ddsh"])
def test_training_on_digits_through_the_cli(tmp_path, name):
    from dmuh.cli import main
    from dmuh.runs.layout import read_log

    out = tmp_path / name
    assert main(train_args(name, "digits", out, *DIGITS)) == 0
    row = read_log(out / "log.csv")[-1]
    assert math.isfinite(row["map"]) and row["map"] > 0.15  # 10 balanced classes: chance is about 0.1


def write_vectors(path, classes=10, per_class=30, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    features = (3 * rng.standard_normal((classes, dim)))[labels] + rng.standard_normal((labels.size, dim))
    np.savez(path, features=features.astype(np.float32), labels=labels.astype(np.int64))
    return path


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
]


def test_cosdish_on_feature_vectors_through_the_cli(tmp_path):
    from dmuh.cli import main
    from dmuh.runs.layout import read_log

    data = f"features:{write_vectors(tmp_path / 'vectors.npz')}"
    assert main(train_args("cosdish", data, tmp_path / "run", *VECTORS)) == 0
    assert read_log(tmp_path / "run" / "log.csv")[-1]["map"] > 0.5  # well-separated classes


def test_ddsh_refuses_feature_vectors_in_one_line(tmp_path, capsys):
    from dmuh.cli import main

    data = f"features:{write_vectors(tmp_path / 'vectors.npz')}"
    assert main(train_args("ddsh", data, tmp_path / "run", *VECTORS)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method ddsh: trains an image network end to end" in err
    assert main(train_args("ddsh", "digits", tmp_path / "bad", *DIGITS, "-p", "columns=0")) == 2
    assert "parameter columns=0" in capsys.readouterr().err
