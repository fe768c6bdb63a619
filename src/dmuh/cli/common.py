"""What every `dmuh` command module shares: config flags, the run-directory flag, small checks."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, Optional

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
            parser.add_argument(flag, dest=field.name, default=argparse.SUPPRESS, type=_typed(kind), help=helptext)
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


def _typed(kind: str):
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


# -- the run directory: --run everywhere; the old spellings keep working for now ------------------


class _DeprecatedRunFlag(argparse.Action):
    """`--checkpoint RUN` (encode, search, export-onnx) and a bare RUN (evaluate) still work and
    land in `args.run`; `main` prints a one-line notice once the command has succeeded (a failing
    command keeps its one error line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:  # an absent optional positional
            return
        spelling = option_string or "a bare RUN argument"
        notices = list(getattr(namespace, "deprecations", None) or [])
        notices.append(f"dmuh: note: {spelling} is deprecated; use --run {values}")
        setattr(namespace, "deprecations", notices)
        setattr(namespace, "run", values)


def print_deprecations(args: argparse.Namespace) -> None:
    for notice in getattr(args, "deprecations", None) or []:
        print(notice, file=sys.stderr)


def add_run_flag(parser: argparse.ArgumentParser, help: str, old_flag: Optional[str] = None,
                 positional: bool = False) -> None:
    """--run RUN (a run directory written by `dmuh train`), plus the command's old spelling.
    Commands that need it call `require_run`."""
    parser.add_argument("--run", metavar="RUN", default=None, help=help)
    if old_flag:
        parser.add_argument(old_flag, metavar="RUN", dest="run", action=_DeprecatedRunFlag, help=argparse.SUPPRESS)
    if positional:
        parser.add_argument("legacy_run", metavar="RUN", nargs="?", action=_DeprecatedRunFlag, help=argparse.SUPPRESS)


def require_run(args: argparse.Namespace) -> str:
    if not args.run:
        raise DmuhError("--run RUN is required (the run directory `dmuh train --out` wrote)")
    return args.run


def check_positive(value, flag: str) -> None:
    if value is not None and value < 1:
        raise DmuhError(f"{flag} {value}: expected a positive integer")
