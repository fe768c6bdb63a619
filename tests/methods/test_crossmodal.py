"""Cross-modal hashing: DMUH across modalities and DCMH on hand-worked cases, I->T and T->I MAP
against a brute-force reference, the cross-modal protocols and synthetic tags, and the whole path
through the CLI (train on paired data, encode either modality, search an image index with text).

Every case is tiny (8-d image features, a few dozen pairs, 8 bits) so the file runs in seconds.
"""

import json
import math

import numpy as np
import pytest
import torch

from dmuh.cli import main
from dmuh.data import Vocabulary, make_split, open_source
from dmuh.data.synthetic_pairs import RELATED, tag_texts
from dmuh.engine.builder import encode_part, encode_text_part, evaluate_cross_modal_map, load_run
from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, create_method

CLASSES = ["cat", "ship", "truck"]
TINY = [
    "--model",
    "mlp",
    "--model-param",
    "hidden=[]",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--bits",
    "8",
    "--device",
    "cpu",
    "--quiet",
    "--init",
    "scratch",
    "--optimizer",
    "adamw",
    "--lr",
    "0.003",
    "--lr-end",
    "0.0001",
]
PROTOCOL = [
    "--protocol",
    "per-class",
    "--protocol-param",
    "query_per_class=4",
    "--protocol-param",
    "train_per_class=12",
]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    return err


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """60 pairs of 3 classes: image features = class centre + noise, text = generated tags."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    image = (np.eye(3, 8)[labels] * 3 + rng.normal(size=(60, 8))).astype(np.float32)
    texts = tag_texts(labels, CLASSES, seed=1)
    vocabulary = Vocabulary.fit(texts)
    path = root / "pairs.npz"
    np.savez(
        path,
        image=image,
        text=vocabulary.vectorize(texts),
        labels=np.eye(3, dtype=np.uint8)[labels],
        class_names=np.array(CLASSES),
        vocabulary=np.array(vocabulary.words),
    )
    np.savez(root / "images.npz", features=image, labels=np.eye(3, dtype=np.uint8)[labels])
    return root


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dmuh-cross"
    assert (
        main(
            [
                "train",
                "--method",
                "dmuh-cross",
                "--data",
                str(pairs / "pairs.npz"),
                *PROTOCOL,
                *TINY,
                "-p",
                "text_hidden=[16]",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    return run


# -- losses by hand -------------------------------------------------------------------------


def linear_text_network(method, weight, bias=None):
    """Make the method's text network (text_hidden=[]: one linear layer) compute text @ weight.T + bias."""
    layer = method.text_network.hash_layer
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.zeros(layer.bias.shape) if bias is None else torch.tensor(bias, dtype=torch.float32))


def softplus(x):
    return math.log1p(math.exp(x))


def test_dmuh_cross_loss_matches_a_hand_computation():
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    method = create_method(
        "dmuh-cross", bits=2, train_labels=labels, text_dim=2, text_hidden=[], beta=2.0, gamma=0.5, intra=1.0
    )
    linear_text_network(method, [[1.0, 0.0], [0.0, 1.0]])  # text outputs = the text vectors
    with torch.no_grad():  # the text momentum copy lags: outputs = 0.5 * text
        method.text_momentum.network.hash_layer.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
        method.text_momentum.network.hash_layer.bias.zero_()
    z_img = [[0.3, -0.6], [-0.2, 0.9]]
    m_img = [[0.1, -0.6], [-0.2, 0.5]]
    text = [[0.8, -0.4], [0.1, 0.6]]
    step = StepInputs(
        outputs=torch.tensor(z_img),
        labels=labels[:2],
        indices=torch.tensor([0, 1]),
        momentum_outputs=torch.tensor(m_img),
        text=torch.tensor(text),
    )
    terms = method(step)

    h = {"img": np.tanh(z_img), "txt": np.tanh(text)}
    m = {"img": np.tanh(m_img), "txt": np.tanh(np.array(text) * 0.5)}
    u = {x: np.abs(h[x] - m[x]) for x in h}
    ubar = {x: u[x].mean(axis=1) for x in h}
    similar = [[1, 0], [0, 1]]  # the batch against the memory (items 0 and 1 seen; item 2 not yet)
    n_b = 3 * 2

    def pairs(a, b):
        total = 0.0
        for i in range(2):
            for j in range(2):
                theta = 0.5 * float(h[a][i] @ h[b][j])
                total += math.exp(ubar[a][i] + ubar[b][j]) * (softplus(theta) - similar[i][j] * theta)
        return total / n_b

    assert terms["inter"].item() == pytest.approx(pairs("img", "txt") + pairs("txt", "img"), rel=1e-5)
    assert terms["intra"].item() == pytest.approx(pairs("img", "img") + pairs("txt", "txt"), rel=1e-5)
    for x, name in (("img", "image"), ("txt", "text")):
        quantization = 2.0 * (np.exp(u[x]) * (h[x] - np.sign(h[x])) ** 2).sum() / n_b
        assert terms[f"{name}_quantization"].item() == pytest.approx(quantization, rel=1e-5)
        assert terms[f"{name}_uncertainty_term"].item() == pytest.approx(0.5 * u[x].sum() / n_b, rel=1e-5)
    assert method.text_memory.uncertainty[:2].numpy() == pytest.approx(ubar["txt"], rel=1e-5)


