"""`dmuh compare`: train several methods at several code lengths with one recipe; MAP tables.

Every (method, bits) run is `dmuh.engine.trainer.train` on the same base config (data, protocol, backbone,
optimiser, epochs, seed) with only `method`, `bits`, `method_params` and `out` replaced, so the
methods differ in their loss alone. The results go to `results.md` (rows = methods, columns = code
lengths, like Tables 4-5 of the DMUH paper; 16,32,64 bits gives Table 6's shape),
`results.csv` (the same table, full precision) and `results_seeds.csv` (one line per run).

A single-seed difference is an anecdote: `seeds` trains every cell once per seed (the tables give
mean ± sd over seeds) and `against` adds the paired difference of every row against one of them,
with a t interval over seeds (`dmuh.metrics.stats`). `grid` sweeps a method's hyper-parameter, one row
per value ("dmuh alpha=0.5"), like the DMUH paper's Table 3.

A comparison can be stopped and started again: a run directory that already holds a finished run
of the same config is reused, an unfinished one is resumed from its checkpoint, and one holding a
different config is an error (never silently overwritten).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from dmuh.data import Split, open_source
from dmuh.engine.runtime import decode_all, resolve_cache_dir
from dmuh.engine.trainer import train
from dmuh.errors import DmuhError, RunError
from dmuh.methods import METHODS, create_method, display_name, method_class
from dmuh.metrics.ranking import DEFAULT_TIES
from dmuh.metrics.stats import mean, paired_interval, sample_sd
from dmuh.runs.config import TrainConfig, with_absolute_paths
from dmuh.runs.layout import CHECKPOINT, CONFIG, LOG, SPLIT, load_run_config, read_log, run_directory
from dmuh.studies.paper import PAPER_DATASETS, PAPER_TITLES, paper_map
from dmuh.utils.io import atomic_write_text, refuse_overwrite, remove_orphans
from dmuh.utils.schema import load_yaml
from dmuh.utils.words import plural

RESULTS_MARKDOWN = "results.md"
RESULTS_CSV = "results.csv"
RESULTS_SEEDS_CSV = "results_seeds.csv"
SEEDS_CSV_COLUMNS = ("label", "method", "params", "bits", "seed", "map", "ties", "seconds", "run", "error")

# Config fields that say how a run executes, not what it computes: they may differ between a
# finished run and the comparison that reuses it.
EXECUTION_FIELDS = (
    "out",
    "device",
    "compile",
    "channels_last",
    "eval_batch_size",
    "cache_dir",
    "data_root",
    "allow_outside_root",
    "trace_items",
    "checkpoint_every",
    "train_map_items",
)


def _safe_name(text: str) -> str:
    """A directory-name-safe spelling: spaces become '-', anything but letters, digits and ._=+- '_'."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text.replace(" ", "-"))


def comparison_run_dir(out_dir: Path, method: str, bits: int, seed: Optional[int] = None) -> Path:
    """OUT/METHOD-Nbits, or OUT/METHOD-Nbits-seedS for a comparison over seeds. `method` may be a
    row label such as "dmuh alpha=0.5" (a grid row): OUT/dmuh-alpha=0.5-Nbits."""
    name = f"{_safe_name(method)}-{bits}bits"
    return Path(out_dir) / (name if seed is None else f"{name}-seed{seed}")


