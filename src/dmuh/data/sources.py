"""Data sources: images (or feature vectors) plus a multi-hot label matrix.

Every source, single- or multi-label, exposes its labels as an (N, C) uint8 multi-hot matrix; two
items are relevant to each other when they share a label. A source without labels (an image
folder with no class folders, `unlabeled:PATH`, a features file without `labels`) has C = 0:
label-free methods train on it, and evaluation needs the same items read with their labels. Images are decoded once into one uint8
array by `Source.decode`; protocols (dmuh.data.protocols) split a source into query / train /
database index sets and pin the split to `Source.fingerprint()`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import threading
import weakref
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from dmuh.errors import DataError, DmuhError
from dmuh.utils.io import atomic_path, check_array_file, parse_json
from dmuh.utils.progress import progress_bar

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
DEFAULT_MAX_WORKERS = 8
MAX_LABEL_BYTES = 1 << 32  # an (N, C) multi-hot matrix larger than this is a corrupt label, not data


# ---------------------------------------------------------------------------------------------
# Label and index helpers


def to_multi_hot(labels, num_classes: Optional[int] = None, what: str = "labels") -> np.ndarray:
    """(N,) integer class indices or an (N, C) 0/1 matrix -> (N, C) uint8 multi-hot."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
            raise DmuhError(f"{what}: class indices must be non-negative integers")
        needed = int(labels.max()) + 1 if labels.size else 0
        num_classes = needed if num_classes is None else num_classes
        if needed > num_classes:
            row = int(np.argmax(labels))
            raise DmuhError(f"{what}: class index {needed - 1} (row {row}) but only {num_classes} classes")
        if labels.shape[0] * num_classes > MAX_LABEL_BYTES:
            row = int(np.argmax(labels))
            raise DmuhError(
                f"{what}: class index {int(labels[row])} (row {row}) would make a "
                f"{labels.shape[0]} x {num_classes} label matrix; is that label corrupt?"
            )
        one_hot = np.zeros((labels.shape[0], num_classes), dtype=np.uint8)
        one_hot[np.arange(labels.shape[0]), labels] = 1
        return one_hot
    if labels.ndim == 2:
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise DmuhError(f"{what}: a label matrix must hold only 0 and 1")
        return labels.astype(np.uint8)
    raise DmuhError(f"{what}: expected (N,) class indices or an (N, C) multi-hot matrix, got shape {labels.shape}")


