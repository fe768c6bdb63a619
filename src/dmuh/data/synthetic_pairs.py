"""Synthetic image-text pairs from a labeled image set: a generated tag text for every image.

No cross-modal data set can be reached from the machines this project is built on, so cross-modal
methods are tested and compared on CIFAR-10 (or any single-label set) paired with tags drawn from
its labels: a result on these pairs is a *synthetic-pairs* result, not a MIRFlickr or NUS-WIDE one.

Each item's tags, drawn with a seeded generator:
  - its class word, dropped with probability `drop`;
  - each of the class's related words (some shared between classes: "pet" for cat and dog,
    "road" for automobile and truck, "water" for frog and ship) with probability `related`;
  - `noise` words drawn uniformly from a list of words that say nothing about the class;
  - with probability `swap`, the class word and related words come from another class instead
    (a mis-tagged item: its text disagrees with its image and label).
An item never gets an empty text (it gets one noise word at least).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from dmuh.errors import DmuhError

RELATED: Dict[str, Sequence[str]] = {
    "airplane": ("sky", "wing", "jet", "flight", "airport"),
    "automobile": ("car", "road", "wheel", "street", "vehicle"),
    "bird": ("feather", "beak", "tree", "nest", "wing"),
    "cat": ("pet", "fur", "whiskers", "kitten", "indoor"),
    "deer": ("forest", "antler", "wild", "grass", "animal"),
    "dog": ("pet", "puppy", "leash", "fur", "park"),
    "frog": ("pond", "green", "water", "amphibian", "leaf"),
    "horse": ("farm", "saddle", "field", "mane", "animal"),
    "ship": ("sea", "water", "boat", "harbor", "ocean"),
    "truck": ("road", "vehicle", "cargo", "wheel", "highway"),
}
NOISE = (
    "photo",
    "day",
    "light",
    "blue",
    "old",
    "nice",
    "outdoor",
    "color",
    "small",
    "big",
    "morning",
    "summer",
    "winter",
    "white",
    "black",
    "red",
    "view",
    "closeup",
    "travel",
    "family",
    "weekend",
    "sunny",
    "cloudy",
    "evening",
    "city",
    "nature",
    "picture",
    "camera",
    "art",
    "vintage",
)


def tag_texts(
    labels: Sequence[int],
    class_names: Sequence[str],
    seed: int = 0,
    drop: float = 0.3,
    related: float = 0.4,
    noise: int = 3,
    swap: float = 0.1,
) -> List[str]:
    """One generated tag text per item of single-label `labels` (class indices into `class_names`).
    A class without a `RELATED` entry gets its own name's words only."""
    for name, value in (("drop", drop), ("related", related), ("swap", swap)):
        if not 0.0 <= value <= 1.0:
            raise DmuhError(f"{name}={value}: a probability must lie in [0, 1]")
    if noise < 0:
        raise DmuhError(f"noise={noise}: expected a count >= 0")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DmuhError(f"labels: class indices must lie in [0, {len(class_names)})")
    rng = np.random.default_rng(seed)
    words = [name.lower().replace(" ", "_") for name in class_names]
    texts = []
    for label in labels:
        if rng.random() < swap and len(class_names) > 1:
            label = (label + rng.integers(1, len(class_names))) % len(class_names)
        tags = [] if rng.random() < drop else [words[label]]
        tags += [word for word in RELATED.get(class_names[label], ()) if rng.random() < related]
        tags += rng.choice(NOISE, size=max(noise, 0 if tags else 1)).tolist()
        texts.append(" ".join(tags))
    return texts
