"""The pairwise and triplet deep methods of the toolkits (issue #33): DCH, DTSH, IDHN, ISDH, LCDSH,
DSHSD, DBDH and PCDH. Each loss against a case worked out by hand, against DeepHash-pytorch's
formula written again here in its own style (loss and gradient on the same outputs and state), and
each method through the CLI on digits, with --resume."""

import math

import pytest
import torch
from cli_runs import train_and_resume_on_digits

from dmuh.methods import StepInputs, create_method

BITS, CLASSES, BATCH = 4, 3, 6


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def build(name: str, num_train: int = BATCH, bits: int = BITS, labels=None, **params):
    method = create_method(name, bits=bits, num_train=num_train, num_classes=CLASSES, **params)
    if labels is not None:
        method.set_train_labels(labels)
    return method


def step(outputs, labels, indices=None, features=None):
    indices = torch.arange(outputs.shape[0]) if indices is None else indices
    return StepInputs(outputs=outputs, labels=labels, indices=indices, features=features)


def batch(seed: int = 0, scale: float = 1.0):
    """Outputs (B, bits) that need a gradient and labels (B, C): one-hot, but item 5 has two labels."""
    generator = torch.Generator().manual_seed(seed)
    outputs = (scale * torch.randn(BATCH, BITS, generator=generator)).requires_grad_()
    labels = torch.eye(CLASSES)[torch.tensor([0, 1, 2, 0, 1, 0])]
    labels[5, 2] = 1.0
    return outputs, labels


def loss_and_gradient(terms, outputs):
    total = sum(terms.values())
    (gradient,) = torch.autograd.grad(total, outputs)
    return total.detach(), gradient


def assert_same(mine, reference, outputs):
    """Same loss and same gradient with respect to the outputs, to float precision."""
    loss, gradient = loss_and_gradient(mine, outputs)
    (expected_gradient,) = torch.autograd.grad(reference, outputs)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-6)


# --- LCDSH -----------------------------------------------------------------------------------


