"""SSDH and TBH (issue #33, label-free): each loss by hand, against its authors' formulas written
here in the style of their code (yangerkun/IJCAI2018_SSDH main.py; ymcidence/TBH layer/ and
train/tbh_train.py), and through the CLI on digits with --resume."""

import math

import numpy as np
import pytest
import torch
from cli_runs import train_and_resume_on_digits
from scipy.spatial.distance import pdist, squareform
from scipy.stats import norm

from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method
from dmuh.methods.ssdh import fit_two_gaussians, pseudo_labels, ssdh_loss
from dmuh.methods.tbh import binary_bottleneck, hamming_adjacency, normalised_adjacency

# -- SSDH ----------------------------------------------------------------------------------------


def test_ssdh_loss_by_hand():
    codes = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # v v^T / 2 = [[0.5, 0.25], [0.25, 0.25]]
    labels = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    expected = ((0.5 - 1) ** 2 + 2 * (0.25 + 1) ** 2 + (0.25 - 1) ** 2) / 4
    assert ssdh_loss(codes, labels).item() == pytest.approx(expected)
    # A left-out pair (S = 0) adds nothing but still counts in the mean over B^2.
    labels[0, 1] = labels[1, 0] = 0.0
    assert ssdh_loss(codes, labels).item() == pytest.approx(((0.5 - 1) ** 2 + (0.25 - 1) ** 2) / 4)


def test_ssdh_fit_by_hand():
    d = torch.tensor([0.1, 0.3, 0.3, 0.3, 0.5], dtype=torch.float64)
    m = 0.3 - 1e-8  # the START of the fullest 0.01-wide bin (from -1e-8): the three 0.3s lie above it
    mode, left, right = fit_two_gaussians(d)
    assert mode == pytest.approx(m, abs=1e-12)
    assert left == pytest.approx(0.3 - 1e-8 - 0.1, abs=1e-12)
    assert right == pytest.approx(math.sqrt((3 * 1e-16 + (0.5 - m) ** 2) / 4), abs=1e-12)
    # One diagonal zero as a weight joins the left side (0 <= m).
    mode, left, right = fit_two_gaussians(d, zeros=1.0)
    assert mode == pytest.approx(m, abs=1e-12)
    assert left == pytest.approx(math.sqrt(((0.1 - m) ** 2 + m**2) / 2), abs=1e-12)
    labels = pseudo_labels(torch.tensor([0.0, 0.05, 0.3, 0.9]), 0.3, 0.1, 0.2, 2.0)
    assert labels.tolist() == [1.0, 1.0, 0.0, -1.0]  # below 0.1 similar, above 0.7 dissimilar


def authors_ssdh_labels(features: np.ndarray):
    """main.py: pdist + squareform, the histogram loop, mirrored halves, norm.fit, S."""
    euc_dis = squareform(pdist(features, "cosine"))
    orig = euc_dis
    start, margin, max_num, max_value = -0.00000001, 1.0 / 100, 0.0, 0.0
    for _ in range(100):
        end = start + margin
        count = np.sum((euc_dis > start) & (euc_dis < end))
        if count > max_num:
            max_num, max_value = count, start
        start = end
    flat = euc_dis.reshape(-1)
    left, right = flat[flat <= max_value], flat[flat > max_value]
    l_mean, l_std = norm.fit(np.concatenate([left, 2 * max_value - left]))
    r_mean, r_std = norm.fit(np.concatenate([2 * max_value - right, right]))
    s = (orig < l_mean - 2 * l_std) * 1.0 + (orig > r_mean + 2 * r_std) * (-1.0)
    return (max_value, l_std, r_std), s


