"""The open readings of the paper as options of `dmuh`, each on a tiny hand-checked case."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dmuh.engine.builder import encode, evaluate_map, load_run, retrieval_network, training_uncertainty
from dmuh.engine.trainer import train
from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method
from dmuh.models import create_model
from dmuh.models.momentum import MomentumNetwork
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import LOG, read_log

ROOT = Path(__file__).resolve().parents[2]


def softplus(x):
    return math.log1p(math.exp(x))


# --- the momentum copy's dropout ----------------------------------------------------------------


def dropout_network():
    torch.manual_seed(0)
    return create_model("mlp", bits=6, input_dim=5, hidden=[64], dropout=0.5)


@pytest.mark.parametrize("mode", ["off", "own", "shared"])
def test_momentum_dropout_modes(mode):
    model = dropout_network().train()
    momentum = MomentumNetwork(model, alpha=1.0, dropout=mode)  # alpha 1: the copy keeps the initial weights
    x = torch.randn(32, 5)
    torch.manual_seed(1)
    h, m = momentum.paired(lambda: model(x), x)
    no_dropout = model.eval()(x)
    model.train()
    if mode == "shared":  # the same masks: identical weights give identical outputs
        torch.testing.assert_close(m, h, rtol=0, atol=0)
    elif mode == "off":
        torch.testing.assert_close(m, no_dropout, rtol=0, atol=0)
        assert not torch.allclose(m, h)
    else:  # own masks: neither the hashing pass nor the dropout-free output
        assert not torch.allclose(m, h) and not torch.allclose(m, no_dropout)
    # The random stream goes on as after the hashing pass alone in every mode but "own".
    torch.manual_seed(1)
    model(x)
    expected_next = torch.rand(1)
    torch.manual_seed(1)
    momentum.paired(lambda: model(x), x)
    assert torch.equal(torch.rand(1), expected_next) == (mode != "own")


def test_bad_reading_options_are_errors_naming_them():
    for key, value in (
        ("momentum_dropout", "half"),
        ("momentum_update", "batch"),
        ("retrieval", "both"),
        ("normalisation", "n"),
        ("alpha", 1.5),
        ("gamma", -1),
        ("bit_weights", "yes"),
    ):
        with pytest.raises(DmuhError, match=f"{key}="):
            create_method("dmuh", bits=2, num_train=2, num_classes=2, **{key: value})


# --- normalisation of each term -----------------------------------------------------------------

LABELS3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
H0 = torch.tensor([[1.0, -0.5]])
M0 = torch.tensor([[0.8, -0.5]])


@pytest.mark.parametrize("normalisation", ["nB", "batch"])
def test_term_normalisation_by_n_b_or_per_batch(normalisation):
    """B = 1 batch item, n = 3 training items, 2 bits; only item 0 is seen (the batch itself)."""
    method = create_method(
        "dmuh",
        bits=2,
        train_labels=LABELS3,
        beta=2.0,
        gamma=0.5,
        output="linear",
        normalisation=normalisation,
        bit_weights=False,
        image_weights=False,
    )
    terms = method(StepInputs(outputs=H0.clone(), labels=LABELS3[:1], indices=torch.tensor([0]), momentum_outputs=M0))
    pair = softplus(0.625) - 0.625  # Theta_00 = (1 + 0.25) / 2, similar
    quantization_sum = 0.25  # (1 - 1)^2 + (-0.5 + 1)^2
    uncertainty_sum = 0.2  # |1 - 0.8| + 0
    if normalisation == "nB":  # every sum over n B = 3
        expected = (pair / 3, 2.0 * quantization_sum / 3, 0.5 * uncertainty_sum / 3)
    else:  # the likelihood over the 1 x 1 seen pairs, the others over B x bits = 2 entries
        expected = (pair / 1, 2.0 * quantization_sum / 2, 0.5 * uncertainty_sum / 2)
    got = (terms["likelihood"].item(), terms["quantization"].item(), terms["uncertainty"].item())
    assert got == pytest.approx(expected, rel=1e-6)


def test_gamma_as_a_mean_over_entries():
    """The hand case above (B = 1, n = 3, 2 bits): the gamma term over B x bits = 2 entries, the
    other terms still over n B = 3."""
    method = create_method(
        "dmuh", bits=2, train_labels=LABELS3, beta=2.0, gamma=0.5, output="linear",
        bit_weights=False, image_weights=False, uncertainty_normalisation="entries",
    )  # fmt: skip
    terms = method(StepInputs(outputs=H0.clone(), labels=LABELS3[:1], indices=torch.tensor([0]), momentum_outputs=M0))
    got = (terms["likelihood"].item(), terms["quantization"].item(), terms["uncertainty"].item())
    assert got == pytest.approx(((softplus(0.625) - 0.625) / 3, 2.0 * 0.25 / 3, 0.5 * 0.2 / 2), rel=1e-6)


def test_weights_divided_by_their_batch_mean():
    """B = 2 items, 2 bits, both seen: u = |h - m| per entry, e^u / mean(e^u) as the bit weights;
    e^(ubar_i + ubar_j) / its mean over the 2 x 2 seen pairs as the pair weights."""
    h = torch.tensor([[1.0, -0.5], [0.25, 0.5]])
    m = torch.tensor([[0.8, -0.5], [0.25, 0.1]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    common = dict(bits=2, train_labels=labels, beta=2.0, gamma=0.0, output="linear")
    step = StepInputs(outputs=h.clone(), labels=labels, indices=torch.tensor([0, 1]), momentum_outputs=m)
    scaled = create_method("dmuh", weight_scale="batch-mean", **common)(step)
    u = (h - m).abs()
    bit_weight = torch.exp(u) / torch.exp(u).mean()
    gaps = (h - torch.sign(h)).pow(2)
    assert scaled["quantization"].item() == pytest.approx(2.0 * (bit_weight * gaps).sum().item() / 4, rel=1e-6)
    ubar = u.mean(dim=1)
    pair_weight = torch.exp(ubar[:, None] + ubar[None, :])
    pair_weight = pair_weight / pair_weight.mean()
    theta = h @ h.T / 2
    pair = (pair_weight * (torch.nn.functional.softplus(theta) - theta)).sum().item() / 4  # all pairs similar
    assert scaled["likelihood"].item() == pytest.approx(pair, rel=1e-6)
    raw = create_method("dmuh", **common)(
        StepInputs(outputs=h.clone(), labels=labels, indices=torch.tensor([0, 1]), momentum_outputs=m)
    )
    assert raw["quantization"].item() > scaled["quantization"].item()  # the raw weights' mean is above 1


def test_u_is_measured_in_float32_under_autocast():
    """The hash layer runs in float32 under bf16 autocast: u = |h - m| of two networks that differ
    only in their hash layer equals u in float32 within 1e-5 (bf16 codes would be off by ~1e-3)."""
    torch.manual_seed(0)
    model = create_model("smallcnn", bits=32, width=8, input_size=8).eval()
    copy = MomentumNetwork(model, alpha=1.0).network.eval()
    with torch.no_grad():
        copy.hash_layer.weight.add_(1e-3 * torch.randn_like(copy.hash_layer.weight))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        full = (model(x) - copy(x)).abs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, m = model(x), copy(x)
    assert h.dtype == torch.float32 and m.dtype == torch.float32
    assert full.mean() > 1e-4  # a signal the test can see
    torch.testing.assert_close((h - m).abs(), full, rtol=0, atol=1e-5)


# --- a run under each loop-level reading ---------------------------------------------------------


def tiny_config(out, **method_params):
    return TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8, "width": 8, "fc": [32], "dropout": 0.5},
        method="dmuh",
        bits=8,
        epochs=2,
        batch_size=100,
        out=str(out),
        method_params=method_params,
        train_map_items=200,
    )


@pytest.mark.parametrize("update", ["step", "epoch"])
def test_eq5_every_step_or_every_epoch(tmp_path, monkeypatch, update):
    calls = []
    original = MomentumNetwork.update
    monkeypatch.setattr(MomentumNetwork, "update", lambda self, network: calls.append(1) or original(self, network))
    train(tiny_config(tmp_path / "run", momentum_update=update), progress=False, echo=lambda line: None)
    steps_per_epoch = 1000 // 100
    assert len(calls) == (2 * steps_per_epoch if update == "step" else 2)


@pytest.fixture(scope="module")
def momentum_retrieval_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("readings") / "run"
    train(tiny_config(out, retrieval="momentum", momentum_dropout="own"), progress=False, echo=lambda line: None)
    return out


def test_retrieval_codes_from_the_momentum_copy(momentum_retrieval_run):
    exp = load_run(momentum_retrieval_run)
    assert retrieval_network(exp) is exp.momentum.network
    inputs = exp.images[torch.from_numpy(exp.split.query[:20])]
    from_momentum = encode(exp.momentum.network, exp.method, inputs, exp.pipeline, exp.execution)
    from_hashing = encode(exp.model, exp.method, inputs, exp.pipeline, exp.execution)
    assert not torch.allclose(from_momentum, from_hashing)
    from dmuh.retrieval.encoder import encode_arrays, load_encoder

    encoder = load_encoder(momentum_retrieval_run)
    packed, _ = encode_arrays(encoder, inputs.permute(0, 2, 3, 1).numpy())
    from dmuh.codes.binary import pack_bits, sign

    assert np.array_equal(packed, pack_bits(sign(from_momentum).numpy()))


def test_log_map_equals_the_checkpoint_map_and_train_map_is_logged(momentum_retrieval_run):
    rows = read_log(momentum_retrieval_run / LOG)
    assert "train_map" in rows[-1] and 0.0 <= rows[-1]["train_map"] <= 1.0 and rows[-1]["ties"] == "expected"
    # The uncertainty trace no longer moves BatchNorm statistics after the MAP was taken.
    assert evaluate_map(load_run(momentum_retrieval_run)) == pytest.approx(rows[-1]["map"], abs=1e-12)


def test_training_uncertainty_averages_passes_of_own_dropout(momentum_retrieval_run):
    exp = load_run(momentum_retrieval_run)
    positions = np.arange(30)
    before = [b.clone() for b in exp.model.buffers()]
    one = training_uncertainty(exp, positions, passes=1)
    several = training_uncertainty(exp, positions, passes=4)
    assert one.shape == several.shape == (30, 8) and (several >= 0).all()
    assert not torch.allclose(one, several)  # new masks every pass
    assert all(torch.equal(a, b) for a, b in zip(before, exp.model.buffers()))  # statistics untouched


def test_smallcnn_head_is_cnnf_like():
    model = create_model("smallcnn", bits=4, width=8, input_size=8, fc=[32, 16], dropout=0.25)
    assert model.feature_dim == 16
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in model.modules()) == 2
    assert create_model("smallcnn", bits=4, width=8, input_size=8).feature_dim == 32  # no head: as before
    with pytest.raises(DmuhError, match="fc must be a list"):
        create_model("smallcnn", bits=4, fc=512)


@pytest.mark.parametrize("name", ["resnet18-32", "resnet18"])
def test_resnet_takes_the_cnnf_like_head(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, bits=8, fc=[64, 48], dropout=0.5)
    assert model.feature_dim == 48
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules()) == 2
    x = torch.randn(2, 3, 32, 32) if name.endswith("-32") else torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.allclose(model(x), model(x))  # dropout draws new masks: `own` has noise to act on
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    plain = create_model(name, bits=8)
    assert plain.feature_dim == 512 and not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    # ImageNet-style weights (no head) still load; the head keeps its initialisation
    from safetensors.torch import save_file

    weights = {k: v for k, v in plain.backbone.state_dict().items()}
    save_file(weights, tmp_path / "resnet.safetensors")
    head_before = model.backbone.head.state_dict()["layers.0.weight"].clone()
    loaded = create_model(name, bits=8, fc=[64, 48], dropout=0.5, pretrained=str(tmp_path / "resnet.safetensors"))
    torch.testing.assert_close(loaded.backbone.layer1[0].conv1.weight, plain.backbone.layer1[0].conv1.weight)
    assert loaded.backbone.head.state_dict()["layers.0.weight"].shape == head_before.shape
    for bad, message in (
        ({"fc": [0]}, "fc must be a list of positive widths"),
        ({"dropout": 1.0}, "dropout must be a number in"),
    ):
        with pytest.raises(DmuhError, match=message):
            create_model(name, bits=8, **bad)


def test_the_default_reading_is_the_one_docs_method_md_names():
    text = (ROOT / "docs" / "method.md").read_text()
    line = re.search(r"^Default reading: (.+)$", text, re.MULTILINE)
    assert line, "docs/method.md names the default reading"
    documented = dict(item.strip().split("=") for item in line.group(1).rstrip(".").split(","))
    method = create_method("dmuh", bits=2, num_train=2, num_classes=2)
    needs = method.requirements()
    actual = {
        "momentum_dropout": needs.momentum_dropout,
        "momentum_update": needs.momentum_update,
        "output": method.output,
        "normalisation": method.normalisation,
        "retrieval": needs.retrieval_network,
    }
    assert documented == actual


def test_command_line_words_stay_words_only_true_and_false_are_booleans():
    from dmuh.utils.schema import parse_params

    assert parse_params(["momentum_dropout=off", "flag=true", "other=no", "alpha=0.7", "fc=[512,512]"]) == {
        "momentum_dropout": "off",
        "flag": True,
        "other": "no",
        "alpha": 0.7,
        "fc": [512, 512],
    }
    # A YAML file's `momentum_dropout: off` arrives as False and still means "off".
    assert (
        create_method("dmuh", bits=2, num_train=2, num_classes=2, momentum_dropout=False)
        .requirements()
        .momentum_dropout
        == "off"
    )


def test_uncertainty_batches_are_mixed_like_training_batches(momentum_retrieval_run):
    """The split is sorted by class; measured in split order, batch statistics would be one class's."""
    from dmuh.engine.builder import paired_codes

    exp = load_run(momentum_retrieval_run)
    positions = np.arange(40)
    seen = []
    original = exp.model.forward
    exp.model.forward = lambda x, **kw: seen.append(x) or original(x, **kw)
    torch.manual_seed(0)
    h, _ = paired_codes(exp, positions)
    exp.model.forward = original
    assert len(seen) == 1 and seen[0].shape[0] == exp.config.batch_size  # filled up to a training batch
    torch.manual_seed(0)
    again, _ = paired_codes(exp, positions)
    torch.testing.assert_close(again, h, rtol=0, atol=0)  # the same seeded batches every time
    one, _ = paired_codes(exp, positions[:1])  # a lone item is measured in a filled-up batch
    assert one.shape == (1, 8) and torch.isfinite(one).all()
