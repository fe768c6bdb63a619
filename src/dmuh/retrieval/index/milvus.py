"""Binary codes in a Milvus collection: `MilvusIndex`, a backend of the index contract
(`dmuh.retrieval.index.base.CodeIndex`), as `dmuh.retrieval.index.faiss.FaissIndex` is on FAISS.

    index = build_index(codes, kind="flat", backend="milvus", uri="codes.db", collection="photos")
    index.save("photos.dmuhidx"); index = open_index("photos.dmuhidx")     # dmuh.retrieval.index; as FAISS

`uri` is a Milvus Lite file (`FILE.db`: Milvus run inside this process, `pip install
'dmuh[milvus]'`) or a Milvus server or cluster (`http://HOST:19530`). The collection has the
fields

    pos   INT64, the primary key: the code's position, in the order codes were added
    id    INT64, the user id
    name  VARCHAR, the path (empty when the index has no names)
    code  BINARY_VECTOR of 8 * ceil(bits / 8) bits, padding bits zero, searched by HAMMING distance

and, as its description, JSON: format "dmuh-milvus", bits, kind, has_names, meta (the model's
identity, image size, ...) and a token drawn at build time. The index file (`dmuh.retrieval.index.file`,
header `backend: "milvus"`) names the uri, the collection and the token, and records the next
position and id to give out; `open_index` checks that the collection exists, carries the same
token (it was not rebuilt since) and holds codes of the file's bit length.

Kinds: flat (BIN_FLAT, exact) and ivf (BIN_IVF_FLAT with nlist lists, nprobe searched; needs a
server: Milvus Lite has BIN_FLAT only). Results are ordered by (distance, position), as with FAISS.
Milvus returns codes at equal distance in no defined order, so a flat search asks for a window of
max(2k, k + 64) codes and re-sorts it; while the codes at the k-th distance may reach past the
window, it asks again with an 8 times wider one (up to Milvus's 16,384), and past that it completes
them with searches restricted to smaller positions (`pos < bound`) until every code at that
distance below the bound is known. A flat result is therefore exactly FAISS flat's: the k
smallest (distance, position) pairs. ivf is approximate: the codes Milvus finds, re-sorted.
Distances are Milvus's (exact Hamming counts of the stored codes).

Adding inserts rows at positions from the next position on, and is committed by `save`: searches
only see positions below the commit, so an add that was interrupted before its save (a killed
`dmuh index add`, a server that went down) is never searched, and the next add deletes its rows
first; rerunning it therefore ends with each code exactly once (positions are the primary keys and
only the committed ones count). On Milvus Lite the index file is the commit (its next position). On
a server the commit is also written into the collection's properties (`dmuh.next_position`,
`dmuh.next_id`) before the file, and every reader reads it at each search: several `dmuh serve`
processes (on any machines) over one collection see an add once it is saved, and a copy of the index
file that is behind still opens at the collection's commit. If a command dies between the
collection's commit and the file's rename, the add is done (`dmuh index info` counts it). Removing
deletes the rows at once. One writer at a time: two processes must not add to one collection at
once (`dmuh index add` locks its index file; writers on other machines must take turns).

Consistency: on a server a Strong read waits for the next time tick (~0.3 s), so searches and
lookups read at Bounded consistency (what the query nodes have consumed, no wait), and each write
(an add, a remove, a commit) waits once, with a Strong count, until its rows are visible before it
returns. A server's credentials come from the environment variable DMUH_MILVUS_TOKEN
("user:password" or an API key), never from the index file.

pymilvus is imported on first use, and every Milvus failure (connection, a missing collection, a
refused request) is a one-line DmuhError; a server that is down, restarting or still loading the
collection is an `UnavailableError` (`dmuh serve` answers 503), and the next call connects again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np

from dmuh.errors import ConfigError, DmuhError, UnavailableError, first_line
from dmuh.retrieval.index.base import (
    CodeIndex,
    SearchParams,
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
from dmuh.retrieval.index.file import FORMAT, FORMAT_VERSION, write_index_file
from dmuh.utils.io import parse_json

MILVUS_KINDS = ("flat", "ivf")
INDEX_TYPES = {"flat": "BIN_FLAT", "ivf": "BIN_IVF_FLAT"}
KIND_PARAMS: Dict[str, Dict[str, Optional[int]]] = {"flat": {}, "ivf": {"nlist": None, "nprobe": None}}
DESCRIPTION_FORMAT = "dmuh-milvus"
DEFAULT_COLLECTION = "codes"
SERVER_SCHEMES = ("http", "https", "tcp", "grpc", "unix")
DEFAULT_PORT = 19530
MAX_TOPK = 16384  # Milvus's limit on the results of one query (and on the rows of one query() page)
NAME_LENGTH = 65535  # VARCHAR's largest max_length, in bytes
CONNECT_TIMEOUT_S = 10.0
INSERT_BATCH = 10_000  # rows per insert request
LOOKUP_BATCH = 4096  # positions or ids per `pos in [...]` query
HITS_PER_REQUEST = 1 << 18  # queries x limit per search request
ROW_CACHE = 1 << 20  # rows (id, name, code) kept after a lookup
WINDOW_GROWTH = 8  # how much a flat search widens its window while the k-th distance's codes reach past it
RETRIES = 3  # pymilvus retries a failed call 75 times by default (minutes on a refused request)
# A server's credentials ("user:password", or an API key) come from this environment variable: a
# secret on a command line is visible to every user of the machine, and an index file is shared.
TOKEN_VARIABLE = "DMUH_MILVUS_TOKEN"
INDEX_WAIT_S = 600.0
# A server searches codes in a growing (unflushed) segment by brute force in its own loop, ~8x slower
# than a sealed BIN_FLAT segment (200,000 codes, measured): a build of this many codes or more is
# flushed and indexed before it returns (an ivf build always: its lists exist only then).
SETTLE_ROWS = 10_000  # how long a build on a server waits for Milvus to index the flushed codes
# The commit of a collection on a server, in its properties: every reader (any process, any
# machine) searches the positions below it. Milvus Lite has no collection properties: there the
# index file alone commits.
NEXT_POSITION_PROPERTY = "dmuh.next_position"
NEXT_ID_PROPERTY = "dmuh.next_id"
# Reads see what the query nodes have consumed (Bounded: no wait); a write waits once, with a
# Strong query, until its rows are visible before it commits or returns (see the module's docstring).
READ = {"consistency_level": "Bounded"}
STRONG = {"consistency_level": "Strong"}
# What pymilvus and gRPC say when the server is down, restarting or still loading the collection:
# the request may succeed later (UnavailableError, a 503 in `dmuh serve`).
_UNAVAILABLE = (
    "unavailable",
    "failed to connect",
    "connection refused",
    "retry timeout",
    "deadline exceeded",
    "deadline_exceeded",
    "not loaded",
    "not ready",
    "create connection first",
    "server unavailable",
    "socket closed",
    "connection reset",
)
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")

# One client per uri in this process (pymilvus shares one connection per uri anyway), kept open
# for the process's next index of that uri: starting a Milvus Lite server takes a second or two.
_CLIENTS: Dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


# -- pymilvus, quietly --------------------------------------------------------------------------


class _NoMilvusLiteLog(logging.Filter):
    """Milvus Lite logs its failures on the root logger; dmuh reports them itself, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "milvus_lite" not in record.pathname


