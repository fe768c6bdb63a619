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


# -- DPN -----------------------------------------------------------------------------------------


def test_dpn_by_hand():
    method = create_method("dpn", bits=2, num_train=2, num_classes=2, reg=0.1)
    method.targets.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    outputs = torch.tensor([[0.5, -2.0], [-1.0, 0.25]])
    terms = method(step(outputs, torch.eye(2)))
    # item 1 to (1, -1): max(1 - 0.5, 0) + max(1 - 2, 0) = 0.5; item 2 to (1, 1): 2 + 0.75 = 2.75
    assert terms["polarization"].item() == pytest.approx((0.5 + 2.75) / 2)
    assert terms["reg"].item() == pytest.approx(0.1 * (0.25 + 4 + 1 + 0.0625) / 4)
    # both labels: the targets' sum (2, 0) -> (+1, the tie-breaker's bit)
    both = method.item_targets(torch.tensor([[1.0, 1.0]]))
    assert both.tolist() == [[1.0, method.tie_breaker[1].item()]]


def authors_dpn_loss(codes, centroids, labels, margin, reg, multiclass):
    """kamwoh/DPN calculate_loss (the sl term) plus the reg term of train_hashing."""
    if multiclass:
        bs, nbit = codes.size()
        nclass = centroids.size(0)
        loss_sl = torch.relu(margin - codes.view(bs, 1, nbit) * centroids.view(1, nclass, nbit))
        loss_sl = loss_sl.sum(2)
        loss_sl = loss_sl * labels.float()
        loss_sl = loss_sl.sum(1).mean()
    else:
        loss_sl = torch.relu(margin - codes * centroids[labels.argmax(1)])
        loss_sl = loss_sl.sum(dim=1).mean()
    return loss_sl + reg * torch.pow(codes, 2).mean()


def deephash_dpn_loss(u, y, target_vectors, multi_label_random_center, m):
    """DeepHash-pytorch DPNLoss.label2center (multi-label: CSQ's merge) and its polarisation loss."""
    center_sum = y @ target_vectors
    random_center = multi_label_random_center.repeat(center_sum.shape[0], 1)
    center_sum[center_sum == 0] = random_center[center_sum == 0]
    t = 2 * (center_sum > 0).float() - 1
    return (m - u * t).clamp(0).mean()


@pytest.mark.parametrize("multi_label", [False, True])
def test_dpn_is_the_authors_loss(multi_label):
    outputs, labels = random_case(3, multi_label=multi_label)
    method = create_method("dpn", bits=8, num_train=6, num_classes=3, reg=0.1, multi_label="sum")
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs)
    reference = authors_dpn_loss(outputs, method.targets, labels, 1.0, 0.1, multiclass=multi_label)
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs)):
        torch.testing.assert_close(mine, theirs)


def test_dpn_merge_is_deephash_pytorchs_up_to_its_mean_over_bits():
    outputs, labels = random_case(4, batch=8, multi_label=True)
    labels[0] = torch.tensor([1.0, 1.0, 0.0])  # two labels whose targets cancel on some bits
    method = create_method("dpn", bits=8, num_train=8, num_classes=3, margin=0.5)
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs)
    # DeepHash-pytorch's random centre is 0/1 bits, mapped to -1/+1 by its 2 (x > 0) - 1
    reference = 8 * deephash_dpn_loss(outputs, labels, method.targets, (method.tie_breaker + 1) / 2, 0.5)
    assert (labels @ method.targets == 0).any()  # the tie-breaker is exercised
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs)):
        torch.testing.assert_close(mine, theirs)


def authors_update_centroid(codes, labels, centroids, margin, update_rate):
    """kamwoh/DPN update_centroid (batch_sign_dist without its batching)."""
    new_centroids = torch.zeros_like(centroids)
    train_codes = codes.sign()
    train_labels = labels.argmax(dim=1)
    for c in range(centroids.size(0)):
        code_from_label = train_codes[train_labels == c]
        topn = int(update_rate * code_from_label.size(0))
        dist = torch.relu(margin - code_from_label * centroids[c].sign().view(1, -1)).sum(1)
        code_from_label = code_from_label[torch.argsort(dist)[:topn]]
        new_centroids[c] = code_from_label.mean(0).sign()
    return new_centroids


