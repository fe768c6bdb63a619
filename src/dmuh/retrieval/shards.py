"""Encode a large collection in shards, in one process or several (torchrun), and resume a crash.

    dmuh encode --run RUN --images DIR --shards OUT [--shard-size 100000]
    torchrun --nproc_per_node=4 -m dmuh -- encode --run RUN --images DIR --shards OUT --device cuda

The items (in the order `dmuh.data.images.open_images` lists them) are cut into shards of
`shard_size` items. Rank 0 finds which shards are not complete yet and tells every rank; rank r of
N encodes the r-th, (r + N)-th, ... of those, each written atomically as OUT/shard-00007.npz (a
codes file). After a barrier rank 0 writes OUT/manifest.json (`dmuh.codes.file.write_manifest`)
with every shard's count and sha256. A crash loses only the shards being written; the next run
encodes the missing ones and keeps the rest.

A shard is complete when it loads (every array's CRC) and holds exactly the items of its slice
(their ids), encoded by the same checkpoint at the same image size, with the same extras
(uncertainty, features). A shard that loads but holds something else (another --images, another
--shard-size, another model) is refused unless `force`, which re-encodes every shard; one that
does not load (a damaged file) is encoded again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from dmuh.codes.file import MANIFEST, Codes, write_manifest
from dmuh.errors import ConfigError, DataError, DmuhError
from dmuh.retrieval.encoder import decode_size, encode_images
from dmuh.retrieval.options import DEFAULT_SHARD_SIZE  # noqa: F401 - also this module's API
from dmuh.utils import distributed
from dmuh.utils.io import file_sha256, remove_orphans
from dmuh.utils.words import plural


def shard_file(number: int) -> str:
    return f"shard-{number:05d}.npz"


def _shard_state(path: Path, ids: List[str], encoder, size: Optional[int], uncertainty: bool, features: bool) -> str:
    """ "complete", "missing" (absent or damaged) or "foreign" (a codes file of another encode)."""
    if not path.is_file():
        return "missing"
    try:
        codes = Codes.load(path)
    except DmuhError:
        return "missing"
    same = (
        codes.ids == ids
        and codes.bits == encoder.bits
        and codes.model.get("checkpoint_sha256") == encoder.identity.get("checkpoint_sha256")
        and codes.image_size == size
        and (codes.bit_uncertainty is not None) == uncertainty
        and (codes.features is not None) == features
    )
    return "complete" if same else "foreign"


def encode_in_shards(
    encoder,
    source,
    folder,
    shard_size: int = DEFAULT_SHARD_SIZE,
    *,
    context: Optional[distributed.Context] = None,
    uncertainty: bool = False,
    features: bool = False,
    image_size: Optional[int] = None,
    images_spec: Optional[str] = None,
    force: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Dict[str, Any]:
    """Encode `source` into shards under `folder` (see the module's docstring). Every rank calls
    it; returns {"shards", "encoded" (shards this rank encoded), "skipped" (complete before),
    "manifest" (its path, on rank 0; None on the others), "count"}."""

    context = context or distributed.Context()
    folder = Path(folder)
    if shard_size < 1:
        raise ConfigError(f"shard_size: expected a positive integer, got {shard_size}", field="shard_size")
    total = len(source.ids)
    if total == 0:
        raise DataError(f"images {images_spec}: no items to encode", field="images")
    size = decode_size(encoder, source, image_size)
    slices = [(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]
    paths = [folder / shard_file(number) for number in range(len(slices))]
    # Rank 0 decides which shards to encode, before any rank writes one, and tells every rank.
    todo = torch.zeros(len(slices), dtype=torch.int64, device=encoder.device if context.enabled else "cpu")
    if context.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        remove_orphans(folder)  # what writers killed mid-shard left
        for number, ((start, stop), path) in enumerate(zip(slices, paths)):
            ids = [str(i) for i in source.ids[start:stop]]  # as a codes file holds them
            state = "missing" if force else _shard_state(path, ids, encoder, size, uncertainty, features)
            if state == "foreign":
                raise ConfigError(
                    f"shards {folder}: {path.name} holds another encode's codes (other images, "
                    "--shard-size, model or options); pass --force to encode every shard again, or give "
                    "another folder",
                    field="shards",
                )
            todo[number] = int(state == "missing")
    distributed.broadcast_tensor(context, todo)
    todo_numbers = [number for number in range(len(slices)) if int(todo[number])]
    if context.is_main and todo_numbers:  # a folder with shards still to encode has no manifest
        (folder / MANIFEST).unlink(missing_ok=True)
    mine = todo_numbers[context.rank :: context.world_size]
    done_items = 0
    my_items = sum(slices[n][1] - slices[n][0] for n in mine)
    for number in mine:
        start, stop = slices[number]
        codes = encode_images(
            encoder,
            source,
            uncertainty=uncertainty,
            image_size=image_size,
            images_spec=images_spec,
            features=features,
            items=np.arange(start, stop),
        )
        codes.save(paths[number], overwrite=True)  # atomically: a kill leaves no partial shard
        done_items += stop - start
        if progress is not None:
            progress(done_items, my_items)
    distributed.barrier(context)
    manifest = None
    if context.is_main:
        shards = []
        for (start, stop), path in zip(slices, paths):
            if not path.is_file():
                raise ConfigError(f"shards {folder}: {path.name} is missing after every rank finished", field="shards")
            shards.append({"file": path.name, "count": stop - start, "sha256": file_sha256(path)})
        manifest = write_manifest(folder, shards, encoder.bits, shard_size, encoder.identity, images_spec)
    distributed.barrier(context)  # the manifest is there for every rank once it returns
    return {
        "shards": len(slices),
        "encoded": len(mine),
        "skipped": len(slices) - len(todo_numbers),
        "to_encode": len(todo_numbers),
        "manifest": manifest,
        "count": total,
    }


def describe(result: Dict[str, Any]) -> str:
    """What a sharded encode did, for rank 0 to print."""
    return (
        f"encoded {plural(result['count'], 'item')} in {plural(result['shards'], 'shard')} "
        f"({result['to_encode']} encoded now, {result['skipped']} already complete): {result['manifest']}"
    )
