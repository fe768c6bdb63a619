"""Bad data inputs end in one `DmuhError` line naming the file, field or flag (no traceback)."""

import gzip
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmuh.cli import main
from dmuh.cli.common import cli_message
from dmuh.data import (
    CifarBatchesSource,
    DigitsSource,
    FeatureSource,
    IdxSource,
    ImageFolderSource,
    ListFileSource,
    Split,
    make_split,
    open_images,
    open_source,
)
from dmuh.errors import DmuhError


def write_image(path: Path, color=(200, 10, 10), size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def cli_error(capsys, tmp_path, *args) -> str:
    """`dmuh train ARGS` must stop with exit 2 and one line on stderr; that line."""
    code = main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# --- 1. ImageFolder: an empty class folder -------------------------------------------------


def test_empty_class_folder_is_refused_in_a_directory(tmp_path, capsys):
    tree = tmp_path / "tree"
    write_image(tree / "cat/a.png")
    write_image(tree / "dog/b.png")
    (tree / "bird").mkdir()
    (tree / ".cache").mkdir()  # hidden: skipped, not a class
    err = cli_error(capsys, tmp_path, "--data", str(tree))
    assert err.endswith(f"{tree}: class folder 'bird' holds no images (remove it or add images)"), err
    # Images to encode (`dmuh encode --images DIR`) are not a data set to split: an empty folder is ignored.
    assert open_images(str(tree)).class_names == ["cat", "dog"]
    (tree / "bird").rmdir()
    assert ImageFolderSource(tree).class_names == ["cat", "dog"]


def test_empty_class_folder_is_refused_in_a_zip(tmp_path):
    archive = tmp_path / "tree.zip"
    write_image(tmp_path / "a.png")
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(tmp_path / "a.png", "train/cat/a.png")
        handle.write(tmp_path / "a.png", "train/dog/b.png")
        handle.write(tmp_path / "a.png", "test/cat/c.png")
        handle.writestr("test/dog/", b"")  # an empty folder, listed on its own
        handle.writestr("__MACOSX/test/bird/", b"")
    with pytest.raises(DmuhError, match=r"tree.zip: class folder 'test/dog' holds no images \(remove it"):
        ImageFolderSource(archive)


# --- 2. Features files ---------------------------------------------------------------------


def test_features_with_nan_name_the_file_and_row(tmp_path, capsys):
    features = np.ones((5, 3), np.float32)
    features[3, 1] = np.nan
    np.savez(tmp_path / "feats.npz", features=features, labels=np.arange(5) % 2)
    err = cli_error(capsys, tmp_path, "--data", f"features:{tmp_path / 'feats.npz'}")
    assert "feats.npz: 'features' row 3 (counting from 0) holds NaN or Inf; 1 of 5 rows do" in err
    features[3, 1] = 1.0
    features[4, 0] = np.inf
    with pytest.raises(DmuhError, match="row 4 .*NaN or Inf"):
        FeatureSource(features, np.arange(5) % 2, name="x.npz")


def test_truncated_or_foreign_npz_names_the_file(tmp_path, capsys):
    np.savez(tmp_path / "good.npz", features=np.ones((4, 2)), labels=[0, 1, 0, 1])
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:150])
    err = cli_error(capsys, tmp_path, "--data", f"features:{tmp_path / 'cut.npz'}")
    assert "cut.npz: cannot read features: not a .npz archive" in err
    (tmp_path / "text.npz").write_text("features,labels\n1,0\n")
    with pytest.raises(DmuhError, match="text.npz: cannot read features: not a .npz"):
        open_source(str(tmp_path / "text.npz"))
    # A zip member cut short inside an intact archive.
    good = zipfile.ZipFile(tmp_path / "good.npz")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as out:
        out.writestr("features.npy", good.read("features.npy")[:90])
        out.writestr("labels.npy", good.read("labels.npy"))
    good.close()
    with pytest.raises(DmuhError, match="short.npz: cannot read key 'features'"):
        open_source(str(tmp_path / "short.npz"))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"labels": [0, 1, 0]}, "missing array(s) features"),
        ({"features": np.ones((3, 2, 2)), "labels": [0, 1, 0]}, "'features' must be an (N, D) numeric array"),
        ({"features": np.array([["a", "b"]] * 3), "labels": [0, 1, 0]}, "'features' must be an (N, D) numeric"),
        (
            {"features": np.ones((3, 2)), "labels": [0.0, 1.5, 0.0]},
            "key 'labels': (N,) labels must be non-negative integer",
        ),
        ({"features": np.ones((3, 2)), "labels": [0, -1, 0]}, "key 'labels': (N,) labels must be non-negative integer"),
        (
            {"features": np.ones((3, 2)), "labels": [[0, 1], [2, 0], [1, 0]]},
            "key 'labels': (N, C) labels must hold only 0 and 1; row 1",
        ),
        ({"features": np.ones((3, 2)), "labels": np.zeros((3, 2, 2))}, "key 'labels': expected (N,) class indices"),
        ({"features": np.ones((3, 2)), "labels": [0, 1]}, "'features' has 3 rows but 'labels' has 2"),
        ({"features": np.ones((3, 2)), "labels": [0, 1, 0], "ids": np.array("abc")}, "key 'ids' must be a 1-D array"),
        ({"features": np.ones((3, 2)), "labels": [0, 1, 0], "ids": np.array(["a", "b"])}, "2 ids for 3 items"),
    ],
)
def test_features_keys_shapes_and_dtypes(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DmuhError) as caught:
        open_source(f"features:{tmp_path / 'bad.npz'}")
    text = str(caught.value)
    assert str(tmp_path / "bad.npz") in text and message in text and "\n" not in text, text


