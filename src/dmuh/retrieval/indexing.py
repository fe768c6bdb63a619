"""Indexes of codes files: what `dmuh index build` and `dmuh index add` do, for the command line and
Python alike.

    index = build_from_codes("codes.npz", kind="hnsw", params={"m": 16})     # or a manifest of shards
    added = add_codes(index, "more.npz", "db.dmuhidx")

A codes file's ids become the index's names (paths), its model identity the index's `meta`. A
Milvus index is built from a manifest shard by shard (it need not fit in memory); a FAISS index
from every shard at once. The decoder of the codes' run (rank-preserving hashing) is kept with the
index when its method trains one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from dmuh.codes.file import Codes, concatenate, is_manifest, manifest_shards, read_manifest
from dmuh.errors import ConfigError, DmuhError
from dmuh.retrieval.index import CodeIndex, build_index
from dmuh.retrieval.index.base import resolve_params
from dmuh.retrieval.service import check_compatible, check_same_model


def codes_parts(path) -> Iterator[Codes]:
    """The codes of a codes file, or the shards of a manifest one at a time."""
    if is_manifest(path):
        yield from manifest_shards(path)
    else:
        yield Codes.load(path)


def concatenated(parts) -> Codes:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else concatenate(parts)


def codes_decoder(codes: Codes, run=None):
    """The decoder of `run`, or of the codes' own run when its method trains one; None otherwise.
    The run must be the one whose checkpoint made the codes."""
    if run is None and (not codes.model.get("method") or codes.model.get("decoder") is False):
        return None  # no run, or one whose codes file says it trained no decoder (older files do not say)
    # torch: deferred to codes of a method (or a --decoder run), so that plain codes index without it
    from dmuh.methods import method_class
    from dmuh.retrieval.encoder import load_encoder

    if run is None:
        method, recorded = codes.model.get("method"), codes.model.get("run")
        try:
            trains_decoder = method_class(method).requires.decoder  # a method is recorded (checked above)
        except DmuhError:  # a method this dmuh does not know: no decoder to look for
            trains_decoder = False
        if not trains_decoder or not recorded or not Path(recorded).is_dir():
            return None
        run = recorded
    encoder = load_encoder(run)
    if not encoder.method.requirements().decoder:
        raise ConfigError(
            f"decoder {run}: its method {encoder.config.method!r} trains no decoder (rph does)", field="decoder"
        )
    check_same_model(codes.identity(), encoder.identity, f"--decoder {run}'s decoder", allow=False)
    return encoder.method.decoder


def build_from_codes(
    path,
    kind: str = "flat",
    params: Optional[Dict[str, int]] = None,
    *,
    backend: str = "faiss",
    decoder_run=None,
    **backend_options: Any,
) -> CodeIndex:
    """A new index (`build_index`) of the codes of a codes file or manifest `path`, with their decoder
    (`codes_decoder`, of `decoder_run` or the codes' own run); the caller saves and closes it.
    `backend_options`: the milvus backend's uri, collection, force."""
    params = dict(params or {})
    parts = codes_parts(path)
    if backend == "milvus" and is_manifest(path):  # shard by shard: a Milvus index need not fit in memory
        if kind == "ivf":  # its lists are sized by every shard's codes, not the first one's
            from dmuh.retrieval.index.milvus import KIND_PARAMS as MILVUS_KIND_PARAMS  # optional: pymilvus

            params = resolve_params(kind, MILVUS_KIND_PARAMS, params, read_manifest(path)["count"])
        first = next(parts)
    else:
        first = concatenated(parts)
        parts = iter(())
    decoder = codes_decoder(first, decoder_run)  # before the build: a wrong decoder run fails fast
    index = build_index(
        first,
        backend=backend,
        kind=kind,
        meta={**first.identity(), "codes_file": str(path)},
        **backend_options,
        **params,
    )
    try:
        for shard in parts:
            index.add(shard, names=list(shard.ids))
        if decoder is not None:
            index.attach_decoder(decoder)
    except BaseException:
        index.close()
        raise
    return index


def add_codes(index: CodeIndex, path, index_name: str, allow_other_model: bool = False) -> int:
    """Add the codes of a codes file or manifest `path` to `index` (named `index_name` in messages),
    each part checked to be of the index's bit length and model (`check_compatible`); returns how
    many were added. The caller saves the index."""
    before = len(index)
    for codes in codes_parts(path):
        check_compatible(
            index,
            index_name,
            codes.bits,
            codes.model,
            f"--codes {path}",
            f"the codes in {path}",
            allow_other_model,
            doing="add them",
        )
        index.add(codes, names=list(codes.ids) if index.has_names else None)
    return len(index) - before
