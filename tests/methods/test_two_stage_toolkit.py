"""Issue #33's two-stage and asymmetric deep methods: Liong et al.'s deep DH / SDH / SDH-C, CNNH
and ADSH. Each loss against a hand-computed case, against its reference formula written here in the
style of the reference code (loss and gradient), and end to end through the CLI with --resume."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmuh.cli import main
from dmuh.codes.binary import sign
from dmuh.data.protocols import make_split
from dmuh.engine.builder import encode_items, encode_part, evaluate_map, load_run
from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method
from dmuh.methods.components.two_stage import cnnh_stage_one
from tests.methods.cli_runs import train_and_resume_on_digits

ONE_HOT = torch.eye(3)


def atanh(values):
    return torch.atanh(torch.tensor(values, dtype=torch.float32))


# -- deep SDH (FIRe's SDHLoss / SDHLossC) ----------------------------------------------------------


def fire_sdh_loss(z, y, weight, lmbd0=0.001, lmbd1=1.0, lmbd2=0.001, alpha=1.0):
    """CISiPLab/cisip-FIRe functions/loss/sdh.py SDHLoss.forward (ind=None: the batch against
    itself), written again here: z are the raw outputs (the loss applies tanh)."""
    u = torch.tanh(z)
    u1 = u2 = u
    similarity = (y.float() @ y.float().t() >= 1).float()
    j1 = torch.sum((u - u.sign()) ** 2, 1).mean()
    j2_1 = torch.trace(torch.matmul(u.t(), u))
    hdiff = u1.unsqueeze(0) - u2.unsqueeze(1)
    hdiff = torch.matmul(hdiff.unsqueeze(3), hdiff.unsqueeze(2))
    posn = (similarity > 0).float().sum()
    negn = (similarity <= 0).float().sum()
    similarity = similarity.view(u.size(0), u.size(0), 1, 1)
    hpos = (hdiff * similarity).sum(dim=(0, 1)) / (posn + 1e-7)
    hneg = (hdiff * (1 - similarity)).sum(dim=(0, 1)) / (negn + 1e-7)
    j2_2 = torch.trace(hneg - hpos)
    j2 = (j2_1 + alpha * j2_2) / 2
    ortho = torch.matmul(weight, weight.t())
    j3 = torch.sum((ortho - torch.ones_like(ortho)) ** 2) / 2
    return lmbd0 * j1 - lmbd1 * j2 + lmbd2 * j3


def fire_sdhc_loss(logits, code_logits, labels, weight, lmbd0=0.001, lmbd1=0.001, lmbd2=0.001, alpha=1.0):
    """FIRe's SDHLossC.forward, written again here: code_logits are the network's tanh codes."""
    labels = labels.argmax(1)
    u = code_logits
    j1 = torch.pow(u - u.sign(), 2).mean()
    j2_1 = torch.trace(torch.matmul(u.t(), u)) / u.size(1)
    j2_2 = F.cross_entropy(logits, labels)
    ortho = torch.matmul(weight, weight.t())
    j3 = torch.pow(ortho - torch.ones_like(ortho), 2).mean()
    return lmbd0 * j1 - lmbd1 * (j2_1 / 2) + alpha * j2_2 + lmbd2 * j3


def sdh_step(z, labels, weight):
    return StepInputs(outputs=z, labels=labels, indices=torch.arange(z.shape[0]), hash_weight=weight)


def test_deep_sdh_by_hand():
    # h = tanh(z): h1 = (0.5, -0.5), h2 = (0.5, 0.5), of two classes; W = diag(1, 2).
    z = atanh([[0.5, -0.5], [0.5, 0.5]])
    labels = ONE_HOT[[0, 1]]
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    terms = create_method("deep-sdh", bits=2, num_train=2, num_classes=3)(sdh_step(z, labels, weight))
    # J1: each item (0.5 - 1)^2 + (-0.5 + 1)^2 = 0.5, mean 0.5; tr(H^T H) = 4 * 0.25 = 1.
    # Pairs: (1,1), (2,2) similar at distance 0; (1,2), (2,1) dissimilar at ||(0, -1)||^2 = 1.
    # W W^T - I = diag(0, 3): squared sum 9, halved 4.5.
    expected = {
        "quantization": 0.001 * 0.5,
        "variance": -1.0 * (1.0 / 2) / 2,  # tr(H^T H) over the 2 items (the paper's 1/N)
        "pairwise": -1.0 * 1.0 * (2 / 2 - 0 / 2) / 2,
        "orthogonality": 0.001 * 9 / 2,
    }
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-6), key
    # FIRe's target of W W^T, all ones: [[0, -1], [-1, 3]] squared sums to 11.
    fire = create_method("deep-sdh", bits=2, num_train=2, num_classes=3, ortho_target="ones", variance_reduction="sum")
    fire_terms = fire(sdh_step(z, labels, weight))
    assert fire_terms["orthogonality"].item() == pytest.approx(0.001 * 11 / 2)
    assert fire_terms["variance"].item() == pytest.approx(-1.0 * 1.0 / 2)  # FIRe's sum over the batch


def test_deep_sdh_c_by_hand():
    z = atanh([[0.5, -0.5], [0.5, 0.5]])
    labels = ONE_HOT[[0, 1], :2]
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    method = create_method("deep-sdh-c", bits=2, num_train=2, num_classes=2)
    with torch.no_grad():  # logits = h: item 1 (0.5, -0.5) of class 0, item 2 (0.5, 0.5) of class 1
        method.classifier.weight.copy_(torch.eye(2))
        method.classifier.bias.zero_()
    terms = method(sdh_step(z, labels, weight))
    # J1 = mean of (h - sign h)^2 = 0.25; tr(H^T H) / K = 1 / 2; mean (W W^T - I)^2 = 9 / 4.
    # CE: item 1 -log(e^0.5 / (e^0.5 + e^-0.5)), item 2 -log(e^0.5 / (2 e^0.5)) = log 2.
    cross_entropy = (math.log(1 + math.exp(-1.0)) + math.log(2)) / 2
    expected = {
        "quantization": 0.001 * 0.25,
        "variance": -0.001 * (1.0 / 2) / 2,
        "classification": cross_entropy,
        "orthogonality": 0.001 * 9 / 4,
    }
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-6), key


def random_sdh_batch(seed=0, batch=8, bits=6, dim=5):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, bits, generator=generator, dtype=torch.float64) * 1.5
    labels = ONE_HOT[torch.randint(0, 3, (batch,), generator=generator)]
    weight = torch.randn(bits, dim, generator=generator, dtype=torch.float64) * 0.5
    return z, labels, weight


def test_deep_sdh_matches_fire_loss_and_gradient():
    z, labels, weight = random_sdh_batch()
    mine_z, mine_w = z.clone().float().requires_grad_(), weight.clone().float().requires_grad_()
    method = create_method(
        "deep-sdh", bits=6, num_train=8, num_classes=3, ortho_target="ones", alpha=0.7, variance_reduction="sum"
    )
    mine = sum(method(sdh_step(mine_z, labels, mine_w)).values())
    mine.backward()
    ref_z, ref_w = z.clone().float().requires_grad_(), weight.clone().float().requires_grad_()
    reference = fire_sdh_loss(ref_z, labels, ref_w, alpha=0.7)
    reference.backward()
    torch.testing.assert_close(mine, reference)
    torch.testing.assert_close(mine_z.grad, ref_z.grad)
    torch.testing.assert_close(mine_w.grad, ref_w.grad)


def test_deep_sdh_c_matches_fire_loss_and_gradient():
    z, labels, weight = random_sdh_batch(seed=1)
    method = create_method("deep-sdh-c", bits=6, num_train=8, num_classes=3, ortho_target="ones")
    mine_z, mine_w = z.clone().float().requires_grad_(), weight.clone().float().requires_grad_()
    mine = sum(method(sdh_step(mine_z, labels, mine_w)).values())
    mine.backward()
    ref_z, ref_w = z.clone().float().requires_grad_(), weight.clone().float().requires_grad_()
    classifier = torch.nn.Linear(6, 3)
    classifier.load_state_dict(method.classifier.state_dict())
    code_logits = torch.tanh(ref_z)  # FIRe's network ends in tanh (hash_fc_output: tanh)
    reference = fire_sdhc_loss(classifier(code_logits), code_logits, labels, ref_w)
    reference.backward()
    torch.testing.assert_close(mine, reference)
    torch.testing.assert_close(mine_z.grad, ref_z.grad)
    torch.testing.assert_close(mine_w.grad, ref_w.grad)
    torch.testing.assert_close(method.classifier.weight.grad, classifier.weight.grad)


def test_deep_dh_is_deep_sdh_without_its_supervised_term_and_reads_no_label():
    z, labels, weight = random_sdh_batch(seed=2)
    dh = create_method("deep-dh", bits=6, num_train=8, num_classes=0)
    assert not dh.requirements().labels and dh.requirements().hash_weight
    unlabelled = dh(sdh_step(z.float(), torch.zeros(8, 0), weight.float()))
    sdh = create_method("deep-sdh", bits=6, num_train=8, num_classes=3)
    supervised = sdh(sdh_step(z.float(), labels, weight.float()))
    assert set(unlabelled) == {"quantization", "variance", "orthogonality"}
    for key, value in unlabelled.items():
        assert torch.equal(value, supervised[key])


# -- CNNH (DeepHash-pytorch CNNH.py) ------------------------------------------------------------------


def deephash_stage_one(S, q, T, H, orders):
    """swuxyj/DeepHash-pytorch CNNH.py CNNHLoss.stage_one, written again here with the start H and
    each sweep's order of the (i, j) entries given (the reference draws them with rand and shuffle)."""
    n = H.shape[0]
    L = H @ H.t() - q * S
    permutation = [(i, j) for i in range(n) for j in range(q)]
    for t in range(T):
        H_temp = H.clone()
        L_temp = L.clone()
        for index in orders[t]:
            i, j = permutation[index]
            g_prime_Hij = 4 * L[i, :] @ H[:, j]
            g_prime_prime_Hij = 4 * (H[:, j].t() @ H[:, j] + H[i, j].pow(2) + L[i, i])
            d = (-g_prime_Hij / g_prime_prime_Hij).clamp(min=-1 - H[i, j], max=1 - H[i, j])
            L[i, :] = L[i, :] + d * H[:, j].t()
            L[:, i] = L[:, i] + d * H[:, j]
            L[i, i] = L[i, i] + d * d
            H[i, j] = H[i, j] + d
        if L.pow(2).mean() >= L_temp.pow(2).mean():
            H = H_temp
            L = L_temp
    return H


