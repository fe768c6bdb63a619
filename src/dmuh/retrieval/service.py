"""Answer queries against one index with one model: what `dmuh serve` runs per request and `dmuh
search` per batch (`search_batch`, with `dmuh.retrieval.queries`), and a Python API for the same.

    service = SearchService.open("photos.dmuhidx", run="runs/cifar10-dmuh-32", images="photos/")
    service.search_image(Path("q.jpg").read_bytes(), k=10)     # ranked ids, paths, Hamming distances
    service.search_codes("a1b2c3d4e5f60718", k=10)              # packed codes as hex (or 0/1 bits)
    service.thumbnail(42)                                       # JPEG bytes of database image id 42

The model and the index are loaded once. Every method is safe to call from several threads: the
network is used under a lock; index searches run at once (their parameters, `SearchParams`, are
given per call, nothing is set on the shared index). A DMUH run (a momentum network)
also reports each image query's image-level uncertainty (the mean of |h - m|, Eq. 7) and its most
uncertain bits. Every bad query raises DmuhError with a one-line message.

Database images are served from one root (a folder or a .zip) and nothing outside it: a stored
path is resolved (symbolic links followed) and refused unless it lies under the root.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dmuh.codes.binary import as_packed, pack_bits, unpack_bits
from dmuh.data.images import read_image
from dmuh.data.sources import IMAGE_EXTENSIONS
from dmuh.errors import DataError, DmuhError
from dmuh.retrieval.index import SearchParams, open_index
from dmuh.retrieval.options import ServiceLimits  # noqa: F401 - also this module's API
from dmuh.retrieval.rerank import (
    DEFAULT_RERANK_DEPTH,
    DEFAULT_TAU,
    RERANK_MODES,
    Query,
    RerankedIndex,
    reranker_for,
)
from dmuh.runs.files import run_directory
from dmuh.utils.words import plural

UNCERTAIN_BITS_SHOWN = 8  # the most uncertain bits reported per image query
SCORE_COLUMNS = {"weighted": "weighted_distance", "cosine": "decoded_cosine"}  # a reranker's score, in result rows


def check_same_model(
    index_meta: Dict[str, Any], model: Dict[str, Any], what: str, allow: bool, doing: str = "search"
) -> None:
    """Refuse codes of another model than the one that encoded the index (by checkpoint sha256)."""
    expected = (index_meta.get("model") or {}).get("checkpoint_sha256")
    actual = (model or {}).get("checkpoint_sha256")
    if expected and actual and expected != actual and not allow:
        raise DmuhError(
            f"{what} come from another model (checkpoint sha256 {actual[:12]}...) than the index's "
            f"({expected[:12]}...); pass --allow-other-model to {doing} anyway"
        )


def check_compatible(
    index,
    index_name: str,
    bits: int,
    model: Optional[Dict[str, Any]],
    source: str,
    what: str,
    allow_other_model: bool,
    doing: str = "search",
    made: bool = False,
) -> None:
    """The one check that codes may meet an index: the same bit length, and the model that encoded
    the index's codes (`check_same_model`). `source` names them in the bit-length message ("--codes
    FILE" holds, "the model of --run RUN" makes, with `made`), `what` in the model one."""
    if int(bits) != index.bits:
        if made:
            raise DmuhError(f"{index_name} holds {index.bits}-bit codes but {source} makes {bits}-bit codes")
        raise DmuhError(f"{source} holds {bits}-bit codes but {index_name} holds {index.bits}-bit codes")
    check_same_model(index.meta, model, what, allow_other_model, doing=doing)


def recorded_run(index, index_path, required: bool = False) -> Optional[str]:
    """The run that encoded the index's codes, from its header: None when it records none or the run
    is gone, or with `required` a DmuhError saying which (queries to encode need a run)."""
    recorded = (index.meta.get("model") or {}).get("run")
    if not required:
        try:
            return recorded and str(run_directory(recorded))
        except DmuhError:
            return None
    if not recorded:
        raise DmuhError(
            f"query images need --run RUN (the run that encoded the index): --index {index_path} records no run"
        )
    try:
        run_directory(recorded)
    except DmuhError:
        raise DmuhError(
            f"query images need --run RUN (the run that encoded the index): the run --index "
            f"{index_path} records, {recorded}, is no longer there"
        ) from None
    return recorded


