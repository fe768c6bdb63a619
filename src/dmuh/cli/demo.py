"""`dmuh demo`: `dmuh compare` with a preset (Regu and DMUH on scikit-learn's digits, on the CPU)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from dmuh.cli.training import parse_bits
from dmuh.errors import DmuhError
from dmuh.metrics.ranking import DEFAULT_TIES
from dmuh.runs.config import TrainConfig

DEMO_METHODS = ("regu", "dmuh")


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="train Regu and DMUH on digits on the CPU and print a MAP table")
    p.add_argument("--bits", default="16,32", metavar="B1,B2,...", help="comma-separated code lengths [default: 16,32]")
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="epochs per run [default: 30]")
    p.add_argument(
        "--out",
        default="runs/demo",
        metavar="DIR",
        help="folder of the demo runs and their results.md / results.csv [default: runs/demo]",
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
        run_directory,
    )
    from dmuh.utils.io import refuse_overwrite, remove_orphans

    bits = parse_bits(args.bits)
    check_positive(args.epochs, "--epochs")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DmuhError(f"--out {out} is a file, not a folder; choose another --out")
    for name in (RESULTS_MARKDOWN, RESULTS_CSV):
        refuse_overwrite(out / name, args.force, "--out")
    remove_orphans(out)
    for method in DEMO_METHODS:
        for length in bits:
            run = run_directory(out, method, length)
            if (run / CHECKPOINT).exists() or (run / LEGACY_CHECKPOINT).exists():
                if not args.force:
                    raise DmuhError(f"{run} already holds a run; pass --force to replace the demo runs")
                shutil.rmtree(run)
    started = time.perf_counter()
    print(f"training {' and '.join(DEMO_METHODS)} at {', '.join(map(str, bits))} bits on digits ...", flush=True)
    rows = compare(DEMO_METHODS, bits, demo_config(args.epochs, out), out, echo=lambda line: None)
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
    print(f"total {seconds:.1f} s on the CPU")
    return 0
