"""The names of the files in a run directory (one place; `dmuh.runs.layout` reads and writes them),
and finding a run directory by them. No torch here: search and index commands that run no network
find a run through this module alone."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dmuh.errors import DmuhError

CONFIG = "config.yaml"
SPLIT = "split.json"
LOG = "log.csv"
CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # a pickle (torch.save), before dmuh.runs.checkpoint; converted, never loaded
CHECKPOINT_KIND = "checkpoint"
BACKBONE_KIND = "backbone"
TRACE = "uncertainty_trace.npz"
BACKBONE = "backbone.safetensors"
EVAL = "eval.json"
LABEL_NOISE = "label_noise.json"
FEATURE_BACKBONE = "feature_backbone.json"  # the backbone of the features a run trained on (dmuh.retrieval.backbone)
VOCABULARY = "vocabulary.json"  # the words of a cross-modal run's text vectors (dmuh.data.paired.Vocabulary)


def legacy_checkpoint_message(run_dir) -> str:
    return (
        f"{Path(run_dir) / LEGACY_CHECKPOINT} is an old-format checkpoint (a pickle); convert it once with: "
        f"dmuh convert-checkpoint --run {run_dir}"
    )


def run_directory(run, flag: str = "--run", need: Sequence[str] = ()) -> Path:
    """A run directory (or the checkpoint.safetensors or old checkpoint.pt inside one) holding
    config.yaml and the files in `need`, or a one-line DmuhError naming the flag."""
    path = Path(run)
    if path.is_file() and path.name in (CHECKPOINT, LEGACY_CHECKPOINT):
        path = path.parent
    if not (path / CONFIG).is_file():
        raise DmuhError(f"{flag} {run}: not a run directory (no {CONFIG}); pass the directory `dmuh train --out` wrote")
    for name in need:
        if not (path / name).is_file():
            if name == CHECKPOINT and (path / LEGACY_CHECKPOINT).is_file():
                raise DmuhError(legacy_checkpoint_message(path))
            raise DmuhError(f"{flag} {run}: no {name} in the run directory")
    return path