_NO_LITE_LOG = _NoMilvusLiteLog()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # milvus-lite 2.5 imports pkg_resources, which warns on import (milvus-lite is imported on connecting).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        yield


def _pymilvus():
    try:
        with _quiet():
            import pymilvus  # noqa: PLC0415 - lazy: only the milvus backend needs it
    except ImportError:
        raise DmuhError("the milvus backend needs pymilvus and milvus-lite: pip install 'dmuh[milvus]'") from None
    # pymilvus logs every failed call at ERROR before raising it, Milvus Lite on the root logger;
    # dmuh turns each failure into one line of its own.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger().addFilter(_NO_LITE_LOG)
    return pymilvus


@contextlib.contextmanager
def milvus_errors(what: str) -> Iterator[None]:
    """pymilvus's and gRPC's exceptions as a DmuhError "what: first line of the message"."""
    import grpc  # noqa: PLC0415 - installed with pymilvus
    from pymilvus.exceptions import MilvusException  # noqa: PLC0415

    try:
        with _quiet():
            yield
    except (MilvusException, grpc.RpcError) as error:
        line = first_line(error)
        code = error.code() if isinstance(error, grpc.RpcError) else None
        text = f"{line} {error}".lower()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or any(
            needle in text for needle in _UNAVAILABLE
        ):
            raise UnavailableError(f"{what}: the Milvus server does not answer now ({line})") from None
        raise DmuhError(f"{what}: {line}") from None


# -- where: the uri and the collection ----------------------------------------------------------


def is_server(uri: str) -> bool:
    return urlparse(str(uri)).scheme.lower() in SERVER_SCHEMES


def normalise_uri(uri) -> str:
    """A server uri as given; a Milvus Lite file as an absolute path (the index file is read from
    anywhere)."""
    if uri is None or not str(uri).strip():
        raise DmuhError("the milvus backend needs --uri: a Milvus Lite file (FILE.db) or a server (http://HOST:19530)")
    uri = str(uri).strip()
    if is_server(uri):
        return uri
    if not uri.endswith(".db"):
        raise ConfigError(
            f"uri {uri}: expected a Milvus Lite file ending in .db or a server uri "
            f"({', '.join(s + '://' for s in SERVER_SCHEMES[:4])}HOST:{DEFAULT_PORT})",
            field="uri",
        )
    return str(Path(uri).expanduser().resolve())


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _COLLECTION_NAME.match(name):
        raise ConfigError(
            f"collection {name!r}: a Milvus collection name is a letter or _ followed by letters, "
            "digits and _ (at most 255)",
            field="collection",
        )
    return name


