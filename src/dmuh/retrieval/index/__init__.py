"""Index backends behind one contract (`CodeIndex`), the index file, and the two factories.

    from dmuh.retrieval.index import build_index, open_index
    index = build_index(codes, kind="hnsw", m=32)                                   # a FaissIndex
    index = build_index(codes, backend="milvus", uri="codes.db", collection="photos")  # a MilvusIndex
    index.save("db.dmuhidx"); index = open_index("db.dmuhidx")   # the backend its file's header names

The Milvus backend (pymilvus) is optional: it is imported only when a Milvus index is built or opened.
"""

from __future__ import annotations

from pathlib import Path

from dmuh.errors import DmuhError
from dmuh.retrieval.index.base import BACKENDS, CodeIndex, SearchParams
from dmuh.retrieval.index.faiss import KINDS, FaissIndex
from dmuh.retrieval.index.file import read_index_file

__all__ = ["BACKENDS", "KINDS", "CodeIndex", "FaissIndex", "SearchParams", "build_index", "open_index"]


def build_index(codes, *, backend: str = "faiss", kind: str = "flat", **options) -> CodeIndex:
    """A new index of `kind` holding `codes`, on `backend`: faiss (`FaissIndex.build`: kinds flat, ivf,
    hnsw) or milvus (`dmuh.retrieval.index.milvus.MilvusIndex.build`: flat, ivf; uri=, collection=,
    force=). `options`: bits=, ids=, names=, meta= and the kind's parameters (nlist, nprobe, m, ...)."""
    if backend not in BACKENDS:
        raise DmuhError(f"index backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "milvus":
        from dmuh.retrieval.index.milvus import MilvusIndex  # optional: pymilvus

        return MilvusIndex.build(codes, kind, **options)
    return FaissIndex.build(codes, kind, **options)


def open_index(path) -> CodeIndex:
    """Read and verify an index file (magic, version, header CRC, payload size and sha256): a
    `FaissIndex`, or a `dmuh.retrieval.index.milvus.MilvusIndex` for a file whose header names the
    milvus backend (it connects to the collection the file names and checks it)."""
    path = Path(path)
    header, sections = read_index_file(path, KINDS)
    backend = header.get("backend", "faiss")  # files written before the milvus backend name none
    if backend == "milvus":
        from dmuh.retrieval.index.milvus import MilvusIndex  # optional: pymilvus

        return MilvusIndex.from_file(path, header, sections)
    if backend != "faiss":
        raise DmuhError(f"{path}: index backend {backend!r}; this dmuh reads {', '.join(BACKENDS)}")
    return FaissIndex.from_file(path, header, sections)