def test_features_npy_pair_names_each_file(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 2), np.float32))
    (tmp_path / "y.npy").write_bytes(b"garbage")
    with pytest.raises(DmuhError, match=r"y.npy: cannot read labels: not a .npy file"):
        FeatureSource.load(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    np.save(tmp_path / "y.npy", np.array([0.5, 1, 2]))
    with pytest.raises(DmuhError, match=r"y.npy: \(N,\) labels must be non-negative integer"):
        FeatureSource.load(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    (tmp_path / "x.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-4])
    np.save(tmp_path / "y.npy", np.array([0, 1, 2]))
    with pytest.raises(DmuhError, match=r"x.npy: cannot read features"):
        FeatureSource.load(tmp_path / "x.npy", labels=tmp_path / "y.npy")


def test_a_corrupt_label_does_not_allocate_a_huge_matrix():
    with pytest.raises(DmuhError, match=r"class index 4000000000 \(row 1\).*corrupt"):
        FeatureSource(np.ones((2, 2)), np.array([0, 4_000_000_000]), name="f.npz")


# --- 3. IDX --------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, prefix: str, labels, gz: bool = False) -> None:
    labels = np.asarray(labels)
    opener, suffix = (gzip.open, ".gz") if gz else (open, "")
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as handle:
        handle.write(idx_bytes(np.zeros((len(labels), 4, 4), np.uint8)))
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as handle:
        handle.write(idx_bytes(labels))


def test_idx_label_out_of_range_names_the_labels_file(tmp_path, capsys):
    write_idx(tmp_path, "train", np.arange(20) % 10)
    write_idx(tmp_path, "t10k", [0, 1, 2, 10, 4, 5, 6, 7, 8, 9])
    err = cli_error(capsys, tmp_path, "--data", f"idx:{tmp_path}", "--protocol", "digits")
    assert (
        f"{tmp_path / 't10k-labels-idx1-ubyte'}: label 10 at row 3 is out of range: the other label files "
        "hold classes 0-9" in err
    ), err
    with pytest.raises(
        DmuhError, match=r"t10k-labels-idx1-ubyte: label 10 at row 3 is out of range for 10 class names"
    ):
        IdxSource(tmp_path, class_names=[str(c) for c in range(10)])
    write_idx(tmp_path, "t10k", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(IdxSource(tmp_path).class_names) == 10


def test_idx_truncated_and_inconsistent_header(tmp_path, capsys):
    write_idx(tmp_path, "train", np.arange(6) % 3)
    images = tmp_path / "train-images-idx3-ubyte"
    whole = images.read_bytes()
    images.write_bytes(whole[:-5])
    err = cli_error(capsys, tmp_path, "--data", f"idx:{tmp_path}")
    assert f"{images}: IDX header says (6, 4, 4) (96 bytes of data) but the file holds 91" in err
    images.write_bytes(whole[:6])
    with pytest.raises(DmuhError, match="train-images-idx3-ubyte: truncated IDX header"):
        IdxSource(images)
    images.write_bytes(whole[:4] + struct.pack(">I", 7) + whole[8:])  # header says 7 images, data holds 6
    with pytest.raises(DmuhError, match=r"train-images-idx3-ubyte: IDX header says \(7, 4, 4\)"):
        IdxSource(images)
    images.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(whole)[:-12])
    with pytest.raises(DmuhError, match=r"train-images-idx3-ubyte.gz: cannot read IDX file"):
        IdxSource(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte")


# --- 4. List files: paths that leave the root ----------------------------------------------


@pytest.fixture
def list_tree(tmp_path):
    root = tmp_path / "root"
    write_image(root / "img/a.png")
    write_image(root / "img/b.png", (0, 0, 200))
    write_image(tmp_path / "outside/x.png", (0, 200, 0))
    return root


def test_list_path_escaping_the_root_is_refused(tmp_path, list_tree, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("img/a.png 1 0\nimg/b.png 0 1\n../outside/x.png 1 0\n")
    err = cli_error(capsys, tmp_path, "--data", f"list:{listing}", "--data-root", str(list_tree))
    assert err.endswith(
        f"{listing} line 3: path '../outside/x.png' escapes --data-root {list_tree}; "
        "pass --allow-outside-root true to allow it"
    ), err
    outside = tmp_path / "outside/x.png"
    listing.write_text(f"img/a.png 1 0\n{outside} 0 1\n")
    with pytest.raises(DmuhError, match=r"list.txt line 2: path .* escapes --data-root"):
        open_source(f"list:{listing}", root=list_tree)
    listing.write_text(f"img/a.png 1 0\nimg/../img/b.png 0 1\n{list_tree / 'img/b.png'} 0 1\n")
    assert len(open_source(f"list:{listing}", root=list_tree)) == 3  # stays inside: fine


def test_list_path_outside_the_root_when_allowed(tmp_path, list_tree):
    listing = tmp_path / "list.txt"
    listing.write_text(f"img/a.png 1 0\n../outside/x.png 0 1\n{tmp_path / 'outside/x.png'} 0 1\n")
    source = open_source(str(listing), root=list_tree, allow_outside_root=True)
    assert source.decode()[:, 0, 0].tolist() == [[200, 10, 10], [0, 200, 0], [0, 200, 0]]
    # Query images for `dmuh encode` are the user's own files: their lists may leave the root.
    assert len(open_images(str(listing), root=str(list_tree))) == 3
    (tmp_path / "empty.txt").write_text("\n")
    # The library names the field (`images`); the command line names the flag (tests/test_errors.py).
    with pytest.raises(DmuhError, match="^images .*empty.txt: the list file names no images") as caught:
        open_images(str(tmp_path / "empty.txt"))
    assert caught.value.field == "images" and cli_message(caught.value).startswith("--images ")


def test_allow_outside_root_reaches_the_list_source_from_the_config(tmp_path, list_tree, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("img/a.png 1 0\n../outside/x.png 0 1\n")
    # Allowed, the list opens and the run gets as far as the protocol, which asks for its parameters.
    err = cli_error(
        capsys,
        tmp_path,
        "--data",
        f"list:{listing}",
        "--data-root",
        str(list_tree),
        "--allow-outside-root",
        "true",
        "--protocol",
        "per-class",
    )
    assert "escapes" not in err and "query_per_class" in err, err


def test_absolute_list_path_in_a_zip_root_is_refused(tmp_path, list_tree):
    archive = tmp_path / "root.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(list_tree / "img/a.png", "img/a.png")
    listing = tmp_path / "list.txt"
    listing.write_text("img/a.png 1 0\n/img/a.png 0 1\n")
    with pytest.raises(DmuhError, match=r"list.txt line 2: path '/img/a.png' escapes --data-root .*root.zip"):
        ListFileSource(listing, archive)


# --- 5. Splits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return DigitsSource()


def test_tampered_split_json_is_refused(tmp_path, digits, capsys):
    """The audit's case: queries replaced with training items (MAP 0.99, no warning, before)."""
    run = tmp_path / "run"
    split = make_split("digits", digits, seed=0)
    split.save(run / "split.json")
    record = json.loads((run / "split.json").read_text())
    assert len(record["checksum"]) == 64
    record["query"] = record["train"][: len(record["query"])]
    (run / "split.json").write_text(json.dumps(record))
    common = ["--data", "digits", "--protocol", "digits"]
    err = cli_error(capsys, tmp_path, *common)
    assert f"{run / 'split.json'}: field 'checksum' does not match the content" in err, err
    del record["checksum"]  # an edit that also drops the checksum is caught by the overlap
    (run / "split.json").write_text(json.dumps(record))
    err = cli_error(capsys, tmp_path, *common)
    assert f"{run / 'split.json'}: 300 query item(s) are also train items" in err, err


def test_split_without_checksum_is_accepted(tmp_path, digits):
    path = tmp_path / "split.json"
    make_split("digits", digits, seed=2).save(path)
    record = json.loads(path.read_text())
    del record["checksum"]  # as older versions wrote it
    path.write_text(json.dumps(record))
    loaded = Split.load(path)
    loaded.check(digits)
    assert len(loaded.query) == 300


def edited(path: Path, **changes) -> Path:
    record = json.loads(path.read_text())
    record.pop("checksum", None)
    record.update(changes)
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: {"query": []}, "role 'query' is empty"),
        (lambda r: {"database": []}, "role 'database' is empty"),
        (lambda r: {"train": []}, "role 'train' is empty"),
        (lambda r: {"train": r["train"] + r["train"][:1]}, "role 'train' holds index"),
        (lambda r: {"database": r["database"] + r["query"][:1]}, "1 query item(s) are also database items"),
    ],
)
def test_split_json_is_checked_as_a_whole(tmp_path, digits, change, message):
    path = tmp_path / "split.json"
    make_split("digits", digits, seed=0).save(path)
    edited(path, **change(json.loads(path.read_text())))
    with pytest.raises(DmuhError) as caught:
        Split.load(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), caught.value


def test_split_check_compares_role_sizes_with_the_protocol(tmp_path, digits):
    path = tmp_path / "split.json"
    make_split("digits", digits, seed=0).save(path)
    record = json.loads(path.read_text())
    edited(path, database=record["database"][:-10])
    split = Split.load(path)  # whole and consistent on its own...
    with pytest.raises(
        DmuhError,
        match=rf"{path}: role 'database' holds 1487 items, protocol 'digits' "
        r"\(seed 0\) gives 1497 for this data",
    ):
        split.check(digits)  # ...but not the split the protocol makes of this data
    edited(path, protocol="no-such-protocol")
    with pytest.raises(DmuhError, match=rf"{path}: cannot remake the split .*no-such-protocol"):
        Split.load(path).check(digits)


def test_make_split_refuses_empty_roles():
    labels = np.arange(40) % 4
    with pytest.raises(DmuhError, match="query_per_class: expected a positive integer, got 0"):
        make_split("per-class", labels, query_per_class=0, train_per_class=3)
    with pytest.raises(DmuhError, match="train_per_class: expected a positive integer, got 0"):
        make_split("per-class", labels, query_per_class=2, train_per_class=0)
    with pytest.raises(DmuhError, match="protocol 'per-class': the split of these 40 items has no database items"):
        make_split("per-class", labels, query_per_class=4, train_per_class=6, database="rest-minus-train")
    with pytest.raises(DmuhError, match="protocol 'cifar10-50k': .* has no train items"):
        make_split("cifar10-50k", np.arange(10000) % 10, subsets=np.array(["test"] * 10000))


# --- 6. Other bad input --------------------------------------------------------------------


def test_unreadable_images_in_a_folder_and_a_zip(tmp_path, capsys):
    tree = tmp_path / "tree"
    for name in ("cat/a.png", "cat/c.png", "cat/e.png", "dog/d.png", "dog/f.png"):
        write_image(tree / name)
    (tree / "dog/b.png").write_bytes(b"\x89PNG not really")
    err = cli_error(
        capsys,
        tmp_path,
        "--data",
        str(tree),
        "--cache-dir",
        "off",
        "--protocol",
        "per-class",
        "--protocol-param",
        "query_per_class=1",
        "--protocol-param",
        "train_per_class=1",
    )
    assert f"{tree / 'dog/b.png'}: cannot decode image" in err, err
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(tree / "cat/a.png", "cat/a.png")
        handle.writestr("dog/b.png", b"not a png")
    with pytest.raises(DmuhError, match=r"tree.zip:dog/b.png: cannot decode image"):
        ImageFolderSource(archive).decode()
    os.symlink(tmp_path / "nowhere.png", tree / "cat/dangling.png")
    with pytest.raises(DmuhError, match=r"cat/dangling.png: cannot read \(No such file"):
        ImageFolderSource(tree)


def test_a_zip_that_is_not_a_zip(tmp_path, capsys):
    (tmp_path / "data.zip").write_bytes(b"PK\x03\x04 cut short")
    err = cli_error(capsys, tmp_path, "--data", str(tmp_path / "data.zip"))
    assert f"{tmp_path / 'data.zip'}: not a zip file (truncated, or another format)" in err, err


def test_list_file_missing_image_bad_labels_and_encoding(tmp_path, list_tree, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("img/a.png 1 0\nimg/missing.png 0 1\n")
    source = ListFileSource(listing, list_tree)
    with pytest.raises(DmuhError, match=rf"missing.png: cannot read image .*\(listed in {listing} line 2\)"):
        source.decode()
    listing.write_text("img/a.png 1 0\nimg/b.png 0 x\n")
    err = cli_error(capsys, tmp_path, "--data", f"list:{listing}", "--data-root", str(list_tree))
    assert f"{listing} line 2: expected a path then 0/1 multi-hot labels, got 'img/b.png 0 x'" in err, err
    listing.write_bytes("img/a.png 1 0\nimg/caf\u00e9.png 0 1\n".encode("latin-1"))
    err = cli_error(capsys, tmp_path, "--data", f"list:{listing}", "--data-root", str(list_tree))
    assert f"{listing} line 2: not UTF-8 text (byte 0xe9); save the list file as UTF-8" in err, err
    listing.write_bytes(b"\xef\xbb\xbfimg/a.png 1 0\n")  # a byte-order mark is fine
    assert ListFileSource(listing, list_tree).ids == ["img/a.png"]


def write_cifar(folder: Path) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    batch = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)
    return batch


def test_cifar_batches_truncated_or_odd(tmp_path, capsys):
    folder = tmp_path / "cifar"
    batch = write_cifar(folder)
    for cut in (1, 40, len(batch) // 2, len(batch) - 3):
        (folder / "data_batch_3").write_bytes(batch[:cut])
        with pytest.raises(DmuhError, match="data_batch_3: cannot read CIFAR batch"):
            CifarBatchesSource(folder)
    err = cli_error(capsys, tmp_path, "--data", f"cifar-batches:{folder}")
    assert f"{folder / 'data_batch_3'}: cannot read CIFAR batch" in err, err
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}))
    with pytest.raises(DmuhError, match=r"data_batch_3: b'labels' must be a list of integer class indices"):
        CifarBatchesSource(folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 2]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": ["cat", "dog"]}))  # str names: fine
    with pytest.raises(DmuhError, match=r"data_batch_3: b'labels' row 1 is class 2, but batches.meta names 2 classes"):
        CifarBatchesSource(folder)
    (folder / "data_batch_3").write_bytes(batch)
    assert CifarBatchesSource(folder).class_names == ["cat", "dog"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [1, 2]}))
    with pytest.raises(DmuhError, match=r"batches.meta: b'label_names' must be a list of class names"):
        CifarBatchesSource(folder)