@pytest.mark.parametrize("update_rate", [1.0, 0.6])
def test_dpn_target_update_is_the_authors(update_rate):
    bits = 5
    targets = torch.tensor([[1.0, 1, 1, 1, 1], [-1.0, -1, -1, -1, -1]])
    # class 0: codes 0, 1, 2, 3, 4 bits away from its target (distinct distances: the 60 % cut is
    # unambiguous); class 1: three codes; every mean has no tied bit
    flips = [[], [0], [0, 1], [0, 1, 2], [1, 2, 3, 4]]
    class0 = torch.stack([torch.tensor([-1.0 if k in f else 1.0 for k in range(bits)]) for f in flips])
    class1 = torch.tensor([[-1.0, -1, 1, -1, 1], [-1.0, 1, -1, -1, 1], [1.0, -1, -1, -1, 1]])
    generator = torch.Generator().manual_seed(5)
    codes = torch.cat([class0, class1]) * (0.5 + torch.rand(8, bits, generator=generator))
    labels = torch.eye(2)[[0, 0, 0, 0, 0, 1, 1, 1]]
    method = create_method(
        "dpn", bits=bits, num_train=8, num_classes=2, update_every=2, update_rate=update_rate, train_labels=labels
    )
    method.targets.copy_(targets)
    method(step(codes, labels))  # the epoch's codes go into the memory
    method.on_epoch_start(2, 10)  # not yet: after every 2nd epoch
    assert torch.equal(method.targets, targets)
    method.on_epoch_start(3, 10)
    expected = authors_update_centroid(codes, labels, targets, 1.0, update_rate)
    assert torch.equal(method.targets, expected) and not torch.equal(expected, targets)


# -- JMLH ----------------------------------------------------------------------------------------


def test_jmlh_by_hand():
    method = create_method("jmlh", bits=2, num_train=1, num_classes=2, stochastic=False, kl=0.5)
    with torch.no_grad():
        method.classifier.weight.copy_(torch.eye(2))
        method.classifier.bias.zero_()
    outputs = torch.tensor([[2.0, -1.0]], requires_grad=True)
    terms = method(step(outputs, torch.eye(2)[[0]]))
    # q = (s(2), s(-1)) -> b = (1, 0) at eps = 1/2; logits (1, 0), class 0: CE = log(1 + e^-1)
    assert terms["classification"].item() == pytest.approx(math.log(1 + math.exp(-1)))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    kl = sum(q * math.log(q) + (1 - q) * math.log(1 - q) + math.log(2) for q in (sig(2), sig(-1)))
    assert terms["kl"].item() == pytest.approx(0.5 * kl)
    terms["classification"].backward()
    # dCE/dlogits = (s(1) - 1, 1 - s(1)) = dCE/db (W = I); dz = q (1 - q) dCE/db
    d = 1 - sig(1)
    expected = [[-sig(2) * (1 - sig(2)) * d, sig(-1) * (1 - sig(-1)) * d]]
    torch.testing.assert_close(outputs.grad, torch.tensor(expected))


class FireJMLHBinaryActivation(torch.autograd.Function):
    """FIRe's JMLHBinaryActivation (models/layers/activation.py)."""

    @staticmethod
    def forward(ctx, logits, eps):
        prob = 1.0 / (1 + torch.exp(-logits))
        code = (torch.sign(prob - eps) + 1.0) / 2.0
        ctx.save_for_backward(prob)
        return code, prob

    @staticmethod
    def backward(ctx, grad_code, grad_prob):
        (prob,) = ctx.saved_tensors
        return prob * (1 - prob) * (grad_code + grad_prob), grad_code


def fire_kld_loss(q, p):
    loss = (
        q * torch.log(q + 1e-7)
        - q * torch.log(p + 1e-7)
        + (1 - q) * torch.log(1 - q + 1e-7)
        - (1 - q) * torch.log(1 - p + 1e-7)
    )
    return loss.sum(dim=1).mean()


