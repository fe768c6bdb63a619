"""Issue #33's two-stage and asymmetric deep methods: Liong et al.'s deep DH / SDH / SDH-C, CNNH
and ADSH. Each loss against a hand-computed case, against its reference formula written here in the
style of the reference code (loss and gradient), and end to end through the CLI with --resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmuh.methods import StepInputs, create_method
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
        "variance": -1.0 * 1.0 / 2,
        "pairwise": -1.0 * 1.0 * (2 / 2 - 0 / 2) / 2,
        "orthogonality": 0.001 * 9 / 2,
    }
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-6), key
    # FIRe's target of W W^T, all ones: [[0, -1], [-1, 3]] squared sums to 11.
    ones = create_method("deep-sdh", bits=2, num_train=2, num_classes=3, ortho_target="ones")
    assert ones(sdh_step(z, labels, weight))["orthogonality"].item() == pytest.approx(0.001 * 11 / 2)


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
    method = create_method("deep-sdh", bits=6, num_train=8, num_classes=3, ortho_target="ones", alpha=0.7)
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


# -- every method through the CLI, and through --resume ----------------------------------------------


@pytest.mark.parametrize("name", ["deep-sdh", "deep-sdh-c", "deep-dh"])
def test_trains_and_resumes_through_the_cli(tmp_path, name):
    train_and_resume_on_digits(tmp_path / name, name)