def as_indices(indices, count: int) -> np.ndarray:
    """None -> all items; else a 1-D int64 array checked against `count` items."""
    if indices is None:
        return np.arange(count, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
        raise DmuhError(f"indices: expected a 1-D integer array, got dtype {indices.dtype} shape {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= count):
        bad = int(indices.min()) if indices.min() < 0 else int(indices.max())
        raise DmuhError(f"indices: index {bad} out of range for {count} items")
    return indices


def _default_workers() -> int:
    return max(1, min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1))


def _image_to_array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


# ---------------------------------------------------------------------------------------------
# Base classes


class Source:
    """Images (or features) with multi-hot labels. Subclasses fill the attributes in `__init__`."""

    labels: np.ndarray  # (N, C) uint8 multi-hot
    class_names: list
    ids: list  # one string per item: a relative path, or "file:row"
    subsets: Optional[np.ndarray]  # (N,) str: the split an item came from ("train", "test", ...)
    channels: Optional[int]  # 1 or 3; None for feature vectors

    def _init_common(self, labels, class_names, ids, subsets, channels, what: str) -> None:
        self.labels = to_multi_hot(labels, what=f"{what} labels")
        count, num_classes = self.labels.shape
        if class_names is None:
            class_names = range(num_classes)
        self.class_names = [str(name) for name in class_names]
        if len(self.class_names) != num_classes:
            raise DmuhError(f"{what}: {len(self.class_names)} class names for {num_classes} label columns")
        self.ids = list(ids) if ids is not None else [str(i) for i in range(count)]
        if len(self.ids) != count:
            raise DmuhError(f"{what}: {len(self.ids)} ids for {count} items")
        self.subsets = None if subsets is None else np.asarray(subsets, dtype=str)
        if self.subsets is not None and self.subsets.shape != (count,):
            raise DmuhError(f"{what}: {self.subsets.shape[0]} subset names for {count} items")
        self.channels = channels
        self._fingerprints: dict = {}  # labels included or not -> digest

    @property
    def labeled(self) -> bool:
        """Whether the items carry labels (C > 0); an unlabeled source has an (N, 0) label matrix."""
        return self.labels.shape[1] > 0

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items, {len(self.class_names)} classes)"

    # -- images ------------------------------------------------------------------------------

    def read(self, i: int) -> Image.Image:
        """Item `i` as a PIL image in mode "L" (channels 1) or "RGB" (channels 3)."""
        raise NotImplementedError

    def decode(
        self,
        indices=None,
        size: Optional[int] = None,
        workers: Optional[int] = None,
        cache_dir: Optional[PathLike] = None,
    ) -> np.ndarray:
        """Decode items into one (n, H, W, channels) uint8 array, resized to size x size if given.

        Without `size` all decoded images must share one size. With `cache_dir` the array is
        stored there as .npy (keyed by fingerprint, size and indices) and loaded on later calls.
        """
        indices = as_indices(indices, len(self))
        if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
            raise DmuhError(f"size: expected a positive integer, got {size!r}")
        if cache_dir is None:
            return self._decode(indices, size, workers)
        cache_file = self._cache_file(Path(cache_dir), indices, size)
        cached = self._load_cached(cache_file, len(indices))
        if cached is not None:
            return cached
        decoded = self._decode(indices, size, workers)
        try:
            with atomic_path(cache_file) as tmp:
                with open(tmp, "wb") as handle:  # np.save on a name would append ".npy"
                    np.save(handle, decoded)
        except DmuhError as error:  # a full or read-only cache folder costs a decode next time, not this run
            import sys

            print(f"dmuh: warning: decoded images not cached: {error}", file=sys.stderr)
        return decoded

    def _decode(self, indices: np.ndarray, size: Optional[int], workers: Optional[int]) -> np.ndarray:
        """Default: read item by item with PIL in a thread pool (PIL decodes without the GIL)."""
        n = len(indices)
        if n == 0:
            side = size or 0
            return np.zeros((0, side, side, self.channels), dtype=np.uint8)
        first = self._read_array(int(indices[0]), size)
        out = np.empty((n,) + first.shape, dtype=np.uint8)
        out[0] = first

        def fill(positions: np.ndarray) -> None:
            for pos in positions:
                array = self._read_array(int(indices[pos]), size)
                if array.shape != first.shape:
                    raise DmuhError(
                        f"images differ in size: {self.ids[indices[0]]} is {first.shape[1]}x{first.shape[0]}, "
                        f"{self.ids[indices[pos]]} is {array.shape[1]}x{array.shape[0]}; pass size to resize them"
                    )
                out[pos] = array

        rest = np.arange(1, n)
        workers = workers or _default_workers()

        with progress_bar(n, "decoding images", unit="image") as bar:
            bar.update(1)
            if workers == 1 or n < 64:
                for chunk in np.array_split(rest, max(1, len(rest) // 256)):
                    fill(chunk)
                    bar.update(len(chunk))
            else:
                chunks = np.array_split(rest, min(len(rest), workers * 8))
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    for chunk, future in [(chunk, pool.submit(fill, chunk)) for chunk in chunks]:
                        future.result()
                        bar.update(len(chunk))
        return out

    def _read_array(self, i: int, size: Optional[int]) -> np.ndarray:
        image = self.read(i)
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return _image_to_array(image)

    def _cache_file(self, cache_dir: Path, indices: np.ndarray, size: Optional[int]) -> Path:
        key = hashlib.sha256(f"{self.fingerprint()}|size={size}|".encode())
        key.update(indices.tobytes())
        return cache_dir / f"decoded-{key.hexdigest()[:32]}.npy"

    @staticmethod
    def _load_cached(cache_file: Path, count: int) -> Optional[np.ndarray]:
        """The cached array, or None when absent or unreadable (it is then decoded again)."""
        if not cache_file.is_file():
            return None
        try:
            check_array_file(cache_file, "decoded images")
            cached = np.load(cache_file, allow_pickle=False)
        except (DmuhError, OSError, ValueError, EOFError):
            return None
        ok = isinstance(cached, np.ndarray) and cached.dtype == np.uint8 and cached.shape[:1] == (count,)
        return cached if ok else None

    # -- identity ----------------------------------------------------------------------------

    def fingerprint(self, labels: bool = True) -> str:
        """sha256 hex digest identifying the data: the same data gives the same digest.
        `labels=False` leaves the labels out: the digest of the items alone, which is an unlabeled
        source's fingerprint, so a split made on an unlabeled reading also fits the labeled one."""
        labels = labels and self.labeled
        if self._fingerprints.get(labels) is None:
            digest = hashlib.sha256()
            self._hash_content(digest)
            if labels:
                digest.update(b"\0labels\0" + repr(self.labels.shape).encode() + self.labels.tobytes())
                digest.update(b"\0classes\0" + "\n".join(self.class_names).encode())
            if self.subsets is not None:
                digest.update(b"\0subsets\0" + "\n".join(self.subsets.tolist()).encode())
            self._fingerprints[labels] = digest.hexdigest()
        return self._fingerprints[labels]

    def _hash_content(self, digest) -> None:
        """Feed what identifies the images (pixels, or ids and file sizes) into `digest`."""
        raise NotImplementedError


class ArraySource(Source):
    """A source whose images are already one (N, H, W, C) uint8 array in memory."""

    def _init_images(self, images: np.ndarray, labels, class_names, ids, subsets, what: str) -> None:
        if images.ndim == 3:
            images = images[:, :, :, None]
        if images.ndim != 4 or images.shape[3] not in (1, 3) or images.dtype != np.uint8:
            raise DmuhError(f"{what}: expected (N, H, W[, 1|3]) uint8 images, got {images.dtype} {images.shape}")
        self.images = images
        self._init_common(labels, class_names, ids, subsets, images.shape[3], what)
        if len(self) != images.shape[0]:
            raise DmuhError(f"{what}: {images.shape[0]} images but {len(self)} labels")

    def read(self, i: int) -> Image.Image:
        image = self.images[i]
        return Image.fromarray(image[:, :, 0] if self.channels == 1 else image)  # uint8 -> "L" / "RGB"

    def _decode(self, indices, size, workers):
        if size is None or self.images.shape[1:3] == (size, size):
            return self.images[indices]  # fancy indexing copies
        return super()._decode(indices, size, workers)

    def _hash_content(self, digest) -> None:
        digest.update(repr(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).data)


class FeatureSource(Source):
    """Precomputed feature vectors (N, D) float32 with labels; `decode` returns the features.

    `backbone`: the record of the network that made them (a `dmuh features` file's JSON `backbone`
    key, see `dmuh.retrieval.backbone`), or None."""

    backbone = None

    def __init__(self, features, labels, class_names=None, ids=None, subsets=None, name: str = "features"):
        features = np.asarray(features)
        if features.ndim != 2 or not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
            raise DmuhError(
                f"{name}: 'features' must be an (N, D) numeric array, got {features.dtype} {features.shape}"
            )
        if features.shape[1] == 0:  # every item the same empty vector: a network would learn nothing, silently
            raise DmuhError(f"{name}: 'features' has zero columns (shape {features.shape}); each item needs a vector")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, refused below
            self.features = np.ascontiguousarray(features, dtype=np.float32)
        finite = np.isfinite(self.features).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise DmuhError(
                f"{name}: 'features' row {int(bad[0])} (counting from 0) holds NaN or Inf; "
                f"{len(bad)} of {len(finite)} rows do"
            )
        labels = np.asarray(labels)
        if labels.ndim >= 1 and labels.shape[0] != features.shape[0]:
            raise DmuhError(f"{name}: 'features' has {features.shape[0]} rows but 'labels' has {labels.shape[0]}")
        self._init_common(labels, class_names, ids, subsets, None, name)
        if len(self) != self.features.shape[0]:
            raise DmuhError(f"{name}: {self.features.shape[0]} feature rows but {len(self)} labels")

    @classmethod
    def load(cls, path: PathLike, labels: Optional[PathLike] = None, labeled: bool = True) -> "FeatureSource":
        """A .npz with an array `features` and optional `labels`, `class_names`, `ids`, `subsets`,
        or a features .npy with an optional labels .npy. Without labels (or with `labeled=False`,
        which drops them) the source is unlabeled: (N, 0) labels."""
        path = Path(path)
        if path.suffix == ".npz":
            optional_keys = ("labels", "class_names", "ids", "subsets", "backbone")
            arrays = _load_npz(path, required=("features",), optional=optional_keys)
            backbone = _backbone_record(path, arrays["backbone"]) if "backbone" in arrays else None
            optional = {}
            for key in ("class_names", "ids", "subsets"):
                if key in arrays:
                    if arrays[key].ndim != 1:
                        raise DmuhError(
                            f"{path}: key {key!r} must be a 1-D array of names, got shape {arrays[key].shape}"
                        )
                    optional[key] = arrays[key].tolist()
            if labeled and "labels" in arrays:
                _check_label_array(arrays["labels"], f"{path}: key 'labels'")
                label_array = arrays["labels"]
            else:
                optional.pop("class_names", None)
                label_array = np.zeros((arrays["features"].shape[0] if arrays["features"].ndim else 0, 0), np.uint8)
            source = cls(arrays["features"], label_array, name=str(path), **optional)
            source.backbone = backbone
            return source
        features = _load_npy(path, "features")
        if labels is not None and labeled:
            label_array = _load_npy(Path(labels), "labels")
            _check_label_array(label_array, f"{labels}")
        else:
            label_array = np.zeros((features.shape[0] if features.ndim else 0, 0), np.uint8)
        return cls(features, label_array, name=str(path))

    def read(self, i: int) -> Image.Image:
        raise DmuhError("a feature source holds feature vectors, not images")

    def _decode(self, indices, size, workers):
        if size is not None:
            raise DmuhError("size: a feature source cannot be resized (its items are feature vectors)")
        return self.features[indices]

    def _hash_content(self, digest) -> None:
        digest.update(repr(self.features.shape).encode())
        digest.update(self.features.data)


def _backbone_record(path: Path, array: np.ndarray) -> dict:
    """The JSON object of a features file's `backbone` key (a string)."""
    try:
        record = parse_json(str(array.item())) if array.ndim == 0 and array.dtype.kind == "U" else None
    except ValueError as error:
        raise DmuhError(f"{path}: key 'backbone' is not JSON ({_one_line(error)})") from None
    if not isinstance(record, dict):
        raise DmuhError(f"{path}: key 'backbone' must be a JSON object (as `dmuh features` writes it)")
    return record


_NPY_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _load_npy(path: Path, what: str) -> np.ndarray:
    """One array from a .npy file; DmuhError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as error:
        raise DmuhError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        raise DmuhError(f"{path}: cannot read {what}: not a .npy file")
    check_array_file(path, what)
    try:
        array = np.load(path, allow_pickle=False)
    except _NPY_ERRORS as error:
        raise DmuhError(f"{path}: cannot read {what} ({_one_line(error)})") from None
    if not isinstance(array, np.ndarray):  # a .npz under a .npy name
        array.close()
        raise DmuhError(f"{path}: expected one {what} array (.npy), got a .npz archive")
    return array


def _load_npz(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
    """The named arrays of a .npz, read in full; DmuhError naming the file (and key) otherwise."""
    if not path.is_file():
        raise DmuhError(f"{path}: features file not found")
    if not zipfile.is_zipfile(path):
        raise DmuhError(f"{path}: cannot read features: not a .npz archive (truncated, or not a zip file)")
    check_array_file(path, "features")
    try:
        archive = np.load(path, allow_pickle=False)
    except _NPY_ERRORS as error:
        raise DmuhError(f"{path}: cannot read features: not a readable .npz ({_one_line(error)})") from None
    if isinstance(archive, np.ndarray):
        raise DmuhError(f"{path}: expected a .npz archive of arrays {', '.join(required)}, got a single .npy array")
    with archive:
        files = list(archive.files)
        missing = [key for key in required if key not in files]
        if missing:
            raise DmuhError(f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(files) or 'none'})")
        arrays = {}
        for key in list(required) + [key for key in optional if key in files]:
            try:
                arrays[key] = archive[key]
            except _NPY_ERRORS as error:
                raise DmuhError(f"{path}: cannot read key {key!r} ({_one_line(error)})") from None
    return arrays


def _check_label_array(labels: np.ndarray, what: str) -> None:
    """Labels must be (N,) non-negative integer class indices or an (N, C) 0/1 multi-hot matrix."""
    if labels.ndim == 1:
        if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
            raise DmuhError(f"{what}: (N,) labels must be non-negative integer class indices, got {labels.dtype}")
    elif labels.ndim == 2:
        if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool) or np.iscomplexobj(labels):
            raise DmuhError(f"{what}: (N, C) labels must be a 0/1 multi-hot matrix, got {labels.dtype}")
        bad = ~np.isin(labels, (0, 1)).all(axis=1)
        if bad.any():
            raise DmuhError(f"{what}: (N, C) labels must hold only 0 and 1; row {int(np.argmax(bad))} does not")
    else:
        raise DmuhError(f"{what}: expected (N,) class indices or an (N, C) multi-hot matrix, got shape {labels.shape}")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Image files in a directory or a zip


class _FileStore:
    """Files addressed by a relative path: under a directory, or inside a zip read in place."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    @staticmethod
    def open(root: PathLike) -> "_FileStore":
        root = Path(root)
        if root.is_dir():
            return _DirectoryStore(root)
        if root.is_file() and zipfile.is_zipfile(root):
            return _ZipStore(root)
        if root.is_file():
            raise DmuhError(
                f"{root}: not a zip file (truncated, or another format); expected a directory or a .zip of images"
            )
        raise DmuhError(f"{root}: not found, or neither a directory nor a zip file")

    def describe(self, relative: str) -> str:
        """Where a file is, for messages."""
        raise NotImplementedError

    def read_bytes(self, relative: str) -> bytes:
        raise NotImplementedError

    def list_files(self) -> list:
        """[(relative posix path, size in bytes)] of all visible files."""
        raise NotImplementedError

    def list_dirs(self) -> set:
        """Relative posix paths of all visible folders (empty ones included)."""
        raise NotImplementedError


def is_hidden(relative: str) -> bool:
    # Skips macOS zip debris (__MACOSX/, ._name resource forks) and dot-files.
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.split("/"))


class _DirectoryStore(_FileStore):
    def describe(self, relative: str) -> str:
        return str(self.root / relative)

    def read_bytes(self, relative: str) -> bytes:
        try:
            return (self.root / relative).read_bytes()
        except OSError as error:
            raise DmuhError(f"{self.describe(relative)}: cannot read image ({error.strerror or error})") from None

    def list_files(self) -> list:
        files, self._dirs = [], set()
        for folder, dirnames, filenames in os.walk(self.root, followlinks=True, onerror=self._walk_error):
            dirnames[:] = [d for d in dirnames if not is_hidden(d)]
            base = Path(folder)
            if base != self.root:
                self._dirs.add(base.relative_to(self.root).as_posix())
            for filename in filenames:
                path = base / filename
                relative = path.relative_to(self.root).as_posix()
                if not is_hidden(relative):
                    try:
                        size = path.stat().st_size
                    except OSError as error:  # e.g. a dangling symlink
                        raise DmuhError(f"{path}: cannot read ({error.strerror or error})") from None
                    files.append((relative, size))
        return files

    def list_dirs(self) -> set:
        if not hasattr(self, "_dirs"):
            self.list_files()
        return set(self._dirs)

    @staticmethod
    def _walk_error(error: OSError) -> None:
        raise DmuhError(f"{error.filename}: cannot list folder ({error.strerror or error})")


class _ZipStore(_FileStore):
    """Reads members in place, without extracting.

    The member table is parsed once (that takes seconds for a large zip, so not once per thread).
    Threads share one file handle through positional reads (os.pread: no shared file position;
    a lock where the OS lacks it). Members must be stored or deflated, as `zip` and Python's
    zipfile write them.
    """

    def __init__(self, root: PathLike):
        super().__init__(root)
        try:
            with zipfile.ZipFile(self.root) as archive:
                infos = archive.infolist()
        except (OSError, zipfile.BadZipFile) as error:
            raise DmuhError(f"{self.root}: cannot open zip ({error})") from None
        self._members = {
            info.filename: (
                info.header_offset,
                info.compress_size,
                info.file_size,
                info.compress_type,
                info.flag_bits,
                info.CRC,
            )
            for info in infos
            if not info.is_dir() and not is_hidden(info.filename)
        }
        self._dirs = {info.filename.rstrip("/") for info in infos if info.is_dir() and not is_hidden(info.filename)}
        for name in self._members:  # folders a zip does not list on their own
            parts = name.split("/")[:-1]
            self._dirs.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
        self._dirs.discard("")
        self._open_handle()

    def _open_handle(self) -> None:
        self._handle = open(self.root, "rb")
        self._lock = threading.Lock()
        weakref.finalize(self, self._handle.close)

    def __getstate__(self):  # picklable for DataLoader workers: the handle is reopened there
        return {"root": self.root, "_members": self._members, "_dirs": self._dirs}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_handle()

    def _read_at(self, offset: int, size: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._handle.fileno(), size, offset)
        with self._lock:
            self._handle.seek(offset)
            return self._handle.read(size)

    def describe(self, relative: str) -> str:
        return f"{self.root}:{relative}"

    def read_bytes(self, relative: str) -> bytes:
        member = self._members.get(relative)
        if member is None:
            raise DmuhError(f"{self.describe(relative)}: no such file in the zip")
        offset, compress_size, file_size, method, flags, crc = member
        if flags & 0x1:
            raise DmuhError(f"{self.describe(relative)}: encrypted zip members are not supported")
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise DmuhError(
                f"{self.describe(relative)}: compression method {method} is not supported "
                "(re-zip with stored or deflate)"
            )
        header = self._read_at(offset, _ZIP_LOCAL_HEADER.size)
        if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise DmuhError(f"{self.describe(relative)}: corrupt zip (bad local header)")
        name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(header)[-2:]
        data = self._read_at(offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length, compress_size)
        try:
            if method == zipfile.ZIP_DEFLATED:
                data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as error:
            raise DmuhError(f"{self.describe(relative)}: corrupt zip member ({error})") from None
        if len(data) != file_size or zlib.crc32(data) != crc:
            raise DmuhError(f"{self.describe(relative)}: corrupt zip member (size or CRC mismatch)")
        return data

    def list_files(self) -> list:
        return [(name, member[2]) for name, member in self._members.items()]

    def list_dirs(self) -> set:
        return set(self._dirs)


# signature, versions, flags, method, time, date, crc, sizes, name length, extra length
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


class _FileImageSource(Source):
    """Shared reading for sources whose items are image files in a `_FileStore`."""

    store: _FileStore

    def read(self, i: int) -> Image.Image:
        relative = self.ids[i]
        try:
            data = self.store.read_bytes(relative)
        except DmuhError as error:
            raise DmuhError(f"{error}{self._listed_at(i)}") from None
        mode = "L" if self.channels == 1 else "RGB"
        try:
            image = Image.open(io.BytesIO(data))  # in-memory bytes: nothing to close
            image.load()
            return image if image.mode == mode else image.convert(mode)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise DmuhError(
                f"{self.store.describe(relative)}: cannot decode image ({_one_line(error)}){self._listed_at(i)}"
            ) from None

    def _listed_at(self, i: int) -> str:
        """Where item `i` was listed, for messages ("" for a folder tree)."""
        return ""


class ImageFolderSource(_FileImageSource):
    """An ImageFolder tree, as a directory or read in place from a .zip.

    The class of an image is the name of its parent directory; images may sit at any depth. When
    images sit one level above their class folder (`train/<class>/x.jpg`), that top-level folder
    is the item's subset. Items are sorted by path. `channels` (default 3) picks RGB or grayscale.
    A class folder with no image in it is refused unless `allow_empty_classes` (it is then ignored).

    Without labels: a folder whose images all sit at its top level (no class folders) is an
    unlabeled source, and `labeled=False` reads any tree so (every image at any depth, folder
    names ignored but for the subset). Both readings of one tree list the same items in the same
    order with the same fingerprint, so a run trained on the unlabeled reading is evaluated on
    the labeled one.
    """

    def __init__(self, path: PathLike, channels: int = 3, allow_empty_classes: bool = False, labeled: bool = True):
        if channels not in (1, 3):
            raise DmuhError(f"channels: expected 1 or 3, got {channels!r}")
        self.store = _FileStore.open(path)
        files = sorted(
            (relative, size)
            for relative, size in self.store.list_files()
            if os.path.splitext(relative)[1].lower() in IMAGE_EXTENSIONS
        )
        in_folders = [(relative, size) for relative, size in files if "/" in relative]  # class = parent folder
        if labeled and in_folders:
            files = in_folders
        elif labeled:
            labeled = False  # images, but no class folders: an unlabeled collection
        if not files:
            where = "<class>/<image> folders" if labeled else "it"
            raise DmuhError(f"{path}: no images in {where} (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
        ids = [relative for relative, _ in files]
        self._file_sizes = np.array([size for _, size in files], dtype=np.int64)
        folders = [relative.split("/")[:-1] for relative in ids]
        subsets = _split_folders(folders) if all(folders) else None
        if not labeled:
            self._init_common(np.zeros((len(ids), 0), dtype=np.uint8), [], ids, subsets, channels, str(path))
            return
        if not allow_empty_classes:
            _refuse_empty_class_folders(path, self.store.list_dirs(), folders)
        class_names = sorted({parts[-1] for parts in folders})
        class_index = {name: c for c, name in enumerate(class_names)}
        labels = np.array([class_index[parts[-1]] for parts in folders], dtype=np.int64)
        self._init_common(to_multi_hot(labels, len(class_names)), class_names, ids, subsets, channels, str(path))

    def _hash_content(self, digest) -> None:
        digest.update("\n".join(self.ids).encode())
        digest.update(self._file_sizes.tobytes())


def _refuse_empty_class_folders(path, dirs: set, folders: list) -> None:
    """A folder with no subfolder and no image, at the depth of a class folder, is a class with
    no items (an emptied or half-copied class): refuse it rather than drop the class unseen."""
    with_images = {"/".join(parts) for parts in folders}
    class_depths = {len(parts) for parts in folders}
    parents = {d.rsplit("/", 1)[0] for d in dirs if "/" in d}
    empty = sorted(d for d in dirs if d not in with_images and d not in parents and d.count("/") + 1 in class_depths)
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DmuhError(f"{path}: class folder {empty[0]!r} holds no images{more} (remove it or add images)")


def _split_folders(folders: list) -> Optional[list]:
    """The top-level split folder of each image (`train` in `[wrap/]train/<class>/x.jpg`), or None.

    Folders shared by all images (a wrapping folder) are skipped; with no split level left, or a
    split level only some images have, there are no subsets.
    """
    above_class = [parts[:-1] for parts in folders]
    shared = 0
    while all(len(parts) > shared for parts in above_class) and len({parts[shared] for parts in above_class}) == 1:
        shared += 1
    if not all(len(parts) > shared for parts in above_class):
        return None
    return [parts[shared] for parts in above_class]


CLASS_NAMES_FILE = "classes.txt"  # one class name a line, in label-column order; beside list and IDX files
_CLASS_NAMES_MAX_BYTES = 1 << 20


def sidecar_class_names(folder: Path) -> Optional[List[str]]:
    """The class names of `folder/classes.txt` (None when there is none): the names of data whose
    own files number the classes (list files' 0/1 columns, MNIST-family IDX labels)."""
    path = Path(folder) / CLASS_NAMES_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > _CLASS_NAMES_MAX_BYTES:
        raise DmuhError(f"{path}: over {_CLASS_NAMES_MAX_BYTES // 1024} KiB; expected one class name a line")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise DmuhError(f"{path}: not UTF-8 text; expected one class name a line") from None
    while names and not names[-1]:
        names.pop()
    if not names or "" in names:
        raise DmuhError(
            f"{path}: line {names.index('') + 1 if '' in names else 1} is empty; expected one class name a line"
        )
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise DmuhError(f"{path}: class name {twice[:80]!r} is given twice")
    return names


def label_text(rows: np.ndarray, class_names: Optional[Sequence[str]]) -> List[str]:
    """Multi-hot label rows as text: the class names of each row joined by ',' (class numbers where
    the data has no names)."""
    names = list(class_names) if class_names is not None else None
    return [
        ",".join(str(names[c]) if names is not None and c < len(names) else str(c) for c in np.flatnonzero(row))
        for row in np.asarray(rows)
    ]


class ListFileSource(_FileImageSource):
    """List files as HashNet and DeepHash-pytorch ship them: `relative/path.jpg 0 1 0 ...` per line.

    `list_files`: one list file, or a mapping name -> list file (e.g. train/test/database); the name
    (for a single file its stem) becomes the item's subset. Paths are relative to `root` (a directory
    or a zip); a path that leaves it (`../x.jpg`, an absolute path elsewhere; judged on the text,
    symlinks are not followed) is refused unless `allow_outside_root`. A missing image is reported
    when it is read, with the list file and line that named it.
    """

    def __init__(
        self,
        list_files: Union[PathLike, Mapping[str, PathLike]],
        root: PathLike,
        class_names: Optional[Sequence[str]] = None,
        channels: int = 3,
        allow_outside_root: bool = False,
    ):
        if channels not in (1, 3):
            raise DmuhError(f"channels: expected 1 or 3, got {channels!r}")
        named = dict(list_files) if isinstance(list_files, Mapping) else {Path(list_files).stem: list_files}
        if not named:
            raise DmuhError("list_files: no list file given")
        self.store = _FileStore.open(root)
        inside = _RootCheck(root, isinstance(self.store, _ZipStore))
        ids, rows, subsets, self._origins = [], [], [], []
        width = len(class_names) if class_names is not None else None
        for name, list_file in named.items():
            for number, path, row in _parse_list_file(Path(list_file), width):
                if not allow_outside_root and not inside(path):
                    raise DmuhError(
                        f"{list_file} line {number}: path {path!r} escapes --data-root {root}; "
                        "pass --allow-outside-root true to allow it"
                    )
                width = len(row)
                ids.append(path)
                rows.append(row)
                subsets.append(name)
                self._origins.append((str(list_file), number))
        if not ids:
            raise DmuhError(f"{', '.join(str(f) for f in named.values())}: no items in the list file(s)")
        labels = np.array(rows, dtype=np.uint8)
        if class_names is None:
            folder = Path(next(iter(named.values()))).parent
            class_names = sidecar_class_names(folder)
            if class_names is not None and len(class_names) != labels.shape[1]:
                raise DmuhError(
                    f"{folder / CLASS_NAMES_FILE}: {len(class_names)} class names for the list files' "
                    f"{labels.shape[1]} label columns"
                )
        self._init_common(labels, class_names, ids, subsets, channels, str(root))

    def _hash_content(self, digest) -> None:
        # The lists name the data; stat-ing every image would not be cheap on large sets.
        digest.update("\n".join(self.ids).encode())

    def _listed_at(self, i: int) -> str:
        origins = getattr(self, "_origins", None)
        if not origins:
            return ""
        list_file, number = origins[i]
        return f" (listed in {list_file} line {number})"


class _RootCheck:
    """Whether a list-file path stays inside the root, judged on the text (symlinks not followed)."""

    def __init__(self, root: PathLike, is_zip: bool):
        self.root = os.path.normpath(os.path.abspath(root))
        self.is_zip = is_zip

    def __call__(self, path: str) -> bool:
        if os.path.isabs(path):
            if self.is_zip:
                return False
            normal = os.path.normpath(path)
            return normal == self.root or normal.startswith(self.root.rstrip(os.sep) + os.sep)
        normal = os.path.normpath(path)
        return normal != os.pardir and not normal.startswith(os.pardir + os.sep)


def _parse_list_file(list_file: Path, width: Optional[int]):
    """Yield (line number, path, multi-hot row) per non-empty line; all rows must have `width` labels."""
    try:
        raw = list_file.read_bytes()
    except OSError as error:
        raise DmuhError(f"{list_file}: cannot read list file ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is dropped
    except UnicodeDecodeError as error:
        data = bytes(error.object)
        line = data.count(b"\n", 0, error.start) + 1
        raise DmuhError(
            f"{list_file} line {line}: not UTF-8 text (byte {data[error.start]:#04x}); save the list file as UTF-8"
        ) from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        path, values = fields[0], fields[1:]
        if width is not None and len(values) != width:
            raise DmuhError(f"{list_file} line {number}: expected {width} labels, got {len(values)}")
        if not values or any(value not in ("0", "1") for value in values):
            shown = line.strip()
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise DmuhError(f"{list_file} line {number}: expected a path then 0/1 multi-hot labels, got {shown!r}")
        width = len(values)
        yield number, path, [int(value) for value in values]


# ---------------------------------------------------------------------------------------------
# Array formats: CIFAR python batches, IDX (MNIST family), scikit-learn digits


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts without running arbitrary code from the file."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }  # bytes in protocol-2 pickles written by Python 3

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise DmuhError(f"{path}: cannot read CIFAR batch ({error.strerror or error})") from None
    except Exception as error:  # a truncated or foreign pickle fails in many ways; all mean "not a batch"
        raise DmuhError(f"{path}: cannot read CIFAR batch ({type(error).__name__}: {_one_line(error)})") from None
    if not isinstance(batch, dict):
        raise DmuhError(f"{path}: not a CIFAR batch (expected a dict)")
    return batch


class CifarBatchesSource(ArraySource):
    """The official CIFAR python batches: `data_batch_1..5` + `test_batch` (CIFAR-10, optional
    `batches.meta`), or `train` + `test` (CIFAR-100, fine labels; `coarse=True` for the 20
    superclasses, names from `meta`). Subsets "train" / "test"; ids "test_batch:17"."""

    def __init__(self, path: PathLike, coarse: bool = False):
        folder = Path(path)
        if (folder / "data_batch_1").is_file():
            batch_files = sorted(folder.glob("data_batch_[0-9]*")) + [folder / "test_batch"]
            label_key, meta_file, names_key = b"labels", folder / "batches.meta", b"label_names"
        elif (folder / "train").is_file() and (folder / "test").is_file():
            batch_files = [folder / "train", folder / "test"]
            prefix = b"coarse_" if coarse else b"fine_"
            label_key, meta_file, names_key = prefix + b"labels", folder / "meta", prefix + b"label_names"
        else:
            raise DmuhError(f"{folder}: no CIFAR batches (expected data_batch_1..5 and test_batch, or train and test)")
        images, labels, ids, subsets, label_files = [], [], [], [], []
        for batch_file in batch_files:
            if not batch_file.is_file():
                raise DmuhError(f"{batch_file}: missing CIFAR batch")
            batch = _load_cifar_pickle(batch_file)
            if b"data" not in batch or label_key not in batch:
                raise DmuhError(f"{batch_file}: expected keys b'data' and {label_key!r}")
            try:
                data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
            except (ValueError, TypeError) as error:
                raise DmuhError(
                    f"{batch_file}: b'data' or {label_key!r} is not an array ({_one_line(error)})"
                ) from None
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DmuhError(f"{batch_file}: b'data' must be (N, 3072) uint8, got {data.dtype} {data.shape}")
            if batch_labels.ndim != 1 or not (np.issubdtype(batch_labels.dtype, np.integer) or batch_labels.size == 0):
                raise DmuhError(f"{batch_file}: {label_key!r} must be a list of integer class indices")
            if batch_labels.shape != (data.shape[0],):
                raise DmuhError(f"{batch_file}: {batch_labels.shape[0]} labels for {data.shape[0]} images")
            batch_labels = batch_labels.astype(np.int64)
            if batch_labels.size and batch_labels.min() < 0:
                row = int(np.argmin(batch_labels))
                raise DmuhError(f"{batch_file}: {label_key!r} row {row} is {int(batch_labels[row])}, not a class index")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(batch_labels)
            label_files.append(batch_file)
            ids.extend(f"{batch_file.name}:{row}" for row in range(data.shape[0]))
            subsets.extend(["test" if batch_file.name.startswith("test") else "train"] * data.shape[0])
        class_names = None
        if meta_file.is_file():
            names = _load_cifar_pickle(meta_file).get(names_key, [])
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
                raise DmuhError(f"{meta_file}: {names_key!r} must be a list of class names")
            try:
                class_names = [n.decode() if isinstance(n, bytes) else n for n in names] or None
            except UnicodeDecodeError:
                raise DmuhError(f"{meta_file}: {names_key!r} holds a name that is not UTF-8") from None
        if class_names:
            for batch_file, batch_labels in zip(label_files, labels):
                if batch_labels.size and batch_labels.max() >= len(class_names):
                    row = int(np.argmax(batch_labels))
                    raise DmuhError(
                        f"{batch_file}: {label_key!r} row {row} is class {int(batch_labels[row])}, "
                        f"but {meta_file.name} names {len(class_names)} classes"
                    )
        labels = np.concatenate(labels)
        num_classes = len(class_names) if class_names else int(labels.max()) + 1
        self._init_images(
            np.ascontiguousarray(np.concatenate(images)),
            to_multi_hot(labels, num_classes, str(folder)),
            class_names,
            ids,
            subsets,
            str(folder),
        )


# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (optionally .gz): magic 0x0000, a type code, the number of dimensions, one
    big-endian int32 size per dimension, then the data."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        reason = getattr(error, "strerror", None) or _one_line(error)
        raise DmuhError(f"{path}: cannot read IDX file ({reason})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DmuhError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DmuhError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise DmuhError(
            f"{path}: IDX header says {shape} ({expected} bytes of data) but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_labels_path(images: Path) -> Path:
    """train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz] (also the `images.idx3` spelling)."""
    return images.with_name(images.name.replace("images", "labels").replace("idx3", "idx1"))


def _idx_subset(images: Path) -> str:
    """train-images-idx3-ubyte -> "train"; t10k-images.idx3-ubyte -> "t10k"."""
    name = images.name
    return name[: name.index("images")].rstrip("-._") or "images"


class IdxSource(ArraySource):
    """IDX images + labels of the MNIST family (grayscale, channels 1).

    `IdxSource(images, labels)` reads one pair (labels defaults to the matching `*-labels-idx1-ubyte`);
    `IdxSource(directory)` reads every pair in it (e.g. train + t10k). The subset of an item is the
    file-name prefix ("train", "t10k"); ids are "train-images-idx3-ubyte:17".
    """

    def __init__(self, images: PathLike, labels: Optional[PathLike] = None, class_names=None):
        images = Path(images)
        if images.is_dir():
            if labels is not None:
                raise DmuhError(f"{images}: pass a directory alone, or an images file with its labels file")
            pairs = [(path, _idx_labels_path(path)) for path in _idx_image_files(images)]
        else:
            pairs = [(images, Path(labels) if labels is not None else _idx_labels_path(images))]
        all_images, all_labels, ids, subsets = [], [], [], []
        for images_file, labels_file in pairs:
            pixels, classes = read_idx(images_file), read_idx(labels_file)
            if pixels.dtype != np.uint8 or pixels.ndim != 3:
                raise DmuhError(
                    f"{images_file}: expected (N, H, W) unsigned-byte images, got {pixels.dtype} {pixels.shape}"
                )
            if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
                raise DmuhError(
                    f"{labels_file}: expected a 1-D integer label file, got {classes.dtype} {classes.shape}"
                )
            if classes.shape[0] != pixels.shape[0]:
                raise DmuhError(
                    f"{labels_file}: {classes.shape[0]} labels but {images_file.name} holds {pixels.shape[0]} images"
                )
            if all_images and pixels.shape[1:] != all_images[0].shape[1:]:
                raise DmuhError(
                    f"{images_file}: images are {pixels.shape[1:]}, the other files' {all_images[0].shape[1:]}"
                )
            all_images.append(pixels)
            all_labels.append(classes.astype(np.int64))
            ids.extend(f"{images_file.name}:{row}" for row in range(pixels.shape[0]))
            subsets.extend([_idx_subset(images_file)] * pixels.shape[0])
        if class_names is None:
            class_names = sidecar_class_names(images if images.is_dir() else images.parent)
        _check_idx_labels([labels_file for _, labels_file in pairs], all_labels, class_names)
        labels = to_multi_hot(np.concatenate(all_labels), len(class_names) if class_names else None, str(images))
        self._init_images(np.concatenate(all_images), labels, class_names, ids, subsets, str(images))


def _check_idx_labels(files: list, labels: list, class_names) -> None:
    """Every label must be a class: below len(class_names) when given; else, with several label
    files (train + t10k), every file must reach the same highest class, as each split of the MNIST
    family holds every class (a corrupt label such as 10 among 0-9 would otherwise add a class)."""
    for labels_file, classes in zip(files, labels):
        if classes.size and classes.min() < 0:
            row = int(np.argmin(classes))
            raise DmuhError(f"{labels_file}: label {int(classes[row])} at row {row} is not a class index")
    if class_names:
        for labels_file, classes in zip(files, labels):
            if classes.size and classes.max() >= len(class_names):
                row = int(np.argmax(classes))
                raise DmuhError(
                    f"{labels_file}: label {int(classes[row])} at row {row} is out of range for "
                    f"{len(class_names)} class names (0-{len(class_names) - 1})"
                )
        return
    tops = [int(classes.max()) if classes.size else None for classes in labels]
    present = [top for top in tops if top is not None]
    if len(present) < 2 or present.count(max(present)) > 1:
        return
    highest = max(present)
    labels_file, classes = next((f, c) for f, c, top in zip(files, labels, tops) if top == highest)
    row = int(np.argmax(classes))
    below = max(top for top in present if top != highest)
    raise DmuhError(
        f"{labels_file}: label {highest} at row {row} is out of range: the other label files "
        f"hold classes 0-{below} (pass class_names if it is a class)"
    )


def _idx_image_files(folder: Path) -> list:
    files = [
        path
        for path in folder.iterdir()
        if "idx3" in path.name and "images" in path.name and not path.name.startswith(".")
    ]
    if not files:
        raise DmuhError(f"{folder}: no IDX image files (*-images-idx3-ubyte[.gz])")
    # The training set first, as MNIST is conventionally listed; then by name.
    return sorted(files, key=lambda path: (_idx_subset(path) != "train", path.name))


class DigitsSource(ArraySource):
    """scikit-learn's bundled digits: 1,797 8x8 grayscale images of 10 classes, scaled to 0..255."""

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self._init_images(
            images,
            to_multi_hot(digits.target, 10),
            [str(d) for d in range(10)],
            [f"digits:{i}" for i in range(len(images))],
            None,
            "digits",
        )


# ---------------------------------------------------------------------------------------------
# Opening a source from a spec string


def _open_list(target: str, root, **kw) -> ListFileSource:
    """ "a.txt" or "train=a.txt,test=b.txt,database=c.txt" (named lists give subsets)."""
    if root is None:
        raise DataError(
            f"data_root: {target} is a list file, and it needs root (the folder or zip its image paths are "
            "relative to)",
            field="data_root",
        )
    if "=" in target:
        named = {}
        for part in target.split(","):
            name, _, path = part.partition("=")
            if not name or not path:
                raise DmuhError(f"list:{target}: expected name=path pairs separated by commas")
            named[name.strip()] = path.strip()
        return ListFileSource(named, root, **kw)
    return ListFileSource(target, root, **kw)


def _open_folder(target: str, root, **kw) -> ImageFolderSource:
    return ImageFolderSource(target, **kw)


def _open_unlabeled(target: str, root, **kw) -> Source:
    """An image folder or .zip read without labels, or a features file with its labels dropped."""
    if Path(target).suffix.lower() == ".mat" or (Path(target).suffix.lower() == ".npz" and _is_paired(target)):
        return SOURCE_KINDS["paired"](target, root, labeled=False, **kw)
    if Path(target).suffix.lower() in (".npz", ".npy"):
        return FeatureSource.load(target, labeled=False)
    return ImageFolderSource(target, labeled=False, **kw)


def _is_paired(path) -> bool:
    """Whether a .npz holds paired data (`image` and `text`, read by `dmuh.data.paired`) rather than `features`."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return False
    return {"image", "text"} <= names and "features" not in names


def _open_cifar(target: str, root, **kw) -> CifarBatchesSource:
    return CifarBatchesSource(target, **kw)


def _open_idx(target: str, root, **kw) -> IdxSource:
    return IdxSource(target, **kw)


def _open_features(target: str, root, **kw) -> FeatureSource:
    return FeatureSource.load(target, **kw)


SOURCE_KINDS: dict = {
    "folder": _open_folder,
    "cifar-batches": _open_cifar,
    "idx": _open_idx,
    "list": _open_list,
    "features": _open_features,
    "unlabeled": _open_unlabeled,
}


def open_source(spec: str, root: Optional[PathLike] = None, allow_outside_root: bool = False, **kw) -> Source:
    """Open a data source from a spec string.

    "digits"; "KIND:TARGET" with KIND one of folder, cifar-batches, idx, list, features, unlabeled
    (an image folder, .zip or features file read without its labels), paired (images or image
    features with text: `dmuh.data.paired`); or a path:
    a directory (CIFAR batches if it holds data_batch_1 or CIFAR-100's train/test/meta, IDX files
    if it holds *idx3-ubyte*, else an ImageFolder tree), a .zip (ImageFolder), a .txt list file
    (needs `root`), a .npz of `features` + `labels` (or of `image` + `text`: paired), a .mat (paired). Extra keywords go to the source's constructor.
    `allow_outside_root` lets a list file name images outside `root` (`../x.jpg`, absolute paths).
    """
    spec = str(spec)
    if spec == "digits":
        return DigitsSource(**kw)
    kind, sep, target = spec.partition(":")
    if sep and kind in SOURCE_KINDS:
        if kind != "list" and not Path(target).exists():
            raise DmuhError(f"data source {target}: not found")
        if kind == "list":
            kw["allow_outside_root"] = allow_outside_root
        return SOURCE_KINDS[kind](target, root, **kw)
    path = Path(spec)
    if not path.exists():
        raise DmuhError(
            f"data source {spec}: not found (expected 'digits', a folder, a .zip, a .txt list file, "
            f"a .npz of features, or KIND:PATH with KIND in {', '.join(SOURCE_KINDS)})"
        )
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "data_batch_1").is_file() or all((path / name).is_file() for name in ("train", "test", "meta")):
            return CifarBatchesSource(path, **kw)
        if any(path.glob("*idx3-ubyte*")):
            return IdxSource(path, **kw)
        return ImageFolderSource(path, **kw)
    if suffix == ".zip":
        return ImageFolderSource(path, **kw)
    if suffix == ".txt":
        return _open_list(spec, root, allow_outside_root=allow_outside_root, **kw)
    if suffix == ".mat" or (suffix == ".npz" and _is_paired(path)):
        return SOURCE_KINDS["paired"](str(path), root, **kw)
    if suffix in (".npz", ".npy"):
        return FeatureSource.load(path, **kw)
    if "idx3-ubyte" in path.name:
        return IdxSource(path, **kw)
    raise DmuhError(f"data source {spec}: unknown kind of file (expected a folder, .zip, .txt, .npz, or KIND:PATH)")