@pytest.mark.parametrize("multi_label", [False, True])
def test_jmlh_is_fires_jmlh(multi_label):
    """FIRe's ArchJMLH forward (stochastic eps drawn with torch.rand_like) and its JMLH loss."""
    outputs, labels = random_case(6, multi_label=multi_label)
    method = create_method("jmlh", bits=8, num_train=6, num_classes=3)
    weight, bias = method.classifier.weight, method.classifier.bias
    torch.manual_seed(7)
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs, weight, bias)

    torch.manual_seed(7)
    code, _ = FireJMLHBinaryActivation.apply(outputs, torch.rand_like(outputs))
    logits, code_qb = code @ weight.t() + bias, torch.sigmoid(outputs)
    kl = fire_kld_loss(code_qb, torch.ones_like(code_qb) * 0.5)
    if multi_label:
        labels_scaled = labels / labels.sum(dim=1, keepdim=True)
        ce = (-(labels_scaled * F.log_softmax(logits, dim=1)).sum(dim=1)).mean()
    else:
        ce = F.cross_entropy(logits, labels.argmax(1))
    for mine, theirs in zip(ours, loss_and_gradient(kl * 0.1 + ce, outputs, weight, bias)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


# -- QSMIH ---------------------------------------------------------------------------------------


def test_qsmih_by_hand():
    method = create_method("qsmih", bits=2, num_train=2, num_classes=2, alpha=0.1)
    terms = method(step(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.eye(2)))
    # Y = [[1, 1/2], [1/2, 1]], D = I, M = 4 / 2: Q = (DY - 1)^2 + Y^2 / 2 = [[1/2, 1 + 1/8], [1 + 1/8, 1/2]]
    assert terms["information"].item() == pytest.approx((0.5 + 1.125 + 1.125 + 0.5) / 4)
    # | |z| - 1 | = (0, 1, 1, 1)
    assert terms["quantization"].item() == pytest.approx(0.1 * 3 / 4)
    plain = create_method("qsmih", bits=2, num_train=2, num_classes=2, square_clamp=False, reduction="sum")
    terms = plain(step(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.eye(2)))
    # Q = Y / 2 - D Y = [[-1/2, 1/4], [1/4, -1/2]]
    assert terms["information"].item() == pytest.approx(-0.5)


def authors_qmi_loss(documents, targets, M=0, eps=1e-8, use_square_clamp=True):
    """passalis/qsmi qmi_loss with use_cosine=True (targets: class indices, as the authors')."""
    documents = documents / (torch.sqrt(torch.sum(documents**2, dim=1, keepdim=True)) + eps)
    Y = torch.mm(documents, documents.t())
    Y = 0.5 * (Y + 1)
    D = (targets.view(targets.shape[0], 1) == targets.view(1, targets.shape[0])).float()
    if M == 0:
        M = D.size(1) ** 2 / torch.sum(D)
    if use_square_clamp:
        Q_in = (D * Y - 1) ** 2
        Q_btw = (1.0 / M) * Y**2
        return torch.sum(Q_in + Q_btw)
    Q_in = D * Y
    Q_btw = (1.0 / M) * Y
    return -torch.sum(Q_in - Q_btw)


@pytest.mark.parametrize("square_clamp", [True, False])
def test_qsmih_sum_is_the_authors_loss(square_clamp):
    outputs, labels = random_case(8)
    method = create_method(
        "qsmih", bits=8, num_train=6, num_classes=3, reduction="sum", square_clamp=square_clamp, alpha=0.001
    )
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs)
    regularizer = torch.sum(torch.abs(torch.abs(outputs) - 1))
    reference = authors_qmi_loss(outputs, labels.argmax(1), use_square_clamp=square_clamp) + 0.001 * regularizer
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs)):
        torch.testing.assert_close(mine, theirs)


def test_qsmih_mean_is_deephash_pytorchs_information_term():
    """DeepHash-pytorch QSMIHLoss (multi-label D = y y^T > 0); its regulariser reads the normalised u,
    ours the raw outputs as the authors', so it is compared at alpha = 0."""
    outputs, labels = random_case(9, multi_label=True)
    method = create_method("qsmih", bits=8, num_train=6, num_classes=3, alpha=0.0)
    ours = loss_and_gradient(total(method(step(outputs, labels))), outputs)
    u = outputs / (torch.sqrt(torch.sum(outputs**2, dim=1, keepdim=True)) + 1e-8)
    Y = 0.5 * (torch.mm(u, u.t()) + 1)
    D = (labels @ labels.t() > 0).float()
    M = D.size(1) ** 2 / torch.sum(D)
    reference = ((D * Y - 1) ** 2 + (1.0 / M) * Y**2).mean()
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs)):
        torch.testing.assert_close(mine, theirs)


# -- MIHash --------------------------------------------------------------------------------------


