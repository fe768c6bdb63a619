"""The shallow classics of the MATLAB toolkits (issue #33): PCAH, PCA-RR, SKLSH, SH,
density-sensitive hashing, KSH, FSDH and IMH. Each against a hand-computed case and, where the
authors' MATLAB exists, against that algorithm written again here in numpy (in the style of the
.m files) on a small fixed feature set; then each through the CLI on digits, with --resume."""

import math

import numpy as np
import pytest
import torch
from cli_runs import train_and_resume_on_digits

from dmuh.errors import DmuhError
from dmuh.methods import create_method, display_name
from dmuh.methods.components.shallow_toolkit import lite_kmeans, neighbour_distance_scale
from dmuh.methods.densityhash import candidate_hyperplanes
from dmuh.methods.ksh import optimise_projection, projection_cost
from dmuh.methods.spectral_hashing import spectral_modes
from dmuh.models.heads import AnchorEmbeddingHead, CosineHead, RBFHead, SpectralHead, create_head

NAMES = ("pcah", "pca-rr", "sklsh", "sh", "densityhash", "ksh", "fsdh", "imh", "lfh")
SUPERVISED = ("ksh", "fsdh")


def fixed_features(n=60, dim=6, classes=3, seed=0):
    """A small fixed feature set: Gaussian classes, float64, with one-hot labels."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * 3
    cls = np.arange(n) % classes
    return means[cls] + rng.normal(size=(n, dim)), np.eye(classes)[cls]


def build(name, bits, labels, **params):
    classes = labels.shape[1] if name in SUPERVISED else 0
    return create_method(name, bits=bits, num_train=labels.shape[0], num_classes=classes, **params)


def codes_of(fitted, x):
    """sign of the fitted hash function on x (a linear layer's (weight, bias) or a head)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    z = fitted(x) if isinstance(fitted, torch.nn.Module) else x @ fitted[0].t() + fitted[1]
    return np.where(z.detach().double().numpy() >= 0, 1.0, -1.0)


def assert_equal_up_to_bit_signs(ours, reference):
    """Codes equal after flipping whole bits (a principal direction's sign is arbitrary, and MAP
    does not see it)."""
    for k in range(reference.shape[1]):
        same, flipped = np.all(ours[:, k] == reference[:, k]), np.all(ours[:, k] == -reference[:, k])
        assert same or flipped, f"bit {k} differs"


def matlab_eigs_cov(x, count):
    """eigs(cov(X), count): the top eigenvectors of the covariance, descending."""
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    return vectors[:, np.argsort(-values)[:count]]


def test_registered_with_their_display_names_and_refuse_gradient_steps():
    expected = {"pcah": "PCAH", "pca-rr": "PCA-RR", "sklsh": "SKLSH", "sh": "SH", "ksh": "KSH"}
    expected |= {"fsdh": "FSDH", "imh": "IMH", "densityhash": "Density-sensitive DSH"}
    for name, shown in expected.items():
        assert display_name(name) == shown
        method = create_method(name, bits=4, num_train=8, num_classes=2)
        assert method.requirements().shallow and method.requirements().labels == (name in SUPERVISED)
        with pytest.raises(DmuhError, match="fitted once on backbone features"):
            method(None)


# --- PCAH and PCA-RR ---------------------------------------------------------------------------


def test_pcah_by_hand():
    # centred already; scatter [[20, 4], [4, 4]]: top eigenvector (4, sqrt(80) - 8) = (4, 0.944)
    x = torch.tensor([[3.0, 1.0], [-3.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    weight, bias = build("pcah", 1, torch.zeros(4, 0)).fit(x, None)
    direction = torch.tensor([4.0, math.sqrt(80) - 8])
    direction /= direction.norm()
    torch.testing.assert_close(weight[0].abs(), direction.abs())
    codes = codes_of((weight, bias), x)[:, 0]
    # 4*3 + 0.944*1 > 0, its opposite, 4*1 - 0.944 > 0, its opposite
    assert list(codes * codes[0]) == [1, -1, 1, -1]
    # with one bit the random rotation is +-1: PCA-RR's codes are PCAH's up to sign
    rr = codes_of(build("pca-rr", 1, torch.zeros(4, 0), seed=3).fit(x, None), x)[:, 0]
    assert list(rr * rr[0]) == [1, -1, 1, -1]


def test_pcah_and_pca_rr_against_the_toolkit_in_numpy():
    x, _ = fixed_features()
    centred = x - x.mean(0)  # construct_data.m centres the data
    pc = matlab_eigs_cov(centred, 4)  # trainPCAH.m
    reference = np.where(centred @ pc > 0, 1.0, -1.0)  # compressPCAH.m
    pcah = build("pcah", 4, torch.zeros(60, 0))
    assert_equal_up_to_bit_signs(codes_of(pcah.fit(torch.from_numpy(x), None), x), reference)

    rr = build("pca-rr", 4, torch.zeros(60, 0), seed=5)
    weight, bias = rr.fit(torch.from_numpy(x), None)
    rotation = rr.rotation().numpy()  # trainRR.m: the U of svd(randn(bits, bits)), drawn seeded here
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(4), atol=1e-12)
    # a principal direction's sign is arbitrary: take ours, checked against numpy's up to sign
    ours = (weight.double().numpy().T @ rotation.T).T  # W = weight^T R^T: the projection before rotation
    signs = np.sign(np.sum(ours.T * pc, axis=0))
    np.testing.assert_allclose(ours.T, pc * signs, atol=1e-5)
    reference = np.where(centred @ (pc * signs) @ rotation > 0, 1.0, -1.0)  # compressRR.m
    np.testing.assert_array_equal(codes_of((weight, bias), x), reference)
    # PCA-RR is ITQ without a rotation update, from the same seeded rotation
    itq = create_method("itq", bits=4, num_train=60, num_classes=0, iterations=0, seed=5).fit(torch.from_numpy(x), None)
    torch.testing.assert_close(itq[0], weight)


# --- SKLSH ---------------------------------------------------------------------------------------


def test_toolkit_scale_by_hand():
    # 0, 1, 3 on a line; the 2nd nearest counting the item itself: 1, 1, 2
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert neighbour_distance_scale(x, torch.Generator().manual_seed(0), sample=3, rank=2) == pytest.approx(4 / 3)


def test_sklsh_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    method = build("sklsh", 2, torch.zeros(3, 0), gamma=4.0, scale=2.0)
    head = method.fit(x, None)
    assert isinstance(head, CosineHead)
    r, b, t = method.draws(1)
    for i, value in enumerate([0.0, 1.0, 3.0]):
        for k in range(2):
            # w = r sqrt(gamma) / scale = r; centred by the mean 4/3
            expected = math.sqrt(2) * math.cos(float(r[0, k]) * (value - 4 / 3) + float(b[k])) + float(t[k])
            assert float(head(x[i : i + 1].float())[0, k]) == pytest.approx(expected, abs=1e-5)


def test_sklsh_against_rf_train_and_rf_compress_in_numpy():
    x, _ = fixed_features()
    method = build("sklsh", 8, torch.zeros(60, 0), seed=2)
    head = method.fit(torch.from_numpy(x), None)
    # construct_data.m: scale so that the 50-NN distance is 1, centre; demo.m: gamma = 1
    scale = neighbour_distance_scale(torch.from_numpy(x), torch.Generator().manual_seed(2 + 1))
    data = (x - x.mean(0)) / scale
    r, b, t = (v.numpy() for v in method.draws(6))
    R, B, T = r * math.sqrt(1.0), b[None, :], t[None, :]  # RF_train.m
    reference = np.sign(math.sqrt(2) * np.cos(data @ R + B) + T)  # RF_compress.m
    np.testing.assert_array_equal(codes_of(head, x), reference)


# --- SH ------------------------------------------------------------------------------------------


def test_spectral_modes_by_hand():
    # spans 4 and 2, 3 bits: dimension 0 offers modes 1..3, dimension 1 mode 1; frequencies
    # (pi/4)^2 x {1, 4, 9} and (pi/2)^2 = (pi/4)^2 x 4, the tie kept in enumeration order
    modes = spectral_modes(torch.tensor([4.0, 2.0], dtype=torch.float64), 3)
    assert modes.tolist() == [[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]


def test_spectral_head_by_hand():
    head = SpectralHead.fitted(torch.eye(2), torch.tensor([1.0, 0.0]), torch.tensor([[math.pi / 2, 0.0], [0.0, 1.0]]))
    z = head(torch.tensor([[1.0, math.pi]]))
    # p = (2, pi): cos(pi) cos(0) = -1; cos(0) cos(pi) = -1
    torch.testing.assert_close(z, torch.tensor([[-1.0, -1.0]]))


def train_sh_numpy(x, nbits):
    """trainSH.m + compressSH.m (willard-yuan's toolkit) in numpy, on centred data."""
    npca = min(nbits, x.shape[1])
    pc = matlab_eigs_cov(x, npca)
    v = x @ pc
    mn, mx = v.min(0) - np.finfo(float).eps, v.max(0) + np.finfo(float).eps
    span = mx - mn
    max_mode = np.ceil((nbits + 1) * span / span.max()).astype(int)
    n_modes = max_mode.sum() - len(max_mode) + 1
    modes = np.ones((n_modes, npca))
    m = 0
    for i in range(npca):
        modes[m + 1 : m + max_mode[i], i] = np.arange(2, max_mode[i] + 1)
        m += max_mode[i] - 1
    modes -= 1
    omegas = modes * (np.pi / span)
    eig_val = -np.sum(omegas**2, axis=1)
    order = np.argsort(-eig_val, kind="stable")
    modes = modes[order[1 : nbits + 1]]

    def compress(data):
        u = np.ones((data.shape[0], nbits))
        projected = data @ pc - mn
        for i in range(nbits):
            u[:, i] = np.prod(np.sin(projected * (modes[i] * np.pi / span) + np.pi / 2), axis=1)
        return u

    return compress


@pytest.mark.parametrize("bits", [3, 8])
def test_sh_against_train_sh_and_compress_sh_in_numpy(bits):
    x, _ = fixed_features(dim=5)
    centred = x - x.mean(0)
    reference = np.where(train_sh_numpy(centred, bits)(centred) > 0, 1.0, -1.0)
    head = build("sh", bits, torch.zeros(60, 0)).fit(torch.from_numpy(x), None)
    assert isinstance(head, SpectralHead)
    # a principal direction's sign flips a mode-m eigenfunction by (-1)^m: whole bits
    assert_equal_up_to_bit_signs(codes_of(head, x), reference)


# --- density-sensitive hashing --------------------------------------------------------------


def test_density_candidates_by_hand():
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]], dtype=torch.float64)
    shares = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    pairs, scores = candidate_hyperplanes(centres, shares, neighbours=1)
    # nearest-centre squared distances 1, 1, 4, 16 -> candidates 1 (centres 1|0), 4 (2|1),
    # 16 (3|2); positive sides {1, 3, 7}: 0.6, {3, 7}: 0.3, {7}: 0.1
    assert pairs == [(1, 0), (2, 1), (3, 2)]
    torch.testing.assert_close(scores, torch.tensor([0.4 / 0.6, 0.3 / 0.7, 0.1 / 0.9], dtype=torch.float64))
    # a distance shared by two pairs stands for the first in MATLAB's column-major order: with
    # centre 3 at 6, the pair (0, 2) is as far apart (9) as (2, 3), and is the one found first
    centres[3, 0] = 6.0
    pairs, _ = candidate_hyperplanes(centres, shares, neighbours=1)
    assert pairs == [(1, 0), (2, 1), (2, 0)]


def litekmeans_numpy(x, k, maxit, start):
    """litekmeans.m (sqeuclidean, start 'sample' given as row indices)."""
    n = x.shape[0]
    center = x[start]
    last, label, it = None, np.zeros(n, dtype=int) - 2, 0
    while (last is None or np.any(label != last)) and it < maxit:
        last = label.copy()
        d = np.sum(center * center, axis=1)[None, :] - 2 * x @ center.T
        label, val = d.argmin(1), d.min(1)
        missing = [c for c in range(k) if c not in set(label)]
        if missing:
            idx = np.argsort(-(val + np.sum(x * x, axis=1)), kind="stable")
            label[idx[: len(missing)]] = missing
        center = np.stack([x[label == c].mean(0) for c in range(k)])
        it += 1
    return label, center


def train_dsh_numpy(x, maxbits, start, alpha=1.5, r=3, iters=3):
    """trainDSH.m (MATLAB's find in column-major order) in numpy."""
    cluster = int(np.floor(maxbits * alpha + 0.5))
    dump, u = litekmeans_numpy(x, cluster, iters, start)
    clusize = np.array([np.sum(dump == i) for i in range(cluster)]) / len(dump)
    du = np.sum((u[:, None] - u[None]) ** 2, axis=2)
    du[np.eye(cluster, dtype=bool)] = np.inf
    dr = np.unique(np.concatenate([np.sort(du[i])[:r] for i in range(cluster)]))

    def find_first(value):
        cols_rows = [(c, rr) for c in range(cluster) for rr in range(cluster) if du[rr, c] == value]
        c, rr = cols_rows[0]
        return rr, c

    bitsize = np.zeros(len(dr))
    for i, value in enumerate(dr):
        id1, id2 = find_first(value)
        w = u[id1] - u[id2]
        th = (u[id1] + u[id2]) / 2 @ w
        num1 = clusize[u @ w > th].sum()
        bitsize[i] = min(num1, 1 - num1) / max(num1, 1 - num1)
    dsorts = np.sort(bitsize)[::-1]
    weights, intercepts = [], []
    for i in range(maxbits):
        ids = int(np.flatnonzero(bitsize == dsorts[i])[0])
        id1, id2 = find_first(dr[ids])
        du[id1, id2] = du[id2, id1] = np.inf
        bitsize[ids] = np.inf
        weights.append(u[id1] - u[id2])
        intercepts.append((u[id1] + u[id2]) / 2 @ weights[-1])
    return np.array(weights), np.array(intercepts)


def test_lite_kmeans_against_litekmeans_in_numpy():
    x, _ = fixed_features(n=40)
    labels, centres = lite_kmeans(torch.from_numpy(x), 7, 3, torch.Generator().manual_seed(4))
    start = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:7].numpy()
    ref_labels, ref_centres = litekmeans_numpy(x, 7, 3, start)
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    np.testing.assert_allclose(centres.numpy(), ref_centres, atol=1e-12)


