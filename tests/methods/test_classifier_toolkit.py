"""The classifier, target and information methods of the toolkits (issue #33): each loss against a
case worked out by hand, against its reference implementation (the authors', DeepHash-pytorch's or
FIRe's formula, written here independently in the style of that code) on the same outputs and state,
loss and gradient, and each through the CLI on digits and `--resume`."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmuh.methods import StepInputs, create_method
from tests.methods.cli_runs import train_and_resume_on_digits


def step(outputs, labels, indices=None):
    indices = torch.arange(outputs.shape[0]) if indices is None else indices
    return StepInputs(outputs=outputs, labels=labels, indices=indices)


def total(terms):
    return sum(terms.values())


def random_case(seed, batch=6, bits=8, classes=3, multi_label=False):
    """Outputs (requiring grad) and one-hot (or multi-hot) labels."""
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(batch, bits, generator=generator).requires_grad_()
    labels = torch.eye(classes)[torch.arange(batch) % classes]
    if multi_label:
        labels = ((labels + (torch.rand(batch, classes, generator=generator) > 0.6).float()) > 0).float()
    return outputs, labels


def loss_and_gradient(loss, *tensors):
    return (loss.detach(), *torch.autograd.grad(loss, tensors))


# -- CE: a classifier over the code layer --------------------------------------------------------


def test_ce_by_hand():
    method = create_method("ce", bits=2, num_train=2, num_classes=2)
    with torch.no_grad():
        method.classifier.weight.copy_(torch.eye(2))
        method.classifier.bias.zero_()
    outputs = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    terms = method(step(outputs, torch.eye(2)))
    # item 1: logits (1, -1), class 0: log(1 + e^-2); item 2: logits (0.5, 0.5): log 2
    assert terms["classification"].item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2)


@pytest.mark.parametrize("multi_label", [False, True])
def test_ce_is_fires_ce_loss(multi_label):
    """FIRe's CELoss on its arch_ce: logits = ce_fc(v); F.cross_entropy on the argmax label, or the
    cross-entropy to labels / labels.sum() for multiclass."""
    outputs, labels = random_case(0, multi_label=multi_label)
    method = create_method("ce", bits=8, num_train=6, num_classes=3)
    weight, bias = method.classifier.weight, method.classifier.bias
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs, weight, bias)

    logits = outputs @ weight.t() + bias
    if multi_label:
        labels_scaled = labels / labels.sum(dim=1, keepdim=True)
        reference = (-(labels_scaled * F.log_softmax(logits, dim=1)).sum(dim=1)).mean()
    else:
        reference = F.cross_entropy(logits, labels.argmax(-1))
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs, weight, bias)):
        torch.testing.assert_close(mine, theirs)


# -- supervised BiHalf ---------------------------------------------------------------------------


class FireBiHalf(torch.autograd.Function):
    """FIRe's BiHalfFunction (models/layers/bihalf.py): above the column median -> +1."""

    @staticmethod
    def forward(ctx, u, gamma):
        b = (u > u.median(0).values).to(u.dtype) * 2.0 - 1.0
        ctx.save_for_backward(u, b)
        ctx.gamma = gamma
        return b

    @staticmethod
    def backward(ctx, grad_output):
        u, b = ctx.saved_tensors
        return grad_output + ctx.gamma / (b.size(0) * b.size(1)) * (u - b), None


def test_supervised_bihalf_by_hand():
    method = create_method("bihalf-supervised", bits=1, num_train=4, num_classes=2, gamma=4.0)
    with torch.no_grad():
        method.classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        method.classifier.bias.zero_()
    outputs = torch.tensor([[0.3], [-0.2], [0.9], [0.1]], requires_grad=True)
    labels = torch.eye(2)[[0, 1, 0, 1]]
    terms = method(step(outputs, labels))
    # codes: the two largest (0.9, 0.3) -> +1, the others -1: every item's logits are (+-1, -+1)
    # and every item is on its class's side: each CE = log(1 + e^-2)
    assert terms["classification"].item() == pytest.approx(math.log(1 + math.exp(-2)))
    terms["classification"].backward()
    # d CE / d logit_true = p_true - 1 = -e^-2 / (1 + e^-2) =: -q; d logits / d b = (1, -1);
    # item 1 (class 0): dL/db = (-q * 1 + q * -1) / 4 = -q / 2; item 2 (class 1): +q / 2, ...
    q = math.exp(-2) / (1 + math.exp(-2))
    codes = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    straight = torch.tensor([[-q / 2], [q / 2], [-q / 2], [q / 2]])
    expected = straight + 4.0 * (outputs.detach() - codes) / 4
    torch.testing.assert_close(outputs.grad, expected)


