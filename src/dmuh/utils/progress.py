"""Progress bars for the steps that can take more than a few seconds: decoding a whole image
source, batched inference, the MAP pass over a large database, encoding a collection.

A bar is drawn on stderr by tqdm only for more than `MIN_ITEMS` items, only when stderr is a
terminal (tqdm's `disable=None`), on rank 0 only under torchrun, and never after `set_quiet(True)`:
`dmuh.cli.main` sets it from a command's --quiet.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from tqdm.auto import tqdm

MIN_ITEMS = 5000  # fewer items than this take a few seconds at most: no bar

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Hide (True) or allow (False) every bar of this process."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def progress_bar(
    total: int,
    desc: str,
    unit: str = "item",
    size: Optional[int] = None,
    enabled: Optional[bool] = None,
    unit_scale: bool = False,
) -> tqdm:
    """A tqdm bar over `total` units, shown when `size` (default `total`) items exceed
    `MIN_ITEMS`, stderr is a terminal and neither `enabled=False` nor `set_quiet` hides it.
    Use it as a context manager, or call close()."""
    hidden = (
        _quiet
        or enabled is False
        or (size if size is not None else total) <= MIN_ITEMS
        or os.environ.get("RANK", "0") != "0"
    )
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        leave=False,
        file=sys.stderr,
        disable=True if hidden else None,
        dynamic_ncols=True,
    )
