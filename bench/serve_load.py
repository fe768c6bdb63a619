"""Load on `dmuh serve`: requests per second and latency under concurrent clients on loopback,
with and without a share of malformed requests, and the server's memory.

    PYTHONPATH=src python bench/serve_load.py                       # 1,000,000 x 64-bit codes, flat and hnsw
    PYTHONPATH=src python bench/serve_load.py --n 20000 --hnsw-n 5000 --seconds 2 --clients 2   # a smoke run
    PYTHONPATH=src python bench/serve_load.py --hnsw-n 0 --milvus-server     # + Milvus flat and ivf, 2 replicas each

The database is --n random 64-bit codes (uniform bits) in a flat index and the first --hnsw-n of
them (all, by default) in an HNSW index of M 16 (random codes are HNSW's worst case, so its recall
is poor there; what is measured here is the service, not the index). Image queries are encoded by a small DMUH run trained here for one epoch on
scikit-learn's digits with the same code length (its codes do not come from the index's model:
the server runs with --allow-other-model; what is timed is decoding, the forward pass with the
momentum network's uncertainty, and the search). Each query image is a 32 x 32 JPEG.

Each phase runs --clients threads, each with its own keep-alive connection, sending requests back
to back for --seconds; the server runs in its own process (`python -m dmuh serve`), so the
clients do not share its interpreter. A malformed share mixes in, in turn: random bytes sent as
an image, a JPEG cut in half, and a 30-byte PNG that declares 100,000 x 100,000 pixels. Each
good request must get 200 and each malformed one a 4xx; the table counts both, and the server's
resident memory (VmRSS after the phase, and its peak VmHWM) shows whether bad input makes it grow.

With --milvus-uri URI (a Milvus server or cluster) or --milvus-server (an embedded Milvus 2.3.5
server started here, `dmuh.retrieval.index.milvus_server`), the same codes also go into two Milvus
collections, BIN_FLAT (exact) and BIN_IVF_FLAT (nlist and nprobe as FAISS's ivf defaults), and each
is served by --replicas `dmuh serve` processes over the one collection, the clients spread over them
in turn (client i talks to replica i mod --replicas); the phases there are the good ones (codes and
images, no malformed share: that path does not touch the index). Memory is the first replica's.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def random_codes(n: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, (bits + 7) // 8), dtype=np.uint8)


def png_bomb_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height pixels in a few dozen bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def query_jpegs(count: int, seed: int):
    """Small JPEGs of digits (the images the run was trained on, upscaled to 32 x 32)."""
    from PIL import Image

    from dmuh.data import DigitsSource

    digits = DigitsSource()
    images = digits.decode(np.random.default_rng(seed).choice(len(digits.ids), count, replace=False))
    out = []
    for array in images:
        buffer = io.BytesIO()
        Image.fromarray(array[:, :, 0]).resize((32, 32)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def build(folder: Path, n: int, hnsw_n: int, bits: int, seed: int, milvus_uri=None):
    """The indexes and the run -> {name: (index path, codes, build s, replicas)}, run directory."""
    from dmuh.engine.trainer import train
    from dmuh.retrieval.index import build_index
    from dmuh.runs.config import TrainConfig

    codes = random_codes(n, bits, seed)
    paths = {}
    started = time.perf_counter()
    build_index(codes, bits=bits, meta={}).save(folder / "flat.dmuhidx")
    paths["flat"] = (folder / "flat.dmuhidx", n, time.perf_counter() - started, 1)
    if hnsw_n:
        started = time.perf_counter()
        build_index(codes[:hnsw_n], kind="hnsw", bits=bits, meta={}, m=16).save(folder / "hnsw.dmuhidx")
        paths["hnsw"] = (folder / "hnsw.dmuhidx", hnsw_n, time.perf_counter() - started, 1)
    for kind in ("flat", "ivf") if milvus_uri else ():
        started = time.perf_counter()
        index = build_index(
            codes,
            backend="milvus",
            kind=kind,
            bits=bits,
            meta={},
            uri=milvus_uri,
            collection=f"serve_load_{kind}",
            force=True,
        )
        index.save(folder / f"milvus-{kind}.dmuhidx")
        index.close()
        paths[f"milvus {kind}"] = (folder / f"milvus-{kind}.dmuhidx", n, time.perf_counter() - started, None)
    run = folder / "run"
    train(
        TrainConfig(
            data="digits",
            protocol="digits",
            model="smallcnn",
            model_params={"input_size": 8},
            method="dmuh",
            bits=bits,
            epochs=1,
            batch_size=64,
            device="cpu",
            out=str(run),
            eval_every=-1,
            trace_items=0,
        ),
        progress=False,
        echo=lambda line: None,
    )
    return paths, run


def start_server(index: Path, run: Path, threads: int):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dmuh",
            "serve",
            "--index",
            str(index),
            "--run",
            str(run),
            "--allow-other-model",
            "--port",
            "0",
            "--threads",
            str(threads),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        raise SystemExit(f"dmuh serve did not start: {line}{process.stderr.read()}")
    host, port = line.rsplit("http://", 1)[1].strip().rstrip("/").rsplit(":", 1)
    return process, host, int(port)


def memory_mb(pid: int):
    """(VmRSS, VmHWM) of a process in MiB, from /proc (None where there is no /proc)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
    except OSError:
        return None, None
    return tuple(int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM"))


class Requests:
    """The requests of one phase: good ones (code or image queries) and the malformed ones."""

    def __init__(self, kind: str, bits: int, images, bad_share: float, seed: int):
        self.kind, self.bad_share = kind, bad_share
        self.codes = [code.tobytes().hex() for code in random_codes(256, bits, seed + 1)]
        self.images = images
        truncated = images[0][: len(images[0]) // 2]
        self.bad = [os.urandom(2048), truncated, png_bomb_header(100_000, 100_000)]

    def make(self, rng, k: int):
        """(body, content type, good?) of the next request."""
        if self.bad_share and rng.random() < self.bad_share:
            return self.bad[rng.integers(len(self.bad))], "image/jpeg", False
        if self.kind == "codes":
            return (
                json.dumps({"codes": self.codes[rng.integers(len(self.codes))], "k": k}).encode(),
                "application/json",
                True,
            )
        return self.images[rng.integers(len(self.images))], "image/jpeg", True


def load(servers, requests: Requests, clients: int, seconds: float, k: int, seed: int):
    """Run the clients, client i against servers[i mod len(servers)] ((host, port) pairs); -> (latencies
    of good requests in s, good ok, good total, bad 4xx, bad total, elapsed)."""
    results = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(number: int):
        rng = np.random.default_rng(seed + number)
        host, port = servers[number % len(servers)]
        connection = http.client.HTTPConnection(host, port, timeout=60)
        mine = []
        while time.perf_counter() < stop_at:
            body, content_type, good = requests.make(rng, k)
            path = "/search" if content_type == "application/json" else f"/search?k={k}"
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                status = response.status
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException):
                status = 0
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=60)
            mine.append((good, status, time.perf_counter() - started))
        connection.close()
        with lock:
            results.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    good = [(status, latency) for is_good, status, latency in results if is_good]
    bad = [status for is_good, status, _ in results if not is_good]
    return (
        [latency for status, latency in good if status == 200],
        sum(s == 200 for s, _ in good),
        len(good),
        sum(400 <= s < 500 for s in bad),
        len(bad),
        elapsed,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="codes in the flat index")
    parser.add_argument(
        "--hnsw-n", type=int, help="codes in the hnsw index, the first of the flat one's (0: no hnsw) [default: --n]"
    )
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--bad-share", type=float, default=0.3, help="share of malformed requests in the mixed phases")
    parser.add_argument("--threads", type=int, default=4, help="the server's --threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--milvus-uri", help="also Milvus flat and ivf collections on this server or cluster")
    parser.add_argument(
        "--milvus-server", action="store_true", help="also Milvus, on an embedded Milvus 2.3.5 server started here"
    )
    parser.add_argument("--replicas", type=int, default=2, help="dmuh serve processes per Milvus collection")
    args = parser.parse_args(argv)
    args.hnsw_n = args.n if args.hnsw_n is None else args.hnsw_n
    sys.path.insert(0, str(REPO / "src"))

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        if args.milvus_server:
            from dmuh.retrieval.index.milvus_server import EmbeddedMilvus

            server = stack.enter_context(EmbeddedMilvus(folder / "milvus-server"))
            args.milvus_uri = server.uri
        indexes, run = build(folder, args.n, args.hnsw_n, args.bits, args.seed, args.milvus_uri)
        images = query_jpegs(64, args.seed)
        print(
            f"{args.clients} clients, {args.seconds:g} s a phase, k = {args.k}, server --threads {args.threads}, "
            f"{os.cpu_count()} CPUs"
        )
        for name, (_, count, seconds, _) in indexes.items():
            print(f"{name} index: {count:,} random {args.bits}-bit codes, built in {seconds:.1f} s")
        if args.milvus_uri:
            print(
                f"Milvus at {args.milvus_uri}"
                + (" (embedded Milvus 2.3.5, this machine)" if args.milvus_server else "")
            )
        print()
        print(
            "| index | queries | malformed share | requests/s (good) | p50 ms | p99 ms | good answered 200 | "
            "malformed answered 4xx | server RSS MiB after | peak |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, (path, count, _, replicas) in indexes.items():
            replicas = replicas or args.replicas
            started = [start_server(path, run, args.threads) for _ in range(replicas)]
            process = started[0][0]
            label = f"{name} ({count:,})" + (f", {replicas} replicas" if replicas > 1 else "")
            try:
                for kind in ("codes", "image"):
                    for share in (0.0, args.bad_share) if name in ("flat", "hnsw") else (0.0,):
                        requests = Requests(kind, args.bits, images, share, args.seed)
                        latencies, ok, good, rejected, bad, elapsed = load(
                            [(host, port) for _, host, port in started],
                            requests,
                            args.clients,
                            args.seconds,
                            args.k,
                            args.seed,
                        )
                        rss, peak = memory_mb(process.pid)
                        p50 = 1000 * statistics.median(latencies) if latencies else float("nan")
                        p99 = 1000 * float(np.percentile(latencies, 99)) if latencies else float("nan")
                        print(
                            f"| {label} | {kind} | {share:.0%} | {ok / elapsed:,.1f} | {p50:.1f} | {p99:.1f} | "
                            f"{ok:,} / {good:,} | {rejected:,} / {bad:,} | "
                            f"{rss:.0f} | {peak:.0f} |"
                            if rss is not None
                            else "| - | - |",
                            flush=True,
                        )
            finally:
                for replica, _, _ in started:
                    replica.terminate()
                    replica.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
