"""Paired (image + text) data: the .npz, MATLAB .mat (v5 and v7.3) and folder / .zip readers."""

import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from dmuh.data import ImageFolderSource, PairedSource, Vocabulary, open_paired, open_source
from dmuh.data.paired import TOKEN_PATTERN
from dmuh.data.sources import FeatureSource
from dmuh.errors import DmuhError

RNG = np.random.default_rng(0)
FEATURES = RNG.normal(size=(6, 4)).astype(np.float32)  # XAll: 6 items, 4-d features
TAGS = (RNG.random((6, 5)) < 0.5).astype(np.float64)  # YAll: 5 tags
LABELS = np.eye(3, dtype=np.uint8)[[0, 1, 2, 0, 1, 2]]  # LAll: 3 classes
LABELS[0, 1] = 1  # multi-label


def matlab_header() -> bytes:
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    return text.ljust(116) + b"\0" * 8 + b"\x00\x02IM"


def write_v73(path: Path, fields: dict) -> Path:
    """An HDF5 file as MATLAB -v7.3 writes one: a 512-byte user block with the MATLAB header, each
    array stored with its dimensions reversed, its class in the MATLAB_class attribute."""
    classes = {np.dtype(np.float64): "double", np.dtype(np.float32): "single", np.dtype(np.uint8): "uint8"}
    with h5py.File(path, "w", userblock_size=512) as handle:
        for name, value in fields.items():
            value = np.asarray(value)
            dataset = handle.create_dataset(name, data=value.T)
            dataset.attrs["MATLAB_class"] = np.bytes_(classes[value.dtype])
    with open(path, "r+b") as handle:
        handle.write(matlab_header())
    return path


def write_image(path: Path, color, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def mirflickr_v5(tmp_path):
    path = tmp_path / "mirflickr.mat"
    scipy.io.savemat(path, {"XAll": FEATURES.astype(np.float64), "YAll": TAGS, "LAll": LABELS})
    return path


@pytest.fixture
def mirflickr_v73(tmp_path):
    return write_v73(
        tmp_path / "mirflickr73.mat",
        {"XAll": FEATURES.astype(np.float64), "YAll": TAGS, "LAll": LABELS.astype(np.float64)},
    )


@pytest.fixture
def tagged_tree(tmp_path):
    """cat/{a,b}.png and dog/c.png, each with its tags beside it."""
    root = tmp_path / "tagged"
    write_image(root / "cat/a.png", (255, 0, 0))
    write_image(root / "cat/b.png", (250, 0, 0))
    write_image(root / "dog/c.png", (0, 0, 255))
    write_text(root / "cat/a.txt", "Sky cat sky")
    write_text(root / "cat/b.txt", "cat\nindoor")
    write_text(root / "dog/c.txt", "dog sky")
    return root


def check_mirflickr(source) -> None:
    assert isinstance(source, PairedSource)
    assert isinstance(source.image, FeatureSource)
    assert len(source) == 6 and source.labeled and source.text_dim == 5
    np.testing.assert_allclose(source.image.features, FEATURES, rtol=1e-6)
    np.testing.assert_array_equal(source.text, TAGS.astype(np.float32))
    np.testing.assert_array_equal(source.labels, LABELS)
    assert source.vocabulary is None


# -- .mat ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["mirflickr_v5", "mirflickr_v73"])
def test_mat_reads_mirflickr_layout(fixture, request):
    path = request.getfixturevalue(fixture)
    check_mirflickr(open_source("paired:" + str(path)))
    check_mirflickr(open_source(str(path)))
    assert open_source(str(path)).fingerprint() == open_source("paired:" + str(path)).fingerprint()


@pytest.mark.parametrize("fixture", ["mirflickr_v5", "mirflickr_v73"])
def test_mat_unlabeled_drops_labels(fixture, request):
    source = open_source("unlabeled:" + str(request.getfixturevalue(fixture)))
    assert isinstance(source, PairedSource) and not source.labeled and len(source) == 6
    np.testing.assert_array_equal(source.text, TAGS.astype(np.float32))


def test_mat_v5_and_v73_give_the_same_data(mirflickr_v5, mirflickr_v73):
    assert open_paired(mirflickr_v5).fingerprint() == open_paired(mirflickr_v73).fingerprint()


def test_mat_images_channels_first_and_matlab_items_last(tmp_path):
    images = RNG.integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)  # N x H x W x C
    tags = np.eye(4)[:, :3][[0, 1, 2, 0]]
    # v5: N x C x H x W (as IAll is distributed), other field names
    scipy.io.savemat(tmp_path / "nchw.mat", {"IAll": images.transpose(0, 3, 1, 2), "tags": tags})
    source = open_paired(tmp_path / "nchw.mat")
    assert not source.labeled and source.image.channels == 3
    np.testing.assert_array_equal(source.image.images, images)
    np.testing.assert_array_equal(source.image.decode(), images)
    # v7.3 in MATLAB's own layout: H x W x C x N images, C x N labels, text N x V
    labels = LABELS[:4]
    write_v73(
        tmp_path / "hwcn.mat",
        {"images": images.transpose(1, 2, 3, 0), "YAll": tags, "LAll": labels.T.astype(np.float64)},
    )
    source = open_paired(tmp_path / "hwcn.mat")
    np.testing.assert_array_equal(source.image.images, images)
    np.testing.assert_array_equal(source.labels, labels)
    np.testing.assert_array_equal(source.text, tags)


