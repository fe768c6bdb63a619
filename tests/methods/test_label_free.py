"""Label-free hashing: DistillHash's distilled pairs and RPH's terms on hand-worked cases, every
label-free method trained through the CLI on unlabeled data and scored on its labeled twin, and
the refusals of what needs labels.

Every case is tiny (8x8 images, 48 items, 1 epoch, 8 bits) so the file runs in seconds on a CPU.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmuh.cli import main
from dmuh.errors import DmuhError
from dmuh.methods import StepInputs, available, create_method, method_class
from dmuh.methods.distillhash import cosine_knn, distilled_pairs, reverse_neighbours
from dmuh.methods.rph import rank_divergence

LABEL_FREE = {"itq", "lsh", "distillhash", "dsg", "rph", "greedyhash-unsup", "bihalf", "cibhash"}
IMAGE_METHODS = ["itq", "lsh", "distillhash", "dsg", "greedyhash-unsup", "bihalf", "cibhash"]
# What the defaults would not fit to 40 training items, or what makes a case slow on a CPU.
METHOD_PARAMS = {
    "dsg": ["-p", "clusters=2", "-p", "sample_pairs=2000", "-p", "kmeans_restarts=1"],
    "distillhash": ["-p", "neighbours=3"],
}
TINY = ["--epochs", "1", "--batch-size", "16", "--bits", "8", "--device", "cpu", "--quiet"]
IMAGES = ["--model", "smallcnn", "--model-param", "width=8", *TINY]
VECTORS = ["--model", "mlp", *TINY]
pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")

UNSUPERVISED = ["--protocol", "unsupervised", "--protocol-param", "query=8", "--protocol-param", "topk=5"]


def error_line(capsys) -> str:
    """The one-line error of a refused command (stderr), checked to be one line."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    return err


def save_random_png(path: Path, rng: np.random.Generator) -> None:
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """flat: 48 random 8x8 RGB PNGs, no class folders (unlabeled); tree: 3 class folders of 8 PNGs;
    unlabeled.npz / labeled.npz: the same 48 feature vectors, the second with labels; other.npz:
    labeled vectors of different items."""
    root = tmp_path_factory.mktemp("label_free_data")
    rng = np.random.default_rng(0)
    flat = root / "flat"
    flat.mkdir()
    for i in range(48):
        save_random_png(flat / f"img{i:02d}.png", rng)
    tree = root / "tree"
    for name in ("cat", "dog", "eel"):
        (tree / name).mkdir(parents=True)
        for i in range(8):
            save_random_png(tree / name / f"{i}.png", rng)
    features = rng.normal(size=(48, 6)).astype(np.float32)
    np.savez(root / "unlabeled.npz", features=features)
    np.savez(root / "labeled.npz", features=features, labels=np.arange(48) % 3)
    np.savez(root / "other.npz", features=features + 1.0, labels=np.arange(48) % 3)
    return {
        "flat": flat,
        "tree": tree,
        "unlabeled": root / "unlabeled.npz",
        "labeled": root / "labeled.npz",
        "other": root / "other.npz",
    }


# ---------------------------------------------------------------------------------------------
# 1. DistillHash's distillation on a case worked by hand

