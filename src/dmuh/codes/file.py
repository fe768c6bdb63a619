"""Codes files: the packed binary codes of a collection, with its ids, labels and the model's identity.

A codes file (`dmuh encode --out FILE`) is one uncompressed .npz:

    format           "dmuh-codes"
    meta             JSON: version, bits, count, model identity (run path, checkpoint sha256, method,
                     model name, epoch), image size and channels the images were decoded at,
                     the images spec, class names
    codes            (n, ceil(bits / 8)) uint8, packed by `dmuh.codes.binary.pack_bits` (padding bits zero)
    ids              (n,) str: the image paths (or source ids such as "digits:17")
    labels           (n, C) uint8 multi-hot, when the images have labels (class folders, list files)
    uncertainty      (n,) float32 image-level DMUH uncertainty mean_k |h_k - m_k| (Eq. 7), optional
    bit_uncertainty  (n, bits) float16 bit-level uncertainty |h_k - m_k| (Eq. 6), optional
    features         (n, D) float32 the items' own representation (`dmuh encode --features`): the
                     queries of decoder re-ranking, optional (a database needs none)

It is written atomically; a truncated or corrupted file (the zip's CRC-32 covers every array) is a
DmuhError naming the file.

A large collection is encoded in shards (`dmuh encode --shards DIR`, `dmuh.retrieval.shards`): codes
files DIR/shard-00000.npz, ... and DIR/manifest.json, JSON:

    format "dmuh-codes-manifest", version, bits, count, shard_size, model (identity), images,
    shards: [{file, count, sha256}] in item order

`Codes.load` of the manifest (or of DIR) checks every shard's size and sha256 and concatenates
them; `manifest_shards` yields them one at a time (a Milvus index takes them so, never holding all).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from dmuh.codes.binary import as_packed
from dmuh.errors import DmuhError, first_line
from dmuh.utils.io import atomic_path, atomic_write_text, check_array_file, file_sha256, parse_json, read_json_record
from dmuh.utils.words import plural

CODES_FORMAT = "dmuh-codes"
CODES_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dmuh-codes-manifest"
MANIFEST_VERSION = 1
_OPTIONAL_ARRAYS = ("labels", "uncertainty", "bit_uncertainty", "features")


@dataclass
class Codes:
    """Packed binary codes of n images, with what identifies them and the model that made them."""

    packed: np.ndarray  # (n, ceil(bits / 8)) uint8
    bits: int
    ids: List[str]
    labels: Optional[np.ndarray] = None  # (n, C) uint8 multi-hot
    class_names: Optional[List[str]] = None
    model: Dict[str, Any] = field(default_factory=dict)  # see `dmuh.retrieval.encoder.Encoder.identity`
    image_size: Optional[int] = None
    channels: Optional[int] = None
    images: Optional[str] = None  # the images spec they were encoded from
    uncertainty: Optional[np.ndarray] = None  # (n,) float32
    bit_uncertainty: Optional[np.ndarray] = None  # (n, bits) float16
    features: Optional[np.ndarray] = None  # (n, D) float32

    def __post_init__(self):
        packed, bits = as_packed(np.asarray(self.packed), int(self.bits))
        self.packed, self.bits = np.ascontiguousarray(packed, dtype=np.uint8), int(bits)
        n = self.packed.shape[0]
        self.ids = [str(i) for i in self.ids]
        if len(self.ids) != n:
            raise DmuhError(f"codes: {plural(len(self.ids), 'id')} for {plural(n, 'code')}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.uint8)
            if self.labels.ndim != 2 or self.labels.shape[0] != n:
                raise DmuhError(f"codes: labels of shape {self.labels.shape} for {n} codes")
        if self.uncertainty is not None:
            self.uncertainty = np.asarray(self.uncertainty, dtype=np.float32)
            if self.uncertainty.shape != (n,):
                raise DmuhError(f"codes: uncertainty of shape {self.uncertainty.shape} for {n} codes")
            if not (np.isfinite(self.uncertainty).all() and (self.uncertainty >= 0).all()):
                raise DmuhError("codes: uncertainty must be finite and >= 0 (a mean of |h - m|)")
        if self.bit_uncertainty is not None:
            self.bit_uncertainty = np.asarray(self.bit_uncertainty, dtype=np.float16)
            if self.bit_uncertainty.shape != (n, self.bits):
                raise DmuhError(
                    f"codes: bit uncertainty of shape {self.bit_uncertainty.shape} for {n} {self.bits}-bit codes"
                )
            if not (np.isfinite(self.bit_uncertainty).all() and (self.bit_uncertainty >= 0).all()):
                raise DmuhError("codes: bit uncertainty must be finite and >= 0 (|h - m| per bit)")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[0] != n or not np.isfinite(self.features).all():
                raise DmuhError(f"codes: features of shape {self.features.shape} for {n} codes (finite values needed)")

    def __len__(self) -> int:
        return self.packed.shape[0]

    def identity(self) -> Dict[str, Any]:
        """What an index built from these codes keeps: the model and how images were decoded."""
        return {"model": dict(self.model), "image_size": self.image_size, "channels": self.channels}

    def save(self, path, overwrite: bool = True) -> None:
        path = Path(path)
        if path.exists() and not overwrite:
            raise DmuhError(f"{path} already exists; pass --force to replace it")
        meta = {
            "version": CODES_VERSION,
            "bits": self.bits,
            "count": len(self),
            "model": self.model,
            "image_size": self.image_size,
            "channels": self.channels,
            "images": self.images,
            "class_names": self.class_names,
        }
        arrays = {
            "format": np.array(CODES_FORMAT),
            "meta": np.array(json.dumps(meta)),
            "codes": self.packed,
            "ids": np.array(self.ids, dtype=str),
        }
        for name in ("labels", "uncertainty", "bit_uncertainty", "features"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> "Codes":
        """A codes file, or every shard of a manifest (manifest.json or its folder) concatenated."""
        path = Path(path)
        if is_manifest(path):
            return concatenate(list(manifest_shards(path)))
        if not path.is_file():
            raise DmuhError(f"{path}: codes file not found")
        check_array_file(
            path, "codes file", "truncated or corrupted"
        )  # no member inflating beyond what the file justifies
        try:
            with np.load(path, allow_pickle=False) as f:
                if "format" not in f.files or str(f["format"]) != CODES_FORMAT:
                    raise DmuhError(f"{path}: not a dmuh codes file (write one with `dmuh encode`)")
                arrays = {name: f[name] for name in f.files}  # reading checks each member's CRC-32
        except DmuhError:
            raise
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            raise DmuhError(f"{path}: truncated or corrupted codes file ({first_line(error)})") from None
        try:
            meta = parse_json(str(arrays["meta"]))
        except (KeyError, ValueError):
            raise DmuhError(f"{path}: corrupted codes file (no readable meta)") from None
        meta = checked_meta(path, meta)
        if "codes" not in arrays or "ids" not in arrays:
            raise DmuhError(f"{path}: corrupted codes file (missing codes or ids)")
        checked_arrays(path, arrays)
        if arrays["codes"].shape[0] != meta.get("count"):
            raise DmuhError(
                f"{path}: corrupted codes file (meta says {meta.get('count')} codes, holds {arrays['codes'].shape[0]})"
            )
        try:
            return cls(
                arrays["codes"],
                meta["bits"],
                arrays["ids"].tolist(),
                labels=arrays.get("labels"),
                class_names=meta.get("class_names"),
                model=meta.get("model") or {},
                image_size=meta.get("image_size"),
                channels=meta.get("channels"),
                images=meta.get("images"),
                uncertainty=arrays.get("uncertainty"),
                bit_uncertainty=arrays.get("bit_uncertainty"),
                features=arrays.get("features"),
            )
        except DmuhError as error:
            raise DmuhError(f"{path}: {error}") from None


# The type of each field of a codes file's meta (None allowed where the second item says so).
_META_FIELDS = {
    "bits": (int, False),
    "count": (int, False),
    "model": (dict, True),
    "image_size": (int, True),
    "channels": (int, True),
    "images": (str, True),
    "class_names": (list, True),
}
MAX_BITS = 1 << 16


def checked_meta(path, meta) -> Dict[str, Any]:
    """A codes file's meta, every field of its type and range before any is used; a one-line
    DmuhError naming the file and field otherwise."""
    if not isinstance(meta, dict):
        raise DmuhError(f"{path}: corrupted codes file (its meta is not a JSON object)")
    if meta.get("version") != CODES_VERSION:
        shown = repr(meta.get("version"))[:20]
        raise DmuhError(f"{path}: codes format version {shown}; this dmuh reads version {CODES_VERSION}")
    for name, (kind, optional) in _META_FIELDS.items():
        value = meta.get(name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise DmuhError(f"{path}: corrupted codes file (meta field {name!r} must be {kind.__name__})")
    if not 1 <= meta["bits"] <= MAX_BITS or meta["count"] < 0:
        raise DmuhError(
            f"{path}: corrupted codes file (meta bits {meta['bits']} or count {meta['count']} out of range)"
        )
    for name in ("image_size", "channels"):
        if meta.get(name) is not None and not 1 <= meta[name] <= 1 << 16:
            raise DmuhError(f"{path}: corrupted codes file (meta field {name!r} out of range)")
    if meta.get("class_names") is not None and not all(isinstance(c, str) for c in meta["class_names"]):
        raise DmuhError(f"{path}: corrupted codes file (meta field 'class_names' must be a list of strings)")
    return meta


def checked_arrays(path, arrays: Dict[str, np.ndarray]) -> None:
    """The arrays of a codes file, of their dimensions and kinds: codes (n, bytes) unsigned bytes,
    ids (n,) text or integers, the optional ones numbers."""
    codes, ids = arrays["codes"], arrays["ids"]
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise DmuhError(
            f"{path}: corrupted codes file (codes must be an (n, bytes) uint8 array, got {codes.dtype} {codes.shape})"
        )
    if ids.ndim != 1 or ids.dtype.kind not in "UiuS":
        raise DmuhError(
            f"{path}: corrupted codes file (ids must be a 1-D array of paths or integers, got {ids.dtype} {ids.shape})"
        )
    for name in _OPTIONAL_ARRAYS:
        if name in arrays and arrays[name].dtype.kind not in "fiub":
            raise DmuhError(f"{path}: corrupted codes file ({name} must be numbers, got {arrays[name].dtype})")


# -- shards and their manifest ----------------------------------------------------------------


def is_manifest(path) -> bool:
    """Whether `path` names a manifest: a .json file, or a folder (which holds manifest.json)."""
    path = Path(path)
    return path.suffix.lower() == ".json" or path.is_dir()


def concatenate(parts: Sequence[Codes]) -> Codes:
    """The codes of `parts` one after another (the first part's model, image size and class names);
    an optional array is kept when every part has it."""
    if not parts:
        raise DmuhError("codes: nothing to concatenate")
    first = parts[0]
    optional = {}
    for name in _OPTIONAL_ARRAYS:
        arrays = [getattr(part, name) for part in parts]
        optional[name] = np.concatenate(arrays) if all(a is not None for a in arrays) else None
    return Codes(
        np.concatenate([part.packed for part in parts]),
        first.bits,
        [i for part in parts for i in part.ids],
        class_names=first.class_names if optional["labels"] is not None else None,
        model=dict(first.model),
        image_size=first.image_size,
        channels=first.channels,
        images=first.images,
        **optional,
    )


def write_manifest(
    folder, shards: List[Dict[str, Any]], bits: int, shard_size: int, model: Dict[str, Any], images: Optional[str]
) -> Path:
    """DIR/manifest.json (atomically) for `shards`: [{file, count, sha256}] in item order."""
    folder = Path(folder)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "bits": int(bits),
        "count": int(sum(shard["count"] for shard in shards)),
        "shard_size": int(shard_size),
        "model": model,
        "images": images,
        "shards": shards,
    }
    path = folder / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(path) -> Dict[str, Any]:
    """The checked manifest of `path` (manifest.json, or a folder holding one), with "folder"."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    manifest = read_json_record(
        path,
        MANIFEST_FORMAT,
        MANIFEST_VERSION,
        "codes manifest",
        missing="`dmuh encode --shards` writes it when every shard is done",
    )
    shards = manifest.get("shards")
    if (
        not isinstance(shards, list)
        or not shards
        or not isinstance(manifest.get("bits"), int)
        or not all(_shard_entry(shard) for shard in shards)
    ):
        raise DmuhError(f"{path}: corrupted manifest (its shards list is missing or malformed)")
    if sum(int(shard["count"]) for shard in shards) != manifest.get("count"):
        raise DmuhError(f"{path}: corrupted manifest (the shards' counts do not add up to its count)")
    return {**manifest, "folder": path.parent, "path": path}


