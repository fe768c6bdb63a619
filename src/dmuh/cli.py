"""The `dmuh` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from dmuh.errors import DmuhError

CONFIG_HELP = {
    "data": "data source: digits, a dir or .zip (ImageFolder), idx:DIR, cifar-batches:DIR, list:FILE.txt, features:FILE.npz",
    "protocol": "split protocol (cifar10, cifar10-54k, cifar10-50k, nuswide21, coco, imagenet100, clothing1m, per-class, digits)",
    "method": "hashing method (see `dmuh train --list-methods`)",
    "model": "backbone registered in dmuh.models (cnnf, alexnet, resnet18, resnet18-32, resnet50, smallcnn, mlp, ...)",
    "device": "cpu or cuda[:N]",
    "out": "run directory (config, split, log.csv, checkpoint.pt)",
}


def add_config_flags(parser: argparse.ArgumentParser, config_class, exclude=()) -> None:
    """One flag per config field (but `exclude`); only flags given on the command line override the YAML."""
    parser.add_argument("--config", help="YAML file of config fields (flags override it)")
    parser.set_defaults(config_class=config_class)
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        if field.name in ("method_params", "model_params", *exclude):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = type(default).__name__ if default is not None else "str"
        helptext = CONFIG_HELP.get(field.name, "") + f" [default: {default}]"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=field.name, default=argparse.SUPPRESS, type=_parse_bool, metavar="BOOL", help=helptext)
        else:
            parser.add_argument(flag, dest=field.name, default=argparse.SUPPRESS, type=_typed(field.name, kind), help=helptext)
    if any(f.name == "method_params" for f in dataclasses.fields(config_class)):
        parser.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                                help="method hyper-parameter, repeatable (e.g. -p alpha=0.7 -p beta=50; "
                                 "in compare METHOD.KEY=VALUE)")
    parser.add_argument("--model-param", action="append", default=[], metavar="KEY=VALUE",
                        help="model option, repeatable (e.g. --model-param input_size=8)")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _typed(name: str, kind: str):
    def convert(text: str):
        if text.lower() == "none":
            return None
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        return text

    convert.__name__ = kind
    return convert


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None):
    """base (a resumed run's config) < YAML (--config) < explicit flags < --param / --model-param."""
    from dmuh.config import load_yaml, parse_params

    config_class = args.config_class
    values: Dict[str, Any] = dict(base or {})
    if args.config:
        values.update(load_yaml(args.config))
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    values.update(explicit)
    for key, items, flag in (("method_params", getattr(args, "param", []), "--param"), ("model_params", args.model_param, "--model-param")):
        params = parse_params(items, flag)
        if params:
            values[key] = {**values.get(key, {}), **params}
    return config_class.from_dict(values, where=args.config or "config")


def cmd_train(args: argparse.Namespace) -> int:
    from dmuh.config import load_yaml
    from dmuh.methods import available
    from dmuh.train import CONFIG, train

    if args.list_methods:
        print("\n".join(available()))
        return 0
    if args.resume:
        if not hasattr(args, "out"):
            raise DmuhError("--resume needs --out RUN_DIR of the run to continue")
        saved = Path(args.out) / CONFIG
        config = config_from_args(args, base=load_yaml(saved))
    else:
        config = config_from_args(args)
    row = train(config, resume=args.resume, progress=not args.quiet)
    summary = {k: row[k] for k in ("epoch", "loss", "map", "images_per_s") if k in row}
    print(f"run {config.out}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dmuh.pretrain import pretrain

    config = config_from_args(args)
    row = pretrain(config, progress=not args.quiet)
    print(f"pre-trained backbone in {config.out}/backbone.safetensors (last epoch: loss {row['loss']:.4f}); "
          f"use it with: dmuh train --init {config.out} ...")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dmuh.compare import compare
    from dmuh.config import parse_params

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        bits = [int(b) for b in args.bits_list.split(",")]
    except ValueError:
        raise DmuhError(f"--bits {args.bits_list!r}: expected comma-separated integers such as 12,24,32,48") from None
    per_method: Dict[str, Dict[str, Any]] = {}
    for key, value in parse_params(args.param).items():
        if "." not in key:
            raise DmuhError(f"--param {key}={value}: in compare, name the method, e.g. -p csq.quantization=0.1")
        method, name = key.split(".", 1)
        per_method.setdefault(method, {})[name] = value
    args.param = []
    base = config_from_args(args)
    out = Path(base.out)
    compare(methods, bits, base, out, method_params=per_method, progress=not args.quiet, jobs=args.jobs,
            echo=print if not args.quiet else (lambda line: None))
    print((out / "results.md").read_text())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmuh.evaluate import evaluate_run

    report = evaluate_run(args.run, device=args.device, ties=args.ties, out=args.json)
    print(json.dumps(report, indent=2) if args.verbose else _short_report(report))
    return 0


def _short_report(report: Dict[str, Any]) -> str:
    """The headline numbers; the JSON file (and --verbose) has everything."""
    lines = [f"{key}: {report[key]}" for key in ("run", "method", "bits", "protocol") if key in report]
    for mode, values in report.get("map_by_ties", {}).items():
        line = f"MAP@all (ties {mode}): {values['map']:.4f}"
        if values.get("map_at_k") is not None:
            line += f"   MAP@{report['topk']}: {values['map_at_k']:.4f}"
        lines.append(line)
    if "precision_at_k" in report:
        pairs = list(zip(report["precision_ks"], report["precision_at_k"]))[:5]
        lines.append("precision@k: " + ", ".join(f"P@{k} {p:.4f}" for k, p in pairs))
    if "precision_radius2" in report:
        lines.append(f"precision within Hamming radius 2: {report['precision_radius2']:.4f}")
    return "\n".join(lines)


DEMO_METHODS = ("regu", "dmuh")


def cmd_demo(args: argparse.Namespace) -> int:
    from dmuh.config import TrainConfig
    from dmuh.train import train

    bits_list = [int(b) for b in args.bits.split(",")]
    out = Path(args.out)
    results: Dict[str, Dict[int, float]] = {}
    started = time.perf_counter()
    for method in DEMO_METHODS:
        for bits in bits_list:
            run = out / f"{method}-{bits}"
            if (run / "checkpoint.pt").exists() and not args.force:
                raise DmuhError(f"{run} already holds a run; pass --force to replace the demo runs")
            if (run / "checkpoint.pt").exists():
                import shutil

                shutil.rmtree(run)
            config = TrainConfig(
                data="digits", protocol="digits", model="smallcnn", model_params={"input_size": 8}, method=method, bits=bits,
                epochs=args.epochs, batch_size=64, lr=0.05, lr_end=0.0005, device="cpu", out=str(run),
                augment="none", seed=0,
            )
            print(f"training {method} at {bits} bits on digits ...", flush=True)
            row = train(config, progress=False, echo=lambda line: None)
            results.setdefault(method, {})[bits] = row["map"]
    seconds = time.perf_counter() - started
    header = "| method | " + " | ".join(f"{b} bits" for b in bits_list) + " |"
    print()
    print("MAP@all on scikit-learn digits (protocol digits: 300 query / 1,000 train / 1,497 database)")
    print(header)
    print("|" + "---|" * (len(bits_list) + 1))
    for method, by_bits in results.items():
        print(f"| {method} | " + " | ".join(f"{by_bits[b]:.4f}" for b in bits_list) + " |")
    print(f"total {seconds:.1f} s on the CPU")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmuh", description="Deep Momentum Uncertainty Hashing: train, evaluate, search binary codes")
    sub = parser.add_subparsers(dest="command", required=True)

    from dmuh.config import PretrainConfig, TrainConfig

    p = sub.add_parser("train", help="train a hashing method", description="Train any registered method with the one training loop.")
    add_config_flags(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list-methods", action="store_true", help="print the registered method names and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="warm up a backbone (cross-entropy and/or SimCLR) for `train --init`",
                       description="Pre-train a backbone on the training split (labels) and/or unlabeled database images "
                                   "(never the query split); objectives: ce, simclr, simclr+ce.")
    add_config_flags(p, PretrainConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("compare", help="train several methods at several code lengths; MAP tables (markdown, CSV)",
                       description="Train each method at each code length with the same data, backbone, recipe and "
                                   "budget; write --out/results.md and results.csv shaped like the paper's Tables 4-6.")
    add_config_flags(p, TrainConfig, exclude=("bits", "method"))
    p.add_argument("--methods", required=True, help="comma-separated method names, e.g. dmuh,regu,hashnet,csq")
    p.add_argument("--bits", dest="bits_list", default="12,24,32,48", help="comma-separated code lengths [12,24,32,48]")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process on --device (several small runs share "
                        "a GPU better than one) [1]")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="evaluate a trained run on its saved split")
    p.add_argument("run", help="run directory written by `dmuh train`")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--ties", default="expected", help="tie handling: expected (default), index, optimistic, pessimistic")
    p.add_argument("--json", help="where to write the report (default RUN/eval.json)")
    p.add_argument("--verbose", action="store_true", help="print the whole JSON report")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="train Regu and DMUH on digits on the CPU and print a MAP table")
    p.add_argument("--bits", default="16,32", help="comma-separated code lengths [16,32]")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run [30]")
    p.add_argument("--out", default="runs/demo", help="where the demo runs go [runs/demo]")
    p.add_argument("--force", action="store_true", help="replace earlier demo runs")
    p.set_defaults(func=cmd_demo)

    from dmuh.search_cli import add_commands

    add_commands(sub)  # encode, index build/info, search, export-onnx
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DmuhError as exc:
        print(f"dmuh {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