# Five unit vectors at 0, 10, 20, 30, 40 degrees; the cosine ranks neighbours by angle gap.
ANGLES = [0.0, 10.0, 20.0, 30.0, 40.0]
# K = 2 nearest other items (gaps in degrees):
#   0: 1 (10), 2 (20)              -> N(0) = {1, 2}
#   1: 0 (10), 2 (10); 3 at 20     -> N(1) = {0, 2}
#   2: 1 (10), 3 (10); 0, 4 at 20  -> N(2) = {1, 3}
#   3: 2 (10), 4 (10)              -> N(3) = {2, 4}
#   4: 3 (10), 2 (20)              -> N(4) = {3, 2}
NEIGHBOURS = [{1, 2}, {0, 2}, {1, 3}, {2, 4}, {2, 3}]
# Signal s_ij = 1 when j in N(i) or i in N(j) (and s_ii = 1):
#   (0,1) 1  (0,2) 1  (0,3) 0  (0,4) 0
#   (1,2) 1  (1,3) 0  (1,4) 0
#   (2,3) 1  (2,4) 1 (2 in N(4))
#   (3,4) 1
# Shared share eta_ij = |N(i) & N(j)| / K (eta_ii = 1):
#   (0,1) {2}   1/2   (0,2) {1} 1/2   (0,3) {2} 1/2   (0,4) {2} 1/2
#   (1,2) {}    0     (1,3) {2} 1/2   (1,4) {2} 1/2
#   (2,3) {}    0     (2,4) {3} 1/2
#   (3,4) {2}   1/2
# similar_threshold p = 0.3, dissimilar_threshold o = 0:
#   similar   = s = 1 and eta >= 0.3: the diagonal, (0,1), (0,2), (2,4), (3,4)
#   dropped   = s = 1 and eta = 0: (1,2), (2,3) (neighbours that share no neighbour)
#   dissimilar = s = 0 and eta <= 0: none, since every non-neighbour pair, (0,3), (0,4), (1,3),
#   (1,4), shares one neighbour (eta = 1/2 > 0): all dropped. So kept = similar here.
SIMILAR_03 = [
    [1, 1, 1, 0, 0],
    [1, 1, 0, 0, 0],
    [1, 0, 1, 0, 1],
    [0, 0, 0, 1, 1],
    [0, 0, 1, 1, 1],
]
KEPT_03_00 = SIMILAR_03
# similar_threshold p = 0.6: no pair but an item with itself has eta >= 0.6 (eta <= 1/2 off the
# diagonal), so similar is the identity.
SIMILAR_06 = np.eye(5, dtype=int).tolist()
# ... with o = 0 no dissimilar pair either: kept is the identity too.
KEPT_06_00 = SIMILAR_06
# ... with o = 0.5 the non-neighbour pairs (0,3), (0,4), (1,3), (1,4) (s = 0, eta = 1/2 <= 0.5)
# are kept as dissimilar; the neighbour pairs (s = 1) are still dropped.
KEPT_06_05 = [
    [1, 0, 0, 1, 1],
    [0, 1, 0, 1, 1],
    [0, 0, 1, 0, 0],
    [1, 1, 0, 1, 0],
    [1, 1, 0, 0, 1],
]


def fan_features() -> torch.Tensor:
    radians = torch.tensor([math.radians(a) for a in ANGLES], dtype=torch.float64)
    return torch.stack([torch.cos(radians), torch.sin(radians)], dim=1).float()


def test_cosine_knn_of_the_fan_gives_the_hand_neighbour_lists():
    knn = cosine_knn(fan_features(), 2)
    assert knn.shape == (5, 2) and knn.dtype == torch.int64
    assert [set(row.tolist()) for row in knn] == NEIGHBOURS
    pointers, items = reverse_neighbours(knn)  # who lists a: 0 <- {1}, 1 <- {0, 2}, 2 <- {0, 1, 3, 4}, ...
    listed_by = [set(items[pointers[a] : pointers[a + 1]].tolist()) for a in range(5)]
    assert listed_by == [{i for i, row in enumerate(NEIGHBOURS) if a in row} for a in range(5)]


@pytest.mark.parametrize(
    "similar_threshold, dissimilar_threshold, similar, kept",
    [
        (0.3, 0.0, SIMILAR_03, KEPT_03_00),
        (0.6, 0.0, SIMILAR_06, KEPT_06_00),
        (0.6, 0.5, SIMILAR_06, KEPT_06_05),
    ],
)
def test_distilled_pairs_of_the_fan(similar_threshold, dissimilar_threshold, similar, kept):
    knn = cosine_knn(fan_features(), 2)
    reverse = reverse_neighbours(knn)
    got_similar, got_kept = distilled_pairs(knn, reverse, torch.arange(5), similar_threshold, dissimilar_threshold)
    assert got_similar.dtype == torch.float32 and got_kept.dtype == torch.float32
    assert got_similar.tolist() == [[float(v) for v in row] for row in similar]
    assert got_kept.tolist() == [[float(v) for v in row] for row in kept]
    # A batch that is a subset, in another order, gets the matching rows.
    batch = torch.tensor([3, 0])
    sub_similar, sub_kept = distilled_pairs(knn, reverse, batch, similar_threshold, dissimilar_threshold)
    assert sub_similar.tolist() == [[float(v) for v in similar[i]] for i in (3, 0)]
    assert sub_kept.tolist() == [[float(v) for v in kept[i]] for i in (3, 0)]


