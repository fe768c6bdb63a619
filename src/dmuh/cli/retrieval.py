"""The `dmuh features`, `dmuh encode`, `dmuh index build|info|add|remove`, `dmuh search` and `dmuh
export-onnx` subcommands.

`add_commands(subparsers)` adds them to the `dmuh` parser; every handler reads its flags, calls the
library (`dmuh.retrieval.encoder`, `dmuh.retrieval.indexing`, `dmuh.retrieval.index`, `dmuh search` on
the `dmuh.retrieval.service.SearchService` that `dmuh serve` runs, `dmuh.retrieval.onnx`) and formats
what it returns; it returns an exit code and raises DmuhError for bad input (the CLI prints it as one
line). No output file is replaced unless --force is given, except the index that `dmuh index
add|remove` update in place (their point).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from dmuh.cli.common import add_run_flag, check_positive, flag_name, require_run
from dmuh.errors import DmuhError
from dmuh.retrieval.options import (
    BACKENDS,
    DEFAULT_FLAT_KERNEL,
    DEFAULT_RERANK_DEPTH,
    DEFAULT_SHARD_SIZE,
    DEFAULT_TAU,
    FLAT_KERNELS,
    KIND_PARAMS,
    KINDS,
    RERANK_MODES,
)
from dmuh.utils.io import atomic_write_text, file_lock, refuse_input_as_output, refuse_overwrite, remove_orphans
from dmuh.utils.words import plural

# How long `index add` / `remove` / `build` wait for another writer of the same index (seconds).
INDEX_LOCK_WAIT_S = 600.0

# What each parameter of `KIND_PARAMS` means on the command line, and its default when the data decides it.
_PARAM_HELP = {
    "nlist": ("number of inverted lists", "round(sqrt(n))"),
    "nprobe": ("lists searched per query", "nlist // 16"),
    "m": ("neighbours per node", None),
    "ef_construction": ("candidate list while building", None),
    "ef_search": ("candidate list while searching", None),
}
DEVICE_HELP = "cpu or cuda[:N] [default: cpu]"
CODES_HELP = (
    "codes file written by `dmuh encode`, or the manifest of `dmuh encode --shards` (DIR/manifest.json or "
    "DIR) (required)"
)
FORCE_HELP = "replace --out if it exists [default: off]"
QUIET_HELP = "no progress bar [default: off]"


def add_commands(subparsers) -> None:
    _add_features(subparsers)
    _add_encode(subparsers)
    _add_index(subparsers)
    _add_search(subparsers)
    _add_export_onnx(subparsers)


def _add_features(subparsers) -> None:
    p = subparsers.add_parser(
        "features",
        help="write a backbone's frozen features of images to a features file",
        description="Run a backbone (any --model, with --weights or random ones) over images and write their "
        "feature vectors (.npz: features, ids, labels when known, and the backbone's record), for "
        "`dmuh train --data features:FILE` with a shallow or MLP-head method; a run trained on them encodes "
        "images through the same backbone.",
    )
    p.add_argument(
        "--model", required=True, metavar="NAME", help="backbone: a dmuh model, timm:NAME or tv:NAME (required)"
    )
    p.add_argument(
        "--model-param",
        dest="model_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, repeatable (e.g. --model-param drop_path_rate=0.1, --model-param crop_pct=1) "
        "[default: none]",
    )
    p.add_argument(
        "--weights",
        metavar="FILE|RUN",
        help="the backbone's weights: a timm / Hugging Face model.safetensors, a torchvision .pth, or a "
        "`dmuh pretrain` run (nothing is downloaded) [default: random weights, seed 0]",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="images: a folder or .zip (class folders give labels), a .txt list, or a dmuh data source "
        "(digits, cifar-batches:DIR, ...) (required)",
    )
    p.add_argument(
        "--root",
        "--data-root",
        dest="root",
        metavar="DIR|ZIP",
        help="what a list's paths are relative to [default: the list's folder]",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="features file to write (.npz) (required)")
    p.add_argument(
        "--image-size", type=int, metavar="N", help="decode images at N x N pixels [default: the first image's size]"
    )
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass [default: 256]")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_features)


def _add_encode(subparsers) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode images with a trained run into a codes file",
        description="Encode images into packed binary codes (.npz) with ids, labels when known, the bit length "
        "and the model's identity; --uncertainty adds DMUH's image- and bit-level uncertainty.",
    )
    add_run_flag(p, help="run directory written by `dmuh train` (required)", old_flag="--checkpoint")
    p.add_argument(
        "--images",
        metavar="DIR|ZIP|LIST",
        help="a folder or .zip of images (class folders give labels), a .txt list (paths, optionally "
        "followed by 0/1 labels), or a dmuh data source (digits, cifar-batches:DIR, paired data: its "
        "images); this or --texts [default: none]",
    )
    p.add_argument(
        "--texts",
        metavar="PAIRED|TXT",
        help="encode text with a cross-modal run's text network: paired data (its text vectors) or a "
        ".txt of texts, one a line, made into vectors with the run's vocabulary [default: none]",
    )
    p.add_argument(
        "--root",
        "--data-root",
        dest="root",
        metavar="DIR|ZIP",
        help="folder or .zip the paths of a list file are relative to (--data-root, as in train, is the "
        "same flag) [default: the list's folder]",
    )
    p.add_argument("--out", metavar="FILE", help="codes file to write (.npz); this or --shards [default: none]")
    p.add_argument(
        "--shards",
        metavar="DIR",
        help="write shards DIR/shard-00000.npz, ... and DIR/manifest.json instead, resumably: a rerun "
        "encodes only the shards not complete yet; under torchrun each process encodes its share "
        "[default: none]",
    )
    p.add_argument(
        "--shard-size", type=int, metavar="N", help=f"items per shard, with --shards [default: {DEFAULT_SHARD_SIZE}]"
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="store each image's DMUH uncertainty (momentum network; DMUH runs only) [default: off]",
    )
    p.add_argument(
        "--features",
        action="store_true",
        help="store each item's own representation (its feature vector, or the backbone's features), "
        "which queries need for `dmuh search --rerank decoder` [default: off]",
    )
    p.add_argument("--image-size", type=int, metavar="N", help="decode images at N x N pixels [default: the run's]")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument(
        "--batch-size", type=int, metavar="N", help="images per forward pass [default: the run's eval_batch_size]"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists; with --shards encode every shard again [default: off]",
    )
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_encode)


def _add_index(subparsers) -> None:
    index = subparsers.add_parser(
        "index",
        help="build, inspect or update a search index of codes",
        description="Indexes of codes: FAISS binary indexes in a checked file, or a Milvus collection that the "
        "file names (see docs/search.md).",
    )
    index_commands = index.add_subparsers(dest="index_command", required=True)
    p = index_commands.add_parser("build", help="build an index from a codes file")
    p.add_argument("--codes", required=True, metavar="FILE", help=CODES_HELP)
    p.add_argument(
        "--backend",
        default="faiss",
        choices=BACKENDS,
        help="faiss (the index file holds the codes) or milvus (a Milvus collection holds them; the "
        "index file names it) [default: faiss]",
    )
    p.add_argument(
        "--kind",
        default="flat",
        choices=KINDS,
        help="flat (exact), or ivf / hnsw (approximate); milvus: flat (BIN_FLAT) or ivf (BIN_IVF_FLAT, "
        "on a server) [default: flat]",
    )
    for kind, params in KIND_PARAMS.items():
        for name, default in params.items():
            text, derived = _PARAM_HELP[name]
            p.add_argument(
                flag_name(name),
                type=int,
                metavar="N",
                help=f"{kind} only: {text}, a positive integer [default: {derived or default}]",
            )
    p.add_argument(
        "--decoder",
        metavar="RUN",
        help="keep this run's decoder of the codes in the index, for `search --rerank decoder` "
        "[default: the codes' own run when it trains one (--method rph)]",
    )
    p.add_argument(
        "--uri",
        metavar="URI",
        help="milvus: a Milvus Lite file FILE.db (Milvus inside this process) or a Milvus server or "
        "cluster http://HOST:19530; needed with --backend milvus [default: none]",
    )
    p.add_argument(
        "--collection",
        metavar="NAME",
        help="milvus: the collection to create [default: the --out file's name, in letters, digits and _]",
    )
    p.add_argument("--out", required=True, metavar="INDEX", help="index file to write (required)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists; with --backend milvus also drop and recreate --collection [default: off]",
    )
    p.set_defaults(func=cmd_index_build)
    p = index_commands.add_parser("info", help="print an index file's header (verifies its checksum)")
    p.add_argument("index", metavar="INDEX", help="index file written by `dmuh index build` (required)")
    p.add_argument("--json", action="store_true", help="print JSON [default: off]")
    p.set_defaults(func=cmd_index_info)
    p = index_commands.add_parser(
        "add",
        help="add codes to an index, in place",
        description="Add codes to the index (its collection, for milvus) and rewrite the index file atomically: "
        "updating INDEX in place is what this does, so no --force is needed. New codes get the next "
        "ids (one past the largest ever given) and their codes file's ids as paths.",
    )
    p.add_argument("--index", required=True, metavar="INDEX", help="index file to update (required)")
    p.add_argument("--codes", required=True, metavar="FILE", help=CODES_HELP)
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="add codes even if another model encoded them than the index's codes [default: off]",
    )
    p.set_defaults(func=cmd_index_add)
    p = index_commands.add_parser(
        "remove",
        help="remove codes from an index, in place",
        description="Remove codes from the index (its collection, for milvus) and rewrite the index file "
        "atomically, in place (no --force needed). An id or path the index does not hold is an error, "
        "and then nothing is removed; a search never returns a removed code.",
    )
    p.add_argument("--index", required=True, metavar="INDEX", help="index file to update (required)")
    p.add_argument(
        "--ids",
        metavar="FILE",
        help="the ids to remove, one integer a line: the index's own integer ids (the `id` of `dmuh "
        "search` results; an index built from a codes file numbers its codes 0, 1, ... in file "
        "order); this or --names [default: none]",
    )
    p.add_argument(
        "--names",
        metavar="FILE",
        help="the paths to remove, one a line, as the index holds them (the `path` of `dmuh search` "
        "results: the codes file's ids); every code of a path goes; this or --ids [default: none]",
    )
    p.set_defaults(func=cmd_index_remove)


def _add_search(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="search an index with query images or codes",
        description="Rank the index's codes by Hamming distance to each query; --rerank re-ranks the top "
        "candidates by an uncertainty-weighted Hamming distance (DMUH runs).",
    )
    p.add_argument(
        "--index", required=True, metavar="INDEX", help="index file written by `dmuh index build` (required)"
    )
    add_run_flag(
        p, help="run that encodes the query images [default: the run recorded in the index]", old_flag="--checkpoint"
    )
    p.add_argument(
        "--image", action="append", default=[], metavar="IMAGE", help="a query image, repeatable [default: none]"
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text query, repeatable (a cross-modal run's text network encodes it; typically against "
        "an index of image codes) [default: none]",
    )
    p.add_argument(
        "--queries",
        metavar="FILE",
        help="batch of queries: a .txt of image paths (one a line, relative to its folder) or a codes "
        "file (.npz) [default: none]",
    )
    p.add_argument("--k", type=int, default=10, metavar="N", help="results per query [default: 10]")
    p.add_argument(
        "--rerank",
        nargs="?",
        const="uncertainty",
        metavar="uncertainty|decoder",
        help="re-rank the top --depth candidates: 'uncertainty' (the default when the flag stands "
        "alone) by DMUH's uncertainty-weighted Hamming distance, 'decoder' by the cosine of the "
        "query's features to the candidates' features decoded from their codes (an index with a "
        "decoder; queries encoded with --features); a number N is 'uncertainty' with --depth N "
        "[default: off]",
    )
    p.add_argument(
        "--depth",
        type=int,
        metavar="N",
        help=f"candidates by Hamming distance that --rerank re-orders [default: {DEFAULT_RERANK_DEPTH}]",
    )
    p.add_argument(
        "--tau",
        type=float,
        metavar="T",
        help=f"re-ranking temperature: bit weight exp(-u / (tau * the query's mean u)) [default: {DEFAULT_TAU:g}]",
    )
    p.add_argument(
        "--nprobe", type=int, metavar="N", help="ivf (faiss or milvus): lists searched per query [default: the index's]"
    )
    p.add_argument(
        "--ef-search", type=int, metavar="N", help="hnsw: candidate list while searching [default: the index's]"
    )
    p.add_argument(
        "--kernel",
        choices=FLAT_KERNELS,
        help="flat faiss-backend index: dmuh's counting top-k kernel or FAISS's IndexBinaryFlat search, "
        f"same results [default: {DEFAULT_FLAT_KERNEL}]",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="threads of the dmuh flat kernel [default: the cores this process may use, at most 16]",
    )
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="search even if the queries' model is not the one that encoded the index [default: off]",
    )
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the results as JSON [default: off]")
    p.add_argument("--out", metavar="FILE", help="also write the results (JSON) to FILE [default: none]")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_search)


def _add_export_onnx(subparsers) -> None:
    p = subparsers.add_parser(
        "export-onnx",
        help="export a run's hashing network as ONNX",
        description="ONNX graph: float32 pixels 0..255 (N, C, H, W) -> continuous codes and int8 sign codes.",
    )
    add_run_flag(p, help="run directory written by `dmuh train` (required)", old_flag="--checkpoint")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write (required)")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset [default: 17]")
    p.add_argument(
        "--image-size", type=int, metavar="N", help="input height and width [default: the run's decode size]"
    )
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_export_onnx)


def _check_image_size(value) -> None:
    """--image-size within the sizes dmuh decodes at (dmuh.runs.config.IMAGE_SIZES)."""
    from dmuh.runs.config import IMAGE_SIZES

    if value is not None and not IMAGE_SIZES[0] <= value <= IMAGE_SIZES[1]:
        raise DmuhError(f"--image-size: expected an integer >= {IMAGE_SIZES[0]} and <= {IMAGE_SIZES[1]}, got {value}")


def _output_folder(path) -> None:
    """Clear the temporary files killed writers left in an output's folder (dmuh.utils.io.remove_orphans)."""
    if path:
        remove_orphans(Path(path).parent)


