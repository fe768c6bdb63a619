"""The label-free methods on the unsupervised CIFAR-10 protocol: MAP@1000 and MAP@all, and the
nearest-neighbour recall of rank-preserving hashing with and without decoder re-ranking.

    # 1. features of every image from a label-free backbone (`dmuh pretrain --objective simclr`)
    PYTHONPATH=src python bench/unsup_table.py features --init runs/simclr --data cifar10-jpeg.zip --out feats.npz
    # 2. every method at every code length, trained on the features read WITHOUT labels
    PYTHONPATH=src python bench/unsup_table.py train --features feats.npz --out runs/unsup --jobs 2
    #    CIBHash learns from augmented views of the images themselves, from the same backbone
    PYTHONPATH=src python bench/unsup_table.py train --images cifar10-jpeg.zip --init runs/simclr --out runs/unsup
    # 3. the tables (labels are read here, to score)
    PYTHONPATH=src python bench/unsup_table.py report --features feats.npz --out runs/unsup

The features file holds `features`, `labels`, `ids`, `subsets` and `class_names`, so the protocol
`cifar10-unsup` finds the 10,000 test images as queries; training reads it as `unlabeled:FILE`
(labels dropped at the source), and only `report` reads the labels. The image methods train on
the images as the backbone was pre-trained on them (`--init` checks the split's fingerprint); a
label-free method is built without a label column either way. Recall@k is the share of a
query's k nearest database items by cosine of the features that its first k results hold:
Hamming ranking over a flat index (ties in Hamming distance go by database position), and the
HNSW candidates re-ranked by the decoder (`CodeIndex.search_decoded`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dmuh.metrics.stats import seeds_cell as cell

FEATURE_METHODS = ("itq", "lsh", "greedyhash-unsup", "bihalf", "distillhash", "dsg", "rph", "ssdh", "tbh")
IMAGE_METHODS = ("cibhash",)
BITS = (16, 32, 64)
RECALL_METHODS = ("rph", "itq", "lsh")


def dmuh(*args: str, threads: int) -> None:
    """One `python -m dmuh` command in a subprocess with `threads` CPU threads; its output goes to the log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "dmuh", *map(str, args)], check=True, env=env)


def cmd_features(args) -> None:
    """Fit LSH (instant) on the backbone of --init to get a run, then store its encoder's backbone
    features of every item, with labels, ids and subsets (for scoring and the protocol)."""
    import yaml

    from dmuh.data import open_source
    from dmuh.data.pipeline import images_to_tensor
    from dmuh.engine.runtime import resolve_cache_dir
    from dmuh.retrieval.encoder import load_encoder
    from dmuh.utils.io import atomic_path

    pretrain = yaml.safe_load((Path(args.init) / "config.yaml").read_text())
    run = Path(args.out).with_suffix(".run")
    if not (run / "checkpoint.safetensors").exists():
        model_params = [f"{key}={json.dumps(value)}" for key, value in (pretrain.get("model_params") or {}).items()]
        # The data as --init was pre-trained on (its split's fingerprint must match); LSH reads no label.
        dmuh(
            "train",
            "--method",
            "lsh",
            "--data",
            args.data,
            "--protocol",
            args.protocol,
            "--model",
            pretrain["model"],
            *sum((["--model-param", p] for p in model_params), []),
            "--init",
            args.init,
            "--bits",
            16,
            "--cache-dir",
            args.cache_dir,
            "--out",
            run,
            "--quiet",
            "--eval-every",
            -1,
            "--train-map-items",
            0,
            "--device",
            args.device,
            threads=args.threads,
        )  # the run is only the encoder
    encoder = load_encoder(run, args.device)
    source = open_source(args.data)
    images = source.decode(cache_dir=resolve_cache_dir(args.cache_dir))  # the training run's cache, when kept
    features = [
        encoder.features(images_to_tensor(images[start : start + 4096])) for start in range(0, len(source), 4096)
    ]
    with atomic_path(Path(args.out)) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            features=np.concatenate(features),
            labels=source.labels,
            ids=np.array(source.ids),
            subsets=source.subsets,
            class_names=np.array(source.class_names),
        )
    print(f"{args.out}: {len(source)} x {features[0].shape[1]} features of {args.init}'s backbone")


