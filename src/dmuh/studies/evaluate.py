"""Evaluate a trained run on the split it was trained with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from dmuh.codes.binary import sign
from dmuh.engine.builder import encode_part, encode_text_part, load_run
from dmuh.errors import DataError, DmuhError
from dmuh.metrics.ranking import DEFAULT_TIES, retrieval_report
from dmuh.runs.layout import EVAL
from dmuh.utils.io import atomic_write_text


def evaluate_run(
    run: str | Path, device: str = "cpu", ties: str = DEFAULT_TIES, out: Optional[str] = None, **data: str
) -> Dict[str, Any]:
    """Every metric of a run on its saved split, written to `out` (else RUN/eval.json); `data`
    (data=, data_root=) reads the run's data from elsewhere (the split's fingerprint must match)."""
    exp = load_run(run, device, **data)
    if not exp.source.labeled:
        if data.get("data"):
            raise DataError(
                f"data {data['data']}: has no labels, so retrieval has nothing to be scored against; "
                "give the same items read with their labels",
                field="data",
            )
        raise DmuhError(
            f"{run}: its data {exp.config.data} has no labels, so retrieval has nothing to be scored "
            "against; pass --data with the same items read with their labels (for an unlabeled "
            "reading of a class-folder tree, the tree itself)"
        )
    labels = torch.from_numpy(np.asarray(exp.source.labels))
    # The headline tie mode first; "index" too (DPSH's convention, what earlier dmuh logs report).
    modes = [ties] + [mode for mode in (DEFAULT_TIES, "index") if mode != ties]

    def scored(query, database):
        return retrieval_report(
            sign(query),
            sign(database),
            labels[exp.split.query],
            labels[exp.split.database],
            topk=exp.split.topk,
            ties=modes,
            device=exp.device,
            progress=True,  # a bar for a large database (dmuh.utils.progress)
        )

    head = {"run": str(run), "method": exp.config.method, "bits": exp.config.bits, "protocol": exp.split.protocol}
    images = encode_part(exp, "query"), encode_part(exp, "database")
    if exp.requirements.text:  # cross-modal: image queries against the database's texts, and the reverse
        texts = encode_text_part(exp, "query"), encode_text_part(exp, "database")
        report = {**head, "directions": {"i2t": scored(images[0], texts[1]), "t2i": scored(texts[0], images[1])}}
    else:
        report = {**head, **scored(*images)}
    atomic_write_text(Path(out) if out else Path(run) / EVAL, json.dumps(report, indent=2))
    return report