# -- encode, index ----------------------------------------------------------------------------


def cmd_features(args: argparse.Namespace) -> int:
    from dmuh.data.images import open_images
    from dmuh.engine.runtime import Execution, resolve_device
    from dmuh.retrieval.features import extract_features, save_features
    from dmuh.utils.progress import progress_bar
    from dmuh.utils.schema import parse_params

    inputs = [("--data", args.data), ("--weights", args.weights), ("--root", args.root)]
    refuse_overwrite(args.out, args.force, inputs=inputs)
    if Path(args.out).suffix != ".npz":
        raise DmuhError(f"--out {args.out}: a features file is a .npz")
    _output_folder(args.out)
    _check_image_size(args.image_size)
    check_positive(args.batch_size, "--batch-size")
    params = parse_params(args.model_params, "--model-param")
    source = open_images(args.data, args.root)
    execution = Execution(resolve_device(args.device), int(args.batch_size))
    spec = {"model": args.model, "model_params": params, "weights": args.weights}
    with progress_bar(len(source.ids), "features", unit="image", enabled=not args.quiet) as bar:
        arrays = extract_features(
            source, spec, execution, args.image_size, progress=lambda done, total: bar.update(done - bar.n)
        )
    save_features(args.out, arrays, overwrite=args.force)
    features = arrays["features"]
    extra = ", labels" if "labels" in arrays else ""
    print(f"wrote {plural(len(features), 'feature vector')} of {features.shape[1]} ({args.model}){extra}: {args.out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from dmuh.data.images import open_images
    from dmuh.retrieval.encoder import collection_encoder, encode_images, load_encoder
    from dmuh.utils.progress import progress_bar

    run = require_run(args)
    if (args.images is None) == (args.texts is None):
        raise DmuhError(
            "give what to encode: --images (images or image features) or --texts (a cross-modal run's text)"
        )
    _check_encode_output(args)
    inputs = [("--run", run), ("--images", args.images), ("--texts", args.texts), ("--root", args.root)]
    refuse_overwrite(args.out, args.force, inputs=inputs)
    if args.shards is not None:
        refuse_input_as_output(args.shards, "--shards", inputs)
    _output_folder(args.out)
    _check_image_size(args.image_size)
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.shard_size, "--shard-size")
    if args.shards is not None:
        return _encode_shards(args, run)
    if args.texts is not None:
        return _encode_texts(args, load_encoder(run, args.device))
    encoder = collection_encoder(run, args.device, args.uncertainty, args.batch_size)
    source = open_images(args.images, args.root, encoder.channels or 3)
    with progress_bar(len(source.ids), "encoding", unit="image") as bar:  # a large collection, on a terminal
        codes = encode_images(
            encoder,
            source,
            uncertainty=args.uncertainty,
            image_size=args.image_size,
            images_spec=args.images,
            progress=lambda done, total: bar.update(done - bar.n),
            features=args.features,
        )
    codes.save(args.out, overwrite=args.force)
    extra = ", labels" if codes.labels is not None else ""
    extra += ", uncertainty" if codes.uncertainty is not None else ""
    extra += ", features" if codes.features is not None else ""
    print(f"encoded {plural(len(codes), 'image')} into {codes.bits}-bit codes{extra}: {args.out}")
    return 0


