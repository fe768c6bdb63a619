"""A typed schema of dataclass fields: each declared once with its type, allowed values and help
line (`setting`), checked as a whole (`check_values`), parsed from flags and YAML. `dmuh.runs.config`
declares the run configuration with it; methods declare their hyper-parameters with `Rule`."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import yaml

from dmuh.errors import ConfigError, first_line

Choices = Union[Sequence[str], Callable[[], Sequence[str]]]


@dataclass(frozen=True)
class Rule:
    """What a field accepts beside its type: a numeric range and/or a list of words."""

    minimum: Optional[float] = None
    maximum: Optional[float] = None
    above: Optional[float] = None  # strictly greater than
    below: Optional[float] = None  # strictly less than
    choices: Optional[Choices] = None

    def words(self) -> Sequence[str]:
        return tuple(self.choices() if callable(self.choices) else self.choices or ())

    def allowed(self) -> str:
        """The allowed values in words, for help lines and error messages."""
        if self.choices is not None:
            return "one of " + ", ".join(self.words())
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return " and ".join(parts)

    def admits(self, value) -> bool:
        if self.choices is not None:
            return value in self.words()
        return (
            (self.minimum is None or value >= self.minimum)
            and (self.maximum is None or value <= self.maximum)
            and (self.above is None or value > self.above)
            and (self.below is None or value < self.below)
        )


def setting(
    default, help: str, *, minimum=None, maximum=None, above=None, below=None, choices: Optional[Choices] = None
):
    """A config field: its default, help line and allowed values (dicts get a fresh copy each time)."""
    metadata = {"help": help, "rule": Rule(minimum, maximum, above, below, choices)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# -- checking values against the schema ---------------------------------------------------------

_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text", dict: "a mapping KEY: VALUE"}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)  # annotations are strings here (postponed evaluation)


def _field_kind(cls, name: str) -> Tuple[type, bool]:
    """(int | float | bool | str | dict, whether None is allowed) of a field's annotation."""
    hint = _hints(cls)[name]
    optional = False
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    return (typing.get_origin(hint) or hint), optional


@functools.lru_cache(maxsize=None)
def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def expected(cls, name: str) -> str:
    """ "an integer >= 1", "one of sgd, adamw", ...: what a field accepts, in words."""
    kind, optional = _field_kind(cls, name)
    rule: Rule = _fields(cls)[name].metadata.get("rule", Rule())
    allowed = rule.allowed()
    words = allowed if rule.choices is not None else " ".join(w for w in (_KIND_WORDS[kind], allowed) if w)
    return words + (" or none" if optional else "")


def help_line(cls, name: str) -> str:
    """A field's help line: what it is, what it accepts, its default (one style for every flag)."""
    f = _fields(cls)[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata.get('help', '')} ({expected(cls, name)}) [default: {default}]"


def _checked(cls, name: str, value: Any, label: str) -> Any:
    kind, optional = _field_kind(cls, name)
    rule: Rule = _fields(cls)[name].metadata.get("rule", Rule())

    def refuse():
        return ConfigError(f"{label}: expected {expected(cls, name)}, got {value!r}", field=name)

    if value is None:
        if optional:
            return None
        raise refuse()
    if kind is bool:
        if not isinstance(value, bool):
            raise refuse()
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse()
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise refuse()
        value = float(value)
    elif kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `out: 2024` in a YAML file is a folder name
        if not isinstance(value, str):
            raise refuse()
    elif kind is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise refuse()
        value = dict(value)
    if kind is not dict and not rule.admits(value):
        raise refuse()
    return value


