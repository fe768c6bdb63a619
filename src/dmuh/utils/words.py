"""Words for what dmuh prints: counts with the right grammatical number."""

from __future__ import annotations

from typing import Optional


def plural(count: int, word: str, words: Optional[str] = None) -> str:
    """ "1 image", "2 images", "0 images" (`words` for an irregular plural: plural(n, "query", "queries"))."""
    return f"{count} {word if count == 1 else (words or word + 's')}"
