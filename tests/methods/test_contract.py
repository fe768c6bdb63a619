"""Every registered method against the contract of `dmuh.methods.base`, as timm tests every entry of
`list_models()`: it builds on toy data, takes one step (or its closed-form fit) with inputs made
from its own `requirements()`, gives finite terms that backpropagate, and comes back whole from its
`spec()` and `state_dict()`: the rebuilt method gives identical codes and terms."""

import dataclasses
import inspect

import pytest
import torch

from dmuh.cli import main
from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods import METHODS, Requirements, StepInputs, available, create_method, method_class
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.pairwise import half_inner_product, mean_over_nb, pair_likelihood, pair_nll
from dmuh.methods.components.params import declared_parameters

BITS, NUM_TRAIN, NUM_CLASSES, BATCH, DIM, TEXT_DIM = 8, 12, 3, 6, 16, 5

# The toy sizes some methods need (their defaults are sized for real data).
TOY = {
    "ddsh": {"columns": 4},
    "distillhash": {"neighbours": 3},
    "cosdish": {"iterations": 2},
    "fasth": {"trees": 2, "depth": 2, "node_features": 4, "iterations": 1, "bins": 8},
    "tbh": {"feature_dim": DIM, "continuous_dim": 8, "hidden": 8},
    "adsh": {"samples": 6},
}


def toy_params(name: str) -> dict:
    params = dict(TOY.get(name, {}))
    options = METHODS.entry(name).options()
    if "reference_dim" in options:  # filled in by the loop from the data (method_params_for)
        params["reference_dim"] = DIM
    if "text_dim" in options:
        params["text_dim"] = TEXT_DIM
    return params


def build(name: str, spec=None):
    if spec is None:
        method = create_method(name, bits=BITS, num_train=NUM_TRAIN, num_classes=NUM_CLASSES, **toy_params(name))
    else:
        method = create_method(
            spec["name"],
            bits=spec["bits"],
            num_train=spec["num_train"],
            num_classes=spec["num_classes"],
            **spec["params"],
        )
    needs = method.requirements()
    if not needs.labels:  # a label-free method is built with no label column, as the loop builds it
        method = create_method(
            name, bits=BITS, num_train=NUM_TRAIN, num_classes=0, **(spec["params"] if spec else toy_params(name))
        )
    return method


def data(needs: Requirements, seed: int = 0):
    """The training split's labels, reference features and texts, made as the loop would hand them over."""
    generator = torch.Generator().manual_seed(seed)
    classes = NUM_CLASSES if needs.labels else 0
    labels = torch.eye(NUM_CLASSES)[torch.arange(NUM_TRAIN) % NUM_CLASSES][:, :classes]
    features = torch.randn(NUM_TRAIN, DIM, generator=generator)
    text = torch.randn(NUM_TRAIN, TEXT_DIM, generator=generator)
    return labels, features, text


def prepared(name: str, spec=None):
    method = build(name, spec)
    needs = method.requirements()
    labels, features, text = data(needs)
    method.set_train_labels(labels)
    if needs.reference_features:
        method.set_reference_features(features)
    if needs.text:
        method.set_train_text(text)
    return method, needs, labels, features, text


