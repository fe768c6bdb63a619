"""`dmuh convert-checkpoint`: a run's old checkpoint.pt (a pickle) -> checkpoint.safetensors
(dmuh.runs.checkpoint), read once with torch's allow-list unpickler so no code runs."""

from __future__ import annotations

import argparse

from dmuh.cli.common import add_run_flag, require_run


def add_commands(sub) -> None:
    p = sub.add_parser(
        "convert-checkpoint",
        help="convert a run's old checkpoint.pt (a pickle) to checkpoint.safetensors",
        description="Read RUN/checkpoint.pt with torch's allow-list unpickler (tensors and plain values "
        "only: a file that needs anything else is refused, no code runs) and write "
        "RUN/checkpoint.safetensors, which every command reads. The old file is kept.",
    )
    add_run_flag(p, help="run directory written by `dmuh train` (or its checkpoint.pt)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint.safetensors")
    p.set_defaults(func=cmd_convert_checkpoint)


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from dmuh.runs.layout import convert_legacy_checkpoint

    old, new, state = convert_legacy_checkpoint(require_run(args), force=args.force)
    print(f"converted {old} -> {new} (epoch {state.get('epoch', '?')}; {old.name} kept, no longer read)")
    return 0
