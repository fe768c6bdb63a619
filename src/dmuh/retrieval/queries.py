"""A batch of queries for `dmuh search`, gathered from where the command line names them and encoded
by a `dmuh.retrieval.service.SearchService`'s model, which then searches them (`search_batch`), as
`dmuh serve` searches one query of a request.

    batch = gather_queries(service, codes_file="q.npz", image_paths=[...], texts=[...], rerank="uncertainty")
    report = service.search_batch(batch.query(), k=10, rerank="uncertainty")

Query codes and models are checked against the index once, by `dmuh.retrieval.service.check_compatible`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from dmuh.codes.file import Codes
from dmuh.data.images import read_image
from dmuh.errors import ConfigError, RunError
from dmuh.retrieval.rerank import Query
from dmuh.retrieval.service import check_compatible, recorded_run


@dataclass
class QueryBatch:
    """Queries with a name each (a codes file's ids, image paths, the texts): packed codes (n, bytes)
    uint8, and what the re-ranking reads: bit uncertainty (n, bits) or own features (n, D), or None."""

    names: List[str]
    codes: np.ndarray
    bit_uncertainty: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None

    def query(self) -> Query:
        return Query(self.codes, self.bit_uncertainty, self.features)


def from_codes_file(service, path: str, rerank: Optional[str], allow_other_model: bool) -> QueryBatch:
    """The query codes of a codes file written by `dmuh encode`."""
    codes = Codes.load(path)
    check_compatible(
        service.index,
        f"--index {service.index_path}",
        codes.bits,
        codes.model,
        f"--queries {path}",
        f"the codes in {path}",
        allow_other_model,
    )
    if rerank == "uncertainty" and codes.bit_uncertainty is None:
        raise ConfigError(
            f"rerank needs bit uncertainty: encode {path} with `dmuh encode --uncertainty`", field="rerank"
        )
    if rerank == "decoder" and codes.features is None:
        raise ConfigError(
            f"rerank decoder needs the queries' own features: encode {path} with `dmuh encode --features`",
            field="rerank",
        )
    uncertainty = codes.bit_uncertainty.astype(np.float32) if rerank == "uncertainty" else None
    return QueryBatch(list(codes.ids), codes.packed, uncertainty, codes.features if rerank == "decoder" else None)


def from_images(service, paths: Sequence[Path], rerank: Optional[str]) -> QueryBatch:
    """Query images encoded with the service's model (its run's), as the index's images were."""
    encoder, run = service.encoder, service.run
    if rerank == "uncertainty" and encoder.momentum_network is None:
        raise ConfigError(
            f"rerank needs a DMUH run (a momentum network); {run} was trained with {encoder.config.method!r}",
            field="rerank",
        )
    if encoder.channels is None:
        raise RunError(f"run {run} encodes feature vectors, not images; pass --queries CODES.npz", field="run")
    size = service.index.meta.get("image_size") or encoder.image_size
    images = np.stack([read_image(path, encoder.channels, size) for path in paths])
    packed, uncertainty, features = service.encode_images(images, rerank == "uncertainty", rerank == "decoder")
    return QueryBatch([str(p) for p in paths], packed, uncertainty, features)


def from_texts(service, texts: Sequence[str]) -> QueryBatch:
    """Text queries encoded by the text network of the service's cross-modal run."""
    return QueryBatch(list(texts), service.encode_texts(texts))


def gather_queries(
    service,
    codes_file: Optional[str] = None,
    image_paths: Sequence[Path] = (),
    texts: Sequence[str] = (),
    rerank: Optional[str] = None,
    run: Optional[str] = None,
    device: str = "cpu",
    allow_other_model: bool = False,
) -> QueryBatch:
    """Every query, codes file first, then the images, then the texts. Images and texts are encoded
    with `run`'s model (default: the run the index records), loaded into the service."""
    if texts and rerank is not None:
        raise ConfigError(
            f"rerank {rerank} re-ranks image queries; text queries are ranked by Hamming distance", field="rerank"
        )
    parts = []
    if codes_file is not None:
        parts.append(from_codes_file(service, codes_file, rerank, allow_other_model))
    if image_paths or texts:
        service.load_run(
            run or recorded_run(service.index, service.index_path, required=True), device, allow_other_model
        )
    if image_paths:
        parts.append(from_images(service, image_paths, rerank))
    if texts:
        parts.append(from_texts(service, texts))
    return QueryBatch(
        [name for part in parts for name in part.names],
        np.concatenate([part.codes for part in parts]),
        np.concatenate([part.bit_uncertainty for part in parts]) if rerank == "uncertainty" else None,
        np.concatenate([part.features for part in parts]) if rerank == "decoder" else None,
    )
