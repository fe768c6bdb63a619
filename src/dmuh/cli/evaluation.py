"""`dmuh evaluate`: every metric of a trained run on its saved split (dmuh.studies.evaluate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

from dmuh.cli.common import add_run_flag, require_run
from dmuh.errors import DmuhError, first_line
from dmuh.metrics.ties import DEFAULT_TIES, TIES
from dmuh.utils.io import parse_json


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained run on its saved split")
    add_run_flag(p, help="run directory written by `dmuh train` (required)", positional=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [default: cpu]")
    p.add_argument(
        "--ties",
        default=DEFAULT_TIES,
        choices=TIES,
        help=f"tie handling of the headline numbers: {', '.join(TIES)} (the report has every mode) "
        f"[default: {DEFAULT_TIES}]",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="where to write the report (an existing file needs --force) [default: RUN/eval.json]",
    )
    p.add_argument("--force", action="store_true", help="replace the report file if it exists [default: off]")
    p.add_argument(
        "--data",
        metavar="SPEC",
        default=None,
        help="read the run's data from here instead of the config's path (moved data; the split's "
        "fingerprint must still match) [default: the run's config]",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="image root of a list-file source, instead of the config's [default: the run's config]",
    )
    p.add_argument("--verbose", action="store_true", help="print the whole JSON report [default: off]")
    p.add_argument("--quiet", action="store_true", help="no progress bars [default: off]")
    p.set_defaults(func=cmd_evaluate)


def report_path(args: argparse.Namespace, run: str) -> Path:
    """--json FILE, or RUN/eval.json; refused (one line) when it exists and --force is not given."""
    from dmuh.runs.layout import EVAL, run_directory
    from dmuh.utils.io import refuse_overwrite

    run_dir = run_directory(run)  # a missing run says so before anything else
    if args.json:
        inputs = [("--run", run_dir), ("--data", args.data), ("--data-root", args.data_root)]
        inputs += [(f"the run's {key}", value) for key, value in _run_data(run_dir).items()]
        refuse_overwrite(args.json, args.force, "--json", inputs=inputs, own=[run_dir / EVAL])
        return Path(args.json)
    out = run_dir / EVAL
    if out.exists() and not args.force:
        raise DmuhError(
            f"{out} already exists (the report of an earlier `dmuh evaluate`); pass --force to "
            "replace it or --json FILE to write elsewhere"
        )
    return out


def _run_data(run_dir: Path) -> Dict[str, str]:
    """The data paths a run's config.yaml names (what evaluate reads without --data); {} when the
    config cannot be read (evaluate then says why)."""
    from dmuh.runs.layout import CONFIG
    from dmuh.utils.schema import load_yaml

    try:
        values = load_yaml(run_dir / CONFIG)
    except DmuhError:
        return {}
    return {key: values[key] for key in ("data", "data_root") if isinstance(values.get(key), str)}


STORED_REPORT_LIMIT = 64 * 1024 * 1024  # bytes: a report of a run is far smaller; a larger file is not one


def stored_report(args: argparse.Namespace, run: str) -> Optional[Dict[str, Any]]:
    """RUN/eval.json when the same question is asked again (no --force, --json, --data or --data-root)
    and the report is not older than the run's checkpoint; None when it must be computed."""
    from dmuh.runs.layout import CHECKPOINT, EVAL, run_directory

    run_dir = run_directory(run)
    stored = run_dir / EVAL
    if args.force or args.json or args.data or args.data_root or not stored.is_file():
        return None
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.is_file() and checkpoint.stat().st_mtime > stored.stat().st_mtime:
        raise DmuhError(f"{stored} is older than the run's checkpoint (trained since); pass --force to recompute it")
    try:
        if stored.stat().st_size > STORED_REPORT_LIMIT:
            raise ValueError("too large for a report")
        report = parse_json(stored.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or not isinstance(report.get("map_by_ties"), dict):
            raise ValueError("not a report of dmuh evaluate")
        short = short_report(report)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise DmuhError(
            f"{stored}: unreadable report ({first_line(error, 120)}); pass --force to recompute it"
        ) from None
    return {"report": report, "short": short, "path": stored}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmuh.studies.evaluate import evaluate_run
    from dmuh.utils.io import remove_orphans

    run = require_run(args)
    stored = stored_report(args, run)
    if stored is not None:
        print(f"the stored report {stored['path']} (dmuh evaluate --force recomputes it):")
        print(json.dumps(stored["report"], indent=2) if args.verbose else stored["short"])
        return 0
    out = report_path(args, run)
    remove_orphans(out.parent)
    data = {k: v for k, v in (("data", args.data), ("data_root", args.data_root)) if v is not None}
    report = evaluate_run(run, device=args.device, ties=args.ties, out=str(out), **data)
    print(json.dumps(report, indent=2) if args.verbose else short_report(report))
    return 0


def short_report(report: Dict[str, Any]) -> str:
    """The headline numbers; the JSON file (and --verbose) has everything."""
    lines = [f"{key}: {report[key]}" for key in ("run", "method", "bits", "protocol") if key in report]
    for direction, scores in report.get("directions", {}).items():  # a cross-modal run
        lines.append({"i2t": "image -> text:", "t2i": "text -> image:"}.get(direction, direction))
        lines += [
            "  " + line
            for line in short_report({**scores, "topk": report.get("topk", scores.get("topk"))}).splitlines()
        ]
    for mode, values in report.get("map_by_ties", {}).items():
        line = f"MAP@all (ties {mode}): {values['map']:.4f}"
        if values.get("map_at_k") is not None:
            line += f"   MAP@{report['topk']}: {values['map_at_k']:.4f}"
        lines.append(line)
    if "precision_at_k" in report:
        pairs = list(zip(report["precision_ks"], report["precision_at_k"]))[:5]
        lines.append(f"precision@k (ties {report['ties']}): " + ", ".join(f"P@{k} {p:.4f}" for k, p in pairs))
    if "precision_radius2" in report:
        lines.append(f"precision within Hamming radius 2: {report['precision_radius2']:.4f}")
    return "\n".join(lines)
