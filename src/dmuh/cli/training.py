"""`dmuh train`, `dmuh pretrain` and `dmuh compare`: thin commands over dmuh.engine.trainer, dmuh.engine.pretrain
and dmuh.studies.compare."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List

from dmuh.cli.common import add_config_flags, config_from_args, flag_name
from dmuh.errors import DmuhError
from dmuh.runs.config import PretrainConfig, TrainConfig
from dmuh.runs.files import CONFIG
from dmuh.utils.schema import load_yaml, parse_params

BITS_DEFAULT = "12,24,32,48"


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train a hashing method", description="Train any registered method with the one training loop."
    )
    add_config_flags(p, TrainConfig)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (see README on --epochs) [default: off]",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar [default: off]")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="epoch lines with every loss term and step statistic (log.csv always has them) [default: off]",
    )
    p.add_argument(
        "--list-methods",
        nargs="?",
        const="names",
        default=None,
        choices=("names", "params"),
        help="print the registered method names and exit; `--list-methods params` adds each method's "
        "hyper-parameters with their defaults and allowed values [default: off]",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "pretrain",
        help="warm up a backbone (cross-entropy and/or SimCLR) for `train --init`",
        description="Pre-train a backbone on the training split (labels) and/or unlabeled database images "
        "(never the query split); objectives: ce, simclr, simclr+ce.",
    )
    add_config_flags(p, PretrainConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bar [default: off]")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "compare",
        help="train several methods at several code lengths; MAP tables (markdown, CSV)",
        description="Train each method at each code length with the same data, backbone, recipe and "
        "budget; write --out/results.md and results.csv shaped like the paper's Tables 4-6.",
    )
    add_config_flags(p, TrainConfig, exclude=("bits", "method"))
    p.add_argument(
        "--methods",
        default="",
        help="comma-separated method names, e.g. dmuh,regu,hashnet,csq; paper: the eleven of the "
        "paper's Tables 4-5 in its row order; anchors: every supervised deep method (dmuh train "
        "--list-methods) (required unless --grid names them) [default: none]",
    )
    p.add_argument(
        "--paper-figures",
        default="auto",
        help="print the DMUH paper's MAP beside each measured one: auto (from --protocol: cifar10*, "
        "clothing1m, nuswide21, coco), none, or one of cifar10, clothing1m, nuswide, coco "
        "[default: auto]",
    )
    p.add_argument(
        "--bits", dest="bits_list", default=BITS_DEFAULT, help=f"comma-separated code lengths [default: {BITS_DEFAULT}]"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process on --device (several small runs share "
        "a GPU better than one) [default: 1]",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2: each cell trained once per seed (run directories "
        "METHOD-Nbits-seedS), MAP cells mean ± sd (n) [default: one run at --seed]",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD.PARAM=V1,V2,...",
        help="one row per value, e.g. dmuh.alpha=0.5,0.7,0.9 (repeatable; two on one method give "
        "the cross product; a method not in --methods is added) [default: none]",
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="NAME",
        help="a row (label or method, e.g. regu): add the paired difference of every other row "
        "against it, mean over seeds with a 95%% t interval [default: none]",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the tables (results.md, results.csv) of an earlier compare in --out; its finished "
        "runs are reused either way [default: off]",
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="RUN",
        help="tabulate finished runs instead of training (repeatable; runs of one method and bits that "
        "differ in seed make a cell of several seeds; they must share the split); with --out the tables "
        "are written there too [default: none]",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines [default: off]")
    p.set_defaults(func=cmd_compare)


def list_methods(with_params: bool) -> int:
    from dmuh.methods import METHODS, available, method_class
    from dmuh.methods.components.params import parameter_lines

    for name in available():
        print(name if method_class(name).requires.labels else f"{name}  (learns without labels)")
        if with_params:
            entry = METHODS.entry(name)
            for line in parameter_lines(entry.factory, entry.fixed):
                print(f"    {line}")
            for key, value in entry.fixed.items():
                print(f"    {key}={value!r} (fixed)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.list_methods:
        return list_methods(args.list_methods == "params")
    if args.resume:
        if not hasattr(args, "out"):
            raise DmuhError("--resume needs --out RUN_DIR of the run to continue")
        saved = Path(args.out) / CONFIG
        config = config_from_args(args, base=load_yaml(saved), base_where=str(saved))
    else:
        config = config_from_args(args)
    from dmuh.engine.trainer import train  # the library (and torch) once the flags are known to be good

    row = train(config, resume=args.resume, progress=not args.quiet, verbose=args.verbose)
    text = f"epoch {row['epoch']}, loss {row['loss']:.4f}" if "loss" in row else f"epoch {row['epoch']}"
    if "map" in row:
        text += f", map {row['map']:.4f}"
    if "images_per_s" in row:
        text += f", {row['images_per_s']:,.0f} images/s"
    if "map" in row and math.isnan(row["map"]):
        text += " (no MAP: the data has no labels; `dmuh evaluate --run RUN --data LABELED` scores it)"
    elif "map" in row:
        text += f" (MAP ties {row['ties']})"
    print(f"run {config.out}: {text}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dmuh.engine.pretrain import pretrain
    from dmuh.runs.layout import BACKBONE

    config = config_from_args(args)
    row = pretrain(config, progress=not args.quiet)
    print(
        f"pre-trained backbone in {config.out}/{BACKBONE} (last epoch: loss {row['loss']:.4f}); "
        f"use it with: dmuh train --init {config.out} ..."
    )
    return 0


def parse_bits(text: str, flag: str = "--bits") -> List[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise DmuhError(f"{flag} {text!r}: expected comma-separated integers such as 12,24,32,48") from None


def parse_seeds(text: str, flag: str = "--seeds") -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise DmuhError(f"{flag} {text!r}: expected comma-separated non-negative integers such as 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise DmuhError(f"{flag} {text!r}: seeds must be non-negative")
    return seeds


def parse_grid(items: List[str], flag: str = "--grid") -> Dict[str, Dict[str, List[Any]]]:
    """["dmuh.alpha=0.5,0.7", "dmuh.beta=30,50"] -> {"dmuh": {"alpha": [0.5, 0.7], "beta": [30, 50]}}."""
    from dmuh.utils.schema import parse_value

    grid: Dict[str, Dict[str, List[Any]]] = {}
    for item in items or []:
        if "=" not in item:
            raise DmuhError(f"{flag} {item!r}: expected METHOD.PARAM=V1,V2,..., e.g. {flag} dmuh.alpha=0.5,0.7,0.9")
        key, text = (part.strip() for part in item.split("=", 1))
        method, _, name = key.partition(".")
        if not method or not name:
            raise DmuhError(f"{flag} {item!r}: name the method, e.g. {flag} dmuh.alpha=0.5,0.7,0.9")
        values = [parse_value(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise DmuhError(f"{flag} {item!r}: no values; give V1,V2,... after '='")
        if name in grid.get(method, {}):
            raise DmuhError(f"{flag} {item!r}: {method}.{name} is already swept by another {flag}")
        grid.setdefault(method, {})[name] = values
    return grid


def tabulate_finished_runs(args: argparse.Namespace) -> int:
    """`dmuh compare --run A --run B ...`: the tables of runs that exist, nothing trained."""
    from dmuh.studies.compare import tabulate_runs
    from dmuh.studies.paper import PAPER_DATASETS

    trains = [
        flag_name(field.name)
        for field in dataclasses.fields(TrainConfig)
        if field.name != "out" and getattr(args, field.name, None) not in (None, [])
    ]
    given = trains + [
        flag
        for flag, value, unset in (
            ("--methods", args.methods, ""),
            ("--grid", args.grid, []),
            ("--seeds", args.seeds, None),
            ("--bits", args.bits_list, BITS_DEFAULT),
            ("--jobs", args.jobs, 1),
            ("--config", args.config, None),
        )
        if value != unset
    ]
    if given:
        raise DmuhError(f"{given[0]}: compare --run tabulates finished runs and trains nothing; drop {given[0]}")
    if args.paper_figures not in ("auto", "none", *PAPER_DATASETS):
        raise DmuhError(f"--paper-figures {args.paper_figures}: expected none or one of {', '.join(PAPER_DATASETS)}")
    paper = args.paper_figures if args.paper_figures in PAPER_DATASETS else None
    out = getattr(args, "out", None)
    _, text = tabulate_runs(args.run, Path(out) if out else None, against=args.against, force=args.force, paper=paper)
    print(text, end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dmuh.studies.compare import RESULTS_MARKDOWN, compare
    from dmuh.studies.paper import PAPER_DATASETS, dataset_for_protocol
    from dmuh.studies.presets import expand_methods

    if args.run:
        return tabulate_finished_runs(args)
    words = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = expand_methods(words) if words or not args.grid else []
    bits = parse_bits(args.bits_list)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    grid = parse_grid(args.grid)
    per_method: Dict[str, Dict[str, Any]] = {}
    for key, value in parse_params(args.method_params, "--param").items():
        if "." not in key:
            raise DmuhError(f"--param {key}={value}: in compare, name the method, e.g. -p csq.quantization=0.1")
        method, name = key.split(".", 1)
        if name in grid.get(method, {}):
            raise DmuhError(f"--grid {method}.{name} and -p {key}={value}: {method}.{name} is given twice; drop one")
        per_method.setdefault(method, {})[name] = value
    args.method_params = []
    base = config_from_args(args)
    if args.paper_figures == "auto":
        paper = dataset_for_protocol(base.protocol)
    elif args.paper_figures == "none":
        paper = None
    elif args.paper_figures in PAPER_DATASETS:
        paper = args.paper_figures
    else:
        raise DmuhError(
            f"--paper-figures {args.paper_figures}: expected auto, none or one of {', '.join(PAPER_DATASETS)}"
        )
    out = Path(base.out)
    compare(
        methods,
        bits,
        base,
        out,
        method_params=per_method,
        progress=not args.quiet,
        jobs=args.jobs,
        echo=print if not args.quiet else (lambda line: None),
        seeds=seeds,
        grid=grid,
        against=args.against,
        force=args.force,
        paper=paper,
    )
    print((out / RESULTS_MARKDOWN).read_text())
    return 0
