"""Paired data: items with an image (or an image feature vector) and a text vector, for
cross-modal hashing (images searched by text and text by images).

    PairedSource(image, text, vocabulary)   a `Source` whose items are the image modality (so every
                                            protocol, split and single-modal method works on it)
                                            and whose `text` is an (N, V) float32 matrix
    Vocabulary                              the words of the text vectors, and how a text becomes
                                            one (binary, count or tf-idf bag of words)
    open_paired(path)                       a .npz of `image`, `text`, `labels`; a MATLAB .mat in
                                            the MIRFlickr-25K / NUS-WIDE layout (v5 or v7.3); an
                                            image folder or .zip with a .txt file beside each image

`paired:PATH` names one as --data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from dmuh.data.sources import (
    SOURCE_KINDS,
    ArraySource,
    FeatureSource,
    PathLike,
    Source,
    _check_label_array,
    _load_npz,
)
from dmuh.errors import DmuhError, first_line
from dmuh.utils.io import atomic_path, parse_json

WEIGHTINGS = ("binary", "count", "tfidf")
# scikit-learn's default token pattern keeps words of two or more letters; tags such as "a" or a
# single digit are words too, so any run of word characters is one.
TOKEN_PATTERN = r"(?u)\b\w+\b"


class Vocabulary:
    """The words of a bag-of-words text vector and its weighting: "binary" (a word is there or
    not, as MIRFlickr's tag vectors are), "count", or "tfidf" (scikit-learn's smoothed idf, rows of
    unit length). Saved with a run as JSON (`to_dict`), so a text query is vectorised as the
    training texts were."""

    def __init__(self, words: Sequence[str], weighting: str = "binary", idf: Optional[Sequence[float]] = None):
        self.words = [str(word) for word in words]
        if len(set(self.words)) != len(self.words):
            raise DmuhError("vocabulary: a word appears twice")
        if weighting not in WEIGHTINGS:
            raise DmuhError(f"vocabulary weighting {weighting!r}: choose {', '.join(WEIGHTINGS)}")
        self.weighting = weighting
        self.idf = None if idf is None else np.asarray(idf, dtype=np.float32)
        if weighting == "tfidf" and (self.idf is None or self.idf.shape != (len(self.words),)):
            raise DmuhError(f"vocabulary: tf-idf weighting needs one idf weight per word ({len(self.words)})")

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def fit(cls, texts: Sequence[str], weighting: str = "binary", min_df: int = 1) -> "Vocabulary":
        """The words of `texts` (lower-cased) that occur in at least `min_df` of them."""
        from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

        if weighting not in WEIGHTINGS:
            raise DmuhError(f"text weighting {weighting!r}: choose {', '.join(WEIGHTINGS)}")
        if weighting == "tfidf":
            vectorizer = TfidfVectorizer(token_pattern=TOKEN_PATTERN, min_df=min_df)
        else:
            vectorizer = CountVectorizer(token_pattern=TOKEN_PATTERN, min_df=min_df, binary=weighting == "binary")
        try:
            vectorizer.fit(list(texts))
        except ValueError as error:  # an empty vocabulary: no text holds a word
            raise DmuhError(f"texts: no vocabulary could be built ({error})") from None
        words = vectorizer.get_feature_names_out().tolist()
        return cls(words, weighting, vectorizer.idf_.tolist() if weighting == "tfidf" else None)

    def vectorize(self, texts: Sequence[str], require_known: bool = False) -> np.ndarray:
        """(n, V) float32 text vectors; `require_known` refuses a text with no word of the vocabulary
        (a query that would match nothing), naming it."""
        from sklearn.feature_extraction.text import CountVectorizer

        counter = CountVectorizer(token_pattern=TOKEN_PATTERN, vocabulary=self.words, binary=self.weighting == "binary")
        vectors = counter.transform(list(texts)).toarray().astype(np.float32)
        if require_known:
            for text, row in zip(texts, vectors):
                if not row.any():
                    raise DmuhError(
                        f"text {text!r}: none of its words is in the run's vocabulary of "
                        f"{len(self.words)} words (e.g. {', '.join(self.words[:5])})"
                    )
        if self.weighting == "tfidf":
            vectors *= self.idf[None, :]
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.maximum(norms, 1e-12)
        return vectors

    def to_dict(self) -> Dict[str, Any]:
        return {
            "words": self.words,
            "weighting": self.weighting,
            "idf": None if self.idf is None else [float(v) for v in self.idf],
        }

    @classmethod
    def from_dict(cls, value: Any, where: str) -> "Vocabulary":
        if not isinstance(value, dict) or not isinstance(value.get("words"), list):
            raise DmuhError(f"{where}: not a vocabulary (expected an object with a 'words' list)")
        return cls(value["words"], value.get("weighting", "binary"), value.get("idf"))

    def save(self, path: PathLike) -> None:

        with atomic_path(Path(path)) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: PathLike) -> "Vocabulary":
        path = Path(path)
        try:
            value = parse_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DmuhError(f"{path}: unreadable vocabulary ({first_line(error, 120)})") from None
        return cls.from_dict(value, str(path))


def check_text_matrix(text: Any, count: int, where: str) -> np.ndarray:
    """The (count, V) text vectors as float32, or a one-line error naming `where`."""
    text = np.asarray(text)
    if text.ndim != 2 or not np.issubdtype(text.dtype, np.number) or np.iscomplexobj(text):
        raise DmuhError(f"{where}: the text must be an (N, V) numeric matrix, got {text.dtype} {text.shape}")
    if text.shape[0] != count:
        raise DmuhError(f"{where}: {count} images but {text.shape[0]} texts; each item needs both")
    if text.shape[1] == 0:
        raise DmuhError(f"{where}: the text vectors have no columns")
    with np.errstate(over="ignore"):
        text = np.ascontiguousarray(text, dtype=np.float32)
    finite = np.isfinite(text).all(axis=1)
    if not finite.all():
        raise DmuhError(f"{where}: text row {int(np.flatnonzero(~finite)[0])} (counting from 0) holds NaN or Inf")
    return text


class PairedSource(Source):
    """Items with two modalities: the image modality is `image` (any Source: images or feature
    vectors, with the labels), the text modality `text` (N, V) float32. Reading and decoding read the
    images, so a single-modal method trained on paired data uses the images alone."""

    def __init__(self, image: Source, text: Any, vocabulary: Optional[Vocabulary] = None, name: str = "paired"):
        self.image = image
        self.text = check_text_matrix(text, len(image), name)
        if vocabulary is not None and len(vocabulary) != self.text.shape[1]:
            raise DmuhError(
                f"{name}: a vocabulary of {len(vocabulary)} words for text vectors of {self.text.shape[1]} columns"
            )
        self.vocabulary = vocabulary
        self.name = name
        self._init_common(image.labels, image.class_names, image.ids, image.subsets, image.channels, name)

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])

    def __repr__(self) -> str:
        return f"PairedSource({len(self)} items, {len(self.class_names)} classes, text of {self.text_dim})"

    def read(self, i: int):
        return self.image.read(i)

    def _decode(self, indices, size, workers):
        return self.image._decode(indices, size, workers)

    def _hash_content(self, digest) -> None:
        self.image._hash_content(digest)
        digest.update(b"\0text\0" + repr(self.text.shape).encode())
        digest.update(self.text.data)
        if self.vocabulary is not None:
            digest.update(b"\0vocabulary\0" + "\n".join(self.vocabulary.words).encode())


def image_part(image: np.ndarray, labels: np.ndarray, where: str, what: str = "image", **names) -> Source:
    """The image modality from an array: (N, D) feature vectors or (N, H, W[, C]) uint8 images;
    `what` names the array in messages (a .mat's field)."""
    image = np.asarray(image)
    if image.ndim == 2:
        if np.issubdtype(image.dtype, np.number) and not np.isfinite(image).all(axis=1).all():
            bad = np.flatnonzero(~np.isfinite(image).all(axis=1))
            raise DmuhError(
                f"{where}: {what} row {int(bad[0])} (counting from 0) holds NaN or Inf; "
                f"{len(bad)} of {len(image)} rows do"
            )
        return FeatureSource(image, labels, name=where, **names)
    if image.ndim in (3, 4) and image.dtype == np.uint8:
        source = ArraySource.__new__(ArraySource)
        source._init_images(image, labels, names.get("class_names"), names.get("ids"), names.get("subsets"), where)
        return source
    raise DmuhError(
        f"{where}: the image must be (N, D) feature vectors or (N, H, W[, C]) uint8 images, "
        f"got {image.dtype} {image.shape}"
    )


def no_labels(count: int) -> np.ndarray:
    return np.zeros((count, 0), np.uint8)


def load_paired_npz(path: PathLike, labeled: bool = True) -> PairedSource:
    """A .npz with `image` and `text`, optional `labels`, `class_names`, `ids`, `subsets` and
    `vocabulary` (one word per text column)."""
    path = Path(path)
    arrays = _load_npz(
        path, required=("image", "text"), optional=("labels", "class_names", "ids", "subsets", "vocabulary")
    )
    count = arrays["image"].shape[0] if arrays["image"].ndim else 0
    names = {}
    for key in ("class_names", "ids", "subsets"):
        if key in arrays:
            if arrays[key].ndim != 1:
                raise DmuhError(f"{path}: key {key!r} must be a 1-D array of names, got shape {arrays[key].shape}")
            names[key] = arrays[key].tolist()
    if labeled and "labels" in arrays:
        _check_label_array(arrays["labels"], f"{path}: key 'labels'")
        labels = arrays["labels"]
        if labels.shape[0] != count:
            raise DmuhError(f"{path}: key 'labels' has {labels.shape[0]} rows for {count} images")
    else:
        names.pop("class_names", None)
        labels = no_labels(count)
    vocabulary = None
    if "vocabulary" in arrays:
        words = arrays["vocabulary"]
        if words.ndim != 1 or words.dtype.kind not in "US":
            raise DmuhError(f"{path}: key 'vocabulary' must be a 1-D array of words, got {words.dtype} {words.shape}")
        vocabulary = Vocabulary([str(w) for w in words.tolist()])
    return PairedSource(image_part(arrays["image"], labels, str(path), **names), arrays["text"], vocabulary, str(path))


# Readers by file kind; `dmuh.data.paired_files` adds the MATLAB and folder readers.
PAIRED_READERS: Dict[str, Any] = {".npz": load_paired_npz}


def open_paired(path: PathLike, labeled: bool = True, **kw) -> PairedSource:
    """The paired data at `path`: a .npz, a .mat, or an image folder / .zip with a text file per image."""
    path = Path(path)
    if not path.exists():
        raise DmuhError(f"paired data {path}: not found")
    kind = "folder" if path.is_dir() else path.suffix.lower()
    reader = PAIRED_READERS.get(kind)
    if reader is None:
        raise DmuhError(
            f"paired data {path}: unknown kind of file (expected a .npz of image and text, a .mat, "
            "or an image folder or .zip with a .txt file beside each image)"
        )
    return reader(path, labeled=labeled, **kw)


def _open_paired_spec(target: str, root, **kw) -> PairedSource:
    return open_paired(target, **kw)


SOURCE_KINDS["paired"] = _open_paired_spec