def test_cnnh_stage_one_by_hand():
    # One item, one bit, S = [[1]]: L = h^2 - 1, g' = 4 L h, g'' = 4 (h^2 + h^2 + L) = 4 (3 h^2 - 1).
    # h = 0.5: g' = 4 (-0.75)(0.5) = -1.5, g'' = 4 (0.75 - 1) = -1, d = -1.5 (within [-1.5, 0.5]): h = -1.
    # h = 0.8: g' = 4 (-0.36)(0.8) = -1.152, g'' = 4 (1.92 - 1) = 3.68, d = 0.313 clamped to 0.2: h = 1.
    # Both end at L = 0, below the start's: the sweep is kept.
    similar = torch.ones(1, 1)
    for start, expected in ((0.5, -1.0), (0.8, 1.0)):
        codes = cnnh_stage_one(similar, 1, 1, torch.Generator().manual_seed(0), start=torch.tensor([[start]]))
        assert codes.item() == pytest.approx(expected, abs=1e-12)


def test_cnnh_stage_one_matches_deephash_pytorch():
    generator = torch.Generator().manual_seed(4)
    n, q, sweeps = 12, 4, 3
    labels = ONE_HOT[torch.randint(0, 3, (n,), generator=generator)]
    similar = (labels @ labels.t() > 0).double() * 2 - 1
    start = 2 * torch.rand((n, q), generator=generator, dtype=torch.float64) - 1
    mine = cnnh_stage_one(similar, q, sweeps, torch.Generator().manual_seed(9), start=start)
    orders = torch.Generator().manual_seed(9)
    orders = [torch.randperm(n * q, generator=orders).tolist() for _ in range(sweeps)]
    reference = deephash_stage_one(similar, q, sweeps, start.clone(), orders)
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-10)
    assert torch.equal(mine.sign(), reference.sign())

    # ...and stage 1 does its job: ||H H^T - q S||^2 falls to a third of the start's (2167 -> 719)
    # here, and at 8 bits the signs of the codes' inner products give S back exactly.
    def residual(codes, bits):
        return (codes @ codes.t() - bits * similar).pow(2).sum()

    assert residual(mine, q) < residual(start, q) / 2
    wide = cnnh_stage_one(similar, 8, sweeps, torch.Generator().manual_seed(9)).sign()
    assert torch.equal((wide @ wide.t()).sign(), similar)