@pytest.mark.parametrize("bits", [4, 6])
def test_densityhash_against_train_dsh_in_numpy(bits):
    x, _ = fixed_features()
    centred = x - x.mean(0)
    method = build("densityhash", bits, torch.zeros(60, 0), seed=1)
    fitted = method.fit(torch.from_numpy(x), None)
    clusters = int(np.floor(bits * 1.5 + 0.5))
    start = torch.randperm(60, generator=torch.Generator().manual_seed(1))[:clusters].numpy()
    weights, intercepts = train_dsh_numpy(centred, bits, start)
    np.testing.assert_allclose(fitted[0].double().numpy(), weights, atol=1e-5)
    reference = np.where(centred @ weights.T > intercepts, 1.0, -1.0)  # compressDSH.m
    np.testing.assert_array_equal(codes_of(fitted, x), reference)


# --- KSH -----------------------------------------------------------------------------------------


def test_ksh_cost_by_hand():
    # K a = (ln 3, -ln 3): phi = 2 / (1 + 1/3) - 1 = 1/2 and -1/2; S0 = [[1, -1], [-1, 1]]:
    # y^T S y = 1/4 + 1/4 + 1/4 + 1/4 = 1, the cost is -1
    kernel = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    similarity = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert projection_cost(kernel, similarity, torch.tensor([math.log(3)], dtype=torch.float64)) == pytest.approx(-1)
    a, costs = optimise_projection(kernel, similarity, torch.tensor([0.1], dtype=torch.float64), 50)
    assert costs[-1] < costs[0] and abs(float(a[0])) > 0.1  # pushes the two apart


