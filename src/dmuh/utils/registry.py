"""Names -> factories, one class for models and methods alike (timm's `register_model` idea).

An entry is a factory plus `fixed` keyword arguments: `@METHODS.register("dmuh-wo-u",
uncertainty_term=False)` registers a variant of the same class. One rule for every registry: an
option the caller gives must be one the factory takes, and giving a variant's fixed option is an
error that names it (it would otherwise be ignored without a word, or silently win).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from dmuh.errors import DmuhError


@dataclass(frozen=True)
class Entry:
    """One registered name."""

    name: str
    factory: Callable[..., Any]  # a class or a function
    fixed: Dict[str, Any] = field(default_factory=dict)
    display_name: str = ""  # how papers write it (tables); the name when empty

    def options(self, reserved: Iterable[str] = ()) -> List[str]:
        """Keyword arguments a caller may give (the factory's, less the fixed and `reserved` ones)."""
        target = self.factory.__init__ if inspect.isclass(self.factory) else self.factory
        names = set(inspect.signature(target).parameters) - {"self", "args", "kwargs"}
        return sorted(names - set(self.fixed) - set(reserved))


class Registry:
    """A named collection of factories of one kind ("model", "method")."""

    def __init__(self, kind: str, option_word: str = "option"):
        self.kind = kind
        self.option_word = option_word  # what the error messages call an option ("parameter" for methods)
        self.entries: Dict[str, Entry] = {}

    def register(self, name: str, *, display_name: Optional[str] = None, **fixed):
        """Decorator registering a class or function under `name`, with `fixed` options. Stack it for variants."""

        def decorate(factory):
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self.entries[name] = Entry(name, factory, dict(fixed), display_name or name)
            return factory

        return decorate

    def names(self) -> List[str]:
        return sorted(self.entries)

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            guess = self.suggestion(name)
            hint = f" (did you mean {guess!r}?)" if guess else ""
            raise DmuhError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(self.names())}")
        return self.entries[name]

    def suggestion(self, name: str) -> Optional[str]:
        """The registered name a mistyped one most likely meant: the same name in another case, else the
        closest spelling (difflib), else None."""
        folded = [known for known in self.entries if known.casefold() == str(name).casefold()]
        if folded:
            return folded[0]
        close = difflib.get_close_matches(str(name).lower(), list(self.entries), n=1, cutoff=0.75)
        return close[0] if close else None

    def check_options(self, name: str, options: Iterable[str], reserved: Iterable[str] = ()) -> Entry:
        """The entry of `name`, after refusing a fixed or unknown option with a message naming it."""
        entry = self.entry(name)
        accepted = entry.options(reserved)
        for option in options:
            if option in entry.fixed:
                raise DmuhError(f"{self.kind} {name!r} fixes {option}={entry.fixed[option]!r}; it cannot be changed")
            if option not in accepted:
                raise DmuhError(
                    f"{self.kind} {name!r} has no {self.option_word} {option!r}; "
                    f"it takes: {', '.join(accepted) or 'none'}"
                )
        return entry

    def create(self, name: str, reserved: Dict[str, Any], options: Dict[str, Any]):
        """factory(**reserved, **options, **fixed); `reserved` are the arguments every entry takes
        (e.g. bits), never checked against the option list."""
        entry = self.check_options(name, options, reserved)
        return entry.factory(**reserved, **options, **entry.fixed)

    def display_name(self, name: str) -> str:
        entry = self.entries.get(name)
        return entry.display_name if entry is not None else name
