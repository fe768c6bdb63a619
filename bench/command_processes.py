"""`dmuh index build` and `dmuh search` as whole processes against a FAISS-only process doing the
same work, interleaved; and whether each dmuh process imported torch.

    PYTHONPATH=src python bench/command_processes.py                       # 1,000,000 codes (docs/results.md)
    PYTHONPATH=src python bench/command_processes.py --items 100000 --repeats 1

Data: --items random 64-bit codes with paths of about 40 characters as ids, and --queries random
query codes, written once as dmuh codes files. Each repeat runs, in turn: `dmuh index build --codes
db.npz --out db.idx --force`; a FAISS process that loads the same codes (np.load of the packed
array) and adds them to `faiss.IndexBinaryFlat` (the build's reference); `dmuh search --index db.idx
--queries q.npz --k 10 --json` (results to a file); a FAISS process that loads both code arrays, adds,
searches k = 10 at FAISS's default threads and writes the ids as JSON (the search's reference).
Wall seconds of each process (python start-up included), medians over repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dmuh.codes.file import Codes

FAISS_BUILD = """
import sys, numpy as np, faiss
codes = np.load(sys.argv[1] + "/db.npz", allow_pickle=False)["codes"]
index = faiss.IndexBinaryFlat(codes.shape[1] * 8); index.add(codes)
"""
FAISS_SEARCH = """
import sys, json, numpy as np, faiss
db = np.load(sys.argv[1] + "/db.npz", allow_pickle=False)["codes"]
q = np.load(sys.argv[1] + "/q.npz", allow_pickle=False)["codes"]
index = faiss.IndexBinaryFlat(db.shape[1] * 8); index.add(db)
distances, ids = index.search(q, 10)
open(sys.argv[1] + "/faiss.json", "w").write(json.dumps({"ids": ids.tolist(), "distances": distances.tolist()}))
"""
# Runs a dmuh command in this process and says whether torch was imported by it.
DMUH = "import sys; from dmuh.cli import main; code = main(sys.argv[1:]); print('torch', 'torch' in sys.modules); sys.exit(code)"


def timed(command, cwd) -> tuple:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}...: failed: {done.stderr.strip()[-300:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp(prefix="dmuh-processes-"))
    db = np.packbits(rng.integers(0, 2, (args.items, 64), dtype=np.uint8).astype(bool), axis=1)
    ids = [f"collection/images/class_{i % 100:03d}/img_{i:09d}.jpg" for i in range(args.items)]
    Codes(packed=db, bits=64, ids=ids).save(folder / "db.npz")
    q = np.packbits(rng.integers(0, 2, (args.queries, 64), dtype=np.uint8).astype(bool), axis=1)
    Codes(packed=q, bits=64, ids=[f"q/{i}.jpg" for i in range(args.queries)]).save(folder / "q.npz")
    py = sys.executable
    cases = {
        "dmuh index build": [py, "-c", DMUH, "index", "build", "--codes", "db.npz", "--out", "db.idx", "--force"],
        "FAISS load + add": [py, "-c", FAISS_BUILD, str(folder)],
        "dmuh search --json": [
            py,
            "-c",
            DMUH,
            "search",
            "--index",
            "db.idx",
            "--queries",
            "q.npz",
            "--k",
            "10",
            "--json",
            "--out",
            "r.json",
            "--force",
        ],  # fmt: skip
        "FAISS load + add + search + JSON": [py, "-c", FAISS_SEARCH, str(folder)],
    }
    times = {name: [] for name in cases}
    torch_loaded = {}
    for _ in range(args.repeats):
        for name, command in cases.items():
            seconds, out = timed(command, folder)
            times[name].append(seconds)
            if name.startswith("dmuh"):
                torch_loaded[name] = "torch True" in out
    load = os.getloadavg()
    print(f"{args.items:,} codes of 64 bits, {args.queries:,} queries, k = 10; {args.repeats} repeats, medians;")
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end; python {sys.version.split()[0]}")
    print()
    print("| process | wall s (median) | runs | imported torch |")
    print("|---|---:|---|---|")
    for name, values in times.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        loaded = {True: "yes", False: "no"}.get(torch_loaded.get(name), "-")
        print(f"| {name} | {statistics.median(values):.2f} | {runs} | {loaded} |")
    build = statistics.median(times["dmuh index build"]) / statistics.median(times["FAISS load + add"])
    search = statistics.median(times["dmuh search --json"]) / statistics.median(
        times["FAISS load + add + search + JSON"]
    )
    print()
    print(f"dmuh index build / FAISS: {build:.2f}x; dmuh search / FAISS: {search:.2f}x")


if __name__ == "__main__":
    main()
