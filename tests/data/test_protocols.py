import json

import numpy as np
import pytest

from dmuh.data import DigitsSource, FeatureSource, Split, available_protocols, make_split
from dmuh.errors import DmuhError


def cifar_like_labels(per_class: int = 6000, classes: int = 10) -> np.ndarray:
    """Shuffled single-label class indices, `per_class` of each class."""
    labels = np.repeat(np.arange(classes), per_class)
    return np.random.default_rng(123).permutation(labels)


@pytest.fixture(scope="module")
def cifar_labels():
    return cifar_like_labels()


def assert_disjoint(*arrays):
    joined = np.concatenate(arrays)
    assert len(np.unique(joined)) == len(joined)


def test_available_protocols():
    assert set(available_protocols()) >= {
        "cifar10",
        "cifar10-54k",
        "cifar10-50k",
        "nuswide21",
        "coco",
        "imagenet100",
        "clothing1m",
        "per-class",
        "digits",
    }


def test_cifar10_sizes_and_relations(cifar_labels):
    split = make_split("cifar10", cifar_labels, seed=0)
    assert (len(split.query), len(split.train), len(split.database)) == (1000, 5000, 59000)
    assert split.topk is None and split.query.dtype == np.int64
    assert_disjoint(split.query, split.train)
    assert_disjoint(split.query, split.database)
    assert np.isin(split.train, split.database).all()
    assert np.bincount(cifar_labels[split.query], minlength=10).tolist() == [100] * 10
    assert np.bincount(cifar_labels[split.train], minlength=10).tolist() == [500] * 10


def test_cifar10_54k(cifar_labels):
    split = make_split("cifar10-54k", cifar_labels, seed=0)
    assert (len(split.query), len(split.train), len(split.database)) == (1000, 5000, 54000)
    assert_disjoint(split.query, split.train, split.database)
    # Same seed, same query and train as cifar10: only the database differs.
    plain = make_split("cifar10", cifar_labels, seed=0)
    np.testing.assert_array_equal(split.query, plain.query)
    np.testing.assert_array_equal(split.train, plain.train)


def test_cifar10_50k_uses_test_subset(cifar_labels):
    subsets = np.array(["train"] * 50000 + ["test"] * 10000)
    split = make_split("cifar10-50k", cifar_labels, subsets=subsets)
    np.testing.assert_array_equal(split.query, np.arange(50000, 60000))
    np.testing.assert_array_equal(split.train, np.arange(50000))
    np.testing.assert_array_equal(split.database, split.train)
    sampled = make_split("cifar10-50k", cifar_labels, seed=3)  # no subsets: 1,000 per class
    assert (len(sampled.query), len(sampled.database)) == (10000, 50000)
    assert np.bincount(cifar_labels[sampled.query]).tolist() == [1000] * 10
    assert_disjoint(sampled.query, sampled.database)


def test_unsupervised_protocols_need_no_labels(cifar_labels):
    """cifar10-unsup: the test subset queries, the rest train = database, MAP@1000; on data without
    labels too (no label column is read), and the per-class protocols refuse such data by name."""
    subsets = np.array(["train"] * 50000 + ["test"] * 10000)
    unlabeled = np.zeros((60000, 0), dtype=np.uint8)
    for labels in (cifar_labels, unlabeled):
        split = make_split("cifar10-unsup", labels, subsets=subsets)
        np.testing.assert_array_equal(split.query, np.arange(50000, 60000))
        np.testing.assert_array_equal(split.train, np.arange(50000))
        np.testing.assert_array_equal(split.database, split.train)
        assert split.topk == 1000
    sampled = make_split("cifar10-unsup", unlabeled, seed=2)  # no test subset: 10,000 random queries
    assert (len(sampled.query), len(sampled.train), sampled.topk) == (10000, 50000, 1000)
    assert_disjoint(sampled.query, sampled.train)
    small = make_split("unsupervised", unlabeled[:50], seed=0, query=5, topk=10)
    assert (len(small.query), len(small.train), small.topk) == (5, 45, 10)
    np.testing.assert_array_equal(small.train, small.database)
    np.testing.assert_array_equal(small.query, make_split("unsupervised", unlabeled[:50], seed=0, query=5).query)
    for protocol in ("cifar10", "per-class", "digits"):
        params = {"query_per_class": 1, "train_per_class": 1} if protocol == "per-class" else {}
        with pytest.raises(DmuhError, match="no labels.*cifar10-unsup"):
            make_split(protocol, unlabeled, **params)
    with pytest.raises(DmuhError, match="query: expected a positive integer"):
        make_split("unsupervised", unlabeled[:50], query=0)


