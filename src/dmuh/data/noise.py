"""Synthetic label noise: flip a seeded share of single-label training labels to another class.

    noisy, flipped = flip_labels(labels, rate=0.2, seed=0)   # labels (n, C) multi-hot, one 1 a row

Exactly round(rate * n) items are flipped (a seeded choice without replacement), and each flipped
item gets a class drawn uniformly from the C - 1 classes other than its own (symmetric noise), so
no "flip" ever keeps the label. Multi-label data is refused: a flip of one class among several has
no single meaning. `dmuh train --label-noise RATE --label-noise-seed S` applies it to the
training split and records it in the run (`LabelNoise`, RUN/label_noise.json, `dmuh.runs.layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np

from dmuh.errors import ConfigError, DmuhError
from dmuh.utils.io import atomic_write_text, index_list, read_json_record

NOISE_FORMAT = "dmuh-label-noise"
NOISE_VERSION = 1


def single_label_classes(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    """(n,) class index of each row of an (n, C) multi-hot matrix with exactly one 1 a row."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DmuhError(f"{what}: expected an (n, C) label matrix, got shape {labels.shape}")
    counts = (labels != 0).sum(axis=1)
    bad = np.flatnonzero(counts != 1)
    if bad.size:
        row = int(bad[0])
        raise DmuhError(
            f"{what}: label noise flips single-label classes, and item {row} has {int(counts[row])} "
            "labels (multi-label or unlabeled data)"
        )
    return (labels != 0).argmax(axis=1)


def flip_labels(labels: np.ndarray, rate: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(noisy labels, like `labels`; flipped row positions, ascending): round(rate * n) rows of the
    single-label (n, C) matrix `labels` moved to a class drawn uniformly among the other C - 1."""
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"label_noise {rate:g}: expected a share between 0 and 1", field="label_noise")
    labels = np.asarray(labels)
    classes = single_label_classes(labels)
    n, num_classes = labels.shape
    count = int(round(rate * n))
    if count and num_classes < 2:
        raise ConfigError(
            "label_noise: a label can only be flipped to another class, and the data has one class", field="label_noise"
        )
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)
    # A shift of 1..C-1 classes (uniform): every other class equally likely, never the same one.
    new = (classes[flipped] + rng.integers(1, num_classes, size=count)) % num_classes if count else classes[flipped]
    noisy = np.zeros_like(labels)
    noisy[np.arange(n), classes] = 1
    noisy[flipped] = 0
    noisy[flipped, new] = 1
    return noisy, flipped


@dataclass(eq=False)
class LabelNoise:
    """The flips a run was trained with: training-split positions and their original / noisy class."""

    rate: float
    seed: int
    positions: np.ndarray  # (k,) int64, positions in the training split, ascending
    original: np.ndarray  # (k,) int64 class indices
    noisy: np.ndarray  # (k,) int64 class indices

    @classmethod
    def make(cls, labels: np.ndarray, rate: float, seed: int) -> "LabelNoise":
        classes = single_label_classes(labels, "training labels")
        noisy, positions = flip_labels(labels, rate, seed)
        return cls(float(rate), int(seed), positions, classes[positions], np.asarray(noisy)[positions].argmax(axis=1))

    def apply(self, labels: np.ndarray, where: str = "label noise") -> np.ndarray:
        """`labels` (n, C) with the recorded flips; refused when they are not the labels it was made for."""
        labels = np.asarray(labels)
        classes = single_label_classes(labels, "training labels")
        if len(self.positions) and (
            self.positions.max() >= len(labels) or not np.array_equal(classes[self.positions], self.original)
        ):
            raise DmuhError(f"{where}: recorded for other training labels than the data's (was the data changed?)")
        noisy = labels.copy()
        noisy[self.positions] = 0
        noisy[self.positions, self.noisy] = 1
        return noisy

    def mask(self, count: int) -> np.ndarray:
        """(count,) bool: True at the flipped training positions."""
        out = np.zeros(count, dtype=bool)
        out[self.positions] = True
        return out

    def save(self, path) -> None:
        record = {
            "format": NOISE_FORMAT,
            "version": NOISE_VERSION,
            "rate": self.rate,
            "seed": self.seed,
            "count": int(len(self.positions)),
            "positions": self.positions.tolist(),
            "original": self.original.tolist(),
            "noisy": self.noisy.tolist(),
        }
        atomic_write_text(path, json.dumps(record, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path) -> "LabelNoise":
        path = Path(path)
        record = read_json_record(path, NOISE_FORMAT, NOISE_VERSION, "label-noise record")
        arrays = {key: index_list(record, key, path) for key in ("positions", "original", "noisy")}
        if not len(arrays["positions"]) == len(arrays["original"]) == len(arrays["noisy"]) == record.get("count"):
            raise DmuhError(f"{path}: fields 'positions', 'original', 'noisy' and 'count' disagree in length")
        if np.any(arrays["original"] == arrays["noisy"]):
            raise DmuhError(f"{path}: a recorded flip keeps its class")
        rate, seed = record.get("rate"), record.get("seed")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or type(seed) is not int:
            raise DmuhError(f"{path}: fields 'rate' (a number) and 'seed' (an integer) are required")
        if not 0 <= rate <= 1 or not 0 <= seed < 2**63:
            raise DmuhError(f"{path}: field 'rate' must be in [0, 1] and 'seed' from 0 to 2**63 - 1")
        return cls(float(rate), seed, **arrays)