def collection_name_for(path) -> str:
    """The default collection of an index file: its name without suffix, letters, digits and _ only."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).stem)[:255] or DEFAULT_COLLECTION
    return name if re.match(r"[A-Za-z_]", name) else ("_" + name)[:255]


def _check_reachable(uri: str) -> None:
    """Fail fast, with the reason, when nothing listens at a server uri (pymilvus would wait out
    its timeout and say only "server unavailable")."""
    parsed = urlparse(uri)
    if parsed.scheme.lower() == "unix" or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme.lower() == "https" else DEFAULT_PORT)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise UnavailableError(
            f"uri {uri}: cannot reach a Milvus server at {parsed.hostname}:{port} ({reason.lower()})", field="uri"
        ) from None


_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_lite_file(uri: str) -> None:
    """An existing Milvus Lite file is what Milvus Lite writes (an SQLite database) and whole: a
    folder, a foreign file or a truncated database is one line here, not a failed start of
    Milvus Lite blamed on another process. A missing file is made by Milvus Lite."""
    path = Path(uri)
    if not path.exists():
        return
    if not path.is_file():
        raise ConfigError(f"uri {uri}: is a folder, not a Milvus Lite file", field="uri")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as error:
        raise ConfigError(f"uri {uri}: cannot read it ({error.strerror or error})", field="uri") from None
    if size == 0:
        return
    if len(head) < 100 or not head.startswith(_SQLITE_MAGIC):
        raise ConfigError(f"uri {uri}: not a Milvus Lite database (no SQLite header)", field="uri")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    if page_size < 512 or page_size & (page_size - 1):
        raise ConfigError(f"uri {uri}: not a Milvus Lite database (SQLite page size {page_size})", field="uri")
    valid_for, counter = head[92:96], head[24:28]
    if size < page_size or (valid_for == counter and pages and size < pages * page_size):
        raise ConfigError(
            f"uri {uri}: truncated Milvus Lite database ({size:,} bytes, its header says {pages * page_size:,})",
            field="uri",
        )


def _open_client(uri: str, create: bool):
    pymilvus = _pymilvus()
    with _CLIENTS_LOCK:
        if not is_server(uri) and not create and not Path(uri).exists():
            _release(uri)  # a server whose file is gone serves nothing that was in it
            raise DmuhError(f"Milvus Lite file {uri} not found")
        if uri in _CLIENTS:
            return _CLIENTS[uri]
        if is_server(uri):
            _check_reachable(uri)
        else:
            check_lite_file(uri)
            try:
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ConfigError(
                    f"uri {uri}: cannot create its folder ({error.strerror or error})", field="uri"
                ) from None
        try:
            with milvus_errors(f"--uri {uri}"):
                token = os.environ.get(TOKEN_VARIABLE, "") if is_server(uri) else ""
                client = pymilvus.MilvusClient(uri=uri, token=token, timeout=CONNECT_TIMEOUT_S)
        except DmuhError as error:
            if not is_server(uri) and "Open local milvus failed" in str(error):
                raise DmuhError(
                    f"Milvus Lite file {uri}: cannot open it (another process may be using it: Milvus "
                    "Lite serves one process; use a Milvus server for several)"
                ) from None
            raise
        _CLIENTS[uri] = client
        return client


def _release(uri: str) -> None:
    """Close the client of `uri` and stop this process's Milvus Lite server of it (lock held)."""
    client = _CLIENTS.pop(uri, None)
    if client is None:
        return
    with contextlib.suppress(Exception):  # letting go never fails a command
        with _quiet():
            client.close()
            if not is_server(uri):
                from milvus_lite.server_manager import server_manager_instance  # noqa: PLC0415

                server_manager_instance.release_server(uri)


def _drop_client(uri: str, client) -> None:
    """Forget `client` of a server that stopped answering: the next call opens a new connection
    (gRPC's own reconnection backs off up to two minutes)."""
    with _CLIENTS_LOCK:
        if _CLIENTS.get(uri) is client:
            _release(uri)


def close_connections() -> None:
    """Close every Milvus connection of this process (and stop its Milvus Lite servers); the next
    index opens its own again. Exit does it too."""
    with _CLIENTS_LOCK:
        for uri in list(_CLIENTS):
            _release(uri)


def _committed_in(described) -> Tuple[int, int]:
    """(next position, next id) a server's collection records as committed; (0, 0) where it records
    none (Milvus Lite, or a collection an older dmuh built)."""
    properties = (described or {}).get("properties") or {}
    try:
        return int(properties.get(NEXT_POSITION_PROPERTY, 0)), int(properties.get(NEXT_ID_PROPERTY, 0))
    except (TypeError, ValueError):
        return 0, 0