def cmd_train(args) -> None:
    jobs = []
    for seed, bits in ((seed, bits) for seed in args.seeds for bits in args.bits):
        if args.features:
            for method in args.methods or FEATURE_METHODS:
                out = Path(args.out) / f"{method}-{bits}-s{seed}"
                # ITQ's and LSH's randomness is their own `seed` (the rotation, the projection).
                own_seed = ["-p", f"seed={seed}"] if method in ("itq", "lsh") else []
                jobs.append(
                    (
                        out,
                        [
                            "train",
                            "--method",
                            method,
                            "--data",
                            f"unlabeled:{args.features}",
                            "--protocol",
                            "cifar10-unsup",
                            "--model",
                            "mlp",
                            "--model-param",
                            "hidden=[]",
                            "--bits",
                            bits,
                            "--epochs",
                            args.epochs,
                            "--batch-size",
                            128,
                            *own_seed,
                            "--seed",
                            seed,
                            "--out",
                            out,
                            "--quiet",
                            "--eval-every",
                            -1,
                        ],
                    )
                )
        if args.images:
            pretrain_config = Path(args.init) / "config.yaml"
            import yaml

            pretrain = yaml.safe_load(pretrain_config.read_text())
            model_params = sum(
                (["--model-param", f"{k}={json.dumps(v)}"] for k, v in (pretrain.get("model_params") or {}).items()), []
            )
            for method in args.methods or IMAGE_METHODS:
                out = Path(args.out) / f"{method}-{bits}-s{seed}"
                # The images as --init was pre-trained on them (the split's fingerprint must match);
                # the method itself gets no label column (uses_labels is false).
                jobs.append(
                    (
                        out,
                        [
                            "train",
                            "--method",
                            method,
                            "--data",
                            args.images,
                            "--protocol",
                            "cifar10-unsup",
                            "--model",
                            pretrain["model"],
                            *model_params,
                            "--init",
                            args.init,
                            "--bits",
                            bits,
                            "--epochs",
                            args.epochs,
                            "--batch-size",
                            128,
                            "--seed",
                            seed,
                            "--cache-dir",
                            args.cache_dir,
                            "--out",
                            out,
                            "--quiet",
                            "--eval-every",
                            -1,
                        ],
                    )
                )
    todo = [(out, command) for out, command in jobs if not (out / "checkpoint.safetensors").exists()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def run(job):
        out, command = job
        started = time.perf_counter()
        dmuh(*command, threads=threads)
        (out / "seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
        print(f"done {out} in {time.perf_counter() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, todo))


def neighbour_recalls(run: Path, features: dict, ks, depth: int) -> dict:
    """Recall@k of the run's Hamming ranking (flat) and, for a run with a decoder, of HNSW + decoder re-ranking."""
    from dmuh.metrics.ranking import neighbour_recall, true_neighbours
    from dmuh.retrieval.encoder import encode_arrays, load_encoder
    from dmuh.retrieval.index import build_index

    subsets = features["subsets"]
    query, database = np.flatnonzero(subsets == "test"), np.flatnonzero(subsets != "test")
    x = features["features"]
    truth = true_neighbours(x[query], x[database], max(ks))
    encoder = load_encoder(run)
    query_codes, _ = encode_arrays(encoder, x[query])
    db_codes, _ = encode_arrays(encoder, x[database])
    _, hamming = build_index(db_codes, kind="flat", bits=encoder.bits).search_positions(query_codes, max(ks))
    result = {f"hamming@{k}": neighbour_recall(hamming, truth, k) for k in ks}
    if encoder.method.trains_decoder:
        index = build_index(db_codes, kind="hnsw", bits=encoder.bits)
        index.attach_decoder(encoder.method.decoder)
        started = time.perf_counter()
        decoded = index.search_decoded(query_codes, x[query], max(ks), depth=depth, ef_search=depth)["positions"]
        result["decoder_seconds"] = time.perf_counter() - started
        result.update({f"decoder@{k}": neighbour_recall(decoded, truth, k) for k in ks})
    return result


def cmd_report(args) -> None:
    from dmuh.methods import display_name
    from dmuh.studies.evaluate import evaluate_run

    features = dict(np.load(args.features, allow_pickle=False))
    rows = {}  # (method, bits) -> [one dict per seed]
    for run in sorted(Path(args.out).glob("*-*-s*")):
        if not (run / "checkpoint.safetensors").exists():
            continue
        method, bits, _ = run.name.rsplit("-", 2)
        data = args.images if method in IMAGE_METHODS else args.features
        if data is None:
            continue
        eval_file = run / "eval.json"
        report = json.loads(eval_file.read_text()) if eval_file.exists() else evaluate_run(run, data=data)
        row = {
            "map@1000": report["map_at_k"],
            "map": report["map"],
            "seconds": float((run / "seconds.txt").read_text()) if (run / "seconds.txt").exists() else float("nan"),
        }
        if method in RECALL_METHODS:
            recall_file = run / "recall.json"
            if not recall_file.exists():
                recall_file.write_text(json.dumps(neighbour_recalls(run, features, args.ks, args.depth)))
            row.update(json.loads(recall_file.read_text()))
        rows.setdefault((method, int(bits)), []).append(row)
    order = FEATURE_METHODS + IMAGE_METHODS
    methods = sorted({m for m, _ in rows}, key=order.index)
    bits = sorted({b for _, b in rows})

    def values(method, b, key):
        return [row.get(key) for row in rows.get((method, b), [])]

    for key, title in (("map@1000", "MAP@1000"), ("map", "MAP@all")):
        print(f"| {title} | " + " | ".join(f"{b} bits" for b in bits) + " |")
        print("|---|" + "---:|" * len(bits))
        for method in methods:
            print(f"| {display_name(method)} | " + " | ".join(cell(values(method, b, key)) for b in bits) + " |")
        print()
    low, high = args.ks
    print("| nearest-neighbour recall | " + " | ".join(f"{b} bits R@{low} | {b} bits R@{high}" for b in bits) + " |")
    print("|---|" + "---:|---:|" * len(bits))
    for method in RECALL_METHODS:
        for kind in ("hamming", "decoder") if method == "rph" else ("hamming",):
            cells = [
                f"{cell(values(method, b, f'{kind}@{low}'))} | {cell(values(method, b, f'{kind}@{high}'))}"
                for b in bits
            ]
            name = display_name(method) + (
                f" + HNSW + decoder re-rank (depth {args.depth})" if kind == "decoder" else ", Hamming ranking"
            )
            print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print(
        "training seconds (mean over seeds): "
        + ", ".join(
            f"{display_name(m)}-{b} {np.nanmean(values(m, b, 'seconds')):.0f}"
            for m in methods
            for b in bits
            if (m, b) in rows
        )
    )
    decoder = [v for b in bits for v in values("rph", b, "decoder_seconds") if v is not None]
    if decoder:
        print(f"decoder search of the 10,000 queries (HNSW + re-rank): {np.mean(decoder):.1f} s on average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("features")
    p.add_argument("--init", required=True, help="a `dmuh pretrain` run (label-free: --objective simclr)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default="default")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="where the backbone runs: cpu or cuda[:N]")
    p.add_argument(
        "--protocol",
        default="cifar10-unsup",
        help="the protocol --init was pre-trained with (its split's query is checked) [default: cifar10-unsup]",
    )
    p.set_defaults(func=cmd_features)
    p = commands.add_parser("train")
    p.add_argument("--features", help="features file of `features`: the feature methods run on it")
    p.add_argument("--images", help="the images (zip or folder): the image methods run on them")
    p.add_argument("--init", help="the backbone of the image methods (a `dmuh pretrain` run)")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+")
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--cache-dir", default="default")
    p.set_defaults(func=cmd_train)
    p = commands.add_parser("report")
    p.add_argument("--features", required=True)
    p.add_argument("--images", help="the images, to score the image methods' runs")
    p.add_argument("--ks", nargs=2, type=int, default=[10, 100], help="the two k of recall@k")
    p.add_argument("--depth", type=int, default=1000, help="HNSW candidates the decoder re-ranks")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)
    args = parser.parse_args()
    if args.command == "train" and args.images and not args.init:
        parser.error("train --images needs --init (the backbone)")
    args.func(args)


if __name__ == "__main__":
    main()
