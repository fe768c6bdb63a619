"""The FAISS backend of the index contract (`dmuh.retrieval.index.base.CodeIndex`): FAISS binary indexes.

    from dmuh.retrieval.index import build_index, open_index
    index = build_index(codes, kind="flat")          # a FaissIndex; "ivf" (nlist, nprobe), "hnsw" (m, ef_construction,
                                                     # ef_search); backend="milvus": dmuh.retrieval.index.milvus
    index.add(more_codes, ids)
    index.remove([17, 18])
    distances, ids = index.search(query_codes, k=10)
    index.save("db.dmuhidx"); index = open_index("db.dmuhidx")   # either backend

Codes are packed uint8 rows (n, ceil(bits / 8)) as `dmuh.codes.binary.pack_bits` makes them, or
unpacked (n, bits) codes ({-1,+1}, {0,1} or bool; packed here), as numpy or torch, or a
`dmuh.codes.file.Codes`. FAISS binary indexes need whole bytes: codes whose bit length is not a
multiple of 8 are padded with zero bits, on the database and the queries alike, so the padding
never changes a distance.

Result order is defined: by Hamming distance, then by position in the index (the order codes were
added). For the flat index this is exact brute force, ties at the k-th distance included (the
nearest k by (distance, position)); by default dmuh's counting top-k kernel (`dmuh.codes.topk`)
searches it, FAISS's own IndexBinaryFlat search with `SearchParams(kernel="faiss")`, with the same
results. IVF and HNSW are approximate: they may miss true neighbours;
a query that finds fewer than k codes gets id -1 and distance -1 in the remaining slots.

Removing codes rebuilds the FAISS structure from the codes that remain (flat: a copy; ivf: the
trained lists refilled; hnsw: a new graph, as long as a build), so positions stay 0..n-1 in the
order the codes were added and nothing removed is ever found.

The file format is `dmuh.retrieval.index.file`; the re-ranking of `search_reranked` is `dmuh.retrieval.rerank`;
what the backends share is `dmuh.retrieval.index.base`. An index may carry a decoder of its codes
(`dmuh.models.decoder`, rank-preserving hashing): then `search_decoded` re-ranks the Hamming
candidates by the cosine of each query's own features to the candidates' decoded features, and
the database's original features are never needed. FAISS and pymilvus are imported lazily (on
first use), so the rest of dmuh works without either.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dmuh.codes.binary import packed_words
from dmuh.codes.topk import hamming_topk
from dmuh.errors import DmuhError
from dmuh.retrieval.index.base import (  # noqa: F401 - byte_width and _as_packed are also this module's API
    CodeIndex,
    SearchParams,
    _as_packed,
    build_inputs,
    byte_width,
    check_ids_known,
    decoder_from_sections,
    decoder_sections,
    next_id_after,
    ordered_by_distance_then_position,
    resolve_params,
    unique_ids,
)
from dmuh.retrieval.index.file import (
    FORMAT,
    FORMAT_VERSION,
    write_index_file,
)
from dmuh.retrieval.index.names import NameTable
from dmuh.retrieval.options import DEFAULT_FLAT_KERNEL, KIND_PARAMS, KINDS  # noqa: F401 - also this module's API


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - lazy: only search needs it
    except ImportError:
        raise DmuhError("searching needs FAISS: pip install faiss-cpu (or pip install 'dmuh[search]')") from None
    return faiss


def _new_faiss_index(kind: str, bits: int, params: Dict[str, int], training: Optional[np.ndarray] = None):
    """An empty FAISS binary index of `kind` (an ivf trained on `training`)."""
    faiss = _faiss()
    d = 8 * byte_width(bits)
    if kind == "flat":
        return faiss.IndexBinaryFlat(d)
    if kind == "ivf":
        # The Python wrapper keeps the quantizer alive as long as the index.
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, params["nlist"])
        index.train(training)
        index.nprobe = params["nprobe"]
        return index
    index = faiss.IndexBinaryHNSW(d, int(params["m"]))
    index.hnsw.efConstruction = int(params["ef_construction"])
    index.hnsw.efSearch = int(params["ef_search"])
    return index


class FaissIndex(CodeIndex):
    """A FAISS binary index over packed codes plus the ids (int64) and optional names (paths) of its rows."""

    backend = "faiss"

    def __init__(
        self,
        faiss_index,
        kind: str,
        bits: int,
        params: Dict[str, Any],
        ids: np.ndarray,
        names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
        next_id: Optional[int] = None,
    ):
        self.faiss_index = faiss_index
        self.kind = kind
        self.bits = bits
        self.params = params
        self.ids = np.asarray(ids, dtype=np.int64)
        # The id the next code added gets by default: past every id ever added, removed ones too.
        self.next_id = next_id_after(self.ids) if next_id is None else int(next_id)
        # the names (paths) of the rows, compact (`NameTable`), or None
        self.names = None if names is None else names if isinstance(names, NameTable) else NameTable.of(names)
        self.meta = dict(meta or {})  # where the codes came from: model identity, image size, ...
        self._database: Optional[np.ndarray] = None  # packed codes by position, for re-ranking
        self._words: Optional[np.ndarray] = None  # the same as 64-bit words (W, n), for dmuh's flat kernel
        self._database_lock = threading.Lock()  # concurrent searches fill `_database` once
        self.decoder = None  # a dmuh.models.decoder.FeatureDecoder of these codes, or None

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        codes,
        kind: str = "flat",
        *,
        bits: Optional[int] = None,
        ids=None,
        names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
        **params,
    ) -> "FaissIndex":
        """A new index of `kind` holding `codes` (ids default to 0..n-1; names to the codes' own ids).

        flat: exact. ivf: nlist (default round(sqrt(n)), at most n / 39) inverted lists trained on `codes`, nprobe
        lists visited per query (default max(1, nlist // 16)). hnsw: graph of degree m (32),
        ef_construction (64), ef_search (128). `dmuh.retrieval.index.build_index` picks the backend.
        """
        _faiss()
        if kind not in KINDS:
            raise DmuhError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        packed, bits, names, meta = build_inputs(codes, bits, names, meta)
        n = packed.shape[0]
        resolved = resolve_params(kind, KIND_PARAMS, params, n)
        index = _new_faiss_index(kind, bits, resolved, training=packed)
        built = cls(index, kind, bits, resolved, np.zeros(0, dtype=np.int64), [] if names is not None else None, meta)
        built.add(packed, ids, names)
        return built

    def add(self, codes, ids=None, names: Optional[Sequence[str]] = None) -> None:
        """Append codes; ids default to the next ids (one past the largest ever added: len(index)
        onwards for an index of default ids), so a default id is never one the index held."""
        packed, ids = self._add_inputs(codes, ids, names)
        self.faiss_index.add(packed)
        self.ids = np.concatenate([self.ids, ids])
        self.next_id = max(self.next_id, next_id_after(ids))
        if names is not None:
            self.names = (self.names or NameTable()).extended(names)
        self._database = self._words = None

    def remove(self, ids) -> int:
        """Remove every code whose id is one of `ids`; returns how many were removed. An id the
        index does not hold is an error, and then nothing is removed. The FAISS structure is
        rebuilt from the remaining codes (see the module's docstring)."""
        wanted = unique_ids(ids)
        check_ids_known(wanted, self.ids, "the index")
        keep = np.flatnonzero(~np.isin(self.ids, wanted))
        remaining = self.codes_at(keep)
        if self.kind == "ivf":  # the trained coarse quantizer stays: only the lists are refilled
            self.faiss_index.reset()
        else:
            self.faiss_index = _new_faiss_index(self.kind, self.bits, self.params)
        self.faiss_index.add(remaining)
        removed = len(self.ids) - len(keep)
        self.ids = self.ids[keep]
        if self.names is not None:
            self.names = self.names.subset(keep)
        self._database = self._words = None
        return removed

    def ids_named(self, names: Sequence[str]) -> np.ndarray:
        """The ids of the codes whose name (path) is one of `names` (every code of a repeated name)."""
        if self.names is None:
            raise DmuhError("this index holds no names (paths) of its codes; give ids")
        wanted = set(names)
        positions = self.names.positions_of(wanted)
        absent = sorted(wanted - set(self.names.take(positions)))
        if absent:
            raise DmuhError(f"name {absent[0]!r} is not in the index; nothing removed")
        return self.ids[positions]

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def has_names(self) -> bool:
        return self.names is not None

    # -- searching ------------------------------------------------------------------------------

    def _search_packed(self, packed: np.ndarray, k: int, params: SearchParams) -> Tuple[np.ndarray, np.ndarray]:
        """One FAISS search with this call's parameters (`faiss.SearchParametersIVF` / `...HNSW`; the
        index's own where `params` gives none): the FAISS object is never changed by a search."""
        if self.kind == "flat" and (params.kernel or DEFAULT_FLAT_KERNEL) == "dmuh":
            return hamming_topk(packed, self._database_words(), k, threads=params.threads)
        faiss = _faiss()
        if self.kind == "ivf":
            search_params = faiss.SearchParametersIVF(nprobe=int(params.nprobe or self.params["nprobe"]))
        elif self.kind == "hnsw":
            search_params = faiss.SearchParametersHNSW(efSearch=int(params.ef_search or self.params["ef_search"]))
        else:
            search_params = None
        distances, positions = self.faiss_index.search(packed, k, params=search_params)
        # Define the order: distance, then position (FAISS's heap order already, made explicit);
        # approximate indexes that find fewer than k leave -1 slots, which go last.
        return ordered_by_distance_then_position(distances, positions)

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """User ids of index positions (-1, no result, stays -1)."""
        positions = np.asarray(positions)
        return np.where(positions >= 0, self.ids[np.clip(positions, 0, None)], -1)

    def names_at(self, positions: np.ndarray) -> List[List[Optional[str]]]:
        if self.names is None:
            return [[None] * len(row) for row in positions]
        names = self.names
        return [[names[p] if p >= 0 else None for p in row] for row in np.asarray(positions).tolist()]

    def codes_at(self, positions: np.ndarray) -> np.ndarray:
        """Packed codes stored at index positions (any shape of non-negative positions)."""
        return self._packed_database()[np.asarray(positions)]

    def _packed_database(self) -> np.ndarray:
        """Every stored code by position, packed (n, bytes); made once per state of the index."""
        database = self._database
        if database is None:
            with self._database_lock:
                if self._database is None:
                    self._database = self._reconstruct_all()
                database = self._database
        return database

    def _database_words(self) -> np.ndarray:
        """The codes by position as `dmuh.codes.binary.packed_words` lays them out (W, n), for dmuh's
        flat kernel; made once per state of the index."""
        words = self._words
        if words is None:
            database = self._packed_database()
            with self._database_lock:
                if self._words is None:
                    self._words = packed_words(database)
                words = self._words
        return words

    def _reconstruct_all(self) -> np.ndarray:
        faiss = _faiss()
        width = self.faiss_index.code_size
        if len(self) == 0:
            return np.zeros((0, width), dtype=np.uint8)
        if self.kind == "flat":
            return faiss.vector_to_array(self.faiss_index.xb).reshape(-1, width)
        if self.kind == "ivf":
            self.faiss_index.make_direct_map()
        return self.faiss_index.reconstruct_n(0, len(self)).reshape(-1, width)

    # -- files ----------------------------------------------------------------------------------

    def info(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "backend": self.backend,
            "kind": self.kind,
            "bits": self.bits,
            "count": len(self),
            "params": dict(self.params),
            "has_names": self.names is not None,
            "meta": dict(self.meta),
            "decoder": None if self.decoder is None else self.decoder.config,
            "next_id": self.next_id,
        }

    def save(self, path, overwrite: bool = True) -> None:
        """Write the index file atomically (a temporary name, then one rename)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise DmuhError(f"{path} already exists; pass --force to replace it")
        faiss = _faiss()
        sections = [
            ("faiss", faiss.serialize_index_binary(self.faiss_index).tobytes()),
            ("ids", self.ids.astype("<i8").tobytes()),
        ]
        if self.names is not None:
            sections += self.names.sections()
        sections += decoder_sections(self.decoder)
        write_index_file(path, self.info(), sections)

    @classmethod
    def from_file(cls, path: Path, header: Dict[str, Any], sections: Dict[str, bytes]) -> "FaissIndex":
        """The index of a verified index file's header and sections (`dmuh.retrieval.index.open_index`
        reads the file and picks the backend)."""
        faiss = _faiss()
        try:
            index = faiss.deserialize_index_binary(np.frombuffer(sections["faiss"], dtype=np.uint8))
        except (RuntimeError, KeyError) as error:
            raise DmuhError(f"{path}: corrupted index (FAISS cannot read it: {str(error).splitlines()[0]})") from None
        if "ids" not in sections or len(sections["ids"]) % 8:
            raise DmuhError(f"{path}: corrupted index (its ids section is not whole 64-bit integers)")
        ids = np.frombuffer(sections["ids"], dtype="<i8").astype(np.int64)
        count, bits = header["count"], header["bits"]
        names = NameTable.from_sections(path, sections, count)
        if (names is not None) != bool(header.get("has_names", names is not None)):
            raise DmuhError(f"{path}: corrupted index (has_names does not match its names sections)")
        if index.ntotal != count or len(ids) != count or index.d != 8 * byte_width(bits):
            raise DmuhError(
                f"{path}: corrupted index (header says {count} {bits}-bit codes, "
                f"the payload holds {index.ntotal} of {index.d} bits)"
            )
        loaded = cls(
            index, header["kind"], bits, header["params"], ids, names, header.get("meta"), header.get("next_id")
        )
        loaded.decoder = decoder_from_sections(path, header, sections, bits)
        return loaded
