"""`dmuh demo`: `dmuh compare` with a preset (Regu and DMUH on scikit-learn's digits, on the CPU)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from dmuh.cli.training import parse_bits
from dmuh.errors import DmuhError
from dmuh.metrics.ties import DEFAULT_TIES
from dmuh.runs.config import TrainConfig

DEMO_METHODS = ("regu", "dmuh")


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="train Regu and DMUH on digits on the CPU and print a MAP table")
    p.add_argument("--bits", default="16,32", metavar="B1,B2,...", help="comma-separated code lengths [default: 16,32]")
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="epochs per run [default: 30]")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder of the demo runs and their results.md / results.csv [default: runs/demo, or the first free "
        "runs/demo-N when an earlier demo is there]",
    )
    p.add_argument("--force", action="store_true", help="replace earlier demo runs and results [default: off]")
    p.set_defaults(func=cmd_demo)


def demo_config(epochs: int, out: Path) -> TrainConfig:
    return TrainConfig(
        data="digits",
        protocol="digits",
        model="smallcnn",
        model_params={"input_size": 8},
        epochs=epochs,
        batch_size=64,
        lr=0.05,
        lr_end=0.0005,
        device="cpu",
        out=str(out),
        augment="none",
        seed=0,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from dmuh.cli.common import check_positive
    from dmuh.runs.layout import CHECKPOINT, LEGACY_CHECKPOINT
    from dmuh.studies.compare import (
        RESULTS_CSV,
        RESULTS_MARKDOWN,
        compare,
        comparison_run_dir,
    )
    from dmuh.utils.io import refuse_overwrite, remove_orphans

    bits = parse_bits(args.bits)
    check_positive(args.epochs, "--epochs")
    out = Path(args.out) if args.out is not None else fresh_demo_folder(Path(DEFAULT_OUT))
    if out.exists() and not out.is_dir():
        raise DmuhError(f"--out {out} is a file, not a folder; choose another --out")
    for name in (RESULTS_MARKDOWN, RESULTS_CSV):
        refuse_overwrite(out / name, args.force, "--out")
    remove_orphans(out)
    for method in DEMO_METHODS:
        for length in bits:
            run = comparison_run_dir(out, method, length)
            if (run / CHECKPOINT).exists() or (run / LEGACY_CHECKPOINT).exists():
                if not args.force:
                    raise DmuhError(f"{run} already holds a run; pass --force to replace the demo runs")
                shutil.rmtree(run)
    started = time.perf_counter()
    total = len(DEMO_METHODS) * len(bits)
    print(
        f"training {' and '.join(DEMO_METHODS)} at {', '.join(map(str, bits))} bits on scikit-learn's digits "
        f"({total} runs of {args.epochs} epochs, smallcnn on the CPU) into {out}",
        flush=True,
    )

    def progress_line(line: str) -> None:  # one line per run as it starts ("[1/4] regu at 16 bits");
        # the epoch lines stay in each run's log.csv
        for word in (": training in ", ": resuming in "):
            if word in line:
                print(f"  {line.split(word)[0]} ({time.perf_counter() - started:.0f} s so far)", flush=True)

    rows = compare(
        DEMO_METHODS, bits, demo_config(args.epochs, out), out, echo=progress_line, progress=sys.stderr.isatty()
    )
    seconds = time.perf_counter() - started
    print()
    print(
        f"MAP@all (ties {DEFAULT_TIES}) on scikit-learn digits (protocol digits: 300 query / 1,000 train / 1,497 database)"
    )
    print("| method | " + " | ".join(f"{b} bits" for b in bits) + " |")
    print("|" + "---|" * (len(bits) + 1))
    for method in DEMO_METHODS:
        cells = [f"{row['map']:.4f}" for row in rows if row["method"] == method]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"total {seconds:.1f} s on the CPU; the runs, results.md and results.csv are in {out}")
    return 0


DEFAULT_OUT = "runs/demo"


def fresh_demo_folder(base: Path) -> Path:
    """`base` when no earlier demo is there, else the first of base-2, base-3, ... that holds none, so a
    second `dmuh demo` answers again without replacing the first one's runs."""
    candidate, number = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    if candidate != base:
        print(f"an earlier demo is in {base}; this one goes to {candidate} (--out DIR chooses, --force replaces)")
    return candidate