def test_features_with_zero_columns_are_refused(tmp_path):
    """Issue 31, class 3: a features file whose items are empty vectors trained without a word."""
    np.savez(tmp_path / "empty.npz", features=np.zeros((50, 0), np.float32), labels=np.arange(50) % 5)
    with pytest.raises(DmuhError, match="zero columns"):
        open_source(f"features:{tmp_path / 'empty.npz'}")


def nested(depth):
    value = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.__setitem__("query", [2**63] + r["query"][1:]), "field 'query' must be a list of non-negative"),
        (lambda r: r.__setitem__("train", [[1]] + r["train"][1:]), "field 'train' must be a list of non-negative"),
        (lambda r: r.__setitem__("params", {"a": nested(70)}), "nested deeper"),
        (lambda r: r.__setitem__("seed", 2**70), "field 'seed' must be an integer from 0"),
        (lambda r: r.__setitem__("topk", 2**40), "field 'topk' must be a positive integer below"),
    ],
)
def test_split_records_with_deep_or_huge_fields_are_refused(tmp_path, change, message):
    """Issue 31, class 2: a split record nested deep or with an index past int64."""
    split = make_split("per-class", open_source("digits"), seed=0, query_per_class=2, train_per_class=4)
    split.save(tmp_path / "split.json")
    record = json.loads((tmp_path / "split.json").read_text())
    change(record)
    record.pop("checksum", None)
    (tmp_path / "split.json").write_text(json.dumps(record))
    with pytest.raises(DmuhError, match=message):
        Split.load(tmp_path / "split.json")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.__setitem__("positions", [2**64]), "field 'positions' must be a list"),
        (lambda r: r.__setitem__("rate", float("nan")), "field 'rate' must be in"),
        (lambda r: r.__setitem__("seed", -1), "'seed' from 0"),
    ],
)
def test_label_noise_records_with_bad_fields_are_refused(tmp_path, change, message):
    from dmuh.data.noise import NOISE_FORMAT, NOISE_VERSION, LabelNoise

    record = {"format": NOISE_FORMAT, "version": NOISE_VERSION, "rate": 0.1, "seed": 0, "count": 1,
              "positions": [3], "original": [1], "noisy": [2]}  # fmt: skip
    change(record)
    (tmp_path / "noise.json").write_text(json.dumps(record))
    with pytest.raises(DmuhError, match=message):
        LabelNoise.load(tmp_path / "noise.json")