@pytest.mark.parametrize("batch", [6, 7])
def test_supervised_bihalf_is_fires_bihalf_then_ce(batch):
    outputs, labels = random_case(1, batch=batch)
    method = create_method("bihalf-supervised", bits=8, num_train=batch, num_classes=3)
    weight, bias = method.classifier.weight, method.classifier.bias
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs, weight, bias)
    logits = FireBiHalf.apply(outputs, 6.0) @ weight.t() + bias
    reference = F.cross_entropy(logits, labels.argmax(-1))
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs, weight, bias)):
        torch.testing.assert_close(mine, theirs)
    assert torch.equal(method.continuous_codes(outputs), outputs)  # the layer is for training only


# -- OrthoArc ------------------------------------------------------------------------------------


def test_orthoarc_by_hand():
    method = create_method("orthoarc", bits=2, num_train=1, num_classes=2, batch_norm=False, scale=8.0, margin=0.2)
    method.codebook.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    terms = method(step(torch.tensor([[2.0, 0.0]]), torch.eye(2)[[0]]))
    # cos to both codes is 1/sqrt(2), angle pi/4; the true class's angle gets the margin
    true, other = 8 * math.cos(math.pi / 4 + 0.2), 8 * math.cos(math.pi / 4)
    expected = -true + math.log(math.exp(true) + math.exp(other))
    assert terms["classification"].item() == pytest.approx(expected)
    assert method.margin_type == "arc" and method.spec()["name"] == "orthoarc"
    assert create_method("orthohash", bits=2, num_train=1, num_classes=2).margin_type == "cos"


@pytest.mark.parametrize("multi_label", [False, True])
def test_orthoarc_is_fires_orthoarc_loss(multi_label):
    """FIRe's OrthoArcLoss over its CosSim logits (fixed sign centroids) of the BatchNorm'd codes."""
    outputs, labels = random_case(2, multi_label=multi_label)
    method = create_method("orthoarc", bits=8, num_train=6, num_classes=3)
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs)

    v = F.batch_norm(outputs, None, None, training=True, eps=1e-5)
    centroids = method.codebook
    nfeat = torch.div(v, torch.norm(v, p=2, dim=-1, keepdim=True))
    ncenters = torch.div(centroids, torch.norm(centroids, p=2, dim=-1, keepdim=True))
    logits = torch.matmul(nfeat, torch.transpose(ncenters, 0, 1))
    s, m = 8, 0.2
    if multi_label:
        arc_logits = torch.acos(logits.clamp(-0.99999, 0.99999))
        margin_logits = s * torch.cos(arc_logits + labels * m)
        labels_scaled = labels / labels.sum(dim=1, keepdim=True)
        reference = (-(labels_scaled * F.log_softmax(margin_logits, dim=1)).sum(dim=1)).mean()
    else:
        y_onehot = torch.zeros_like(logits)
        y_onehot.scatter_(1, torch.unsqueeze(labels.argmax(1), dim=-1), m)
        arc_logits = torch.acos(logits.clamp(-0.99999, 0.99999))
        reference = F.cross_entropy(s * torch.cos(arc_logits + y_onehot), labels.argmax(1))
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs)):
        torch.testing.assert_close(mine, theirs)


# -- every method through the CLI ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [
        ("ce", []),
        ("bihalf-supervised", []),
        ("orthoarc", []),
    ],
)
def test_trains_and_resumes_through_the_cli(tmp_path, name, params):
    train_and_resume_on_digits(tmp_path / name, name, params=params)
