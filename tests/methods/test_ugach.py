"""UGACH: the correlation graph, the triplet hinge, the policy gradient, the adversarial split of
the gradients, a few steps of training, the schedule and the parameter checks."""

import math

import pytest
import torch
from torch import nn

import dmuh.methods.ugach  # noqa: F401  (registers "ugach")
from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method
from dmuh.methods.ugach import (
    code_distances,
    correlation_graph,
    distinct_entries,
    policy_gradient_loss,
    triplet_hinge,
)


def circle(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# Image features: five points on a circle; text features: five numbers on a line.
ANGLES = [0, 10, 30, 100, 180]
TEXT = torch.tensor([[0.0], [5.0], [6.0], [20.0], [1.5]])
# By hand, each item itself first, then its two nearest others:
IMAGE_NEIGHBOURS = [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 2, 4], [4, 3, 2]]  # by angle
TEXT_NEIGHBOURS = [[0, 4, 1], [1, 2, 4], [2, 1, 4], [3, 2, 1], [4, 0, 1]]  # by |t_i - t_j|


def build(num_train=5, bits=16, text_dim=1, reference_dim=2, **params):
    params = {"text_hidden": [8], "generator_hidden": [8], **params}
    return create_method(
        "ugach", bits=bits, num_train=num_train, num_classes=0, text_dim=text_dim, reference_dim=reference_dim, **params
    )


def test_the_correlation_graph_by_hand():
    graph = correlation_graph(circle(ANGLES), TEXT, neighbours=3)
    expected = torch.tensor([image + text for image, text in zip(IMAGE_NEIGHBOURS, TEXT_NEIGHBOURS)])
    assert graph.dtype == torch.int64 and torch.equal(graph, expected)
    # Cosine text neighbours ignore each vector's length: texts along the image directions, scaled.
    scaled = circle(ANGLES) * torch.tensor([[1.0], [7.0], [0.2], [3.0], [50.0]])
    graph = correlation_graph(circle(ANGLES), scaled, neighbours=3, text_metric="cosine")
    assert torch.equal(graph, torch.tensor([row + row for row in IMAGE_NEIGHBOURS]))
    assert torch.equal(correlation_graph(circle(ANGLES), TEXT, neighbours=1), torch.arange(5)[:, None].repeat(1, 2))


def test_the_method_builds_the_graph_once_it_has_both_modalities_and_keeps_it():
    method = build(neighbours=3)
    method.set_reference_features(circle(ANGLES) * 4.0)  # any scale: the reference rows are unit
    assert method.knn.shape == (0, 6)  # the text is not there yet (the loop's order)
    method.set_train_text(TEXT)
    expected = torch.tensor([image + text for image, text in zip(IMAGE_NEIGHBOURS, TEXT_NEIGHBOURS)])
    assert torch.equal(method.knn, expected)
    state = method.state_dict()
    assert "knn" in state and "train_text" not in state  # the text is data, the graph is state
    resumed = build(neighbours=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.knn, expected)
    resumed.set_train_text(TEXT * 100)  # a resumed run keeps its graph; the text is handed over again
    assert torch.equal(resumed.knn, expected)


def test_distinct_entries_mark_first_occurrences():
    rows = torch.tensor([[3, 1, 3, 2, 1, 1], [0, 1, 2, 3, 4, 5]])
    assert distinct_entries(rows).tolist() == [[True, True, False, True, False, False], [True] * 6]


def test_the_triplet_hinge_by_hand():
    query = torch.tensor([[1.0, -1.0]])
    positives = torch.tensor([[[1.0, 1.0], [0.5, -1.0]]])
    negatives = torch.tensor([[[-1.0, -1.0], [-1.0, 1.0]]])
    # d = ||a - b||^2 / 4: d(q, p) = 1, 0.0625; d(q, n) = 1, 2.
    assert code_distances(query, positives).tolist() == [[1.0, 0.0625]]
    hinge = triplet_hinge(query, positives, negatives, margin=0.5)
    assert hinge.tolist() == [[0.5, 0.0]]  # max(0, 0.5 + 1 - 1), max(0, 0.5 + 0.0625 - 2)
    # The authors' distance: sum of squared differences of sigmoid outputs, with codes tanh(z / 2).
    generator = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(3, 8, generator=generator), torch.randn(3, 1, 8, generator=generator)
    method = build(bits=8)
    authors = (torch.sigmoid(z_a)[:, None] - torch.sigmoid(z_b)).pow(2).sum(-1)
    torch.testing.assert_close(code_distances(method.continuous_codes(z_a), method.continuous_codes(z_b)), authors)
    assert torch.equal(torch.sign(method.continuous_codes(z_a)) > 0, torch.sigmoid(z_a) >= 0.5)