def test_mat_field_overrides(tmp_path):
    path = tmp_path / "custom.mat"
    scipy.io.savemat(path, {"feat": FEATURES, "words": TAGS, "cls": LABELS})
    source = open_paired(path, image_field="feat", text_field="words", labels_field="cls")
    check_mirflickr(source)
    with pytest.raises(DmuhError, match=r"custom\.mat: no text field 'tagz'; fields: .*words"):
        open_paired(path, image_field="feat", text_field="tagz")


def test_mat_missing_field_names_file_and_field(tmp_path):
    path = tmp_path / "notext.mat"
    scipy.io.savemat(path, {"XAll": FEATURES, "LAll": LABELS})
    with pytest.raises(DmuhError, match=r"notext\.mat: no text field \(looked for YAll, .*\); fields: XAll, LAll"):
        open_source(str(path))
    scipy.io.savemat(path, {"YAll": TAGS})
    with pytest.raises(DmuhError, match=r"notext\.mat: no image field \(looked for XAll, IAll"):
        open_source("paired:" + str(path))


def test_mat_mismatched_counts(tmp_path):
    path = tmp_path / "short.mat"
    scipy.io.savemat(path, {"XAll": FEATURES, "YAll": TAGS[:5], "LAll": LABELS})
    with pytest.raises(
        DmuhError,
        match=r"short\.mat: .*different numbers of items: image field 'XAll' 6 .*"
        r"text field 'YAll' 5",
    ):
        open_source(str(path))
    write_v73(path, {"XAll": FEATURES, "YAll": TAGS, "LAll": LABELS[:4].astype(np.float64)})
    with pytest.raises(DmuhError, match=r"short\.mat: .*'XAll' 6 .*labels field 'LAll' 4"):
        open_source(str(path))
    # the labels of an unlabeled reading are not read at all
    assert len(open_source("unlabeled:" + str(path))) == 6


def test_mat_refuses_cells_structs_chars_and_bad_labels(tmp_path):
    path = tmp_path / "odd.mat"
    cell = np.empty((6, 1), dtype=object)
    cell[:, 0] = ["a"] * 6
    scipy.io.savemat(path, {"XAll": FEATURES, "YAll": cell})
    with pytest.raises(DmuhError, match=r"odd\.mat: text field 'YAll' is a MATLAB cell array"):
        open_paired(path)
    scipy.io.savemat(path, {"XAll": {"a": 1}, "YAll": TAGS})
    with pytest.raises(DmuhError, match=r"odd\.mat: image field 'XAll' is a MATLAB struct array"):
        open_paired(path)
    scipy.io.savemat(path, {"XAll": FEATURES, "YAll": TAGS, "LAll": "labels"})
    with pytest.raises(DmuhError, match=r"odd\.mat: labels field 'LAll' is a MATLAB char array"):
        open_paired(path)
    scipy.io.savemat(path, {"XAll": FEATURES, "YAll": TAGS, "LAll": LABELS * 2})
    with pytest.raises(DmuhError, match=r"odd\.mat: labels field 'LAll'.*only 0 and 1"):
        open_paired(path)
    with h5py.File(path, "w") as handle:  # a v7.3 cell: a dataset of object references
        data = handle.create_dataset("XAll", data=FEATURES.T)
        handle.create_dataset("YAll", data=np.array([data.ref] * 6, dtype=h5py.ref_dtype))
        handle["YAll"].attrs["MATLAB_class"] = np.bytes_("cell")
    with pytest.raises(DmuhError, match=r"odd\.mat: text field 'YAll' is a MATLAB cell array"):
        open_paired(path)


