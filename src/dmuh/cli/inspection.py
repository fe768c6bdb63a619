"""`dmuh inspect`: which items a trained run is unsure of (dmuh.studies.inspect).

Writes DIR/items.csv (every item of the chosen part of the split, highest uncertainty first: its
image-level uncertainty, pairwise training loss, label, and which labels --label-noise flipped),
DIR/gallery.png (the --top highest and lowest; image data only) and DIR/summary.json.
"""

from __future__ import annotations

import argparse

from dmuh.errors import DmuhError
from dmuh.studies.options import DEFAULT_PASSES, DEFAULT_TOP, READINGS, SORT_KEYS, SPLITS


def add_commands(sub) -> None:

    p = sub.add_parser(
        "inspect",
        help="rank a run's items by DMUH's uncertainty and their training loss (review label noise and hard items)",
        description="Per item of the run's split: image-level uncertainty (DMUH runs), the pairwise "
        "training loss and the label; a CSV highest first and a gallery of both ends.",
    )
    p.add_argument(
        "run_positional",
        metavar="RUN",
        nargs="?",
        default=None,
        help="run directory written by `dmuh train` (or --run RUN) (required)",
    )
    p.add_argument("--run", metavar="RUN", default=None, help="the same run directory, as a flag [default: none]")
    p.add_argument(
        "--out", metavar="DIR", default=None, help="folder for items.csv, gallery.png and summary.json (required)"
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help=f"part of the run's split to inspect: {', '.join(SPLITS)} [default: train]",
    )
    p.add_argument(
        "--top",
        type=int,
        default=DEFAULT_TOP,
        metavar="N",
        help=f"items of each end (highest, lowest) in the gallery [default: {DEFAULT_TOP}]",
    )
    p.add_argument(
        "--reading",
        choices=READINGS,
        default="auto",
        help="uncertainty reading: eval (one pass in eval mode, as `dmuh encode --uncertainty`), training "
        "(mean of --passes passes as the loss sees them: batch statistics and dropout), auto "
        "(training when the network has dropout that differs between the two networks, else eval) "
        "[default: auto]",
    )
    p.add_argument(
        "--passes",
        type=int,
        default=None,
        metavar="N",
        help=f"passes averaged by the training reading [default: {DEFAULT_PASSES}]",
    )
    p.add_argument(
        "--sort",
        choices=SORT_KEYS,
        default=None,
        help="rank items by uncertainty or loss, highest first [default: uncertainty, or loss for runs "
        "without a momentum copy]",
    )
    p.add_argument(
        "--data",
        metavar="SPEC",
        default=None,
        help="read the run's data from here instead of the config's path [default: the run's config]",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="image root of a list-file source, instead of the config's [default: the run's config]",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [default: cpu]")
    p.add_argument(
        "--force", action="store_true", help="replace the outputs of an earlier inspect in --out [default: off]"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars [default: off]")
    p.set_defaults(func=cmd_inspect)


def _run(args: argparse.Namespace) -> str:
    if args.run and args.run_positional and args.run != args.run_positional:
        raise DmuhError(f"two runs given: {args.run_positional} and --run {args.run}; give one")
    run = args.run or args.run_positional
    if not run:
        raise DmuhError("RUN is required (the run directory `dmuh train --out` wrote): dmuh inspect RUN --out DIR")
    return run


def cmd_inspect(args: argparse.Namespace) -> int:
    from dmuh.runs.layout import CHECKPOINT, run_directory
    from dmuh.studies.inspect import check_options, check_out, inspect_run
    from dmuh.utils.words import plural

    run = _run(args)
    if not args.out:
        raise DmuhError("--out DIR is required (the folder for items.csv, gallery.png and summary.json)")
    check_options(args.split, args.reading, args.passes, args.sort, args.top)
    run_directory(run, need=(CHECKPOINT,))
    check_out(args.out, args.force)  # before the run is loaded
    data = {k: v for k, v in (("data", args.data), ("data_root", args.data_root)) if v is not None}
    result = inspect_run(
        run, split=args.split, reading=args.reading, passes=args.passes, sort=args.sort, device=args.device, **data
    )
    written = result.write(args.out, top=args.top, force=args.force)
    for note in result.notes:
        print(f"note: {note}")
    if result.reading in ("eval", "training"):
        print(
            "note: uncertainty values depend on the reading: eval is one pass in eval mode (what encode and serve "
            "report), training averages passes with dropout as the loss saw them, as `dmuh figure uncertainty` "
            "does (one pass by default)"
        )
    reading = {
        "eval": "eval reading (one pass)",
        "training": f"training reading ({plural(result.passes, 'pass', 'passes')})",
    }
    what = ", ".join(
        filter(
            None,
            [
                reading.get(result.reading) and f"uncertainty: {reading[result.reading]}",
                "loss" if result.loss is not None else None,
            ],
        )
    )
    print(
        f"inspected {plural(len(result.positions), result.split + ' item')} of {result.run} ({what}), sorted by "
        f"{result.sort}: {', '.join(str(p) for p in written)}"
    )
    for name, scores in (result.detection() or {}).items():
        print(
            f"flipped labels found by {name}: AUROC {scores['auroc']:.4f}, precision in the top {scores['top']} "
            f"{scores['top_precision']:.4f} (base rate {scores['base_rate']:.4f})"
        )
    return 0