def _code_bytes(value) -> bytes:
    """A BINARY_VECTOR as pymilvus returns it: bytes, or a list holding the bytes."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    return bytes(value)


def _chunks(values: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class MilvusIndex(CodeIndex):
    """Codes in a Milvus collection (see the module's docstring); built by `build` (or `build_index(...,
    backend="milvus")`), opened by `dmuh.retrieval.index.open_index` of its index file."""

    backend = "milvus"

    def __init__(
        self,
        uri: str,
        collection: str,
        kind: str,
        bits: int,
        params: Dict[str, int],
        has_names: bool,
        meta: Dict[str, Any],
        token: str,
        next_position: int,
        next_id: int,
    ):
        self.uri = uri
        self.collection = collection
        self.kind = kind
        self.bits = int(bits)
        self.params = dict(params)
        self._has_names = bool(has_names)
        self.meta = dict(meta or {})
        self.token = token
        self.next_position = int(next_position)
        self.next_id = int(next_id)
        self.decoder = None
        self.client = None  # None after the server stopped answering: the next call connects again
        self._closed = False
        self._connect_lock = threading.Lock()
        self._count = 0
        self._committed_seen: Optional[int] = None  # the server's commit when `_count` was last counted
        self._visible_at: Optional[int] = None  # next_position when a Strong query last saw every row
        self._fresh = False  # a collection this object just created: no rows of an earlier add in it
        self._rows: Dict[int, Tuple[int, str, bytes]] = {}  # position -> (id, name, code), from lookups
        self._all: Optional[Tuple[np.ndarray, np.ndarray, List[str]]] = None  # every (position, id, name)
        self._rows_lock = threading.RLock()  # the two caches above, under concurrent searches

    # -- building and opening -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        codes,
        kind: str = "flat",
        *,
        uri=None,
        collection: str = DEFAULT_COLLECTION,
        bits: Optional[int] = None,
        ids=None,
        names: Optional[Sequence[str]] = None,
        meta: Optional[Dict[str, Any]] = None,
        force: bool = False,
        **params,
    ) -> "MilvusIndex":
        """A new collection `collection` at `uri` holding `codes` (ids default to 0..n-1, names to
        the codes' own ids). An existing collection of that name is refused, or with `force`
        dropped and recreated. ivf: nlist (default round(sqrt(n)), at most n / 39) and nprobe
        (nlist // 16), as the FAISS ivf."""
        if kind not in MILVUS_KINDS:
            kinds = ", ".join(f"{k} ({INDEX_TYPES[k]})" for k in MILVUS_KINDS)
            raise DmuhError(f"index kind {kind!r}: the milvus backend has {kinds}")
        packed, bits, names, meta = build_inputs(codes, bits, names, meta)
        n = packed.shape[0]
        resolved = resolve_params(kind, KIND_PARAMS, params, n)
        check_collection_name(collection)
        uri = normalise_uri(uri)
        if kind == "ivf" and not is_server(uri):
            raise ConfigError(
                f"kind ivf (BIN_IVF_FLAT) needs a Milvus server: Milvus Lite ({uri}) has BIN_FLAT only", field="kind"
            )
        index = cls(uri, collection, kind, bits, resolved, names is not None, meta or {}, uuid.uuid4().hex, 0, 0)
        index.client = _open_client(uri, create=True)
        try:
            index._create(force)
            index._fresh = True
            index.add(packed, ids, names)
            if is_server(uri):  # committed; ivf or many codes: sealed and indexed first
                if kind == "ivf" or n >= SETTLE_ROWS:
                    index._settle()
                index._commit()
        except BaseException:
            index.close()
            raise
        return index

    def _create(self, force: bool) -> None:
        pymilvus = _pymilvus()
        where = f"Milvus collection {self.collection!r} at {self.uri}"
        with milvus_errors(where):
            if self.client.has_collection(self.collection, retry_times=RETRIES):
                if not force:
                    raise DmuhError(f"{where} already exists; pass --force to drop and recreate it")
                self.client.drop_collection(self.collection, retry_times=RETRIES)
            description = json.dumps(
                {
                    "format": DESCRIPTION_FORMAT,
                    "version": 1,
                    "bits": self.bits,
                    "kind": self.kind,
                    "has_names": self._has_names,
                    "meta": self.meta,
                    "token": self.token,
                }
            )
            schema = pymilvus.MilvusClient.create_schema(
                auto_id=False, enable_dynamic_field=False, description=description
            )
            schema.add_field("pos", pymilvus.DataType.INT64, is_primary=True)
            schema.add_field("id", pymilvus.DataType.INT64)
            schema.add_field("name", pymilvus.DataType.VARCHAR, max_length=NAME_LENGTH)
            schema.add_field("code", pymilvus.DataType.BINARY_VECTOR, dim=8 * byte_width(self.bits))
            index_params = self.client.prepare_index_params()
            index_params.add_index(
                field_name="code",
                index_type=INDEX_TYPES[self.kind],
                metric_type="HAMMING",
                params={"nlist": self.params["nlist"]} if self.kind == "ivf" else {},
            )
            # Strong for what asks for no level (deletes by filter, the row iterator); searches and
            # lookups ask for Bounded, and each write waits for its rows itself (module docstring).
            self.client.create_collection(
                self.collection, schema=schema, consistency_level="Strong", retry_times=RETRIES
            )
            self.client.create_index(self.collection, index_params, retry_times=RETRIES)
            self._load()

    def _load(self) -> None:
        """Load the collection: asked for, then waited for here (pymilvus polls once a second)."""
        with milvus_errors(f"Milvus collection {self.collection!r} at {self.uri}: load"):
            client = self._client()
            client.load_collection(self.collection, _async=True, retry_times=RETRIES)
            deadline = time.monotonic() + INDEX_WAIT_S
            while "Loaded" not in str(client.get_load_state(self.collection, retry_times=RETRIES).get("state")):
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"Milvus collection {self.collection!r} at {self.uri}: not loaded in {INDEX_WAIT_S:g} s"
                    )
                time.sleep(0.05)

    @classmethod
    def from_file(cls, path: Path, header: Dict[str, Any], sections: Dict[str, bytes]) -> "MilvusIndex":
        """The index a verified index file of backend "milvus" names, its collection checked."""
        milvus = header.get("milvus")
        fields = ("uri", "collection", "token", "next_position")
        if not isinstance(milvus, dict) or any(field not in milvus for field in fields) or "next_id" not in header:
            raise DmuhError(f"{path}: corrupted index (its header lacks the Milvus uri, collection or token)")
        if header["kind"] not in MILVUS_KINDS:
            raise DmuhError(f"{path}: corrupted index (kind {header['kind']!r} on the milvus backend)")
        index = cls(
            milvus["uri"],
            milvus["collection"],
            header["kind"],
            header["bits"],
            header["params"],
            header.get("has_names", False),
            header.get("meta") or {},
            milvus["token"],
            milvus["next_position"],
            header["next_id"],
        )
        index.client = _open_client(index.uri, create=False)
        try:
            index._check_collection(path)
            index.decoder = decoder_from_sections(path, header, sections, index.bits)
        except BaseException:
            index.close()
            raise
        return index

    def _check_collection(self, path: Path) -> None:
        where = f"Milvus collection {self.collection!r} at {self.uri}"
        with milvus_errors(f"{path}: {where}"):
            if not self.client.has_collection(self.collection, retry_times=RETRIES):
                raise DmuhError(
                    f"{path}: {where} not found (dropped? rebuild it with `dmuh index build --backend milvus`)"
                )
            described = self.client.describe_collection(self.collection, retry_times=RETRIES)
            try:
                description = parse_json(described.get("description") or "")
            except ValueError:
                description = None
            if not isinstance(description, dict) or description.get("format") != DESCRIPTION_FORMAT:
                raise DmuhError(f"{path}: {where} is not a collection dmuh built")
            if description.get("token") != self.token:
                raise DmuhError(
                    f"{path}: {where} was rebuilt after this index file was written (it holds other "
                    "codes now); use the index file of that build"
                )
            dims = [f.get("params", {}).get("dim") for f in described.get("fields", []) if f.get("name") == "code"]
            if description.get("bits") != self.bits or not dims or int(dims[0]) != 8 * byte_width(self.bits):
                raise DmuhError(
                    f"{path}: corrupted index (the file says {self.bits}-bit codes, {where} holds "
                    f"{description.get('bits')}-bit codes)"
                )
            self.meta = dict(description.get("meta") or {})  # the collection's: it is what the codes came from
            self._has_names = bool(description.get("has_names"))
            self.client.load_collection(self.collection, retry_times=RETRIES)
            # On a server the collection's commit is the truth: another index file (a replica's copy)
            # may have added since this file was written.
            committed = _committed_in(described)
            self.next_position = max(self.next_position, committed[0])
            self.next_id = max(self.next_id, committed[1])
        self._count = self._live_count(self.next_position)
        self._committed_seen = committed[0]

    def close(self) -> None:
        """This index is done with its connection (which stays open for the process's next index
        of the uri; `close_connections` closes them all)."""
        self._closed = True
        self.client = None

    # -- Milvus calls ---------------------------------------------------------------------------

    def _client(self):
        if self._closed:
            raise DmuhError(f"Milvus collection {self.collection!r} at {self.uri}: this index was closed")
        client = self.client
        if client is None:  # the server stopped answering earlier: connect again (a 503 until it answers)
            with self._connect_lock:
                if self.client is None:
                    self.client = _open_client(self.uri, create=False)
                client = self.client
        return client

    def _call(self, what: str, method: str, *args, **kwargs):
        client = self._client()
        try:
            with milvus_errors(f"Milvus collection {self.collection!r} at {self.uri}: {what}"):
                return getattr(client, method)(self.collection, *args, retry_times=RETRIES, **kwargs)
        except UnavailableError:
            if is_server(self.uri):
                _drop_client(self.uri, client)
                with self._connect_lock:
                    if self.client is client:
                        self.client = None
            raise

    def _bound(self) -> int:
        """The first position past the committed codes: this object's next position (its own adds
        included), or on a server the collection's commit when another writer moved it further
        (then the count is read again)."""
        if not is_server(self.uri):
            return self.next_position
        committed, _ = _committed_in(self._call("read the commit", "describe_collection"))
        bound = max(self.next_position, committed)
        if committed != self._committed_seen:
            self._count = self._live_count(bound)
            self._committed_seen = committed
            with self._rows_lock:
                self._all = None
        return bound

    def _live_count(self, bound: int, strong: bool = False) -> int:
        rows = self._call(
            "count", "query", filter=f"pos < {bound}", output_fields=["count(*)"], **(STRONG if strong else READ)
        )
        return int(rows[0]["count(*)"])

    def _settle(self) -> None:
        """Seal the inserted codes and wait until Milvus has indexed them (a server builds
        BIN_IVF_FLAT's lists per sealed segment; growing segments are searched by brute force)."""
        self._call("flush", "flush")
        with milvus_errors(f"Milvus collection {self.collection!r} at {self.uri}: index"):
            names = self._client().list_indexes(self.collection, retry_times=RETRIES) or [""]
        deadline = time.monotonic() + INDEX_WAIT_S
        while True:
            state = self._call("index state", "describe_index", index_name=names[0]) or {}
            if int(state.get("pending_index_rows", 0) or 0) == 0 and str(state.get("state", "Finished")) in (
                "Finished",
                "IndexState.Finished",
                "3",
            ):
                break
            if str(state.get("state")) in ("Failed", "IndexState.Failed", "4"):
                raise DmuhError(
                    f"Milvus collection {self.collection!r} at {self.uri}: building the index failed "
                    f"({state.get('fail_reason') or 'no reason given'})"
                )
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"Milvus collection {self.collection!r} at {self.uri}: the index was not built in {INDEX_WAIT_S:g} s"
                )
            time.sleep(0.5)
        # A query node keeps searching a flushed segment's growing copy until it hands over to the
        # indexed one; loading again takes the indexed segments.
        self._call("release", "release_collection")
        self._load()

    def _commit(self) -> None:
        """Make the positions below `next_position` the committed ones: wait (a Strong query) until
        they are visible to every search, then, on a server, write the commit into the collection's
        properties. Nothing past it is searched, so an add that did not get here is invisible."""
        if self._visible_at != self.next_position:
            self._count = self._live_count(self.next_position, strong=True)
            self._visible_at = self.next_position
        if is_server(self.uri):
            self._call(
                "commit",
                "alter_collection_properties",
                properties={NEXT_POSITION_PROPERTY: str(self.next_position), NEXT_ID_PROPERTY: str(self.next_id)},
            )
            self._committed_seen = self.next_position

    def _search(
        self, packed: np.ndarray, limit: int, params: Dict[str, Any], where: str
    ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(distances int32, positions int64) of each query's `limit` nearest codes among `where`."""
        data = [row.tobytes() for row in packed]
        per_request = max(1, min(MAX_TOPK, HITS_PER_REQUEST // max(1, limit)))
        found = []
        for batch in _chunks(data, per_request):
            result = self._call(
                "search",
                "search",
                data=list(batch),
                limit=int(limit),
                filter=where,
                search_params=params,
                anns_field="code",
                **READ,
            )
            for hits in result:  # pymilvus 2.5 keeps each query's ids and distances as lists too
                ids = getattr(hits, "ids", None)
                scores = getattr(hits, "distances", None)
                if ids is None or scores is None:
                    ids, scores = [hit["id"] for hit in hits], [hit["distance"] for hit in hits]
                found.append(
                    (np.rint(np.array(scores, dtype=np.float64)).astype(np.int32), np.array(ids, dtype=np.int64))
                )
        return found

    # -- adding and removing --------------------------------------------------------------------

    def add(self, codes, ids=None, names: Optional[Sequence[str]] = None) -> None:
        """Insert codes at the next positions; ids default to the next ids (one past the largest
        given so far). The index file's `save` commits them (see the module's docstring)."""
        packed, ids = self._add_inputs(codes, ids, names)
        n = packed.shape[0]
        names = [str(name) for name in names] if names is not None else [""] * n
        for name in names:
            if len(name.encode("utf-8")) > NAME_LENGTH:
                raise DmuhError(f"name {name[:60]!r}...: longer than Milvus's {NAME_LENGTH} bytes")
        # Rows of an add interrupted before its commit: not part of the index, and in the way (a
        # Strong query first, so that rows a killed writer sent just now are seen and deleted too).
        start = self._bound()
        self.next_position = start
        if (
            not self._fresh
            and self._call(
                "find uncommitted rows", "query", filter=f"pos >= {start}", output_fields=["count(*)"], **STRONG
            )[0]["count(*)"]
        ):
            self._call("clear uncommitted rows", "delete", filter=f"pos >= {start}")
        self._fresh = False
        for offset in range(0, n, INSERT_BATCH):
            stop = min(offset + INSERT_BATCH, n)
            rows = [
                {"pos": start + i, "id": int(ids[i]), "name": names[i], "code": packed[i].tobytes()}
                for i in range(offset, stop)
            ]
            self._call("insert", "insert", data=rows)
        self.next_position = start + n
        self.next_id = max(self.next_id, next_id_after(ids))
        with self._rows_lock:
            self._all = None
        # Visible to this object's searches (which read at Bounded consistency) before this returns.
        self._count = self._live_count(self.next_position, strong=True)
        self._visible_at = self.next_position

    def remove(self, ids) -> int:
        """Delete every code whose id is one of `ids`; returns how many were deleted. An id the
        collection does not hold is an error, and then nothing is deleted."""
        wanted = unique_ids(ids)
        bound = self._bound()
        positions, found = [], []
        for batch in _chunks(wanted.tolist(), LOOKUP_BATCH):
            rows = self._call(
                "find ids",
                "query",
                filter=f"id in {list(batch)} and pos < {bound}",
                output_fields=["pos", "id"],
                **STRONG,
            )
            positions += [int(row["pos"]) for row in rows]
            found += [int(row["id"]) for row in rows]
        check_ids_known(wanted, np.array(found, dtype=np.int64), f"Milvus collection {self.collection!r}")
        for batch in _chunks(positions, LOOKUP_BATCH):
            self._call("delete", "delete", ids=list(batch))
        with self._rows_lock:
            for position in positions:
                self._rows.pop(position, None)
            self._all = None
        # Visible to every search (of any process) before this returns.
        self._count = self._live_count(self._bound(), strong=True)
        self._visible_at = self.next_position
        return len(positions)

    def ids_named(self, names: Sequence[str]) -> np.ndarray:
        """The ids of the codes whose name (path) is one of `names` (every code of a repeated name)."""
        if not self.has_names:
            raise DmuhError("this index holds no names (paths) of its codes; give ids")
        wanted = sorted(set(str(name) for name in names))
        bound = self._bound()
        ids, seen = [], set()
        for batch in _chunks(wanted, LOOKUP_BATCH):
            literal = "[" + ", ".join(json.dumps(name, ensure_ascii=False) for name in batch) + "]"
            rows = self._call(
                "find names",
                "query",
                filter=f"name in {literal} and pos < {bound}",
                output_fields=["id", "name"],
                **STRONG,
            )
            ids += [int(row["id"]) for row in rows]
            seen.update(row["name"] for row in rows)
        absent = [name for name in wanted if name not in seen]
        if absent:
            raise DmuhError(f"name {absent[0]!r} is not in the index; nothing removed")
        return np.array(ids, dtype=np.int64)

    def __len__(self) -> int:
        return self._count

    @property
    def has_names(self) -> bool:
        return self._has_names

    # -- searching ------------------------------------------------------------------------------

    def _search_packed(self, packed: np.ndarray, k: int, search: SearchParams) -> Tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query by (Hamming distance, position): (distances int32 (nq, k),
        positions int64 (nq, k), -1 where an ivf search found fewer); nprobe per request."""
        if k > MAX_TOPK:
            raise DmuhError(f"k={k}: a Milvus search returns at most {MAX_TOPK} codes a query")
        params: Dict[str, Any] = {"metric_type": "HAMMING"}
        if self.kind == "ivf":
            params["params"] = {"nprobe": int(search.nprobe or self.params["nprobe"])}
        distances = np.full((packed.shape[0], k), -1, dtype=np.int32)
        positions = np.full((packed.shape[0], k), -1, dtype=np.int64)
        # flat: a window of nearest codes, widened (x WINDOW_GROWTH, all open queries in one request)
        # while the codes at the k-th distance may reach past it; ivf: the k codes Milvus finds.
        # Fewer codes than the window returned: every code was. (Not len(self): another process may
        # have added or removed since it was counted.)
        window = k if self.kind == "ivf" else min(MAX_TOPK, max(2 * k, k + 64))
        committed = f"pos < {self._bound()}"  # one commit for every request of this search
        pending = np.arange(packed.shape[0])
        while len(pending):
            still = []
            for q, (d, p) in zip(pending, self._search(packed[pending], window, params, committed)):
                order = np.lexsort((p, d))
                d, p = d[order], p[order]
                if self.kind == "flat" and len(p) == window and d[-1] == d[k - 1]:
                    if window < MAX_TOPK:
                        still.append(q)
                        continue
                    d, p = self._complete_ties(packed[q : q + 1], d, p, k, params, committed)
                distances[q, : min(k, len(p))], positions[q, : min(k, len(p))] = d[:k], p[:k]
            pending = np.array(still, dtype=np.int64)
            window = min(MAX_TOPK, window * WINDOW_GROWTH)
        return ordered_by_distance_then_position(distances, positions)

    def _complete_ties(
        self, query: np.ndarray, d: np.ndarray, p: np.ndarray, k: int, params: Dict[str, Any], committed: str
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The exact k nearest by (distance, position) when the window ends inside the codes at the
        k-th distance D: every code nearer than D is in the window; the codes at D with the smallest
        positions are found by searching below a bound that only falls (each round returns at
        least `need` codes at D below it, since the limit is at least k)."""
        kth = d[k - 1]
        nearer = d < kth
        need = k - int(nearer.sum())
        tied = set(p[d == kth].tolist())
        limit = MAX_TOPK
        while True:
            bound = sorted(tied)[need - 1]  # a better code at D has a smaller position
            [(dd, pp)] = self._search(query, limit, params, f"pos < {bound} and {committed}")
            tied.update(pp[dd == kth].tolist())
            if len(pp) < limit or dd.max() > kth:  # every code at D below the bound was returned
                break
        best = np.array(sorted(tied)[:need], dtype=np.int64)
        return (np.concatenate([d[nearer], np.full(need, kth, dtype=np.int32)]), np.concatenate([p[nearer], best]))

    # -- what is stored at positions ------------------------------------------------------------

    def _lookup(self, positions: np.ndarray) -> Dict[int, Tuple[int, str, bytes]]:
        """(id, name, code) of each non-negative position, fetched once and cached."""
        wanted = np.unique(positions[positions >= 0]).tolist()
        with self._rows_lock:
            missing = [p for p in wanted if p not in self._rows]
            if len(self._rows) + len(missing) > ROW_CACHE:
                self._rows = {p: self._rows[p] for p in wanted if p in self._rows}
            for batch in _chunks(missing, LOOKUP_BATCH):
                rows = self._call(
                    "look up positions",
                    "query",
                    filter=f"pos in {list(batch)}",
                    output_fields=["pos", "id", "name", "code"],
                    **READ,
                )
                for row in rows:
                    self._rows[int(row["pos"])] = (int(row["id"]), row["name"], _code_bytes(row["code"]))
            gone = [p for p in missing if p not in self._rows]
            if gone:
                raise DmuhError(
                    f"Milvus collection {self.collection!r} at {self.uri}: position {gone[0]} is no "
                    "longer there (removed while searching?)"
                )
            return {p: self._rows[p] for p in wanted}

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """User ids of index positions (-1, no result, stays -1)."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self._lookup(positions)
        ids = [rows[p][0] if p >= 0 else -1 for p in positions.ravel().tolist()]
        return np.array(ids, dtype=np.int64).reshape(positions.shape)

    def names_at(self, positions: np.ndarray) -> List[List[Optional[str]]]:
        positions = np.asarray(positions, dtype=np.int64)
        if not self.has_names:
            return [[None] * len(row) for row in positions]
        rows = self._lookup(positions)
        return [[rows[p][1] if p >= 0 else None for p in row] for row in positions.tolist()]

    def codes_at(self, positions: np.ndarray) -> np.ndarray:
        """Packed codes stored at index positions (any shape of non-negative positions)."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self._lookup(positions)
        width = byte_width(self.bits)
        flat = b"".join(rows[p][2] for p in positions.ravel().tolist())
        return np.frombuffer(flat, dtype=np.uint8).reshape(*positions.shape, width).copy()

    def _every_row(self) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        """(positions, ids, names) of every code, by position: one pass over the collection."""
        bound = self._bound()
        with self._rows_lock:
            return self._every_row_locked(bound)

    def _every_row_locked(self, bound: int) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        if self._all is None:
            positions, ids, names = [], [], []
            with milvus_errors(f"Milvus collection {self.collection!r} at {self.uri}: read every row"):
                iterator = self._client().query_iterator(
                    self.collection, batch_size=MAX_TOPK, filter=f"pos < {bound}", output_fields=["pos", "id", "name"]
                )
                try:
                    while True:
                        rows = iterator.next()
                        if not rows:
                            break
                        for row in rows:
                            positions.append(int(row["pos"]))
                            ids.append(int(row["id"]))
                            names.append(row["name"])
                finally:
                    iterator.close()
            order = np.argsort(np.array(positions, dtype=np.int64), kind="stable")
            self._all = (
                np.array(positions, dtype=np.int64)[order],
                np.array(ids, dtype=np.int64)[order],
                [names[i] for i in order],
            )
        return self._all

    @property
    def ids(self) -> np.ndarray:
        """Every id, in position order (reads the whole collection once: for moderate sizes)."""
        return self._every_row()[1]

    @property
    def names(self) -> Optional[List[str]]:
        """Every name, in position order (as `ids`), or None for an index without names."""
        return self._every_row()[2] if self.has_names else None

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
            "has_names": self.has_names,
            "meta": dict(self.meta),
            "decoder": None if self.decoder is None else self.decoder.config,
            "next_id": self.next_id,
            "milvus": {"uri": self.uri, "collection": self.collection, "index_type": INDEX_TYPES[self.kind]},
        }

    def save(self, path, overwrite: bool = True) -> None:
        """Write the index file atomically: where the collection is, its token and the next
        position and id (this commits the adds made through this object)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise DmuhError(f"{path} already exists; pass --force to replace it")
        self._commit()  # on a server the collection commits; the file records it
        header = self.info()
        header["milvus"] = {**header["milvus"], "token": self.token, "next_position": self.next_position}
        write_index_file(path, header, decoder_sections(self.decoder))
