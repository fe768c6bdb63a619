"""Checkpoint files from which no code can run: one safetensors file, checksummed.

    save_state(path, state, kind)    a tree of dicts/lists/tuples/ints/floats/bools/None/str and tensors
    load_state(path, kind) -> dict   the same tree, or a one-line DmuhError naming the file
    file_kind(path)                  the dmuh kind of a safetensors file, None for a foreign one
    load_weights(path, kind)         a flat {name: tensor} file: a dmuh one checked, a foreign one as is

Every tensor of the tree is stored in the safetensors part, named by its path in the tree
("model/backbone.0.weight", "optimizer/state/0/momentum_buffer"; a flat state dict keeps its own
keys). The rest of the tree is JSON in the safetensors metadata (str -> str):

    format          "dmuh-checkpoint"
    dmuh.version    "1"
    dmuh.kind       what the file holds: "checkpoint" (RUN/checkpoint.safetensors), "backbone", ...
    dmuh.tree       the tree as JSON; a tensor is {"$tensor": NAME}, a tuple {"$tuple": [...]}, nan and
                    inf {"$float": "nan" | "inf" | "-inf"}, a dict with keys that are not strings (the
                    optimizer's integer parameter ids) or that start with "$" {"$dict": [[key, value], ...]};
                    other dicts are JSON objects, in their own key order (a state dict's order is kept)
    dmuh.sha256     SHA-256 over the format, version, kind, the exact tree text and every tensor
                    (name, dtype, shape, bytes) in sorted name order

Reading never unpickles anything; a file whose checksum, format, kind or version is not the
expected one is refused. Identical states give byte-identical files: no timestamps, and the
safetensors header is rewritten as JSON with sorted keys (safetensors keeps its metadata in a hash
map, in no fixed order); the tree's own dicts keep their order (`dmuh.runs.legacy.legacy_specs` reads a state
dict's first weight).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import safetensors.torch
import torch

from dmuh.errors import DmuhError, first_line
from dmuh.utils.io import atomic_path, parse_json

FORMAT = "dmuh-checkpoint"
VERSION = 1

# The metadata keys. Any one of them present marks the file as dmuh's (so one damaged key does not
# make a dmuh file pass for a foreign one).
FORMAT_KEY, VERSION_KEY, KIND_KEY, TREE_KEY, SHA_KEY = "format", "dmuh.version", "dmuh.kind", "dmuh.tree", "dmuh.sha256"
_DMUH_KEYS = (VERSION_KEY, KIND_KEY, TREE_KEY, SHA_KEY)

_TAGS = ("$tensor", "$tuple", "$float", "$dict")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_DAMAGED = "restore it from a copy or train the run again"


# -- the tree <-> JSON + tensors ------------------------------------------------------------------


class _Unstorable(Exception):
    pass


def _encode(value: Any, path: Tuple[str, ...], tensors: Dict[str, torch.Tensor]) -> Any:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise _Unstorable(f"a {value.layout} tensor at {'/'.join(path) or 'the top'}")
        name = "/".join(path) or "tensor"
        base, n = name, 1
        while name in tensors:  # paths can collide ("a/b" as one key and as two)
            name, n = f"{base}#{n}", n + 1
        # Own, contiguous CPU memory: safetensors refuses views and tensors that share storage.
        tensors[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        return {"$tensor": name}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, path + (str(i),), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, path + (str(i),), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {str(k): _encode(v, path + (str(k),), tensors) for k, v in value.items()}
        for key in value:
            if not (key is None or isinstance(key, (str, int, float, tuple))):
                raise _Unstorable(f"a dict key of type {type(key).__name__} at {'/'.join(path) or 'the top'}")
        return {
            "$dict": [
                [_encode(k, path + ("key",), {}), _encode(v, path + (str(k),), tensors)] for k, v in value.items()
            ]
        }
    raise _Unstorable(f"a {type(value).__name__} at {'/'.join(path) or 'the top'}")


def _decode(value: Any, tensors: Dict[str, torch.Tensor], used: set) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [k for k in value if k.startswith("$")]
    if not tags:
        return {k: _decode(v, tensors, used) for k, v in value.items()}
    if len(value) != 1 or tags[0] not in _TAGS:
        raise ValueError(f"unknown entry {sorted(value)[:3]}")
    tag, body = tags[0], value[tags[0]]
    if tag == "$tensor":
        if not isinstance(body, str) or body not in tensors:
            raise ValueError(f"names a tensor it does not hold ({str(body)[:80]})")
        used.add(body)
        return tensors[body]
    if tag == "$tuple":
        if not isinstance(body, list):
            raise ValueError("a tuple that is not a list")
        return tuple(_decode(v, tensors, used) for v in body)
    if tag == "$float":
        if body not in ("nan", "inf", "-inf"):
            raise ValueError(f"unknown float {str(body)[:20]}")
        return float(body)
    if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
        raise ValueError("a dict that is not a list of pairs")
    result = {}
    for key, item in body:
        key = _decode(key, {}, set())
        try:
            result[key] = _decode(item, tensors, used)
        except TypeError:  # an unhashable key
            raise ValueError(f"an unusable dict key ({str(key)[:40]})") from None
    return result


def _tree_text(tree: Any) -> str:
    return json.dumps(tree, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _checksum(kind: str, tree_text: str, tensors: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()

    def field(data: bytes) -> None:  # length-prefixed, so no two layouts hash alike
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)

    for text in (FORMAT, str(VERSION), kind, tree_text):
        field(text.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name]
        field(name.encode("utf-8"))
        field(str(tensor.dtype).encode("ascii"))
        field(json.dumps(list(tensor.shape)).encode("ascii"))
        data = _tensor_bytes(tensor)
        digest.update(struct.pack("<Q", data.nbytes))
        digest.update(data)
    return digest.hexdigest()


# -- writing --------------------------------------------------------------------------------------


def encode_state(state: dict, kind: str) -> bytes:
    """The bytes of the file `save_state` writes."""
    header, body = _encode_parts(state, kind)
    return header + bytes(body)


def _encode_parts(state: dict, kind: str, where: str = "") -> Tuple[bytes, memoryview]:
    """(length + header, tensor data) of the file, the data not copied once more."""
    tensors: Dict[str, torch.Tensor] = {}
    try:
        tree_text = _tree_text(_encode(state, (), tensors))
    except _Unstorable as error:
        raise DmuhError(
            f"{where or 'checkpoint'}: cannot store {error} in a {FORMAT} file (tensors and plain values only)"
        ) from None
    metadata = {
        FORMAT_KEY: FORMAT,
        VERSION_KEY: str(VERSION),
        KIND_KEY: kind,
        TREE_KEY: tree_text,
        SHA_KEY: _checksum(kind, tree_text, tensors),
    }
    return _canonical(safetensors.torch.save(tensors, metadata=metadata))


def _canonical(data: bytes) -> Tuple[bytes, memoryview]:
    """`data` with its safetensors header rewritten in one fixed order: safetensors keeps the
    metadata in a hash map, whose order changes from call to call. The header stays a multiple
    of 8 bytes long (padded with spaces, as safetensors pads it), so the tensor data is unmoved
    relative to it and stays aligned."""
    (size,) = struct.unpack("<Q", data[:8])
    header = parse_json(data[8 : 8 + size].decode("utf-8"))
    text = json.dumps(header, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, memoryview(data)[8 + size :]


def save_state(path, state: dict, kind: str) -> None:
    """Write `state` to `path` (temporary name, then one rename): see the module's docstring."""
    header, body = _encode_parts(state, kind, str(path))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(body)