def test_distillhash_reads_its_pairs_from_the_reference_features():
    """The method's K-NN table is the hand one, and a loss step on it is finite."""
    method = create_method("distillhash", bits=4, num_train=5, num_classes=0, neighbours=2)
    method.set_reference_features(fan_features())
    assert [set(row.tolist()) for row in method.knn] == NEIGHBOURS
    step = StepInputs(
        outputs=torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),
        labels=torch.zeros(2, 0),
        indices=torch.tensor([3, 0]),
    )
    terms = method(step)
    assert all(torch.isfinite(value) for value in terms.values())
    too_many = create_method("distillhash", bits=4, num_train=5, num_classes=0, neighbours=5)
    with pytest.raises(DmuhError, match="neighbours=5"):
        too_many.set_reference_features(fan_features())


# ---------------------------------------------------------------------------------------------
# 2. RPH's rank divergence, reconstruction and refusals


def softmax(logits):
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_rank_divergence_of_three_items_by_hand():
    # Unit reference rows x0 = (1, 0), x1 = (0, 1), x2 = (0.6, 0.8): x0.x1 = 0, x0.x2 = 0.6, x1.x2 = 0.8.
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # Codes (bits = 2) u0 = (1, 1), u1 = (1, -1), u2 = (1, 0): u0.u1 = 0, u0.u2 = 1, u1.u2 = 1.
    codes = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 0.0]])
    tau = 0.5
    # Each item is a query over the other two; P by x.x'/tau, Q by u.u'/(bits tau).
    targets = [[0.0 / tau, 0.6 / tau], [0.0 / tau, 0.8 / tau], [0.6 / tau, 0.8 / tau]]
    learned = [
        [0.0 / (2 * tau), 1.0 / (2 * tau)],
        [0.0 / (2 * tau), 1.0 / (2 * tau)],
        [1.0 / (2 * tau), 1.0 / (2 * tau)],
    ]
    expected = sum(kl(softmax(t), softmax(q)) for t, q in zip(targets, learned)) / 3
    assert expected > 0.01  # a case in which the two rankings differ
    assert rank_divergence(reference, codes, tau).item() == pytest.approx(expected, rel=1e-5)
    # Codes whose logits u.u'/bits equal the reference's x.x' (u = sqrt(bits) x) rank alike: zero.
    assert rank_divergence(reference, reference * math.sqrt(2), tau).item() == pytest.approx(0.0, abs=1e-6)
    # Codes parallel to the reference but of another length (u = 2x: logits 2 x.x') do not.
    assert rank_divergence(reference, reference * 2.0, tau).item() > 1e-3
    with pytest.raises(DmuhError, match="at least 2 items"):
        rank_divergence(reference[:1], codes[:1], tau)


