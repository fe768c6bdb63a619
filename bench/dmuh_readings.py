"""Which reading of the paper makes DMUH's uncertainty look like Fig. 1? One run per reading.

    PYTHONPATH=src python bench/dmuh_readings.py --data ../shared/data/cifar10-jpeg.zip --protocol cifar10 \
        --init runs/pre --out runs/readings --epochs 15 --bits 32 --jobs 2 --cache-dir .cache

Each reading is `dmuh` with the options of docs/method.md ("The open readings") changed one at a
time from today's (`momentum_dropout=off`, `momentum_update=step`, `output=tanh`,
`normalisation=nB`, `retrieval=hashing`), plus Regu under both normalisations. For each run it
prints the final mean bit-level uncertainty (training log), the image-level uncertainty of 1,000
training items as the loss sees it (min / median / max, `dmuh.engine.builder.training_uncertainty`,
averaged over --passes where the reading draws dropout masks), train MAP and test MAP (ties
`dmuh.metrics.ranking.DEFAULT_TIES`). One seed: a screening, not a comparison (`dmuh compare --seeds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dmuh.metrics.ranking import DEFAULT_TIES
from dmuh.runs.config import TrainConfig
from dmuh.utils.schema import parse_params

TODAY = {
    "momentum_dropout": "off",
    "momentum_update": "step",
    "output": "tanh",
    "normalisation": "nB",
    "retrieval": "hashing",
}
READINGS = {
    "dmuh today": ("dmuh", {}),
    "dmuh own dropout": ("dmuh", {"momentum_dropout": "own"}),
    "dmuh shared dropout": ("dmuh", {"momentum_dropout": "shared"}),
    "dmuh Eq.5 per epoch": ("dmuh", {"momentum_update": "epoch"}),
    "dmuh linear output": ("dmuh", {"output": "linear"}),
    "dmuh per-batch terms": ("dmuh", {"normalisation": "batch"}),
    "dmuh momentum codes": ("dmuh", {"retrieval": "momentum"}),
    "dmuh momentum codes alpha 0.99": ("dmuh", {"retrieval": "momentum", "alpha": 0.99}),
    "regu": ("regu", {}),
    "regu per-batch terms": ("regu", {"normalisation": "batch"}),
}


def run_one(name: str, config: dict, passes: int, threads: int) -> dict:
    import torch

    from dmuh.engine.builder import load_run, training_uncertainty
    from dmuh.engine.trainer import train
    from dmuh.runs.layout import CHECKPOINT, LOG, read_log

    torch.set_num_threads(threads)
    config = TrainConfig.from_dict(config)
    if not (Path(config.out) / CHECKPOINT).exists():
        train(config, progress=False, echo=lambda line: None)
    last = read_log(Path(config.out) / LOG)[-1]
    row = {
        "reading": name,
        "map": last.get("map"),
        "train_map": last.get("train_map"),
        "bit_u": last.get("bit_uncertainty", float("nan")),
        "run": config.out,
    }
    if config.method.startswith("dmuh"):
        exp = load_run(config.out, config.device)
        positions = np.linspace(0, len(exp.split.train) - 1, 1000).round().astype(np.int64)
        image_u = training_uncertainty(exp, positions, passes).mean(dim=1).numpy()
        row.update(u_min=float(image_u.min()), u_median=float(np.median(image_u)), u_max=float(image_u.max()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--protocol", default="cifar10")
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--model-param", action="append", default=["width=32", "fc=[512,512]", "dropout=0.5"])
    parser.add_argument("--init", default="scratch")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", default="flip-crop")
    parser.add_argument("--readings", default=",".join(READINGS), help="comma-separated names from the list above")
    parser.add_argument("--passes", type=int, default=4, help="passes averaged for the image-level uncertainty")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    base = TrainConfig(
        data=args.data,
        protocol=args.protocol,
        model=args.model,
        model_params=parse_params(args.model_param, "--model-param"),
        init=args.init,
        bits=args.bits,
        epochs=args.epochs,
        seed=args.seed,
        augment=args.augment,
        device=args.device,
        cache_dir=args.cache_dir,
        checkpoint_every=args.epochs,
    )
    names = [n.strip() for n in args.readings.split(",") if n.strip()]
    unknown = [n for n in names if n not in READINGS]
    if unknown:
        raise SystemExit(f"--readings: unknown {unknown[0]!r}; choose from {', '.join(READINGS)}")
    jobs = []
    for name in names:
        method, params = READINGS[name]
        out = Path(args.out) / name.replace(" ", "-").replace(".", "")
        config = dataclasses.replace(base, method=method, method_params=dict(params), out=str(out))
        jobs.append((name, config.to_dict()))
    if args.cache_dir:  # decode once, so the workers read the cache
        from dmuh.data import open_source
        from dmuh.engine.runtime import decode_all

        decode_all(open_source(base.data), base)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(
            pool.map(
                run_one, [n for n, _ in jobs], [c for _, c in jobs], [args.passes] * len(jobs), [threads] * len(jobs)
            )
        )
    print(
        f"| reading | final mean bit u | image-level u min / median / max (1,000 train items) | train MAP | MAP (ties {DEFAULT_TIES}) |"
    )
    print("|---|---:|---|---:|---:|")
    for row in rows:
        spread = f"{row['u_min']:.3f} / {row['u_median']:.3f} / {row['u_max']:.3f}" if "u_min" in row else "-"
        bit_u = f"{row['bit_u']:.4f}" if row["bit_u"] == row["bit_u"] else "-"
        print(f"| {row['reading']} | {bit_u} | {spread} | {row['train_map']:.4f} | {row['map']:.4f} |")


if __name__ == "__main__":
    main()
