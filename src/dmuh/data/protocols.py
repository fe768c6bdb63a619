"""Evaluation protocols: seeded query / train / database splits of a source.

A `Split` holds index arrays into the source plus the source's fingerprint. It is saved with each
run and reloaded by evaluation, which calls `Split.check(source)` so that a model is never scored
on a different data set or split by accident.

Every protocol here keeps the query apart from train and database. `split.json` carries a SHA-256
checksum of its content; loading verifies it (files of older versions have none) and checks the
split as a whole: no empty role, no index twice in a role, no query item in train or database.
`check(source)` also regenerates the split from its protocol and seed and compares the sizes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from dmuh.data.sources import PathLike, Source, to_multi_hot
from dmuh.errors import DmuhError
from dmuh.utils.io import atomic_write_text, index_list, read_json_record

SPLIT_FORMAT = "dmuh-split"
SPLIT_VERSION = 1


@dataclass(eq=False)
class Split:
    protocol: str
    seed: int
    query: np.ndarray  # int64 indices into the source
    train: np.ndarray
    database: np.ndarray
    topk: Optional[int]  # MAP@k of the protocol; None = MAP over the whole ranking
    fingerprint: str  # Source.fingerprint() of the data the split was made for ("" = unknown)
    params: dict = field(default_factory=dict)  # the protocol's parameters, for the record
    path: Optional[str] = field(default=None, repr=False)  # the split.json it was loaded from, for messages

    def __post_init__(self):
        for role in ("query", "train", "database"):
            setattr(self, role, np.asarray(getattr(self, role), dtype=np.int64))

    def _where(self) -> str:
        return str(self.path) if self.path else f"split {self.protocol!r} (seed {self.seed})"

    def _record(self) -> dict:
        return {
            "protocol": self.protocol,
            "seed": self.seed,
            "topk": self.topk,
            "fingerprint": self.fingerprint,
            "params": self.params,
            "query": self.query.tolist(),
            "train": self.train.tolist(),
            "database": self.database.tolist(),
        }

    def validate(self) -> None:
        """Refuse a split no protocol makes: an empty role, an index twice in a role, or a query
        item that is also a train or database item (the model would be scored on what it saw)."""
        where = self._where()
        for role in ("query", "train", "database"):
            indices = getattr(self, role)
            if indices.size == 0:
                raise DmuhError(f"{where}: role {role!r} is empty")
            if indices.min() < 0:
                raise DmuhError(f"{where}: role {role!r} holds the negative index {int(indices.min())}")
            unique, counts = np.unique(indices, return_counts=True)
            if len(unique) != len(indices):
                raise DmuhError(
                    f"{where}: role {role!r} holds index {int(unique[np.argmax(counts > 1)])} {int(counts.max())} times"
                )
        for role in ("train", "database"):
            shared = np.intersect1d(self.query, getattr(self, role))
            if shared.size:
                raise DmuhError(
                    f"{where}: {shared.size} query item(s) are also {role} items (e.g. index "
                    f"{int(shared[0])}); the query must be kept apart from {role}"
                )

    def __repr__(self) -> str:
        return (
            f"Split({self.protocol!r}, seed={self.seed}, query={len(self.query)}, train={len(self.train)}, "
            f"database={len(self.database)}, topk={self.topk})"
        )

    def save(self, path: PathLike) -> None:
        content = self._record()
        record = {"format": SPLIT_FORMAT, "version": SPLIT_VERSION, **content, "checksum": _checksum(content)}
        atomic_write_text(path, json.dumps(record, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: PathLike) -> "Split":
        path = Path(path)
        record = read_json_record(path, SPLIT_FORMAT, SPLIT_VERSION, "split file")
        arrays = {role: index_list(record, role, path) for role in ("query", "train", "database")}
        topk = record.get("topk")
        if topk is not None and (type(topk) is not int or not 1 <= topk < 2**31):
            raise DmuhError(f"{path}: field 'topk' must be a positive integer below 2**31 or null")
        for key, kind in (("protocol", str), ("seed", int), ("fingerprint", str), ("params", dict)):
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                raise DmuhError(f"{path}: field {key!r} missing or not a {kind.__name__}")
        if not 0 <= record["seed"] < 2**63:
            raise DmuhError(f"{path}: field 'seed' must be an integer from 0 to 2**63 - 1")
        if "checksum" in record:  # files written before checksums were added have none
            content = {key: record.get(key) for key in _CHECKSUM_FIELDS}
            if record["checksum"] != _checksum(content):
                raise DmuhError(
                    f"{path}: field 'checksum' does not match the content: the split was edited "
                    "or corrupted after it was saved"
                )
        split = cls(
            record["protocol"],
            record["seed"],
            topk=topk,
            fingerprint=record["fingerprint"],
            params=record["params"],
            path=str(path),
            **arrays,
        )
        split.validate()
        return split

    def check(self, source: Source) -> None:
        """Refuse a source other than the one the split was made for, indices beyond it, a split
        that is not whole (`validate`), or role sizes other than the protocol gives for this data."""
        where = self._where()
        # A split made on an unlabeled reading of the data carries the items' fingerprint alone.
        if self.fingerprint and self.fingerprint not in (source.fingerprint(), source.fingerprint(labels=False)):
            raise DmuhError(
                f"{where}: split {self.protocol!r} (seed {self.seed}) was made for other data: "
                f"fingerprint {self.fingerprint[:12]}..., this data {source.fingerprint()[:12]}..."
            )
        for role in ("query", "train", "database"):
            indices = getattr(self, role)
            if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
                raise DmuhError(
                    f"{where}: split {self.protocol!r}: {role} index {int(indices.max())} out of range "
                    f"for {len(source)} items"
                )
        self.validate()
        try:  # the fingerprint is compared above; "-" spares make_split hashing the data again
            expected = make_split(
                self.protocol, source, seed=self.seed, fingerprint=self.fingerprint or "-", **self.params
            )
        except DmuhError as error:
            raise DmuhError(f"{where}: cannot remake the split from its protocol to check it ({error})") from None
        for role in ("query", "train", "database"):
            have, want = len(getattr(self, role)), len(getattr(expected, role))
            if have != want:
                raise DmuhError(
                    f"{where}: role {role!r} holds {have} items, protocol {self.protocol!r} "
                    f"(seed {self.seed}) gives {want} for this data"
                )


_CHECKSUM_FIELDS = ("protocol", "seed", "topk", "fingerprint", "params", "query", "train", "database")


def _checksum(content: dict) -> str:
    """SHA-256 of the split's content, as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps({key: content[key] for key in _CHECKSUM_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Sampling helpers


