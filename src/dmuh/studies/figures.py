"""The paper's figures from run directories: the numbers (for tests and tables) and the PNGs.

    uncertainty_figure(run)   Fig. 1: two bits' outputs over epochs (uncertainty_trace.npz) and a
                              gallery of the lowest- / highest-uncertainty training images
    curves_figure(runs)       Fig. 3: loss, train MAP and test MAP per epoch (log.csv)
    topk_figure(runs)         Fig. 4: precision of the top k on the saved split (checkpoint.safetensors)

Each returns a dataclass holding the numbers, with `.markdown()` (the tables) and `.draw()` (a
matplotlib Figure, Agg canvas, never shown); `write_figure` writes both atomically. Drawing uses
`matplotlib.figure.Figure` directly, so no global pyplot state or backend is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dmuh.codes.binary import sign
from dmuh.data.sources import label_text
from dmuh.engine import builder as experiment
from dmuh.engine.builder import encode_part, load_run
from dmuh.errors import ConfigError, DmuhError, RunError
from dmuh.metrics.ranking import DEFAULT_TIES, precision_at_k
from dmuh.runs.layout import CHECKPOINT, CONFIG, LOG, TRACE, read_log, run_directory
from dmuh.utils.io import atomic_path, atomic_write_text, check_array_file, refuse_overwrite
from dmuh.utils.schema import load_yaml
from dmuh.utils.words import plural

TABLE_KS = (1, 10, 100, 500, 1000, 5000)  # the P@k columns of `dmuh figure topk`'s table
SPACINGS = ("linear", "log")
U_DIGITS = 6  # decimals of outputs and uncertainties in `figure uncertainty`'s tables (u of short runs is small)


# -- shared pieces ------------------------------------------------------------------------------


def _method_name(run_dir: Path) -> str:

    return str(load_yaml(run_dir / CONFIG).get("method", "?"))


def _label(method: str, run_dir: Path) -> str:
    return f"{method} ({run_dir})"


def _fmt(value, digits: int = 4) -> str:
    """A number as the tables print it: 4 decimals; NaN or None as "n/a"."""
    if value is None or math.isnan(float(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def output_paths(out: Optional[str], first_run, name: str) -> Tuple[Path, Path]:
    """(PREFIX.png, PREFIX.md): `--out PREFIX`, or RUN/figure-NAME next to the first run."""
    if out:
        prefix = Path(out)
        if prefix.suffix.lower() in (".png", ".md"):
            prefix = prefix.with_suffix("")
    else:
        run = Path(first_run)
        run = run.parent if run.is_file() else run
        prefix = run / f"figure-{name}"
    return prefix.with_name(prefix.name + ".png"), prefix.with_name(prefix.name + ".md")


def check_outputs(png: Path, md: Path, force: bool) -> None:
    """Refuse (one-line DmuhError naming --out) when either output exists and --force is not given."""
    refuse_overwrite(png, force, "--out")
    refuse_overwrite(md, force, "--out")


def write_figure(figure, png, md, force: bool = False) -> Tuple[Path, Path]:
    """Draw `figure` (an *Figure dataclass) to `png` and its tables to `md`, each atomically."""
    png, md = Path(png), Path(md)
    check_outputs(png, md, force)
    save_png(figure.draw(), png)
    atomic_write_text(md, figure.markdown())
    return png, md


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colours(n: int) -> List:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# -- Fig. 1: bit-level and image-level uncertainty -----------------------------------------------


def read_trace(run_dir: Path) -> Dict[str, np.ndarray]:
    """uncertainty_trace.npz: items (T,), epochs (E,), hashing and momentum (E, T, bits)."""
    path = Path(run_dir) / TRACE
    check_array_file(path, "uncertainty trace")
    try:
        with np.load(path, allow_pickle=False) as f:
            trace = {key: np.asarray(f[key]) for key in ("items", "epochs", "hashing", "momentum")}
    except (OSError, ValueError, KeyError) as exc:
        raise DmuhError(f"{path}: not a readable uncertainty trace ({exc})") from None
    if (
        trace["hashing"].ndim != 3
        or trace["hashing"].shape != trace["momentum"].shape
        or trace["hashing"].shape[0] == 0
    ):
        raise DmuhError(f"{path}: hashing and momentum must both be (epochs, items, bits) with at least one epoch")
    return trace


def bit_change(hashing: np.ndarray) -> np.ndarray:
    """(bits,) how much each bit's output moved: the mean over trace items and consecutive epochs of
    |h[e+1] - h[e]| (zeros with a single epoch)."""
    if hashing.shape[0] < 2:
        return np.zeros(hashing.shape[2])
    return np.abs(np.diff(hashing, axis=0)).mean(axis=(0, 1))


def choose_bits(hashing: np.ndarray, count: int = 2) -> Tuple[List[int], List[str]]:
    """The ceil(count/2) bits whose output changed most and the floor(count/2) that changed least
    (Fig. 1's bit-1 and bit-2), most-changing first: (bits, roles)."""
    change = bit_change(hashing)
    most = [int(b) for b in np.argsort(-change, kind="stable")[: (count + 1) // 2]]
    least = [int(b) for b in np.argsort(change, kind="stable") if int(b) not in most][: count // 2]
    return most + least[::-1], ["most-changing"] * len(most) + ["least-changing"] * len(least)


@dataclass
class UncertaintyFigure:
    run: Path
    method: str
    epochs: np.ndarray  # (E,)
    items: np.ndarray  # (T,) training-split positions of the trace items
    hashing: np.ndarray  # (E, T, bits)
    momentum: np.ndarray  # (E, T, bits)
    bits: List[int]  # the bits shown, most-changing first
    roles: List[str]
    change: np.ndarray  # (bits,) bit_change of every bit
    shown: np.ndarray  # indices into `items` of the trace items plotted
    passes: int
    image_uncertainty: np.ndarray  # (n_train,) mean over bits of training_uncertainty
    gallery_low: np.ndarray  # training-split positions, lowest uncertainty first
    gallery_high: np.ndarray  # highest uncertainty last
    images: Optional[np.ndarray] = None  # (n, C, H, W) uint8 of low then high; None: no gallery
    labels: List[str] = field(default_factory=list)  # class names of low then high
    source_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    notes: List[str] = field(default_factory=list)

    @property
    def final_uncertainty(self) -> np.ndarray:
        """(T, bits) |h - m| after the last traced epoch."""
        return np.abs(self.hashing[-1] - self.momentum[-1])

    def summary(self) -> Dict[str, float]:
        u = self.image_uncertainty
        return {"min": float(u.min()), "median": float(np.median(u)), "max": float(u.max())}

    def markdown(self) -> str:
        final = self.final_uncertainty
        last = int(self.epochs[-1])
        out = [
            f"# Bit- and image-level uncertainty (Fig. 1): {self.method} ({self.run})",
            "",
            f"From {self.run / TRACE}: {plural(len(self.items), 'trace item')}, {plural(len(self.epochs), 'epoch')} "
            f"({int(self.epochs[0])}..{last}), {self.hashing.shape[2]} bits. u = |h - m| per bit "
            "(h the hashing network's output, m the momentum copy's).",
            "",
            "## Bits shown",
            "",
            _table(
                ["bit", "role", "mean abs change per epoch", f"mean u at epoch {last} (all trace items)"],
                [
                    [b, r, _fmt(self.change[b]), _fmt(final[:, b].mean(), U_DIGITS)]
                    for b, r in zip(self.bits, self.roles)
                ],
            ),
            "",
            f"## Final-epoch outputs of the plotted trace items (epoch {last})",
            "",
            _table(
                ["bit", "trace item", "train position", "h", "m", "u"],
                [
                    [
                        b,
                        int(t),
                        int(self.items[t]),
                        _fmt(self.hashing[-1, t, b], U_DIGITS),
                        _fmt(self.momentum[-1, t, b], U_DIGITS),
                        _fmt(final[t, b], U_DIGITS),
                    ]
                    for b in self.bits
                    for t in self.shown
                ],
            ),
            "",
            "## Image-level uncertainty of the training items",
            "",
            f"Mean over bits of `dmuh.engine.builder.training_uncertainty` (passes={self.passes}) for all "
            f"{len(self.image_uncertainty)} training items, from the run's {CHECKPOINT}.",
            "",
            _table(["statistic", "value"], [[k, _fmt(v, U_DIGITS)] for k, v in self.summary().items()]),
        ]
        if self.images is not None and len(self.source_indices):
            positions = np.concatenate([self.gallery_low, self.gallery_high])
            groups = ["lowest"] * len(self.gallery_low) + ["highest"] * len(self.gallery_high)
            out += [
                "",
                "## Gallery",
                "",
                _table(
                    ["group", "train position", "source index", "label", "image uncertainty"],
                    [
                        [g, int(p), int(s), lab, _fmt(self.image_uncertainty[p], U_DIGITS)]
                        for g, p, s, lab in zip(groups, positions, self.source_indices, self.labels)
                    ],
                ),
            ]
        if self.notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def draw(self):
        gallery = self.images is not None and len(self.source_indices) > 0
        columns = max(len(self.gallery_low), len(self.gallery_high)) if gallery else 0
        width = max(4.0 * len(self.bits), 1.3 * columns, 6.0)
        fig = new_figure(width, 3.4 + (2.8 if gallery else 0))
        top, bottom = fig.subfigures(2, 1, height_ratios=[3.4, 2.8]) if gallery else (fig, None)
        axes = np.atleast_1d(top.subplots(1, len(self.bits), squeeze=False)[0])
        colours = _colours(len(self.shown))
        final = self.final_uncertainty
        for ax, b, role in zip(axes, self.bits, self.roles):
            for colour, t in zip(colours, self.shown):
                ax.plot(
                    self.epochs,
                    self.hashing[:, t, b],
                    "-o",
                    color=colour,
                    markersize=3,
                    label=f"item {int(self.items[t])} h",
                )
                ax.plot(self.epochs, self.momentum[:, t, b], "--", color=colour, label=f"item {int(self.items[t])} m")
            ax.set_title(f"bit {b} ({role}); final mean u = {final[:, b].mean():.4f}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("approximate real value")
            _integer_ticks(ax)
        axes[0].legend(fontsize=6, ncol=2)
        if gallery:
            low = len(self.gallery_low)
            draw_gallery(
                bottom,
                [
                    (self.images[:low], [f"{self.image_uncertainty[p]:.3g}" for p in self.gallery_low]),
                    (self.images[low:], [f"{self.image_uncertainty[p]:.3g}" for p in self.gallery_high]),
                ],
                "image-level uncertainty: lowest (top row), highest (bottom row)",
            )
        if self.notes:
            top.suptitle("; ".join(self.notes), fontsize=7)
        return fig


def draw_gallery(container, rows: Sequence[Tuple[np.ndarray, Sequence[str]]], title: str, fontsize: int = 8) -> None:
    """Rows of images ((n, C, H, W) uint8, grey or RGB), each image titled, on a matplotlib Figure
    or SubFigure; shorter rows leave their last cells blank (Fig. 1's gallery, `dmuh inspect`'s)."""
    columns = max((len(images) for images, _ in rows), default=0)
    grid = container.subplots(len(rows), max(columns, 1), squeeze=False)
    for r, (images, titles) in enumerate(rows):
        for c in range(max(columns, 1)):
            ax = grid[r, c]
            ax.axis("off")
            if c >= len(images):
                continue
            image = images[c]
            if image.shape[0] == 1:
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(np.transpose(image, (1, 2, 0)))
            ax.set_title(titles[c], fontsize=fontsize)
    container.suptitle(title, fontsize=9)


def save_png(figure, path) -> Path:
    """A matplotlib Figure (Agg canvas) written to `path` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return Path(path)


def uncertainty_figure(
    run, bits_shown: int = 2, gallery: int = 8, passes: int = 1, items_shown: int = 4, device: str = "cpu"
) -> UncertaintyFigure:
    """Fig. 1 of a DMUH run: the trace's most- and least-changing bits, and the training items of
    lowest and highest image-level uncertainty (`dmuh.engine.builder.training_uncertainty`)."""

    for value, flag in ((bits_shown, "--bits-shown"), (passes, "--passes"), (items_shown, "--items")):
        if value < 1:
            raise DmuhError(f"{flag} {value}: expected a positive integer")
    if gallery < 0:
        raise ConfigError(f"gallery {gallery}: expected 0 or more", field="gallery")
    run_dir = run_directory(run, need=(CHECKPOINT,))
    method = _method_name(run_dir)
    if not (run_dir / TRACE).is_file():
        if load_yaml(run_dir / CONFIG).get("trace_items", 1) == 0:
            raise RunError(f"run {run}: no {TRACE}: the run was trained with trace_items=0", field="run")
        raise RunError(
            f"run {run}: no {TRACE}: method {method!r} keeps no momentum copy; "
            "`dmuh figure uncertainty` needs a DMUH run",
            field="run",
        )
    trace = read_trace(run_dir)
    bits = trace["hashing"].shape[2]
    if bits_shown > bits:
        raise ConfigError(f"bits_shown {bits_shown}: the trace has {bits} bits", field="bits_shown")
    exp = experiment.load_run(run_dir, device=device)
    if exp.momentum is None:
        raise RunError(
            f"run {run}: method {method!r} keeps no momentum copy; `dmuh figure uncertainty` needs a DMUH run",
            field="run",
        )
    chosen, roles = choose_bits(trace["hashing"], bits_shown)
    notes = []
    if len(trace["epochs"]) < 2:
        notes.append("the trace holds one epoch: bits cannot be ranked by change")
    positions = np.arange(len(exp.split.train))
    notes.append(
        f"image uncertainty: the training reading (dropout and batch statistics as the loss saw them), "
        f"{passes} pass(es) averaged; `dmuh inspect` defaults to 8 passes, or one eval-mode pass (--reading eval), "
        "so its values for the same items differ"
    )
    u = experiment.training_uncertainty(exp, positions, passes=passes)
    image_u = u.detach().float().cpu().numpy().astype(np.float64).mean(axis=1)
    n = min(gallery, len(image_u) // 2)
    if n < gallery:
        notes.append(f"--gallery {gallery}: {len(image_u)} training items allow {n} of each")
    order = np.argsort(image_u, kind="stable")
    low, high = order[:n], order[len(order) - n :]
    figure = UncertaintyFigure(
        run_dir,
        method,
        trace["epochs"],
        trace["items"],
        trace["hashing"],
        trace["momentum"],
        chosen,
        roles,
        bit_change(trace["hashing"]),
        np.arange(min(items_shown, len(trace["items"]))),
        passes,
        image_u,
        low,
        high,
        notes=notes,
    )
    if exp.images.dim() != 4:
        notes.append("feature-vector source (no images): gallery skipped")
    elif n == 0:
        notes.append("--gallery 0: gallery skipped")
    else:
        shown = np.concatenate([low, high])
        figure.source_indices = exp.split.train[shown]
        figure.images = exp.images[figure.source_indices].numpy()
        labels = np.asarray(exp.source.labels)[figure.source_indices]
        figure.labels = label_text(labels, getattr(exp.source, "class_names", None))
    return figure


# -- Fig. 3: loss and MAP curves ----------------------------------------------------------------


@dataclass
class RunCurves:
    run: Path
    method: str
    rows: List[Dict[str, float]]  # log.csv as read_log returns it
    has_train_map: bool

    @property
    def label(self) -> str:
        return _label(self.method, self.run)

    def column(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of the rows where `key` holds a number."""
        pairs = [(r["epoch"], r[key]) for r in self.rows if isinstance(r.get(key), float) and not math.isnan(r[key])]
        return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.float64)

    def evaluated(self) -> List[Dict[str, float]]:
        """The rows of evaluated epochs (a test MAP, or a train MAP, in the row)."""

        def has(row, key):
            return isinstance(row.get(key), float) and not math.isnan(row[key])

        return [r for r in self.rows if has(r, "map") or has(r, "train_map")]


@dataclass
class CurvesFigure:
    runs: List[RunCurves]

    @property
    def notes(self) -> List[str]:
        return [
            f"{r.run / LOG} has no train_map column: train MAP not plotted for {r.label}"
            for r in self.runs
            if not r.has_train_map
        ]

    def markdown(self) -> str:
        out = [
            "# Loss and MAP per epoch (Fig. 3)",
            "",
            f"Numbers from each run's {LOG}, rounded to 4 decimals; `map` is the test MAP (query vs "
            "database) with the tie policy in `ties`, `train_map` the MAP of a fixed subset of training "
            "items against the training split.",
        ]
        for i, r in enumerate(self.runs, 1):
            ties = sorted({row.get("ties") or "" for row in r.evaluated()} - {""})
            out += [
                "",
                f"## Run {i}: {r.method} ({r.run})",
                "",
                f"tie policy of map: {', '.join(ties) if ties else 'not recorded'}",
                "",
            ]
            if not r.has_train_map:
                out += [f"note: {r.run / LOG} has no train_map column (train MAP not plotted)", ""]
            out.append(
                _table(
                    ["epoch", "loss", "train_map", "map", "ties"],
                    [
                        [
                            row["epoch"],
                            _fmt(row.get("loss")),
                            _fmt(row.get("train_map")),
                            _fmt(row.get("map")),
                            row.get("ties") or "n/a",
                        ]
                        for row in r.evaluated()
                    ],
                )
            )
        return "\n".join(out) + "\n"

    def draw(self):
        fig = new_figure(11, 4)
        loss_ax, map_ax = fig.subplots(1, 2)
        for colour, r in zip(_colours(len(self.runs)), self.runs):
            loss_ax.plot(*r.column("loss"), "-", color=colour, label=r.label)
            if r.has_train_map:
                map_ax.plot(*r.column("train_map"), "-o", color=colour, markersize=3, label=f"{r.label} train")
            map_ax.plot(*r.column("map"), "--s", color=colour, markersize=3, label=f"{r.label} test")
        loss_ax.set(title="loss", xlabel="epoch", ylabel="loss")
        map_ax.set(title="MAP (train solid, test dashed)", xlabel="epoch", ylabel="MAP")
        _integer_ticks(loss_ax)
        _integer_ticks(map_ax)
        loss_ax.legend(fontsize=7)
        map_ax.legend(fontsize=7)
        if self.notes:
            fig.suptitle("; ".join(self.notes), fontsize=7)
        return fig


def curves_figure(runs: Sequence) -> CurvesFigure:
    """Fig. 3 of one or more runs, from their log.csv."""
    if not runs:
        raise RunError(
            "run RUN is required (the run directory `dmuh train --out` wrote); repeat it to compare runs", field="run"
        )
    curves = []
    for run in runs:
        run_dir = run_directory(run, need=(LOG,))
        rows = read_log(run_dir / LOG)
        if not rows or "loss" not in rows[0]:
            raise DmuhError(f"{run_dir / LOG}: no epochs with a loss logged")
        curves.append(RunCurves(run_dir, _method_name(run_dir), rows, any("train_map" in row for row in rows)))
    return CurvesFigure(curves)


# -- Fig. 4: precision of the top k --------------------------------------------------------------


def topk_ks(max_k: int, points: int = 50, spacing: str = "linear") -> np.ndarray:
    """About `points` ks from 1 to max_k (both included), linearly or log spaced, unique and sorted."""
    if max_k < 1 or points < 2:
        raise ConfigError(f"max_k {max_k} / --points {points}: expected max_k >= 1 and points >= 2", field="max_k")
    if spacing not in SPACINGS:
        raise ConfigError(f"spacing {spacing!r}: choose one of {', '.join(SPACINGS)}", field="spacing")
    grid = np.geomspace(1, max_k, points) if spacing == "log" else np.linspace(1, max_k, points)
    return np.unique(np.concatenate([[1, max_k], np.round(grid).astype(np.int64)]))


@dataclass
class RunTopk:
    run: Path
    method: str
    database_size: int
    ks: np.ndarray  # the curve's ks
    precision: np.ndarray  # P@k at `ks`
    table: Dict[int, float]  # P@k at the TABLE_KS that fit the database
    ties: str = DEFAULT_TIES

    @property
    def label(self) -> str:
        return _label(self.method, self.run)


@dataclass
class TopkFigure:
    runs: List[RunTopk]
    max_k: int

    def markdown(self) -> str:
        ks = [k for k in TABLE_KS if any(k in r.table for r in self.runs)]
        ties = sorted({r.ties for r in self.runs})
        out = [
            "# Precision of the top k (Fig. 4)",
            "",
            f"Each run's {CHECKPOINT} on its split.json: sign codes of the query items ranked against the "
            f"database by Hamming distance, ties {', '.join(ties)}; n/a where k exceeds the database.",
            "",
            _table(
                ["run", "method", "database", *[f"P@{k}" for k in ks]],
                [[str(r.run), r.method, r.database_size, *[_fmt(r.table.get(k)) for k in ks]] for r in self.runs],
            ),
        ]
        return "\n".join(out) + "\n"

    def draw(self):
        fig = new_figure(7, 4.5)
        ax = fig.subplots()
        for colour, r in zip(_colours(len(self.runs)), self.runs):
            ax.plot(r.ks, r.precision, "-", color=colour, label=r.label)
        top = max(int(r.ks[-1]) for r in self.runs)
        ax.set(
            title=f"precision of the top k (k up to {top})",
            xlabel="k (number of top returned items)",
            ylabel="precision",
        )
        ax.legend(fontsize=7)
        return fig


def run_topk(
    run, max_k: int = 5000, points: int = 50, spacing: str = "linear", device: str = "cpu", ties: str = DEFAULT_TIES
) -> RunTopk:
    """P@k of one run on its saved split, k on the curve grid (clipped to the database) and TABLE_KS."""

    run_dir = run_directory(run, need=(CHECKPOINT,))
    if max_k < 1:
        raise ConfigError(f"max_k {max_k}: expected a positive integer", field="max_k")
    exp = load_run(run_dir, device=device)
    size = len(exp.split.database)
    ks = topk_ks(min(max_k, size), points, spacing)
    table_ks = [k for k in TABLE_KS if k <= size]
    every = sorted(set(ks.tolist()) | set(table_ks))
    labels = np.asarray(exp.source.labels)
    query, database = sign(encode_part(exp, "query")), sign(encode_part(exp, "database"))
    values = precision_at_k(query, database, labels[exp.split.query], labels[exp.split.database], every, ties=ties)
    by_k = dict(zip(every, (float(v) for v in values)))
    return RunTopk(
        run_dir, exp.config.method, size, ks, np.array([by_k[int(k)] for k in ks]), {k: by_k[k] for k in table_ks}, ties
    )


def topk_figure(
    runs: Sequence, max_k: int = 5000, points: int = 50, spacing: str = "linear", device: str = "cpu"
) -> TopkFigure:
    """Fig. 4 of one or more runs."""
    if not runs:
        raise RunError(
            "run RUN is required (the run directory `dmuh train --out` wrote); repeat it to compare runs", field="run"
        )
    topk_ks(max(max_k, 1), points, spacing)  # bad flags fail before any run is loaded
    for run in runs:
        run_directory(run, need=(CHECKPOINT,))
    return TopkFigure([run_topk(run, max_k, points, spacing, device) for run in runs], max_k)