def test_cnnh_regresses_its_outputs_on_the_target_codes_by_hand():
    method = create_method("cnnh", bits=2, num_train=2, num_classes=3)
    method.target_codes.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    method.solved.fill_(True)
    z = torch.tensor([[0.5, -2.0], [0.0, 1.0]])
    terms = method(StepInputs(outputs=z, labels=ONE_HOT[[0, 1]], indices=torch.tensor([0, 1])))
    # residuals (-0.5, -1) and (1, 0): (0.25 + 1 + 1 + 0) / (2 items * 2 bits)
    assert terms["regression"].item() == pytest.approx(2.25 / 4)
    # CNNH+: two class units (features (1, 2) and (0, 1), identity map, no bias) regressed on Y,
    # with the hash units one Euclidean loss over q + c = 4 units.
    plus = create_method("cnnh-plus", bits=2, num_train=2, num_classes=2, reference_dim=2)
    plus.load_state_dict({**plus.state_dict(), "target_codes": method.target_codes, "solved": method.solved})
    with torch.no_grad():
        plus.class_units.weight.copy_(torch.eye(2))
        plus.class_units.bias.zero_()
    step = StepInputs(
        outputs=z, labels=ONE_HOT[[0, 1], :2], indices=torch.tensor([0, 1]), features=torch.tensor([[1.0, 2.0], [0, 1]])
    )
    terms = plus(step)
    assert terms["regression"].item() == pytest.approx(2.25 / (2 * 4))
    # class residuals (1 - 1, 2 - 0) and (0 - 0, 1 - 1): 4 / (2 * 4)
    assert terms["labels"].item() == pytest.approx(4 / 8)


