"""What a trained run is unsure of: per item, DMUH's image-level uncertainty, its pairwise training
loss and its label, ranked (`dmuh inspect`).

    result = inspect_run("runs/cifar10-dmuh-32", split="train")
    result.write("review/")                      # items.csv, gallery.png, summary.json

Per item of one part of the run's split (train, query or database):

- **uncertainty**: the image-level uncertainty ubar = mean_k |h_k - m_k| (paper Eq. 7) of the
  hashing network h and its momentum copy m (DMUH runs only). Two readings (`reading`):
  `eval` is one pass with both networks in eval mode, the number `dmuh encode --uncertainty`
  stores (weight change only: dropout is off, BatchNorm uses its running statistics);
  `training` is the mean over `passes` passes as the loss sees it
  (`dmuh.engine.builder.training_uncertainty`: batch statistics, and dropout as the method's
  `Requirements.momentum_dropout` reading says), so with dropout in the network it is mostly the disagreement
  of two dropout samples. `auto` (the default) is `training` when the network has dropout and
  the reading gives the two networks different masks (`own` or `off`), else `eval` (then the
  passes would all give the same number).
- **loss**: the DPSH / Regu pairwise negative log-likelihood of the item against the training set,
  unweighted and the same for every method:
      loss_i = mean over training items j != i of [log(1 + e^Theta_ij) - S_ij Theta_ij],
      Theta_ij = h_i . h_j / 2,
  h the continuous codes (`method.continuous_codes`, eval mode, the codes `dmuh evaluate`
  signs), S_ij = 1 when the labels share a class. Training items use the labels the run was
  trained with (after `--label-noise`); query and database items their data labels. DMUH's
  pair weights e^(ubar_i + ubar_j) are left out, so the number means the same for Regu and DMUH.
  Label-free methods (and unlabeled data) have no loss column.
- **label**, and for a run trained with `--label-noise` **original_label** and **flipped**.

With injected noise, `summary.json` also says how well each score ranks the flipped training items
first (`detection_scores`: AUROC and precision among the top 10%).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from dmuh.data.sources import label_text
from dmuh.engine.builder import encode_part, load_run, training_uncertainty
from dmuh.errors import ConfigError, DmuhError, RunError
from dmuh.methods.base import pairwise_similarity
from dmuh.methods.components.memory import pair_nll
from dmuh.retrieval.encoder import load_encoder
from dmuh.runs.layout import CHECKPOINT, run_directory
from dmuh.studies.figures import draw_gallery, new_figure, save_png
from dmuh.studies.options import DEFAULT_PASSES, DEFAULT_TOP, READINGS, SORT_KEYS, SPLITS  # noqa: F401
from dmuh.utils.io import atomic_write_text, refuse_overwrite
from dmuh.utils.progress import progress_bar

TOP_SHARE = 0.1  # detection_scores' precision among the top 10%
ITEMS_CSV, GALLERY_PNG, SUMMARY_JSON = "items.csv", "gallery.png", "summary.json"
OUTPUTS = (ITEMS_CSV, GALLERY_PNG, SUMMARY_JSON)
_LOSS_CHUNK = 1024  # items scored against the training set at a time


# -- scores of a ranking -------------------------------------------------------------------------


def rank_average(*scores: np.ndarray) -> np.ndarray:
    """The mean of the scores' ranks (1 = lowest; ties share their mean rank): a combination that
    needs no common scale."""
    from scipy.stats import rankdata

    return np.mean([rankdata(np.asarray(s, dtype=np.float64)) for s in scores], axis=0)


def detection_scores(score: np.ndarray, positive: np.ndarray, top_share: float = TOP_SHARE) -> Dict[str, float]:
    """How well a score ranks the positives (e.g. flipped labels) first, higher score first:
    AUROC (0.5: chance; ties count half) and the share of positives among the round(top_share n)
    highest scores (ties in item order), next to the positives' base rate."""
    from sklearn.metrics import roc_auc_score

    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    if len(score) != len(positive):
        raise ValueError("detection_scores: score and positive differ in length")
    top = max(1, int(round(top_share * len(score))))
    order = np.argsort(-score, kind="stable")
    both = 0 < positive.sum() < len(positive)
    return {
        "auroc": float(roc_auc_score(positive, score)) if both else math.nan,
        "top_precision": float(positive[order[:top]].mean()) if len(score) else math.nan,
        "top": top,
        "base_rate": float(positive.mean()) if len(score) else math.nan,
    }


