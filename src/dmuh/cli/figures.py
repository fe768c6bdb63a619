"""`dmuh figure uncertainty|curves|topk`: the paper's Fig. 1, 3 and 4 from run directories (dmuh.studies.figures).

Each writes PREFIX.png and PREFIX.md (`--out PREFIX`; default RUN/figure-NAME next to the first
run), atomically, and refuses to overwrite either without --force.
"""

from __future__ import annotations

import argparse

from dmuh.cli.common import add_run_flag, check_positive, require_run
from dmuh.errors import DmuhError

OUT_HELP = "write PREFIX.png and PREFIX.md [default: RUN/figure-{name}, next to the first run]"
DEVICE_HELP = "cpu or cuda[:N] [default: cpu]"
RUNS_HELP = "run directory; repeat to compare runs (required)"


def add_commands(sub) -> None:
    p = sub.add_parser("figure", help="draw the paper's figures (PNG + markdown table) from run directories")
    figures = p.add_subparsers(dest="figure", required=True)

    u = figures.add_parser(
        "uncertainty", help="Fig. 1: bit-level uncertainty over epochs and an image-uncertainty gallery"
    )
    add_run_flag(u, help="a DMUH run directory (it has uncertainty_trace.npz) (required)")
    u.add_argument(
        "--bits-shown",
        type=int,
        default=2,
        metavar="N",
        help="bits plotted: half most-changing, half least-changing [default: 2]",
    )
    u.add_argument(
        "--gallery",
        type=int,
        default=8,
        metavar="N",
        help="lowest and highest image-uncertainty training images shown, each [default: 8]",
    )
    u.add_argument(
        "--passes",
        type=int,
        default=1,
        metavar="N",
        help="passes of training_uncertainty averaged per item [default: 1]",
    )
    u.add_argument("--items", type=int, default=4, metavar="N", help="trace items plotted per bit [default: 4]")
    u.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_output_flags(u, "uncertainty")
    u.set_defaults(func=cmd_uncertainty)

    c = figures.add_parser("curves", help="Fig. 3: loss and train/test MAP per epoch of one or more runs")
    c.add_argument("--run", metavar="RUN", action="append", default=[], help=RUNS_HELP)
    _add_output_flags(c, "curves")
    c.set_defaults(func=cmd_curves)

    t = figures.add_parser("topk", help="Fig. 4: precision of the top k of one or more runs on their saved splits")
    t.add_argument("--run", metavar="RUN", action="append", default=[], help=RUNS_HELP)
    t.add_argument(
        "--max-k", type=int, default=5000, metavar="K", help="largest k (clipped to the database size) [default: 5000]"
    )
    t.add_argument(
        "--points",
        type=int,
        default=50,
        metavar="N",
        help="about how many ks on the curve, 1 and max-k included, 2 or more [default: 50]",
    )
    t.add_argument(
        "--spacing",
        choices=("linear", "log"),
        default="linear",
        help="spacing of the ks: linear or log [default: linear]",
    )
    t.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_output_flags(t, "topk")
    t.set_defaults(func=cmd_topk)


def _add_output_flags(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", metavar="PREFIX", help=OUT_HELP.format(name=name))
    parser.add_argument("--force", action="store_true", help="replace existing outputs [default: off]")


def _runs(args: argparse.Namespace):
    if not args.run:
        raise DmuhError("--run RUN is required (the run directory `dmuh train --out` wrote); repeat it to compare runs")
    return args.run


def _finish(figure, args, name: str, first_run) -> int:
    from dmuh.studies.figures import write_figure

    png, md = _outputs(args, name, first_run)
    write_figure(figure, png, md, force=args.force)
    for note in getattr(figure, "notes", []):
        print(f"note: {note}")
    print(f"wrote {png} and {md}")
    return 0


def _outputs(args, name: str, first_run):
    from dmuh.studies.figures import check_outputs, output_paths
    from dmuh.utils.io import remove_orphans

    png, md = output_paths(args.out, first_run, name)
    check_outputs(png, md, args.force)  # before any run is loaded
    remove_orphans(png.parent)
    return png, md


def cmd_uncertainty(args: argparse.Namespace) -> int:
    from dmuh.studies.figures import run_directory, uncertainty_figure

    run = require_run(args)
    for value, flag in ((args.bits_shown, "--bits-shown"), (args.passes, "--passes"), (args.items, "--items")):
        check_positive(value, flag)
    run_directory(run)
    _outputs(args, "uncertainty", run)
    figure = uncertainty_figure(
        run,
        bits_shown=args.bits_shown,
        gallery=args.gallery,
        passes=args.passes,
        items_shown=args.items,
        device=args.device,
    )
    return _finish(figure, args, "uncertainty", run)


def cmd_curves(args: argparse.Namespace) -> int:
    from dmuh.studies.figures import curves_figure, run_directory

    runs = _runs(args)
    run_directory(runs[0])
    _outputs(args, "curves", runs[0])
    return _finish(curves_figure(runs), args, "curves", runs[0])


def cmd_topk(args: argparse.Namespace) -> int:
    from dmuh.studies.figures import run_directory, topk_figure

    runs = _runs(args)
    check_positive(args.max_k, "--max-k")
    run_directory(runs[0])
    _outputs(args, "topk", runs[0])
    return _finish(
        topk_figure(runs, max_k=args.max_k, points=args.points, spacing=args.spacing, device=args.device),
        args,
        "topk",
        runs[0],
    )