def test_cnnh_solves_stage_one_once_and_a_checkpoint_keeps_it():
    labels = ONE_HOT[torch.arange(10) % 3]
    method = create_method("cnnh", bits=4, num_train=10, num_classes=3, train_labels=labels, sweeps=2)
    assert not bool(method.solved)
    method.on_epoch_start(1, 2)
    assert bool(method.solved) and set(method.target_codes.unique().tolist()) <= {-1.0, 1.0}
    again = create_method("cnnh", bits=4, num_train=10, num_classes=3, train_labels=labels, sweeps=2)
    again.learn_target_codes()
    assert torch.equal(again.target_codes, method.target_codes)  # seeded
    resumed = create_method("cnnh", bits=4, num_train=10, num_classes=3, train_labels=labels, sweeps=2)
    resumed.load_state_dict(method.state_dict())
    resumed.learn_target_codes = lambda: pytest.fail("stage 1 solved again on resuming")
    resumed.on_epoch_start(2, 2)
    assert torch.equal(resumed.target_codes, method.target_codes)


# -- ADSH (jiangqy/ADSH-AAAI2018 ADSH_pytorch) -------------------------------------------------------


def authors_calc_sim(database_label, train_label):
    """ADSH_CIFAR_10.py calc_sim, written again here: +1 similar, -r dissimilar."""
    S = (database_label.mm(train_label.t()) > 0).type(torch.FloatTensor)
    r = S.sum() / (1 - S).sum()
    return S * (1 + r) - r


def authors_adsh_loss(u, V, S, V_omega, gamma, code_length, num_train):
    """utils/adsh_loss.py ADSHLoss.forward, written again here (on the CPU)."""
    batch_size = u.size(0)
    V = torch.from_numpy(V).type(torch.FloatTensor)
    V_omega = torch.from_numpy(V_omega).type(torch.FloatTensor)
    square_loss = (u.mm(V.t()) - code_length * S) ** 2
    quantization_loss = gamma * (V_omega - u) ** 2
    return (square_loss.sum() + quantization_loss.sum()) / (num_train * batch_size)


def authors_update_v(V, U, Sim, select_index, gamma, code_length):
    """ADSH_CIFAR_10.py's "learning binary codes: discrete coding", written again here."""
    num_database = V.shape[0]
    barU = np.zeros((num_database, code_length))
    barU[select_index, :] = U
    Q = -2 * code_length * Sim.cpu().numpy().transpose().dot(U) - 2 * gamma * barU
    for k in range(code_length):
        sel_ind = np.setdiff1d([ii for ii in range(code_length)], k)
        V_ = V[:, sel_ind]
        Uk = U[:, k]
        U_ = U[:, sel_ind]
        V[:, k] = -np.sign(Q[:, k] + 2 * V_.dot(U_.transpose().dot(Uk)))
    return V