# -- reading --------------------------------------------------------------------------------------


def _read(path: Path, limit: int = -1) -> bytes:
    if not path.is_file():
        raise DmuhError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as error:
        raise DmuhError(f"{path}: cannot read it ({error.strerror or type(error).__name__})") from None


def _header_size(path: Path, prefix: bytes, total: int) -> int:
    """The length of the JSON header from the file's first 9 bytes, or a DmuhError."""
    if total < 8:
        raise DmuhError(f"{path}: not a safetensors file ({total} bytes); a dmuh checkpoint is one")
    (size,) = struct.unpack("<Q", prefix[:8])
    if size < 2 or size > _HEADER_LIMIT or prefix[8:9] != b"{":
        raise DmuhError(f"{path}: not a safetensors file (no header); a dmuh checkpoint is one")
    if 8 + size > total:
        raise DmuhError(f"{path}: truncated ({total} bytes, its header alone needs {8 + size}); {_DAMAGED}")
    return size


def _header(path: Path, data: bytes) -> Dict[str, Any]:
    """The safetensors JSON header of `data` (the file, or its first bytes), or a DmuhError."""
    size = _header_size(path, data[:9], len(data))
    try:
        header = parse_json(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DmuhError(f"{path}: not a safetensors file (unreadable header; damaged?)") from None
    if not isinstance(header, dict):
        raise DmuhError(f"{path}: not a safetensors file (unreadable header; damaged?)")
    return header


def _metadata(path: Path, header: Dict[str, Any]) -> Dict[str, Any]:
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def _is_dmuh(metadata: Dict[str, Any]) -> bool:
    return metadata.get(FORMAT_KEY) == FORMAT or any(key in metadata for key in _DMUH_KEYS)


def file_kind(path) -> Optional[str]:
    """The `kind` a dmuh file records ("" when it is damaged), or None for a foreign safetensors file."""
    path = Path(path)
    _read(path, 0)  # exists and is readable
    try:
        with open(path, "rb") as f:
            prefix = f.read(9)
            total = path.stat().st_size
            size = _header_size(path, prefix, total)
            head = prefix + f.read(size - 1)
    except OSError as error:
        raise DmuhError(f"{path}: cannot read it ({error.strerror or type(error).__name__})") from None
    metadata = _metadata(path, _header(path, head))
    if not _is_dmuh(metadata):
        return None
    kind = metadata.get(KIND_KEY)
    return kind if isinstance(kind, str) else ""


def _tensors(path: Path, data: bytes) -> Dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as error:  # SafetensorError and friends: offsets, dtypes, sizes
        raise DmuhError(
            f"{path}: damaged or truncated safetensors data ({first_line(error, 200)}); {_DAMAGED}"
        ) from None


def load_state(path, kind: str) -> dict:
    """The tree `save_state(path, tree, kind)` wrote; a one-line DmuhError for any other file."""
    path = Path(path)
    data = _read(path)
    metadata = _metadata(path, _header(path, data))
    if not _is_dmuh(metadata):
        raise DmuhError(f"{path}: a safetensors file without dmuh metadata, not a {FORMAT} file ({kind})")
    found = {key: metadata.get(key) for key in (FORMAT_KEY, VERSION_KEY, KIND_KEY, TREE_KEY, SHA_KEY)}
    missing = [key for key, value in found.items() if not isinstance(value, str)]
    if missing:
        raise DmuhError(f"{path}: damaged {FORMAT} file (no {missing[0]} in its metadata); {_DAMAGED}")
    if found[FORMAT_KEY] != FORMAT:
        raise DmuhError(f"{path}: format {found[FORMAT_KEY][:40]!r}, expected {FORMAT!r} (damaged?)")
    if found[VERSION_KEY] != str(VERSION):
        version = found[VERSION_KEY]
        if version.isdigit() and int(version) > VERSION:
            raise DmuhError(
                f"{path}: {FORMAT} version {version} is newer than this dmuh reads ({VERSION}); upgrade dmuh"
            )
        raise DmuhError(f"{path}: unknown {FORMAT} version {version[:20]!r}, expected {VERSION} (damaged?)")
    if found[KIND_KEY] != kind:
        raise DmuhError(f"{path}: holds a {found[KIND_KEY][:40]!r} state, not a {kind!r} one")
    tensors = _tensors(path, data)
    tree_text = found[TREE_KEY]
    if _checksum(kind, tree_text, tensors) != found[SHA_KEY]:
        raise DmuhError(f"{path}: checksum mismatch (the file is damaged); {_DAMAGED}")
    try:
        used: set = set()
        state = _decode(parse_json(tree_text), tensors, used)
        if set(tensors) - used:
            raise ValueError(f"holds tensors its tree does not name ({sorted(set(tensors) - used)[0][:80]})")
    except (ValueError, RecursionError) as error:
        raise DmuhError(f"{path}: malformed {FORMAT} tree ({first_line(error, 200)})") from None
    if not isinstance(state, dict):
        raise DmuhError(f"{path}: malformed {FORMAT} tree (not a dict at the top)")
    return state


def tensor_problem(value: Any, where: str = "", finite: bool = True) -> Optional[str]:
    """What is wrong with the tensors of a decoded tree, or None: a layout other than strided (a
    sparse tensor may declare any size and take it when made dense), or (`finite`) a NaN or
    infinite value in a floating-point tensor (a network that computes NaN scores silently)."""
    pending = [(where, value)]
    while pending:
        name, node = pending.pop()
        if isinstance(node, torch.Tensor):
            if node.layout != torch.strided:
                return f"{name or 'a tensor'} is {str(node.layout).replace('torch.', '')}, not a dense tensor"
            if finite and node.is_floating_point() and not bool(torch.isfinite(node).all()):
                return f"{name or 'a tensor'} holds NaN or infinite values"
        elif isinstance(node, dict):
            pending.extend((f"{name}.{key}" if name else str(key), child) for key, child in node.items())
        elif isinstance(node, (list, tuple)):
            pending.extend((f"{name}[{i}]", child) for i, child in enumerate(node))
    return None


def load_weights(path, kind: str) -> Dict[str, torch.Tensor]:
    """A flat {name: tensor} safetensors file: a dmuh one of `kind` (checksum checked), or a foreign
    one without dmuh metadata (a torchvision state dict converted to safetensors), read as is."""
    path = Path(path)
    if file_kind(path) is not None:
        state = load_state(path, kind)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DmuhError(f"{path}: not a state dict of tensors")
        return state
    return _tensors(path, _read(path))
