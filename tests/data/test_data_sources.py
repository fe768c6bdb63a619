import gzip
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmuh.data import (
    CifarBatchesSource,
    DigitsSource,
    FeatureSource,
    IdxSource,
    ImageFolderSource,
    ListFileSource,
    open_source,
    read_idx,
    to_multi_hot,
)
from dmuh.errors import DmuhError

CIFAR_ZIP = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10-jpeg.zip"


def write_image(path: Path, color, size=(8, 8), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder_tree(tmp_path):
    """train/{cat,dog} and test/{cat,dog} with PNG and JPEG files, plus debris to skip."""
    root = tmp_path / "tree"
    write_image(root / "train/cat/a.png", (255, 0, 0))
    write_image(root / "train/cat/b.JPG", (250, 0, 0))
    write_image(root / "train/dog/c.png", (0, 0, 255))
    write_image(root / "test/cat/d.jpeg", (255, 0, 0))
    write_image(root / "test/dog/e.bmp", (0, 0, 255))
    (root / "train/dog/notes.txt").write_text("not an image")
    write_image(root / ".hidden/cat/x.png", (0, 0, 0))
    return root


def zip_folder(folder: Path, target: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
        archive.writestr("__MACOSX/train/cat/._a.png", b"junk")
    return target


# --- ImageFolder ---------------------------------------------------------------------------


def test_image_folder_directory(folder_tree):
    source = ImageFolderSource(folder_tree)
    assert len(source) == 5
    assert source.ids == ["test/cat/d.jpeg", "test/dog/e.bmp", "train/cat/a.png", "train/cat/b.JPG", "train/dog/c.png"]
    assert source.class_names == ["cat", "dog"]
    assert source.labels.dtype == np.uint8
    assert source.labels.tolist() == [[1, 0], [0, 1], [1, 0], [1, 0], [0, 1]]
    assert source.subsets.tolist() == ["test", "test", "train", "train", "train"]
    assert source.channels == 3
    image = source.read(2)
    assert image.mode == "RGB" and image.size == (8, 8)
    images = source.decode()
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert images[2, 0, 0].tolist() == [255, 0, 0]
    assert source.decode([4, 0], size=4).shape == (2, 4, 4, 3)


def test_image_folder_zip_matches_directory(folder_tree, tmp_path):
    directory = ImageFolderSource(folder_tree)
    archive = ImageFolderSource(zip_folder(folder_tree, tmp_path / "tree.zip"))
    assert archive.ids == directory.ids
    assert archive.fingerprint() == directory.fingerprint()
    np.testing.assert_array_equal(archive.decode(workers=2), directory.decode(workers=1))


def test_image_folder_zip_with_wrapping_folder(folder_tree, tmp_path):
    source = ImageFolderSource(zip_folder(folder_tree, tmp_path / "wrapped.zip", prefix="cifar/"))
    assert source.subsets.tolist() == ["test", "test", "train", "train", "train"]
    assert source.ids[0] == "cifar/test/cat/d.jpeg"


def test_image_folder_without_split_level_and_grayscale(tmp_path):
    write_image(tmp_path / "a/1.png", 10, mode="L")
    write_image(tmp_path / "b/2.png", 200, mode="L")
    source = ImageFolderSource(tmp_path, channels=1)
    assert source.subsets is None
    assert source.read(0).mode == "L"
    assert source.decode().shape == (2, 8, 8, 1)


def test_image_folder_mixed_sizes_need_size(tmp_path):
    write_image(tmp_path / "a/1.png", (1, 2, 3), size=(8, 8))
    write_image(tmp_path / "b/2.png", (1, 2, 3), size=(6, 4))
    source = ImageFolderSource(tmp_path)
    with pytest.raises(DmuhError, match="pass size"):
        source.decode()
    assert source.decode(size=5).shape == (2, 5, 5, 3)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DmuhError, match="no images"):
        ImageFolderSource(tmp_path)
    with pytest.raises(DmuhError, match="missing"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "c").mkdir()
    (tmp_path / "c/broken.png").write_bytes(b"not a png")
    source = ImageFolderSource(tmp_path)
    with pytest.raises(DmuhError, match="broken.png"):
        source.read(0)


def test_decode_cache_round_trip(folder_tree, tmp_path):
    source = ImageFolderSource(folder_tree)
    cache = tmp_path / "cache"
    first = source.decode([0, 3], size=4, cache_dir=cache)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), first)
    np.testing.assert_array_equal(source.decode([0, 3], size=4, cache_dir=cache), first)
    source.decode([1, 3], size=4, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 2  # other indices, other key
    files[0].write_bytes(b"corrupt")  # an unreadable cache is decoded again
    np.testing.assert_array_equal(source.decode([0, 3], size=4, cache_dir=cache), first)


def test_decode_rejects_bad_indices(folder_tree):
    source = ImageFolderSource(folder_tree)
    with pytest.raises(DmuhError, match="out of range"):
        source.decode([5])
    with pytest.raises(DmuhError, match="1-D integer"):
        source.decode([0.5])


# --- CIFAR python batches ------------------------------------------------------------------


def write_cifar_batches(folder: Path, per_batch: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        # Protocol 2 and numpy 1.x module names, as in the official files.
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core."))
        batches[name] = batch
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return batches


def test_cifar_batches(tmp_path):
    batches = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    source = CifarBatchesSource(tmp_path / "cifar-10-batches-py")
    assert len(source) == 36 and source.channels == 3
    assert source.class_names[0] == "airplane" and source.labels.shape == (36, 10)
    assert source.ids[30] == "test_batch:0"
    assert (source.subsets == "test").sum() == 6 and (source.subsets == "train").sum() == 30
    first = batches["data_batch_1"]
    images = source.decode([0])
    assert images.shape == (1, 32, 32, 3)
    # The row holds 1024 red, then green, then blue values in row-major order.
    np.testing.assert_array_equal(images[0, :, :, 0].ravel(), first[b"data"][0, :1024])
    np.testing.assert_array_equal(images[0, :, :, 2].ravel(), first[b"data"][0, 2048:])
    assert source.labels[0].argmax() == first[b"labels"][0]
    assert source.decode([0, 1], size=16).shape == (2, 16, 16, 3)
    assert np.asarray(source.read(0)).shape == (32, 32, 3)
    assert isinstance(open_source(str(tmp_path / "cifar-10-batches-py")), CifarBatchesSource)


def test_cifar100_batches(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"fine_labels": [0, 1, 2, 99],
            b"coarse_labels": [0, 1, 2, 19],
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    meta = {
        b"fine_label_names": [f"f{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
    }
    (tmp_path / "meta").write_bytes(pickle.dumps(meta))
    assert open_source(f"cifar-batches:{tmp_path}").labels.shape == (8, 100)
    assert CifarBatchesSource(tmp_path, coarse=True).class_names[19] == "c19"


def test_cifar_batches_errors(tmp_path):
    write_cifar_batches(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DmuhError, match="data_batch_2.*3072"):
        CifarBatchesSource(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(DmuhError, match="data_batch_2"):
        CifarBatchesSource(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DmuhError, match="refusing"):
        CifarBatchesSource(tmp_path)


# --- IDX -----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_pair(folder: Path, prefix: str, count: int, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    labels[0] = 9  # every file names class 9, so the class count does not depend on the draw
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as handle:
        handle.write(idx_bytes(images))
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as handle:
        handle.write(idx_bytes(labels))
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_pair_and_directory(tmp_path, gz):
    train_images, train_labels = write_idx_pair(tmp_path, "train", 7, gz)
    test_images, _ = write_idx_pair(tmp_path, "t10k", 3, gz, seed=1)
    suffix = ".gz" if gz else ""
    pair = IdxSource(tmp_path / f"train-images-idx3-ubyte{suffix}")
    assert len(pair) == 7 and pair.channels == 1
    np.testing.assert_array_equal(pair.decode()[..., 0], train_images)
    np.testing.assert_array_equal(pair.labels.argmax(1), train_labels)
    assert pair.read(0).mode == "L"

    both = open_source(str(tmp_path))
    assert isinstance(both, IdxSource) and len(both) == 10
    assert both.subsets.tolist() == ["train"] * 7 + ["t10k"] * 3
    assert both.ids[7] == f"t10k-images-idx3-ubyte{suffix}:0"
    np.testing.assert_array_equal(both.decode([7, 9])[..., 0], test_images[[0, 2]])
    assert both.decode([0], size=10).shape == (1, 10, 10, 1)


def test_idx_directory_reads_its_classes_txt(tmp_path):
    write_idx_pair(tmp_path, "train", 7, gz=False)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    assert open_source(str(tmp_path)).class_names == names
    (tmp_path / "classes.txt").write_text("\n".join(names[:5]) + "\n")  # labels reach class 9
    with pytest.raises(DmuhError, match="5 class names"):
        open_source(str(tmp_path))


def test_idx_errors(tmp_path):
    write_idx_pair(tmp_path, "train", 4, gz=False)
    images_file = tmp_path / "train-images-idx3-ubyte"
    labels_file = tmp_path / "train-labels-idx1-ubyte"
    labels_file.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DmuhError, match="train-labels-idx1-ubyte: 3 labels but"):
        IdxSource(images_file)
    labels_file.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 4) + bytes(4))
    with pytest.raises(DmuhError, match="train-labels-idx1-ubyte: not an IDX file"):
        IdxSource(images_file, labels_file)
    images_file.write_bytes(idx_bytes(np.zeros((4, 5, 4), np.uint8))[:-3])
    with pytest.raises(DmuhError, match="train-images-idx3-ubyte: IDX header says"):
        read_idx(images_file)


# --- List files ----------------------------------------------------------------------------


def test_list_file_single_and_named(tmp_path):
    write_image(tmp_path / "img/a.jpg", (255, 0, 0))
    write_image(tmp_path / "img/b.jpg", (0, 255, 0))
    write_image(tmp_path / "img/c.jpg", (0, 0, 255))
    (tmp_path / "train.txt").write_text("img/a.jpg 1 0 0\nimg/b.jpg 0 1 1\n\n")
    (tmp_path / "test.txt").write_text("img/c.jpg 0 0 1\n")
    single = open_source(str(tmp_path / "train.txt"), root=tmp_path)
    assert isinstance(single, ListFileSource)
    assert single.labels.tolist() == [[1, 0, 0], [0, 1, 1]]  # multi-label row kept as is
    assert single.subsets.tolist() == ["train", "train"]
    assert single.decode().shape == (2, 8, 8, 3)

    named = ListFileSource(
        {"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"}, tmp_path, class_names=["x", "y", "z"]
    )
    assert named.subsets.tolist() == ["train", "train", "test"]
    assert named.class_names == ["x", "y", "z"]
    spec = f"list:train={tmp_path / 'train.txt'},test={tmp_path / 'test.txt'}"
    assert (
        open_source(spec, root=tmp_path).fingerprint()
        == ListFileSource({"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"}, tmp_path).fingerprint()
    )


def test_classes_txt_names_the_classes_of_list_and_idx_files(tmp_path):
    write_image(tmp_path / "img/a.jpg", (255, 0, 0))
    write_image(tmp_path / "img/b.jpg", (0, 255, 0))
    (tmp_path / "train.txt").write_text("img/a.jpg 1 0\nimg/b.jpg 0 1\n")
    assert open_source(str(tmp_path / "train.txt"), root=tmp_path).class_names == ["0", "1"]  # numbers without it
    (tmp_path / "classes.txt").write_text("T-shirt/top\nTrouser\n\n")  # a trailing blank line is no class
    assert open_source(str(tmp_path / "train.txt"), root=tmp_path).class_names == ["T-shirt/top", "Trouser"]
    for text, message in (
        ("a\nb\nc\n", "3 class names for the list files' 2 label columns"),
        ("a\n\nb\n", "line 2 is empty"),
        ("a\na\n", "class name 'a' is given twice"),
        (b"\xff\xfe", "not UTF-8 text"),
    ):
        write = (
            (tmp_path / "classes.txt").write_bytes if isinstance(text, bytes) else (tmp_path / "classes.txt").write_text
        )
        write(text)
        with pytest.raises(DmuhError, match=f"classes.txt: .*{re.escape(message)}"):
            open_source(str(tmp_path / "train.txt"), root=tmp_path)


def test_list_file_errors(tmp_path):
    (tmp_path / "list.txt").write_text("a.jpg 1 0\nb.jpg 0 1 0\n")
    with pytest.raises(DmuhError, match=r"list.txt line 2: expected 2 labels, got 3"):
        ListFileSource(tmp_path / "list.txt", tmp_path)
    (tmp_path / "list.txt").write_text("a.jpg 1 2\n")
    with pytest.raises(DmuhError, match="list.txt line 1"):
        ListFileSource(tmp_path / "list.txt", tmp_path)
    (tmp_path / "list.txt").write_text("missing.jpg 1 0\n")
    source = ListFileSource(tmp_path / "list.txt", tmp_path)
    with pytest.raises(DmuhError, match="missing.jpg"):
        source.read(0)
    with pytest.raises(DmuhError, match="needs root"):
        open_source(str(tmp_path / "list.txt"))
    with pytest.raises(DmuhError, match="nope.txt"):
        ListFileSource(tmp_path / "nope.txt", tmp_path)


def test_list_file_reads_from_zip_root(folder_tree, tmp_path):
    archive = zip_folder(folder_tree, tmp_path / "tree.zip")
    (tmp_path / "list.txt").write_text("train/cat/a.png 1 0\ntest/dog/e.bmp 0 1\n")
    source = ListFileSource(tmp_path / "list.txt", archive)
    assert source.decode()[:, 0, 0].tolist() == [[255, 0, 0], [0, 0, 255]]


# --- Digits, features, open_source ---------------------------------------------------------


def test_digits():
    source = DigitsSource()
    assert len(source) == 1797 and source.channels == 1 and len(source.class_names) == 10
    images = source.decode()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8 and images.max() == 255
    assert (source.labels.sum(1) == 1).all()
    assert open_source("digits").fingerprint() == source.fingerprint()


def test_feature_source(tmp_path):
    features = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "feats.npz", features=features, labels=labels)
    source = open_source(str(tmp_path / "feats.npz"))
    assert isinstance(source, FeatureSource) and source.channels is None
    assert source.labels.shape == (6, 3)
    np.testing.assert_array_equal(source.decode([1, 2]), features[[1, 2]])
    with pytest.raises(DmuhError, match="size"):
        source.decode(size=4)
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "y.npy", to_multi_hot(labels))
    pair = open_source(f"features:{tmp_path / 'x.npy'}", labels=tmp_path / "y.npy")
    assert pair.fingerprint() == source.fingerprint()
    np.savez(tmp_path / "bad.npz", labels=labels)
    with pytest.raises(DmuhError, match="bad.npz: missing array"):
        open_source(str(tmp_path / "bad.npz"))