def adsh_method(labels, bits, samples, **params):
    return create_method("adsh", bits=bits, train_labels=labels, samples=samples, **params)


def test_adsh_loss_and_code_update_by_hand():
    # Three database items (classes 0, 0, 1), two bits; Omega = items 0 and 2 (set by hand).
    labels = ONE_HOT[[0, 0, 1]]
    method = adsh_method(labels, bits=2, samples=2, gamma=2.0)
    method.on_epoch_start(1, 1)
    method.omega.copy_(torch.tensor([0, 2]))
    method.slot.copy_(torch.tensor([0, -1, 1]))
    # S~ of Omega (rows 0, 2) against all 3: [[1, 1, 0], [0, 0, 1]]: 3 similar, 3 dissimilar, r = 1.
    method.dissimilar.fill_(1.0)
    method.codes.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]))
    z = atanh([[0.5, 0.5]])  # u = (0.5, 0.5) for item 0
    terms = method(StepInputs(outputs=z, labels=labels[[0]], indices=torch.tensor([0])))
    # u . V_j = (1, 0, -1); q S~_0j = (2, 2, -2); squared residuals 1 + 4 + 1 = 6.
    # ||V_0 - u||^2 = 0.25 + 0.25, times gamma 2 = 1. Both over n B = 3 * 1.
    assert terms["pairwise"].item() == pytest.approx(6 / 3)
    assert terms["quantization"].item() == pytest.approx(1 / 3)
    assert torch.equal(method.sample_outputs, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    # V update with U = [[0.5, 0.5], [-0.5, 0.5]] (rows of items 0 and 2):
    method.sample_outputs.copy_(torch.tensor([[0.5, 0.5], [-0.5, 0.5]]))
    # S~^T U: item 0 (+1, -1) -> (1, 0); item 1 (+1, -1) -> (1, 0); item 2 (-1, +1) -> (-1, 0).
    # Q = -2 q S~^T U - 2 gamma U_bar = -4 S~^T U - 4 U_bar:
    #   item 0: (-4, 0) - (2, 2) = (-6, -2); item 1: (-4, 0); item 2: (4, 0) - (-2, 2) = (6, -2).
    # U^T U = [[0.5, 0], [0, 0.5]]: the off-diagonal is 0, so V_:k = -sign(Q_:k): bit 0 (+1, +1, -1);
    # bit 1 (+1, sign(0) -> -1 here as -sign(0) = -(+1), +1).
    method.update_codes()
    assert torch.equal(method.codes, torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]))


def test_adsh_matches_the_authors_loss_gradient_and_code_update():
    generator = torch.Generator().manual_seed(5)
    n, bits, samples, batch, gamma = 20, 6, 8, 4, 200.0
    labels = ONE_HOT[torch.randint(0, 3, (n,), generator=generator)]
    method = adsh_method(labels, bits=bits, samples=samples, gamma=gamma, seed=3)
    method.on_epoch_start(1, 3)
    select_index = method.omega.numpy()
    V = np.sign(torch.randn(n, bits, generator=generator).numpy()).astype(np.float64)
    method.codes.copy_(torch.from_numpy(V))
    Sim = authors_calc_sim(labels[select_index], labels)
    assert method.dissimilar.item() == pytest.approx(-Sim.min().item())  # r of the sampled block

    z = torch.randn(batch, bits, generator=generator)
    batch_ind = select_index[:batch]
    mine_z = z.clone().requires_grad_()
    mine = sum(
        method(StepInputs(outputs=mine_z, labels=labels[batch_ind], indices=torch.from_numpy(batch_ind))).values()
    )
    mine.backward()
    ref_z = z.clone().requires_grad_()
    reference = authors_adsh_loss(torch.tanh(ref_z), V, Sim[:batch], V[batch_ind, :], gamma, bits, n)
    reference.backward()
    torch.testing.assert_close(mine, reference)
    torch.testing.assert_close(mine_z.grad, ref_z.grad)

    U = np.tanh(torch.randn(samples, bits, generator=generator).numpy()).astype(np.float64)
    method.sample_outputs.copy_(torch.from_numpy(U))
    expected = authors_update_v(V.copy(), U, Sim, select_index, gamma, bits)
    method.update_codes()
    assert (expected != 0).all()  # no tie, where numpy's sign(0) = 0 would differ from dmuh's +1
    assert torch.equal(method.codes, torch.from_numpy(expected).float())