class FixedDecoder(torch.nn.Module):
    """A stand-in decoder whose output is given (the term reads only its direction)."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, binary):
        return self.output


def test_rph_reconstruction_is_zero_for_a_parallel_decoder_output():
    features = torch.tensor([[3.0, 4.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 2.0], [2.0, 2.0, 1.0]])
    method = create_method("rph", bits=4, num_train=4, num_classes=0, reference_dim=3, hidden=8, reconstruction=0.5)
    method.set_reference_features(features)
    indices = torch.tensor([2, 0, 3])
    step = StepInputs(
        outputs=torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), labels=torch.zeros(3, 0), indices=indices
    )
    # Parallel to the reference rows, at another length per row: cosine 1, term 0.
    reference = method.reference.of(indices)  # the unit rows the term compares with
    method.decoder = FixedDecoder(reference * torch.tensor([[2.5], [0.1], [7.0]]))
    terms = method(step)
    assert set(terms) == {"rank", "quantization", "reconstruction"}
    assert terms["reconstruction"].item() == pytest.approx(0.0, abs=1e-6)
    # Opposite to them: cosine -1, term = weight * 2 = 1.
    method.decoder = FixedDecoder(-reference)
    assert method(step)["reconstruction"].item() == pytest.approx(1.0, abs=1e-6)
    # At right angles for item 0 only (its unit row (0.6, 0.8, 0) -> (-0.8, 0.6, 0)): 0.5 * (0 + 1 + 0) / 3.
    turned = reference.clone()
    turned[1] = torch.tensor([-0.8, 0.6, 0.0])
    method.decoder = FixedDecoder(turned)
    assert method(step)["reconstruction"].item() == pytest.approx(0.5 / 3, abs=1e-3)


def test_rph_refuses_reference_features_of_another_dimension_and_bad_parameters():
    method = create_method("rph", bits=4, num_train=4, num_classes=0, reference_dim=3, hidden=8)
    with pytest.raises(DmuhError, match="dimension 5.*built for 3"):
        method.set_reference_features(torch.randn(4, 5))
    method.set_reference_features(torch.randn(4, 3))  # its own dimension is taken
    with pytest.raises(DmuhError, match="temperature=0"):
        create_method("rph", bits=4, num_train=4, num_classes=0, reference_dim=3, temperature=0)
    with pytest.raises(DmuhError, match="joint='yes'"):
        create_method("rph", bits=4, num_train=4, num_classes=0, reference_dim=3, joint="yes")


# ---------------------------------------------------------------------------------------------
# 3. Every label-free method through the CLI on unlabeled data


def split_sizes(run: Path):
    split = json.loads((run / "split.json").read_text())
    return len(split["query"]), len(split["train"]), len(split["database"])


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_label_free_method_trains_on_an_unlabeled_image_folder(tmp_path, capsys, data, method):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--method",
            method,
            *METHOD_PARAMS.get(method, []),
            "--data",
            str(data["flat"]),
            *UNSUPERVISED,
            *IMAGES,
            "--init",
            "scratch",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "checkpoint.safetensors").is_file()
    assert split_sizes(out) == (8, 40, 40)  # 48 items: 8 queries, the other 40 train and database
    assert "no MAP: the data has no labels" in printed  # MAP is NaN on unlabeled data


def test_rph_trains_on_unlabeled_vectors_and_refuses_images(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "rph",
                "-p",
                "hidden=16",
                "--data",
                str(data["unlabeled"]),
                *UNSUPERVISED,
                *VECTORS,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "checkpoint.safetensors").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--method",
                "rph",
                "--data",
                str(data["flat"]),
                *UNSUPERVISED,
                *IMAGES,
                "--init",
                "scratch",
                "--out",
                str(tmp_path / "images"),
            ]
        )
        == 2
    )
    err = error_line(capsys)
    assert "rph" in err and "feature vectors" in err


def test_train_on_unlabeled_vectors_then_evaluate_on_the_labeled_twin(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "greedyhash-unsup",
                "--data",
                str(data["unlabeled"]),
                *UNSUPERVISED,
                *VECTORS,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    # 4. Without --data: its data has no labels to score against.
    assert main(["evaluate", "--run", str(out)]) == 2
    err = error_line(capsys)
    assert "no labels" in err and "--data" in err
    assert not (out / "eval.json").exists()
    # Other items with labels: the split's fingerprint refuses them.
    assert main(["evaluate", "--run", str(out), "--data", str(data["other"])]) == 2
    assert "fingerprint" in error_line(capsys)
    # The same vectors with their labels: scored.
    assert main(["evaluate", "--run", str(out), "--data", str(data["labeled"])]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["method"] == "greedyhash-unsup" and report["protocol"] == "unsupervised"
    assert math.isfinite(report["map"]) and 0.0 <= report["map"] <= 1.0
    assert report["topk"] == 5 and math.isfinite(report["map_at_k"]) and 0.0 <= report["map_at_k"] <= 1.0


def test_unlabeled_reading_of_a_class_tree_trains_and_the_tree_scores_it(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "greedyhash-unsup",
                "--data",
                f"unlabeled:{data['tree']}",
                *UNSUPERVISED,
                *IMAGES,
                "--init",
                "scratch",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "no MAP: the data has no labels" in capsys.readouterr().out
    assert split_sizes(out) == (8, 16, 16)  # all 24 images, the class folders ignored
    assert main(["evaluate", "--run", str(out), "--data", str(data["tree"])]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert math.isfinite(report["map"]) and math.isfinite(report["map_at_k"])


# ---------------------------------------------------------------------------------------------
# 4. Refusals of what needs labels


def test_a_method_that_uses_labels_is_refused_on_unlabeled_data(tmp_path, capsys, data):
    assert (
        main(
            [
                "train",
                "--method",
                "regu",
                "--data",
                str(data["flat"]),
                *UNSUPERVISED,
                *IMAGES,
                "--init",
                "scratch",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = error_line(capsys)
    assert "'regu'" in err and "learns from labels" in err and "--list-methods" in err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize(
    "protocol",
    [
        ["--protocol", "digits"],
        ["--protocol", "per-class", "--protocol-param", "query_per_class=1", "--protocol-param", "train_per_class=2"],
    ],
)
def test_a_per_class_protocol_is_refused_on_unlabeled_data(tmp_path, capsys, data, protocol):
    assert (
        main(
            [
                "train",
                "--method",
                "greedyhash-unsup",
                "--data",
                str(data["flat"]),
                *protocol,
                *IMAGES,
                "--init",
                "scratch",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = error_line(capsys)
    assert f"protocol '{protocol[1]}'" in err and "no labels" in err and "'unsupervised'" in err


def test_init_epochs_warm_up_is_refused_on_unlabeled_images(tmp_path, capsys, data):
    assert (
        main(
            [
                "train",
                "--method",
                "itq",
                "--data",
                str(data["flat"]),
                *UNSUPERVISED,
                *IMAGES,
                "--init",
                "auto",
                "--init-epochs",
                "1",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = error_line(capsys)
    assert "--init-epochs 1" in err and "labels" in err and "--init scratch" in err


# ---------------------------------------------------------------------------------------------
# 5. --init auto: no warm-up for a label-free method, a warm-up for a supervised one


def test_init_auto_warms_up_only_a_method_that_uses_labels(tmp_path, capsys, data):
    assert (
        main(
            [
                "train",
                "--method",
                "itq",
                "--data",
                str(data["flat"]),
                *UNSUPERVISED,
                *IMAGES,
                "--init",
                "auto",
                "--out",
                str(tmp_path / "itq"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "init auto: 'itq' learns without labels, so its backbone gets no cross-entropy warm-up" in printed
    assert "epoch of cross-entropy warm-up" not in printed
    assert (
        main(
            [
                "train",
                "--method",
                "regu",
                "--data",
                str(data["tree"]),
                "--protocol",
                "per-class",
                "--protocol-param",
                "query_per_class=1",
                "--protocol-param",
                "train_per_class=4",
                *IMAGES,
                "--init",
                "auto",
                "--out",
                str(tmp_path / "regu"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "init auto: 1 epoch of cross-entropy warm-up on the training split first" in printed
    assert "learns without labels" not in printed


# ---------------------------------------------------------------------------------------------
# 6. --list-methods marks the label-free methods


def test_list_methods_marks_exactly_the_label_free_methods(capsys):
    assert main(["train", "--list-methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    mark = "  (learns without labels)"
    names = [line[: -len(mark)] if line.endswith(mark) else line for line in lines]
    assert names == available()
    marked = {line[: -len(mark)] for line in lines if line.endswith(mark)}
    assert all(" " not in name for name in names)  # every other line is a bare name
    assert marked == {name for name in available() if not method_class(name).requires.labels}
    assert LABEL_FREE <= marked
    assert "regu" not in marked and "dmuh" not in marked