def _check_encode_output(args: argparse.Namespace) -> None:
    """One output: --out, or --shards (which torchrun's processes need, each writing its own)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and args.shards is None:
        raise DmuhError(
            f"under torchrun ({world_size} processes) give --shards DIR: each process writes its own shards"
        )
    if (args.out is None) == (args.shards is None):
        raise DmuhError("give where to write: --out FILE (one codes file) or --shards DIR (shards and a manifest)")
    if args.shards is not None and args.texts is not None:
        raise DmuhError("--shards applies to --images, not --texts")
    if args.shard_size is not None and args.shards is None:
        raise DmuhError("--shard-size applies to --shards")


def _encode_shards(args: argparse.Namespace, run: str) -> int:
    """Every process of a torchrun (or the one process) encodes its share of the shards."""
    from dmuh.data.images import open_images
    from dmuh.retrieval.encoder import collection_encoder
    from dmuh.retrieval.shards import describe, encode_in_shards
    from dmuh.utils import distributed
    from dmuh.utils.progress import progress_bar

    context = distributed.init_from_environment(args.device)
    device = f"cuda:{context.local_rank}" if context.enabled and args.device.startswith("cuda") else args.device
    encoder = collection_encoder(run, device, args.uncertainty, args.batch_size)
    source = open_images(args.images, args.root, encoder.channels or 3)
    with progress_bar(len(source.ids), "encoding", unit="image", enabled=context.is_main) as bar:

        def advance(done: int, total: int) -> None:  # this process's share of the items
            bar.total = total
            bar.update(done - bar.n)

        result = encode_in_shards(
            encoder,
            source,
            args.shards,
            args.shard_size or DEFAULT_SHARD_SIZE,
            context=context,
            uncertainty=args.uncertainty,
            features=args.features,
            image_size=args.image_size,
            images_spec=args.images,
            force=args.force,
            progress=advance,
        )
    if context.is_main:
        print(describe(result))
    return 0


def _index_params(args: argparse.Namespace) -> Dict[str, int]:
    """The `KIND_PARAMS` flags given, each checked to belong to --kind and to be positive."""
    params = {}
    for kind, names in KIND_PARAMS.items():
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            if name not in KIND_PARAMS[args.kind]:
                raise DmuhError(f"{flag_name(name)} applies to --kind {kind}, not {args.kind}")
            check_positive(value, flag_name(name))
            params[name] = value
    return params


def _milvus_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The milvus backend's flags, checked; none for faiss."""
    from dmuh.retrieval.index.milvus import (
        MILVUS_KINDS,
        check_collection_name,
        collection_name_for,
    )

    if args.backend != "milvus":
        for flag, value in (("--uri", args.uri), ("--collection", args.collection)):
            if value is not None:
                raise DmuhError(f"{flag} applies to --backend milvus")
        return {}
    if args.kind not in MILVUS_KINDS:
        raise DmuhError(f"--kind {args.kind}: --backend milvus has flat (BIN_FLAT) and ivf (BIN_IVF_FLAT)")
    if args.uri is None:
        raise DmuhError("--backend milvus needs --uri: a Milvus Lite file (FILE.db) or a server (http://HOST:19530)")
    collection = check_collection_name(args.collection or collection_name_for(args.out))
    return {"backend": "milvus", "uri": args.uri, "collection": collection, "force": args.force}


