"""Search binary codes: FAISS binary indexes behind a small API.

    index = Index.build(codes, kind="flat")          # or "ivf" (nlist, nprobe), "hnsw" (m, ef_construction, ef_search)
    index.add(more_codes, ids)
    distances, ids = index.search(query_codes, k=10)
    index.save("db.dmuhidx"); index = Index.load("db.dmuhidx")

Codes are packed uint8 rows (n, ceil(bits / 8)) as `dmuh.codes.pack_bits` makes them, or
unpacked (n, bits) codes ({-1,+1}, {0,1} or bool; packed here), as numpy or torch, or a
`dmuh.codes_file.Codes`. FAISS binary indexes need whole bytes: codes whose bit length is not a
multiple of 8 are padded with zero bits, on the database and the queries alike, so the padding
never changes a distance.

Result order is defined: by Hamming distance, then by position in the index (the order codes were
added). For the flat index this is exact brute force, ties at the k-th distance included (the
nearest k by (distance, position)). IVF and HNSW are approximate: they may miss true neighbours;
a query that finds fewer than k codes gets id -1 and distance -1 in the remaining slots.

The file format is `dmuh.index_file`; the re-ranking of `Index.search_reranked` is `dmuh.rerank`.
An index may carry a decoder of its codes (`dmuh.decoder`, rank-preserving hashing): then
`Index.search_decoded` re-ranks the Hamming candidates by the cosine of each query's own features
to the candidates' decoded features, and the database's original features are never needed.
FAISS is imported lazily (on first use), so the rest of dmuh works without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dmuh.codes import as_packed
from dmuh.decoder import FeatureDecoder
from dmuh.errors import DmuhError
from dmuh.index_file import FORMAT, FORMAT_VERSION, read_index_file, write_index_file
from dmuh.rerank import DEFAULT_RERANK_DEPTH, DEFAULT_TAU, rerank
from dmuh.text import plural

KINDS = ("flat", "ivf", "hnsw")
_DECODE_CHUNK = 64  # queries whose candidates' decoded features are held at once (decoder re-ranking)
# Build/search parameters each kind accepts, with defaults (None: derived from the data).
KIND_PARAMS: Dict[str, Dict[str, Optional[int]]] = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": None},
    "hnsw": {"m": 32, "ef_construction": 64, "ef_search": 128},
}


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - lazy: only search needs it
    except ImportError:
        raise DmuhError("searching needs FAISS: pip install faiss-cpu (or pip install 'dmuh[search]')") from None
    return faiss


def byte_width(bits: int) -> int:
    return (int(bits) + 7) // 8


def _as_packed(codes, bits: Optional[int] = None, what: str = "codes") -> Tuple[np.ndarray, int]:
    """Codes as an index takes them -> ((n, ceil(bits / 8)) contiguous uint8 numpy array, bits).

    `dmuh.codes.as_packed`'s forms, as numpy or torch (moved to the CPU), a single 1-D code, or a
    `dmuh.codes_file.Codes`, which brings its bits.
    """
    if hasattr(codes, "packed") and hasattr(codes, "bits"):  # dmuh.codes_file.Codes
        if bits is not None and int(bits) != codes.bits:
            raise DmuhError(f"{what}: has {codes.bits} bits but bits={bits}")
        codes, bits = codes.packed, codes.bits
    if hasattr(codes, "detach"):  # torch tensor
        codes = codes.detach().cpu().numpy()
    array = np.asarray(codes)
    if array.ndim == 1:
        array = array[None, :]
    packed, bits = as_packed(array, None if bits is None else int(bits), what)
    return np.ascontiguousarray(packed, dtype=np.uint8), int(bits)


class Index:
    """A FAISS binary index over packed codes plus the ids (int64) and optional names (paths) of its rows."""

    def __init__(self, faiss_index, kind: str, bits: int, params: Dict[str, Any], ids: np.ndarray,
                 names: Optional[List[str]] = None, meta: Optional[Dict[str, Any]] = None):
        self.faiss_index = faiss_index
        self.kind = kind
        self.bits = bits
        self.params = params
        self.ids = np.asarray(ids, dtype=np.int64)
        self.names = names
        self.meta = dict(meta or {})  # where the codes came from: model identity, image size, ...
        self._database: Optional[np.ndarray] = None  # packed codes by position, for re-ranking
        self.decoder = None  # a dmuh.decoder.FeatureDecoder of these codes, or None

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def build(cls, codes, kind: str = "flat", *, bits: Optional[int] = None, ids=None,
              names: Optional[Sequence[str]] = None, meta: Optional[Dict[str, Any]] = None, **params) -> "Index":
        """A new index of `kind` holding `codes` (ids default to 0..n-1; names to the codes' own ids).

        flat: exact. ivf: nlist (default round(sqrt(n)), at most n / 39) inverted lists trained on `codes`, nprobe
        lists visited per query (default max(1, nlist // 16)). hnsw: graph of degree m (32),
        ef_construction (64), ef_search (128).
        """
        faiss = _faiss()
        if kind not in KINDS:
            raise DmuhError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        unknown = sorted(set(params) - set(KIND_PARAMS[kind]))
        if unknown:
            accepted = ", ".join(KIND_PARAMS[kind]) or "none"
            raise DmuhError(f"index kind {kind!r} has no parameter {unknown[0]!r} (it takes: {accepted})")
        packed, bits = _as_packed(codes, bits)
        if names is None and hasattr(codes, "ids"):
            names = list(codes.ids)
        if meta is None and hasattr(codes, "identity"):
            meta = codes.identity()
        n = packed.shape[0]
        if n == 0:
            raise DmuhError("cannot build an index from zero codes")
        for key, value in params.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise DmuhError(f"index parameter {key}={value!r}: expected a positive integer")
        resolved = {k: (params.get(k) if params.get(k) is not None else default) for k, default in KIND_PARAMS[kind].items()}
        d = 8 * byte_width(bits)
        if kind == "flat":
            index = faiss.IndexBinaryFlat(d)
        elif kind == "ivf":
            # sqrt(n) lists, at most n / 39 (FAISS's k-means wants >= 39 training points per list).
            nlist = resolved["nlist"] or max(1, min(int(round(math.sqrt(n))), n // 39))
            if nlist > n:
                raise DmuhError(f"index parameter nlist={nlist}: more lists than the {plural(n, 'code')} to train them on")
            resolved["nlist"] = int(nlist)
            resolved["nprobe"] = int(min(resolved["nprobe"] or max(1, nlist // 16), nlist))
            # The Python wrapper keeps the quantizer alive as long as the index.
            index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, resolved["nlist"])
            index.train(packed)
            index.nprobe = resolved["nprobe"]
        else:
            index = faiss.IndexBinaryHNSW(d, int(resolved["m"]))
            index.hnsw.efConstruction = int(resolved["ef_construction"])
            index.hnsw.efSearch = int(resolved["ef_search"])
        built = cls(index, kind, bits, {k: int(v) for k, v in resolved.items()}, np.zeros(0, dtype=np.int64),
                    [] if names is not None else None, meta)
        built.add(packed, ids, names)
        return built

    def add(self, codes, ids=None, names: Optional[Sequence[str]] = None) -> None:
        """Append codes; ids default to the next positions (len(index), ...)."""
        packed, _ = _as_packed(codes, self.bits)
        n = packed.shape[0]
        if ids is None:
            ids = np.arange(len(self), len(self) + n, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (n,) or not (np.issubdtype(ids.dtype, np.integer) or n == 0):
            raise DmuhError(f"ids: expected {n} integers, one per code, got shape {ids.shape} dtype {ids.dtype}")
        if names is not None and len(names) != n:
            raise DmuhError(f"names: {plural(len(names), 'name')} for {plural(n, 'code')}")
        if (self.names is None) != (names is None) and len(self):
            raise DmuhError("names: give names for every batch of codes added, or for none")
        self.faiss_index.add(packed)
        self.ids = np.concatenate([self.ids, ids.astype(np.int64)])
        if names is not None:
            self.names = (self.names or []) + [str(name) for name in names]
        self._database = None

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, bits={self.bits}, count={len(self)}, params={self.params})"

    # -- searching ------------------------------------------------------------------------------

    def search(self, query_codes, k: int, *, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query: (distances int32 (nq, k), ids int64 (nq, k))."""
        distances, positions = self.search_positions(query_codes, k, nprobe=nprobe, ef_search=ef_search)
        return distances, self.ids_at(positions)

    def search_positions(self, query_codes, k: int, *, nprobe: Optional[int] = None,
                         ef_search: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Like `search`, with positions in the index (-1: no result) instead of ids."""
        packed, _ = _as_packed(query_codes, self.bits, what="query codes")
        self._check_k(k)
        self._set_search_params(nprobe, ef_search)
        distances, positions = self.faiss_index.search(packed, int(k))
        distances = distances.astype(np.int32, copy=False)
        missing = positions < 0
        if missing.any():  # approximate indexes: fewer than k found
            distances[missing] = np.iinfo(np.int32).max
        # Define the order: distance, then position (FAISS's heap order already, made explicit).
        order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, positions), distances), axis=1)
        distances = np.take_along_axis(distances, order, axis=1)
        positions = np.take_along_axis(positions, order, axis=1)
        distances[positions < 0] = -1
        return distances, positions

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """User ids of index positions (-1, no result, stays -1)."""
        positions = np.asarray(positions)
        return np.where(positions >= 0, self.ids[np.clip(positions, 0, None)], -1)

    def names_at(self, positions: np.ndarray) -> List[List[Optional[str]]]:
        if self.names is None:
            return [[None] * len(row) for row in positions]
        return [[self.names[p] if p >= 0 else None for p in row] for row in positions]

    def codes_at(self, positions: np.ndarray) -> np.ndarray:
        """Packed codes stored at index positions (any shape of non-negative positions)."""
        if self._database is None:
            self._database = self._reconstruct_all()
        return self._database[np.asarray(positions)]

    def _reconstruct_all(self) -> np.ndarray:
        faiss = _faiss()
        width = self.faiss_index.code_size
        if self.kind == "flat":
            return faiss.vector_to_array(self.faiss_index.xb).reshape(-1, width)
        if self.kind == "ivf":
            self.faiss_index.make_direct_map()
        return self.faiss_index.reconstruct_n(0, len(self)).reshape(-1, width)

    def search_reranked(self, query_codes, bit_uncertainty, k: int, *, depth: int = DEFAULT_RERANK_DEPTH,
                        tau: float = DEFAULT_TAU, nprobe: Optional[int] = None,
                        ef_search: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Uncertainty-aware search: the top `depth` codes by Hamming distance, re-ranked by the
        weighted Hamming distance of `rerank` (see there); keeps the k best.

        Returns {"weighted": float32 (nq, k), "distances": int32 Hamming (nq, k), "ids": int64,
        "positions": int64}.
        """
        packed, _ = _as_packed(query_codes, self.bits, what="query codes")
        self._check_k(k)
        depth = min(max(int(depth), int(k)), len(self))
        distances, positions = self.search_positions(packed, depth, nprobe=nprobe, ef_search=ef_search)
        uncertainty = np.asarray(bit_uncertainty, dtype=np.float32)
        if uncertainty.shape != (packed.shape[0], self.bits):
            raise DmuhError(f"bit uncertainty: expected shape {(packed.shape[0], self.bits)}, got {uncertainty.shape}")
        order, weighted = rerank(packed, uncertainty, self.codes_at(np.clip(positions, 0, None)), positions, self.bits, tau)
        return self._reordered(order[:, :k], positions, weighted=weighted, distances=distances)

    def attach_decoder(self, decoder) -> None:
        """Keep a `dmuh.decoder.FeatureDecoder` of these codes with the index (and in its file)."""
        if decoder.bits != self.bits:
            raise DmuhError(f"decoder: reads {decoder.bits}-bit codes, the index holds {self.bits}-bit codes")
        self.decoder = decoder.cpu().eval()

    def search_decoded(self, query_codes, query_features, k: int, *, depth: int = DEFAULT_RERANK_DEPTH,
                       nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Rank-preserving hashing's search: the top `depth` codes by Hamming distance (the graph
        search of an hnsw index, or any kind), re-ranked by the cosine of each query's features
        (nq, D) to the candidates' features decoded from their codes; keeps the k best. Ties go
        by Hamming distance, then position.

        Returns {"cosine": float32 (nq, k), "distances": int32 Hamming, "ids": int64, "positions": int64}.
        """
        if self.decoder is None:
            raise DmuhError("this index holds no decoder; build it from the codes of a run that trains one "
                            "(e.g. --method rph)")
        packed, _ = _as_packed(query_codes, self.bits, what="query codes")
        features = np.asarray(query_features, dtype=np.float32)
        if features.shape != (packed.shape[0], self.decoder.dim) or not np.isfinite(features).all():
            raise DmuhError(f"query features: expected {packed.shape[0]} finite rows of {self.decoder.dim} values, "
                            f"got shape {features.shape}")
        self._check_k(k)
        depth = min(max(int(depth), int(k)), len(self))
        distances, positions = self.search_positions(packed, depth, nprobe=nprobe, ef_search=ef_search)
        found = positions >= 0
        unique, inverse = np.unique(positions[found], return_inverse=True)
        decoded = self.decoder.decode_packed(self.codes_at(unique))  # each candidate decoded once
        slot = np.zeros(positions.shape, dtype=np.int64)
        slot[found] = inverse  # row of `decoded` per candidate
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        queries = features / np.where(norms > 0, norms, 1)
        cosine = np.empty(positions.shape, dtype=np.float32)
        for start in range(0, len(queries), _DECODE_CHUNK):  # bounds the (chunk, depth, D) temporary
            rows = slice(start, start + _DECODE_CHUNK)
            cosine[rows] = np.einsum("nrd,nd->nr", decoded[slot[rows]], queries[rows])
        cosine[~found] = -np.inf
        order = np.lexsort((np.where(found, positions, np.iinfo(np.int64).max), distances, -cosine), axis=1)[:, :k]
        return self._reordered(order, positions, cosine=cosine, distances=distances)

    def _reordered(self, order: np.ndarray, positions: np.ndarray, **columns: np.ndarray) -> Dict[str, np.ndarray]:
        """A re-ranked result: each of `columns` and the positions taken in `order`, plus the ids."""
        result = {name: np.take_along_axis(values, order, axis=1) for name, values in columns.items()}
        result["positions"] = np.take_along_axis(positions, order, axis=1)
        result["ids"] = self.ids_at(result["positions"])
        return result

    def _check_k(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DmuhError(f"k={k!r}: expected a positive integer")
        if k > len(self):
            raise DmuhError(f"k={k} is larger than the index, which holds {plural(len(self), 'code')}")

    def _set_search_params(self, nprobe: Optional[int], ef_search: Optional[int]) -> None:
        if nprobe is not None:
            if self.kind != "ivf":
                raise DmuhError(f"nprobe applies to ivf indexes, not {self.kind}")
            self.faiss_index.nprobe = int(nprobe)
        elif self.kind == "ivf":
            self.faiss_index.nprobe = self.params["nprobe"]
        if ef_search is not None:
            if self.kind != "hnsw":
                raise DmuhError(f"ef_search applies to hnsw indexes, not {self.kind}")
            self.faiss_index.hnsw.efSearch = int(ef_search)
        elif self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = self.params["ef_search"]

    # -- files ----------------------------------------------------------------------------------

    def info(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "bits": self.bits,
                "count": len(self), "params": dict(self.params), "has_names": self.names is not None,
                "meta": dict(self.meta), "decoder": None if self.decoder is None else self.decoder.config}

    def save(self, path, overwrite: bool = True) -> None:
        """Write the index file atomically (a temporary name, then one rename)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise DmuhError(f"{path} already exists; pass --force to replace it")
        faiss = _faiss()
        sections = [("faiss", faiss.serialize_index_binary(self.faiss_index).tobytes()),
                    ("ids", self.ids.astype("<i8").tobytes())]
        if self.names is not None:
            sections.append(("names", json.dumps(self.names, ensure_ascii=False).encode("utf-8")))
        if self.decoder is not None:  # tensors only (safetensors), its sizes in the header
            sections.append(("decoder", self.decoder.to_bytes()))
        write_index_file(path, self.info(), sections)

    @classmethod
    def load(cls, path) -> "Index":
        """Read and verify an index file (magic, version, header CRC, payload size and sha256)."""
        path = Path(path)
        header, sections = read_index_file(path, KINDS)
        faiss = _faiss()
        try:
            index = faiss.deserialize_index_binary(np.frombuffer(sections["faiss"], dtype=np.uint8))
        except RuntimeError as error:
            raise DmuhError(f"{path}: corrupted index (FAISS cannot read it: {str(error).splitlines()[0]})") from None
        ids = np.frombuffer(sections["ids"], dtype="<i8").astype(np.int64)
        names = json.loads(sections["names"].decode("utf-8")) if "names" in sections else None
        count, bits = header["count"], header["bits"]
        if index.ntotal != count or len(ids) != count or (names is not None and len(names) != count) \
                or index.d != 8 * byte_width(bits):
            raise DmuhError(f"{path}: corrupted index (header says {count} {bits}-bit codes, "
                            f"the payload holds {index.ntotal} of {index.d} bits)")
        loaded = cls(index, header["kind"], bits, header["params"], ids, names, header.get("meta"))
        if header.get("decoder") is not None:
            if "decoder" not in sections:
                raise DmuhError(f"{path}: corrupted index (the header names a decoder, the payload holds none)")
            decoder = FeatureDecoder.from_bytes(header["decoder"], sections["decoder"], str(path))
            if decoder.bits != bits:
                raise DmuhError(f"{path}: corrupted index (a decoder of {decoder.bits}-bit codes for {bits}-bit codes)")
            loaded.decoder = decoder
        return loaded
