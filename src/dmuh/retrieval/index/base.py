"""The index contract every code index backend implements, and what the backends share: how codes
come in, the index parameters, and the searches built on top of a backend's nearest-neighbour
search (re-ranking, decoder re-ranking).

`CodeIndex` is an abstract base class on FAISS's model: `search(codes, k, params=None)`, `add`,
`remove`, `save`, `info`, `bits`, `count` (`len`), ... A backend (`dmuh.retrieval.index.faiss.FaissIndex`
on FAISS, `dmuh.retrieval.index.milvus.MilvusIndex` on Milvus) subclasses it and provides
`search_positions`, `ids_at`, `names_at`, `codes_at`, `add`, `remove`, `ids_named`, `save`, `info`,
`has_names` and `__len__`; positions are its own handles of stored codes (-1: no result), ordered
as the codes were added. `dmuh.retrieval.index.build_index` and `open_index` make one. This module
imports no backend, so each backend imports it without a cycle.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dmuh.codes.binary import as_packed
from dmuh.errors import DmuhError
from dmuh.retrieval.options import (  # noqa: F401 - BACKENDS is also this module's API
    BACKENDS,
    FLAT_KERNELS,
    PARAM_LIMITS,
)
from dmuh.retrieval.rerank import (
    DEFAULT_RERANK_DEPTH,
    DEFAULT_TAU,
    DecoderReranker,
    Query,
    RerankedIndex,
    UncertaintyReranker,
)
from dmuh.utils.words import plural


@dataclass(frozen=True)
class SearchParams:
    """The parameters of one search (FAISS's `SearchParameters`), given per call: nothing is set on
    a shared index, so searches with different parameters may run at once. None keeps the value
    the index was built with (its `params`) or the default.

    nprobe: ivf, the inverted lists visited per query. ef_search: hnsw, the candidate list while
    searching. kernel: a flat index of the faiss backend, "dmuh" (the default: `dmuh.codes.topk`,
    faster, same results) or "faiss" (FAISS's IndexBinaryFlat search). threads: the threads of the
    dmuh kernel (default `dmuh.codes.topk.default_threads()`, the cores this process may use).
    """

    nprobe: Optional[int] = None
    ef_search: Optional[int] = None
    kernel: Optional[str] = None
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise DmuhError(f"search parameter {name}={value!r}: expected a positive integer")
            if value is not None and value > PARAM_LIMITS[name]:
                raise DmuhError(f"search parameter {name}={value}: expected at most {PARAM_LIMITS[name]:,}")
        if self.kernel is not None and self.kernel not in FLAT_KERNELS:
            raise DmuhError(f"search parameter kernel={self.kernel!r}: choose one of {', '.join(FLAT_KERNELS)}")

    @classmethod
    def of(
        cls, params: Optional["SearchParams"] = None, *, nprobe: Optional[int] = None, ef_search: Optional[int] = None
    ) -> "SearchParams":
        """`params` (default none given) with the keyword shortcuts nprobe= and ef_search= laid over it."""
        if params is not None and not isinstance(params, SearchParams):
            raise DmuhError(f"params: expected a SearchParams, got {type(params).__name__}")
        params = params or cls()
        if nprobe is None and ef_search is None:
            return params
        return replace(
            params,
            nprobe=params.nprobe if nprobe is None else nprobe,
            ef_search=params.ef_search if ef_search is None else ef_search,
        )

    def check(self, kind: str, backend: str = "faiss") -> "SearchParams":
        """These parameters, refused where they do not apply to an index of `kind` on `backend`."""
        if self.nprobe is not None and kind != "ivf":
            raise DmuhError(f"nprobe applies to ivf indexes, not {kind}")
        if self.ef_search is not None and kind != "hnsw":
            raise DmuhError(f"ef_search applies to hnsw indexes, not {kind}")
        if (self.kernel is not None or self.threads is not None) and (kind != "flat" or backend != "faiss"):
            name = "kernel" if self.kernel is not None else "threads"
            raise DmuhError(f"{name} applies to flat indexes of the faiss backend, not {backend} {kind}")
        if self.threads is not None and self.kernel == "faiss":
            raise DmuhError("threads applies to the dmuh kernel; FAISS's kernel uses its OpenMP threads")
        return self


def byte_width(bits: int) -> int:
    return (int(bits) + 7) // 8


def _as_packed(codes, bits: Optional[int] = None, what: str = "codes") -> Tuple[np.ndarray, int]:
    """Codes as an index takes them -> ((n, ceil(bits / 8)) contiguous uint8 numpy array, bits).

    `dmuh.codes.binary.as_packed`'s forms, as numpy or torch (moved to the CPU), a single 1-D code, or a
    `dmuh.codes.file.Codes`, which brings its bits.
    """
    if hasattr(codes, "packed") and hasattr(codes, "bits"):  # dmuh.codes.file.Codes
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


def build_inputs(codes, bits: Optional[int], names: Optional[Sequence[str]], meta: Optional[Dict[str, Any]]):
    """What a backend's `build` takes from `codes`: (packed, bits, names, meta), names and meta
    defaulting to a codes file's own ids and model identity; zero codes are refused."""
    packed, bits = _as_packed(codes, bits)
    if names is None and hasattr(codes, "ids"):
        names = list(codes.ids)
    if meta is None and hasattr(codes, "identity"):
        meta = codes.identity()
    if packed.shape[0] == 0:
        raise DmuhError("cannot build an index from zero codes")
    return packed, bits, names, meta


def resolve_params(
    kind: str, kind_params: Dict[str, Dict[str, Optional[int]]], params: Dict[str, Any], n: int
) -> Dict[str, int]:
    """The build/search parameters of `kind` (one of `kind_params`), the given ones checked to be
    positive integers, the others their defaults; an ivf's nlist and nprobe derived from n codes."""
    if kind not in kind_params:
        raise DmuhError(f"index kind {kind!r}: choose one of {', '.join(kind_params)}")
    unknown = sorted(set(params) - set(kind_params[kind]))
    if unknown:
        accepted = ", ".join(kind_params[kind]) or "none"
        raise DmuhError(f"index kind {kind!r} has no parameter {unknown[0]!r} (it takes: {accepted})")
    for key, value in params.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DmuhError(f"index parameter {key}={value!r}: expected a positive integer")
        if value is not None and key in PARAM_LIMITS and value > PARAM_LIMITS[key]:
            raise DmuhError(f"index parameter {key}={value}: expected at most {PARAM_LIMITS[key]:,}")
    resolved = {
        k: (params.get(k) if params.get(k) is not None else default) for k, default in kind_params[kind].items()
    }
    if "nlist" in resolved:
        # sqrt(n) lists, at most n / 39 (k-means wants >= 39 training points per list).
        nlist = resolved["nlist"] or max(1, min(int(round(math.sqrt(n))), n // 39))
        if nlist > n:
            raise DmuhError(f"index parameter nlist={nlist}: more lists than the {plural(n, 'code')} to train them on")
        resolved["nlist"] = int(nlist)
        resolved["nprobe"] = int(min(resolved["nprobe"] or max(1, nlist // 16), nlist))
    return {k: int(v) for k, v in resolved.items()}


def check_ids(ids, n: int) -> np.ndarray:
    """`ids` as int64, one per code."""
    ids = np.asarray(ids)
    if ids.shape != (n,) or not (np.issubdtype(ids.dtype, np.integer) or n == 0):
        raise DmuhError(f"ids: expected {n} integers, one per code, got shape {ids.shape} dtype {ids.dtype}")
    return ids.astype(np.int64)


def unique_ids(ids) -> np.ndarray:
    """The distinct int64 ids of a sequence of integer ids (one id alone also)."""
    ids = np.atleast_1d(np.asarray(ids))
    return np.unique(check_ids(ids, ids.shape[0]))


def next_id_after(ids: np.ndarray) -> int:
    """The id new codes get by default: one past the largest (0 for none), so it is never taken."""
    return int(ids.max()) + 1 if len(ids) else 0


def check_ids_known(wanted: np.ndarray, known: np.ndarray, where: str) -> None:
    """DmuhError naming the first id of `wanted` that is not among `known`."""
    absent = wanted[~np.isin(wanted, known)]
    if len(absent) == 1:
        raise DmuhError(f"id {int(absent[0])} is not in {where}; nothing removed")
    if len(absent):
        listed = ", ".join(str(int(i)) for i in absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise DmuhError(f"ids {listed} ({len(absent)} in all) are not in {where}; nothing removed")


def ordered_by_distance_then_position(distances: np.ndarray, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each row sorted by (distance, position), the empty slots (position -1) last with distance -1."""
    distances = np.asarray(distances, dtype=np.int32).copy()
    positions = np.asarray(positions, dtype=np.int64)
    missing = positions < 0
    distances[missing] = np.iinfo(np.int32).max
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, positions), distances), axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    positions = np.take_along_axis(positions, order, axis=1)
    distances[positions < 0] = -1
    return distances, positions


class CodeIndex(abc.ABC):
    """An index of binary codes: the contract every backend implements, and the backend-independent
    searches on top of it (see the module's docstring).

    A backend sets kind, bits, params, meta (where the codes came from: model identity, image
    size, ...) and decoder (a dmuh.models.decoder.FeatureDecoder of the codes, or None).
    """

    backend = ""
    kind: str
    bits: int
    params: Dict[str, Any]
    meta: Dict[str, Any]
    decoder = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, bits={self.bits}, count={len(self)}, params={self.params})"

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many codes the index holds."""

    @property
    def count(self) -> int:
        """How many codes the index holds (len(index))."""
        return len(self)

    def close(self) -> None:  # noqa: B027 - an optional hook: backends without a connection keep nothing open
        """Let go of what the index holds open (a Milvus connection); nothing for FAISS."""

    def __enter__(self) -> "CodeIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    @abc.abstractmethod
    def has_names(self) -> bool:
        """Whether the index holds a name (path) of each code."""

    def search_positions(
        self,
        query_codes,
        k: int,
        params: Optional[SearchParams] = None,
        *,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query by (Hamming distance, position): (distances int32 (nq, k),
        positions int64 (nq, k), -1 with distance -1 where an approximate search found fewer).
        `params` (or its shortcuts nprobe=, ef_search=) apply to this call only."""
        packed, _ = _as_packed(query_codes, self.bits, what="query codes")
        self.check_k(k)
        params = SearchParams.of(params, nprobe=nprobe, ef_search=ef_search).check(self.kind, self.backend)
        return self._search_packed(packed, int(k), params)

    @abc.abstractmethod
    def _search_packed(self, packed: np.ndarray, k: int, params: SearchParams) -> Tuple[np.ndarray, np.ndarray]:
        """`search_positions` of checked packed queries, k and parameters; the index is not changed."""

    @abc.abstractmethod
    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """User ids of index positions (-1, no result, stays -1)."""

    @abc.abstractmethod
    def names_at(self, positions: np.ndarray) -> List[List[Optional[str]]]:
        """Names (paths) of index positions, per row (None without names, or for -1)."""

    @abc.abstractmethod
    def codes_at(self, positions: np.ndarray) -> np.ndarray:
        """Packed codes stored at index positions (any shape of non-negative positions)."""

    @abc.abstractmethod
    def add(self, codes, ids=None, names: Optional[Sequence[str]] = None) -> None:
        """Add codes; ids default to the next ids (one past the largest ever given)."""

    @abc.abstractmethod
    def remove(self, ids) -> int:
        """Remove every code whose id is one of `ids`; returns how many were removed (an unknown id
        is an error, and then nothing is removed)."""

    @abc.abstractmethod
    def ids_named(self, names: Sequence[str]) -> np.ndarray:
        """The ids of the codes whose name (path) is one of `names`."""

    @abc.abstractmethod
    def info(self) -> Dict[str, Any]:
        """The index file's header fields: format, version, backend, kind, bits, count, params, ..."""

    @abc.abstractmethod
    def save(self, path, overwrite: bool = True) -> None:
        """Write the index file atomically (`open_index` reads it back)."""

    def search(
        self,
        query_codes,
        k: int,
        params: Optional[SearchParams] = None,
        *,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query: (distances int32 (nq, k), ids int64 (nq, k)); ordered by
        (distance, position). `params` (or nprobe=, ef_search=) apply to this call only."""
        distances, positions = self.search_positions(query_codes, k, params, nprobe=nprobe, ef_search=ef_search)
        return distances, self.ids_at(positions)

    def packed_queries(self, query_codes) -> np.ndarray:
        """Query codes as this index searches them: packed (nq, ceil(bits / 8)) uint8, of its bit length."""
        return _as_packed(query_codes, self.bits, what="query codes")[0]

    def search_reranked(
        self,
        query_codes,
        bit_uncertainty,
        k: int,
        *,
        depth: int = DEFAULT_RERANK_DEPTH,
        tau: float = DEFAULT_TAU,
        params: Optional[SearchParams] = None,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
    ) -> Dict[str, np.ndarray]:
        """Uncertainty-aware search: the top `depth` codes by Hamming distance, re-ranked by the
        weighted Hamming distance of `dmuh.retrieval.rerank.UncertaintyReranker`; keeps the k best.

        Returns {"weighted": float32 (nq, k), "distances": int32 Hamming (nq, k), "ids": int64,
        "positions": int64}.
        """
        searcher = RerankedIndex(self, UncertaintyReranker(tau), depth)
        return searcher.search(
            Query(query_codes, bit_uncertainty=bit_uncertainty),
            k,
            SearchParams.of(params, nprobe=nprobe, ef_search=ef_search),
        )

    def attach_decoder(self, decoder) -> None:
        """Keep a `dmuh.models.decoder.FeatureDecoder` of these codes with the index (and in its file)."""
        if decoder.bits != self.bits:
            raise DmuhError(f"decoder: reads {decoder.bits}-bit codes, the index holds {self.bits}-bit codes")
        self.decoder = decoder.cpu().eval()

    def search_decoded(
        self,
        query_codes,
        query_features,
        k: int,
        *,
        depth: int = DEFAULT_RERANK_DEPTH,
        params: Optional[SearchParams] = None,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
    ) -> Dict[str, np.ndarray]:
        """Rank-preserving hashing's search: the top `depth` codes by Hamming distance (the graph
        search of an hnsw index, or any kind), re-ranked by the cosine of each query's features
        (nq, D) to the candidates' features decoded from their codes (`dmuh.retrieval.rerank.DecoderReranker`);
        keeps the k best. Ties go by Hamming distance, then position.

        Returns {"cosine": float32 (nq, k), "distances": int32 Hamming, "ids": int64, "positions": int64}.
        """
        searcher = RerankedIndex(self, DecoderReranker(self.decoder), depth)
        return searcher.search(
            Query(query_codes, features=query_features), k, SearchParams.of(params, nprobe=nprobe, ef_search=ef_search)
        )

    def check_k(self, k) -> None:
        """Refuse a k that is not a positive integer, or more than the index holds."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DmuhError(f"k={k!r}: expected a positive integer")
        if k > len(self):
            raise DmuhError(f"k={k} is larger than the index, which holds {plural(len(self), 'code')}")

    def _add_inputs(self, codes, ids, names: Optional[Sequence[str]]) -> Tuple[np.ndarray, np.ndarray]:
        """Codes to add, packed, and their ids (default: the next ids, from `next_id`), checked."""
        packed, _ = _as_packed(codes, self.bits)
        n = packed.shape[0]
        if ids is None:
            ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        ids = check_ids(ids, n)
        self._check_names_given(names, n)
        return packed, ids

    def _check_names_given(self, names: Optional[Sequence[str]], n: int) -> None:
        if names is not None and len(names) != n:
            raise DmuhError(f"names: {plural(len(names), 'name')} for {plural(n, 'code')}")
        if self.has_names != (names is not None):
            raise DmuhError("names: give names for every batch of codes added, or for none")


def decoder_sections(decoder) -> List[Tuple[str, bytes]]:
    """The index file section of a decoder (tensors only, safetensors; its sizes go in the header)."""
    return [] if decoder is None else [("decoder", decoder.to_bytes())]


def decoder_from_sections(path: Path, header: Dict[str, Any], sections: Dict[str, bytes], bits: int):
    """The decoder an index file holds, checked against the header; None when it holds none."""
    if header.get("decoder") is None:
        return None
    if "decoder" not in sections:
        raise DmuhError(f"{path}: corrupted index (the header names a decoder, the payload holds none)")
    from dmuh.models.decoder import FeatureDecoder  # torch: deferred to an index that holds a decoder

    decoder = FeatureDecoder.from_bytes(header["decoder"], sections["decoder"], str(path))
    if decoder.bits != bits:
        raise DmuhError(f"{path}: corrupted index (a decoder of {decoder.bits}-bit codes for {bits}-bit codes)")
    return decoder