class _Data:
    """What a protocol sees of the data."""

    def __init__(self, labels: np.ndarray, subsets: Optional[np.ndarray], class_names: Sequence[str]):
        self.labels = labels
        self.subsets = subsets
        self.class_names = list(class_names)

    @property
    def count(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return self.labels.shape[1]

    def all_but(self, *excluded: np.ndarray) -> np.ndarray:
        keep = np.ones(self.count, dtype=bool)
        for indices in excluded:
            keep[indices] = False
        return np.flatnonzero(keep)

    def subset(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.subsets == name)


def _sample_per_class(data: _Data, rng: np.random.Generator, counts: Sequence[int], roles: Sequence[str]) -> list:
    """Per class, draw counts[r] items for each role r among items carrying the class label and not
    chosen yet (for multi-label data an item is drawn for at most one class and one role)."""
    chosen = np.zeros(data.count, dtype=bool)
    drawn = [[] for _ in counts]
    needed = sum(counts)
    for c in range(data.num_classes):
        available = np.flatnonzero((data.labels[:, c] == 1) & ~chosen)
        if len(available) < needed:
            wanted = " + ".join(f"{n} {role}" for n, role in zip(counts, roles))
            raise DmuhError(
                f"class {data.class_names[c]!r} has {len(available)} items left to draw, the protocol needs {wanted}"
            )
        picked = rng.choice(available, size=needed, replace=False)
        chosen[picked] = True
        start = 0
        for r, n in enumerate(counts):
            drawn[r].append(picked[start : start + n])
            start += n
    return [np.sort(np.concatenate(parts)) for parts in drawn]


def _sample_random(data: _Data, rng: np.random.Generator, counts: Sequence[int], roles: Sequence[str]) -> list:
    """Draw disjoint random sets of counts[r] items."""
    if sum(counts) > data.count:
        wanted = " + ".join(f"{n} {role}" for n, role in zip(counts, roles))
        raise DmuhError(
            f"the data has {data.count:,} items, the protocol needs {wanted}; "
            "protocol 'auto' sizes the split to the data"
        )
    order = rng.permutation(data.count)
    bounds = np.cumsum([0] + list(counts))
    return [np.sort(order[bounds[r] : bounds[r + 1]]) for r in range(len(counts))]


UNLABELED_HINT = "use protocol 'cifar10-unsup' or 'unsupervised' for data without labels"


def _require_classes(data: _Data, protocol: str, expected: int) -> None:
    if data.num_classes != expected:
        raise DmuhError(
            f"protocol {protocol!r} expects {expected} classes, the data has {data.num_classes}; "
            "use protocol 'per-class' for other data"
        )


# ---------------------------------------------------------------------------------------------
# Protocols: each returns (query, train, database, topk)

DATABASE_CHOICES = ("rest", "rest-minus-train")


def _per_class(
    data, rng, *, query_per_class: int, train_per_class: int, database: str = "rest", topk: Optional[int] = None
):
    """Per class, query_per_class query and train_per_class train items; database = all but the query
    ("rest", train inside it) or all but query and train ("rest-minus-train")."""
    if database not in DATABASE_CHOICES:
        raise DmuhError(f"database {database!r}: choose one of {', '.join(DATABASE_CHOICES)}")
    for name, value in (("query_per_class", query_per_class), ("train_per_class", train_per_class)):
        _count_param(name, value)
    query, train = _sample_per_class(data, rng, (query_per_class, train_per_class), ("query", "train"))
    db = data.all_but(query) if database == "rest" else data.all_but(query, train)
    return query, train, db, topk


def _cifar10(data, rng, *, topk=None):
    _require_classes(data, "cifar10", 10)
    return _per_class(data, rng, query_per_class=100, train_per_class=500, topk=topk)


def _cifar10_54k(data, rng, *, topk=None):
    _require_classes(data, "cifar10-54k", 10)
    return _per_class(data, rng, query_per_class=100, train_per_class=500, database="rest-minus-train", topk=topk)


def _cifar10_50k(data, rng, *, topk=None):
    _require_classes(data, "cifar10-50k", 10)
    if data.subsets is not None and (data.subsets == "test").any():
        query = data.subset("test")
    else:
        (query,) = _sample_per_class(data, rng, (1000,), ("query",))
    rest = data.all_but(query)
    return query, rest, rest, topk


def _asymmetric(data, rng, *, query_per_class: int, topk=None):
    """Asymmetric hashing's protocol (ADSH): `query_per_class` query items per class; train =
    database = all the rest, so the method learns from the labels of the database it searches.
    Its MAP is not comparable with a symmetric protocol's (train a subset of the database)."""
    (query,) = _sample_per_class(data, rng, (_count_param("query_per_class", query_per_class),), ("query",))
    rest = data.all_but(query)
    return query, rest, rest, topk


def _cifar10_asym(data, rng, *, topk=None):
    """ADSH's CIFAR-10 protocol: 100 query items per class (1,000), train = database = the other 59,000."""
    _require_classes(data, "cifar10-asym", 10)
    return _asymmetric(data, rng, query_per_class=100, topk=topk)


def _count_param(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise DmuhError(f"{name}: expected a positive integer, got {value!r} (a role must not be empty)")
    return int(value)


def _unsupervised(data, rng, *, query: int = 1000, topk=None):
    """Label-free: `query` random query items; train = database = the rest (unsupervised hashing
    trains on the database it searches, without its labels)."""
    (query_items,) = _sample_random(data, rng, (_count_param("query", query),), ("query",))
    rest = data.all_but(query_items)
    return query_items, rest, rest, topk


def _cifar10_unsup(data, rng, *, topk=1000):
    """The unsupervised CIFAR-10 protocol of CIBHash and DistillHash: the 10,000 test images are
    the queries (10,000 random items when the data has no test subset), the other 50,000 are
    train and database; MAP@1000 (the report adds MAP@all). Needs no labels."""
    if data.subsets is not None and (data.subsets == "test").any():
        query = data.subset("test")
        rest = data.all_but(query)
        return query, rest, rest, topk
    return _unsupervised(data, rng, query=min(10_000, data.count - 1) if data.count > 1 else 1, topk=topk)


def _nuswide21(data, rng, *, topk=5000):
    _require_classes(data, "nuswide21", 21)
    return _per_class(data, rng, query_per_class=100, train_per_class=500, topk=topk)


def _nuswide10(data, rng, *, topk=None):
    """The cross-modal NUS-WIDE protocol of DCMH (10 most frequent concepts): 2,100 query and
    10,500 train pairs, drawn here per class (210 and 1,050 of each); database = all but the query."""
    _require_classes(data, "nuswide10", 10)
    return _per_class(data, rng, query_per_class=210, train_per_class=1050, topk=topk)


def _mirflickr25k(data, rng, *, train: int = 5000, topk=None):
    """The cross-modal MIRFlickr-25K protocol: 2,000 random query pairs, the rest are the database,
    `train` random database pairs train (5,000 as UGACH, DJSRH and most unsupervised work; 10,000 as
    DCMH: `train=10000`). MAP@all. Draws without reading a label."""
    query, train_items = _sample_random(data, rng, (2000, _count_param("train", train)), ("query", "train"))
    return query, train_items, data.all_but(query), topk


def _random(data, rng, *, query: int, train: int, topk=None):
    """`query` and `train` random items, drawn apart; database = all but the query (train inside it).
    Reads no label: for multi-label data, or any data where drawing per class does not fit."""
    query_items, train_items = _sample_random(
        data, rng, (_count_param("query", query), _count_param("train", train)), ("query", "train")
    )
    return query_items, train_items, data.all_but(query_items), topk


def _coco(data, rng, *, topk=5000):
    query, train = _sample_random(data, rng, (5000, 10000), ("query", "train"))
    return query, train, data.all_but(query), topk


def _imagenet100(data, rng, *, topk=1000):
    needed = ("test", "train", "database")
    present = sorted(set(data.subsets.tolist())) if data.subsets is not None else []
    if not set(needed) <= set(present):
        raise DmuhError(
            "protocol 'imagenet100' needs the subsets train, test and database (list files given "
            f"as a mapping name -> file); this data has: {', '.join(present) or 'no subsets'}"
        )
    return data.subset("test"), data.subset("train"), data.subset("database"), topk


def _clothing1m(data, rng, *, topk=None):
    if data.num_classes == 14:
        query, train = _sample_per_class(data, rng, (500, 1000), ("query", "train"))
    else:
        query, train = _sample_random(data, rng, (7000, 14000), ("query", "train"))
    return query, train, data.all_but(query), topk


def _digits(data, rng, *, topk=None):
    return _per_class(data, rng, query_per_class=30, train_per_class=100, topk=topk)


PROTOCOLS: dict = {
    "cifar10": _cifar10,
    "cifar10-54k": _cifar10_54k,
    "cifar10-50k": _cifar10_50k,
    "cifar10-unsup": _cifar10_unsup,
    "cifar10-asym": _cifar10_asym,
    "asymmetric": _asymmetric,
    "unsupervised": _unsupervised,
    "nuswide21": _nuswide21,
    "nuswide10": _nuswide10,
    "mirflickr25k": _mirflickr25k,
    "coco": _coco,
    "imagenet100": _imagenet100,
    "clothing1m": _clothing1m,
    "per-class": _per_class,
    "random": _random,
    "digits": _digits,
}

# The word that lets the data choose (`choose_protocol`); a run records the protocol it stood for.
AUTO = "auto"


# The protocols that split without reading a label (random draws, subsets).
LABEL_FREE_PROTOCOLS = frozenset(
    {"cifar10-unsup", "unsupervised", "random", "coco", "imagenet100", "clothing1m", "mirflickr25k"}
)


def available_protocols() -> list:
    return sorted(PROTOCOLS)


@dataclass(frozen=True)
class Choice:
    """What `--protocol auto` stands for on some data, and why (printed at the start of a run)."""

    protocol: str
    params: dict
    reason: str


def choose_protocol(labels: np.ndarray) -> Choice:
    """The protocol that fits data with these multi-hot labels (no columns: no labels), with
    sizes that scale with it: about a tenth of the items as queries, capped at the standard
    protocols' 100 per class (1,000 label-free); about half as training items, capped at 500 per
    class. Single-label data with every class of 2 or more items is drawn per class, multi-label
    data at random, unlabeled data by the label-free `unsupervised` protocol."""
    count, classes = labels.shape
    if classes == 0:
        query = max(1, min(1000, count // 10))
        return Choice(
            "unsupervised",
            {"query": query},
            f"the data has no labels: {query:,} random query items of {count:,}, train = database = the rest",
        )
    single = bool((labels.sum(axis=1) == 1).all())
    smallest = int(labels.sum(axis=0).min())
    if single and smallest >= 2:
        per_query = max(1, min(100, smallest // 10))
        per_train = max(1, min(500, smallest // 2))
        return Choice(
            "per-class",
            {"query_per_class": per_query, "train_per_class": per_train},
            f"{count:,} single-label items in {classes} classes (the smallest has {smallest:,}): "
            f"{per_query} query + {per_train} train items per class, database = all but the query",
        )
    query = max(1, min(2000, count // 10))
    train = max(1, min(10_000, count // 2))
    why = "multi-label items" if not single else f"single-label items, a class with {smallest} item(s)"
    return Choice(
        "random",
        {"query": query, "train": train},
        f"{count:,} {why}: {query:,} random query + {train:,} train items, database = all but the query",
    )


def resolve_protocol(protocol: str, labels: np.ndarray, params: dict) -> tuple:
    """(protocol, params) as given, or what `auto` stands for on data with these multi-hot labels."""
    if protocol != AUTO:
        return protocol, dict(params)
    if params.keys() - {"topk"}:
        raise DmuhError(
            f"protocol 'auto' chooses its own sizes; give parameter(s) {', '.join(sorted(params))} "
            "with a named protocol (--protocol per-class, random or unsupervised)"
        )
    choice = choose_protocol(labels)
    return choice.protocol, {**choice.params, **params}


def make_split(protocol: str, source_or_labels, seed: int = 0, subsets=None, fingerprint: str = "", **params) -> Split:
    """Split a source (or a label array) by a named protocol; the same seed gives the same split.

    With a Source, its subsets and fingerprint are used unless given. `params` go to the protocol:
    every protocol takes `topk`; 'per-class' takes query_per_class, train_per_class, database.
    """
    if isinstance(source_or_labels, Source):
        source = source_or_labels
        labels, class_names = source.labels, source.class_names
        subsets = source.subsets if subsets is None else subsets
        fingerprint = fingerprint or source.fingerprint()
    else:
        labels = to_multi_hot(source_or_labels)
        class_names = [str(c) for c in range(labels.shape[1])]
    protocol, params = resolve_protocol(protocol, labels, params)
    build: Optional[Callable] = PROTOCOLS.get(protocol)
    if build is None:
        raise DmuhError(f"protocol {protocol!r}: choose one of {', '.join([AUTO, *available_protocols()])}")
    if subsets is not None:
        subsets = np.asarray(subsets, dtype=str)
        if subsets.shape != (labels.shape[0],):
            raise DmuhError(f"subsets: {subsets.shape[0]} names for {labels.shape[0]} items")
    accepted = {name: p for name, p in inspect.signature(build).parameters.items() if p.kind == p.KEYWORD_ONLY}
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DmuhError(
            f"protocol {protocol!r}: unknown parameter(s) {', '.join(unknown)} (it takes {', '.join(accepted)})"
        )
    missing = [name for name, p in accepted.items() if p.default is p.empty and name not in params]
    if missing:
        raise DmuhError(f"protocol {protocol!r}: parameter(s) {', '.join(missing)} required")
    params = {name: value.item() if isinstance(value, np.generic) else value for name, value in params.items()}
    if not isinstance(seed, (int, np.integer)):
        raise DmuhError(f"seed: expected an integer, got {seed!r}")
    if labels.shape[1] == 0 and protocol not in LABEL_FREE_PROTOCOLS:
        raise DmuhError(f"protocol {protocol!r} draws items by class, and the data has no labels; {UNLABELED_HINT}")
    rng = np.random.default_rng(int(seed))
    query, train, database, topk = build(_Data(labels, subsets, class_names), rng, **params)
    if topk is not None and (not isinstance(topk, (int, np.integer)) or isinstance(topk, bool) or topk < 1):
        raise DmuhError(f"topk: expected a positive integer or None, got {topk!r}")
    for role, indices in (("query", query), ("train", train), ("database", database)):
        if len(indices) == 0:
            raise DmuhError(
                f"protocol {protocol!r}: the split of these {labels.shape[0]} items has no {role} "
                "items; choose another protocol or its parameters"
            )
    split = Split(
        protocol,
        int(seed),
        query,
        train,
        database,
        topk=None if topk is None else int(topk),
        fingerprint=fingerprint,
        params=dict(params),
    )
    split.validate()  # every protocol keeps the query apart; a new one that did not would stop here
    return split