def opt_projection_fast_numpy(k, s, a0, cn):
    """OptProjectionFast.m in numpy."""
    n = k.shape[0]
    phi = lambda v: 2 * (1 + np.exp(-v)) ** -1 - 1  # noqa: E731
    cost = [0.0] * (cn + 2)
    y = phi(k @ a0)
    cost[0] = cost[1] = -y @ s @ y
    a1 = a0.copy()
    delta, beta = [0.0, 1.0] + [0.0] * cn, [1.0] + [0.0] * cn
    for t in range(cn):
        alpha = (delta[t] - 1) / delta[t + 1]
        v = a1 + alpha * (a1 - a0)
        with np.errstate(over="ignore"):  # exp(-v) overflows to inf for v << 0: phi = -1, as MATLAB
            y1 = phi(k @ v)
        gv = -y1 @ s @ y1
        dgv = -k.T @ ((s @ y1) * (1 - y1**2))
        flag = False
        for j in range(51):
            b = 2**j * beta[t]
            z = v - dgv / b
            with np.errstate(over="ignore"):
                y1 = phi(k @ z)
            gz = -y1 @ s @ y1
            dif = z - v
            if gz <= gv + dgv @ dif + b * dif @ dif / 2:
                flag = True
                beta[t + 1], a0, a1, cost[t + 2] = b, a1, z, gz
                break
        if not flag:
            break
        delta[t + 2] = (1 + np.sqrt(1 + 4 * delta[t + 1] ** 2)) / 2
        if abs(cost[t + 2] - cost[t + 1]) / n <= 1e-2:
            break
    return a1


