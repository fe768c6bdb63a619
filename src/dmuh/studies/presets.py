"""Named lists of methods that `dmuh compare --methods` expands: `paper` (the rows of the DMUH
paper's Tables 4-5) and `anchors` (every supervised deep method registered: the methods a new one
is measured against).

`anchors` is read from the registry, so a method registered later joins it: a method that learns
from labels by gradient on images alone (not shallow, not cross-modal), one entry per distinct
method (an alias such as `regu` of `dpsh`, the same class with the same fixed parameters, counts
once: the first registered), DMUH itself but not its ablations (`dmuh-wo-*`, variants of DMUH's class).
"""

from __future__ import annotations

from typing import Iterable, List

from dmuh.errors import DmuhError
from dmuh.methods import METHODS
from dmuh.studies.paper import PAPER_METHODS


def anchor_methods() -> List[str]:
    """Every supervised deep image method in the registry: DMUH first, then registry order (see the
    module docstring)."""
    dmuh_class = METHODS.entry("dmuh").factory
    seen, names = {(dmuh_class, ())}, ["dmuh"]
    for name, entry in METHODS.entries.items():
        needs = entry.factory.requires
        if not needs.labels or needs.shallow or needs.text:
            continue
        if entry.factory is dmuh_class and entry.fixed:
            continue
        key = (entry.factory, tuple(sorted(entry.fixed.items())))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


PRESETS = {"paper": lambda: list(PAPER_METHODS), "anchors": anchor_methods}


def expand_methods(words: Iterable[str]) -> List[str]:
    """Method names with each preset word replaced by its methods, duplicates dropped (first kept)."""
    names: List[str] = []
    for word in words:
        for name in PRESETS[word]() if word in PRESETS else [word]:
            if name not in names:
                names.append(name)
    if not names:
        raise DmuhError(
            f"--methods: give at least one method or a preset ({', '.join(PRESETS)}), e.g. --methods regu,dmuh"
        )
    return names