def test_mat_damaged_file(tmp_path, mirflickr_v5, mirflickr_v73):
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(DmuhError, match=r"bad\.mat: not a readable MATLAB \.mat file") as caught:
        open_source(str(bad))
    assert "\n" not in str(caught.value)
    bad.write_bytes(mirflickr_v5.read_bytes()[:200])
    with pytest.raises(DmuhError, match=r"bad\.mat: "):
        open_source(str(bad))
    bad.write_bytes(mirflickr_v73.read_bytes()[:1000])
    with pytest.raises(DmuhError, match=r"bad\.mat: .*(7\.3|HDF5)"):
        open_source(str(bad))


def test_mat_refuses_unknown_option(mirflickr_v5):
    with pytest.raises(DmuhError, match=r"unknown option\(s\) channels for a \.mat"):
        open_paired(mirflickr_v5, channels=1)


# -- .npz ------------------------------------------------------------------------------------


def write_paired_npz(path: Path, text=TAGS) -> Path:
    np.savez(path, image=FEATURES, text=text, labels=LABELS, vocabulary=np.array(["sky", "cat", "dog", "tree", "car"]))
    return path


def test_npz_plain_path_and_unlabeled(tmp_path):
    path = write_paired_npz(tmp_path / "pairs.npz")
    source = open_source(str(path))
    assert isinstance(source, PairedSource) and source.labeled
    np.testing.assert_array_equal(source.text, TAGS.astype(np.float32))
    np.testing.assert_array_equal(source.labels, LABELS)
    assert source.vocabulary.words == ["sky", "cat", "dog", "tree", "car"]
    unlabeled = open_source("unlabeled:" + str(path))
    assert isinstance(unlabeled, PairedSource) and unlabeled.labeled is False
    assert unlabeled.labels.shape == (6, 0)
    np.testing.assert_array_equal(unlabeled.text, source.text)
    assert unlabeled.fingerprint() == source.fingerprint(labels=False)


def test_fingerprint_follows_the_text(tmp_path, tagged_tree):
    first = write_paired_npz(tmp_path / "a.npz")
    same = write_paired_npz(tmp_path / "b.npz")
    changed_text = TAGS.copy()
    changed_text[2, 3] = 1 - changed_text[2, 3]
    changed = write_paired_npz(tmp_path / "c.npz", changed_text)
    assert open_paired(first).fingerprint() == open_paired(same).fingerprint()
    assert open_paired(first).fingerprint() != open_paired(changed).fingerprint()
    before = open_source("paired:" + str(tagged_tree)).fingerprint()
    assert open_source("paired:" + str(tagged_tree)).fingerprint() == before
    write_text(tagged_tree / "dog/c.txt", "dog car")  # same size, other words
    assert open_source("paired:" + str(tagged_tree)).fingerprint() != before


# -- folder / .zip ---------------------------------------------------------------------------