def test_unlabeled_sources_list_the_same_items_without_labels(tmp_path):
    """A features file without labels, `unlabeled:` of a labeled one, a flat image folder and
    `unlabeled:` of a class tree: (N, 0) labels, and the same items and fingerprint as the
    labeled reading, so a run trained on one is evaluated on the other."""
    features = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    np.savez(tmp_path / "feats.npz", features=features, labels=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(tmp_path / "plain.npz", features=features)
    labeled = open_source(str(tmp_path / "feats.npz"))
    for spec in (str(tmp_path / "plain.npz"), f"unlabeled:{tmp_path / 'feats.npz'}"):
        source = open_source(spec)
        assert source.labels.shape == (6, 0) and not source.labeled and source.class_names == []
        assert source.fingerprint() == labeled.fingerprint(labels=False) != labeled.fingerprint()
    assert labeled.labeled
    tree = tmp_path / "tree"
    for subset, name in (("train", "cat"), ("train", "dog"), ("test", "cat")):
        (tree / subset / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(tree / subset / name / f"{i}.png")
    with_labels, without = open_source(str(tree)), open_source(f"unlabeled:{tree}")
    assert with_labels.labels.shape == (6, 2) and without.labels.shape == (6, 0)
    assert without.ids == with_labels.ids and without.fingerprint() == with_labels.fingerprint(labels=False)
    assert list(without.subsets) == list(with_labels.subsets)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (0, 40 * i, 0)).save(flat / f"{i}.jpg")
    source = open_source(str(flat))
    assert source.labels.shape == (3, 0) and source.ids == ["0.jpg", "1.jpg", "2.jpg"] and source.subsets is None
    assert source.decode().shape == (3, 4, 4, 3)


def test_open_source_errors(tmp_path):
    with pytest.raises(DmuhError, match="nothing-here"):
        open_source(str(tmp_path / "nothing-here"))
    with pytest.raises(DmuhError, match="nothing-here"):
        open_source(f"idx:{tmp_path / 'nothing-here'}")
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(DmuhError, match="unknown kind"):
        open_source(str(tmp_path / "data.csv"))


def test_to_multi_hot_validates():
    assert to_multi_hot([2, 0]).tolist() == [[0, 0, 1], [1, 0, 0]]
    with pytest.raises(DmuhError, match="only 0 and 1"):
        to_multi_hot(np.array([[0, 2]]))


# --- The real CIFAR-10 JPEG zip ------------------------------------------------------------


@pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason="shared/data/cifar10-jpeg.zip not present")
def test_real_cifar_zip():
    source = open_source(str(CIFAR_ZIP))
    assert isinstance(source, ImageFolderSource)
    assert len(source) == 60000 and len(source.class_names) == 10
    assert source.class_names[0] == "airplane" and source.class_names[-1] == "truck"
    assert (source.subsets == "train").sum() == 50000 and (source.subsets == "test").sum() == 10000
    assert (source.labels.sum(1) == 1).all()
    assert (source.labels.sum(0) == 6000).all()
    indices = np.random.default_rng(0).choice(len(source), 300, replace=False)
    images = source.decode(indices)
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert 40 < images.mean() < 200  # real photos, not blank
    np.testing.assert_array_equal(images[0], np.asarray(source.read(int(indices[0]))))
    assert source.fingerprint() == ImageFolderSource(CIFAR_ZIP).fingerprint()


def test_zip_source_survives_pickling(folder_tree, tmp_path):
    # DataLoader workers receive the source pickled; the zip handle is reopened there.
    source = ImageFolderSource(zip_folder(folder_tree, tmp_path / "tree.zip"))
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.decode(), source.decode())