def cmd_index_build(args: argparse.Namespace) -> int:
    from dmuh.retrieval.indexing import build_from_codes

    inputs = [("--codes", args.codes), ("--decoder", args.decoder), ("--uri", args.uri)]
    if Path(args.codes).name.endswith(".json"):  # a shards manifest: its shards are read too
        inputs.append(("--codes", Path(args.codes).parent))
    refuse_overwrite(args.out, args.force, inputs=inputs)
    _output_folder(args.out)
    params = _index_params(args)
    milvus = _milvus_flags(args)
    with (
        file_lock(args.out, "index", INDEX_LOCK_WAIT_S),
        build_from_codes(args.codes, args.kind, params, decoder_run=args.decoder, **milvus) as index,
    ):
        index.save(args.out, overwrite=args.force)
        decoder = index.decoder
        where = f", Milvus collection {index.collection!r} at {index.uri}" if milvus else ""
        print(
            f"index {args.out}: {args.kind}, {plural(len(index), 'code')} of {plural(index.bits, 'bit')}"
            + (f", {', '.join(f'{k}={v}' for k, v in index.params.items())}" if index.params else "")
            + (f", decoder to {decoder.dim} features" if decoder is not None else "")
            + where
        )
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from dmuh.retrieval.index import open_index
    from dmuh.retrieval.indexing import add_codes

    with file_lock(args.index, "index", INDEX_LOCK_WAIT_S), open_index(args.index) as index:
        added = add_codes(index, args.codes, f"--index {args.index}", args.allow_other_model)
        index.save(args.index)  # in place, atomically: a failure above leaves the file as it was
        print(f"index {args.index}: added {plural(added, 'code')}, {plural(len(index), 'code')} now")
    return 0