def ksh_numpy(kk, labels, r, cn):
    """KSH_demo.m's projection optimisation (scipy's eig(LM, RM) as MATLAB's) in numpy."""
    from scipy.linalg import eig

    trn = kk.shape[0]
    s = r * np.where(labels @ labels.T > 0, 1.0, -1.0)
    rm = kk.T @ kk
    a1 = np.zeros((kk.shape[1], r))
    y = None
    for rr in range(r):
        if rr > 0:
            s = s - np.outer(y, y)
        values, vectors = eig(kk.T @ s @ kk, rm)
        a = np.real(vectors[:, np.argsort(-np.real(values))[0]])
        a = np.sqrt(trn / (a @ rm @ a)) * a
        get_vec = opt_projection_fast_numpy(kk, s, a, cn)
        y = np.where(kk @ a > 0, 1.0, -1.0)
        y1 = np.where(kk @ get_vec > 0, 1.0, -1.0)
        if y1 @ s @ y1 > y @ s @ y:
            a, y = get_vec, y1
        a1[:, rr] = a
    return a1


def test_ksh_against_ksh_demo_in_numpy():
    x, y = fixed_features(n=60)
    method = build("ksh", 4, torch.from_numpy(y), anchors=15, labelled=40, iterations=30)
    head = method.fit(torch.from_numpy(x), torch.from_numpy(y))
    assert isinstance(head, RBFHead)
    generator = torch.Generator().manual_seed(0)
    anchors = x[torch.randperm(60, generator=generator)[:15].numpy()]
    labelled = torch.randperm(60, generator=generator)[:40].numpy()
    ktrain = np.sum((x[:, None] - anchors[None]) ** 2, axis=2)  # sqdist
    sigma = ktrain.mean(1).mean()
    ktrain = np.exp(-ktrain / (2 * sigma))
    ktrain = ktrain - ktrain.mean(0)  # mvec
    a1 = ksh_numpy(ktrain[labelled], y[labelled], 4, 30)
    reference = np.where(ktrain @ a1 > 0, 1.0, -1.0)  # Y = A1' KTrain' > 0
    assert_equal_up_to_bit_signs(codes_of(head, x), reference)
    np.testing.assert_allclose(float(head.sigma) ** 2, sigma, rtol=1e-6)