def binary_entropy(p):
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def test_mihash_by_hand():
    method = create_method("mihash", bits=2, num_train=3, num_classes=2, nbins=1)
    # phi = 2 sigmoid(z) - 1 = tanh(z / 2): z = 2 atanh(phi)
    phi = torch.tensor([[0.5, 0.5], [0.5, -0.5], [-0.5, 0.0]])
    terms = method(step(2 * torch.atanh(phi), torch.eye(2)[[0, 0, 1]]))
    # d_12 = (2 - 0) / 2 = 1, d_13 = d_23 = (2 + 1/4) / 2 = 9/8; two bins at 0 and 2 (Delta = 2):
    # d = 1 -> (1/2, 1/2), d = 9/8 -> (7/16, 9/16)
    # item 1 (and 2): similar {2}: H = 1; dissimilar {3}: H = h(7/16); p(+) = 1/2;
    #   p(D) = ((1/2 + 7/16) / 2, ...) = (15/32, 17/32)
    mi_1 = binary_entropy(15 / 32) - 0.5 * 1.0 - 0.5 * binary_entropy(7 / 16)
    # item 3: no similar other: p(D) = p(D | -), MI = 0
    assert terms["information"].item() == pytest.approx(-(2 * mi_1 + 0) / 3, abs=1e-6)


def authors_mi_forward_backward(X, Y, nbins, sigmf_p=1.0):
    """fcakir/deep-mihash mi_forward.m and mi_backward.m, translated line by line (X: nbits x N
    logits, Y: N x C labels): the forward value sum(ent_D - ent_D_C) and the hand-written dzdx."""
    nbits, N = X.shape
    Aff = (Y @ Y.t()) > 0
    Xp = (Aff.float() - torch.diag(torch.diag(Aff.float()))).bool()
    Xn = ~Aff
    phi = 2 * torch.sigmoid(sigmf_p * X) - 1
    hdist = (nbits - phi.t() @ phi) / 2
    Delta = nbits / nbins
    Cntrs = [Delta * k for k in range(nbins + 1)]
    L = len(Cntrs)
    prCp = Xp.sum(1).float() / (N - 1)
    prCn = 1 - prCp
    pDCp, pDCn = torch.zeros(N, L), torch.zeros(N, L)

    def tri_pulse(D, mid, delta):
        ind = (mid - delta < D) & (D <= mid + delta)
        return (1 - torch.abs(D - mid) / delta) * ind.float()

    for b in range(L):
        pulse = tri_pulse(hdist, Cntrs[b], Delta)
        pDCp[:, b] = (pulse * Xp).sum(1)
        pDCn[:, b] = (pulse * Xn).sum(1)
    pD = (pDCp + pDCn) / (N - 1)
    sum_pDCp, sum_pDCn = pDCp.sum(1), pDCn.sum(1)
    nz_p, nz_n = sum_pDCp > 0, sum_pDCn > 0
    pDCp[nz_p, :] = pDCp[nz_p, :] / sum_pDCp[nz_p, None]
    pDCn[nz_n, :] = pDCn[nz_n, :] / sum_pDCn[nz_n, None]

    def ent(p):
        logp = torch.zeros_like(p)
        logp[p > 0] = torch.log2(p[p > 0])
        return -(p * logp).sum(1)

    top = (ent(pD) - (prCp * ent(pDCp) + prCn * ent(pDCn))).sum()

    def deriv_ent(p):
        d = -torch.ones_like(p)
        d[p > 0] = d[p > 0] - torch.log2(p[p > 0])
        return d

    d_H_pD = deriv_ent(pD)
    d_L_pDCp = -(torch.diag(prCp) @ d_H_pD - torch.diag(prCp) @ deriv_ent(pDCp))
    d_L_pDCn = -(torch.diag(prCn) @ d_H_pD - torch.diag(prCn) @ deriv_ent(pDCn))
    d_L_phi = torch.zeros(nbits, N)
    Np, Nn = Xp.sum(1).float(), Xn.sum(1).float()
    invalid = (Np == 0) | (Nn == 0)
    for b in range(L):
        mid = Cntrs[b]
        ind1 = (hdist > mid - Delta) & (hdist <= mid)
        ind2 = (hdist > mid) & (hdist <= mid + Delta)
        dpulse = (ind1.float() - ind2.float()) / Delta
        ddp, ddn = dpulse * Xp.float(), dpulse * Xn.float()
        alpha_p = d_L_pDCp[:, b] / Np
        alpha_n = d_L_pDCn[:, b] / Nn
        alpha_p[invalid], alpha_n[invalid] = 0, 0
        alpha_p, alpha_n = torch.diag(alpha_p), torch.diag(alpha_n)
        Ap = ddp @ alpha_p + alpha_p @ ddp
        An = ddn @ alpha_n + alpha_n @ ddn
        d_L_phi = d_L_phi - 0.5 * phi @ (Ap + An)
    sigmoid = (phi + 1) / 2
    d_phi_x = 2 * sigmoid * (1 - sigmoid) * sigmf_p
    return top, d_L_phi * d_phi_x


