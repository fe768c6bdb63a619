"""What every `dmuh` command module shares: config flags, the run-directory flag, small checks."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any, Dict, Optional

from dmuh.errors import DmuhError

# Fields given as repeatable KEY=VALUE flags: field -> (flag, short flag, help).
PARAM_FLAGS = {
    "method_params": (
        "--param",
        "-p",
        "method hyper-parameter, repeatable (e.g. -p alpha=0.7 -p beta=50; in compare METHOD.KEY=VALUE)",
    ),
    "model_params": ("--model-param", None, "model option, repeatable (e.g. --model-param width=32)"),
    "protocol_params": (
        "--protocol-param",
        None,
        "protocol parameter, repeatable (e.g. --protocol-param query_per_class=50 with --protocol per-class)",
    ),
}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, config_class, exclude=()) -> None:
    """One flag per config field (but `exclude`), help from the schema (`dmuh.runs.config.help_line`);
    only flags given on the command line override the YAML. Values stay text here and are read
    and checked against the schema by `config_from_args`, so every bad value gets the same
    one-line message."""
    from dmuh.utils.schema import help_line

    parser.add_argument("--config", help="YAML file of config fields (flags override it) [default: none]")
    parser.set_defaults(config_class=config_class)
    names = {f.name for f in dataclasses.fields(config_class)}
    for field in dataclasses.fields(config_class):
        if field.name in PARAM_FLAGS or field.name in exclude:
            continue
        parser.add_argument(
            flag_name(field.name),
            dest=field.name,
            default=argparse.SUPPRESS,
            metavar=field.name.upper(),
            help=help_line(config_class, field.name),
        )
    for name, (flag, short, helptext) in PARAM_FLAGS.items():
        if name in names and name not in exclude:
            spellings = [flag] + ([short] if short else [])
            parser.add_argument(*spellings, dest=name, action="append", default=[], metavar="KEY=VALUE", help=helptext)


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None, base_where: str = "config"):
    """base (a resumed run's config, read from `base_where`) < YAML (--config) < explicit flags <
    --param / --model-param / --protocol-param. Every value is checked against the schema; an
    error names the flag, or the file and field, it came from."""
    from dmuh.utils.schema import load_yaml, parse_flag, parse_params

    config_class = args.config_class
    values: Dict[str, Any] = dict(base or {})
    where = base_where
    if args.config:
        values.update(load_yaml(args.config))
        where = args.config
    origins: Dict[str, str] = {}
    for field in dataclasses.fields(config_class):
        if field.name in PARAM_FLAGS or not hasattr(args, field.name):
            continue
        flag = flag_name(field.name)
        values[field.name] = parse_flag(config_class, field.name, getattr(args, field.name), flag)
        origins[field.name] = flag
    for name, (flag, _, _) in PARAM_FLAGS.items():
        params = parse_params(getattr(args, name, None) or [], flag)
        if params:
            current = values.get(name, {})
            values[name] = {**(current if isinstance(current, dict) else {}), **params}
    return config_class.from_dict(values, where=where, origins=origins)


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
        namespace.deprecations = notices
        namespace.run = values


def print_deprecations(args: argparse.Namespace) -> None:
    for notice in getattr(args, "deprecations", None) or []:
        print(notice, file=sys.stderr)


def add_run_flag(
    parser: argparse.ArgumentParser, help: str, old_flag: Optional[str] = None, positional: bool = False
) -> None:
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
        raise DmuhError(f"{flag}: expected a positive integer, got {value}")


# Fields whose flag is not `--` + the field's name with dashes.
_FLAG_OF_FIELD = {"model_params": "--model-param", "method_params": "--param", "protocol_params": "--protocol-param"}


def flag_of(field: str) -> str:
    """The command-line flag that sets a config field."""
    return _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def cli_message(error: DmuhError) -> str:
    """A library error as the command line says it: a message that starts with the config field it
    names (`init runs/x: ...`) names the flag instead (`--init runs/x: ...`)."""
    text = str(error)
    field = getattr(error, "field", None)
    if field and text[len(field) : len(field) + 1] in (" ", ":") and text.startswith(field):
        text = flag_of(field) + text[len(field) :]
    return one_line(text)


MESSAGE_LIMIT = 400  # characters of an error line: a value quoted in it may be of any length


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` as one line of at most `limit` characters (line breaks become spaces; a longer text
    is cut, marked by "...")."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(text).strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
