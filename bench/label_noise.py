"""What DMUH's uncertainty is good for, measured (issue #18): finding flipped training labels, and
telling a query's confidence, on a CPU proxy of the cifar10 protocol.

    # 1. a label-free representation (no label is read, so no label noise can leak into it):
    #    SimCLR of smallcnn on the protocol's non-query images, then the 512-d features of all 60,000
    dmuh pretrain --data cifar10-jpeg.zip --protocol cifar10 --model smallcnn --model-param width=32 \\
        --model-param 'fc=[512]' --objective simclr --epochs 3 --warmup-epochs 1 --lr 0.3 --weight-decay 1e-4 \\
        --unlabeled-batch-size 256 --out pre
    PYTHONPATH=src python bench/unsup_table.py features --protocol cifar10 --init pre --data cifar10-jpeg.zip --out feats.npz
    # 2. Regu and DMUH with 0, 10 and 20% of the training labels flipped, seeds 0-2, each run inspected
    PYTHONPATH=src python bench/label_noise.py train --features feats.npz --out runs/noise --jobs 2
    # 3. the tables (and the cleanlab baseline, when cleanlab is installed: pip install 'dmuh[bench]')
    PYTHONPATH=src python bench/label_noise.py report --features feats.npz --out runs/noise

Every hashing run: `--model mlp` with one hidden layer of 512 and dropout 0.5 on the features
(`features:feats.npz`, protocol cifar10: 1,000 query, 5,000 train, 59,000 database; split seed 0,
the split the SimCLR backbone never saw the query of), 32 bits, 20 epochs, the default recipe
otherwise (`--init auto`: a cross-entropy warm-up of 10 epochs on the run's own, noisy, labels,
then the hidden layer at 0.1x the learning rate).
A seed S is the run's `--seed` and `--label-noise-seed`, so Regu and DMUH of one seed see the same
flips. Each run is then read by `dmuh inspect` (train split: auto reading = training mode, 8
passes, and the eval reading), and the clean DMUH runs by `dmuh inspect --split query`; the
per-query AP (MAP@all, ties expected) is written beside them.

Scores of "is this label flipped?", higher = more suspicious: DMUH's image-level uncertainty (two
readings), the per-item pairwise loss (the small-loss criterion: dmuh.studies.inspect), their
rank average, and cleanlab's `find_label_issues` / label-quality score on out-of-sample predicted
probabilities of a scikit-learn logistic regression (5-fold `cross_val_predict`) on the same
features and the same noisy labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dmuh.metrics.stats import paired_interval, seeds_cell

METHODS = ("regu", "dmuh")
RATES = (0.0, 0.1, 0.2)
SEEDS = (0, 1, 2)
NAMES = {"regu": "Regu", "dmuh": "DMUH"}


def run_name(method: str, rate: float, seed: int) -> str:
    return f"{method}-noise{round(rate * 100):02d}-s{seed}"


def dmuh(*args) -> None:
    from dmuh.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"dmuh {' '.join(map(str, args))}: exit status {code}")


# -- one run: train, inspect, per-query AP (in one process: torch is imported once) ---------------


def query_ap(run: Path) -> dict:
    """Per-query AP@all (ties expected) of the run's query split against its database."""
    from dmuh.codes.binary import sign
    from dmuh.engine.builder import encode_part, load_run
    from dmuh.metrics.ranking import HammingRanking

    exp = load_run(run)
    labels = np.asarray(exp.source.labels)
    ranking = HammingRanking(
        sign(encode_part(exp, "query")),
        sign(encode_part(exp, "database")),
        labels[exp.split.query],
        labels[exp.split.database],
    )
    ap, _ = ranking.average_precision(None, "expected")
    return {"positions": list(range(len(ap))), "ap": [float(a) for a in ap], "map": float(np.mean(ap))}