def test_adsh_samples_once_per_iteration_and_updates_its_codes_after_it():
    labels = ONE_HOT[torch.arange(30) % 3]
    method = adsh_method(labels, bits=4, samples=10, passes=2)
    method.on_epoch_start(1, 4)
    first = method.omega.clone()
    assert torch.equal(method.epoch_items(1), first) and len(first.unique()) == 10
    method.on_epoch_end(1, 4)
    assert not method.codes.any()  # mid-iteration: V untouched
    method.sample_outputs.copy_(torch.tanh(torch.randn(10, 4)))
    method.on_epoch_start(2, 4)
    assert torch.equal(method.omega, first)
    method.on_epoch_end(2, 4)
    assert method.codes.abs().eq(1).all()
    method.on_epoch_start(3, 4)
    assert not torch.equal(method.omega, first) and not method.sample_outputs.any()
    again = adsh_method(labels, bits=4, samples=10, passes=2)
    again.on_epoch_start(3, 4)  # seeded by (seed, round): a resumed run draws the same
    assert torch.equal(again.omega, method.omega)


def test_adsh_retrieves_the_database_by_its_learned_codes_and_trains_on_the_sample(tmp_path):
    out = tmp_path / "adsh"
    asymmetric = ["--protocol", "asymmetric", "--protocol-param", "query_per_class=30"]
    last = train_and_resume_on_digits(out, "adsh", params=["samples=128", "passes=1"], extra=asymmetric)
    assert last["images_per_s"] * last["seconds"] == pytest.approx(128)  # two batches of 64: Omega only
    exp = load_run(out)
    assert exp.split.protocol == "asymmetric" and np.array_equal(exp.split.train, exp.split.database)
    database = encode_part(exp, "database")
    assert torch.equal(database, exp.method.codes)  # train = database, in the same order
    network = encode_items(exp, exp.split.database)
    assert not torch.equal(sign(network), exp.method.codes)
    assert evaluate_map(exp) == pytest.approx(last["map"])


def test_the_asymmetric_protocols_train_on_the_database():
    labels = np.repeat(np.arange(10), 6000)
    split = make_split("cifar10-asym", labels, seed=0)
    assert (len(split.query), len(split.train), len(split.database)) == (1000, 59000, 59000)
    assert np.array_equal(split.train, split.database) and not np.isin(split.query, split.train).any()
    assert np.bincount(labels[split.query], minlength=10).tolist() == [100] * 10
    small = make_split("asymmetric", labels[:300], seed=1, query_per_class=3)
    assert len(small.query) == 3 and np.array_equal(small.train, small.database)  # the 300 are all class 0


def test_adsh_says_when_its_sample_is_smaller_than_a_batch(tmp_path, capsys):
    command = ["train", "--method", "adsh", "--data", "digits", "--protocol", "asymmetric"]
    command += ["--protocol-param", "query_per_class=30", "--model", "smallcnn", "--model-param", "input_size=8"]
    command += ["--epochs", "1", "--batch-size", "64", "-p", "samples=32", "--init", "scratch", "--quiet"]
    command += ["--out", str(tmp_path / "run")]
    assert main(command) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == (
        "dmuh train: error: method 'adsh' runs epoch 1 over 32 training items, fewer than a batch of 64: lower --batch-size"
    )


def test_sizes_stage_one_and_the_sample_cannot_take_are_refused_by_name():
    with pytest.raises(DmuhError, match=r"^method 'cnnh': stage 1 holds the n x n similarity .* 30,001 items here"):
        create_method("cnnh", bits=4, train_labels=torch.zeros(30_001, 2))
    with pytest.raises(DmuhError, match=r"^method 'adsh': samples=2000 query points sampled from 50 training items"):
        create_method("adsh", bits=4, train_labels=ONE_HOT[torch.arange(50) % 3])


# -- every method through the CLI, and through --resume ----------------------------------------------


CLI_PARAMS = {"cnnh": ["sweeps=1"], "cnnh-plus": ["sweeps=1"]}


@pytest.mark.parametrize("name", ["deep-sdh", "deep-sdh-c", "deep-dh", "cnnh", "cnnh-plus"])
def test_trains_and_resumes_through_the_cli(tmp_path, name):
    train_and_resume_on_digits(tmp_path / name, name, params=CLI_PARAMS.get(name, []))
