"""Regu, DMUH and DMUH's three ablations on CIFAR-10 (cifar10 protocol), a MAP table by code length.

    PYTHONPATH=src python bench/cifar10_dmuh_vs_regu.py --data .data/cifar10-jpeg.zip --device cuda \
        --pretrain-epochs 40 --epochs 50 --bits 12,24,32,48 --jobs 5

With --pretrain-epochs > 0 it first runs `dmuh pretrain` (objective --objective) once on the
protocol's split and starts every method from it (`--init`), the same backbone for all; with 0
every method starts from scratch. The runs go through `dmuh.studies.compare.compare` (the engine of
`dmuh compare`): the same model, schedule, seed and split for all, and runs already finished in
--out are reused, so the table can be built in several calls.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dmuh.engine.pretrain import pretrain
from dmuh.runs.config import PretrainConfig, TrainConfig
from dmuh.runs.layout import BACKBONE, LOG, read_log
from dmuh.studies.compare import RESULTS_MARKDOWN, compare
from dmuh.utils.schema import parse_params

METHODS = "regu,dmuh,dmuh-wo-u,dmuh-wo-eu,dmuh-wo-euij"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--protocol", default="cifar10", help="split protocol (digits: a CPU smoke test)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--bits", default="12,24,32,48")
    parser.add_argument("--model", default="resnet18-32")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0)
    parser.add_argument("--pretrain-epochs", type=int, default=0)
    parser.add_argument("--objective", default="simclr+ce")
    parser.add_argument("--param", action="append", default=[], help="method parameter KEY=VALUE for every run")
    parser.add_argument("--out", default="runs/cifar10-table")
    parser.add_argument("--cache-dir", default=".data/cache")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (mean ± sd and paired intervals)")
    parser.add_argument("--against", default=None, help="with --seeds: the row every other is paired against")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once on the device (dmuh compare --jobs)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="epochs between checkpoints (a ResNet-18 run's is ~135 MB) [10]",
    )
    args = parser.parse_args()

    out = Path(args.out)
    init = "scratch"
    if args.pretrain_epochs > 0:
        pre_dir = out / f"pretrain-{args.objective}-{args.pretrain_epochs}"
        if not (pre_dir / BACKBONE).exists() or len(read_log(pre_dir / LOG)) < args.pretrain_epochs:
            started = time.perf_counter()
            pretrain(
                PretrainConfig(
                    data=args.data,
                    protocol=args.protocol,
                    model=args.model,
                    objective=args.objective,
                    epochs=args.pretrain_epochs,
                    device=args.device,
                    cache_dir=args.cache_dir,
                    out=str(pre_dir),
                ),
                progress=False,
            )
            print(f"pretrain {args.objective}: {time.perf_counter() - started:.0f} s", flush=True)
        init = str(pre_dir)

    base = TrainConfig(
        data=args.data,
        protocol=args.protocol,
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        backbone_lr_scale=args.backbone_lr_scale,
        augment="flip-crop",
        device=args.device,
        init=init,
        cache_dir=args.cache_dir,
        checkpoint_every=args.checkpoint_every,
        out=str(out),
    )
    methods = args.methods.split(",")
    shared_params = parse_params(args.param)
    rows = compare(
        methods,
        [int(b) for b in args.bits.split(",")],
        base,
        out,
        method_params={m: shared_params for m in methods},
        echo=lambda line: None,
        jobs=args.jobs,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
        against=args.against,
    )
    for row in rows:
        print(
            f"{row['method']} {row['bits']} bits seed {row.get('seed', '-')}: MAP {row['map']:.4f}, "
            f"{row['seconds']:.0f} s",
            flush=True,
        )
    print(
        f"\nCIFAR-10, cifar10 protocol (1,000 query / 5,000 train / 59,000 database), {args.model}, "
        f"{args.epochs} epochs, init {init}"
    )
    print((out / RESULTS_MARKDOWN).read_text())


if __name__ == "__main__":
    main()