def check_tagged(source) -> None:
    assert isinstance(source, PairedSource) and isinstance(source.image, ImageFolderSource)
    assert source.image.ids == ["cat/a.png", "cat/b.png", "dog/c.png"]  # the .txt files are not images
    assert source.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(source.labels, [[1, 0], [1, 0], [0, 1]])
    assert source.vocabulary.words == ["cat", "dog", "indoor", "sky"]  # lower-cased, sorted
    np.testing.assert_array_equal(source.text, [[1, 0, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
    assert source.decode().shape == (3, 8, 8, 3)


def test_folder_with_texts(tagged_tree):
    check_tagged(open_source("paired:" + str(tagged_tree)))
    # a plain folder path is an image folder, texts ignored
    plain = open_source(str(tagged_tree))
    assert isinstance(plain, ImageFolderSource) and len(plain) == 3


def test_zip_with_texts(tagged_tree, tmp_path):
    archive = tmp_path / "tagged.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(tagged_tree.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(tagged_tree).as_posix())
    source = open_source("paired:" + str(archive))
    check_tagged(source)
    assert source.fingerprint() == open_source("paired:" + str(tagged_tree)).fingerprint()


def test_folder_count_weighting_and_flat_folder(tagged_tree, tmp_path):
    source = open_paired(tagged_tree, text_weighting="count", min_df=2)
    assert source.vocabulary.words == ["cat", "sky"]
    np.testing.assert_array_equal(source.text, [[1, 2], [1, 0], [0, 1]])
    flat = tmp_path / "flat"
    write_image(flat / "x.png", (1, 2, 3))
    write_text(flat / "x.txt", "\ufeffsunset beach")  # a byte-order mark is dropped
    source = open_source("paired:" + str(flat))
    assert not source.labeled and source.vocabulary.words == ["beach", "sunset"]
    unlabeled = open_source("unlabeled:" + str(tagged_tree))
    assert isinstance(unlabeled, ImageFolderSource) and not unlabeled.labeled
    assert not open_paired(tagged_tree, labeled=False).labeled


def test_folder_tfidf_matches_sklearn(tagged_tree):
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["Sky cat sky", "cat\nindoor", "dog sky"]
    expected = TfidfVectorizer(token_pattern=TOKEN_PATTERN).fit_transform(texts).toarray()
    source = open_paired(tagged_tree, text_weighting="tfidf")
    np.testing.assert_allclose(source.text, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        source.vocabulary.vectorize(["dog cat"]),
        TfidfVectorizer(token_pattern=TOKEN_PATTERN).fit(texts).transform(["dog cat"]).toarray(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_folder_missing_text(tagged_tree):
    (tagged_tree / "cat/b.txt").unlink()
    (tagged_tree / "dog/c.txt").unlink()
    with pytest.raises(
        DmuhError,
        match=r"cat/b\.png: no text file beside it \(expected .*cat/b\.txt\); "
        r"1 more images lack theirs",
    ):
        open_source("paired:" + str(tagged_tree))


def test_folder_text_not_utf8(tagged_tree):
    (tagged_tree / "dog/c.txt").write_bytes(b"caf\xe9 dog")
    with pytest.raises(DmuhError, match=r"dog/c\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        open_paired(tagged_tree)


def test_folder_bad_options(tagged_tree):
    with pytest.raises(DmuhError, match=r"text weighting 'bm25'"):
        open_paired(tagged_tree, text_weighting="bm25")
    with pytest.raises(DmuhError, match=r"min_df=0"):
        open_paired(tagged_tree, min_df=0)
    with pytest.raises(DmuhError, match=r"unknown option\(s\) image_field"):
        open_paired(tagged_tree, image_field="x")


# -- Vocabulary ------------------------------------------------------------------------------


def test_vocabulary_require_known_refuses_a_query_of_unknown_words():
    vocabulary = Vocabulary.fit(["sky cat", "dog"])
    np.testing.assert_array_equal(vocabulary.vectorize(["cat, cat!"], require_known=True), [[1, 0, 0]])
    with pytest.raises(DmuhError, match=r"text 'zebra giraffe': none of its words is in the run's vocabulary of 3"):
        vocabulary.vectorize(["cat", "zebra giraffe"], require_known=True)
    assert not vocabulary.vectorize(["zebra"]).any()  # without require_known: a zero vector


@pytest.mark.parametrize("weighting", ["binary", "count", "tfidf"])
def test_vocabulary_save_load_round_trip(tmp_path, weighting):
    texts = ["sky cat sky", "cat indoor", "dog sky", "dog dog"]
    vocabulary = Vocabulary.fit(texts, weighting=weighting)
    vocabulary.save(tmp_path / "vocabulary.json")
    loaded = Vocabulary.load(tmp_path / "vocabulary.json")
    assert loaded.words == vocabulary.words and loaded.weighting == weighting
    np.testing.assert_array_equal(loaded.vectorize(texts), vocabulary.vectorize(texts))
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DmuhError, match=r"broken\.json: unreadable vocabulary"):
        Vocabulary.load(tmp_path / "broken.json")