def test_lcdsh_by_hand():
    outputs = torch.tensor([[0.5, 1.0], [2.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    terms = build("lcdsh", num_train=2, bits=2)(step(outputs, labels))
    # Theta = u u^T / 2 = [[0.625, 0], [0, 2.5]]; s = [[1, -1], [-1, 1]]; sign(u) = (1, 1), (1, -1)
    # so Theta^b = [[1, 0], [0, 1]].
    likelihood = (softplus(-0.625) + 2 * math.log(2) + softplus(-2.5)) / 4
    consistency = 3.0 * ((sigmoid(0.625) - sigmoid(1)) ** 2 + (sigmoid(2.5) - sigmoid(1)) ** 2) / 4
    assert terms["likelihood"].item() == pytest.approx(likelihood, rel=1e-6)
    assert terms["consistency"].item() == pytest.approx(consistency, rel=1e-6)


def lcdsh_reference(u, y, lam=3.0):
    """DeepHash-pytorch LCDSH.py's LCDSHLoss.forward."""
    s = 2 * (y @ y.t() > 0).float() - 1
    inner_product = u @ u.t() * 0.5
    inner_product = inner_product.clamp(min=-50, max=50)
    L1 = torch.log(1 + torch.exp(-s * inner_product)).mean()
    b = u.sign()
    inner_product_ = b @ b.t() * 0.5
    L2 = (inner_product.sigmoid() - inner_product_.sigmoid()).pow(2).mean()
    return L1 + lam * L2


@pytest.mark.parametrize("scale", [1.0, 6.0])  # 6: some |Theta| beyond the clamp at 50
def test_lcdsh_matches_deephash_pytorch(scale):
    outputs, labels = batch(scale=scale)
    method = build("lcdsh", consistency=2.0)
    assert_same(method(step(outputs, labels)), lcdsh_reference(outputs, labels, lam=2.0), outputs)


# --- DBDH ------------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [1, 2])
def test_dbdh_by_hand(power):
    outputs = torch.tensor([[0.5, 2.0], [-0.5, 0.25]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    terms = build("dbdh", num_train=2, bits=2, labels=labels, power=power)(step(outputs, labels))
    # u = clamp(z, -1, 1) = (0.5, 1), (-0.5, 0.25); Theta = u u^T / 2 = [[0.625, -0.0], [0, 0.15625]]:
    # Theta_12 = (-0.25 + 0.25) / 2 = 0; every pair similar; divided by n B = 4.
    likelihood = (softplus(0.625) - 0.625 + 2 * math.log(2) + softplus(0.15625) - 0.15625) / 4
    # per-item mean bits 0.75 and -0.125
    balance = 0.1 * (0.75**power + 0.125**power) / 2
    assert terms["likelihood"].item() == pytest.approx(likelihood, rel=1e-6)
    assert terms["balance"].item() == pytest.approx(balance, rel=1e-6)


class DBDHReference(torch.nn.Module):
    """DeepHash-pytorch DBDH.py's DPSHLoss, its memories U and Y as there."""

    def __init__(self, num_train, bit, n_class, alpha=0.1, p=2):
        super().__init__()
        self.U = torch.zeros(num_train, bit).float()
        self.Y = torch.zeros(num_train, n_class).float()
        self.alpha, self.p = alpha, p

    def forward(self, u, y, ind):
        u = u.clamp(min=-1, max=1)
        self.U[ind, :] = u.data
        self.Y[ind, :] = y.float()
        s = (y @ self.Y.t() > 0).float()
        inner_product = u @ self.U.t() * 0.5
        likelihood_loss = (1 + (-(inner_product.abs())).exp()).log() + inner_product.clamp(min=0) - s * inner_product
        likelihood_loss = likelihood_loss.mean()
        if self.p == 1:
            quantization_loss = self.alpha * u.mean(dim=1).abs().mean()
        else:
            quantization_loss = self.alpha * u.mean(dim=1).pow(2).mean()
        return likelihood_loss + quantization_loss


@pytest.mark.parametrize("power", [1, 2])
def test_dbdh_matches_deephash_pytorch(power):
    """Two batches that together cover the training items; the second batch is compared."""
    first, labels_first = batch(seed=1, scale=0.8)
    second, labels_second = batch(seed=2, scale=0.8)
    labels = torch.cat([labels_first, labels_second])
    method = build("dbdh", num_train=2 * BATCH, labels=labels, power=power, balance=0.3)
    reference = DBDHReference(2 * BATCH, BITS, CLASSES, alpha=0.3, p=power)
    first_indices, second_indices = torch.arange(BATCH), torch.arange(BATCH, 2 * BATCH)
    method(step(first.detach(), labels_first, first_indices))
    reference(first.detach(), labels_first, first_indices)
    assert_same(
        method(step(second, labels_second, second_indices)),
        reference(second, labels_second, second_indices),
        second,
    )


# --- DSHSD -----------------------------------------------------------------------------------


def test_dshsd_by_hand():
    outputs = torch.atanh(torch.tensor([[0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]))  # u = tanh(z) as written
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    method = build("dshsd", num_train=3, bits=2, labels=labels, margin=1.5)
    with torch.no_grad():
        method.classifier.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    terms = method(step(outputs, labels))
    # D_12 = 1 (similar: 1 / 2), D_13 = 2 (dissimilar: max(1.5 - 2, 0) / 2 = 0), D_23 = 1 (dissimilar:
    # (1.5 - 1) / 2); each pair twice over the 9 pairs, the diagonal 0.
    contrastive = 0.05 * 2 * (0.5 + 0.0 + 0.25) / 9
    # logits W u: (0.5, -0.5, 0), (0.5, 0.5, 0), (-0.5, 0.5, 0); classes 0, 0, 1.
    softmax_ce = (
        -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5) + 1))
        - math.log(math.exp(0.5) / (2 * math.exp(0.5) + 1))
        - math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5) + 1))
    ) / 3
    assert terms["contrastive"].item() == pytest.approx(contrastive, rel=1e-6)
    assert terms["classification"].item() == pytest.approx(softmax_ce, rel=1e-6)


