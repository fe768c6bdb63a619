"""Search binary codes: FAISS binary indexes behind a small API, a checked file format, and
uncertainty-aware re-ranking.

    index = Index.build(codes, kind="flat")          # or "ivf" (nlist, nprobe), "hnsw" (m, ef_construction, ef_search)
    index.add(more_codes, ids)
    distances, ids = index.search(query_codes, k=10)
    index.save("db.dmuhidx"); index = Index.load("db.dmuhidx")

Codes are packed uint8 rows (n, ceil(bits / 8)) as `dmuh.codes.pack_bits` makes them, or
unpacked (n, bits) codes ({-1,+1}, {0,1} or bool; packed here), or a `dmuh.encoding.Codes`.
FAISS binary indexes need whole bytes: codes whose bit length is not a multiple of 8 are padded
with zero bits, on the database and the queries alike, so the padding never changes a distance.

Result order is defined: by Hamming distance, then by position in the index (the order codes were
added). For the flat index this is exact brute force, ties at the k-th distance included (the
nearest k by (distance, position)). IVF and HNSW are approximate: they may miss true neighbours;
a query that finds fewer than k codes gets id -1 and distance -1 in the remaining slots.

The index file is a small checked container: magic, a JSON header (format version, bits, count,
kind, parameters, sha256 of the payload, CRC32 of the header itself), then the payload:
`faiss.serialize_index_binary` bytes, the int64 ids and optional names (paths).

Re-ranking (`Index.search_reranked`, `rerank`): the top candidates by Hamming distance are
re-ordered by sum_k w_k [b_qk != b_xk], w_k = exp(-u_k / (tau * mean_j u_j)), u the query's
bit-level DMUH uncertainty; `rerank_experiment` measures whether that helps on a run's split.

FAISS is imported lazily (on first use), so the rest of dmuh works without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dmuh.errors import DmuhError
from dmuh.io import atomic_path

MAGIC = b"DMUHIDX\n"
FORMAT = "dmuh-index"
FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "hnsw")
# Build/search parameters each kind accepts, with defaults (None: derived from the data).
KIND_PARAMS: Dict[str, Dict[str, Optional[int]]] = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": None},
    "hnsw": {"m": 32, "ef_construction": 64, "ef_search": 128},
}
# magic, header length (uint32), CRC32 of the header JSON (uint32)
_PREFIX = struct.Struct("<8sII")
_HEADER_FIELDS = {"bits", "count", "kind", "params", "sections", "payload_size", "payload_sha256"}
DEFAULT_RERANK_DEPTH = 1000
DEFAULT_TAU = 1.0
_RERANK_CHUNK = 64


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - lazy: only search needs it
    except ImportError:
        raise DmuhError("searching needs FAISS: pip install faiss-cpu (or pip install 'dmuh[search]')") from None
    return faiss


def byte_width(bits: int) -> int:
    return (int(bits) + 7) // 8


def as_packed(codes, bits: Optional[int] = None, what: str = "codes") -> Tuple[np.ndarray, int]:
    """Any accepted form of codes -> ((n, ceil(bits / 8)) contiguous uint8 numpy array, bits).

    `dmuh.codes.as_packed`'s forms (uint8 = packed, with `bits` when not a multiple of 8; else
    unpacked {-1,+1} / {0,1} / bool (n, bits)), as numpy or torch, plus a `dmuh.encoding.Codes`,
    which brings its bits. Padding bits of packed input are zeroed, as dmuh.codes does.
    """
    from dmuh.codes import as_packed as normalise

    if hasattr(codes, "packed") and hasattr(codes, "bits"):  # dmuh.encoding.Codes
        if bits is not None and int(bits) != codes.bits:
            raise DmuhError(f"{what}: has {codes.bits} bits but bits={bits}")
        codes, bits = codes.packed, codes.bits
    if hasattr(codes, "detach"):  # torch tensor
        codes = codes.detach().cpu().numpy()
    array = np.asarray(codes)
    if array.ndim == 1:
        array = array[None, :]
    packed, bits = normalise(array, None if bits is None else int(bits), what)
    return np.ascontiguousarray(packed, dtype=np.uint8), int(bits)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """(n, bytes) packed codes -> (n, bits) bool, True where the bit is 1 (the inverse of `as_packed`)."""
    from dmuh.codes import unpack_bits

    return unpack_bits(np.asarray(packed, dtype=np.uint8), bits) > 0


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
        packed, bits = as_packed(codes, bits)
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
                raise DmuhError(f"index parameter nlist={nlist}: more lists than the {n} codes to train them on")
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
        packed, _ = as_packed(codes, self.bits)
        n = packed.shape[0]
        if ids is None:
            ids = np.arange(len(self), len(self) + n, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (n,) or not (np.issubdtype(ids.dtype, np.integer) or n == 0):
            raise DmuhError(f"ids: expected {n} integers, one per code, got shape {ids.shape} dtype {ids.dtype}")
        if names is not None and len(names) != n:
            raise DmuhError(f"names: {len(names)} names for {n} codes")
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
        packed, _ = as_packed(query_codes, self.bits, what="query codes")
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
        packed, _ = as_packed(query_codes, self.bits, what="query codes")
        self._check_k(k)
        depth = min(max(int(depth), int(k)), len(self))
        distances, positions = self.search_positions(packed, depth, nprobe=nprobe, ef_search=ef_search)
        uncertainty = np.asarray(bit_uncertainty, dtype=np.float32)
        if uncertainty.shape != (packed.shape[0], self.bits):
            raise DmuhError(f"bit uncertainty: expected shape {(packed.shape[0], self.bits)}, got {uncertainty.shape}")
        order, weighted = rerank(packed, uncertainty, self.codes_at(np.clip(positions, 0, None)), positions, self.bits, tau)
        order = order[:, :k]
        positions = np.take_along_axis(positions, order, axis=1)
        return {
            "weighted": np.take_along_axis(weighted, order, axis=1),
            "distances": np.take_along_axis(distances, order, axis=1),
            "positions": positions,
            "ids": self.ids_at(positions),
        }

    def _check_k(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DmuhError(f"k={k!r}: expected a positive integer")
        if k > len(self):
            raise DmuhError(f"k={k} is larger than the index, which holds {len(self)} codes")

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
                "meta": dict(self.meta)}

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
        layout, offset = {}, 0
        for name, data in sections:
            layout[name] = [offset, len(data)]
            offset += len(data)
        payload = b"".join(data for _, data in sections)
        header = {**self.info(), "sections": layout, "payload_size": len(payload),
                  "payload_sha256": hashlib.sha256(payload).hexdigest()}
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, len(header_bytes), zlib.crc32(header_bytes)))
            f.write(header_bytes)
            f.write(payload)

    @classmethod
    def load(cls, path) -> "Index":
        """Read and verify an index file (magic, version, header CRC, payload size and sha256)."""
        path = Path(path)
        header, payload = read_index_file(path)
        faiss = _faiss()
        sections = header["sections"]

        def section(name: str) -> bytes:
            start, size = sections[name]
            return payload[start:start + size]

        try:
            index = faiss.deserialize_index_binary(np.frombuffer(section("faiss"), dtype=np.uint8))
        except RuntimeError as error:
            raise DmuhError(f"{path}: corrupted index (FAISS cannot read it: {str(error).splitlines()[0]})") from None
        ids = np.frombuffer(section("ids"), dtype="<i8").astype(np.int64)
        names = json.loads(section("names").decode("utf-8")) if "names" in sections else None
        count, bits = header["count"], header["bits"]
        if index.ntotal != count or len(ids) != count or (names is not None and len(names) != count) \
                or index.d != 8 * byte_width(bits):
            raise DmuhError(f"{path}: corrupted index (header says {count} {bits}-bit codes, "
                            f"the payload holds {index.ntotal} of {index.d} bits)")
        return cls(index, header["kind"], bits, header["params"], ids, names, header.get("meta"))


def read_index_file(path: Path) -> Tuple[Dict[str, Any], bytes]:
    """The verified header and payload of an index file; DmuhError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DmuhError(f"{path}: index file not found") from None
    except OSError as error:
        raise DmuhError(f"{path}: cannot read index ({error.strerror or error})") from None
    if len(data) < _PREFIX.size or data[:len(MAGIC)] != MAGIC:
        raise DmuhError(f"{path}: not a dmuh index file (bad magic; build one with `dmuh index build`)")
    _, header_size, header_crc = _PREFIX.unpack_from(data)
    header_bytes = data[_PREFIX.size:_PREFIX.size + header_size]
    if len(header_bytes) != header_size:
        raise DmuhError(f"{path}: truncated index (the header is cut off)")
    if zlib.crc32(header_bytes) != header_crc:
        raise DmuhError(f"{path}: corrupted index (header checksum mismatch)")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except ValueError:
        raise DmuhError(f"{path}: corrupted index (unreadable header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DmuhError(f"{path}: not a dmuh index file (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise DmuhError(f"{path}: index format version {header.get('version')!r}; this dmuh reads version {FORMAT_VERSION}")
    missing = sorted(_HEADER_FIELDS - set(header))
    if missing or header["kind"] not in KINDS:
        raise DmuhError(f"{path}: corrupted index (header lacks {missing[0] if missing else 'a known kind'})")
    payload = data[_PREFIX.size + header_size:]
    if len(payload) != header["payload_size"]:
        state = "truncated" if len(payload) < header["payload_size"] else "corrupted"
        raise DmuhError(f"{path}: {state} index (payload of {len(payload)} bytes, the header says {header['payload_size']})")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise DmuhError(f"{path}: corrupted index (payload checksum mismatch)")
    return header, payload


# ---------------------------------------------------------------------------------------------
# Uncertainty-aware re-ranking


def uncertainty_weights(bit_uncertainty: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """w_k = exp(-u_k / (tau * mean_j u_j)), per query: a bit the query is sure of counts about 1,
    one it is unsure of (relative to its other bits) less; a bit at the query's mean uncertainty
    counts exp(-1 / tau).

    u_k = |h_k - m_k| is the query's bit-level uncertainty (DMUH Eq. 6, hashing vs momentum
    network) and mean_j u_j its image-level uncertainty (Eq. 7). Scaling by it makes tau free of
    units: the size of u differs between runs and shrinks as training settles (as the learning
    rate decays the momentum copy catches up), what matters is which bits stand out.
    """
    if not tau > 0:
        raise DmuhError(f"tau={tau!r}: expected a positive number")
    u = np.asarray(bit_uncertainty, dtype=np.float32)
    scale = np.float32(tau) * u.mean(axis=-1, keepdims=True)
    # A query with no uncertainty at all keeps plain Hamming distance (all weights 1).
    return np.exp(-np.divide(u, scale, out=np.zeros_like(u), where=scale > 0))


def rerank(query_packed: np.ndarray, bit_uncertainty: np.ndarray, candidate_packed: np.ndarray,
           candidate_positions: np.ndarray, bits: int, tau: float = DEFAULT_TAU) -> Tuple[np.ndarray, np.ndarray]:
    """Order each query's candidates by the uncertainty-weighted Hamming distance.

    d_w(q, x) = sum_k w_k [b_qk != b_xk], w from `uncertainty_weights`. Ties go by Hamming
    distance, then position; missing candidates (position -1) go last.
    query_packed (nq, B), bit_uncertainty (nq, bits), candidate_packed (nq, R, B),
    candidate_positions (nq, R). Returns (order (nq, R) into the candidates, weighted (nq, R)).
    """
    weights = uncertainty_weights(bit_uncertainty, tau)
    weighted = np.empty(candidate_positions.shape, dtype=np.float32)
    hamming = np.empty(candidate_positions.shape, dtype=np.int64)
    for start in range(0, query_packed.shape[0], _RERANK_CHUNK):  # bounds the (chunk, R, bits) temporary
        rows = slice(start, start + _RERANK_CHUNK)
        # np.unpackbits order is dmuh.codes' packing order: column k is bit k, as in the weights.
        differ = np.unpackbits(np.bitwise_xor(candidate_packed[rows], query_packed[rows, None, :]), axis=2, count=bits)
        weighted[rows] = np.einsum("nrk,nk->nr", differ.astype(np.float32), weights[rows])
        hamming[rows] = differ.sum(axis=2, dtype=np.int64)
    missing = candidate_positions < 0
    weighted[missing] = np.inf
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, candidate_positions), hamming, weighted), axis=1)
    return order, weighted


