"""Regu (Eq. 4) and DMUH (Eq. 5-10) against hand-computed cases."""

import math

import pytest
import torch
from torch import nn

from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, available, create_method
from dmuh.models.momentum import MomentumNetwork

LABELS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
H = torch.tensor([[1.0, -0.5], [0.5, 0.5]])  # outputs of 2 items, 2 bits
M = torch.tensor([[0.8, -0.5], [0.5, 0.1]])  # momentum outputs


def softplus(x):
    return math.log1p(math.exp(x))


# Theta = h_i.h_j / 2: (0,0) 0.625, (0,1) 0.125, (1,1) 0.25; S = identity (different classes)
PAIR_LOSS = [[softplus(0.625) - 0.625, softplus(0.125)], [softplus(0.125), softplus(0.25) - 0.25]]


def step(outputs, momentum=None, indices=(0, 1), labels=LABELS):
    return StepInputs(outputs=outputs, labels=labels, indices=torch.tensor(indices), momentum_outputs=momentum)


def test_regu_matches_hand_computed_eq4():
    method = create_method("regu", bits=2, train_labels=LABELS, beta=2.0, output="linear")
    terms = method(step(H.clone()))
    # every term is divided by n B = 2 x 2 (DPSH's normalisation)
    expected_likelihood = sum(sum(row) for row in PAIR_LOSS) / 4
    # (h - sign h)^2 = [0, .25, .25, .25], sum 0.75, / 4
    assert terms["likelihood"].item() == pytest.approx(expected_likelihood, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(2.0 * 0.1875, rel=1e-6)
    assert set(terms) == {"likelihood", "quantization"}


def test_regu_pairs_only_with_seen_memory_items_normalised_by_n_times_batch():
    """One batch item (B = 1), two training items (n = 2), only item 0 seen: l_00 / (n B)."""
    method = create_method("regu", bits=2, train_labels=LABELS, beta=3.0, output="linear")
    terms = method(step(H[:1].clone(), indices=(0,), labels=LABELS[:1]))
    assert terms["likelihood"].item() == pytest.approx(PAIR_LOSS[0][0] / 2, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(3.0 * 0.25 / 2, rel=1e-6)
    assert method.memory.seen.tolist() == [True, False]


def test_dmuh_matches_hand_computed_eq10():
    method = create_method("dmuh", bits=2, train_labels=LABELS, beta=2.0, gamma=0.5, output="linear")
    terms = method(step(H.clone(), M.clone()))
    # u = |h - m| = [[0.2, 0], [0, 0.4]]; ubar = [0.1, 0.2]; every term / (n B) = / 4
    ubar = [0.1, 0.2]
    likelihood = sum(math.exp(ubar[i] + ubar[j]) * PAIR_LOSS[i][j] for i in range(2) for j in range(2)) / 4
    quantization = (0 + 0.25 * 1 + 0.25 * 1 + 0.25 * math.exp(0.4)) / 4
    assert terms["likelihood"].item() == pytest.approx(likelihood, rel=1e-6)
    assert terms["quantization"].item() == pytest.approx(2.0 * quantization, rel=1e-6)
    assert terms["uncertainty"].item() == pytest.approx(0.5 * 0.6 / 4, rel=1e-6)
    assert method.memory.uncertainty.tolist() == pytest.approx(ubar)
    assert method.step_stats["image_uncertainty"].item() == pytest.approx(0.15)


@pytest.mark.parametrize(
    "name, present, likelihood_weighted, quant_weighted",
    [
        ("dmuh-wo-u", {"likelihood", "quantization"}, True, True),
        ("dmuh-wo-eu", {"likelihood", "quantization", "uncertainty"}, True, False),
        ("dmuh-wo-euij", {"likelihood", "quantization", "uncertainty"}, False, True),
    ],
)
def test_dmuh_ablations(name, present, likelihood_weighted, quant_weighted):
    method = create_method(name, bits=2, train_labels=LABELS, beta=1.0, output="linear")
    terms = method(step(H.clone(), M.clone()))
    assert set(terms) == present
    plain_likelihood = sum(sum(row) for row in PAIR_LOSS) / 4
    assert (abs(terms["likelihood"].item() - plain_likelihood) > 1e-4) == likelihood_weighted
    assert (abs(terms["quantization"].item() - 0.1875) > 1e-4) == quant_weighted


def test_dmuh_uncertainty_weights_carry_no_gradient():
    """d/dh of e^u (h-b)^2 with e^u held constant: 2 e^u (h - b)."""
    method = create_method("dmuh-wo-u", bits=2, train_labels=LABELS, beta=1.0, output="linear")
    h = H.clone().requires_grad_(True)
    method(step(h, M.clone()))["quantization"].backward()
    u = (H - M).abs()
    expected = 2 * torch.exp(u) * (H - torch.sign(H)) / 4
    torch.testing.assert_close(h.grad, expected)


def test_tanh_output_bounds_the_weights():
    """With tanh outputs u <= 2, so e^(ubar_i + ubar_j) <= e^4 whatever the raw outputs are."""
    method = create_method("dmuh", bits=2, train_labels=LABELS)
    terms = method(step(torch.tensor([[1e4, -1e4], [1e4, 1e4]]), torch.tensor([[-1e4, 1e4], [-1e4, -1e4]])))
    assert all(torch.isfinite(v) for v in terms.values())
    assert method.memory.uncertainty.max().item() <= 2.0


def test_unknown_method_and_parameter_errors():
    with pytest.raises(DmuhError, match="unknown method 'nope'"):
        create_method("nope", bits=2, train_labels=LABELS)
    with pytest.raises(DmuhError, match="no parameter 'delta'"):
        create_method("dmuh", bits=2, train_labels=LABELS, delta=1)
    with pytest.raises(DmuhError, match="output='relu'"):
        create_method("regu", bits=2, train_labels=LABELS, output="relu")


def test_registry_lists_core_methods():
    assert {"dmuh", "regu", "dmuh-wo-u", "dmuh-wo-eu", "dmuh-wo-euij"} <= set(available())


def test_momentum_update_eq5():
    online = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        online.weight.fill_(1.0)
    momentum = MomentumNetwork(online, alpha=0.7)
    with torch.no_grad():
        online.weight.fill_(3.0)
    momentum.update(online)
    assert momentum.network.weight.item() == pytest.approx(0.7 * 1.0 + 0.3 * 3.0)
    momentum.update(online)
    assert momentum.network.weight.item() == pytest.approx(0.7 * 1.6 + 0.3 * 3.0)
    assert not momentum.network.weight.requires_grad


def test_momentum_network_has_no_dropout_and_batchnorm_statistics_of_its_own():
    online = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.9))
    momentum = MomentumNetwork(online, alpha=0.5)
    x = torch.randn(8, 4)
    own_mean = momentum.network[1].running_mean.clone()
    torch.testing.assert_close(momentum(x), momentum(x))  # no dropout noise
    # its statistics follow its own passes: BatchNorm's update rule on its own layer's outputs, twice
    for _ in range(2):
        own_mean = 0.9 * own_mean + 0.1 * momentum.network[0](x).mean(dim=0)
    torch.testing.assert_close(momentum.network[1].running_mean, own_mean)
    online.train()
    online(x + 5)  # moves the hashing network's running statistics...
    momentum.update(online)  # ...which the update leaves where they are (weights only)
    torch.testing.assert_close(momentum.network[1].running_mean, own_mean)
    assert not torch.allclose(momentum.network[1].running_mean, online[1].running_mean)