def test_ssdh_matches_the_authors_fit_labels_and_loss():
    rng = np.random.default_rng(0)
    # Non-negative features (the authors' ReLU fc7): a bulk on dims 0-7, ten items on dims 6-11
    # (far from the bulk), and near duplicates: all three kinds of pair.
    features = rng.random((60, 12)) * (np.arange(12) < 8)
    features[50:] = rng.random((10, 12)) * (np.arange(12) >= 6)
    features[::7] = features[1::7] + 0.01
    (m, l_std, r_std), authors = authors_ssdh_labels(features)

    distances = torch.from_numpy(pdist(features, "cosine"))  # every pair once, float64
    mine = fit_two_gaussians(distances, zeros=distances.numel() / (60 - 1))
    np.testing.assert_allclose(mine, (m, l_std, r_std), rtol=1e-9, atol=1e-12)

    method = create_method("ssdh", bits=4, num_train=60, num_classes=0)
    method.set_reference_features(torch.from_numpy(features).float())
    np.testing.assert_allclose(method.gaussians.numpy(), (m, l_std, r_std), atol=1e-3)  # float16 rows
    ours = method.batch_labels(torch.arange(60)).numpy()  # the whole set as one batch
    assert set(np.unique(authors)) == {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(ours, authors)  # no distance lies within float16 rounding of a threshold

    # Loss and gradient on the same labels: tf.reduce_mean(|S| * (v v^T / bits - S)^2).
    s = torch.from_numpy(authors)
    z = torch.randn(60, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref_z = z.detach().clone().requires_grad_()
    v = torch.tanh(ref_z)
    reference = torch.mean(torch.abs(s) * torch.square((1.0 / 4) * (v @ v.t()) - s))
    reference.backward()
    loss = ssdh_loss(method.continuous_codes(z), s)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z.grad, ref_z.grad, rtol=1e-12, atol=1e-14)


def test_ssdh_refuses_reference_features_of_another_size():
    method = create_method("ssdh", bits=4, num_train=10, num_classes=0)
    with pytest.raises(DmuhError, match="built for 10 training items"):
        method.set_reference_features(torch.rand(9, 5))


# -- TBH -----------------------------------------------------------------------------------------


def test_tbh_bottleneck_and_graph_by_hand():
    z = torch.tensor([[0.3, -2.0]], requires_grad=True)
    b = binary_bottleneck(z)
    assert b.tolist() == [[1.0, 0.0]]
    b.sum().backward()
    p = torch.sigmoid(z.detach())
    torch.testing.assert_close(z.grad, p * (1 - p))  # the distributional derivative
    codes = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    a = hamming_adjacency(codes, 1.4)
    half = 0.5**1.4  # one bit of two differs
    torch.testing.assert_close(a, torch.tensor([[1.0, half, 0.0], [half, 1.0, half], [0.0, half, 1.0]]))
    degree = torch.tensor([1 + half, 1 + 2 * half, 1 + half]) + 1e-8
    torch.testing.assert_close(normalised_adjacency(a), a / (degree[:, None] * degree[None, :]).sqrt())


def tbh_method(bits=4, dim=6, features=5, continuous=3, hidden=7, num_train=8, **params):
    torch.manual_seed(0)
    method = create_method(
        "tbh",
        bits=bits,
        num_train=num_train,
        num_classes=0,
        reference_dim=dim,
        feature_dim=features,
        continuous_dim=continuous,
        hidden=hidden,
        **params,
    )
    method.set_reference_features(torch.rand(num_train, dim) * 3)
    return method


def test_tbh_terms_by_hand_with_zero_weights():
    method = tbh_method()
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.zero_()
    outputs = torch.randn(4, 4)
    terms = method(StepInputs(outputs, torch.zeros(4, 0), torch.arange(4), features=torch.randn(4, 5)))
    # c' = sigmoid(0) and the decoder gives ReLU(0) = 0: half of each item's squared norm, averaged.
    expected = 0.5 * method.targets[:4].float().pow(2).sum(dim=1).mean()
    torch.testing.assert_close(terms["reconstruction"], expected)
    # Every discriminator says 1/2: four cross-entropies of log 2.
    assert terms["adversarial"].item() == pytest.approx(4 * math.log(2))


class AuthorsBinaryActivation(torch.autograd.Function):
    """layer/binary_activation.py at eps: code = (sign(prob - eps) + 1) / 2, d_logits = prob (1 - prob) d_code."""

    @staticmethod
    def forward(ctx, logits, eps):
        prob = 1.0 / (1 + torch.exp(-logits))
        ctx.save_for_backward(prob)
        return (torch.sign(prob - eps) + 1.0) / 2.0

    @staticmethod
    def backward(ctx, d_code):
        (prob,) = ctx.saved_tensors
        return prob * (1 - prob) * d_code, None


def authors_tbh_losses(method, z, feat, feat_in, random_binary, random_cont):
    """model/tbh.py + train/tbh_train.py with the method's weights: (actor_loss, critic_loss)."""
    bbn = AuthorsBinaryActivation.apply(z, torch.ones_like(z) / 2.0)
    cbn = torch.sigmoid(method.continuous(feat))
    code_length = bbn.shape[1]
    m1 = bbn - 1
    adj = torch.pow(1 - torch.abs(bbn @ m1.t() + m1 @ bbn.t()) / code_length, 1.4)
    d = adj @ torch.ones(adj.shape[0], 1)
    d_inv_sqrt = torch.eye(adj.shape[0]) * torch.pow(d + 1e-8, -0.5)
    bn = torch.sigmoid(d_inv_sqrt @ adj @ d_inv_sqrt @ method.graph(cbn))
    feat_out = method.decoder(bn)

    def dis(layer, x):
        return torch.sigmoid(layer(x))

    def bce(target, p):  # keras binary_crossentropy, mean over the last axis (its 1e-7 clip not reached here)
        return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean(dim=-1)

    def adv_loss(real, fake):
        return bce(torch.ones_like(real), real).mean() + bce(torch.zeros_like(fake), fake).mean()

    adv_1 = adv_loss(dis(method.binary_critic, random_binary), dis(method.binary_critic, bbn))
    adv_2 = adv_loss(dis(method.continuous_critic, random_cont), dis(method.continuous_critic, bn))
    reconstruction = torch.sum((feat_out - feat_in) ** 2) / 2  # tf.reduce_mean(tf.nn.l2_loss(.)): a scalar
    return reconstruction - adv_1 - adv_2, adv_1 + adv_2


def test_tbh_matches_the_authors_actor_and_critic_gradients():
    batch = 5
    method = tbh_method(adversarial=1 / batch)  # the authors' per-item weight at this batch size
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(batch, 4, generator=generator).requires_grad_()
    feat = torch.randn(batch, 5, generator=generator)
    indices = torch.tensor([0, 2, 3, 5, 7])

    torch.manual_seed(9)
    terms = method(StepInputs(z, torch.zeros(batch, 0), indices, features=feat))
    method.zero_grad()
    sum(terms.values()).backward()
    ours = {name: p.grad.clone() for name, p in method.named_parameters()}
    ours["z"] = z.grad.clone()

    torch.manual_seed(9)  # the same prior samples, drawn in the same order
    random_binary = (torch.sign(torch.rand(batch, 4) - 0.5) + 1) / 2
    random_cont = torch.rand(batch, 3)
    ref_z = z.detach().clone().requires_grad_()
    method.zero_grad()
    actor, critic = authors_tbh_losses(method, ref_z, feat, method.targets[indices].float(), random_binary, random_cont)
    torch.testing.assert_close(terms["adversarial"], critic)
    torch.testing.assert_close(terms["reconstruction"] * batch - terms["adversarial"], actor)
    actor_names = [n for n, _ in method.named_parameters() if not n.split(".")[0].endswith("critic")]
    critic_names = [n for n, _ in method.named_parameters() if n.split(".")[0].endswith("critic")]
    assert len(actor_names) == 8 and len(critic_names) == 4
    actor_params = [dict(method.named_parameters())[n] for n in actor_names] + [ref_z]
    critic_params = [dict(method.named_parameters())[n] for n in critic_names]
    actor_grads = torch.autograd.grad(actor, actor_params, retain_graph=True)
    critic_grads = torch.autograd.grad(critic, critic_params)
    # The encoder side: ours is the authors' divided by the batch (their l2_loss sums over it).
    for name, grad in zip(actor_names + ["z"], actor_grads):
        torch.testing.assert_close(ours[name] * batch, grad, rtol=1e-4, atol=1e-6, msg=name)
    # The discriminators: the critic's gradient itself.
    for name, grad in zip(critic_names, critic_grads):
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours["z"].abs().sum() > 0 and ours["binary_critic.weight"].abs().sum() > 0


def test_tbh_refuses_reference_features_of_another_shape():
    method = create_method("tbh", bits=4, num_train=8, num_classes=0, reference_dim=6, feature_dim=5)
    with pytest.raises(DmuhError, match=r"built for \(8, 6\)"):
        method.set_reference_features(torch.rand(8, 7))
    method.set_reference_features(torch.rand(8, 6))
    step = StepInputs(torch.randn(2, 4), torch.zeros(2, 0), torch.arange(2), features=torch.randn(2, 9))
    with pytest.raises(DmuhError, match="feature_dim=5: the backbone gives 9 features"):
        method(step)


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params", [("ssdh", []), ("tbh", ["continuous_dim=32", "hidden=32"])], ids=["ssdh", "tbh"]
)
def test_trains_and_resumes_through_the_cli(tmp_path, name, params):
    last = train_and_resume_on_digits(tmp_path / name, name, params=params)
    terms = {"ssdh": ["similarity"], "tbh": ["reconstruction", "adversarial"]}[name]
    assert all(math.isfinite(last[term]) for term in terms)


def test_tbh_on_vectors_gets_both_sizes_from_the_loop(tmp_path):
    """On feature vectors with a hidden layer (the authors' encoder), the continuous head reads the
    backbone's 24 features and the decoder rebuilds the data's 64: both sizes come from the loop."""
    from sklearn.datasets import load_digits

    from dmuh.cli import main
    from dmuh.runs.layout import load_checkpoint

    digits = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, features=(digits.data[:400] / 16.0).astype(np.float32))
    out = tmp_path / "run"
    command = ["train", "--method", "tbh", "--data", f"unlabeled:{data}", "--protocol", "unsupervised"]
    command += ["--protocol-param", "query=100"]
    command += ["--model", "mlp", "--model-param", "hidden=[24]", "--bits", "8", "--epochs", "1", "--quiet"]
    assert main(command + ["-p", "continuous_dim=16", "-p", "hidden=16", "--out", str(out)]) == 0
    params = load_checkpoint(out / "checkpoint.safetensors")["method_spec"]["params"]
    assert (params["feature_dim"], params["reference_dim"]) == (24, 64)