def dshsd_reference(u, y, fc, alpha=0.05, m=8.0, nuswide=False):
    """DeepHash-pytorch DSHSD.py's DSHSDLoss.forward (nuswide: its multi-label branch)."""
    u = torch.tanh(u)
    dist = (u.unsqueeze(1) - u.unsqueeze(0)).pow(2).sum(dim=2)
    s = (y @ y.t() == 0).float()
    Ld = (1 - s) / 2 * dist + s / 2 * (m - dist).clamp(min=0)
    Ld = alpha * Ld.mean()
    o = fc(u)
    if nuswide:
        Lc = (o - y * o + ((1 + (-o).exp()).log())).sum(dim=1).mean()
    else:
        Lc = (-o.softmax(dim=1).log() * y).sum(dim=1).mean()
    return Lc + Ld


@pytest.mark.parametrize("multi_label", [False, True])
def test_dshsd_matches_deephash_pytorch(multi_label):
    outputs, labels = batch(seed=3)
    if not multi_label:
        labels[5, 2] = 0.0
    torch.manual_seed(0)
    method = build("dshsd", labels=labels, margin=3.0, alpha=0.2)
    assert method.classifier.sigmoid == multi_label  # classification=auto reads the training labels
    reference = dshsd_reference(outputs, labels, method.classifier.linear, alpha=0.2, m=3.0, nuswide=multi_label)
    assert_same(method(step(outputs, labels)), reference, outputs)
    # the classifier's weight learns too, with the reference's gradient
    method.zero_grad()
    sum(method(step(outputs.detach(), labels)).values()).backward()
    mine = method.classifier.linear.weight.grad.clone()
    method.zero_grad()
    dshsd_reference(outputs.detach(), labels, method.classifier.linear, 0.2, 3.0, multi_label).backward()
    torch.testing.assert_close(mine, method.classifier.linear.weight.grad, rtol=1e-5, atol=1e-6)


# --- DTSH ------------------------------------------------------------------------------------


