"""Hyper-parameters declared once per method: what each admits (`dmuh.utils.schema.Rule`) and a
help line; the default is the method's __init__ signature's. `HashingMethod` checks the declared
ones before the method's own __init__ runs (`dmuh.methods.base`), and `dmuh train --list-methods
params` prints them. The `check_*` helpers are the same checks for the parameters still checked in
a method's own __init__; every message names the parameter the same way.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from dmuh.errors import DmuhError
from dmuh.utils.schema import Rule


def check_choice(name: str, value, choices) -> str:
    """A method hyper-parameter that takes one of `choices`, or a `DmuhError` naming it."""
    if value not in choices:
        raise DmuhError(f"method parameter {name}={value!r}: choose one of {', '.join(choices)}")
    return value


def check_number(name: str, value, minimum: Optional[float] = None, strict: bool = False) -> float:
    """A method hyper-parameter as a float; a `DmuhError` naming it when it is not a finite number
    >= minimum (> minimum when `strict`)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise DmuhError(f"method parameter {name}={value!r}: expected a number")
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise DmuhError(f"method parameter {name}={value!r}: must be {'>' if strict else '>='} {minimum:g}")
    return number


def check_count(name: str, value, minimum: int = 1) -> int:
    """A method hyper-parameter as an int >= minimum, or a `DmuhError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DmuhError(f"method parameter {name}={value!r}: must be an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its kind (float, int, str or bool), what it admits, a help line;
    `optional`: None is admitted too (a default computed from the sizes); `aliases`: values read as
    others (YAML 1.1 reads `off` as false); `why`: said after a value above the maximum."""

    kind: type = float
    rule: Rule = Rule()
    help: str = ""
    optional: bool = False
    aliases: Tuple[Tuple[Any, Any], ...] = ()
    why: str = ""

    def check(self, name: str, value):
        """The value as the method uses it, or a `DmuhError` naming the parameter."""
        if value is None and self.optional:
            return None
        for alias, meaning in self.aliases:
            if value is alias:
                value = meaning
        rule = self.rule
        if self.kind is bool:
            if not isinstance(value, bool):
                raise DmuhError(f"method parameter {name}={value!r}: expected true or false")
            return value
        if rule.choices is not None:
            return check_choice(name, value, rule.words())
        if self.kind is int:
            count = check_count(name, value, int(1 if rule.minimum is None else rule.minimum))
            if rule.maximum is not None and count > rule.maximum:
                why = f" ({self.why})" if self.why else ""
                raise DmuhError(f"method parameter {name}={value!r}: must be <= {rule.maximum:g}{why}")
            return count
        strict = rule.above is not None
        number = check_number(name, value, rule.above if strict else rule.minimum, strict)
        if rule.maximum is not None and number > rule.maximum:
            why = f" ({self.why})" if self.why else ""
            raise DmuhError(f"method parameter {name}={number!r}: must be <= {rule.maximum:g}{why}")
        if rule.below is not None and number >= rule.below:
            raise DmuhError(f"method parameter {name}={value!r}: must be < {rule.below:g}")
        return number

    def allowed(self) -> str:
        """The admitted values in words."""
        if self.kind is bool:
            words = "true or false"
        elif self.rule.choices is not None:
            words = self.rule.allowed()
        elif self.kind is int:
            words = f"an integer >= {int(1 if self.rule.minimum is None else self.rule.minimum)}"
            words += "" if self.rule.maximum is None else f" and <= {self.rule.maximum:g}"
        else:
            words = " and ".join(part for part in ("a number", self.rule.allowed()) if part)
        return words + (" (or none)" if self.optional else "")


def declared_parameters(cls) -> Dict[str, Param]:
    """{name: Param} a method class declares (`hyper_parameters`), its bases' included."""
    found: Dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        found.update(klass.__dict__.get("hyper_parameters", {}))
    return found


def parameter_lines(cls, fixed: Optional[Dict[str, Any]] = None) -> List[str]:
    """One line per hyper-parameter a caller may give: name, default, allowed values, help. A
    parameter the class does not declare yet says only its default."""
    declared = declared_parameters(cls)
    lines = []
    for name, parameter in inspect.signature(cls).parameters.items():
        if (
            name in ("bits", "num_train", "num_classes")
            or name in (fixed or {})
            or parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ):
            continue
        default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        line = f"{name}={default}"
        if name in declared:
            line += f": {declared[name].allowed()}" + (f"; {declared[name].help}" if declared[name].help else "")
        lines.append(line)
    return lines


# A method's own random draws (rotations, centres, anchors, samples). The loop fills it with the run's
# --seed unless `-p seed=` gives it (`dmuh.engine.builder.method_params_for`).
SEED = Param(int, Rule(minimum=0), "seed of the random draws")