def result_rows(
    index, positions: np.ndarray, distances: np.ndarray, **scores: Optional[np.ndarray]
) -> List[List[Dict[str, Any]]]:
    """Per query, its ranked results as rows {rank, id, path, distance, and each score given}
    (`weighted_distance`, `decoded_cosine`, ...); slots without a result (-1) are left out."""
    ids = index.ids_at(positions)
    paths = index.names_at(positions)
    given = {name: values for name, values in scores.items() if values is not None}
    rows = []
    for q in range(positions.shape[0]):
        ranked = []
        for rank in range(positions.shape[1]):
            if positions[q, rank] < 0:
                continue
            row = {
                "rank": rank + 1,
                "id": int(ids[q, rank]),
                "path": paths[q][rank],
                "distance": int(distances[q, rank]),
            }
            row.update({name: round(float(values[q, rank]), 4) for name, values in given.items()})
            ranked.append(row)
        rows.append(ranked)
    return rows


def parse_codes(value, bits: int) -> np.ndarray:
    """One query code as packed uint8 (1, ceil(bits / 8)): a hex string of the packed bytes
    (`dmuh.codes.binary.pack_bits` order; padding bits are ignored), a string of `bits` 0/1 characters,
    or a list of `bits` values in {0, 1} or {-1, +1}."""
    width = (bits + 7) // 8
    if isinstance(value, str):
        text = value.strip().lower()
        if len(text) == bits and set(text) <= {"0", "1"}:
            return pack_bits(np.frombuffer(text.encode(), dtype=np.uint8)[None, :] - ord("0"))
        if len(text) != 2 * width:
            raise DmuhError(
                f"codes: expected {2 * width} hex digits ({plural(bits, 'bit')} packed) or "
                f"{bits} 0/1 characters, got {len(text)} characters"
            )
        try:
            packed = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)[None, :]
        except ValueError:
            raise DmuhError("codes: not a hex string (0-9, a-f)") from None
        return np.ascontiguousarray(as_packed(packed, bits, "codes")[0])
    if (
        isinstance(value, list)
        and len(value) == bits
        and all(v in (0, 1, -1) and not isinstance(v, bool) for v in value)
    ):
        return pack_bits((np.asarray(value, dtype=np.int64)[None, :] > 0).astype(np.uint8))
    raise DmuhError(f"codes: expected a hex string, a 0/1 string or a list of {bits} values in {{0, 1}} or {{-1, +1}}")


class ThumbnailStore:
    """Small JPEG previews of the database images under one root (a folder or a .zip), by stored
    path; nothing outside the root is read. The last few hundred are kept in memory."""

    CACHED = 512

    def __init__(self, root, size: int, max_pixels: int):
        self.root = Path(root)
        self.size = int(size)
        self.max_pixels = int(max_pixels)
        self._cache: "OrderedDict[str, bytes]" = OrderedDict()
        self._lock = threading.Lock()
        if self.root.is_dir():
            self._resolved = self.root.resolve()
            self._zip_names = None
        elif self.root.is_file() and self.root.suffix.lower() == ".zip":
            try:
                self._archive = zipfile.ZipFile(self.root)
            except (OSError, zipfile.BadZipFile) as error:
                raise DataError(f"images {root}: cannot read zip ({error})", field="images") from None
            self._zip_names = frozenset(self._archive.namelist())
        else:
            raise DataError(f"images {root}: not a folder or a .zip", field="images")

    def _read(self, name: str) -> bytes:
        """The stored bytes of image `name`; DmuhError (not found) for anything outside the root."""

        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            raise LookupError(f"{Path(name).name}: not an image file")
        if self._zip_names is not None:
            if name not in self._zip_names:
                raise LookupError(f"{Path(name).name}: not in {self.root.name}")
            with self._lock:  # one zip handle is not safe to share between threads
                return self._archive.read(name)
        try:
            path = (self.root / name).resolve()
            if not path.is_relative_to(self._resolved) or not path.is_file():  # '..', absolute paths, links out
                raise LookupError(f"{Path(name).name}: not under the image root")
            return path.read_bytes()
        except (ValueError, OSError):  # a stored name with a NUL byte, an unreadable file
            raise LookupError(f"{Path(name).name}: cannot be read under the image root") from None

    def get(self, name: str) -> bytes:
        """JPEG bytes of a preview of image `name` (longest side `size`). LookupError when the root
        does not hold it, DmuhError when it cannot be read as an image."""
        from PIL import Image

        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        data = self._read(name)
        array = read_image(None, 3, None, data=data, name=name, max_pixels=self.max_pixels)
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        image.thumbnail((self.size, self.size), Image.BILINEAR)
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=85)
        jpeg = out.getvalue()
        with self._lock:
            self._cache[name] = jpeg
            while len(self._cache) > self.CACHED:
                self._cache.popitem(last=False)
        return jpeg


