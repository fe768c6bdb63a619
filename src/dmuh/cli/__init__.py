"""The `dmuh` command: one parser, one sub-command module per concern.

    training    train, pretrain, compare
    evaluation  evaluate
    retrieval   features, encode, index build|info, search, export-onnx
    serving     serve (a search page and a JSON API over HTTP)
    demo        demo (compare with a preset)
    figures     figure uncertainty|curves|topk (the paper's Fig. 1, 3, 4)
    inspection  inspect (items ranked by DMUH's uncertainty and their training loss)
    checkpoints convert-checkpoint (an old checkpoint.pt to checkpoint.safetensors)

Every command is a thin function over the library; a `DmuhError` becomes one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from dmuh.cli.common import cli_message, one_line, print_deprecations
from dmuh.errors import DmuhError


def package_version() -> str:
    """The installed dmuh's version (importlib.metadata), else `dmuh.__version__`."""
    from importlib import metadata

    try:
        return metadata.version("dmuh")
    except metadata.PackageNotFoundError:
        from dmuh.utils.version import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from dmuh.cli import (
        checkpoints,
        demo,
        evaluation,
        figures,
        inspection,
        retrieval,
        serving,
        training,
    )

    parser = argparse.ArgumentParser(
        prog="dmuh", description="Deep Momentum Uncertainty Hashing: train, evaluate, search binary codes"
    )
    parser.add_argument(
        "--version", action="version", version=f"dmuh {package_version()}", help="print dmuh's version and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (training, evaluation, demo, retrieval, serving, figures, inspection, checkpoints):
        module.add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dmuh.utils.progress import is_quiet, set_quiet

    quiet_before = is_quiet()
    set_quiet(
        quiet_before or bool(getattr(args, "quiet", False))
    )  # --quiet hides every progress bar (dmuh.utils.progress)
    try:
        code = args.func(args)
        print_deprecations(args)
        return code
    except DmuhError as exc:
        print(f"dmuh {args.command}: error: {cli_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command did not expect to fail on: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dmuh {args.command}: error: {one_line(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a case no check foresaw: one line, the traceback on request
        if os.environ.get("DMUH_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(
            f"dmuh {args.command}: internal error: {type(exc).__name__}: {first} (set DMUH_DEBUG=1 for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        set_quiet(quiet_before)


if __name__ == "__main__":
    sys.exit(main())
