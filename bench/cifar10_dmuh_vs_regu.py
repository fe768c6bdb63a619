"""Regu, DMUH and DMUH's three ablations on CIFAR-10 (cifar10 protocol), a MAP table by code length.

    PYTHONPATH=src python bench/cifar10_dmuh_vs_regu.py --data .data/cifar10-jpeg.zip --device cuda \
        --pretrain-epochs 30 --epochs 60 --bits 12,24,32,48

With --pretrain-epochs > 0 it first runs `dmuh pretrain` (objective --objective) once on the
protocol's split and starts every method from it (`--init`), the same backbone for all; with 0
every method starts from scratch. Every run uses the same model, schedule, seed and split. Runs
already finished in --out are reused, so the table can be built in several calls.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dmuh.config import PretrainConfig, TrainConfig
from dmuh.pretrain import BACKBONE, pretrain
from dmuh.train import LOG, read_log, train

METHODS = "regu,dmuh,dmuh-wo-u,dmuh-wo-eu,dmuh-wo-euij"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--bits", default="12,24,32,48")
    parser.add_argument("--model", default="resnet18-32")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0)
    parser.add_argument("--pretrain-epochs", type=int, default=0)
    parser.add_argument("--objective", default="simclr+ce")
    parser.add_argument("--param", action="append", default=[], help="method parameter KEY=VALUE for every run")
    parser.add_argument("--out", default="runs/cifar10-table")
    parser.add_argument("--cache-dir", default=".data/cache")
    args = parser.parse_args()

    from dmuh.config import parse_params

    out = Path(args.out)
    init = "scratch"
    if args.pretrain_epochs > 0:
        pre_dir = out / f"pretrain-{args.objective}-{args.pretrain_epochs}"
        if not (pre_dir / BACKBONE).exists() or len(read_log(pre_dir / LOG)) < args.pretrain_epochs:
            started = time.perf_counter()
            pretrain(PretrainConfig(data=args.data, protocol="cifar10", model=args.model, objective=args.objective,
                                    epochs=args.pretrain_epochs, device=args.device, cache_dir=args.cache_dir,
                                    out=str(pre_dir)), progress=False)
            print(f"pretrain {args.objective}: {time.perf_counter() - started:.0f} s", flush=True)
        init = str(pre_dir)

    results = {}
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            run = out / f"{method}-{bits}"
            log = read_log(run / LOG)
            if not (log and int(log[-1]["epoch"]) == args.epochs and "map" in log[-1]):
                started = time.perf_counter()
                config = TrainConfig(
                    data=args.data, protocol="cifar10", model=args.model, method=method, bits=bits,
                    method_params=parse_params(args.param), epochs=args.epochs, lr=args.lr,
                    backbone_lr_scale=args.backbone_lr_scale, augment="flip-crop", device=args.device,
                    init=init, cache_dir=args.cache_dir, out=str(run),
                )
                train(config, resume=(run / "checkpoint.pt").exists(), progress=False, echo=lambda line: None)
                log = read_log(run / LOG)
                print(f"{method} {bits} bits: MAP {log[-1]['map']:.4f}, {time.perf_counter() - started:.0f} s, "
                      f"{log[-1]['images_per_s']:,.0f} train img/s", flush=True)
            results[(method, bits)] = log[-1]["map"]

    bits_list = sorted({b for _, b in results})
    print(f"\nMAP@all, CIFAR-10 cifar10 protocol (1,000 query / 5,000 train / 59,000 database), {args.model}, "
          f"{args.epochs} epochs, init {init}")
    print("| method | " + " | ".join(f"{b} bits" for b in bits_list) + " |")
    print("|---|" + "---|" * len(bits_list))
    for method in args.methods.split(","):
        print(f"| {method} | " + " | ".join(f"{results[(method, b)]:.4f}" for b in bits_list) + " |")


if __name__ == "__main__":
    main()
