"""Fit time and peak memory of the shallow (non-deep) methods on synthetic vectors.

    PYTHONPATH=src python bench/shallow_fit.py                       # 100,000 x 512, 10 classes, 32 bits
    PYTHONPATH=src python bench/shallow_fit.py --n 5000 --dim 64 --methods sdh,lfh

Data: seeded Gaussian class means (scale `--spread`) plus unit Gaussian noise, `--n` training
vectors of `--dim` float32 dimensions in `--classes` balanced classes, and 1,000 held-out queries
from the same classes. Each method is fitted (`method.fit(features, labels)`, as the training loop
calls it) in its own subprocess, so the peak resident memory (the child's own ru_maxrss) is that
method's alone; "RSS before fit" is the child's peak after making the data and importing torch,
before the fit. Sanity values from the fitted hash function's codes: "class-code match", the
fraction of training items whose code equals their class's bit-wise majority code, and the MAP@all
(ties expected, `dmuh.metrics.ranking`) of the queries against the training codes. A method name that is
not registered is skipped with a note. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_METHODS = "sdh,lfh,cosdish,itq,lsh,fasth"
QUERIES = 1000


def make_data(n: int, dim: int, classes: int, spread: float, seed: int):
    """(features (n + QUERIES, dim) float32, class ids): seeded class means plus noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=generator) * spread
    ids = torch.randint(0, classes, (n + QUERIES,), generator=generator)
    features = means[ids] + torch.randn(n + QUERIES, dim, generator=generator)
    return features.float(), ids


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(args) -> None:
    """Fit one method and print one JSON line."""
    import torch

    from dmuh.methods import create_method
    from dmuh.metrics.ranking import mean_average_precision

    features, ids = make_data(args.n, args.dim, args.classes, args.spread, args.seed)
    labels = torch.nn.functional.one_hot(ids, args.classes).float()
    train_x, train_labels, query_x, query_labels = (
        features[: args.n],
        labels[: args.n],
        features[args.n :],
        labels[args.n :],
    )
    method = create_method(args.child, bits=args.bits, train_labels=train_labels)
    before = rss_mb()
    started = time.perf_counter()
    fitted = method.fit(train_x, train_labels)
    seconds = time.perf_counter() - started
    peak = rss_mb()

    def encode(x):
        with torch.no_grad():
            parts = []
            for start in range(0, x.shape[0], 8192):
                block = x[start : start + 8192]
                if isinstance(fitted, torch.nn.Module):
                    parts.append(fitted(block))
                else:
                    weight, bias = fitted
                    parts.append(block @ weight.t() + bias)
            return (torch.cat(parts) >= 0).numpy()

    train_codes, query_codes = encode(train_x), encode(query_x)
    train_ids = ids[: args.n].numpy()
    matched = 0
    for c in range(args.classes):
        rows = train_codes[train_ids == c]
        if len(rows):
            majority = rows.mean(0) >= 0.5
            matched += int((rows == majority).all(1).sum())
    score = mean_average_precision(query_codes, train_codes, query_labels.numpy(), train_labels.numpy())
    print(
        json.dumps(
            {
                "method": args.child,
                "seconds": seconds,
                "rss_before_mb": before,
                "peak_rss_mb": peak,
                "class_match": matched / args.n,
                "map": float(score),
                "bits": args.bits,
                "n": args.n,
                "dim": args.dim,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="training vectors [default: 100000]")
    parser.add_argument("--dim", type=int, default=512, help="dimensions [default: 512]")
    parser.add_argument("--classes", type=int, default=10, help="classes [default: 10]")
    parser.add_argument("--bits", type=int, default=32, help="code length [default: 32]")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.3,
        help="scale of the class means against unit noise [default: 0.3: classes overlap]",
    )
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated [default: {DEFAULT_METHODS}]")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method [default: 1800]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from dmuh.methods import available

    registered = set(available())
    rows, notes = [], []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name not in registered:
            notes.append(f"{name}: not registered, skipped")
            continue
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--n",
            str(args.n),
            "--dim",
            str(args.dim),
            "--classes",
            str(args.classes),
            "--bits",
            str(args.bits),
            "--spread",
            str(args.spread),
            "--seed",
            str(args.seed),
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            notes.append(f"{name}: over --timeout {args.timeout:g} s, stopped")
            continue
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            error = (result.stderr.strip().splitlines() or ["no output"])[-1]
            notes.append(f"{name}: failed ({error})")
            continue
        rows.append(json.loads(lines[-1]))
        print(f"# {name} done in {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)

    print(
        "| method | n | D | bits | fit s | RSS before fit (MB) | peak RSS (MB) | class-code match | MAP (1000 queries) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['n']} | {r['dim']} | {r['bits']} | {r['seconds']:.1f} | {r['rss_before_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['class_match']:.3f} | {r['map']:.3f} |"
        )
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