# --- FSDH ----------------------------------------------------------------------------------------


def test_fsdh_one_round_by_hand():
    # nu = 0: W = (Y^T Y + I)^-1 Y^T B, so Y W gives each item its class's code sum / (n_c + 1),
    # and B = its sign: every item takes its class's majority code (ties +1)
    x, y = fixed_features(n=12, classes=2)
    method = build("fsdh", 3, torch.from_numpy(y), anchors=6, iterations=1, nu=0.0)
    start = method.initial_codes(12)
    method.fit(torch.from_numpy(x), torch.from_numpy(y))
    for c in range(2):
        rows = torch.from_numpy(y[:, c] == 1)
        majority = torch.where(start[rows].sum(0) >= 0, 1.0, -1.0)
        assert torch.equal(method.fitted_codes[rows], majority.expand(int(rows.sum()), 3))


def test_fsdh_against_its_algorithm_in_numpy():
    x, y = fixed_features()
    method = build("fsdh", 6, torch.from_numpy(y), anchors=20, nu=0.1)
    head = method.fit(torch.from_numpy(x), torch.from_numpy(y))
    index = method.choose_anchors(torch.from_numpy(x)).numpy()
    sigma = method.kernel_width(torch.from_numpy(x), torch.from_numpy(index))
    phi = np.exp(-np.sum((x[:, None] - x[index][None]) ** 2, axis=2) / (2 * sigma**2))
    phi = np.hstack([phi, np.ones((60, 1))])
    b = method.initial_codes(60).numpy()
    ridge = lambda a, t, lam: np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ t)  # noqa: E731
    for _ in range(5):
        p = ridge(phi, b, 0.01)
        w = ridge(y, b, 1.0)
        b = np.sign(y @ w + 0.1 * phi @ p)
    p = ridge(phi, b, 0.01)
    np.testing.assert_array_equal(method.fitted_codes.numpy(), b)
    np.testing.assert_allclose(head.weight.double().numpy(), p[:-1].T, atol=1e-4)