def test_regu_cross_is_the_loss_without_uncertainty():
    method = create_method("regu-cross", bits=4, num_train=6, num_classes=2, text_dim=3)
    assert method.requirements().momentum is None and method.text_momentum is None
    step = StepInputs(
        outputs=torch.randn(2, 4), labels=torch.eye(2), indices=torch.tensor([0, 1]), text=torch.randn(2, 3)
    )
    assert set(method(step)) == {"inter", "intra", "image_quantization", "text_quantization"}


def test_dcmh_loss_matches_a_hand_computation():
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    method = create_method("dcmh", bits=2, train_labels=labels, text_dim=2, text_hidden=[], gamma=0.5, eta=0.25, seed=3)
    linear_text_network(method, [[1.0, 0.0], [0.0, 1.0]])
    f = [[0.5, -1.0], [-0.4, 2.0]]
    g = [[1.5, 0.5], [0.0, -0.5]]
    b = method.shared_codes[:2].numpy()
    step = StepInputs(outputs=torch.tensor(f), labels=labels[:2], indices=torch.tensor([0, 1]), text=torch.tensor(g))
    terms = method(step)
    similar = [[1, 0], [0, 1]]
    n_b = 3 * 2

    def likelihood(a, c):
        return (
            sum(
                softplus(0.5 * float(np.dot(a[i], c[j]))) - similar[i][j] * 0.5 * float(np.dot(a[i], c[j]))
                for i in range(2)
                for j in range(2)
            )
            / n_b
        )

    f, g = np.array(f), np.array(g)
    assert terms["image_likelihood"].item() == pytest.approx(likelihood(f, g), rel=1e-5)
    assert terms["text_likelihood"].item() == pytest.approx(likelihood(g, f), rel=1e-5)
    assert terms["image_quantization"].item() == pytest.approx(0.5 * ((b - f) ** 2).sum() / n_b, rel=1e-5)
    assert terms["text_balance"].item() == pytest.approx(0.25 * (g.sum(axis=0) ** 2).sum() / n_b, rel=1e-5)
    # B = sign(F + G) from the memories at the next epoch
    method.on_epoch_start(2, 2)
    assert method.shared_codes[:2].numpy() == pytest.approx(np.sign(f + g))