def test_the_policy_gradient_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), float("-inf")], [5.0, 1.0, 2.0]], requires_grad=True)
    choice = torch.tensor([[1, 0], [2, 2]])
    reward = torch.tensor([[0.6, 0.8], [0.9, 0.9]])
    weights = torch.tensor([1.0, 0.0])  # the second query had no candidate: left out
    loss = policy_gradient_loss(logits, choice, reward, weights)
    expected = -(0.6 * math.log(2 / 3) + 0.8 * math.log(1 / 3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dlogit_k of -(r1 log p_1 + r2 log p_0) / 2 = ((r1 + r2) p_k - r1 [k = 1] - r2 [k = 0]) / 2
    p = [1 / 3, 2 / 3, 0.0]
    by_hand = [(1.4 * p[0] - 0.8) / 2, (1.4 * p[1] - 0.6) / 2, 0.0]
    torch.testing.assert_close(logits.grad[0], torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
    assert not logits.grad[1].any()
    assert not reward.requires_grad


def paired_set(count=40, clusters=4, image_dim=8, text_dim=6, seed=0):
    """Four clusters; an item's image and text both come from its cluster's centre plus noise."""
    generator = torch.Generator().manual_seed(seed)
    cluster = torch.arange(count) % clusters
    image_centres = torch.randn(clusters, image_dim, generator=generator) * 2
    text_centres = torch.randn(clusters, text_dim, generator=generator) * 2
    images = image_centres[cluster] + 0.5 * torch.randn(count, image_dim, generator=generator)
    texts = text_centres[cluster] + 0.5 * torch.randn(count, text_dim, generator=generator)
    return images, texts, cluster


def ready_method(images, texts, bits=16, **params):
    params = {"neighbours": 3, "sample_ratio": 4, "text_hidden": [32], "generator_hidden": [16], **params}
    method = create_method(
        "ugach",
        bits=bits,
        num_train=images.shape[0],
        num_classes=0,
        text_dim=texts.shape[1],
        reference_dim=images.shape[1],
        **params,
    )
    method.set_reference_features(images)
    method.set_train_text(texts)
    return method


def step_of(network, images, texts, indices):
    return StepInputs(
        outputs=network(images[indices]), labels=torch.zeros(len(indices), 0), indices=indices, text=texts[indices]
    )


def test_the_terms_send_no_gradient_into_each_other():
    torch.manual_seed(0)
    images, texts, _ = paired_set()
    method = ready_method(images, texts)
    network = nn.Linear(images.shape[1], 16)
    method(step_of(network, images, texts, torch.arange(20)))  # the memory holds some images
    terms = method(step_of(network, images, texts, torch.arange(10, 30)))
    assert set(terms) == {"discriminator", "generator"}
    discriminator = list(network.parameters()) + list(method.text_network.parameters())
    generator = list(method.generator_image.parameters()) + list(method.generator_text.parameters())
    assert set(map(id, discriminator + generator)) <= set(
        map(id, list(network.parameters()) + list(method.parameters()))
    )

    def gradients(term, parameters):
        return torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)

    assert all(g is None for g in gradients(terms["generator"], discriminator))
    assert all(g is None for g in gradients(terms["discriminator"], generator))
    assert any(g is not None and g.abs().sum() > 0 for g in gradients(terms["generator"], generator))
    into_discriminator = gradients(terms["discriminator"], discriminator)
    assert all(g is not None and g.abs().sum() > 0 for g in into_discriminator)  # both networks learn
    assert 0.5 <= method.step_stats["reward"].item() <= 1.0


def test_the_draws_follow_the_graph_and_the_memory():
    torch.manual_seed(1)
    images, texts, _ = paired_set()
    method = ready_method(images, texts, sample_ratio=1)  # the pool is every (seen) item
    network = nn.Linear(images.shape[1], 16)
    batch = torch.arange(8)
    method(step_of(network, images, texts, batch))
    for selection in method.last_selection.values():
        rows = method.knn[batch]
        assert (selection.positives[:, :, None] == rows[:, None, :]).any(-1).all()  # from the graph
        assert not (selection.negatives[:, :, None] == rows[:, None, :]).any(-1).any()  # never a positive
    # Text queries rank images the memory has seen: only the batch's, after the first step.
    t2i = method.last_selection["t2i"]
    assert set(t2i.positives.flatten().tolist()) | set(t2i.negatives.flatten().tolist()) <= set(batch.tolist())
    assert set(method.last_selection["i2t"].negatives.flatten().tolist()) - set(batch.tolist())  # any text item


def cross_modal_agreement(method, network, images, texts, cluster):
    """Mean bit agreement of image and text codes: of each item's own pair, and of other-cluster pairs."""
    with torch.no_grad():
        image_bits = torch.sign(method.continuous_codes(network(images)))
        text_bits = torch.sign(method.encode_text(texts))
    agreement = (image_bits @ text_bits.t() / image_bits.shape[1] + 1) / 2
    other = cluster[:, None] != cluster[None, :]
    return agreement.diagonal().mean().item(), agreement[other].mean().item()


@pytest.mark.parametrize("warmup_epochs", [0, 1])  # adversarial negatives; uniform ones (the authors' pre-training)
def test_a_few_steps_pull_paired_codes_together(warmup_epochs):
    torch.manual_seed(0)
    images, texts, cluster = paired_set()
    # Five neighbours per modality: the graph's positives are about half of an item's cluster.
    method = ready_method(images, texts, neighbours=5, margin=1.0, warmup_epochs=warmup_epochs)
    method.on_epoch_start(1, 15)
    assert method.phase == ("warmup" if warmup_epochs else "both")
    network = nn.Linear(images.shape[1], 16)
    optimiser = torch.optim.Adam(list(network.parameters()) + list(method.parameters()), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):  # epochs of 4 batches of 10
        for indices in torch.randperm(40, generator=order).view(4, 10):
            terms = method(step_of(network, images, texts, indices))
            optimiser.zero_grad()
            sum(terms.values()).backward()
            optimiser.step()
            losses.append(terms["discriminator"].item())
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[4:12]) / 8  # from when the memory has every image
    paired, other = cross_modal_agreement(method, network, images, texts, cluster)
    assert paired > 0.8 and other < 0.5  # 0.5: codes of unrelated items agree on half the bits


def test_the_alternating_schedule_trains_one_side_per_epoch():
    method = build(schedule="alternate", warmup_epochs=1, discriminator_epochs=1, generator_epochs=2)
    assert [method.phase_of(epoch) for epoch in range(1, 8)] == [
        "warmup",
        "discriminator",
        "generator",
        "generator",
        "discriminator",
        "generator",
        "generator",
    ]
    assert build().phase == "both" and build(warmup_epochs=2).phase_of(3) == "both"

    torch.manual_seed(0)
    images, texts, _ = paired_set()
    method = ready_method(images, texts, schedule="alternate", warmup_epochs=1)
    network = nn.Linear(images.shape[1], 16)
    for epoch, active in ((1, "discriminator"), (2, "discriminator"), (3, "generator")):
        method.on_epoch_start(epoch, 10)
        terms = method(step_of(network, images, texts, torch.arange(10)))
        inactive = ({"discriminator", "generator"} - {active}).pop()
        assert terms[active].requires_grad and terms[active].item() != 0
        assert terms[inactive].item() == 0 and not terms[inactive].requires_grad


def test_bad_parameters_and_data_are_one_line_errors_naming_them():
    for params, name in (
        ({"margin": -1.0}, "margin"),
        ({"margin": "wide"}, "margin"),
        ({"neighbours": 0}, "neighbours"),
        ({"selections": 0}, "selections"),
        ({"sample_ratio": 0}, "sample_ratio"),
        ({"generator_hidden": [0]}, "generator_hidden"),
        ({"generator_hidden": "big"}, "generator_hidden"),
        ({"text_metric": "l1"}, "text_metric"),
        ({"schedule": "sometimes"}, "schedule"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"generator_epochs": 0}, "generator_epochs"),
        ({"generator_weight": -2}, "generator_weight"),
        ({"text_hidden": [-3]}, "text_hidden"),
    ):
        with pytest.raises(DmuhError, match=rf"^method parameter {name}=") as error:
            build(**params)
        assert "\n" not in str(error.value)
    assert build().margin == 2.0 and build(bits=64).margin == 8.0  # bits / 8 by default
    with pytest.raises(DmuhError, match="neighbours=6: more than the 5 training items"):
        build(neighbours=6).set_reference_features(circle(ANGLES))
    with pytest.raises(DmuhError, match="reference_dim=3"):
        build(reference_dim=3).set_reference_features(circle(ANGLES))
    with pytest.raises(DmuhError, match=r"training text of shape \(4, 1\)"):
        build().set_train_text(TEXT[:4])
    method = build()
    method.set_reference_features(circle(ANGLES))
    with pytest.raises(DmuhError, match="correlation graph is not built"):
        method(StepInputs(outputs=torch.zeros(2, 16), labels=torch.zeros(2, 0), indices=torch.arange(2), text=TEXT[:2]))