class SearchService:
    """One index, optionally the model that encodes its queries and the root of its images."""

    def __init__(
        self,
        index,
        encoder=None,
        thumbnails: Optional[ThumbnailStore] = None,
        limits: Optional[ServiceLimits] = None,
        index_path: Optional[str] = None,
    ):
        self.index = index
        self.encoder = encoder
        self.thumbnails = thumbnails
        self.limits = limits or ServiceLimits()
        self.limits.check()
        self.index_path = index_path
        self.run = None if encoder is None else str(encoder.run_dir)  # the run of `encoder`, as given
        self._ids_lock = threading.Lock()  # makes `_id_positions` once
        self._model_lock = threading.Lock()
        self._id_positions = None  # (sorted ids, their positions), made at the first thumbnail

    @classmethod
    def open(
        cls,
        index_path,
        run: Optional[str] = None,
        images: Optional[str] = None,
        device: str = "cpu",
        allow_other_model: bool = False,
        limits: Optional[ServiceLimits] = None,
    ) -> "SearchService":
        """Load the index and the run (given, else the one the index records, if it is still
        there; without either only code queries are answered)."""

        limits = limits or ServiceLimits()
        limits.check()
        index = open_index(index_path)
        service = cls(index, None, None, limits, str(index_path))
        run = recorded_run(index, index_path) if run is None else run
        if run:
            service.load_run(run, device, allow_other_model)
        if images:
            service.thumbnails = ThumbnailStore(images, limits.thumbnail_px, limits.max_image_pixels)
        return service

    def load_run(self, run, device: str = "cpu", allow_other_model: bool = False) -> None:
        """Encode queries with the model of `run`, checked to make codes of the index's bit length
        and model (`check_compatible`)."""
        from dmuh.retrieval.encoder import load_encoder  # torch: deferred, see TORCH_DEFERRED in the tests

        encoder = load_encoder(run, device)
        check_compatible(
            self.index,
            f"--index {self.index_path}",
            encoder.bits,
            encoder.identity,
            f"the model of --run {run}",
            f"--run {run}'s codes",
            allow_other_model,
            made=True,
        )
        self.encoder, self.run = encoder, str(run)

    # -- what the service holds ----------------------------------------------------------------

    @property
    def encodes_images(self) -> bool:
        return self.encoder is not None and self.encoder.channels is not None

    @property
    def encodes_text(self) -> bool:
        return (
            self.encoder is not None and self.encoder.method.requirements().text and self.encoder.vocabulary is not None
        )

    @property
    def reports_uncertainty(self) -> bool:
        return self.encodes_images and self.encoder.momentum_network is not None

    def info(self) -> Dict[str, Any]:
        index = self.index
        model = dict(index.meta.get("model") or {})
        return {
            "index": self.index_path,
            "kind": index.kind,
            "bits": index.bits,
            "count": len(index),
            "backend": index.backend,
            "params": dict(index.params),
            "has_paths": index.has_names,
            "model": model,
            "run": None if self.encoder is None else self.encoder.identity,
            "queries": {"image": self.encodes_images, "text": self.encodes_text, "codes": True},
            "uncertainty": self.reports_uncertainty,
            "thumbnails": self.thumbnails is not None,
            "rerank": [mode for mode in RERANK_MODES if self._rerank_possible(mode)],
            # One max_k: the one requests are held to (--max-k, and never more than the index holds).
            "limits": {**asdict(self.limits), "max_k": self.max_k},
            "max_k": self.max_k,
        }

    @property
    def max_k(self) -> int:
        return int(min(self.limits.max_k, len(self.index)))

    def _rerank_possible(self, mode: str) -> bool:
        if mode == "uncertainty":
            return self.reports_uncertainty
        return self.index.decoder is not None and self.encodes_images

    # -- queries -------------------------------------------------------------------------------

    def search_image(
        self,
        data: bytes,
        k: int = 10,
        rerank: Optional[str] = None,
        depth: Optional[int] = None,
        tau: Optional[float] = None,
        name: str = "image",
    ) -> Dict[str, Any]:
        """Encode an image (its file's bytes) and search; a DMUH run adds its uncertainty."""

        if not self.encodes_images:
            raise DmuhError(
                "this service has no model that encodes images (start it with --run RUN); send packed codes instead"
                if self.encoder is None
                else f"the run {self.encoder.run_dir} encodes feature vectors, not images; send packed codes"
            )
        k = self._check_k(k)
        self._check_rerank(rerank)
        size = self.index.meta.get("image_size") or self.encoder.image_size
        image = read_image(
            None, self.encoder.channels, size, data=data, name=name, max_pixels=self.limits.max_image_pixels
        )[None]
        packed, uncertainty, features = self.encode_images(image, self.reports_uncertainty, rerank == "decoder")
        report = self._search(packed, k, rerank, depth, tau, uncertainty, features)
        report["query"] = self._describe(packed, uncertainty)
        return report

    def search_codes(
        self,
        codes,
        k: int = 10,
        rerank: Optional[str] = None,
        depth: Optional[int] = None,
        tau: Optional[float] = None,
        bit_uncertainty: Optional[Sequence[float]] = None,
    ) -> Dict[str, Any]:
        """Search with one packed code (see `parse_codes`); `rerank="uncertainty"` needs its
        `bit_uncertainty` (one non-negative value per bit)."""
        packed = parse_codes(codes, self.index.bits)
        k = self._check_k(k)
        self._check_rerank(rerank, codes=True)
        uncertainty = None
        if bit_uncertainty is not None:
            uncertainty = np.asarray(bit_uncertainty, dtype=np.float64)
            if uncertainty.shape != (self.index.bits,) or not np.isfinite(uncertainty).all() or (uncertainty < 0).any():
                raise DmuhError(f"bit_uncertainty: expected {self.index.bits} finite non-negative numbers")
            uncertainty = uncertainty.astype(np.float32)[None]
        if rerank == "uncertainty" and uncertainty is None:
            raise DmuhError("rerank uncertainty of a code query needs its bit_uncertainty (one value per bit)")
        report = self._search(packed, k, rerank, depth, tau, uncertainty, None)
        report["query"] = self._describe(packed, uncertainty)
        return report

    def search_text(self, text: str, k: int = 10) -> Dict[str, Any]:
        """Encode a text with a cross-modal run's text network and search (Hamming ranking)."""
        if not self.encodes_text:
            raise DmuhError(
                "this service has no text network: text queries need a cross-modal run "
                "(dmuh-cross, dcmh, ugach) trained on data with words"
            )
        if not isinstance(text, str) or not text.strip():
            raise DmuhError("text: expected a non-empty string")
        if len(text) > self.limits.max_text_chars:
            raise DmuhError(f"text: {len(text):,} characters, more than the {self.limits.max_text_chars:,} allowed")
        k = self._check_k(k)
        packed = self.encode_texts([text])
        report = self._search(packed, k, None, None, None, None, None)
        report["query"] = self._describe(packed, None)
        return report

    def encode_images(self, images: np.ndarray, uncertainty: bool = False, features: bool = False):
        """Decoded images (n, H, W, C) uint8 -> (packed codes, bit uncertainty or None, the images' own
        features or None), with the service's model."""
        from dmuh.data.pipeline import images_to_tensor  # torch: deferred
        from dmuh.retrieval.encoder import encode_arrays

        with self._model_lock:
            packed, bit_uncertainty = encode_arrays(self.encoder, images, uncertainty=uncertainty)
            own = self.encoder.features(images_to_tensor(images)) if features else None
        return packed, bit_uncertainty, own

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Packed codes of texts, with a cross-modal run's text network."""
        with self._model_lock:
            return self.encoder.text_codes(self.encoder.text_vectors(list(texts)))

    def position_of(self, id_: int) -> int:
        """The index position of user id `id_`; LookupError if the index holds no such id."""
        with self._ids_lock:
            if self._id_positions is None:  # by binary search: no dict of a million ints
                ids = np.asarray(self.index.ids, dtype=np.int64)  # a Milvus index reads them once, here
                order = np.argsort(ids, kind="stable")
                self._id_positions = ids[order], order
        sorted_ids, positions = self._id_positions
        at = int(np.searchsorted(sorted_ids, id_))
        if at >= len(sorted_ids) or sorted_ids[at] != id_:
            raise LookupError(f"id {id_}: not in the index")
        return int(positions[at])

    def thumbnail(self, id_: int) -> bytes:
        """A JPEG preview of database image `id_`; LookupError when there is none to serve."""
        if self.thumbnails is None:
            raise LookupError("this service serves no images (start it with --images ROOT)")
        if not self.index.has_names:
            raise LookupError("the index holds no paths of its images")
        position = self.position_of(id_)
        name = self.index.names_at(np.array([[position]]))[0][0]
        return self.thumbnails.get(name)

    # -- shared steps --------------------------------------------------------------------------

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise DmuhError(f"k={k!r}: expected an integer from 1 to {self.max_k}")
        return int(k)

    def _check_rerank(self, rerank: Optional[str], codes: bool = False) -> None:
        if rerank is None:
            return
        if rerank not in RERANK_MODES:
            raise DmuhError(f"rerank {rerank!r}: choose {' or '.join(RERANK_MODES)}")
        if rerank == "decoder" and (codes or not self._rerank_possible("decoder")):
            raise DmuhError("rerank decoder needs an index with a decoder and image queries (their own features)")
        if rerank == "uncertainty" and not codes and not self.reports_uncertainty:
            raise DmuhError("rerank uncertainty needs a DMUH run (a momentum network)")

    def _search(self, packed, k, rerank, depth, tau, uncertainty, features) -> Dict[str, Any]:
        """One query of a request: `search_batch`, its one row of results."""
        report = self.search_batch(Query(packed, uncertainty, features), k, rerank, depth, tau)
        report["results"] = report["results"][0]
        return report

    def search_batch(
        self,
        query: Query,
        k: int,
        rerank: Optional[str] = None,
        depth: Optional[int] = None,
        tau: Optional[float] = None,
        params: Optional[SearchParams] = None,
    ) -> Dict[str, Any]:
        """Search (and re-rank, `rerank` one of `RERANK_MODES`) queries, packed codes with what the
        re-ranking reads (`dmuh.retrieval.rerank.Query`); `params` apply to the Hamming search.
        {"k", "rerank", "results": per query its rows (`result_rows`), "depth" and "tau" as used}."""
        for value, flag in ((depth, "depth"), (tau, "tau")):
            if value is not None and (
                rerank is None
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value > 0
                or (flag == "depth" and not isinstance(value, int))
            ):
                raise DmuhError(
                    f"{flag}={value!r}: expected a positive {'integer' if flag == 'depth' else 'number'}, with rerank"
                )
        depth = int(depth or DEFAULT_RERANK_DEPTH)
        tau = float(tau or DEFAULT_TAU)
        scores = {}
        if rerank is None:
            distances, positions = self.index.search_positions(query.codes, k, params)
        else:
            reranker = reranker_for(rerank, self.index, tau)
            result = RerankedIndex(self.index, reranker, depth).search(query, k, params)
            distances, positions = result["distances"], result["positions"]
            scores[SCORE_COLUMNS[reranker.score]] = result[reranker.score]
        rows = result_rows(self.index, positions, distances, **scores)
        report: Dict[str, Any] = {"k": k, "rerank": rerank, "results": rows}
        if rerank is not None:
            report["depth"] = depth
        if rerank == "uncertainty":
            report["tau"] = tau
        return report

    def _describe(self, packed: np.ndarray, uncertainty: Optional[np.ndarray]) -> Dict[str, Any]:
        """The query's code (0/1 string), and with bit uncertainty its image-level uncertainty and
        its most uncertain bits."""
        bits = unpack_bits(packed, self.index.bits)[0]
        query: Dict[str, Any] = {
            "code": "".join("1" if b > 0 else "0" for b in bits),
            "uncertainty": None,
            "uncertain_bits": [],
        }
        if uncertainty is not None:
            u = np.asarray(uncertainty, dtype=np.float64)[0]
            query["uncertainty"] = float(u.mean())
            top = np.argsort(-u, kind="stable")[:UNCERTAIN_BITS_SHOWN]
            query["uncertain_bits"] = [{"bit": int(b), "uncertainty": float(u[b])} for b in top]
        return query