def format_value(value: Any) -> str:
    """A parameter value as a row label writes it (YAML spelling for booleans and null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def row_label(method: str, params: Mapping[str, Any]) -> str:
    """ "dmuh" or, for a grid row, "dmuh alpha=0.5 beta=30"."""
    return " ".join([method] + [f"{k}={format_value(v)}" for k, v in params.items()])


def display_label(label: str, method: str) -> str:
    """A row label with the method's display name: "dmuh alpha=0.5" -> "DMUH alpha=0.5"."""
    return display_name(method) + label[len(method) :] if label.startswith(method) else label


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a method with its parameters (-p ones and this row's grid values)."""

    label: str
    method: str
    grid: Dict[str, Any]  # this row's grid values (empty for a plain method row)
    params: Dict[str, Any]  # every method parameter of its runs


def table_rows(
    methods: Sequence[str],
    method_params: Mapping[str, Mapping[str, Any]],
    grid: Mapping[str, Mapping[str, Sequence[Any]]],
) -> List[Row]:
    """The table's rows: each method in order, a method with a grid replaced by one row per value
    (the cross product of its grid parameters, in the order given); a grid method that is not
    among `methods` comes after them. Refuses a parameter given both ways, an empty value list
    and parameters the method does not take, before anything is trained."""
    rows: List[Row] = []
    for method in list(dict.fromkeys(list(methods) + list(grid))):
        fixed = dict(method_params.get(method, {}))
        axes = dict(grid.get(method, {}))
        for name, values in axes.items():
            if name in fixed:
                raise DmuhError(
                    f"compare: {method}.{name} is given both by --grid and by -p/method_params; give it in one place"
                )
            if not list(values):
                raise DmuhError(f"compare: --grid {method}.{name} has no values")
        names = list(axes)
        for combination in itertools.product(*(list(dict.fromkeys(axes[n])) for n in names)):
            values = dict(zip(names, combination))
            rows.append(Row(row_label(method, values), method, values, {**fixed, **values}))
    for row in rows:
        METHODS.check_options(row.method, row.params, reserved=("bits", "num_train", "num_classes"))
    return rows


def check_values(row: Row, bits: Sequence[int]) -> None:
    """Build the row's method at toy size (num_train=2, num_classes=2) so that a bad parameter value
    fails now, not after hours of training. A length the method refuses with its default parameters
    too (a constraint on the code length) is left to the run, which is then a failed cell as always."""
    if not row.params:
        return
    for length in bits:
        try:
            create_method(row.method, bits=length, num_train=2, num_classes=2, **row.params)
        except (DmuhError, TypeError, ValueError) as error:
            try:
                create_method(row.method, bits=length, num_train=2, num_classes=2)
            except Exception:
                continue  # the code length, not the parameters
            raise DmuhError(f"compare: {row.label}: bad parameter value ({error})") from None


def resolve_against(name: str, rows: Sequence[Row]) -> str:
    """The row label `--against NAME` means: a row label, or a method (name or display name) with
    exactly one row."""
    labels = [r.label for r in rows]
    if name in labels:
        return name
    matching = [r.label for r in rows if name in (r.method, display_name(r.method))]
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise DmuhError(f"compare: --against {name!r} matches several rows ({', '.join(matching)}); name one")
    raise DmuhError(f"compare: --against {name!r} is not among the compared rows ({', '.join(labels)})")


def parse_seeds(seeds: Optional[Sequence[int]]) -> Optional[List[int]]:
    if seeds is None:
        return None
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise DmuhError(f"compare: --seeds must be non-negative integers, got {seeds!r}")
    return list(dict.fromkeys(seeds))


def comparable(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The config fields that decide a run's result, as plain YAML values (tuples become lists)."""
    values = {k: v for k, v in config.items() if k not in EXECUTION_FIELDS}
    return yaml.safe_load(yaml.safe_dump(values))


def existing_run(config: TrainConfig) -> Tuple[str, Dict[str, float]]:
    """What `config.out` holds: ("new", {}) nothing yet, ("unfinished", {}) a run to resume, or
    ("finished", last log row). A run of a different config there is a `DmuhError`."""
    run = Path(config.out)
    if not (run / CHECKPOINT).exists():
        return "new", {}
    # A field the saved config lacks (added to dmuh after the run) has its default, as load_run_config reads it.
    saved = comparable({**TrainConfig().to_dict(), **load_yaml(run / CONFIG)})
    wanted = comparable(with_absolute_paths(config).to_dict())  # as the run's config.yaml stores it
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        key = differing[0]
        raise DmuhError(
            f"{run} holds a run with another config ({key}: {saved.get(key)!r} there, {wanted.get(key)!r} "
            "here); remove it or compare into another output directory"
        )
    log = read_log(run / LOG)
    if log and int(log[-1]["epoch"]) == config.epochs:
        return "finished", log[-1]
    return "unfinished", {}


def training_seconds(run: Path) -> float:
    """Wall-clock seconds of all epochs in a run's log (a resumed run's epochs included)."""
    return float(sum(row.get("seconds", 0.0) for row in read_log(run / LOG)))


def _train_in_worker(config: Dict[str, Any], resume: bool, threads: int) -> Tuple[Dict[str, float], Optional[str]]:
    """One run in a worker process: (last log row, None) or ({}, the DmuhError's message)."""
    import torch

    torch.set_num_threads(threads)
    try:
        return train(TrainConfig.from_dict(config), resume=resume, progress=False, echo=lambda line: None), None
    except DmuhError as error:
        return {}, str(error)


def worker_threads(jobs: int) -> int:
    """CPU threads of each of `jobs` worker processes: the machine's cores shared out."""
    import os

    return max(1, (os.cpu_count() or 1) // jobs)


def _train_in_parallel(
    pending: Sequence[Tuple[str, TrainConfig, str]], jobs: int, echo: Callable[[str], None]
) -> Dict[str, Tuple[Dict[str, float], Optional[str]]]:
    """Train (where, config, state) runs in `jobs` worker processes; {run directory: outcome}.

    Small networks on a GPU are bound by kernel-launch time, not arithmetic: one run leaves most
    of the device idle, several processes share it. Workers are spawned (CUDA cannot be forked)
    and split the CPU threads between them.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = worker_threads(jobs)
    outcomes: Dict[str, Tuple[Dict[str, float], Optional[str]]] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for where, config, state in pending:
            echo(f"{where}: {'resuming' if state == 'unfinished' else 'training'} in {config.out} (worker)")
            futures[pool.submit(_train_in_worker, config.to_dict(), state == "unfinished", threads)] = (where, config)
        for future in as_completed(futures):
            where, config = futures[future]
            outcomes[config.out] = last, error = future.result()  # any other exception stops the comparison
            echo(f"{where}: failed: {error}" if error else f"{where}: MAP {last.get('map', math.nan):.4f}")
    return outcomes


def compare(
    methods: Sequence[str],
    bits: Sequence[int],
    base: TrainConfig,
    out_dir: Path,
    echo: Callable[[str], None] = print,
    method_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    progress: bool = False,
    jobs: int = 1,
    seeds: Optional[Sequence[int]] = None,
    grid: Optional[Mapping[str, Mapping[str, Sequence[Any]]]] = None,
    against: Optional[str] = None,
    force: bool = True,
    paper: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Train every method at every code length with `base`'s recipe; write and return the results.

    methods: registered method names (see `dmuh.methods.available()`), in table order.
    bits: code lengths, in column order.
    base: the shared config; its `method`, `bits`, `out` (and with `seeds`, `seed`) are replaced
        per run. Its `method_params` must be empty: hyper-parameters are per method (`method_params`).
    out_dir: one run directory per (row, bits), named METHOD-Nbits (METHOD-Nbits-seedS with
        `seeds`; a grid row's is e.g. dmuh-alpha=0.5-Nbits), plus results.md, results.csv and
        results_seeds.csv.
    echo: where progress lines go (the training loop's epoch lines included).
    method_params: {method: {param: value}} overrides of a method's defaults, for all its rows.
    progress: show the training loop's progress bars.
    jobs: runs trained at once, each in its own process on `base.device` (1: one after another
        in this process). Every run is seeded alike either way; on the CPU a worker's thread count
        (`worker_threads`) changes the order of floating-point sums, so results match a sequential
        run only at that thread count.
    seeds: train each cell once per seed (config `seed` replaced); the tables then give
        mean ± sd (n) over seeds. None: one run per cell at `base.seed`, as without seeds.
    grid: {method: {param: [values]}}: one row per value ("dmuh alpha=0.5"), the cross product
        for several parameters of one method; a grid method not in `methods` is added. A grid
        parameter may not also be in `method_params`.
    against: a row label or a method name with one row: results.md gets a table of the paired
        difference of every other row against it (mean over seeds, 95% t interval, n).
    paper: one of `dmuh.studies.paper.PAPER_DATASETS` ("cifar10", ...): beside each MAP column, the
        DMUH paper's figure for that method and code length (Tables 4-5), where it has one.

    Returns one dict per run, in table order (row, bits, seed): label, method, params, bits, seed,
    map (NaN when the run failed), ties, seconds (training time), run (its directory) and, for a
    run that failed with a DmuhError (e.g. a method constraint), error (the message). Such a
    failure is reported and the comparison goes on; any other exception stops it, and so does a
    run directory that holds a run of another config (a `DmuhError`: it is never overwritten).
    Bad arguments (unknown methods or parameters, --against not among the rows) fail before
    anything is trained. force=False refuses an out_dir holding the tables of an earlier
    comparison (the CLI without --force); its finished runs are reused either way.
    """
    methods = list(dict.fromkeys(methods))
    bits = list(dict.fromkeys(bits))
    grid = {m: dict(axes) for m, axes in (grid or {}).items()}
    if not (methods or grid) or not bits:
        raise DmuhError("compare: give at least one method and one code length")
    for method in list(methods) + list(grid):
        method_class(method)  # an unknown name fails before anything is trained
    for length in bits:
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise DmuhError(f"compare: code lengths must be positive integers, got {length!r}")
    if base.method_params:
        raise DmuhError(
            "compare: the base config's method_params would apply to every method; "
            "give hyper-parameters per method instead"
        )
    method_params = dict(method_params or {})
    unknown = sorted(set(method_params) - set(methods) - set(grid))
    if unknown:
        raise DmuhError(f"compare: parameters given for {unknown[0]!r}, which is not among the compared methods")
    seeds = parse_seeds(seeds)
    specs = table_rows(methods, method_params, grid)
    for spec in specs:
        check_values(spec, bits)
    if against is not None:
        against = resolve_against(against, specs)
    if paper is not None and paper not in PAPER_DATASETS:
        raise DmuhError(f"compare: paper figures {paper!r}: choose one of {', '.join(PAPER_DATASETS)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise DmuhError(f"compare: --jobs must be a positive integer, got {jobs!r}")
    refuse_overwrite(Path(out_dir) / RESULTS_MARKDOWN, force, "--out")

    out_dir = Path(out_dir)
    run_seeds = seeds if seeds is not None else [base.seed]
    directories: Dict[Path, str] = {}
    planned = []  # (where, row label, config, state, last row of a finished run)
    total = len(specs) * len(bits) * len(run_seeds)
    for spec in specs:
        for length in bits:
            for seed in run_seeds:
                where = comparison_run_dir(out_dir, spec.label, length, seed if seeds is not None else None)
                if directories.setdefault(where, spec.label) != spec.label:
                    raise DmuhError(f"compare: rows {directories[where]!r} and {spec.label!r} would share {where}")
                config = dataclasses.replace(
                    base, method=spec.method, bits=length, seed=seed, out=str(where), method_params=dict(spec.params)
                )
                name = f"[{len(planned) + 1}/{total}] {spec.label} at {length} bits"
                planned.append((name + (f", seed {seed}" if seeds is not None else ""), spec, config))
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(out_dir)
    planned = [
        (where, spec, config, *existing_run(config))  # a different run in the way stops the comparison
        for where, spec, config in planned
    ]
    outcomes: Dict[str, Tuple[Dict[str, float], Optional[str]]] = {}
    pending = [(where, config, state) for where, _, config, state, _ in planned if state != "finished"]
    if jobs > 1 and len(pending) > 1:
        if resolve_cache_dir(base.cache_dir) is not None:  # decode once here, so the workers read the cache
            decode_all(open_source(base.data, root=base.data_root, allow_outside_root=base.allow_outside_root), base)
        outcomes = _train_in_parallel(pending, min(jobs, len(pending)), echo)

    caption = describe(base, seeds)
    rows: List[Dict[str, Any]] = []
    for where, spec, config, state, last in planned:
        row: Dict[str, Any] = {
            "label": spec.label,
            "method": config.method,
            "params": dict(spec.params),
            "bits": config.bits,
            "seed": config.seed,
            "run": config.out,
        }
        error = None
        if state == "finished":
            echo(f"{where}: finished run in {config.out} reused")
        elif config.out in outcomes:
            last, error = outcomes[config.out]
        else:
            echo(f"{where}: {'resuming' if state == 'unfinished' else 'training'} in {config.out}")
            try:
                last = train(config, resume=state == "unfinished", progress=progress, echo=echo)
            except DmuhError as failure:
                error = str(failure)
                echo(f"{where}: failed: {error}")
        if error:
            row["error"] = error
        row["map"] = float(last.get("map", math.nan))
        # Runs logged before dmuh recorded the tie policy used database order (ties="index").
        row["ties"] = (last.get("ties") or "index") if math.isfinite(row["map"]) else DEFAULT_TIES
        row["seconds"] = training_seconds(Path(config.out))
        rows.append(row)
        # partial tables survive an interruption
        write_tables(
            rows,
            out_dir,
            caption=f"Same backbone, recipe and budget for every method: {caption}",
            against=against,
            per_seed=seeds is not None,
            paper=paper,
        )
    return rows


# Fields that make one row or column of a table of finished runs, not its recipe.
ROW_FIELDS = ("method", "method_params", "bits", "seed")


def tabulate_runs(
    runs: Sequence[Any],
    out_dir: Optional[Path] = None,
    against: Optional[str] = None,
    force: bool = False,
    paper: Optional[str] = None,
) -> Tuple[List[Dict[str, Any]], str]:
    """The tables of finished runs, wherever they are, without training any: each run's method,
    method parameters, bits and seed place it (runs that differ in seed alone make a cell of
    several seeds); its log's last MAP is the figure. Returns (rows, results.md's text); the
    tables are written to `out_dir` when given.

    The runs must have been scored on the same split (the same query and database items of the
    same data): MAPs on other queries are not comparable, and that is refused. Recipe fields that
    differ (epochs, lr, model, ...) are named in the caption instead of the shared recipe.
    """
    if len(runs) < 1:
        raise DmuhError("compare: give at least one --run")
    if out_dir is not None:
        refuse_overwrite(Path(out_dir) / RESULTS_MARKDOWN, force, "--out")
    seen: Dict[Path, Any] = {}
    read = []  # (run directory, config, last log row)
    for given in runs:
        where = run_directory(given, need=(LOG, SPLIT))
        if where.resolve() in seen:
            raise DmuhError(f"--run {given}: given twice (also as --run {seen[where.resolve()]})")
        seen[where.resolve()] = given
        config = load_run_config(where)
        log = read_log(where / LOG)
        if not log or int(log[-1]["epoch"]) != config.epochs:
            done = int(log[-1]["epoch"]) if log else 0
            raise RunError(
                f"--run {given}: unfinished ({plural(done, 'epoch')} of {config.epochs}); finish it with "
                f"`dmuh train --resume --out {given}` or leave it out"
            )
        read.append((where, given, config, log[-1]))
    first_where, first_given, _, _ = read[0]
    first_split = Split.load(first_where / SPLIT)
    for where, given, _, _ in read[1:]:
        split = Split.load(where / SPLIT)
        same = (
            split.fingerprint == first_split.fingerprint
            and np.array_equal(split.query, first_split.query)
            and np.array_equal(split.database, first_split.database)
        )
        if not same:
            raise RunError(
                f"--run {given}: scored on other query or database items than --run {first_given} "
                f"(split {split.protocol} seed {split.seed} of data {split.fingerprint[:12]}, against "
                f"{first_split.protocol} seed {first_split.seed} of {first_split.fingerprint[:12]}); "
                "MAPs over different queries are not comparable"
            )
    recipes = [
        comparable({k: v for k, v in config.to_dict().items() if k not in ROW_FIELDS}) for _, _, config, _ in read
    ]
    differing = sorted(k for k in recipes[0] if any(recipe.get(k) != recipes[0][k] for recipe in recipes))
    rows: List[Dict[str, Any]] = []
    places = set()  # (label, bits, seed) of the rows so far
    for where, _, config, last in read:
        label = row_label(config.method, config.method_params)
        if (label, config.bits, config.seed) in places:  # two runs of one cell: tell them apart by folder
            label = f"{label} ({where.name})"
        places.add((label, config.bits, config.seed))
        value = float(last.get("map", math.nan))
        rows.append(
            {
                "label": label,
                "method": config.method,
                "params": dict(config.method_params),
                "bits": config.bits,
                "seed": config.seed,
                "run": str(where),
                "map": value,
                "ties": (last.get("ties") or "index") if math.isfinite(value) else DEFAULT_TIES,
                "seconds": training_seconds(where),
            }
        )
    if against is not None:
        methods = dict((row["label"], row["method"]) for row in rows)
        against = resolve_against(against, [Row(label, method, {}, {}) for label, method in methods.items()])
    seeds = sorted({row["seed"] for row in rows})
    if differing:
        caption = (
            f"finished runs of different recipes (they differ in {', '.join(differing)}): the table "
            "does not separate the method from the recipe"
        )
    else:
        caption = "Same backbone, recipe and budget for every method: " + describe(read[0][2], seeds)
    text = write_tables(rows, out_dir, caption=caption, against=against, paper=paper)
    return rows, text


def describe(config: TrainConfig, seeds: Optional[Sequence[int]] = None) -> str:
    """One line naming the shared recipe, for the table caption."""
    seeding = f"seed {config.seed}" if seeds is None else "seeds " + ", ".join(str(s) for s in seeds)
    return (
        f"data {config.data}, protocol {config.protocol}, model {config.model}, {plural(config.epochs, 'epoch')}, "
        f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g}, {seeding}"
    )


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(row: Mapping[str, Any]) -> str:
    return row.get("label") or row["method"]


def _table(rows: Sequence[Mapping[str, Any]]):
    """(labels in order, bits in order, {(label, bits): [runs]}, {label: method})."""
    labels = list(dict.fromkeys(_label(r) for r in rows))
    bits = list(dict.fromkeys(int(r["bits"]) for r in rows))
    cells: Dict[Tuple[str, int], List[Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault((_label(r), int(r["bits"])), []).append(r)
    return labels, bits, cells, {_label(r): r["method"] for r in rows}


def cell_maps(runs: Sequence[Mapping[str, Any]]) -> List[float]:
    """The finite MAPs of a cell's runs (failed seeds left out)."""
    return [float(r["map"]) for r in runs if _finite(r.get("map"))]


def paired_differences(runs: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> List[float]:
    """MAP(row) - MAP(reference) for every seed both finished, in the row's seed order."""
    theirs = {r.get("seed"): float(r["map"]) for r in reference if _finite(r.get("map"))}
    return [float(r["map"]) - theirs[r.get("seed")] for r in runs if _finite(r.get("map")) and r.get("seed") in theirs]


def format_mean_sd(values: Sequence[float]) -> str:
    """ "0.7000 ± 0.0100 (n=3)"; one value: "0.7000 (n=1)"."""
    if len(values) < 2:
        return f"{values[0]:.4f} (n=1)"
    return f"{mean(values):.4f} ± {sample_sd(values):.4f} (n={len(values)})"


def format_difference(differences: Sequence[float]) -> str:
    """ "+0.0200 [-0.0048, +0.0448] (n=3)", "*" appended when the interval excludes 0."""
    if not differences:
        return "n/a"
    interval = paired_interval(differences)
    if interval.n < 2:
        return f"{interval.mean:+.4f} (n=1, no interval)"
    star = " *" if interval.excludes_zero else ""
    return f"{interval.mean:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}] (n={interval.n}){star}"


def write_tables(
    rows: Sequence[Mapping[str, Any]],
    out_dir: Optional[Path],
    caption: str = "",
    against: Optional[str] = None,
    per_seed: Optional[bool] = None,
    paper: Optional[str] = None,
) -> str:
    """results.md (MAP table, the best of a column in bold where seeds support it, then the paired difference against
    `against`, training times and failures), results.csv (row label, then one MAP column per code
    length: the mean over seeds) and results_seeds.csv (one line per run) in `out_dir`, each
    written atomically.

    rows: `compare`'s run dicts (label defaults to method, seed to none). per_seed: MAP cells as
    mean ± sd (n) over seeds; None: when some cell holds more than one run. paper: a data set of
    `dmuh.studies.paper`: the MAP table (markdown and CSV) gets the paper's figure beside each measured
    column, for the rows that are a plain method of the paper's tables (not grid rows). caption: a
    sentence on the shared recipe. Returns results.md's text; out_dir None writes nothing.
    """
    labels, bits, cells, method_of = _table(rows)
    if per_seed is None:
        per_seed = any(len(runs) > 1 for runs in cells.values())
    means = {key: mean(cell_maps(runs)) for key, runs in cells.items() if cell_maps(runs)}

    def supported_best(length: int) -> Optional[str]:
        """The row of the best mean in the column, when its paired 95% interval against every other
        row there excludes 0 over 2 or more seeds; None otherwise (one seed cannot support a bold)."""
        scored = [label for label in labels if (label, length) in means]
        if len(scored) < 2:
            return None
        top = max(scored, key=lambda label: means[label, length])
        for other in scored:
            if other != top:
                interval = paired_interval(paired_differences(cells[top, length], cells[other, length]))
                if interval.n < 2 or not interval.excludes_zero or interval.mean <= 0:
                    return None
        return top

    bold = {b: supported_best(b) for b in bits}

    def name(label: str) -> str:
        return display_label(label, method_of[label])

    def map_cell(label: str, length: int) -> str:
        runs = cells.get((label, length))
        if not runs:
            return ""
        values = cell_maps(runs)
        if not values:
            return "failed" if any(r.get("error") for r in runs) else "n/a"
        text = format_mean_sd(values) if per_seed else f"{values[0]:.4f}"
        if any(r.get("ties", DEFAULT_TIES) != DEFAULT_TIES for r in runs if _finite(r.get("map"))):
            text += "†"
        return f"**{text}**" if bold[length] == label else text

    def seconds_cell(label: str, length: int) -> str:
        runs = cells.get((label, length)) or []
        if per_seed:
            runs = [r for r in runs if _finite(r.get("map"))]
        seconds = [float(r["seconds"]) for r in runs if _finite(r.get("seconds"))]
        return f"{mean(seconds):.1f}" if seconds else ""

    def paper_cell(label: str, length: int) -> str:
        figure = paper_map(paper, method_of[label], length) if label == method_of[label] else None
        return "" if figure is None else f"{figure:.3f}"

    header = "| Method | " + " | ".join(f"{b} bits" for b in bits) + " |"
    rule = "|---|" + "---:|" * len(bits)
    map_header, map_rule = header, rule
    if paper is not None:
        map_header = "| Method | " + " | ".join(f"{b} bits | paper" for b in bits) + " |"
        map_rule = "|---|" + "---:|" * (2 * len(bits))
    if per_seed:
        lines = [f"# MAP by code length, mean ± sd over seeds (the protocol's MAP, ties {DEFAULT_TIES})", ""]
    else:
        lines = [f"# MAP by code length (the protocol's MAP, ties {DEFAULT_TIES})", ""]
    if caption:
        lines += [f"{caption}.", ""]
    lines += [map_header, map_rule]
    if paper is None:
        lines += [f"| {name(label)} | " + " | ".join(map_cell(label, b) for b in bits) + " |" for label in labels]
    else:
        lines += [
            f"| {name(label)} | " + " | ".join(f"{map_cell(label, b)} | {paper_cell(label, b)}" for b in bits) + " |"
            for label in labels
        ]
        lines += [
            "",
            f"paper: the DMUH paper's MAP for the method at that code length on {PAPER_TITLES[paper]} "
            "(its own backbone, data and budget: set beside the measured figure for reading, not as a check).",
        ]
    if per_seed:
        lines += [
            "",
            "Each cell: mean ± sample standard deviation (ddof=1) over the n seeds that finished; "
            "a failed seed is left out of n (see Failed runs). Bold: the best mean of its column, only "
            "where its paired 95% interval against every other row of the column excludes 0.",
        ]
    if max((len(cell_maps(runs)) for runs in cells.values()), default=0) < 2 and len(labels) > 1:
        lines += [
            "",
            "One seed per cell: a difference between rows may be no larger than the seed-to-seed spread, "
            "which one seed cannot show, so nothing is bolded; `--seeds 0,1,2 --against ROW` gives means, "
            "spreads and paired intervals.",
        ]
    other_ties = [r for r in rows if _finite(r.get("map")) and r.get("ties", DEFAULT_TIES) != DEFAULT_TIES]
    if other_ties:
        lines += [
            "",
            "† MAP with another tie policy (runs logged before dmuh recorded it): "
            + ", ".join(
                f"{_label(r)} at {r['bits']} bits"
                + (f", seed {r.get('seed')}" if per_seed else "")
                + f" (ties {r['ties']})"
                for r in other_ties
            ),
        ]
    if against is not None and against in method_of:
        reference = name(against)
        lines += ["", f"## Paired difference against {reference} (MAP, ties {DEFAULT_TIES})", "", header, rule]
        for label in labels:
            if label == against:
                continue
            diffs = [
                format_difference(paired_differences(cells.get((label, b), []), cells.get((against, b), [])))
                if (label, b) in cells
                else ""
                for b in bits
            ]
            lines.append(f"| {name(label)} | " + " | ".join(diffs) + " |")
        lines += [
            "",
            f"Each cell: the mean over seeds of (row MAP − {reference} MAP) for the same seed, its 95% "
            "confidence interval from Student's t with n−1 degrees of freedom, and n (the seeds both runs "
            "finished). * marks an interval that excludes 0. The interval is paired over seeds: it is the "
            "seed-to-seed spread (initialisation, batch order) on this one data split, not the "
            "uncertainty from sampling the data (queries, database or training set).",
        ]
    lines += ["", "Training time (seconds" + (", mean over seeds)" if per_seed else ")"), "", header, rule]
    lines += [f"| {name(label)} | " + " | ".join(seconds_cell(label, b) for b in bits) + " |" for label in labels]
    failures = [r for r in rows if r.get("error")]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [
            f"- {_label(r)} at {r['bits']} bits" + (f", seed {r.get('seed')}" if per_seed else "") + f": {r['error']}"
            for r in failures
        ]
    text = "\n".join(lines) + "\n"
    if out_dir is None:
        return text
    atomic_write_text(Path(out_dir) / RESULTS_MARKDOWN, text)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method"] + [f"{b} bits" for b in bits] + ([f"paper {b} bits" for b in bits] if paper else []))
    for label in labels:
        values = [means.get((label, b)) for b in bits]
        figures = [paper_cell(label, b) for b in bits] if paper else []
        writer.writerow([label] + [repr(float(v)) if _finite(v) else "" for v in values] + figures)
    atomic_write_text(Path(out_dir) / RESULTS_CSV, buffer.getvalue())

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SEEDS_CSV_COLUMNS)
    for r in rows:
        writer.writerow(
            [
                _label(r),
                r["method"],
                json.dumps(r.get("params") or {}, sort_keys=True, default=str),
                r["bits"],
                "" if r.get("seed") is None else r["seed"],
                repr(float(r["map"])) if _finite(r.get("map")) else "",
                r.get("ties", ""),
                repr(float(r["seconds"])) if _finite(r.get("seconds")) else "",
                r.get("run", ""),
                r.get("error", ""),
            ]
        )
    atomic_write_text(Path(out_dir) / RESULTS_SEEDS_CSV, buffer.getvalue())
    return text