def check_values(
    cls, values: Dict[str, Any], where: str = "config", origins: Optional[Mapping[str, str]] = None
) -> None:
    """Check (and normalise in place: ints given for numbers become floats) config values of `cls`.

    `origins` maps a field to the flag it came from; other fields are named "`where`: field 'x'".
    """
    origins = origins or {}
    fields = _fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}", field=unknown[0])

    def label(name: str) -> str:
        return origins.get(name) or f"{where}: field {name!r}"

    for name in list(values):
        values[name] = _checked(cls, name, values[name], label(name))

    def current(name: str):
        if name in values:
            return values[name]
        f = fields[name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    if current("lr_end") > current("lr"):
        raise ConfigError(f"{label('lr_end')}: expected a number <= lr {current('lr'):g}, got {current('lr_end')!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", current("device")):
        raise ConfigError(f"{label('device')}: expected cpu or cuda[:N], got {current('device')!r}")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_flag(cls, name: str, text: str, flag: str) -> Any:
    """A flag's text as the value of field `name` (then checked by `check_values`): none/null for an
    optional field is None; words for a text field stay words (`--hash-norm none` is "none")."""
    kind, optional = _field_kind(cls, name)
    stripped = text.strip()
    if optional and stripped.lower() in ("none", "null"):
        return None
    if kind is str:
        return text
    if kind is bool:
        if stripped.lower() in _TRUE + _FALSE:
            return stripped.lower() in _TRUE
    elif kind is int:
        if re.fullmatch(r"[+-]?\d+", stripped):
            return int(stripped)
    elif kind is float:
        try:
            return float(stripped)
        except ValueError:
            pass
    raise ConfigError(f"{flag}: expected {expected(cls, name)}, got {text!r}", field=name)


# -- reading YAML and KEY=VALUE options -----------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# A configuration is a few dozen fields: bounds far above any real one, far below what an alias
# bomb ("billion laughs": nested aliases that expand exponentially) or deep nesting would take.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000  # scalars, lists and mappings once every alias is expanded
YAML_MAX_DEPTH = 32


def _expanded_size(node, depth: int, sizes: Dict[int, int]) -> int:
    """How many nodes `node` is once its aliases are expanded (memoised per node, so an alias bomb
    is measured without being expanded); ValueError past YAML_MAX_DEPTH or YAML_MAX_NODES."""
    if depth > YAML_MAX_DEPTH:
        raise ValueError(f"nested deeper than {YAML_MAX_DEPTH} levels")
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, depth + 1, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded_size(key, depth + 1, sizes) + _expanded_size(value, depth + 1, sizes)
    if size > YAML_MAX_NODES:
        raise ValueError(f"expands to more than {YAML_MAX_NODES:,} values (aliases that multiply)")
    sizes[id(node)] = size
    return size


def bounded_yaml(text: str) -> Any:
    """yaml.safe_load of `text` (a key given twice refused), checked for depth and expanded size
    before it is built: ValueError (or yaml.YAMLError) otherwise."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, 0, {})
        return loader.construct_document(node)
    except RecursionError:
        raise ValueError(f"nested deeper than {YAML_MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """A YAML mapping of config fields, read safely (no tags that run code, no key given twice) and
    bounded: at most YAML_MAX_BYTES, YAML_MAX_DEPTH levels and YAML_MAX_NODES values once aliases
    are expanded, checked on the composed node graph before anything is built."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.stat().st_size > YAML_MAX_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, more than a config file ({YAML_MAX_BYTES:,})")
        values = bounded_yaml(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested deeper than {YAML_MAX_DEPTH} levels)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields")
    return values


def parse_value(text: str) -> Any:
    """Command-line values use YAML scalars: 0.7 -> float, true -> bool, 12 -> int.

    Only true and false are booleans (YAML 1.2): YAML 1.1 also reads on/off/yes/no as booleans,
    which would turn `-p momentum_dropout=off` into False; those words stay words.
    """
    try:
        value = bounded_yaml(text)
    except yaml.YAMLError:
        return text.strip()  # `-p name=a: b` is the text it reads as
    except ValueError as error:
        raise ConfigError(f"value {text[:40]!r}: {error}") from None
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def parse_params(items, flag: str = "--param") -> Dict[str, Any]:
    """["alpha=0.7", "beta=50"] -> {"alpha": 0.7, "beta": 50}."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = parse_value(value)
        except ConfigError as error:
            raise ConfigError(f"{flag} {key.strip()[:40]}: {error}") from None
    return params


# -- paths that stay valid from any folder --------------------------------------------------------