def step_inputs(needs: Requirements, labels, features, text, seed: int = 1) -> StepInputs:
    """One batch, with exactly what the method's requirements ask of the loop."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.arange(BATCH)
    outputs = torch.randn(BATCH, BITS, generator=generator).requires_grad_()
    momentum = torch.randn(BATCH, BITS, generator=generator) * 0.1 + outputs.detach()
    view = torch.randn(BATCH, BITS, generator=generator)
    hash_weight = torch.randn(BITS, DIM, generator=generator).requires_grad_() if needs.hash_weight else None
    return StepInputs(
        outputs=outputs,
        labels=labels[indices],
        indices=indices,
        momentum_outputs=momentum if needs.uses_momentum else None,
        view_outputs=view if needs.views == 2 else None,
        text=text[indices] if needs.text else None,
        features=features[indices] if needs.features else None,
        hash_weight=hash_weight,
    )


def codes(method, needs, outputs, text):
    found = [sign(method.continuous_codes(outputs.detach()))]
    if needs.text:
        found.append(sign(method.encode_text(text)))
    return found


@pytest.mark.parametrize("name", available())
def test_every_method_keeps_the_contract(name):
    torch.manual_seed(0)
    method, needs, labels, features, text = prepared(name)
    assert isinstance(needs, Requirements) and needs == method.requirements()
    assert dataclasses.is_dataclass(needs) and needs == dataclasses.replace(needs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        needs.labels = not needs.labels
    assert method.name == name and method.spec()["name"] == name
    assert method.requirements() == dataclasses.replace(
        method_class(name).requires,
        **{
            field: getattr(needs, field)
            for field in ("momentum", "momentum_dropout", "momentum_update", "retrieval_network")
        },
    )  # only hyper-parameters move it

    if needs.shallow:  # fitted in closed form: a linear layer's (weight, bias), or a fitted head

        def outputs(fitted):
            if isinstance(fitted, tuple):
                weight, bias = fitted
                return features.double() @ weight.double().t() + bias.double()
            with torch.no_grad():
                return fitted(features)

        fitted = outputs(method.fit(features, labels))
        assert fitted.shape == (NUM_TRAIN, BITS) and torch.isfinite(fitted).all()
        rebuilt, *_ = prepared(name, method.spec())
        rebuilt.load_state_dict(method.state_dict())
        assert torch.equal(sign(outputs(rebuilt.fit(features, labels))), sign(fitted))
        return

    method.train()
    method.on_epoch_start(1, 2)
    step = step_inputs(needs, labels, features, text)
    terms = method(step)
    assert terms and all(value.dim() == 0 and torch.isfinite(value) for value in terms.values())
    sum(terms.values()).backward()
    assert step.outputs.grad is not None and torch.isfinite(step.outputs.grad).all()
    method.on_step_end()

    # spec() and state_dict() rebuild it: the same codes, and the same terms on the next batch.
    rebuilt, *_ = prepared(name, method.spec())
    rebuilt.load_state_dict(method.state_dict())
    assert rebuilt.spec() == method.spec() and rebuilt.requirements() == needs
    method.eval(), rebuilt.eval()
    probe = torch.randn(BATCH, BITS)
    with torch.no_grad():
        for mine, theirs in zip(codes(method, needs, probe, text[:BATCH]), codes(rebuilt, needs, probe, text[:BATCH])):
            assert torch.equal(mine, theirs)
    nxt = step_inputs(needs, labels, features, text, seed=2)
    torch.manual_seed(3)
    expected = method(nxt)
    torch.manual_seed(3)
    assert {key: value.item() for key, value in rebuilt(nxt).items()} == {
        key: value.item() for key, value in expected.items()
    }


@pytest.mark.parametrize("name", available())
def test_a_directly_built_method_has_a_complete_spec(name):
    entry = METHODS.entry(name)
    sizes = {"bits": BITS, "num_train": NUM_TRAIN, "num_classes": NUM_CLASSES}
    direct = method_class(name)(**sizes, **entry.fixed, **toy_params(name))
    spec = direct.spec()
    assert spec["params"] == {
        key: value for key, value in toy_params(name).items() if key not in METHODS.entry(spec["name"]).fixed
    }
    again = create_method(spec["name"], **sizes, **spec["params"])
    assert type(again) is type(direct) and again.spec() == spec
    assert list(again.state_dict()) == list(direct.state_dict())


def test_the_pairwise_likelihood_takes_a_similarity_and_a_reduction():
    torch.manual_seed(0)
    codes_, memory = torch.randn(4, BITS), torch.randn(NUM_TRAIN, BITS)
    similar = (torch.rand(4, NUM_TRAIN) > 0.5).float()
    seen = torch.arange(NUM_TRAIN) < 9
    theta = 0.5 * codes_ @ memory.t()
    by_hand = ((torch.log1p(torch.exp(theta)) - similar * theta) * seen).sum() / (NUM_TRAIN * 4)
    torch.testing.assert_close(pair_likelihood(codes_, memory, similar, seen), by_hand)
    assert torch.equal(pair_nll(codes_, memory, similar), pair_nll(codes_, memory, similar, half_inner_product))

    def cosine(a, b):
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t()

    def total(pair_loss, seen_, num_train):
        return (pair_loss * seen_).sum()

    expected = (pair_nll(codes_, memory, similar, cosine) * seen).sum()
    assert torch.equal(pair_likelihood(codes_, memory, similar, seen, similarity=cosine, reduction=total), expected)

    store = TrainingMemory(NUM_TRAIN, NUM_CLASSES, BITS)
    store.write(torch.arange(9), memory[:9])
    assert torch.equal(
        store.pair_likelihood(codes_, similar),
        pair_likelihood(codes_, store.codes, similar, store.seen, reduction=mean_over_nb),
    )
    assert torch.equal(
        store.pair_likelihood(codes_, similar, reduction=total),
        (pair_nll(codes_, store.codes, similar) * store.seen).sum(),
    )


@pytest.mark.parametrize("name", available())
def test_declared_hyper_parameters_admit_their_defaults_and_refuse_by_name(name):
    cls = method_class(name)
    declared = declared_parameters(cls)
    defaults = {key: parameter.default for key, parameter in inspect.signature(cls).parameters.items()}
    assert set(declared) <= set(defaults)
    for key, parameter in declared.items():
        assert parameter.check(key, defaults[key]) == defaults[key]
        if key in METHODS.entry(name).fixed:
            continue
        bad = "not-a-word" if parameter.kind is not bool else "yes"
        with pytest.raises(DmuhError, match=rf"^method parameter {key}='{bad}': "):
            create_method(
                name, bits=BITS, num_train=NUM_TRAIN, num_classes=NUM_CLASSES, **{**toy_params(name), key: bad}
            )


def test_list_methods_params_prints_the_declared_parameters(capsys):
    assert main(["train", "--list-methods", "params"]) == 0
    out = capsys.readouterr().out
    assert "\ndmuh\n    alpha=0.7: a number and >= 0 and <= 1; " in out
    assert "\ndmuh-wo-u\n" in out and "    uncertainty_term=False (fixed)\n" in out
    assert "    normalisation='nB': one of nB, batch; " in out
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [
        name if method_class(name).requires.labels else f"{name}  (learns without labels)" for name in available()
    ]