def cmd_one(args) -> None:
    from dmuh.runs.layout import CHECKPOINT, LOG, read_log

    out = Path(args.out)
    started = time.perf_counter()
    log = read_log(out / LOG) if (out / LOG).exists() else []
    if not (log and int(log[-1]["epoch"]) == args.epochs and (out / CHECKPOINT).exists()):
        resume = ["--resume"] if (out / CHECKPOINT).exists() else []
        dmuh(
            "train",
            "--data",
            f"features:{Path(args.features).resolve()}",
            "--protocol",
            "cifar10",
            "--model",
            "mlp",
            "--model-param",
            f"hidden=[{args.hidden}]",
            "--model-param",
            "dropout=0.5",
            "--method",
            args.method,
            "--bits",
            args.bits,
            "--epochs",
            args.epochs,
            "--label-noise",
            args.rate,
            "--label-noise-seed",
            args.seed,
            "--seed",
            args.seed,
            "--trace-items",
            0,
            "--train-map-items",
            0,
            "--out",
            out,
            "--quiet",
            *resume,
        )
        (out / "seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    inspections = [("inspect", [])]
    if args.method == "dmuh":
        inspections.append(("inspect-eval", ["--reading", "eval"]))
        if args.rate == 0:
            inspections += [("query", ["--split", "query"]), ("query-eval", ["--split", "query", "--reading", "eval"])]
    for name, flags in inspections:
        if not (out / name / "summary.json").exists():
            dmuh("inspect", out, "--out", out / name, "--quiet", "--force", *flags)
    if not (out / "query_ap.json").exists():
        (out / "query_ap.json").write_text(json.dumps(query_ap(out)))
    print(f"done {out} in {time.perf_counter() - started:.0f} s", flush=True)


def cmd_train(args) -> None:
    jobs = [(m, r, s) for s in args.seeds for r in args.rates for m in args.methods]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def run(job):
        method, rate, seed = job
        out = Path(args.out) / run_name(method, rate, seed)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "one",
                "--features",
                args.features,
                "--method",
                method,
                "--rate",
                str(rate),
                "--seed",
                str(seed),
                "--epochs",
                str(args.epochs),
                "--bits",
                str(args.bits),
                "--hidden",
                str(args.hidden),
                "--out",
                str(out),
            ],
            check=True,
            env=env,
        )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))


# -- the report ----------------------------------------------------------------------------------


def read_items(path: Path) -> dict:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    order = np.argsort([int(r["position"]) for r in rows])
    rows = [rows[i] for i in order]  # by position in the split
    columns = {key: np.array([float(r[key]) for r in rows]) for key in ("uncertainty", "loss") if key in rows[0]}
    if "flipped" in rows[0]:
        columns["flipped"] = np.array([r["flipped"] == "1" for r in rows])
    return columns


def cleanlab_scores(features: np.ndarray, run: Path, seed: int, cache: Path) -> dict:
    """cleanlab on out-of-sample probabilities of a logistic regression on the run's training
    features with its noisy labels: detection scores of its label-quality score and its
    find_label_issues set. {"error": ...} when cleanlab (or scikit-learn) is not importable."""
    if cache.exists():
        return json.loads(cache.read_text())
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError as error:
        return {"error": f"cleanlab not installed ({error})"}
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dmuh.data.noise import LabelNoise
    from dmuh.data.protocols import Split
    from dmuh.studies.inspect import detection_scores

    split = Split.load(run / "split.json")
    noise = LabelNoise.load(run / "label_noise.json")
    data = np.load(features)
    clean = np.asarray(data["labels"])[split.train]
    clean = clean if clean.ndim == 1 else clean.argmax(1)
    labels = clean.copy()
    labels[noise.positions] = noise.noisy
    started = time.perf_counter()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probabilities = cross_val_predict(
        model, np.asarray(data["features"])[split.train], labels, cv=5, method="predict_proba"
    )
    issues = find_label_issues(labels, probabilities, n_jobs=1)
    flipped = noise.mask(len(labels))
    result = {
        "quality": detection_scores(1.0 - get_label_quality_scores(labels, probabilities), flipped),
        "issues": int(issues.sum()),
        "issues_precision": float(flipped[issues].mean()) if issues.any() else math.nan,
        "issues_recall": float(issues[flipped].mean()),
        "seconds": time.perf_counter() - started,
        "seed": seed,
    }
    cache.write_text(json.dumps(result))
    return result


def _interval(values) -> str:
    interval = paired_interval(values)
    if interval.n < 2:
        return f"{interval.mean:+.4f}"
    return f"{interval.mean:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"