# --- IMH -----------------------------------------------------------------------------------------


def test_anchor_embedding_head_by_hand():
    anchors = torch.tensor([[0.0], [1.0], [10.0]])
    embedding = torch.tensor([[1.0, -1.0], [-1.0, 3.0], [5.0, 5.0]])
    head = AnchorEmbeddingHead.fitted(anchors, embedding, neighbours=2, bandwidth=1.0)
    # x = 0.5: the two nearest anchors 0 and 1 at squared distance 0.25 each: weights 1/2, 1/2
    torch.testing.assert_close(head(torch.tensor([[0.5]])), torch.tensor([[0.0, 1.0]]))
    # x = 0: squared distances 0 and 1: weights e^0 / (1 + e^-1), e^-1 / (1 + e^-1)
    w = 1 / (1 + math.exp(-1))
    expected = torch.tensor([[w * 1 + (1 - w) * -1, w * -1 + (1 - w) * 3]])
    torch.testing.assert_close(head(torch.tensor([[0.0]])), expected)


def test_imh_follows_fire_imh_loss():
    x, _ = fixed_features(n=60)
    method = build("imh", 3, torch.zeros(60, 0), anchors=12, kmeans_iter=10)
    head = method.fit(torch.from_numpy(x), None)
    # FIRe: weights exp(-d / bandwidth) over the k nearest centres, normalised, times the t-SNE base set
    d = np.sum((x[:, None] - head.anchors.double().numpy()[None]) ** 2, axis=2)
    neighbours = np.argsort(d, axis=1, kind="stable")[:, :5]
    w = np.exp(-np.take_along_axis(d, neighbours, 1) / 512.0)
    w /= w.sum(1, keepdims=True)
    v = (w[:, :, None] * head.embedding.double().numpy()[neighbours]).sum(1)
    np.testing.assert_allclose(head(torch.from_numpy(x).float()).double().numpy(), v, rtol=1e-4, atol=1e-4)
    again = build("imh", 3, torch.zeros(60, 0), anchors=12, kmeans_iter=10).fit(torch.from_numpy(x), None)
    torch.testing.assert_close(again.embedding, head.embedding)


# --- heads, errors, CLI ---------------------------------------------------------------------


def test_heads_rebuild_from_their_config():
    x, y = fixed_features(n=40)
    features = torch.from_numpy(x).float()
    for name, params in [("sklsh", {}), ("sh", {}), ("imh", {"anchors": 8, "kmeans_iter": 5})]:
        head = build(name, 3, torch.zeros(40, 0), **params).fit(torch.from_numpy(x), None)
        empty = create_head(head.config)
        empty.load_state_dict(head.state_dict())
        torch.testing.assert_close(empty(features), head(features))


@pytest.mark.parametrize(
    "name, bits, params, message",
    [
        ("pcah", 9, {}, "exceeds the feature dimension"),
        ("densityhash", 30, {}, "clusters needs"),
        ("sklsh", 4, {"scale": "median"}, "choose neighbours"),
        ("fsdh", 4, {"sigma": "wide"}, "sigma='wide'"),
        ("ksh", 4, {"labelled": 1}, "labelled"),
    ],
)
def test_bad_parameters_and_inputs_are_one_line_errors(name, bits, params, message):
    x, y = fixed_features(n=20)
    with pytest.raises(DmuhError, match=message):
        build(name, bits, torch.from_numpy(y), **params).fit(torch.from_numpy(x), torch.from_numpy(y))