def _shard_entry(shard) -> bool:
    """Whether a manifest's shard entry is {file (a name in the manifest's folder), count, sha256}."""
    return (
        isinstance(shard, dict)
        and isinstance(shard.get("file"), str)
        and Path(shard["file"]).name == shard["file"]
        and isinstance(shard.get("count"), int)
        and shard["count"] > 0
        and isinstance(shard.get("sha256"), str)
    )


def manifest_shards(path) -> Iterator[Codes]:
    """The shards of a manifest, in order, each checked (sha256, count, bits, model)."""
    manifest = read_manifest(path)
    where = manifest["path"]
    expected_model = (manifest.get("model") or {}).get("checkpoint_sha256")
    for shard in manifest["shards"]:
        shard_path = manifest["folder"] / shard["file"]
        if not shard_path.is_file():
            raise DmuhError(f"{where}: shard {shard_path} is missing")
        if file_sha256(shard_path) != shard["sha256"]:
            raise DmuhError(f"{where}: shard {shard_path} changed since the manifest was written (sha256 mismatch)")
        codes = Codes.load(shard_path)
        if (
            len(codes) != shard["count"]
            or codes.bits != manifest["bits"]
            or codes.model.get("checkpoint_sha256") != expected_model
        ):
            raise DmuhError(
                f"{where}: shard {shard_path} holds {len(codes)} {codes.bits}-bit codes of another "
                f"encode than the manifest lists ({shard['count']} {manifest['bits']}-bit codes)"
            )
        yield codes
