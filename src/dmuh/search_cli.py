"""The `dmuh encode`, `dmuh index build|info`, `dmuh search` and `dmuh export-onnx` subcommands.

`add_commands(subparsers)` adds them to the `dmuh` parser; every handler returns an exit code and
raises DmuhError for bad input (the CLI prints it as one line). No output file is replaced unless
--force is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from dmuh.errors import DmuhError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "encode", help="encode images with a trained run into a codes file",
        description="Encode images into packed binary codes (.npz) with ids, labels when known, the bit length "
                    "and the model's identity; --uncertainty adds DMUH's image- and bit-level uncertainty.")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory written by `dmuh train`")
    p.add_argument("--images", required=True, metavar="DIR|ZIP|LIST",
                   help="a folder or .zip of images (class folders give labels), a .txt list (paths, optionally "
                        "followed by 0/1 labels), or a dmuh data source (digits, cifar-batches:DIR, ...)")
    p.add_argument("--root", help="folder or .zip the paths of a list file are relative to [the list's folder]")
    p.add_argument("--out", required=True, metavar="FILE", help="codes file to write (.npz)")
    p.add_argument("--uncertainty", action="store_true",
                   help="store each image's DMUH uncertainty (momentum network; DMUH runs only)")
    p.add_argument("--image-size", type=int, help="decode images at this size [the run's]")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    p.add_argument("--batch-size", type=int, help="images per forward pass [the run's eval_batch_size]")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_encode)

    index = subparsers.add_parser("index", help="build or inspect a search index of codes",
                                  description="FAISS binary indexes in a checked file (see docs/search.md).")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    p = index_commands.add_parser("build", help="build an index from a codes file")
    p.add_argument("--codes", required=True, metavar="FILE", help="codes file written by `dmuh encode`")
    p.add_argument("--kind", default="flat", choices=("flat", "ivf", "hnsw"), help="exact flat, or approximate ivf / hnsw [flat]")
    p.add_argument("--nlist", type=int, help="ivf: number of inverted lists [round(sqrt(n))]")
    p.add_argument("--nprobe", type=int, help="ivf: lists searched per query [nlist // 16]")
    p.add_argument("--m", type=int, help="hnsw: neighbours per node [32]")
    p.add_argument("--ef-construction", type=int, help="hnsw: candidate list while building [64]")
    p.add_argument("--ef-search", type=int, help="hnsw: candidate list while searching [128]")
    p.add_argument("--out", required=True, metavar="INDEX", help="index file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_index_build)
    p = index_commands.add_parser("info", help="print an index file's header (verifies its checksum)")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_index_info)

    p = subparsers.add_parser(
        "search", help="search an index with query images or codes",
        description="Rank the index's codes by Hamming distance to each query; --rerank re-ranks the top "
                    "candidates by an uncertainty-weighted Hamming distance (DMUH runs).")
    p.add_argument("--index", required=True, metavar="INDEX")
    p.add_argument("--checkpoint", metavar="RUN", help="run that encodes the query images (the index's own model)")
    p.add_argument("--image", action="append", default=[], metavar="IMAGE", help="a query image (repeatable)")
    p.add_argument("--queries", metavar="FILE",
                   help="batch of queries: a .txt of image paths (one a line, relative to its folder) or a codes file")
    p.add_argument("--k", type=int, default=10, help="results per query [10]")
    p.add_argument("--rerank", type=int, nargs="?", const=1000, metavar="DEPTH",
                   help="re-rank the top DEPTH [1000] by uncertainty-weighted Hamming distance")
    p.add_argument("--tau", type=float, help="re-ranking temperature: bit weight exp(-u / (tau * the query's mean u)) [1]")
    p.add_argument("--nprobe", type=int, help="ivf: lists searched per query [the index's]")
    p.add_argument("--ef-search", type=int, help="hnsw: candidate list while searching [the index's]")
    p.add_argument("--allow-other-model", action="store_true",
                   help="search even if the queries' model is not the one that encoded the index")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the results (JSON) to FILE")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser(
        "export-onnx", help="export a run's hashing network as ONNX",
        description="ONNX graph: float32 pixels 0..255 (N, C, H, W) -> continuous codes and int8 sign codes.")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory written by `dmuh train`")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset [17]")
    p.add_argument("--image-size", type=int, help="input height and width [the run's decode size]")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export_onnx)


# ---------------------------------------------------------------------------------------------


def _refuse_overwrite(path: Optional[str], force: bool, flag: str = "--out") -> None:
    if path and Path(path).exists() and not force:
        raise DmuhError(f"{flag} {path} already exists; pass --force to replace it")


def _positive(value, flag: str) -> None:
    if value is not None and value < 1:
        raise DmuhError(f"{flag} {value}: expected a positive integer")


def cmd_encode(args: argparse.Namespace) -> int:
    from dmuh.encoding import encode_images, load_encoder, open_images

    _refuse_overwrite(args.out, args.force)
    _positive(args.image_size, "--image-size")
    _positive(args.batch_size, "--batch-size")
    encoder = load_encoder(args.checkpoint, args.device)
    if args.uncertainty and encoder.momentum_network is None:
        raise DmuhError(f"--uncertainty needs a DMUH run (a momentum network); {args.checkpoint} was trained with "
                        f"{encoder.config.method!r}")
    if args.batch_size:
        encoder.config.eval_batch_size = args.batch_size
    source = open_images(args.images, args.root, encoder.channels or 3)
    codes = encode_images(encoder, source, uncertainty=args.uncertainty, image_size=args.image_size, images_spec=args.images)
    codes.save(args.out, overwrite=args.force)
    extra = ", labels" if codes.labels is not None else ""
    extra += ", uncertainty" if codes.uncertainty is not None else ""
    print(f"encoded {len(codes)} images into {codes.bits}-bit codes{extra}: {args.out}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from dmuh.encoding import Codes
    from dmuh.search import Index

    _refuse_overwrite(args.out, args.force)
    given = {"nlist": args.nlist, "nprobe": args.nprobe, "m": args.m, "ef_construction": args.ef_construction,
             "ef_search": args.ef_search}
    accepted = {"flat": (), "ivf": ("nlist", "nprobe"), "hnsw": ("m", "ef_construction", "ef_search")}[args.kind]
    params = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in accepted:
            owner = "ivf" if name in ("nlist", "nprobe") else "hnsw"
            raise DmuhError(f"--{name.replace('_', '-')} applies to --kind {owner}, not {args.kind}")
        _positive(value, f"--{name.replace('_', '-')}")
        params[name] = value
    codes = Codes.load(args.codes)
    index = Index.build(codes, kind=args.kind, meta={**codes.identity(), "codes_file": str(args.codes)}, **params)
    index.save(args.out, overwrite=args.force)
    print(f"index {args.out}: {args.kind}, {len(index)} codes of {index.bits} bits"
          + (f", {', '.join(f'{k}={v}' for k, v in index.params.items())}" if index.params else ""))
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from dmuh.search import Index

    info = Index.load(args.index).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    model = info["meta"].get("model") or {}
    lines = [f"index: {args.index}", f"format: {info['format']} version {info['version']} (checksum ok)",
             f"kind: {info['kind']}", f"bits: {info['bits']}", f"count: {info['count']}"]
    if info["params"]:
        lines.append("params: " + ", ".join(f"{k}={v}" for k, v in info["params"].items()))
    if model:
        lines.append(f"model: {model.get('method')} / {model.get('model')}, run {model.get('run')}, "
                     f"checkpoint sha256 {str(model.get('checkpoint_sha256'))[:16]}...")
    print("\n".join(lines))
    return 0


def _read_query_list(path: Path) -> List[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DmuhError(f"--queries {path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    paths = [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise DmuhError(f"--queries {path}: no query images listed")
    return [p if p.is_absolute() else path.parent / p for p in paths]


def _check_same_model(index_meta: Dict[str, Any], model: Dict[str, Any], what: str, allow: bool) -> None:
    expected = (index_meta.get("model") or {}).get("checkpoint_sha256")
    actual = (model or {}).get("checkpoint_sha256")
    if expected and actual and expected != actual and not allow:
        raise DmuhError(f"{what} come from another model (checkpoint sha256 {actual[:12]}...) than the index's "
                        f"({expected[:12]}...); pass --allow-other-model to search anyway")


def cmd_search(args: argparse.Namespace) -> int:
    from dmuh.encoding import Codes, encode_arrays, load_encoder, read_image
    from dmuh.search import DEFAULT_TAU, Index

    _refuse_overwrite(args.out, args.force)
    if not args.image and not args.queries:
        raise DmuhError("give query images with --image (repeatable) or a file of queries with --queries")
    if args.tau is not None and args.rerank is None:
        raise DmuhError("--tau applies to --rerank")
    _positive(args.rerank, "--rerank")
    index = Index.load(args.index)
    query_codes = Codes.load(args.queries) if args.queries and args.queries.endswith(".npz") else None
    image_paths = [Path(p) for p in args.image]
    if args.queries and query_codes is None:
        image_paths += _read_query_list(Path(args.queries))
    names: List[str] = []
    packed_parts, uncertainty_parts = [], []
    if query_codes is not None:
        if query_codes.bits != index.bits:
            raise DmuhError(f"--queries {args.queries} holds {query_codes.bits}-bit codes but --index {args.index} "
                            f"holds {index.bits}-bit codes")
        _check_same_model(index.meta, query_codes.model, f"the codes in {args.queries}", args.allow_other_model)
        if args.rerank and query_codes.bit_uncertainty is None:
            raise DmuhError(f"--rerank needs bit uncertainty: encode {args.queries} with `dmuh encode --uncertainty`")
        names += query_codes.ids
        packed_parts.append(query_codes.packed)
        if args.rerank:
            uncertainty_parts.append(query_codes.bit_uncertainty.astype(np.float32))
    if image_paths:
        if not args.checkpoint:
            raise DmuhError("query images need --checkpoint RUN (the run that encoded the index)")
        encoder = load_encoder(args.checkpoint, args.device)
        if encoder.bits != index.bits:
            raise DmuhError(f"--index {args.index} holds {index.bits}-bit codes but the model of --checkpoint "
                            f"{args.checkpoint} makes {encoder.bits}-bit codes")
        _check_same_model(index.meta, encoder.identity, f"--checkpoint {args.checkpoint}'s codes", args.allow_other_model)
        if args.rerank and encoder.momentum_network is None:
            raise DmuhError(f"--rerank needs a DMUH run (a momentum network); {args.checkpoint} was trained with "
                            f"{encoder.config.method!r}")
        if encoder.channels is None:
            raise DmuhError(f"--checkpoint {args.checkpoint} encodes feature vectors, not images; pass --queries CODES.npz")
        size = index.meta.get("image_size") or encoder.image_size
        images = np.stack([read_image(path, encoder.channels, size) for path in image_paths])
        packed, u = encode_arrays(encoder, images, uncertainty=bool(args.rerank))
        names += [str(p) for p in image_paths]
        packed_parts.append(packed)
        if u is not None:
            uncertainty_parts.append(u)
    packed = np.concatenate(packed_parts)
    search_params = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    if args.rerank:
        tau = args.tau if args.tau is not None else DEFAULT_TAU
        result = index.search_reranked(packed, np.concatenate(uncertainty_parts), args.k, depth=args.rerank, tau=tau,
                                       **search_params)
        distances, positions, weighted = result["distances"], result["positions"], result["weighted"]
    else:
        distances, positions = index.search_positions(packed, args.k, **search_params)
        weighted = None
    ids = index.ids_at(positions)
    paths = index.names_at(positions)
    report = {"index": args.index, "k": args.k, "rerank": args.rerank, "queries": []}
    if args.rerank:
        report["tau"] = tau
    for q, name in enumerate(names):
        results = []
        for rank in range(positions.shape[1]):
            if positions[q, rank] < 0:
                continue
            row = {"rank": rank + 1, "id": int(ids[q, rank]), "path": paths[q][rank], "distance": int(distances[q, rank])}
            if weighted is not None:
                row["weighted_distance"] = round(float(weighted[q, rank]), 4)
            results.append(row)
        report["queries"].append({"query": name, "results": results})
    text = json.dumps(report, indent=2)
    if args.out:
        from dmuh.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text if args.json else _format_results(report))
    return 0


def _format_results(report: Dict[str, Any]) -> str:
    blocks = []
    for query in report["queries"]:
        lines = [f"query {query['query']}"]
        weighted = bool(report["rerank"])
        lines.append(f"  {'rank':>4}  {'distance':>8}" + (f"  {'weighted':>8}" if weighted else "") + f"  {'id':>8}  path")
        for row in query["results"]:
            lines.append(f"  {row['rank']:>4}  {row['distance']:>8}"
                         + (f"  {row['weighted_distance']:>8.3f}" if weighted else "")
                         + f"  {row['id']:>8}  {row['path'] if row['path'] is not None else '-'}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from dmuh.onnx_export import export_onnx

    _refuse_overwrite(args.out, args.force)
    _positive(args.image_size, "--image-size")
    meta = export_onnx(args.checkpoint, args.out, opset=args.opset, image_size=args.image_size, overwrite=args.force)
    print(f"exported {args.out}: inputs {meta['inputs']}, image size {meta['image_size']}, {meta['bits']} bits")
    return 0

