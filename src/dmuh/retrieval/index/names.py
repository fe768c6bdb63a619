"""The names (paths) of an index's codes in a compact form: one UTF-8 blob and the offsets of its
names, as two index-file sections. Opening an index of a million names parses nothing and makes no
string objects; a name becomes a `str` only when a result asks for it (`take`, `[i]`).

Older index files hold the names as one JSON list (section "names"); they still load (`from_sections`).
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dmuh.errors import DmuhError
from dmuh.utils.io import parse_json

SECTIONS = ("name_offsets", "name_bytes")
LEGACY_SECTION = "names"


class NameTable(Sequence[str]):
    """An immutable sequence of strings: `blob[offsets[i]:offsets[i + 1]]` is name i in UTF-8."""

    def __init__(self, blob: bytes = b"", offsets: Optional[np.ndarray] = None):
        self.blob = bytes(blob)
        self.offsets = np.zeros(1, dtype=np.int64) if offsets is None else np.asarray(offsets, dtype=np.int64)

    @classmethod
    def of(cls, names: Iterable[str]) -> "NameTable":
        encoded = [str(name).encode("utf-8") for name in names]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"name {i} of {len(self)}")
        return self.blob[self.offsets[i] : self.offsets[i + 1]].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        blob, offsets = self.blob, self.offsets.tolist()
        return (blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1))

    def __eq__(self, other) -> bool:
        if isinstance(other, NameTable):
            return self.blob == other.blob and np.array_equal(self.offsets, other.offsets)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # mutable-looking equality: not a dict key

    def __repr__(self) -> str:
        return f"NameTable({len(self)} names)"

    def take(self, positions: Iterable[int]) -> List[str]:
        """The names at `positions` (ints in range), as strings."""
        blob, offsets = self.blob, self.offsets
        return [blob[offsets[p] : offsets[p + 1]].decode("utf-8") for p in positions]

    def subset(self, positions: Sequence[int]) -> "NameTable":
        """A table of the names at `positions`, in that order, without decoding them."""
        positions = np.asarray(positions, dtype=np.int64)
        starts, ends = self.offsets[positions], self.offsets[positions + 1]
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        blob = self.blob
        return NameTable(b"".join(blob[s:e] for s, e in zip(starts.tolist(), ends.tolist())), offsets)

    def extended(self, names: Iterable[str]) -> "NameTable":
        """This table followed by `names`."""
        more = names if isinstance(names, NameTable) else NameTable.of(names)
        return NameTable(self.blob + more.blob, np.concatenate([self.offsets, more.offsets[1:] + len(self.blob)]))

    def positions_of(self, wanted: Iterable[str]) -> np.ndarray:
        """Positions of the names that are in `wanted` (every position of a repeated name)."""
        targets = {str(name).encode("utf-8") for name in wanted}
        blob, offsets = self.blob, self.offsets.tolist()
        return np.array(
            [i for i in range(len(offsets) - 1) if blob[offsets[i] : offsets[i + 1]] in targets], dtype=np.int64
        )

    def sections(self) -> List[Tuple[str, bytes]]:
        """The index-file sections that hold the table."""
        return [(SECTIONS[0], self.offsets.astype("<i8").tobytes()), (SECTIONS[1], self.blob)]

    @classmethod
    def from_sections(cls, path, sections, count: int) -> Optional["NameTable"]:
        """The table an index file holds (None when it holds no names), checked against its `count`
        of codes; a one-line DmuhError naming the file otherwise."""
        if LEGACY_SECTION in sections:
            try:
                names = parse_json(bytes(sections[LEGACY_SECTION]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise DmuhError(f"{path}: corrupted index (its names section is not JSON)") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DmuhError(f"{path}: corrupted index (its names section must be a list of strings)")
            table = cls.of(names)
        elif all(name in sections for name in SECTIONS):
            raw, blob = sections[SECTIONS[0]], sections[SECTIONS[1]]
            if len(raw) % 8:
                raise DmuhError(f"{path}: corrupted index (its name offsets are not whole 64-bit integers)")
            offsets = np.frombuffer(raw, dtype="<i8").astype(np.int64)
            if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
                raise DmuhError(f"{path}: corrupted index (its name offsets do not cut its names section)")
            table = cls(bytes(blob), offsets)
            # Every name valid UTF-8: the whole blob decodes, and no cut falls inside a character
            # (on a continuation byte, 10xxxxxx).
            cuts = offsets[:-1][offsets[:-1] < len(blob)]
            try:
                table.blob.decode("utf-8")
                if np.any((np.frombuffer(table.blob, dtype=np.uint8)[cuts] & 0xC0) == 0x80):
                    raise UnicodeDecodeError("utf-8", b"", 0, 1, "a cut inside a character")
            except UnicodeDecodeError:
                raise DmuhError(f"{path}: corrupted index (its names are not UTF-8)") from None
        elif any(name in sections for name in SECTIONS):
            raise DmuhError(f"{path}: corrupted index (it holds only one of its two names sections)")
        else:
            return None
        if len(table) != count:
            raise DmuhError(f"{path}: corrupted index ({len(table)} names for {count} codes)")
        return table