@pytest.mark.parametrize("batch, nbins, sharpness", [(6, 4, 1.0), (5, 3, 2.0)])
def test_mihash_is_the_authors_forward_and_hand_written_backward(batch, nbins, sharpness):
    """Our autograd gradient of -sum MI against the authors' backward pass; with batch 5 one class
    has a single item (the authors' `invalid` row)."""
    outputs, labels = random_case(10 + batch, batch=batch)
    outputs = (2 * outputs).detach().requires_grad_()
    method = create_method(
        "mihash", bits=8, num_train=batch, num_classes=3, nbins=nbins, sharpness=sharpness, reduction="sum"
    )
    loss, gradient = loss_and_gradient(total(method(step(outputs, labels))), outputs)
    top, dzdx = authors_mi_forward_backward(outputs.detach().t(), labels, nbins, sharpness)
    torch.testing.assert_close(loss, -top)
    torch.testing.assert_close(gradient, dzdx.t(), rtol=1e-4, atol=1e-6)
    assert gradient.abs().max() > 1e-3


# -- DFH -----------------------------------------------------------------------------------------


def softplus(x):
    return math.log(1 + math.exp(x))


def test_dfh_by_hand():
    labels = torch.eye(2)
    method = create_method("dfh", bits=2, num_train=2, num_classes=2, train_labels=labels)
    terms = method(step(torch.tensor([[1.0, -0.5], [-0.5, 2.0]]), labels))
    # C = 0: b = sign(u) = (1, -1), (-1, 1). C-step, class 0: sign(q_0) = sign(b_1) = (1, -1);
    # class 1: sign(q_1 - vul C_0) = sign((-1, 1) - (1, -1)) = (-1, 1)
    assert method.centers.t().tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    # Theta = u U^T / 2 = [[5/8, -3/4], [-3/4, 17/8]], S = I, m = 0: softplus(Theta) - S Theta
    expected = (softplus(-5 / 8) + 2 * softplus(-3 / 4) + softplus(-17 / 8)) / 4
    assert terms["metric"].item() == pytest.approx(expected)
    # (b - u)^2: item 1: 0 + 1/4, item 2: 1/4 + 1; mean over 4, times eta = 1/2
    assert terms["quantization"].item() == pytest.approx(0.5 * 1.5 / 4)
    # the next step's targets lean on the centres: b = sign(mu C_0 + u) = sign((0.8, -0.9)) = (1, -1)
    terms = method(step(torch.tensor([[-0.2, 0.1]]), labels[[0]], torch.tensor([0])))
    assert terms["quantization"].item() == pytest.approx(0.5 * (1.2**2 + 1.1**2) / 2)


def authors_discrete_center(Y, B, C, vul):
    """Discretecenter of the authors' center.py (Y: classes x batch, B: bits x batch, C: classes x bits)."""
    C = C.clone()
    for i in range(C.shape[0]):
        Q = Y @ B.t()
        q = Q[i, :]
        v = Y[i, :]
        Y_prime = torch.cat((Y[:i, :], Y[i + 1 :, :]))
        C_prime = torch.cat((C[:i, :], C[i + 1 :, :]))
        C[i, :] = (q - C_prime.t() @ Y_prime @ v - vul * C_prime.t() @ torch.ones([C.size(0) - 1])).sign()
    return C.t()


def dfh_margin_loss(U_batch, U, S, B, eta, margin):
    """The authors' DFHLoss_margin with its margin form (commented out there, DeepHash-pytorch's),
    U_batch: bits x batch, U: bits x n, S: n x batch."""
    theta = torch.clamp(U.t() @ U_batch / 2, min=-100, max=50)
    metric = ((1 - S) * torch.log(1 + torch.exp(margin + theta)) + S * torch.log(1 + torch.exp(margin - theta))).mean()
    return metric + eta * (B - U_batch).pow(2).mean()


def filled_dfh(name_params, labels, generator):
    """A DFH method whose memory already holds a code of every training item, and whose centres
    have been through one step."""
    num_train = labels.shape[0]
    method = create_method(
        "dfh", bits=8, num_train=num_train, num_classes=labels.shape[1], train_labels=labels, **name_params
    )
    method.memory.write(torch.arange(num_train), torch.randn(num_train, 8, generator=generator))
    warm = torch.randn(4, 8, generator=generator)
    method(step(warm, labels[:4], torch.arange(4)))
    assert method.centers.abs().sum() > 0
    return method