def test_dtsh_by_hand():
    outputs = torch.tensor([[1.0, 0.5], [1.0, -0.5], [-0.5, 1.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    terms = build("dtsh", num_train=3, bits=2, margin=1.0, quantization=0.5)(step(outputs, labels))
    # Theta = u u^T: [[1.25, 0.75, 0], [0.75, 1.25, -1], [0, -1, 1.25]].
    # anchor 1: positives 1, 2, negative 3: t = 1.25 - 0 - 1, 0.75 - 0 - 1
    # anchor 2: positives 1, 2, negative 3: t = 0.75 + 1 - 1, 1.25 + 1 - 1
    # anchor 3: positive 3 only, negatives 1, 2: t = 1.25 - 0 - 1, 1.25 + 1 - 1
    anchor_1 = (softplus(-0.25) + softplus(0.25)) / 2
    anchor_2 = (softplus(-0.75) + softplus(-1.25)) / 2
    anchor_3 = (softplus(-0.25) + softplus(-1.25)) / 2
    # (u - sign u)^2: 0, 0.25, 0, 0.25, 0.25, 0 over 6 entries
    assert terms["triplet"].item() == pytest.approx((anchor_1 + anchor_2 + anchor_3) / 3, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(0.5 * 0.75 / 6, rel=1e-6)


def dtsh_reference(u, y, alpha=5.0, lam=1.0):
    """DeepHash-pytorch DTSH.py's DTSHLoss.forward, its loop over anchors."""
    inner_product = u @ u.t()
    s = y @ y.t() > 0
    count = 0
    loss1 = 0
    for row in range(s.shape[0]):
        if s[row].sum() != 0 and (~s[row]).sum() != 0:
            count += 1
            theta_positive = inner_product[row][s[row] == 1]
            theta_negative = inner_product[row][s[row] == 0]
            triple = (theta_positive.unsqueeze(1) - theta_negative.unsqueeze(0) - alpha).clamp(min=-100, max=50)
            loss1 += -(triple - torch.log(1 + torch.exp(triple))).mean()
    if count != 0:
        loss1 = loss1 / count
    else:
        loss1 = 0
    loss2 = lam * (u - u.sign()).pow(2).mean()
    return loss1 + loss2


@pytest.mark.parametrize("scale", [1.0, 5.0])  # 5: some triplets beyond the clamp
def test_dtsh_matches_deephash_pytorch(scale):
    outputs, labels = batch(seed=4, scale=scale)
    method = build("dtsh", margin=2.0, quantization=0.5)
    assert_same(method(step(outputs, labels)), dtsh_reference(outputs, labels, 2.0, 0.5), outputs)


def test_dtsh_without_a_triplet_has_only_its_quantisation():
    outputs, _ = batch(seed=5)
    labels = torch.eye(CLASSES)[[0] * BATCH]  # every pair similar: no negative
    terms = build("dtsh")(step(outputs, labels))
    assert terms["triplet"].item() == 0.0
    assert_same(terms, dtsh_reference(outputs, labels), outputs)


# --- DCH -------------------------------------------------------------------------------------


def test_dch_by_hand():
    outputs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    terms = build("dch", num_train=3, bits=2, gamma=2.0, quantization=0.5)(step(outputs, labels))
    # cos: u1.u2 = 0, u1.u3 = u2.u3 = 1/sqrt(2), the diagonal 1 (clamped to 0.99);
    # d = bits / 2 (1 - cos) = 1 - cos: d_12 = 1, d_13 = d_23 = 1 - 1/sqrt(2), d_ii = 0.01.
    d_ii, d_12, d_13 = 0.01, 1.0, 1.0 - 1.0 / math.sqrt(2.0)
    # similar pairs: the diagonal (3) and (1, 2) twice; dissimilar: (1, 3), (2, 3) twice each.
    similar = (3 * math.log1p(d_ii / 2) + 2 * math.log1p(d_12 / 2)) / 5
    dissimilar = math.log1p(2 / d_13)
    # d(|u_i|, 1): cos(|u_1|, 1) = 1 -> 0.99, cos(|u_2|, 1) = 1 -> 0.99, cos(|u_3|, 1) = 1/sqrt(2)
    quantization = 0.5 * (2 * math.log1p(d_ii / 2) + math.log1p(d_13 / 2)) / 3
    assert terms["cauchy"].item() == pytest.approx(similar + dissimilar, rel=1e-5)
    assert terms["quantization"].item() == pytest.approx(quantization, rel=1e-5)


class DCHReference(torch.nn.Module):
    """DeepHash-pytorch DCH.py's DCHLoss, `one` sized by the configured batch as there."""

    def __init__(self, bit, batch_size, gamma=20.0, lambda1=0.1):
        super().__init__()
        self.gamma, self.lambda1, self.K = gamma, lambda1, bit
        self.one = torch.ones((batch_size, bit))

    def d(self, hi, hj):
        inner_product = hi @ hj.t()
        norm = hi.pow(2).sum(dim=1, keepdim=True).pow(0.5) @ hj.pow(2).sum(dim=1, keepdim=True).pow(0.5).t()
        cos = inner_product / norm.clamp(min=0.0001)
        return (1 - cos.clamp(max=0.99)) * self.K / 2

    def forward(self, u, y):
        s = (y @ y.t() > 0).float()
        if (1 - s).sum() != 0 and s.sum() != 0:
            positive_w = s * s.numel() / s.sum()
            negative_w = (1 - s) * s.numel() / (1 - s).sum()
            w = positive_w + negative_w
        else:
            w = 1
        d_hi_hj = self.d(u, u)
        cauchy_loss = w * (s * torch.log(d_hi_hj / self.gamma) + torch.log(1 + self.gamma / d_hi_hj))
        quantization_loss = torch.log(1 + self.d(u.abs(), self.one) / self.gamma)
        return cauchy_loss.mean() + self.lambda1 * quantization_loss.mean()


@pytest.mark.parametrize("one_kind", [False, True])  # True: every pair similar (the reference's w = 1)
def test_dch_matches_deephash_pytorch(one_kind):
    outputs, labels = batch(seed=6)
    if one_kind:
        labels = torch.eye(CLASSES)[[1] * BATCH]
    with torch.no_grad():
        outputs[1] = 3.0 * outputs[0]  # a pair at cosine 1: beyond the clamp
    method = build("dch", gamma=5.0, quantization=0.3)
    reference = DCHReference(BITS, batch_size=2 * BATCH, gamma=5.0, lambda1=0.3)
    assert_same(method(step(outputs, labels)), reference(outputs, labels), outputs)


# --- IDHN and ISDH ----------------------------------------------------------------------------


def soft_pairs_by_hand(name, gamma):
    outputs = torch.tensor([[1.0, -3.0], [3.0, 1.0]])  # u = z / (|z| + 1): (0.5, -0.75), (0.75, 0.5)
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    terms = build(name, num_train=2, bits=2, labels=labels, gamma=gamma)(step(outputs, labels))
    # Theta = 0.5 u u^T = [[0.40625, 0], [0, 0.40625]]; s = cosine of labels, with IDHN's eps 1e-5:
    s_11, s_22, s_12 = 1 / (1 + 1e-5), 2 / (2 + 1e-5), 1 / (math.sqrt(2) + 1e-5)  # 1, 1 hard; 0.707 soft
    hard = softplus(0.40625) - s_11 * 0.40625 + softplus(0.40625) - s_22 * 0.40625
    quantization = 0.1 * (0.5 + 0.25 + 0.25 + 0.5) / 4
    return terms, hard, s_12, quantization


def test_idhn_by_hand():
    terms, hard, s_12, quantization = soft_pairs_by_hand("idhn", gamma=0.1)
    soft = 2 * 0.1 * (0.0 + 2 - 2 * 2 * s_12) ** 2  # gamma (Theta + q - 2 q s)^2, q = 2, twice
    assert terms["pairwise"].item() == pytest.approx((hard + soft) / 4, rel=1e-6)  # over n B = 4
    assert terms["quantization"].item() == pytest.approx(quantization, rel=1e-6)


def test_isdh_by_hand():
    terms, hard, s_12, quantization = soft_pairs_by_hand("isdh", gamma=10.0)
    soft = 2 * (s_12 - 0.5) ** 2  # (s - sigmoid(Theta))^2, Theta_12 = 0, twice
    assert terms["pairwise"].item() == pytest.approx((10 * hard + soft) / 4, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(quantization, rel=1e-6)


class SoftPairsReference(torch.nn.Module):
    """DeepHash-pytorch IDHN.py's and ISDH.py's DPSHLoss (`isdh` picks ISDH's two lines)."""

    def __init__(self, num_train, bit, n_class, alpha, gamma, lam, isdh):
        super().__init__()
        self.q = bit
        self.U = torch.zeros(num_train, bit).float()
        self.Y = torch.zeros(num_train, n_class).float()
        self.alpha, self.gamma, self.lam, self.isdh = alpha, gamma, lam, isdh

    def forward(self, u, y, ind):
        u = u / (u.abs() + 1)
        self.U[ind, :] = u.data
        self.Y[ind, :] = y.float()
        s = y @ self.Y.t()
        norm = y.pow(2).sum(dim=1, keepdim=True).pow(0.5) @ self.Y.pow(2).sum(dim=1, keepdim=True).pow(0.5).t()
        s = s / (norm + 0.00001)
        M = (s > 0.99).float() + (s < 0.01).float()
        inner_product = self.alpha * u @ self.U.t()
        log_loss = torch.log(1 + torch.exp(-inner_product.abs())) + inner_product.clamp(min=0) - s * inner_product
        if self.isdh:
            mse_loss = (s - torch.sigmoid(inner_product)).pow(2)
            loss1 = (self.gamma * M * log_loss + (1 - M) * mse_loss).mean()
        else:
            mse_loss = (inner_product + self.q - 2 * s * self.q).pow(2)
            loss1 = (M * log_loss + self.gamma * (1 - M) * mse_loss).mean()
        loss2 = self.lam * (u.abs() - 1).abs().mean()
        return loss1 + loss2


@pytest.mark.parametrize("name", ["idhn", "isdh"])
def test_soft_pairs_match_deephash_pytorch(name):
    """Two batches that together cover the training items, of random multi-hot labels (some items
    without any); the second batch is compared."""
    generator = torch.Generator().manual_seed(7)
    labels = (torch.rand(2 * BATCH, CLASSES, generator=generator) > 0.5).float()
    outputs = (2.0 * torch.randn(2, BATCH, BITS, generator=generator)).requires_grad_()
    params = {"alpha": 0.7, "gamma": 0.4, "quantization": 0.2}
    method = build(name, num_train=2 * BATCH, labels=labels, **params)
    reference = SoftPairsReference(2 * BATCH, BITS, CLASSES, 0.7, 0.4, 0.2, isdh=name == "isdh")
    halves = [torch.arange(BATCH), torch.arange(BATCH, 2 * BATCH)]
    method(step(outputs[0].detach(), labels[halves[0]], halves[0]))
    reference(outputs[0].detach(), labels[halves[0]], halves[0])
    mine = method(step(outputs[1], labels[halves[1]], halves[1]))
    assert_same(mine, reference(outputs[1], labels[halves[1]], halves[1]), outputs)


# --- PCDH ------------------------------------------------------------------------------------


def test_pcdh_by_hand():
    outputs = torch.atanh(torch.tensor([[0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]))  # h = tanh(z) as written
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    method = build("pcdh", num_train=3, bits=2, labels=labels, margin=1.5, alpha=0.5, beta=2.0)
    assert method.requirements().features
    with torch.no_grad():
        method.discrete_layer.weight.copy_(torch.eye(2))
        method.discrete_layer.bias.zero_()
        method.classifier.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    terms = method(step(outputs, labels, features=features))
    # h: D_12 = 1 similar (1 / 2), D_13 = 2 dissimilar (max(1.5 - 2, 0)^2 / 2 = 0), D_23 = 1
    # dissimilar ((1.5 - 1)^2 / 2); each pair twice over the 9 pairs.
    assert terms["contrastive"].item() == pytest.approx(2 * (0.5 + 0.125) / 9, rel=1e-6)
    # f: D_12 = 1 similar (1 / 2), D_13 = 4 and D_23 = 5 dissimilar, beyond the margin.
    assert terms["features"].item() == pytest.approx(0.5 * 2 * 0.5 / 9, rel=1e-6)
    # b = sign(h): (1, -1), (1, 1), (-1, 1); logits W b: (1, -1, 0), (1, 1, 0), (-1, 1, 0); classes 0, 0, 1
    e = math.e
    cross_entropy = (-2 * math.log(e / (e + 1 / e + 1)) - math.log(e / (2 * e + 1))) / 3
    assert terms["classification"].item() == pytest.approx(2.0 * cross_entropy, rel=1e-6)
    assert torch.equal(method.continuous_codes(outputs).sign(), torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]))


def pcdh_reference(feature, h, y_pre, y, alpha=1.0, beta=1.0, m=8.0, nuswide=False):
    """DeepHash-pytorch PCDH.py's PCDHLoss.forward."""
    dist = (h.unsqueeze(1) - h.unsqueeze(0)).pow(2).sum(dim=2)
    s = (y @ y.t() == 0).float()
    loss1 = (1 - s) / 2 * dist + s / 2 * (m - dist).clamp(min=0).pow(2)
    loss1 = loss1.mean()
    dist2 = (feature.unsqueeze(1) - feature.unsqueeze(0)).pow(2).sum(dim=2)
    loss2 = (1 - s) / 2 * dist2 + s / 2 * (m - dist2).clamp(min=0).pow(2)
    loss2 = loss2.mean()
    if nuswide:
        Lc = (y_pre - y * y_pre + ((1 + (-y_pre).exp()).log())).sum(dim=1).mean()
    else:
        Lc = (-y_pre.softmax(dim=1).log() * y).sum(dim=1).mean()
    return loss1 + alpha * loss2 + beta * Lc


def pcdh_network_tail(z, discrete_hash_layer, classification_layer, straight_through):
    """PCDH.py's Net.forward after the feature layer (h = tanh of the hash layer's z); with
    `straight_through`, the straight-through estimator on its hard sigmoid's threshold."""
    h = torch.tanh(z)
    b = discrete_hash_layer(h).add(1).mul(0.5).clamp(min=0, max=1)
    if straight_through:
        b = b + ((b >= 0.5).float() - b).detach()
    else:
        b = (b >= 0.5).float()
    b = b * 2 - 1
    return h, classification_layer(b)


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("multi_label", [False, True])
def test_pcdh_matches_deephash_pytorch(straight_through, multi_label):
    outputs, labels = batch(seed=8)
    if not multi_label:
        labels[5, 2] = 0.0
    features = (0.5 * torch.randn(BATCH, 5, generator=torch.Generator().manual_seed(9))).requires_grad_()
    torch.manual_seed(0)
    method = build("pcdh", labels=labels, margin=6.0, alpha=0.3, beta=0.7, straight_through=straight_through)
    with torch.no_grad():
        method.discrete_layer.weight.mul_(4.0)  # some |V h + c| beyond 1: no gradient there

    def both():
        h, y_pre = pcdh_network_tail(outputs, method.discrete_layer, method.classifier.linear, straight_through)
        reference = pcdh_reference(features, h, y_pre, labels, 0.3, 0.7, 6.0, nuswide=multi_label)
        return method(step(outputs, labels, features=features)), reference

    assert_same(*both(), outputs)
    # the features and the method's own layers get the reference's gradients too
    mine, reference = both()
    parameters = [features, *method.parameters()]
    for found, expected in zip(
        torch.autograd.grad(sum(mine.values()), parameters, allow_unused=True),
        torch.autograd.grad(reference, parameters, allow_unused=True),
    ):
        assert (found is None) == (expected is None)
        if found is not None:
            torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


# --- every method through the CLI -------------------------------------------------------------


TERMS = {
    "lcdsh": ("likelihood", "consistency"),
    "dbdh": ("likelihood", "balance"),
    "dshsd": ("contrastive", "classification"),
    "dtsh": ("triplet", "quantization"),
    "dch": ("cauchy", "quantization"),
    "idhn": ("pairwise", "quantization"),
    "isdh": ("pairwise", "quantization"),
    "pcdh": ("contrastive", "features", "classification"),  # features: the loop passed the backbone's
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_trains_and_resumes_through_the_cli(tmp_path, name):
    row = train_and_resume_on_digits(tmp_path / name, name)
    assert all(math.isfinite(row[term]) for term in TERMS[name])
    assert row["loss"] == pytest.approx(sum(row[term] for term in TERMS[name]), rel=1e-4)
