"""Paired-data readers beyond .npz, registered into `dmuh.data.paired.PAIRED_READERS` on import:

    .mat              MATLAB files in the layout cross-modal hashing work distributes MIRFlickr-25K and
                      NUS-WIDE in: image features `XAll` (or images `IAll`), bag-of-words tags `YAll`,
                      0/1 labels `LAll` (other usual names too, or `image_field=` / `text_field=` /
                      `labels_field=`). MATLAB v5 (and older) files are read with scipy, v7.3 files
                      (HDF5) with h5py.
    folder, .zip      an ImageFolder tree (class folders give labels, a flat folder is unlabeled) with
                      a UTF-8 text file beside each image: `a/b.jpg` has its words in `a/b.txt`; the
                      vocabulary is fitted on all the texts (`text_weighting`, `min_df`).

Items are the first dimension of every array, as these files store them; MATLAB's own layout, items
last (`H x W x C x N` images, `C x N` labels), is recognised when only it gives every field the same
number of items.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dmuh.data.paired import (
    PAIRED_READERS,
    PairedSource,
    Vocabulary,
    check_text_matrix,
    image_part,
    no_labels,
)
from dmuh.data.sources import (
    ImageFolderSource,
    PathLike,
    _check_label_array,
    _one_line,
    _ZipStore,
)
from dmuh.errors import DmuhError

IMAGE_FIELDS = ("XAll", "IAll", "images", "image", "I")
TEXT_FIELDS = ("YAll", "text", "tags", "T", "Y")
LABEL_FIELDS = ("LAll", "labels", "L")
# MATLAB classes that hold numbers; anything else (cell, struct, char, object, function_handle, ...)
# is refused, naming the field.
NUMERIC_CLASSES = frozenset(
    {"double", "single", "logical", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "sparse"}
)
MAT_OPTIONS = ("image_field", "text_field", "labels_field")
FOLDER_OPTIONS = ("channels", "allow_empty_classes", "text_weighting", "min_df")


# ---------------------------------------------------------------------------------------------
# MATLAB .mat files


class _MatFile:
    """The variables of a .mat: `names` in file order, `classes` (MATLAB class or None), `read`."""

    names: List[str]
    classes: Dict[str, Optional[str]]

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def read(self, names: Sequence[str]) -> Dict[str, np.ndarray]:
        raise NotImplementedError


class _MatV5(_MatFile):
    """MATLAB v4 / v5 / v7 files, through scipy.io (which never unpickles anything)."""

    def __init__(self, path: Path):
        super().__init__(path)
        import scipy.io

        try:
            listing = scipy.io.whosmat(str(path))
        except NotImplementedError:  # a v7.3 header on a file h5py could not read
            raise DmuhError(
                f"{path}: a MATLAB 7.3 header but not a readable HDF5 file (damaged or truncated?)"
            ) from None
        except Exception as error:  # a foreign or truncated file fails in many ways; all mean "not a .mat"
            raise DmuhError(
                f"{path}: not a readable MATLAB .mat file ({type(error).__name__}: {_one_line(error)})"
            ) from None
        self.names = [name for name, _, _ in listing]
        self.classes = {name: cls for name, _, cls in listing}

    def read(self, names):
        import scipy.io
        import scipy.sparse

        try:
            loaded = scipy.io.loadmat(
                str(self.path), variable_names=list(names), squeeze_me=False, chars_as_strings=True
            )
        except Exception as error:
            raise DmuhError(
                f"{self.path}: cannot read {', '.join(repr(n) for n in names)} "
                f"({type(error).__name__}: {_one_line(error)})"
            ) from None
        arrays = {}
        for name in names:
            value = loaded.get(name)
            if value is None:
                raise DmuhError(f"{self.path}: field {name!r} is listed but could not be read")
            if scipy.sparse.issparse(value):
                value = value.toarray() if value.dtype == bool else value.astype(np.float32).toarray()
            arrays[name] = value
        return arrays


class _MatHdf5(_MatFile):
    """MATLAB v7.3 files: HDF5, with every array stored with its dimensions reversed."""

    def __init__(self, path: Path):
        super().__init__(path)
        import h5py

        self._h5py = h5py
        try:
            self.file = h5py.File(path, "r")
        except (OSError, ValueError) as error:
            raise DmuhError(f"{path}: not a readable MATLAB 7.3 (HDF5) file ({_one_line(error)})") from None
        self.names = [name for name in self.file.keys() if not name.startswith("#")]  # #refs#, #subsystem#
        self.classes = {name: _attr_text(self.file[name].attrs.get("MATLAB_class")) for name in self.names}

    def close(self) -> None:
        self.file.close()

    def read(self, names):
        return {name: self._read_one(name) for name in names}

    def _read_one(self, name: str) -> np.ndarray:
        item = self.file[name]
        attrs = item.attrs
        try:
            if isinstance(item, self._h5py.Group):
                if "MATLAB_sparse" in attrs:
                    return self._read_sparse(name, item, int(attrs["MATLAB_sparse"]))
                raise DmuhError(f"{self.path}: field {name!r} is a MATLAB struct (an HDF5 group), not a numeric matrix")
            if attrs.get("MATLAB_empty", 0):
                raise DmuhError(f"{self.path}: field {name!r} is empty")
            if self._h5py.check_dtype(ref=item.dtype) is not None:
                raise DmuhError(f"{self.path}: field {name!r} is a MATLAB cell array, not a numeric matrix")
            if item.dtype.names is not None:
                what = "complex" if set(item.dtype.names) == {"real", "imag"} else "compound"
                raise DmuhError(f"{self.path}: field {name!r} holds {what} numbers, not a real numeric matrix")
            return np.asarray(item).T  # h5py sees MATLAB's column-major arrays with their dimensions reversed
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise DmuhError(f"{self.path}: cannot read field {name!r} ({_one_line(error)})") from None

    def _read_sparse(self, name: str, group, rows: int) -> np.ndarray:
        """A MATLAB sparse matrix: compressed columns `data`, row indices `ir`, column starts `jc`."""
        import scipy.sparse

        jc = np.asarray(group["jc"]).ravel()
        ir = np.asarray(group["ir"]).ravel() if "ir" in group else np.zeros(0, np.int64)
        data = np.asarray(group["data"]).ravel() if "data" in group else np.zeros(0, np.float32)
        if data.dtype.names is not None:
            raise DmuhError(f"{self.path}: field {name!r} holds complex numbers, not a real numeric matrix")
        try:
            matrix = scipy.sparse.csc_matrix(
                (data.astype(np.float32), ir.astype(np.int64), jc.astype(np.int64)), shape=(rows, len(jc) - 1)
            )
        except ValueError as error:
            raise DmuhError(f"{self.path}: field {name!r} is a damaged sparse matrix ({_one_line(error)})") from None
        return matrix.toarray()


def _attr_text(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.tobytes() if value.dtype.kind == "S" else value.item()
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _open_mat(path: Path) -> _MatFile:
    try:
        with open(path, "rb") as handle:
            head = handle.read(128)
    except OSError as error:
        raise DmuhError(f"{path}: cannot read ({error.strerror or error})") from None
    import h5py

    if h5py.is_hdf5(str(path)):
        return _MatHdf5(path)
    if head.startswith(b"MATLAB 7.3"):
        raise DmuhError(f"{path}: a MATLAB 7.3 header but not a readable HDF5 file (damaged or truncated?)")
    return _MatV5(path)


def _pick_field(
    path: Path,
    names: Sequence[str],
    role: str,
    override: Optional[str],
    candidates: Sequence[str],
    required: bool = True,
) -> Optional[str]:
    present = ", ".join(names) or "none"
    if override is not None:
        if override not in names:
            raise DmuhError(f"{path}: no {role} field {override!r}; fields: {present}")
        return override
    for name in candidates:
        if name in names:
            return name
    if required:
        raise DmuhError(f"{path}: no {role} field (looked for {', '.join(candidates)}); fields: {present}")
    return None


def _check_numeric(path: Path, role: str, name: str, array: np.ndarray, dims: Tuple[int, ...]) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == object:
        raise DmuhError(f"{path}: {role} field {name!r} is a MATLAB cell array, not a numeric matrix")
    if array.dtype.names is not None:
        raise DmuhError(f"{path}: {role} field {name!r} is a MATLAB struct, not a numeric matrix")
    if array.dtype.kind in "US":
        raise DmuhError(f"{path}: {role} field {name!r} is MATLAB text (char), not a numeric matrix")
    if array.dtype.kind == "c":
        raise DmuhError(f"{path}: {role} field {name!r} holds complex numbers, not a real numeric matrix")
    if array.dtype.kind not in "biuf":
        raise DmuhError(f"{path}: {role} field {name!r} is {array.dtype}, not a numeric matrix")
    if array.size == 0:
        raise DmuhError(f"{path}: {role} field {name!r} is empty (shape {array.shape})")
    if array.ndim not in dims:
        shapes = {1: "(N,)", 2: "(N, D)", 3: "(N, H, W)", 4: "(N, H, W, C)"}
        expected = " or ".join(shapes[d] for d in dims)
        raise DmuhError(f"{path}: {role} field {name!r} has shape {array.shape}; expected {expected}")
    return array


def _items_first(path: Path, fields: List[Tuple[str, str, np.ndarray]]) -> Tuple[int, List[np.ndarray]]:
    """The item count and the arrays with items on their first axis. Items first is the layout of
    these files; when the fields disagree so but agree with items last (MATLAB's `H x W x C x N`,
    `C x N`) for some of them, those are turned round. Otherwise a one-line error with every count."""
    arrays = [array for _, _, array in fields]
    firsts = {array.shape[0] for array in arrays}
    if len(firsts) == 1:
        return firsts.pop(), arrays
    candidates = sorted({array.shape[0] for array in arrays} | {array.shape[-1] for array in arrays})
    fitting = [n for n in candidates if all(n in (array.shape[0], array.shape[-1]) for array in arrays)]
    if len(fitting) == 1:
        count = fitting[0]
        return count, [array if array.shape[0] == count else np.moveaxis(array, -1, 0) for array in arrays]
    counts = ", ".join(f"{role} field {name!r} {array.shape[0]} (shape {array.shape})" for role, name, array in fields)
    needs = "an image, a text and its labels" if len(fields) == 3 else "an image and a text"
    raise DmuhError(
        f"{path}: the fields hold different numbers of items: {counts}; "
        f"each item needs {needs} (items on the first dimension)"
    )


def _image_array(path: Path, name: str, image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:  # feature vectors: `image_part` checks them
        return image
    if image.dtype != np.uint8:
        raise DmuhError(
            f"{path}: image field {name!r} is {image.dtype} {image.shape}; images must be uint8 "
            "(N, H, W[, C]) (or give (N, D) feature vectors)"
        )
    if image.ndim == 4 and image.shape[3] not in (1, 3) and image.shape[1] in (1, 3):
        image = np.moveaxis(image, 1, -1)  # N x C x H x W -> N x H x W x C
    if image.ndim == 4 and image.shape[3] not in (1, 3):
        raise DmuhError(
            f"{path}: image field {name!r} has shape {image.shape}; expected 1 or 3 channels "
            "(N x H x W x C or N x C x H x W)"
        )
    return np.ascontiguousarray(image)


def load_paired_mat(
    path: PathLike,
    labeled: bool = True,
    image_field: Optional[str] = None,
    text_field: Optional[str] = None,
    labels_field: Optional[str] = None,
    **kw,
) -> PairedSource:
    """A MATLAB .mat (v5 or v7.3) of image features or images, bag-of-words text and 0/1 labels."""
    path = Path(path)
    if kw:
        raise DmuhError(
            f"{path}: unknown option(s) {', '.join(sorted(kw))} for a .mat (it takes {', '.join(MAT_OPTIONS)})"
        )
    with _open_mat(path) as mat:
        roles = [
            ("image", _pick_field(path, mat.names, "image", image_field, IMAGE_FIELDS)),
            ("text", _pick_field(path, mat.names, "text", text_field, TEXT_FIELDS)),
        ]
        if labeled:
            label_name = _pick_field(path, mat.names, "labels", labels_field, LABEL_FIELDS, required=False)
            if label_name is not None:
                roles.append(("labels", label_name))
        used = [name for _, name in roles]
        if len(set(used)) != len(used):
            raise DmuhError(f"{path}: one field named for two roles ({', '.join(f'{r} {n!r}' for r, n in roles)})")
        for role, name in roles:
            cls = mat.classes.get(name)
            if cls is not None and cls not in NUMERIC_CLASSES:
                raise DmuhError(f"{path}: {role} field {name!r} is a MATLAB {cls} array, not a numeric matrix")
        arrays = mat.read(used)
    dims = {"image": (2, 3, 4), "text": (2,), "labels": (1, 2)}
    fields = [(role, name, _check_numeric(path, role, name, arrays[name], dims[role])) for role, name in roles]
    count, oriented = _items_first(path, fields)
    image = _image_array(path, roles[0][1], oriented[0])
    text = check_text_matrix(oriented[1], count, f"{path}: text field {roles[1][1]!r}")
    if len(oriented) == 3:
        labels = oriented[2]
        _check_label_array(labels, f"{path}: labels field {roles[2][1]!r}")
    else:
        labels = no_labels(count)
    ids = [f"{path.name}:{row}" for row in range(count)]
    return PairedSource(
        image_part(image, labels, str(path), what=f"image field {roles[0][1]!r}", ids=ids), text, None, str(path)
    )


# ---------------------------------------------------------------------------------------------
# Image folders and zips with a text file beside each image


def text_path(image: str) -> str:
    """The text file of an image: `a/b.jpg` -> `a/b.txt`."""
    return os.path.splitext(image)[0] + ".txt"


def _read_text(store, relative: str) -> str:
    if isinstance(store, _ZipStore):
        data = store.read_bytes(relative)
    else:
        try:
            data = (store.root / relative).read_bytes()
        except OSError as error:
            raise DmuhError(f"{store.describe(relative)}: cannot read text ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is dropped
    except UnicodeDecodeError as error:
        raise DmuhError(
            f"{store.describe(relative)}: not UTF-8 text (byte {data[error.start]:#04x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None


def load_paired_folder(
    path: PathLike,
    labeled: bool = True,
    channels: int = 3,
    allow_empty_classes: bool = False,
    text_weighting: str = "binary",
    min_df: int = 1,
    **kw,
) -> PairedSource:
    """An ImageFolder tree (a folder or a .zip) with the words of `a/b.jpg` in `a/b.txt`."""
    path = Path(path)
    if kw:
        raise DmuhError(
            f"{path}: unknown option(s) {', '.join(sorted(kw))} for an image folder with texts "
            f"(it takes {', '.join(FOLDER_OPTIONS)})"
        )
    if isinstance(min_df, bool) or not isinstance(min_df, (int, np.integer)) or min_df < 1:
        raise DmuhError(f"min_df={min_df!r}: expected a whole number of texts, 1 or more")
    image = ImageFolderSource(path, channels=channels, allow_empty_classes=allow_empty_classes, labeled=labeled)
    store = image.store
    listed = {relative for relative, _ in store.list_files()}
    texts = [text_path(relative) for relative in image.ids]
    missing = [i for i, relative in enumerate(texts) if relative not in listed]
    if missing:
        first = missing[0]
        more = f"; {len(missing) - 1} more images lack theirs" if len(missing) > 1 else ""
        raise DmuhError(
            f"{store.describe(image.ids[first])}: no text file beside it "
            f"(expected {store.describe(texts[first])}){more}"
        )
    contents = [_read_text(store, relative) for relative in texts]
    try:
        vocabulary = Vocabulary.fit(contents, weighting=text_weighting, min_df=int(min_df))
    except DmuhError as error:
        raise DmuhError(f"{path}: {error}") from None
    return PairedSource(image, vocabulary.vectorize(contents), vocabulary, name=str(path))


PAIRED_READERS[".mat"] = load_paired_mat
PAIRED_READERS["folder"] = load_paired_folder
PAIRED_READERS[".zip"] = load_paired_folder