@pytest.mark.parametrize("multi_label", [False, True])
def test_dfh_is_the_authors_step(multi_label):
    generator = torch.Generator().manual_seed(11)
    _, labels = random_case(11, batch=10, classes=4, multi_label=multi_label)
    method = filled_dfh({"margin": 0.5}, labels, generator)
    memory, centers = method.memory.codes.clone(), method.centers.clone()
    index = torch.tensor([7, 2, 5, 9, 0])
    outputs = torch.randn(5, 8, generator=generator).requires_grad_()
    ours = loss_and_gradient(total(method(step(outputs, labels[index], index))), outputs)

    # Main.py's step: U[:, index] = U_batch; batchY (scaled) and batchS; B-step; C-step; loss
    Y = labels.t() / labels.t().sum(0).expand(labels.t().size())
    U = memory.t().clone()
    U[:, index] = outputs.detach().t()
    batchY, batchS = Y[:, index], (labels @ labels.t() > 0).float()[:, index]
    batchB = (1.0 * centers @ batchY + outputs.t().detach()).sign()
    new_centers = authors_discrete_center(batchY, batchB, centers.t(), 1.0)
    reference = dfh_margin_loss(outputs.t(), U, batchS, batchB, 0.5, 0.5)
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs)):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(method.centers, new_centers)


def deephash_center_gradient(V, batchy, batchb, TK, vul, nta):
    """DeepHash-pytorch DFHLoss.Center_gradient (V: bits x classes, batchy: batch x classes, batchb: bits x batch)."""
    V = V.clone().requires_grad_(True)
    alpha = 0.03
    for i in range(200):
        intra_loss = (V @ batchy.t() - batchb).pow(2).mean()
        inter_loss = (V.t() @ V - TK).pow(2).mean()
        quantization_loss = (V - V.sign()).pow(2).mean()
        loss = intra_loss + vul * inter_loss + nta * quantization_loss
        loss.backward()
        if i in (149, 179):
            alpha = alpha * 0.1
        V.data = V.data - alpha * V.grad.data
        V.grad.data.zero_()
    return V.detach(), V.detach().sign()


def test_dfh_relaxed_is_deephash_pytorchs_step():
    generator = torch.Generator().manual_seed(12)
    _, labels = random_case(12, batch=10, classes=4)
    method = filled_dfh({"centers": "relaxed", "margin": 3.0, "mu": 0.1}, labels, generator)
    memory, relaxed, centers = method.memory.codes.clone(), method.relaxed_centers.clone(), method.centers.clone()
    index = torch.tensor([1, 4, 6, 8])
    outputs = torch.randn(4, 8, generator=generator).requires_grad_()
    ours = loss_and_gradient(total(method(step(outputs, labels[index], index))), outputs)

    y = labels[index]
    U = memory.t().clone()
    U[:, index] = outputs.detach().t()
    b = (0.1 * centers @ y.t() + outputs.detach().t()).sign()
    TK = 8 * (2 * torch.eye(4) - torch.ones(4))
    new_relaxed, new_centers = deephash_center_gradient(relaxed, y, b, TK, 1.0, 1.0)
    s = (y @ labels.t() > 0).float()
    inner_product = (outputs @ U * 0.5).clamp(min=-100, max=50)
    metric_loss = (
        (1 - s) * torch.log(1 + torch.exp(3.0 + inner_product)) + s * torch.log(1 + torch.exp(3.0 - inner_product))
    ).mean()
    reference = metric_loss + 0.5 * (b - outputs.t()).pow(2).mean()
    for mine, theirs in zip(ours, loss_and_gradient(reference, outputs)):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(method.relaxed_centers, new_relaxed)
    assert torch.equal(method.centers, new_centers)


# -- every method through the CLI ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [
        ("ce", []),
        ("bihalf-supervised", []),
        ("orthoarc", []),
        ("dpn", ["update_every=1", "update_rate=0.5", "reg=0.1"]),
        ("jmlh", []),
        ("qsmih", []),
        ("mihash", []),
        ("dfh", []),
        ("dfh", ["centers=relaxed", "margin=3", "mu=0.1"]),
    ],
)
def test_trains_and_resumes_through_the_cli(tmp_path, name, params):
    train_and_resume_on_digits(tmp_path / name, name, params=params)
