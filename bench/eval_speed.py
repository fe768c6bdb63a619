"""Seconds per exact MAP@all evaluation (`dmuh.metrics.ranking.mean_average_precision`) on random codes.

    PYTHONPATH=src python bench/eval_speed.py                         # CPU, and the GPU if there is one
    PYTHONPATH=src python bench/eval_speed.py --device cpu --sizes 1000x59000,7000x1000000

Random 64-bit codes (+-1 int8, as `sign` gives them; on the GPU already CUDA tensors) and random
single labels of 10 classes. For each size, device and tie mode: one warm-up run on 100 queries,
then the median of --repeats runs (fewer when one run exceeds --budget seconds). The time covers
the whole call: input checks, packing, the pass over the database and the AP arithmetic.
CPU threads: torch.get_num_threads() (set OMP_NUM_THREADS / taskset to pin a core count).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dmuh.metrics.ranking import mean_average_precision

BITS = 64
CLASSES = 10


def random_problem(num_queries: int, num_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    query = rng.choice(np.array([-1, 1], dtype=np.int8), size=(num_queries, BITS))
    database = rng.choice(np.array([-1, 1], dtype=np.int8), size=(num_items, BITS))
    return query, database, rng.integers(0, CLASSES, num_queries), rng.integers(0, CLASSES, num_items)


def time_map(problem, device: str, ties: str, repeats: int, budget: float) -> float:
    query, database, query_labels, db_labels = problem
    if device != "cpu":
        query, database = torch.from_numpy(query).to(device), torch.from_numpy(database).to(device)
    mean_average_precision(query[:100], database, query_labels[:100], db_labels, ties=ties, device=device)  # warm-up
    seconds = []
    while len(seconds) < repeats and sum(seconds) < budget:
        start = time.perf_counter()
        mean_average_precision(query, database, query_labels, db_labels, ties=ties, device=device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default=None, help="comma-separated, e.g. cpu,cuda (default: cpu, plus cuda if available)"
    )
    parser.add_argument(
        "--sizes", default="1000x59000,1000x54000,7000x1000000", help="QUERIESxDATABASE, comma-separated"
    )
    parser.add_argument("--ties", default="expected,index", help="tie modes to time, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0, help="stop repeating a case after this many seconds")
    args = parser.parse_args()
    devices = args.device.split(",") if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {cpu}, {gpu}; {BITS} bits, {CLASSES} classes", flush=True)

    rows = []
    for size in args.sizes.split(","):
        num_queries, num_items = (int(x) for x in size.lower().split("x"))
        problem = random_problem(num_queries, num_items)
        for device in devices:
            for ties in args.ties.split(","):
                seconds = time_map(problem, device, ties, args.repeats, args.budget)
                rows.append((f"{num_queries:,} x {num_items:,}", cpu if device == "cpu" else gpu, ties, seconds))
                print(f"{rows[-1][0]} {device} ties={ties}: {seconds:.3f} s", flush=True)

    print("\n| queries x database | device | ties | seconds |")
    print("|---|---|---|---|")
    for size, device, ties, seconds in rows:
        print(f"| {size} | {device} | {ties} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
