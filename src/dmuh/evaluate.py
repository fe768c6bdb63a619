"""Evaluate a trained run on the split it was trained with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from dmuh.config import TrainConfig, load_yaml
from dmuh.errors import DmuhError
from dmuh.io import atomic_write_text
from dmuh.train import CHECKPOINT, CONFIG, Experiment, build_experiment, encode_part, load_checkpoint, restore_state


def load_run(run: str | Path, device: str = "cpu") -> Experiment:
    """Rebuild a run's experiment (data, saved split, model, method) with its trained weights."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise DmuhError(f"{run}: not a run directory (no {CONFIG})")
    # The checkpoint holds every weight, so the --init weights are not needed (nor read) again.
    config = TrainConfig.from_dict({**load_yaml(run / CONFIG), "device": device, "init": "scratch"}, where=str(run / CONFIG))
    checkpoint = load_checkpoint(run / CHECKPOINT)
    exp = build_experiment(config, run)  # reloads and checks the saved split against the data
    restore_state(exp, checkpoint, run / CHECKPOINT)
    return exp


def evaluate_run(run: str | Path, device: str = "cpu", ties: str = "expected", out: Optional[str] = None) -> Dict[str, Any]:
    from dmuh.codes import sign
    from dmuh.metrics import retrieval_report

    exp = load_run(run, device)
    labels = torch.from_numpy(np.asarray(exp.source.labels))
    query, database = sign(encode_part(exp, "query")), sign(encode_part(exp, "database"))
    # The headline tie mode first; "index" too, as the training log reports it (DPSH's convention).
    modes = [ties] + [mode for mode in ("expected", "index") if mode != ties]
    report = retrieval_report(
        query, database, labels[exp.split.query], labels[exp.split.database],
        topk=exp.split.topk, ties=modes, device=exp.device,
    )
    report = {"run": str(run), "method": exp.config.method, "bits": exp.config.bits, "protocol": exp.split.protocol, **report}
    atomic_write_text(Path(out) if out else Path(run) / "eval.json", json.dumps(report, indent=2))
    return report
