"""The `dmuh` command: one parser, one sub-command module per concern.

    training    train, pretrain, compare
    evaluation  evaluate
    retrieval   encode, index build|info, search, export-onnx
    demo        demo (compare with a preset)
    figures     figure uncertainty|curves|topk (the paper's Fig. 1, 3, 4)

Every command is a thin function over the library; a `DmuhError` becomes one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from dmuh.cli.common import print_deprecations
from dmuh.errors import DmuhError


def build_parser() -> argparse.ArgumentParser:
    from dmuh.cli import demo, evaluation, figures, retrieval, training

    parser = argparse.ArgumentParser(prog="dmuh", description="Deep Momentum Uncertainty Hashing: train, evaluate, search binary codes")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (training, evaluation, demo, retrieval, figures):
        module.add_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        print_deprecations(args)
        return code
    except DmuhError as exc:
        print(f"dmuh {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