def cmd_report(args) -> None:
    from dmuh.studies.inspect import detection_scores, rank_average, spearman

    out = Path(args.out)
    lines = []
    summary = lambda run, name: json.loads((out / run / name / "summary.json").read_text())  # noqa: E731

    # MAP under noise
    maps = {(m, r): {} for m in args.methods for r in args.rates}
    seconds = {m: [] for m in args.methods}
    for m in args.methods:
        for r in args.rates:
            for s in args.seeds:
                run = out / run_name(m, r, s)
                if (run / "query_ap.json").exists():
                    maps[m, r][s] = json.loads((run / "query_ap.json").read_text())["map"]
                    if (run / "seconds.txt").exists():
                        seconds[m].append(float((run / "seconds.txt").read_text()))
    lines += [
        "## MAP@all (ties expected) trained on noisy labels",
        "",
        "| method | " + " | ".join(f"{round(r * 100)}% flipped" for r in args.rates) + " |",
        "|---|" + "---:|" * len(args.rates),
    ]
    for m in args.methods:
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(seeds_cell(maps[m, r].values()) for r in args.rates) + " |")
    if set(args.methods) >= {"regu", "dmuh"}:
        cells = []
        for r in args.rates:
            seeds = sorted(set(maps["dmuh", r]) & set(maps["regu", r]))
            cells.append(_interval([maps["dmuh", r][s] - maps["regu", r][s] for s in seeds]))
        lines.append("| DMUH - Regu, paired (mean [95% t interval]) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "seconds per run (train + inspect + per-query AP), mean: "
        + ", ".join(f"{NAMES.get(m, m)} {np.mean(v):.0f}" for m, v in seconds.items() if v),
        "",
    ]

    # Finding the flipped labels
    for r in [r for r in args.rates if r > 0]:
        scores = {}

        def add(name, seed, value):
            scores.setdefault(name, {})[seed] = value  # noqa: B023 - called within this iteration

        cleanlab_note = None
        for s in args.seeds:
            d = out / run_name("dmuh", r, s)
            if (d / "inspect" / "items.csv").exists():
                training, evaluated = (
                    read_items(d / "inspect" / "items.csv"),
                    read_items(d / "inspect-eval" / "items.csv"),
                )
                flipped = training["flipped"]
                reading = summary(run_name("dmuh", r, s), "inspect")
                add(
                    f"DMUH uncertainty, training reading ({reading['passes']} passes)",
                    s,
                    detection_scores(training["uncertainty"], flipped),
                )
                add(
                    "DMUH uncertainty, eval reading (`dmuh encode --uncertainty`)",
                    s,
                    detection_scores(evaluated["uncertainty"], flipped),
                )
                add("DMUH pairwise loss (small-loss criterion)", s, detection_scores(training["loss"], flipped))
                add(
                    "rank average: DMUH training-reading uncertainty + loss",
                    s,
                    detection_scores(rank_average(training["uncertainty"], training["loss"]), flipped),
                )
                add(
                    "rank average: DMUH eval-reading uncertainty + loss",
                    s,
                    detection_scores(rank_average(evaluated["uncertainty"], training["loss"]), flipped),
                )
            g = out / run_name("regu", r, s)
            if (g / "inspect" / "items.csv").exists():
                regu = read_items(g / "inspect" / "items.csv")
                add("Regu pairwise loss (small-loss criterion)", s, detection_scores(regu["loss"], regu["flipped"]))
            if (d / "label_noise.json").exists():
                result = cleanlab_scores(
                    Path(args.features), d, s, out / f"cleanlab-noise{round(r * 100):02d}-s{s}.json"
                )
                if "error" in result:
                    cleanlab_note = result["error"]
                else:
                    add(
                        "cleanlab label-quality score (logistic regression, 5-fold out-of-sample)", s, result["quality"]
                    )
                    add("_issues", s, result)
        issues = scores.pop("_issues", {})
        lines += [
            f"## Finding the {round(r * 100)}% flipped training labels (5,000 training items)",
            "",
            "| score | AUROC | precision in the top 10% (500) |",
            "|---|---:|---:|",
        ]
        for name, by_seed in scores.items():
            lines.append(
                f"| {name} | {seeds_cell(v['auroc'] for v in by_seed.values())} | "
                f"{seeds_cell(v['top_precision'] for v in by_seed.values())} |"
            )
        base = next(iter(next(iter(scores.values())).values()))["base_rate"] if scores else math.nan
        lines += ["", f"Base rate (a random ranking's precision): {base:.4f}."]
        if cleanlab_note:
            lines.append(f"cleanlab: {cleanlab_note}.")
        elif issues:
            lines.append(
                "cleanlab `find_label_issues` (default filter): flags "
                + seeds_cell([v["issues"] for v in issues.values()], 0)
                + " items, precision "
                + seeds_cell([v["issues_precision"] for v in issues.values()])
                + ", recall "
                + seeds_cell([v["issues_recall"] for v in issues.values()])
                + "; fit + predict "
                + f"{np.mean([v['seconds'] for v in issues.values()]):.0f} s a seed."
            )
        loss = scores.get("DMUH pairwise loss (small-loss criterion)", {})
        for name in [n for n in scores if n.startswith(("DMUH uncertainty", "rank average", "Regu", "cleanlab"))]:
            seeds = sorted(set(scores[name]) & set(loss))
            diffs = [scores[name][s]["auroc"] - loss[s]["auroc"] for s in seeds]
            lines.append(f"AUROC of {name} - DMUH pairwise loss, paired: {_interval(diffs)}.")
        lines.append("")

    # Query confidence
    rows = []
    for name in ("query", "query-eval"):
        per_seed = []
        for s in args.seeds:
            run = out / run_name("dmuh", 0.0, s)
            if not (run / name / "items.csv").exists():
                continue
            u = read_items(run / name / "items.csv")["uncertainty"]
            ap = np.array(json.loads((run / "query_ap.json").read_text())["ap"])
            tenth = max(1, len(u) // 10)
            order = np.argsort(u, kind="stable")
            per_seed.append(
                {
                    "seed": s,
                    **spearman(u, ap),
                    "sure": float(ap[order[:tenth]].mean()),
                    "unsure": float(ap[order[-tenth:]].mean()),
                    "map": float(ap.mean()),
                }
            )
        if per_seed:
            reading = summary(run_name("dmuh", 0.0, per_seed[0]["seed"]), name)
            rows.append(
                (
                    f"{reading['reading']} reading"
                    + (f" ({reading['passes']} passes)" if reading["reading"] == "training" else ""),
                    per_seed,
                )
            )
    if rows:
        lines += [
            "## Query confidence: does a query's uncertainty predict its AP? (DMUH, clean labels, 1,000 queries)",
            "",
            "| uncertainty | Spearman rho per seed (p) | mean rho [95% t interval] | AP of the 10% most certain | "
            "AP of the 10% least certain | MAP |",
            "|---|---|---|---:|---:|---:|",
        ]
        for label, per_seed in rows:
            lines.append(
                f"| {label} | " + "; ".join(f"{v['rho']:+.3f} (p {v['p']:.2g})" for v in per_seed) + " | "
                f"{_interval([v['rho'] for v in per_seed])} | {seeds_cell(v['sure'] for v in per_seed)} | "
                f"{seeds_cell(v['unsure'] for v in per_seed)} | {seeds_cell(v['map'] for v in per_seed)} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("train", cmd_train), ("report", cmd_report)):
        p = commands.add_parser(name)
        p.add_argument("--features", required=True, help="features .npz of `bench/unsup_table.py features`")
        p.add_argument("--out", required=True)
        p.add_argument("--methods", nargs="+", default=list(METHODS))
        p.add_argument("--rates", nargs="+", type=float, default=list(RATES))
        p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
        p.set_defaults(func=func)
    train = commands.choices["train"]
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--bits", type=int, default=32)
    train.add_argument("--hidden", type=int, default=512)
    train.add_argument("--jobs", type=int, default=2)
    one = commands.add_parser("one", help="one run (what `train` runs in each job)")
    one.add_argument("--features", required=True)
    one.add_argument("--method", required=True)
    one.add_argument("--rate", type=float, required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--epochs", type=int, default=20)
    one.add_argument("--bits", type=int, default=32)
    one.add_argument("--hidden", type=int, default=512)
    one.add_argument("--out", required=True)
    one.set_defaults(func=cmd_one)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