def test_cross_modal_methods_need_paired_data(pairs, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--method",
                "dcmh",
                "--data",
                str(pairs / "images.npz"),
                *PROTOCOL,
                *TINY,
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "image-text pairs" in error_line(capsys)


# -- retrieval both ways --------------------------------------------------------------------


def brute_force_map(query, database, query_labels, database_labels):
    """MAP@all of sign codes, ties broken by database position (ties="index")."""
    aps = []
    for q in range(len(query)):
        distances = (np.sign(query[q]) != np.sign(database)).sum(axis=1)
        order = np.argsort(distances, kind="stable")
        relevant = (database_labels[order] @ query_labels[q]) > 0
        if not relevant.any():
            aps.append(0.0)
            continue
        hits = np.cumsum(relevant)
        aps.append(float((hits[relevant] / (np.flatnonzero(relevant) + 1)).mean()))
    return float(np.mean(aps))


def test_cross_modal_map_matches_brute_force(trained):
    exp = load_run(trained)
    maps = evaluate_cross_modal_map(exp, ties="index")
    labels = np.asarray(exp.source.labels).astype(float)
    images = encode_part(exp, "query").numpy(), encode_part(exp, "database").numpy()
    texts = encode_text_part(exp, "query").numpy(), encode_text_part(exp, "database").numpy()
    q, db = labels[exp.split.query], labels[exp.split.database]
    assert maps["i2t"] == pytest.approx(brute_force_map(images[0], texts[1], q, db), abs=1e-9)
    assert maps["t2i"] == pytest.approx(brute_force_map(texts[0], images[1], q, db), abs=1e-9)
    log = (trained / "log.csv").read_text()
    assert "map_i2t" in log and "map_t2i" in log


def test_evaluate_reports_both_directions(trained, capsys):
    assert main(["evaluate", "--run", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "image -> text:" in out and "text -> image:" in out
    report = json.loads((trained / "eval.json").read_text())
    for direction in ("i2t", "t2i"):
        scores = report["directions"][direction]
        assert 0.0 <= scores["map"] <= 1.0 and scores["precision_at_k"]


# -- the CLI end to end ---------------------------------------------------------------------


def test_search_an_image_index_with_text_and_a_text_index_with_images(pairs, trained, tmp_path, capsys):
    data = str(pairs / "pairs.npz")
    assert main(["encode", "--run", str(trained), "--images", data, "--out", str(tmp_path / "images.npz")]) == 0
    assert main(["encode", "--run", str(trained), "--texts", data, "--out", str(tmp_path / "texts.npz")]) == 0
    for name in ("images", "texts"):
        assert (
            main(["index", "build", "--codes", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}.index")])
            == 0
        )
    capsys.readouterr()
    assert (
        main(["search", "--index", str(tmp_path / "images.index"), "--text", "cat pet fur", "--k", "5", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert len(report["queries"][0]["results"]) == 5
    # image codes as queries against the index of text codes (image -> text)
    assert (
        main(
            [
                "search",
                "--index",
                str(tmp_path / "texts.index"),
                "--queries",
                str(tmp_path / "images.npz"),
                "--k",
                "3",
                "--json",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["queries"]) == 60
    # texts from a .txt file, one a line, with the run's vocabulary
    (tmp_path / "queries.txt").write_text("ship sea\n\ntruck road\n")
    assert (
        main(
            [
                "encode",
                "--run",
                str(trained),
                "--texts",
                str(tmp_path / "queries.txt"),
                "--out",
                str(tmp_path / "q.npz"),
            ]
        )
        == 0
    )
    assert "encoded 2 texts" in capsys.readouterr().out


def test_a_text_query_with_no_known_word_is_one_line(trained, pairs, tmp_path, capsys):
    data = str(pairs / "pairs.npz")
    assert main(["encode", "--run", str(trained), "--images", data, "--out", str(tmp_path / "images.npz")]) == 0
    assert main(["index", "build", "--codes", str(tmp_path / "images.npz"), "--out", str(tmp_path / "i.index")]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "i.index"), "--text", "zebra quasar"]) == 2
    assert "'zebra quasar'" in (err := error_line(capsys)) and "vocabulary" in err


def test_text_of_a_single_modal_run_is_refused(pairs, tmp_path, capsys):
    run = tmp_path / "regu"
    assert (
        main(["train", "--method", "regu", "--data", str(pairs / "pairs.npz"), *PROTOCOL, *TINY, "--out", str(run)])
        == 0
    )
    capsys.readouterr()
    assert (
        main(["encode", "--run", str(run), "--texts", str(pairs / "pairs.npz"), "--out", str(tmp_path / "t.npz")]) == 2
    )
    assert "hashes images only" in error_line(capsys)


def test_encode_needs_one_of_images_or_texts(trained, tmp_path, capsys):
    assert main(["encode", "--run", str(trained), "--out", str(tmp_path / "x.npz")]) == 2
    assert "--images" in error_line(capsys)


# -- protocols and synthetic tags -----------------------------------------------------------


def test_mirflickr25k_protocol_sizes():
    labels = (np.random.default_rng(0).random((12000, 24)) < 0.1).astype(np.uint8)
    split = make_split("mirflickr25k", labels, seed=0)
    assert (len(split.query), len(split.train), len(split.database)) == (2000, 5000, 10000)
    assert not set(split.query) & set(split.database) and set(split.train) <= set(split.database)
    assert len(make_split("mirflickr25k", labels, seed=0, train=10000).train) == 10000


def test_nuswide10_protocol_draws_per_class():
    labels = np.eye(10, dtype=np.uint8)[np.repeat(np.arange(10), 1300)]
    split = make_split("nuswide10", labels, seed=0)
    assert (len(split.query), len(split.train)) == (2100, 10500)
    assert np.bincount(labels[split.query].argmax(axis=1)).tolist() == [210] * 10


def test_synthetic_tags_follow_their_probabilities():
    names = list(RELATED)
    labels = np.repeat(np.arange(10), 300)
    texts = tag_texts(labels, names, seed=0, drop=0.3, swap=0.0)
    assert texts == tag_texts(labels, names, seed=0, drop=0.3, swap=0.0)  # seeded
    has_class_word = np.mean([names[c] in t.split() for c, t in zip(labels, texts)])
    assert has_class_word == pytest.approx(0.7, abs=0.04)
    swapped = tag_texts(labels, names, seed=0, drop=0.0, swap=1.0, related=0.0, noise=0)
    assert all(names[c] not in t.split() and len(t.split()) == 1 for c, t in zip(labels, swapped))
    assert all(t.strip() for t in tag_texts(labels, names, seed=0, drop=1.0, related=0.0, noise=0))
    with pytest.raises(DmuhError, match="drop"):
        tag_texts(labels, names, drop=1.5)


def test_paired_data_trains_single_modal_methods_on_its_images(pairs):
    source = open_source(str(pairs / "pairs.npz"))
    assert source.text.shape[0] == 60 and source.decode().shape == (60, 8)


def test_images_with_a_text_file_each_train_an_image_network_and_resume(tmp_path, capsys):
    """A paired folder (class folders of 8x8 PNGs, a .txt beside each) through a small CNN, then
    --resume to a second epoch: the text network and its momentum copy come back from the checkpoint."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.full((8, 8, 3), 40 * c, np.uint8) + rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
            (tmp_path / "data" / name / f"{i}.txt").write_text(" ".join(tag_texts([c], CLASSES, seed=i)))
    run = tmp_path / "run"
    command = [
        "train",
        "--method",
        "dmuh-cross",
        "--data",
        f"paired:{tmp_path / 'data'}",
        "--protocol",
        "per-class",
        "--protocol-param",
        "query_per_class=2",
        "--protocol-param",
        "train_per_class=6",
        "--model",
        "smallcnn",
        "--model-param",
        "width=8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--bits",
        "8",
        "--quiet",
        "--init",
        "scratch",
        "-p",
        "text_hidden=[8]",
        "--out",
        str(run),
    ]
    assert main(command) == 0
    assert Vocabulary.load(run / "vocabulary.json").words
    command[command.index("--epochs") + 1] = "2"
    assert main(command + ["--resume"]) == 0
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and "map_t2i" in rows[0]


def test_ugach_trains_on_unlabeled_pairs_and_is_scored_with_labels(pairs, tmp_path, capsys):
    run = tmp_path / "ugach"
    assert (
        main(
            [
                "train",
                "--method",
                "ugach",
                "--data",
                f"unlabeled:{pairs / 'pairs.npz'}",
                "--protocol",
                "unsupervised",
                "--protocol-param",
                "query=12",
                *TINY,
                "-p",
                "text_hidden=[16]",
                "-p",
                "generator_hidden=[16]",
                "-p",
                "neighbours=3",
                "-p",
                "sample_ratio=4",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--data", str(pairs / "pairs.npz")]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert set(report["directions"]) == {"i2t", "t2i"}
    # a supervised cross-modal method refuses the unlabeled reading
    assert (
        main(
            [
                "train",
                "--method",
                "dcmh",
                "--data",
                f"unlabeled:{pairs / 'pairs.npz'}",
                "--protocol",
                "unsupervised",
                "--protocol-param",
                "query=12",
                *TINY,
                "--out",
                str(tmp_path / "dcmh"),
            ]
        )
        == 2
    )
    assert "labels" in error_line(capsys)


def test_dmuh_serve_answers_text_queries_as_search_does(pairs, trained, tmp_path, capsys):
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dmuh.retrieval.service import SearchService
    from dmuh.serve.app import create_app

    data = str(pairs / "pairs.npz")
    assert main(["encode", "--run", str(trained), "--images", data, "--out", str(tmp_path / "images.npz")]) == 0
    assert (
        main(["index", "build", "--codes", str(tmp_path / "images.npz"), "--out", str(tmp_path / "images.index")]) == 0
    )
    capsys.readouterr()
    assert (
        main(["search", "--index", str(tmp_path / "images.index"), "--text", "cat pet fur", "--k", "5", "--json"]) == 0
    )
    expected = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    client = TestClient(create_app(SearchService.open(tmp_path / "images.index")))
    assert client.get("/info").json()["queries"] == {"image": False, "text": True, "codes": True}
    body = client.post("/search", json={"text": "cat pet fur", "k": 5}).json()
    assert body["results"] == expected and body["query"]["uncertainty"] is None
    error = client.post("/search", json={"text": "zebra quasar", "k": 5})
    assert error.status_code == 400 and "none of its words" in error.json()["error"]
    error = client.post("/search", json={"text": "cat", "k": 5, "rerank": "uncertainty"})
    assert error.status_code == 400 and "text queries are ranked by Hamming distance" in error.json()["error"]