CLI_PARAMS = {
    "lfh": ["settings=authors"],
    "ksh": ["anchors=40", "labelled=200", "iterations=20"],
    "fsdh": ["anchors=100"],
    "imh": ["anchors=40"],
}


@pytest.mark.parametrize("name", NAMES)
def test_training_on_digits_through_the_cli_and_resume(tmp_path, name):
    row = train_and_resume_on_digits(tmp_path / name, name, params=CLI_PARAMS.get(name, []))
    assert row["map"] > 0.1


# --- LFH with the authors' settings (LFH_nstop.m) ----------------------------------------------


def test_lfh_authors_initial_factors_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]], dtype=torch.float64)
    lfh = create_method("lfh", bits=3, num_train=3, num_classes=2, settings="authors")
    # D = 2 <= q = 3: the feature columns 1, 2, 1 (idx = mod(0:Q-1, D) + 1)
    assert lfh.authors_initial_factors(x).tolist() == [[1.0, 2.0, 1.0], [3.0, 5.0, 3.0], [0.0, 1.0, 0.0]]
    with pytest.raises(DmuhError, match="drop -p columns"):
        create_method("lfh", bits=3, num_train=3, num_classes=2, settings="authors", columns=8)


def test_lfh_authors_settings_against_lfh_nstop_in_numpy():
    x, y = fixed_features(n=40, dim=8)
    q, beta, lam, iterations = 4, 30.0, 1.0, 6
    lfh = create_method("lfh", bits=q, num_train=40, num_classes=3, settings="authors", iterations=iterations)
    weight, bias = lfh.fit(torch.from_numpy(x), torch.from_numpy(y))
    # LFH_nstop.m: U0 = PCA(X1, Q) (scores of the centred data), betaNorm = beta / Q, NT with lambda N / D
    centred = x - x.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    u = centred @ vectors[:, np.argsort(-values)[:q]]
    signs = np.sign(np.sum(u * lfh.authors_initial_factors(torch.from_numpy(x)).numpy(), axis=0))
    u = u * signs  # a principal direction's sign is arbitrary: take ours
    generator = torch.Generator().manual_seed(0 + 1)
    beta_norm = beta / q
    for _ in range(iterations):  # learnUStochastic (learnUStochasticQuick2.m)
        sc = torch.randperm(40, generator=generator)[:q].numpy()  # randsample(N, Q), drawn as ours
        s = (y @ y[sc].T > 0).astype(float)
        t = u @ u[sc].T / 2
        a = 1 / (1 + np.exp(-t))
        ix = np.setdiff1d(np.arange(40), sc)
        g = (s[ix] - a[ix]) @ u[sc] - u[ix] / beta_norm
        h = -u[sc].T @ u[sc] / 8 - np.eye(q) / beta_norm
        u[ix] = u[ix] - g @ np.linalg.inv(h)
    np.testing.assert_allclose(lfh.fitted_factors.numpy(), u, atol=1e-8)
    nt = np.linalg.solve(x.T @ x + lam * 40 / 8 * np.eye(8), x.T)
    np.testing.assert_allclose(weight.double().numpy().T, nt @ u, rtol=1e-5, atol=1e-5)
    assert torch.all(bias == 0)


@pytest.mark.parametrize("name", ["sklsh", "sh", "imh"])
def test_new_heads_export_to_onnx_with_the_codes_of_pytorch(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    from cli_runs import DIGITS_NETWORK

    from dmuh.cli import main
    from dmuh.data import DigitsSource
    from dmuh.retrieval.encoder import load_encoder

    run = tmp_path / name
    command = ["train", "--method", name, "--data", "digits", "--protocol", "digits", *DIGITS_NETWORK, "--bits", "8"]
    command += ["--epochs", "1", "--trace-items", "0", "--quiet", "--out", str(run)]
    assert main(command + (["-p", "anchors=30"] if name == "imh" else [])) == 0
    assert main(["export-onnx", "--checkpoint", str(run), "--out", str(tmp_path / "model.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = DigitsSource().decode(np.arange(64))
    pixels = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    codes, binary = session.run(["codes", "binary"], {"inputs": pixels})
    h, _ = load_encoder(run).continuous(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(codes, h.numpy(), atol=1e-4)
    assert np.mean(binary == np.where(h.numpy() >= 0, 1, -1)) > 0.99  # a code within 1e-4 of 0 may round either way
