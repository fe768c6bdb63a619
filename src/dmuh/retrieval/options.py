"""The options of retrieval that the command line names (backends, index kinds and their parameters,
re-ranking modes and defaults, shard size, the service's limits): a module without torch or FAISS,
so that `dmuh --help` answers before either is loaded. The modules that use them import them here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from dmuh.errors import DmuhError

BACKENDS = ("faiss", "milvus")

KINDS = ("flat", "ivf", "hnsw")
# Build/search parameters each kind accepts, with defaults (None: derived from the data).
KIND_PARAMS: Dict[str, Dict[str, Optional[int]]] = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": None},
    "hnsw": {"m": 32, "ef_construction": 64, "ef_search": 128},
}

# How an exact (flat) FAISS-backend index finds the k nearest: dmuh's counting top-k kernel
# (`dmuh.codes.topk`, the default: faster than FAISS's IndexBinaryFlat search, same results) or FAISS's own.
FLAT_KERNELS = ("dmuh", "faiss")
DEFAULT_FLAT_KERNEL = "dmuh"

# The largest value of each index parameter: far above what helps (FAISS's HNSW gains nothing past
# M of a few dozen), far below what would take the machine's memory or wrap FAISS's 32-bit ints.
PARAM_LIMITS: Dict[str, int] = {
    "m": 256,
    "ef_construction": 1 << 16,
    "ef_search": 1 << 16,
    "nlist": 1 << 22,
    "nprobe": 1 << 22,
    "threads": 1024,  # the dmuh flat kernel's threads: far past any machine's cores
}

DEFAULT_RERANK_DEPTH = 1000
DEFAULT_TAU = 1.0
RERANK_MODES = ("uncertainty", "decoder")

DEFAULT_SHARD_SIZE = 100_000


@dataclass
class ServiceLimits:
    """What one request may ask of the service."""

    max_upload_bytes: int = 10 * 1024 * 1024  # a request body larger than this is refused (413)
    max_image_pixels: int = 40_000_000  # an image declaring more pixels is refused before decoding
    max_k: int = 1000  # results per query, and never more than the index holds
    timeout_s: float = 30.0  # a request not answered within this is given up (503)
    thumbnail_px: int = 160  # longest side of a served thumbnail
    max_text_chars: int = 2000  # a text query longer than this is refused

    def check(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise DmuhError(f"limit {name}={value!r}: expected a positive number")
            if name in SERVE_FLAG_LIMITS and not value <= SERVE_FLAG_LIMITS[name]:
                raise DmuhError(f"limit {name}={value!r}: expected at most {SERVE_FLAG_LIMITS[name]:g}")


# The largest value of each service limit (and of `dmuh serve --threads`): what one machine serves;
# past these a value is a typo (or inf), which would overflow or never time out.
SERVE_FLAG_LIMITS: Dict[str, float] = {
    "threads": 1024,
    "max_upload_bytes": 4 << 30,
    "max_image_pixels": 1 << 31,
    "max_k": 1_000_000,
    "timeout_s": 24 * 3600.0,
    "thumbnail_px": 4096,
    "max_text_chars": 1_000_000,
}
