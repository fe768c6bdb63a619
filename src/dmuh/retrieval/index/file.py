"""The index file (.dmuhidx): a small checked container.

    magic      b"DMUHIDX\\n"
    prefix     header length (uint32), CRC32 of the header JSON (uint32), little-endian
    header     JSON: format "dmuh-index", version, bits, count, kind, params, meta, has_names,
               sections ({name: [offset, size]} in the payload), payload_size, payload_sha256
    payload    the sections one after another: `faiss.serialize_index_binary` bytes, the int64 ids
               and the optional names (JSON); an index of backend "milvus" (`dmuh.retrieval.index.milvus`)
               holds its codes, ids and names in a Milvus collection, which its header names

It is written atomically; reading verifies magic, format, version, the header's CRC32 and the
payload's size and sha256, and any failure is a DmuhError naming the file. Each backend
(`dmuh.retrieval.index.faiss.FaissIndex`, `dmuh.retrieval.index.milvus.MilvusIndex`) decides what its
sections hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from dmuh.errors import DmuhError
from dmuh.utils.io import atomic_path, parse_json

MAGIC = b"DMUHIDX\n"
FORMAT = "dmuh-index"
FORMAT_VERSION = 1
# magic, header length (uint32), CRC32 of the header JSON (uint32)
_PREFIX = struct.Struct("<8sII")
READ_CHUNK = 8 << 20  # bytes read (and hashed) at a time
HEADER_FIELDS = frozenset({"bits", "count", "kind", "params", "sections", "payload_size", "payload_sha256"})


def write_index_file(path: Path, header: Dict[str, Any], sections: Sequence[Tuple[str, bytes]]) -> None:
    """Write `header` (format and version included) and the named `sections` atomically (a
    temporary name, then one rename); the layout, payload size and sha256 are added to the header."""
    layout, offset = {}, 0
    digest = hashlib.sha256()  # section by section: the payload is never joined into one copy
    for name, data in sections:
        layout[name] = [offset, len(data)]
        offset += len(data)
        digest.update(data)
    header = {**header, "sections": layout, "payload_size": offset, "payload_sha256": digest.hexdigest()}
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, len(header_bytes), zlib.crc32(header_bytes)))
        f.write(header_bytes)
        for _, data in sections:
            f.write(data)


def read_index_file(path: Path, kinds: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, bytes]]:
    """The verified header and sections ({name: bytes}) of an index file whose kind is one of
    `kinds`; DmuhError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = _read_header(path, f, kinds)
            payload = _read_payload(path, f, header)
    except FileNotFoundError:
        raise DmuhError(f"{path}: index file not found") from None
    except OSError as error:
        raise DmuhError(f"{path}: cannot read index ({error.strerror or error})") from None
    sections = {name: bytes(payload[start : start + size]) for name, (start, size) in header["sections"].items()}
    return header, sections


def _read_header(path: Path, f, kinds: Sequence[str]) -> Dict[str, Any]:
    """The header at the start of the open index file, checked (magic, checksum, fields)."""
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[: len(MAGIC)] != MAGIC:
        raise DmuhError(f"{path}: not a dmuh index file (bad magic; build one with `dmuh index build`)")
    _, header_size, header_crc = _PREFIX.unpack_from(prefix)
    header_bytes = f.read(header_size)
    if len(header_bytes) != header_size:
        raise DmuhError(f"{path}: truncated index (the header is cut off)")
    if zlib.crc32(header_bytes) != header_crc:
        raise DmuhError(f"{path}: corrupted index (header checksum mismatch)")
    try:
        header = parse_json(header_bytes.decode("utf-8"))
    except ValueError:
        raise DmuhError(f"{path}: corrupted index (unreadable header)") from None
    if not isinstance(header, dict):
        raise DmuhError(f"{path}: corrupted index (its header is not a JSON object)")
    if header.get("format") != FORMAT:
        raise DmuhError(f"{path}: not a dmuh index file (format {str(header.get('format'))[:40]!r})")
    if header.get("version") != FORMAT_VERSION:
        raise DmuhError(
            f"{path}: index format version {header.get('version')!r}; this dmuh reads version {FORMAT_VERSION}"
        )
    missing = sorted(HEADER_FIELDS - set(header))
    if missing or header["kind"] not in kinds:
        raise DmuhError(f"{path}: corrupted index (header lacks {missing[0] if missing else 'a known kind'})")
    _check_header_fields(path, header)
    return header


def _read_payload(path: Path, f, header: Dict[str, Any]) -> memoryview:
    """The payload after the header, read into one buffer in chunks, each hashed as it arrives
    (one pass over the bytes, while they are in cache), checked against the header's size and sha256."""
    size = header["payload_size"]
    remaining = os.fstat(f.fileno()).st_size - f.tell()
    if remaining != size:
        state = "truncated" if remaining < size else "corrupted"
        raise DmuhError(f"{path}: {state} index (payload of {remaining} bytes, the header says {size})")
    buffer = memoryview(bytearray(size))
    digest = hashlib.sha256()
    done = 0
    while done < size:
        got = f.readinto(buffer[done : min(done + READ_CHUNK, size)])
        if not got:
            raise DmuhError(f"{path}: truncated index (payload of {done} bytes, the header says {size})")
        digest.update(buffer[done : done + got])
        done += got
    if digest.hexdigest() != header["payload_sha256"]:
        raise DmuhError(f"{path}: corrupted index (payload checksum mismatch)")
    return buffer.toreadonly()


def _is_int(value, low: int = 0, high: int = 2**63 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_header_fields(path: Path, header: Dict[str, Any]) -> None:
    """Each header field of its type and range before any is used (a header whose checksums were
    recomputed can still say anything): a one-line DmuhError naming the field otherwise."""

    def bad(field: str, expected: str) -> DmuhError:
        return DmuhError(f"{path}: corrupted index (header field {field!r} must be {expected})")

    if not _is_int(header["bits"], 1, 1 << 16):
        raise bad("bits", "an integer from 1 to 65536")
    if not _is_int(header["count"]):
        raise bad("count", "a non-negative integer")
    if not isinstance(header["kind"], str):
        raise bad("kind", "a string")
    params = header["params"]
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and _is_int(v, 1, 2**31 - 1) for k, v in params.items()
    ):
        raise bad("params", "an object of positive integers")
    if not _is_int(header["payload_size"]) or not isinstance(header["payload_sha256"], str):
        raise bad("payload_size", "a non-negative integer (with payload_sha256 a string)")
    sections = header["sections"]
    if not isinstance(sections, dict) or not all(
        isinstance(name, str)
        and isinstance(span, list)
        and len(span) == 2
        and _is_int(span[0])
        and _is_int(span[1])
        and span[0] + span[1] <= header["payload_size"]
        for name, span in sections.items()
    ):
        raise bad("sections", "an object of [offset, size] within the payload")
    for field, kind, name in (
        ("meta", dict, "an object"),
        ("backend", str, "a string"),
        ("has_names", bool, "a boolean"),
    ):
        if header.get(field) is not None and not isinstance(header[field], kind):
            raise bad(field, name)
    if header.get("next_id") is not None and not _is_int(header["next_id"], -(2**63), 2**63 - 1):
        raise bad("next_id", "a 64-bit integer")