def _read_lines(path, flag: str, nothing: str = "lists nothing to remove") -> List[Tuple[int, str]]:
    """(line number, text) of the non-empty lines of a list file that are not # comments; `nothing`
    is the error when there are none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DmuhError(f"{flag} {path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    entries = [
        (n + 1, line.strip()) for n, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")
    ]
    if not entries:
        raise DmuhError(f"{flag} {path}: {nothing}")
    return entries


def _read_ids(path: str) -> np.ndarray:
    ids = []
    for number, text in _read_lines(path, "--ids"):
        try:
            ids.append(int(text))
        except ValueError:
            raise DmuhError(
                f"--ids {path} line {number}: {text[:80]!r} is not an integer id (the index's ids are "
                "integers; give paths with --names)"
            ) from None
    return np.array(ids, dtype=np.int64)


def cmd_index_remove(args: argparse.Namespace) -> int:
    from dmuh.retrieval.index import open_index

    if (args.ids is None) == (args.names is None):
        raise DmuhError("give what to remove: --ids FILE (integer ids, one a line) or --names FILE (paths, one a line)")
    flag, path = ("--ids", args.ids) if args.ids is not None else ("--names", args.names)
    wanted = _read_ids(args.ids) if args.ids is not None else [text for _, text in _read_lines(args.names, "--names")]
    with file_lock(args.index, "index", INDEX_LOCK_WAIT_S), open_index(args.index) as index:
        try:
            removed = index.remove(wanted if args.ids is not None else index.ids_named(wanted))
        except DmuhError as error:
            raise DmuhError(f"{flag} {path}: {error}") from None
        index.save(args.index)
        print(f"index {args.index}: removed {plural(removed, 'code')}, {plural(len(index), 'code')} left")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from dmuh.retrieval.index import open_index

    with open_index(args.index) as index:
        info = index.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    model = info["meta"].get("model") or {}
    lines = [
        f"index: {args.index}",
        f"format: {info['format']} version {info['version']} (checksum ok)",
        f"backend: {info['backend']}",
        f"kind: {info['kind']}",
        f"bits: {info['bits']}",
        f"count: {info['count']}",
    ]
    if info.get("milvus"):
        lines.append(
            f"milvus: collection {info['milvus']['collection']} ({info['milvus']['index_type']}) at "
            f"{info['milvus']['uri']}"
        )
    if info["params"]:
        lines.append("params: " + ", ".join(f"{k}={v}" for k, v in info["params"].items()))
    if info.get("decoder"):
        lines.append(
            f"decoder: {info['decoder']['bits']} bits -> {info['decoder']['hidden']} -> "
            f"{info['decoder']['dim']} features (search --rerank decoder)"
        )
    if model:
        lines.append(
            f"model: {model.get('method')} / {model.get('model')}, run {model.get('run')}, "
            f"checkpoint sha256 {str(model.get('checkpoint_sha256'))[:16]}..."
        )
    print("\n".join(lines))
    return 0


# -- search -----------------------------------------------------------------------------------


def _encode_texts(args: argparse.Namespace, encoder) -> int:
    from dmuh.retrieval.encoder import encode_texts

    for flag, value in (
        ("--uncertainty", args.uncertainty),
        ("--features", args.features),
        ("--image-size", args.image_size),
    ):
        if value:
            raise DmuhError(f"{flag} applies to --images, not --texts")
    if args.batch_size:
        encoder = encoder.with_batch_size(args.batch_size)
    codes = encode_texts(encoder, args.texts)
    codes.save(args.out, overwrite=args.force)
    extra = ", labels" if codes.labels is not None else ""
    print(f"encoded {plural(len(codes), 'text')} into {codes.bits}-bit codes{extra}: {args.out}")
    return 0


def _read_query_list(path: Path) -> List[Path]:
    paths = [Path(text) for _, text in _read_lines(path, "--queries", "no query images listed")]
    return [p if p.is_absolute() else path.parent / p for p in paths]


def _report(args: argparse.Namespace, names: List[str], found: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON report of `dmuh search`: the service's results, a block per query."""
    queries = [{"query": name, "results": rows} for name, rows in zip(names, found["results"])]
    report: Dict[str, Any] = {"index": args.index, "k": args.k, "rerank": args.rerank, "queries": queries}
    report.update((key, found[key]) for key in ("tau", "depth") if key in found)
    return report


