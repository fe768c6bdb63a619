"""`dmuh evaluate`: every metric of a trained run on its saved split (dmuh.evaluate)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from dmuh.cli.common import add_run_flag, require_run
from dmuh.metrics import DEFAULT_TIES, TIES


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained run on its saved split")
    add_run_flag(p, help="run directory written by `dmuh train`", positional=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--ties", default=DEFAULT_TIES, choices=TIES,
                   help=f"tie handling of the headline numbers [{DEFAULT_TIES}]; the report has every mode")
    p.add_argument("--json", help="where to write the report (default RUN/eval.json)")
    p.add_argument("--verbose", action="store_true", help="print the whole JSON report")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmuh.evaluate import evaluate_run

    report = evaluate_run(require_run(args), device=args.device, ties=args.ties, out=args.json)
    print(json.dumps(report, indent=2) if args.verbose else short_report(report))
    return 0


def short_report(report: Dict[str, Any]) -> str:
    """The headline numbers; the JSON file (and --verbose) has everything."""
    lines = [f"{key}: {report[key]}" for key in ("run", "method", "bits", "protocol") if key in report]
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
