"""Search backends and parallel encoding: FAISS flat / ivf / hnsw and Milvus (Lite: BIN_FLAT; a
server: also BIN_IVF_FLAT) on the same codes, and `dmuh encode --shards` under torchrun with 1 and 2
CPU processes.

    PYTHONPATH=src python bench/search_backends.py                 # 1,000,000 x 64 bits, 1,000 queries, k=100
    PYTHONPATH=src python bench/search_backends.py --skip-hnsw     # without the slow HNSW build
    PYTHONPATH=src python bench/search_backends.py --milvus-uri http://localhost:19530   # + a server's BIN_IVF_FLAT
    PYTHONPATH=src python bench/search_backends.py --milvus-server --skip-lite --skip-hnsw --skip-encode
                                  # + an embedded Milvus 2.3.5 server started here (pip install milvus==2.3.5)
    PYTHONPATH=src python bench/search_backends.py --n 20000 --queries 50 --skip-hnsw --encode-items 2000   # small

Search: random 64-bit codes (bench/search_speed.py's `make_codes`, the worst case for ivf and hnsw),
one batch of --queries queries, k = --k; build time (insert included for Milvus), the whole batch's
search time (median of --repeats), and recall@k against FAISS flat, "ids" and "ties" as in
bench/search_speed.py. Milvus flat is exact (the tests check it against FAISS flat, ties
included), so its recall is 1. FAISS uses --threads OpenMP threads; Milvus Lite and a Milvus server
run their own processes with their own threads. A server's build time is the insert, and for ivf
also the flush, Milvus's index build and the reload of the indexed segments; queries/s is the batch's
queries over its search time (the batch is one request of up to 16,384 / k queries at a time).

Encode: a small MLP run (1 epoch on scikit-learn's digits features, 64 -> 64 bits) encodes
--encode-items random 64-dimensional feature vectors into 8 shards, with torchrun
--nproc_per_node=P for each P of --encode-procs, the machine's cores shared out (OMP_NUM_THREADS =
cores / P). The whole command is timed (process start, loading the run, encoding, the manifest),
and the same command on 8 items ("startup"); items / s is the items over the difference.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from search_speed import make_codes, recall, timed

ROOT = Path(__file__).resolve().parents[1]


def search_rows(args, database, queries, work: Path):
    """(backend, index, parameters, build s, search s, recall ids, recall ties) rows."""
    from dmuh.retrieval.index import build_index

    rows = []
    build_index(database[:1000], bits=args.bits).search(queries[:1], 1)  # imports out of the timings
    started = time.perf_counter()
    flat = build_index(database, bits=args.bits)
    build = time.perf_counter() - started
    t, (exact_distances, exact_ids) = timed(lambda: flat.search(queries, args.k), args.repeats)
    rows.append(("faiss", "flat (IndexBinaryFlat)", "", build, t, 1.0, 1.0))
    print(rows[-1], flush=True)

    def measured(backend, name, params, build_s, search):
        t, (distances, ids) = timed(search, args.repeats)
        rows.append((backend, name, params, build_s, t, *recall(exact_ids, exact_distances, ids, distances, args.k)))
        print(rows[-1], flush=True)

    started = time.perf_counter()
    ivf = build_index(database, bits=args.bits, kind="ivf")
    build = time.perf_counter() - started
    for nprobe in args.nprobes:
        measured(
            "faiss",
            "ivf (IndexBinaryIVF)",
            f"nlist={ivf.params['nlist']} nprobe={nprobe}",
            build,
            lambda index=ivf, nprobe=nprobe: index.search(queries, args.k, nprobe=nprobe),
        )
    del ivf
    if not args.skip_hnsw:
        started = time.perf_counter()
        hnsw = build_index(database, bits=args.bits, kind="hnsw", m=args.hnsw_m)
        build = time.perf_counter() - started
        for ef in args.ef_searches:
            ef = max(ef, args.k)
            measured(
                "faiss",
                "hnsw (IndexBinaryHNSW)",
                f"M={args.hnsw_m} efSearch={ef}",
                build,
                lambda ef=ef: hnsw.search(queries, args.k, ef_search=ef),
            )
        del hnsw

    from dmuh.retrieval.index.milvus import MilvusIndex, close_connections

    targets = [] if args.skip_lite else [("Milvus Lite 2.5.1", str(work / "codes.db"), ("flat",))]
    if args.milvus_uri:
        targets.append((args.milvus_label, args.milvus_uri, ("flat", "ivf")))
    for label, uri, kinds in targets:
        for kind in kinds:
            started = time.perf_counter()
            index = MilvusIndex.build(
                database, kind=kind, bits=args.bits, uri=uri, collection=f"bench_{kind}", force=True
            )
            build = time.perf_counter() - started
            name = {"flat": "BIN_FLAT", "ivf": "BIN_IVF_FLAT"}[kind]
            if kind == "flat":
                measured(
                    label, name, "exact, ties by position", build, lambda index=index: index.search(queries, args.k)
                )
            for nprobe in args.nprobes if kind == "ivf" else ():
                measured(
                    label,
                    name,
                    f"nlist={index.params['nlist']} nprobe={nprobe}",
                    build,
                    lambda index=index, nprobe=nprobe: index.search(queries, args.k, nprobe=nprobe),
                )
            index.close()
    if not args.milvus_uri and not args.skip_lite:
        rows.append(
            ("Milvus Lite 2.5.1", "BIN_IVF_FLAT", "not run: Milvus Lite has BIN_FLAT only", None, None, None, None)
        )
    close_connections()
    return rows


def encode_rows(args, work: Path):
    """(processes, items, seconds, startup seconds, items/s after startup) rows of `dmuh encode
    --shards` under torchrun; startup is the same command on 8 items (one per shard)."""
    from sklearn.datasets import load_digits

    from dmuh.engine.trainer import train
    from dmuh.runs.config import TrainConfig

    digits = load_digits()
    train_features = work / "digits.npz"
    np.savez(train_features, features=(digits.data / 16.0).astype(np.float32), labels=digits.target)
    run = work / "run"
    train(
        TrainConfig(
            data=f"features:{train_features}",
            protocol="digits",
            model="mlp",
            hash_norm="none",
            method="regu",
            bits=64,
            epochs=1,
            batch_size=100,
            out=str(run),
            eval_every=-1,
            trace_items=0,
        ),
        progress=False,
        echo=lambda line: None,
    )
    rng = np.random.default_rng(args.seed)
    cores = os.cpu_count() or 1

    def encode(processes: int, count: int) -> float:
        items = work / f"items-{count}.npz"
        if not items.exists():
            np.savez(items, features=rng.normal(size=(count, 64)).astype(np.float32))
        folder = work / f"shards-{processes}-{count}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(max(1, cores // processes))}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--standalone",
            "-m",
            "dmuh",
            "--",
            "encode",
            "--run",
            str(run),
            "--images",
            f"features:{items}",
            "--shards",
            str(folder),
            "--shard-size",
            str(max(1, -(-count // 8))),
            "--quiet",
        ]
        started = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"torchrun with {processes} processes failed:\n{result.stderr[-3000:]}")
        return time.perf_counter() - started

    rows = []
    for processes in args.encode_procs:
        startup = encode(processes, 8)
        seconds = encode(processes, args.encode_items)
        rows.append((processes, args.encode_items, seconds, startup, args.encode_items / max(seconds - startup, 1e-9)))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="database codes")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprobes", default="16,64", help="ivf nprobe values to time")
    parser.add_argument("--ef-searches", default="128,512", help="hnsw efSearch values to time")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--skip-hnsw", action="store_true", help="no FAISS HNSW (its build is the slow part)")
    parser.add_argument(
        "--milvus-uri", help="also a Milvus server (flat and BIN_IVF_FLAT), e.g. http://localhost:19530"
    )
    parser.add_argument(
        "--milvus-server",
        action="store_true",
        help="start an embedded Milvus server (the milvus package, 2.3.5) for the server rows",
    )
    parser.add_argument("--skip-lite", action="store_true", help="no Milvus Lite rows")
    parser.add_argument("--threads", type=int, default=1, help="FAISS (OpenMP) threads")
    parser.add_argument("--encode-items", type=int, default=1_000_000, help="feature vectors to encode")
    parser.add_argument("--encode-procs", default="1,2", help="torchrun process counts to time")
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.nprobes = [int(x) for x in args.nprobes.split(",") if x]
    args.ef_searches = [int(x) for x in args.ef_searches.split(",") if x]
    args.encode_procs = [int(x) for x in args.encode_procs.split(",") if x]

    import faiss

    faiss.omp_set_num_threads(args.threads)
    database, queries = make_codes(args.n, args.queries, args.bits, "random", args.seed)
    print(
        f"{args.n:,} random {args.bits}-bit codes, {args.queries:,} queries, k={args.k}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, FAISS {faiss.__version__} "
        f"with {args.threads} thread(s)",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="dmuh-bench-"))
    server = None
    args.milvus_label = "Milvus server"
    try:
        if args.milvus_server:
            from dmuh.retrieval.index.milvus_server import EmbeddedMilvus

            server = EmbeddedMilvus(work / "milvus-server")
            server.start()
            args.milvus_uri, args.milvus_label = server.uri, "Milvus server 2.3.5 (embedded)"
        rows = search_rows(args, database, queries, work)
        encoded = [] if args.skip_encode else encode_rows(args, work)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"| backend | index | parameters | build s | search s ({args.queries:,} queries) | queries/s | "
        f"recall@{args.k} ids | recall@{args.k} ties |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for backend, name, params, build, search, recall_ids, recall_ties in rows:
        if build is None:
            print(f"| {backend} | {name} | {params} | | | | | |")
            continue
        print(
            f"| {backend} | {name} | {params} | {build:.1f} | {search:.3f} | {args.queries / search:,.0f} | "
            f"{recall_ids:.3f} | {recall_ties:.3f} |"
        )
    if encoded:
        print()
        print("| torchrun processes | items | whole command s | startup s (8 items) | items / s after startup |")
        print("|---:|---:|---:|---:|---:|")
        for processes, items, seconds, startup, rate in encoded:
            print(f"| {processes} | {items:,} | {seconds:.1f} | {startup:.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
