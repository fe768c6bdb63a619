"""Training throughput of the one training loop on CIFAR-10 (images per second).

    PYTHONPATH=src python bench/train_speed.py --data .data/cifar10-jpeg.zip --device cuda

Each case trains a few epochs of the cifar10 protocol (5,000 training images) through
`dmuh.engine.trainer.train` exactly as `dmuh train` does (data decoded once onto the device, augmentation
there, bf16 autocast, channels_last) and reports the median images/s of the epochs after the first
(which includes warm-up and, with --compile, compilation). Evaluation is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from dmuh.engine.trainer import train
from dmuh.runs.config import TrainConfig
from dmuh.runs.layout import read_log

CASES = {
    "alexnet-224": dict(model="alexnet", augment="flip-crop"),
    "cnnf-224": dict(model="cnnf", augment="flip-crop"),
    "resnet18-32": dict(model="resnet18-32", augment="flip-crop"),
    "smallcnn": dict(model="smallcnn", augment="flip-crop"),  # a CPU smoke test of the script
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--protocol", default="cifar10", help="split protocol (digits: a CPU smoke test)")
    parser.add_argument("--cases", default="alexnet-224,resnet18-32")
    parser.add_argument("--methods", default="regu,dmuh")
    parser.add_argument("--batch-sizes", default="128")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cache-dir", default=None, help="decoded-image cache (saves re-decoding the zip)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            for method in args.methods.split(","):
                for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
                    out = Path(tmp) / f"{case}-{method}-{batch_size}"
                    config = TrainConfig(
                        data=args.data,
                        protocol=args.protocol,
                        method=method,
                        bits=32,
                        epochs=args.epochs,
                        batch_size=batch_size,
                        device=args.device,
                        eval_every=-1,
                        out=str(out),
                        compile=args.compile,
                        cache_dir=args.cache_dir,
                        trace_items=0,
                        checkpoint_every=args.epochs,
                        **CASES[case],
                    )
                    train(config, progress=False, echo=lambda line: None)
                    speeds = [row["images_per_s"] for row in read_log(out / "log.csv")[1:]]
                    rows.append((case, method, batch_size, statistics.median(speeds)))
                    print(f"{case} {method} batch {batch_size}: {rows[-1][3]:,.0f} images/s", flush=True)

    print("\n| model | method | batch | compile | train images/s |")
    print("|---|---|---|---|---|")
    for case, method, batch_size, speed in rows:
        print(f"| {case} | {method} | {batch_size} | {args.compile} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
