"""Cross-modal methods on paired data: I->T and T->I MAP at 16, 32 and 64 bits, several seeds.

    # 1. the synthetic CIFAR-10 pairs: label-free image features + generated tags (bench/cifar_pairs.py)
    PYTHONPATH=src python bench/cifar_pairs.py --data cifar10-jpeg.zip --features feats.npz --out pairs.npz
    # 2. every method at every code length and seed (the same recipe for all; --lr METHOD=LR to differ)
    PYTHONPATH=src python bench/crossmodal_table.py train --data pairs.npz --out runs/cross --jobs 2
    # 3. the table (MAP@all of the protocol, ties "expected"), from each run's `dmuh evaluate`
    PYTHONPATH=src python bench/crossmodal_table.py report --out runs/cross

Each cell is the mean over seeds with the seeds' range. The seed is the run's --seed (weights,
batches) and --split-seed (which pairs are query and train), so the spread holds both.
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

METHODS = ("ugach", "dcmh", "regu-cross", "dmuh-cross")
BITS = (16, 32, 64)


def cmd_train(args) -> None:
    lrs = dict(item.split("=", 1) for item in args.lr)
    jobs = []
    for seed in args.seeds:
        for bits in args.bits:
            for method in args.methods:
                out = Path(args.out) / f"{method}-{bits}-s{seed}"
                if (out / "eval.json").exists():
                    continue
                jobs.append(
                    (
                        out,
                        [
                            "train",
                            "--method",
                            method,
                            "--data",
                            args.data,
                            "--protocol",
                            args.protocol,
                            "--model",
                            "mlp",
                            "--model-param",
                            "hidden=[]",
                            "-p",
                            "text_hidden=[1024]",
                            "--bits",
                            bits,
                            "--epochs",
                            args.epochs,
                            "--batch-size",
                            128,
                            "--optimizer",
                            "adamw",
                            "--lr",
                            lrs.get(method, args.default_lr),
                            "--lr-end",
                            "1e-6",
                            "--init",
                            "scratch",
                            "--seed",
                            seed,
                            "--split-seed",
                            seed,
                            "--out",
                            out,
                            "--quiet",
                            "--eval-every",
                            -1,
                        ],
                    )
                )
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def run(job):
        out, command = job
        started = time.perf_counter()
        if (out / "checkpoint.safetensors").exists():  # trained, not evaluated yet
            command = None
        if command is not None:
            subprocess.run([sys.executable, "-m", "dmuh", *map(str, command)], check=True, env=env)
            (out / "seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
        subprocess.run(
            [sys.executable, "-m", "dmuh", "evaluate", "--run", str(out)],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        print(f"done {out} in {time.perf_counter() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))


def cmd_report(args) -> None:
    from dmuh.methods import display_name

    rows = {}  # (method, bits) -> [per seed {"i2t": MAP, "t2i": MAP, "seconds": s}]
    for run in sorted(Path(args.out).glob("*-*-s*")):
        if not (run / "eval.json").exists():
            continue
        method, bits, _ = run.name.rsplit("-", 2)
        report = json.loads((run / "eval.json").read_text())
        seconds = run / "seconds.txt"
        rows.setdefault((method, int(bits)), []).append(
            {
                "i2t": report["directions"]["i2t"]["map"],
                "t2i": report["directions"]["t2i"]["map"],
                "seconds": float(seconds.read_text()) if seconds.exists() else float("nan"),
            }
        )
    methods = [m for m in METHODS if any(key[0] == m for key in rows)]
    methods += sorted({m for m, _ in rows} - set(methods))
    bits = sorted({b for _, b in rows})
    for direction, title in (("i2t", "I->T MAP@all"), ("t2i", "T->I MAP@all")):
        print(f"| {title} | " + " | ".join(f"{b} bits" for b in bits) + " |")
        print("|---|" + "---:|" * len(bits))
        for method in methods:
            print(
                f"| {display_name(method)} | "
                + " | ".join(cell([r[direction] for r in rows.get((method, b), [])]) for b in bits)
                + " |"
            )
        print()
    print(
        "training seconds (mean over seeds): "
        + ", ".join(
            f"{display_name(m)}-{b} {np.nanmean([r['seconds'] for r in rows[(m, b)]]):.0f}"
            for m in methods
            for b in bits
            if (m, b) in rows
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train")
    p.add_argument("--data", required=True, help="paired data (bench/cifar_pairs.py)")
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", default="cifar10")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--default-lr", default="1e-3")
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR")
    p.add_argument("--jobs", type=int, default=1)
    p = commands.add_parser("report")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"train": cmd_train, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
