"""Search speed: dmuh.retrieval.index.faiss.FaissIndex against raw FAISS, and IVF / HNSW recall against exact search.

    PYTHONPATH=src python bench/search_speed.py                      # 1,000,000 x 64 bits, 1,000 queries, k=100
    PYTHONPATH=src python bench/search_speed.py --threads 1          # as docs/search.md (a shared 2-core box)
    PYTHONPATH=src python bench/search_speed.py --n 100000 --quick   # a smaller run
    PYTHONPATH=src python bench/search_speed.py --decoder-dim 512 --depth 1000   # + decoder re-ranking

`--decoder-dim D` also times rank-preserving hashing's search (`CodeIndex.search_decoded`): the HNSW
candidates (top --depth) re-ranked by the cosine of D-dimensional query features to features
decoded from the candidates' codes, with an untrained decoder of the default size (its weights do
not change the cost); its recall columns compare the re-ranked top k with Hamming's exact top k,
which it is not meant to match, so they are left out.

Random codes (uniform bits, the default): the worst case for IVF and HNSW (no cluster structure,
and at 64 bits most distances fall in a narrow band around 32), so their recall there is a floor.
`--data clustered` draws codes around 10,000 centres (10% of bits flipped), closer to trained codes.
Timings are the median of --repeats runs of the whole query batch.

Recall@k is reported two ways: "ids", the share of the exact top-k ids found; "ties", the share
of returned codes at most as far as the exact k-th neighbour. With many codes at the k-th distance
any of them is a correct answer, so "ties" is the fair one and "ids" a lower bound.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from dmuh.retrieval.index import build_index


def timed(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def recall(exact_ids, exact_distances, ids, distances, k):
    found_ids = np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(exact_ids, ids)])
    kth = exact_distances[:, k - 1 : k]
    within = ((distances[:, :k] <= kth) & (ids[:, :k] >= 0)).mean()
    return float(found_ids), float(within)


def make_codes(n: int, queries: int, bits: int, data: str = "random", seed: int = 0):
    """(database (n, ceil(bits / 8)), queries) packed uint8 codes: uniform random bits, or
    ("clustered") codes around 10,000 random centres with 10% of bits flipped; padding bits zero."""
    rng = np.random.default_rng(seed)
    width = (bits + 7) // 8
    if data == "random":
        database = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
        query_codes = rng.integers(0, 256, size=(queries, width), dtype=np.uint8)
    else:
        centres = rng.random((10_000, 8 * width)) < 0.5

        def around(count):
            flipped = centres[rng.integers(0, len(centres), size=count)] ^ (rng.random((count, 8 * width)) < 0.1)
            return np.packbits(flipped, axis=1)

        database, query_codes = around(n), around(queries)
    if bits % 8:  # keep the padding bits zero
        database[:, -1] &= 0xFF ^ ((1 << (8 * width - bits)) - 1)
        query_codes[:, -1] &= 0xFF ^ ((1 << (8 * width - bits)) - 1)
    return database, query_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="database codes")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--nprobes", default="1,4,16,64", help="ivf nprobe values to time")
    parser.add_argument("--ef-searches", default="128,512", help="hnsw efSearch values to time")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="skip HNSW (its build is the slow part)")
    parser.add_argument(
        "--data",
        default="random",
        choices=("random", "clustered"),
        help="uniform random bits, or codes around 10,000 random centres with 10%% of bits flipped "
        "(closer to trained codes: classes form clusters)",
    )
    parser.add_argument("--flat-only", action="store_true", help="only the flat comparison")
    parser.add_argument("--threads", type=int, help="FAISS (OpenMP) threads [FAISS's default: one per CPU]")
    parser.add_argument("--decoder-dim", type=int, help="also time HNSW + decoder re-ranking with D-dim features")
    parser.add_argument("--depth", type=int, default=1000, help="candidates the decoder re-ranks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    database, queries = make_codes(args.n, args.queries, args.bits, args.data, args.seed)
    width = database.shape[1]
    print(
        f"{args.n:,} {args.data} {args.bits}-bit codes, {args.queries:,} queries, k={args.k}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, FAISS {faiss.__version__} "
        f"with {faiss.omp_get_max_threads()} threads",
        flush=True,
    )

    build_index(database[:1000], bits=args.bits).search(
        queries[:1], 1
    )  # imports (torch via dmuh.codes.binary) out of the timings
    rows = []
    raw = faiss.IndexBinaryFlat(8 * width)
    raw.add(database)
    started = time.perf_counter()
    flat = build_index(database, bits=args.bits, kind="flat")
    flat_build = time.perf_counter() - started
    # Interleave the two, alternating which goes first, so drift in machine load hits both alike.
    raw_times, ours_times = [], []
    for repeat in range(args.repeats):
        for which in (0, 1) if repeat % 2 == 0 else (1, 0):
            if which == 0:
                t, (raw_distances, raw_ids) = timed(lambda: raw.search(queries, args.k), 1)
                raw_times.append(t)
            else:
                t, (exact_distances, exact_ids) = timed(lambda: flat.search(queries, args.k), 1)
                ours_times.append(t)
    raw_time, ours_time = statistics.median(raw_times), statistics.median(ours_times)
    assert np.array_equal(raw_distances, exact_distances), "flat distances differ from raw FAISS"
    assert np.array_equal(raw_ids, exact_ids), "flat ids differ from raw FAISS"  # ids = positions here
    rows.append(("faiss IndexBinaryFlat (raw)", "", 0.0, raw_time, 1.0, 1.0))
    rows.append(("dmuh flat", "", flat_build, ours_time, 1.0, 1.0))
    print(f"flat: ours {ours_time:.3f} s, raw faiss {raw_time:.3f} s, ratio {ours_time / raw_time:.3f}", flush=True)

    if args.flat_only:
        args.nprobes, args.quick = "", True
    started = time.perf_counter()
    ivf = build_index(database, bits=args.bits, kind="ivf") if args.nprobes else None
    ivf_build = time.perf_counter() - started
    for nprobe in [int(x) for x in args.nprobes.split(",") if x]:
        t, (distances, ids) = timed(lambda nprobe=nprobe: ivf.search(queries, args.k, nprobe=nprobe), args.repeats)
        rows.append(
            (
                "dmuh ivf",
                f"nlist={ivf.params['nlist']} nprobe={nprobe}",
                ivf_build,
                t,
                *recall(exact_ids, exact_distances, ids, distances, args.k),
            )
        )
        print(rows[-1], flush=True)

    if not args.quick:
        started = time.perf_counter()
        hnsw = build_index(database, bits=args.bits, kind="hnsw", m=args.hnsw_m)
        hnsw_build = time.perf_counter() - started
        for ef in [int(x) for x in args.ef_searches.split(",") if x]:
            t, (distances, ids) = timed(
                lambda ef=ef: hnsw.search(queries, args.k, ef_search=max(ef, args.k)), args.repeats
            )
            rows.append(
                (
                    "dmuh hnsw",
                    f"M={args.hnsw_m} efSearch={max(ef, args.k)}",
                    hnsw_build,
                    t,
                    *recall(exact_ids, exact_distances, ids, distances, args.k),
                )
            )
            print(rows[-1], flush=True)
        if args.decoder_dim:
            import torch

            from dmuh.models.decoder import FeatureDecoder

            torch.manual_seed(args.seed)
            hnsw.attach_decoder(FeatureDecoder(args.bits, args.decoder_dim))
            features = np.random.default_rng(args.seed).normal(size=(args.queries, args.decoder_dim)).astype(np.float32)
            ef = max(args.depth, args.k)
            t, _ = timed(
                lambda: hnsw.search_decoded(queries, features, args.k, depth=args.depth, ef_search=ef), args.repeats
            )
            rows.append(
                (
                    "dmuh hnsw + decoder re-rank",
                    f"M={args.hnsw_m} efSearch={ef} depth={args.depth} D={args.decoder_dim}",
                    hnsw_build,
                    t,
                    float("nan"),
                    float("nan"),
                )
            )
            print(rows[-1], flush=True)

    print()
    print(
        f"| index | parameters | build s | search s ({args.queries:,} queries) | vs raw flat | "
        f"recall@{args.k} ids | recall@{args.k} ties |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, params, build, search, recall_ids, recall_ties in rows:
        print(
            f"| {name} | {params} | {build:.1f} | {search:.3f} | {search / raw_time:.2f}x | "
            f"{recall_ids:.3f} | {recall_ties:.3f} |"
        )


if __name__ == "__main__":
    main()