def spearman(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Spearman's rank correlation of two scores with its two-sided p-value (scipy)."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return {"rho": math.nan, "p": math.nan}
    result = spearmanr(a, b)
    return {"rho": float(result.statistic), "p": float(result.pvalue)}


# -- the pieces ----------------------------------------------------------------------------------


def has_dropout(network: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in network.modules())


def resolve_reading(reading: str, exp) -> Optional[str]:
    """The reading of `reading` for this run: None without a momentum copy; `auto` resolved."""
    if reading not in READINGS:
        raise ConfigError(f"reading {reading!r}: choose one of {', '.join(READINGS)}", field="reading")
    if exp.momentum is None:
        return None
    if reading != "auto":
        return reading
    noisy = exp.momentum.dropout in ("own", "off") and has_dropout(exp.model)  # the copy's dropout reading
    return "training" if noisy else "eval"


def pairwise_loss(
    codes: torch.Tensor,
    labels: torch.Tensor,
    train_codes: torch.Tensor,
    train_labels: torch.Tensor,
    self_positions: np.ndarray,
    progress=None,
) -> np.ndarray:
    """(m,) mean over training items j of DPSH's pair loss of item i against j (`pair_nll`), leaving
    out j = self_positions[i] (the item itself; -1: not a training item)."""

    n = train_codes.shape[0]
    out = np.empty(codes.shape[0], dtype=np.float64)
    train_labels = train_labels.float()
    for start in range(0, codes.shape[0], _LOSS_CHUNK):
        rows = slice(start, start + _LOSS_CHUNK)
        pair = pair_nll(codes[rows], train_codes, pairwise_similarity(labels[rows].float(), train_labels)).double()
        own = torch.from_numpy(self_positions[rows])
        inside = torch.nonzero(own >= 0).flatten()
        pair[inside, own[inside]] = 0.0
        counts = n - (own >= 0).double()
        out[rows] = (pair.sum(dim=1) / counts.clamp(min=1)).numpy()
        if progress is not None:
            progress(min(start + _LOSS_CHUNK, codes.shape[0]))
    return out


def _stats(values: Optional[np.ndarray]) -> Optional[Dict[str, float]]:
    if values is None:
        return None
    return {
        "min": float(values.min()),
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }


def _cell(value) -> str:
    return "" if value is None else f"{float(value):.9g}"  # 9 digits: a float32 read back exactly


# -- the inspection ------------------------------------------------------------------------------


@dataclass
class Inspection:
    run: Path
    method: str
    split: str
    positions: np.ndarray  # (m,) positions in the split's part
    indices: np.ndarray  # (m,) source indices
    ids: List[str]
    labels: List[str]  # label names (the labels trained with, for training items)
    reading: Optional[str]  # "eval" / "training"; None: no uncertainty
    passes: int
    sort: str
    uncertainty: Optional[np.ndarray] = None  # (m,) float32
    loss: Optional[np.ndarray] = None  # (m,) float64
    flipped: Optional[np.ndarray] = None  # (m,) bool, runs trained with --label-noise
    original_labels: Optional[List[str]] = None
    label_noise: Optional[Dict[str, float]] = None  # rate, seed
    images: Optional[torch.Tensor] = None  # the source's decoded images (CPU), for the gallery; None: vectors
    notes: List[str] = field(default_factory=list)

    @property
    def key(self) -> np.ndarray:
        return self.uncertainty if self.sort == "uncertainty" else self.loss

    def order(self) -> np.ndarray:
        """Item rows by the sort key, highest first (ties by position)."""
        return np.argsort(-np.asarray(self.key, dtype=np.float64), kind="stable")

    def csv_text(self) -> str:
        header = ["rank", "position", "index", "id", "label"]
        if self.flipped is not None:
            header += ["original_label", "flipped"]
        header += [
            name for name, values in (("uncertainty", self.uncertainty), ("loss", self.loss)) if values is not None
        ]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for rank, row in enumerate(self.order(), 1):
            cells = [rank, int(self.positions[row]), int(self.indices[row]), self.ids[row], self.labels[row]]
            if self.flipped is not None:
                cells += [self.original_labels[row], int(self.flipped[row])]
            cells += [_cell(values[row]) for values in (self.uncertainty, self.loss) if values is not None]
            writer.writerow(cells)
        return out.getvalue()

    def detection(self) -> Optional[Dict[str, Dict[str, float]]]:
        """AUROC / top-10% precision of each score for the flipped items (training split of a noisy run)."""
        if self.flipped is None or self.split != "train":
            return None
        scores = {
            name: values
            for name, values in (("uncertainty", self.uncertainty), ("loss", self.loss))
            if values is not None
        }
        if len(scores) == 2:
            scores["rank_average"] = rank_average(scores["uncertainty"], scores["loss"])
        return {name: detection_scores(values, self.flipped) for name, values in scores.items()}

    def summary(self) -> dict:
        report = {
            "run": str(self.run),
            "method": self.method,
            "split": self.split,
            "items": int(len(self.positions)),
            "sort": self.sort,
            "reading": self.reading,
            "passes": self.passes if self.reading == "training" else (1 if self.reading else None),
            "uncertainty": _stats(self.uncertainty),
            "loss": _stats(self.loss),
        }
        if self.uncertainty is not None and self.loss is not None:
            report["spearman_uncertainty_loss"] = spearman(self.uncertainty, self.loss)
        if self.label_noise is not None:
            report["label_noise"] = {
                **self.label_noise,
                "flipped_items": int(self.flipped.sum()),
                "detection": self.detection(),
            }
        report["notes"] = list(self.notes)
        return report

    def gallery(self, top: int):
        """The matplotlib Figure of the `top` highest and lowest items by the sort key, or None for
        feature-vector data (no images)."""

        if self.images is None:
            return None
        order = self.order()
        n = min(top, len(order) // 2) or min(top, len(order))
        if n < top:
            self.notes.append(f"--top {top}: {len(order)} items allow {n} at each end of the gallery")
        high, low = order[:n], order[::-1][:n]

        def row(rows):
            images = self.images[torch.from_numpy(self.indices[rows])].numpy()
            titles = [
                f"{self.key[r]:.3g}\n{self.labels[r]}{'*' if self.flipped is not None and self.flipped[r] else ''}"
                for r in rows
            ]
            return images, titles

        fig = new_figure(max(6.0, 1.1 * n), 3.2)
        star = "; * = flipped label" if self.flipped is not None else ""
        draw_gallery(
            fig,
            [row(high), row(low)],
            f"{self.method} {self.split} items by {self.sort}: highest (top row), lowest (bottom row){star}",
            fontsize=7,
        )
        return fig

    def write(self, out, top: int = DEFAULT_TOP, force: bool = False) -> List[Path]:
        """items.csv, gallery.png (images only) and summary.json in folder `out`, each atomically;
        an existing one needs `force`. Returns the paths written."""

        out = Path(out)
        check_out(out, force)
        written = [out / ITEMS_CSV]
        atomic_write_text(out / ITEMS_CSV, self.csv_text())
        figure = self.gallery(top)
        if figure is not None:
            written.append(save_png(figure, out / GALLERY_PNG))
        elif (out / GALLERY_PNG).exists():  # --force: an earlier gallery of other items must not stay
            (out / GALLERY_PNG).unlink()
        atomic_write_text(out / SUMMARY_JSON, json.dumps(self.summary(), indent=2) + "\n")
        written.append(out / SUMMARY_JSON)
        return written


def check_out(out, force: bool) -> None:
    """--out DIR: a folder (made if missing) none of whose outputs exists, unless `force`."""

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"out {out}: is a file, not a folder", field="out")
    for name in OUTPUTS:
        refuse_overwrite(out / name, force, "--out")


def check_options(
    split: str = "train",
    reading: str = "auto",
    passes: Optional[int] = None,
    sort: Optional[str] = None,
    top: int = DEFAULT_TOP,
) -> None:
    """The options' own checks, before any run is loaded."""
    for value, choices, flag in ((split, SPLITS, "--split"), (reading, READINGS, "--reading")):
        if value not in choices:
            raise DmuhError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
    if sort is not None and sort not in SORT_KEYS:
        raise ConfigError(f"sort {sort!r}: choose one of {', '.join(SORT_KEYS)}", field="sort")
    for value, flag in ((passes, "--passes"), (top, "--top")):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise DmuhError(f"{flag} {value}: expected a positive integer")
    if passes is not None and reading == "eval":
        raise ConfigError(
            "passes applies to --reading training (or auto on a network with dropout); --reading eval is one pass",
            field="passes",
        )


def inspect_run(
    run,
    split: str = "train",
    reading: str = "auto",
    passes: Optional[int] = None,
    sort: Optional[str] = None,
    device: str = "cpu",
    progress: bool = True,
    **data: str,
) -> Inspection:
    """The `Inspection` of one part of a run's split; `data` (data=, data_root=) overrides where
    the run's config says its data is (as `dmuh evaluate --data`)."""

    check_options(split, reading, passes, sort)
    run_dir = run_directory(run, need=(CHECKPOINT,))
    exp = load_run(run_dir, device=device, **data)
    method = exp.config.method
    notes: List[str] = []
    indices = getattr(exp.split, split)
    positions = np.arange(len(indices))
    chosen = resolve_reading(reading, exp)
    if chosen is None:
        if reading != "auto" or passes is not None or sort == "uncertainty":
            raise RunError(
                f"run {run}: method {method!r} keeps no momentum copy, so it has no uncertainty "
                "(--reading, --passes and --sort uncertainty need a DMUH run)",
                field="run",
            )
        notes.append(f"method {method!r} keeps no momentum copy: no uncertainty, items sorted by loss")
    if chosen == "eval" and passes is not None:
        raise ConfigError(
            f"passes {passes}: this run's reading is eval (one pass: the network has no dropout that "
            "differs between the two networks); give --reading training for training-mode passes",
            field="passes",
        )
    passes = passes or DEFAULT_PASSES

    uncertainty = None
    if chosen == "eval":  # exactly `dmuh encode --uncertainty`'s number
        encoder = load_encoder(run_dir, device)
        _, bit_u = encoder.continuous(exp.images[torch.from_numpy(indices)], uncertainty=True)
        uncertainty = bit_u.numpy().mean(axis=1)
    elif chosen == "training":
        torch.manual_seed(0)  # the dropout masks: the same numbers on every call
        inputs = None if split == "train" else exp.images[torch.from_numpy(indices)].to(exp.train_inputs.device)
        with progress_bar(passes, "uncertainty passes", unit="pass", size=len(indices), enabled=progress) as bar:
            bit_u = training_uncertainty(exp, positions, passes, inputs=inputs, progress=lambda: bar.update(1))
        uncertainty = bit_u.numpy().mean(axis=1)

    labeled = exp.source.labeled and exp.train_labels.shape[1] > 0
    source_labels = np.asarray(exp.source.labels) if exp.source.labeled else None
    train_position = np.full(len(exp.source), -1, dtype=np.int64)  # source index -> training position, or -1
    train_position[exp.split.train] = np.arange(len(exp.split.train))
    if split == "train" and labeled:
        item_labels = exp.train_labels.cpu()
    elif labeled:
        item_labels = torch.from_numpy(source_labels[indices]).float()
    loss = None
    if labeled:
        codes = encode_part(exp, split)
        train_codes = codes if split == "train" else encode_part(exp, "train")
        with progress_bar(len(indices), "pairwise loss", size=len(indices), enabled=progress) as bar:
            loss = pairwise_loss(
                codes,
                item_labels,
                train_codes,
                exp.train_labels.cpu(),
                train_position[indices],
                progress=lambda done: bar.update(done - bar.n),
            )
    elif not exp.source.labeled:
        notes.append(f"--data {exp.config.data} has no labels: no loss column")
    else:
        notes.append(f"method {method!r} learns without labels: no loss column")
    if uncertainty is None and loss is None:
        raise RunError(
            f"run {run}: nothing to inspect: method {method!r} keeps no momentum copy (no uncertainty) "
            "and the run has no labels (no loss)",
            field="run",
        )
    if sort is None:
        sort = "uncertainty" if uncertainty is not None else "loss"
    if sort == "loss" and loss is None:
        raise ConfigError(f"sort loss: the run has no loss column ({notes[-1]})", field="sort")

    class_names = getattr(exp.source, "class_names", None)
    if labeled:
        labels = label_text(item_labels.numpy(), class_names)
    elif exp.source.labeled:
        labels = label_text(source_labels[indices], class_names)
    else:
        labels = [""] * len(indices)
    result = Inspection(
        run_dir,
        method,
        split,
        positions,
        indices,
        [str(exp.source.ids[i]) for i in indices],
        labels,
        chosen,
        passes,
        sort,
        uncertainty=uncertainty,
        loss=loss,
        notes=notes,
        images=exp.images if exp.images.dim() == 4 else None,
    )
    noise = exp.label_noise
    if noise is not None:
        flipped_train = noise.mask(len(exp.split.train))
        result.label_noise = {"rate": noise.rate, "seed": noise.seed}
        where = train_position[indices]
        result.flipped = np.where(where >= 0, flipped_train[np.maximum(where, 0)], False)
        result.original_labels = label_text(source_labels[indices], class_names)
    if result.images is None:
        notes.append("feature-vector data (no images): no gallery; items.csv names each item by its id")
    return result