def test_determinism(cifar_labels):
    first = make_split("cifar10", cifar_labels, seed=7)
    again = make_split("cifar10", cifar_labels, seed=7)
    other = make_split("cifar10", cifar_labels, seed=8)
    for role in ("query", "train", "database"):
        np.testing.assert_array_equal(getattr(first, role), getattr(again, role))
    assert not np.array_equal(first.query, other.query)
    assert not np.array_equal(first.train, other.train)


def multi_label_matrix(items: int = 16000, classes: int = 21, seed: int = 0) -> np.ndarray:
    """Random multi-hot rows with 1 to 3 labels each (every class well represented)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((items, classes), dtype=np.uint8)
    for row, count in enumerate(rng.integers(1, 4, items)):
        labels[row, rng.choice(classes, count, replace=False)] = 1
    return labels


def test_nuswide21_multi_label_sampling():
    labels = multi_label_matrix()
    split = make_split("nuswide21", labels, seed=0)
    assert (len(split.query), len(split.train), len(split.database)) == (2100, 10500, 16000 - 2100)
    assert split.topk == 5000
    assert_disjoint(split.query, split.train)
    assert_disjoint(split.query, split.database)
    # Each class contributed its 100 / 500 items, so each label is carried at least that often.
    assert (labels[split.query].sum(0) >= 100).all()
    assert (labels[split.train].sum(0) >= 500).all()


def test_coco_imagenet100_clothing1m():
    labels = multi_label_matrix(items=20000, classes=80, seed=1)
    coco = make_split("coco", labels, seed=0)
    assert (len(coco.query), len(coco.train), len(coco.database), coco.topk) == (5000, 10000, 15000, 5000)
    assert_disjoint(coco.query, coco.train)

    subsets = np.array(["train"] * 5 + ["test"] * 3 + ["database"] * 12)
    imagenet = make_split("imagenet100", np.eye(4, dtype=np.uint8)[np.arange(20) % 4], subsets=subsets)
    assert imagenet.query.tolist() == [5, 6, 7] and imagenet.train.tolist() == [0, 1, 2, 3, 4]
    assert imagenet.database.tolist() == list(range(8, 20)) and imagenet.topk == 1000
    with pytest.raises(DmuhError, match="imagenet100.*subsets"):
        make_split("imagenet100", labels)

    clothing = make_split("clothing1m", np.arange(14 * 1600) % 14, seed=0)
    assert (len(clothing.query), len(clothing.train), len(clothing.database)) == (7000, 14000, 14 * 1600 - 7000)
    assert np.bincount((np.arange(14 * 1600) % 14)[clothing.query]).tolist() == [500] * 14
    random_clothing = make_split("clothing1m", np.arange(25000) % 5)
    assert (len(random_clothing.query), len(random_clothing.train)) == (7000, 14000)


def test_per_class_and_digits():
    source = DigitsSource()
    split = make_split("digits", source, seed=0)
    assert (len(split.query), len(split.train), len(split.database)) == (300, 1000, 1497)
    assert split.fingerprint == source.fingerprint()
    custom = make_split(
        "per-class", source, query_per_class=10, train_per_class=20, database="rest-minus-train", topk=50
    )
    assert (len(custom.query), len(custom.train), len(custom.database), custom.topk) == (100, 200, 1497, 50)
    assert_disjoint(custom.query, custom.train, custom.database)
    assert custom.params == {"query_per_class": 10, "train_per_class": 20, "database": "rest-minus-train", "topk": 50}


def test_too_few_items_names_class():
    labels = np.array([0] * 700 + [1] * 300)
    source = FeatureSource(np.zeros((1000, 2)), labels, class_names=["cat", "dog"])
    with pytest.raises(DmuhError, match=r"class 'dog' has 300 items.*100 query \+ 500 train"):
        make_split("per-class", source, query_per_class=100, train_per_class=500)
    with pytest.raises(DmuhError, match="expects 10 classes"):
        make_split("cifar10", labels)


def test_bad_protocol_inputs(cifar_labels):
    with pytest.raises(DmuhError, match="choose one of.*cifar10"):
        make_split("cifar-ten", cifar_labels)
    with pytest.raises(DmuhError, match="unknown parameter.*query_per_class"):
        make_split("cifar10", cifar_labels, query_per_class=5)
    with pytest.raises(DmuhError, match="train_per_class.*required"):
        make_split("per-class", cifar_labels, query_per_class=5)
    with pytest.raises(DmuhError, match="database 'all'"):
        make_split("per-class", cifar_labels, query_per_class=5, train_per_class=5, database="all")


def test_save_load_round_trip(tmp_path):
    source = DigitsSource()
    split = make_split("digits", source, seed=4)
    path = tmp_path / "run/split.json"
    split.save(path)
    loaded = Split.load(path)
    assert (loaded.protocol, loaded.seed, loaded.topk, loaded.fingerprint) == ("digits", 4, None, source.fingerprint())
    for role in ("query", "train", "database"):
        np.testing.assert_array_equal(getattr(loaded, role), getattr(split, role))
        assert getattr(loaded, role).dtype == np.int64
    loaded.check(source)
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left


def test_check_refuses_other_data(tmp_path):
    source = DigitsSource()
    split = make_split("digits", source)
    other = FeatureSource(np.zeros((len(source), 2)), source.labels)
    with pytest.raises(DmuhError, match="made for other data"):
        split.check(other)
    small = FeatureSource(np.zeros((100, 2)), np.arange(100) % 10)
    unpinned = make_split("per-class", small.labels, query_per_class=2, train_per_class=3)
    unpinned.check(small)  # made from labels alone: no fingerprint to compare
    with pytest.raises(DmuhError, match="out of range"):
        Split("x", 0, [0], [1], [500], topk=None, fingerprint="").check(small)


def test_load_errors(tmp_path):
    with pytest.raises(DmuhError, match="missing.json"):
        Split.load(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "dmuh-split", "query": [1, 2')
    with pytest.raises(DmuhError, match="corrupt.json: corrupt"):
        Split.load(corrupt)
    split = make_split("digits", DigitsSource())
    split.save(tmp_path / "ok.json")
    record = json.loads((tmp_path / "ok.json").read_text())
    record["train"] = [1, "two"]
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(DmuhError, match="bad.json: field 'train'"):
        Split.load(tmp_path / "bad.json")


# --- protocol "auto": the data chooses, sized to it -------------------------------------------


def test_auto_draws_single_label_data_per_class_with_sizes_that_scale(cifar_labels):
    split = make_split("auto", cifar_labels, seed=0)
    assert (split.protocol, split.params) == ("per-class", {"query_per_class": 100, "train_per_class": 500})
    assert (len(split.query), len(split.train), len(split.database)) == (1000, 5000, 59000)  # the cifar10 sizes
    small = make_split("auto", np.repeat(np.arange(3), [40, 25, 31]), seed=0)
    assert small.params == {"query_per_class": 2, "train_per_class": 12}  # a tenth and a half of the smallest class
    assert (len(small.query), len(small.train)) == (6, 36)


def test_auto_on_unlabeled_multi_label_and_tiny_class_data():
    unlabeled = make_split("auto", np.zeros((300, 0)), seed=0)
    assert (unlabeled.protocol, unlabeled.params, len(unlabeled.query)) == ("unsupervised", {"query": 30}, 30)
    assert len(make_split("auto", np.zeros((50_000, 0)), seed=0).query) == 1000  # capped as the standard one
    multi = make_split("auto", multi_label_matrix(items=3000, classes=5), seed=0)
    assert (multi.protocol, multi.params) == ("random", {"query": 300, "train": 1500})
    lonely = make_split("auto", np.array([0] * 30 + [1]), seed=0)  # a class of one item cannot be drawn per class
    assert lonely.protocol == "random" and len(lonely.query) == 3
    assert_disjoint(lonely.query, lonely.train)


def test_auto_is_deterministic_and_a_named_protocol_still_wins(cifar_labels):
    first, second = make_split("auto", cifar_labels, seed=3), make_split("auto", cifar_labels, seed=3)
    assert np.array_equal(first.query, second.query) and np.array_equal(first.train, second.train)
    assert make_split("digits", cifar_labels, seed=0).params == {}  # explicit: untouched
    assert make_split("auto", cifar_labels, seed=0, topk=50).topk == 50  # topk may still be given
    with pytest.raises(DmuhError, match="protocol 'auto' chooses its own sizes"):
        make_split("auto", cifar_labels, query_per_class=5)


def test_random_protocol_and_a_too_small_data_set_points_to_auto():
    split = make_split("random", np.zeros((100, 0)), seed=0, query=10, train=40)
    assert (len(split.query), len(split.train), len(split.database)) == (10, 40, 90)
    assert_disjoint(split.query, split.train)
    with pytest.raises(DmuhError, match="needs 1000 query; protocol 'auto' sizes the split to the data"):
        make_split("unsupervised", np.zeros((300, 0)), seed=0)