# ---------------------------------------------------------------------------------------------
# Does re-ranking help? MAP and P@k with and without it on a run's own split


def _ranking_metrics(relevant, topk: Optional[int], ks: Sequence[int]) -> Dict[str, float]:
    """MAP (@topk, or over the whole ranking) and P@k of ranked relevance rows (nq, n) bool (torch)."""
    import torch

    depth = relevant.shape[1] if topk is None else min(topk, relevant.shape[1])
    top = relevant[:, :depth].float()
    hits = top.cumsum(dim=1)
    ranks = torch.arange(1, depth + 1, device=top.device, dtype=torch.float32)
    found = top.sum(dim=1)
    # AP = mean precision at the relevant ranks within the cut; a query with none there counts 0.
    ap = (top * hits / ranks).sum(dim=1) / found.clamp(min=1)
    out = {"map": float(ap.mean())}
    for k in ks:
        if k <= relevant.shape[1]:
            out[f"p@{k}"] = float(relevant[:, :k].float().mean())
    return out


def rerank_experiment(run, device: str = "cpu", depth: int = DEFAULT_RERANK_DEPTH,
                      taus: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), ks: Sequence[int] = (10, 100, 1000),
                      chunk: int = 100) -> Dict[str, Any]:
    """MAP and P@k of a DMUH run's query split against its database split, per ranking:

    - "hamming": Hamming distance, ties by database position (as `dmuh evaluate --ties index`);
    - "weighted tau=T": the top `depth` re-ranked by the weighted Hamming distance of `rerank`
      with the query's momentum bit uncertainty u = |h - m| (the rest keeps its Hamming order);
    - "tie-break tau=1": Hamming distance, ties broken by that weighted distance (isolates how
      much comes from ordering within equal distances);
    - "margin tau=T": the same re-ranking with u = 1 - |h| (the query's own distance from the sign
      boundary; no momentum network), a control for whether the momentum uncertainty adds anything.

    MAP is the protocol's (MAP@topk of the split, or MAP@all). The taus are all reported: picking the
    best one on the query set is optimistic.
    """
    import torch

    from dmuh.codes import sign
    from dmuh.encoding import Encoder
    from dmuh.evaluate import load_run

    exp = load_run(run, device)
    if exp.momentum is None:
        raise DmuhError(f"{run}: re-ranking needs a DMUH run (a momentum network); this run is {exp.config.method!r}")
    for module in (exp.model, exp.method, exp.momentum.network):
        module.eval()
    encoder = Encoder(Path(run), exp.config, exp.model, exp.method, exp.momentum.network, exp.pipeline, exp.device, {})
    split = exp.split
    query_h, query_u = encoder.continuous(exp.images[torch.from_numpy(split.query)], uncertainty=True)
    database_h, _ = encoder.continuous(exp.images[torch.from_numpy(split.database)])
    labels = torch.from_numpy(np.asarray(exp.source.labels)).float()
    query_labels, database_labels = labels[split.query].to(exp.device), labels[split.database].to(exp.device)
    query_b, database_b = sign(query_h).to(exp.device), sign(database_h).to(exp.device)
    bits, n_database = query_b.shape[1], database_b.shape[0]
    depth = min(int(depth), n_database)
    uncertainties = {"weighted": query_u.to(exp.device), "margin": (1.0 - query_h.abs()).to(exp.device)}
    variants = [("hamming", None, None, False)]
    variants += [(f"weighted tau={t:g}", "weighted", t, False) for t in taus]
    variants += [(f"tie-break tau={DEFAULT_TAU:g}", "weighted", DEFAULT_TAU, True)]
    variants += [(f"margin tau={t:g}", "margin", t, False) for t in taus]
    relevant_rows: Dict[str, List] = {name: [] for name, *_ in variants}
    positions = torch.arange(n_database, device=exp.device)
    for start in range(0, query_b.shape[0], chunk):
        rows = slice(start, start + chunk)
        hamming = 0.5 * (bits - query_b[rows] @ database_b.t())  # exact small integers in float32
        relevant = (query_labels[rows] @ database_labels.t()) > 0
        # Stable sort on distance: ties keep database order.
        order = torch.sort(hamming, dim=1, stable=True).indices
        ranked_relevant = torch.gather(relevant, 1, order)
        head = order[:, :depth]
        differ = (query_b[rows, None, :] != database_b[head]).float()  # (chunk, depth, bits)
        head_hamming = torch.gather(hamming, 1, head)
        for name, source, tau, tie_break in variants:
            if source is None:
                relevant_rows[name].append(ranked_relevant.cpu())
                continue
            u = uncertainties[source][rows]
            scale = tau * u.mean(dim=1, keepdim=True)  # as `uncertainty_weights`
            weights = torch.exp(-torch.where(scale > 0, u / scale.clamp_min(1e-30), torch.zeros_like(u)))
            weighted = torch.einsum("qrk,qk->qr", differ, weights)
            # Order the head by (weighted, Hamming, position), or (Hamming, weighted, position).
            keys = (head_hamming, weighted) if tie_break else (weighted, head_hamming)
            head_order = torch.sort(positions[head], dim=1).indices  # position, the last key
            for key in reversed(keys):
                head_order = torch.gather(head_order, 1, torch.sort(torch.gather(key, 1, head_order), dim=1, stable=True).indices)
            reranked = torch.cat([torch.gather(ranked_relevant[:, :depth], 1, head_order), ranked_relevant[:, depth:]], dim=1)
            relevant_rows[name].append(reranked.cpu())
    results = []
    for name, *_ in variants:
        results.append({"ranking": name, **_ranking_metrics(torch.cat(relevant_rows[name]), split.topk, ks)})
    report = {
        "run": str(run), "method": exp.config.method, "bits": bits, "protocol": split.protocol,
        "query": int(len(split.query)), "database": int(n_database), "map_at": split.topk or "all",
        "depth": depth, "mean_bit_uncertainty": float(query_u.mean()), "results": results,
    }
    try:  # the reference numbers of `dmuh evaluate` (expected MAP over random tie orders)
        from dmuh.metrics import mean_average_precision

        report["hamming_map_ties_expected"] = float(mean_average_precision(
            query_b.cpu(), database_b.cpu(), query_labels.cpu(), database_labels.cpu(), topk=split.topk, ties="expected"))
    except (ImportError, TypeError):
        pass
    return report