def _format_results(report: Dict[str, Any]) -> str:
    blocks = []
    score = {"uncertainty": ("weighted", "weighted_distance"), "decoder": ("cosine", "decoded_cosine")}.get(
        report["rerank"]
    )
    for query in report["queries"]:
        lines = [f"query {query['query']}"]
        lines.append(f"  {'rank':>4}  {'distance':>8}" + (f"  {score[0]:>8}" if score else "") + f"  {'id':>8}  path")
        for row in query["results"]:
            lines.append(
                f"  {row['rank']:>4}  {row['distance']:>8}"
                + (f"  {row[score[1]]:>8.3f}" if score else "")
                + f"  {row['id']:>8}  {row['path'] if row['path'] is not None else '-'}"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _rerank_mode(args: argparse.Namespace) -> None:
    """Normalise --rerank / --depth: args.rerank one of RERANK_MODES or None, args.depth a positive
    count (a bare number after --rerank is the older spelling of `uncertainty --depth N`)."""
    if args.rerank is not None and args.rerank.isdigit():
        if args.depth is not None:
            raise DmuhError(f"--rerank {args.rerank}: give the depth once, as --depth")
        check_positive(int(args.rerank), "--rerank")
        args.rerank, args.depth = "uncertainty", int(args.rerank)
    if args.rerank is not None and args.rerank not in RERANK_MODES:
        raise DmuhError(f"--rerank {args.rerank!r}: choose {' or '.join(RERANK_MODES)} (or a depth, for uncertainty)")
    if args.depth is not None and args.rerank is None:
        raise DmuhError("--depth applies to --rerank")
    check_positive(args.depth, "--depth")
    if args.depth is None:
        args.depth = DEFAULT_RERANK_DEPTH


def cmd_search(args: argparse.Namespace) -> int:
    from dmuh.retrieval.index import SearchParams, open_index
    from dmuh.retrieval.queries import gather_queries
    from dmuh.retrieval.service import SearchService

    inputs = [("--index", args.index), ("--queries", args.queries), ("--run", args.run)]
    refuse_overwrite(args.out, args.force, inputs=inputs + [("--image", image) for image in args.image])
    _output_folder(args.out)
    if not args.image and not args.queries and not args.text:
        raise DmuhError(
            "give query images with --image (repeatable), text with --text (repeatable) or a file of "
            "queries with --queries"
        )
    _rerank_mode(args)
    if args.tau is not None and args.rerank != "uncertainty":
        raise DmuhError("--tau applies to --rerank uncertainty")
    check_positive(args.nprobe, "--nprobe")
    check_positive(args.ef_search, "--ef-search")
    check_positive(args.threads, "--threads")
    codes_file = args.queries if args.queries and args.queries.endswith(".npz") else None
    image_paths = [Path(p) for p in args.image]
    if args.queries and codes_file is None:
        image_paths += _read_query_list(Path(args.queries))
    with open_index(args.index) as index:
        if args.out and getattr(index, "uri", None):  # a Milvus Lite file is read too
            refuse_input_as_output(args.out, "--out", [("the index's --uri", index.uri)])
        service = SearchService(index, index_path=args.index)
        queries = gather_queries(
            service,
            codes_file,
            image_paths,
            args.text,
            args.rerank,
            run=args.run,
            device=args.device,
            allow_other_model=args.allow_other_model,
        )
        depth = args.depth if args.rerank is not None else None
        found = service.search_batch(
            queries.query(),
            args.k,
            args.rerank,
            depth,
            args.tau,
            SearchParams(nprobe=args.nprobe, ef_search=args.ef_search, kernel=args.kernel, threads=args.threads),
        )
        report = _report(args, queries.names, found)
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text if args.json else _format_results(report))
    return 0


# -- export-onnx ------------------------------------------------------------------------------


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from dmuh.retrieval.onnx import export_onnx

    run = require_run(args)
    refuse_overwrite(args.out, args.force, inputs=[("--run", run)])
    _output_folder(args.out)
    _check_image_size(args.image_size)
    meta = export_onnx(run, args.out, opset=args.opset, image_size=args.image_size, overwrite=args.force)
    print(f"exported {args.out}: inputs {meta['inputs']}, image size {meta['image_size']}, {meta['bits']} bits")
    return 0
