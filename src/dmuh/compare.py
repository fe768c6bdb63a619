"""`dmuh compare`: train several methods at several code lengths with one recipe; MAP tables.

Every (method, bits) run is `dmuh.train.train` on the same base config (data, protocol, backbone,
optimiser, epochs, seed) with only `method`, `bits`, `method_params` and `out` replaced, so the
methods differ in their loss alone. The results go to `results.md` (rows = methods, columns = code
lengths, like Tables 4-5 of the DMUH paper; 16,32,64 bits gives Table 6's shape) and
`results.csv` (the same table, full precision).

A comparison can be stopped and started again: a run directory that already holds a finished run
of the same config is reused, an unfinished one is resumed from its checkpoint, and one holding a
different config is an error (never silently overwritten).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from dmuh.config import TrainConfig, load_yaml
from dmuh.errors import DmuhError
from dmuh.io import atomic_write_text
from dmuh.methods import display_name, method_class
from dmuh.metrics import DEFAULT_TIES
from dmuh.run import CHECKPOINT, CONFIG, LOG, read_log
from dmuh.train import train

RESULTS_MARKDOWN = "results.md"
RESULTS_CSV = "results.csv"

# Config fields that say how a run executes, not what it computes: they may differ between a
# finished run and the comparison that reuses it.
EXECUTION_FIELDS = ("out", "device", "compile", "channels_last", "eval_batch_size", "cache_dir", "data_root",
                    "trace_items", "checkpoint_every")

def run_directory(out_dir: Path, method: str, bits: int) -> Path:
    return Path(out_dir) / f"{method}-{bits}bits"


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
    saved = comparable(load_yaml(run / CONFIG))
    wanted = comparable(config.to_dict())
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        key = differing[0]
        raise DmuhError(f"{run} holds a run with another config ({key}: {saved.get(key)!r} there, {wanted.get(key)!r} "
                        "here); remove it or compare into another output directory")
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


def _train_in_parallel(pending: Sequence[Tuple[str, TrainConfig, str]], jobs: int,
                       echo: Callable[[str], None]) -> Dict[str, Tuple[Dict[str, float], Optional[str]]]:
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
) -> List[Dict[str, Any]]:
    """Train every method at every code length with `base`'s recipe; write and return the results.

    methods: registered method names (see `dmuh.methods.available()`), in table order.
    bits: code lengths, in column order.
    base: the shared config; its `method`, `bits` and `out` are replaced per run. Its
        `method_params` must be empty: hyper-parameters are per method (`method_params`).
    out_dir: one run directory per (method, bits), named METHOD-Nbits, plus results.md/.csv.
    echo: where progress lines go (the training loop's epoch lines included).
    method_params: {method: {param: value}} overrides of a method's defaults.
    progress: show the training loop's progress bars.
    jobs: runs trained at once, each in its own process on `base.device` (1: one after another
        in this process). Every run is seeded alike either way; on the CPU a worker's thread count
        (`worker_threads`) changes the order of floating-point sums, so results match a sequential
        run only at that thread count.

    Returns one dict per run, in table order: method, bits, map (NaN when the run failed),
    seconds (training time), run (its directory) and, for a run that failed with a DmuhError
    (e.g. a method constraint), error (the message). Such a failure is reported and the
    comparison goes on; any other exception stops it, and so does a run directory that holds a
    run of another config (a `DmuhError`: it is never overwritten).
    """
    methods = list(dict.fromkeys(methods))
    bits = list(dict.fromkeys(bits))
    if not methods or not bits:
        raise DmuhError("compare: give at least one method and one code length")
    for method in methods:
        method_class(method)  # an unknown name fails before anything is trained
    for length in bits:
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise DmuhError(f"compare: code lengths must be positive integers, got {length!r}")
    if base.method_params:
        raise DmuhError("compare: the base config's method_params would apply to every method; "
                        "give hyper-parameters per method instead")
    method_params = dict(method_params or {})
    unknown = sorted(set(method_params) - set(methods))
    if unknown:
        raise DmuhError(f"compare: parameters given for {unknown[0]!r}, which is not among the compared methods")

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise DmuhError(f"compare: --jobs must be a positive integer, got {jobs!r}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = len(methods) * len(bits)
    planned = []  # (where, config, state, last row of a finished run)
    for method in methods:
        for length in bits:
            config = dataclasses.replace(base, method=method, bits=length, out=str(run_directory(out_dir, method, length)),
                                         method_params=dict(method_params.get(method, {})))
            state, last = existing_run(config)  # a different run in the way stops the comparison
            planned.append((f"[{len(planned) + 1}/{total}] {method} at {length} bits", config, state, last))
    outcomes: Dict[str, Tuple[Dict[str, float], Optional[str]]] = {}
    pending = [(where, config, state) for where, config, state, _ in planned if state != "finished"]
    if jobs > 1 and len(pending) > 1:
        if base.cache_dir:  # decode once here, so the workers read the cache instead of all decoding
            from dmuh.data import open_source
            from dmuh.runtime import decode_all

            decode_all(open_source(base.data, root=base.data_root), base)
        outcomes = _train_in_parallel(pending, min(jobs, len(pending)), echo)

    rows: List[Dict[str, Any]] = []
    for where, config, state, last in planned:
        row: Dict[str, Any] = {"method": config.method, "bits": config.bits, "run": config.out}
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
        write_tables(rows, out_dir, caption=describe(base))  # partial tables survive an interruption
    return rows


def describe(config: TrainConfig) -> str:
    """One line naming the shared recipe, for the table caption."""
    return (f"data {config.data}, protocol {config.protocol}, model {config.model}, {config.epochs} epochs, "
            f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g}, seed {config.seed}")


def _table(rows: Sequence[Mapping[str, Any]]):
    """(methods in order, bits in order, {(method, bits): row})."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    bits = list(dict.fromkeys(int(r["bits"]) for r in rows))
    return methods, bits, {(r["method"], int(r["bits"])): r for r in rows}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_tables(rows: Sequence[Mapping[str, Any]], out_dir: Path, caption: str = "") -> None:
    """results.md (MAP table, best of each column in bold, then training times and failures) and
    results.csv (method, then one MAP column per code length) in `out_dir`, each written atomically."""
    methods, bits, cells = _table(rows)
    best = {b: max((cells[m, b]["map"] for m in methods if (m, b) in cells and _finite(cells[m, b]["map"])),
                   default=None) for b in bits}

    def map_cell(method: str, length: int) -> str:
        row = cells.get((method, length))
        if row is None:
            return ""
        if not _finite(row["map"]):
            return "failed" if row.get("error") else "n/a"
        text = f"{row['map']:.4f}" + ("†" if row.get("ties", DEFAULT_TIES) != DEFAULT_TIES else "")
        return f"**{text}**" if row["map"] == best[length] else text

    def seconds_cell(method: str, length: int) -> str:
        row = cells.get((method, length))
        return f"{row['seconds']:.1f}" if row is not None and _finite(row.get("seconds")) else ""

    header = "| Method | " + " | ".join(f"{b} bits" for b in bits) + " |"
    rule = "|---|" + "---:|" * len(bits)
    lines = [f"# MAP by code length (the protocol's MAP, ties {DEFAULT_TIES})", ""]
    if caption:
        lines += [f"Same backbone, recipe and budget for every method: {caption}.", ""]
    lines += [header, rule]
    lines += [f"| {display_name(m)} | " + " | ".join(map_cell(m, b) for b in bits) + " |" for m in methods]
    other_ties = [r for r in rows if r.get("ties", DEFAULT_TIES) != DEFAULT_TIES]
    if other_ties:
        lines += ["", "† MAP with another tie policy (runs logged before dmuh recorded it): "
                  + ", ".join(f"{r['method']} at {r['bits']} bits (ties {r['ties']})" for r in other_ties)]
    lines += ["", "Training time (seconds)", "", header, rule]
    lines += [f"| {display_name(m)} | " + " | ".join(seconds_cell(m, b) for b in bits) + " |" for m in methods]
    failures = [r for r in rows if r.get("error")]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['method']} at {r['bits']} bits: {r['error']}" for r in failures]
    atomic_write_text(Path(out_dir) / RESULTS_MARKDOWN, "\n".join(lines) + "\n")

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method"] + [f"{b} bits" for b in bits])
    for method in methods:
        values = [cells.get((method, b), {}).get("map") for b in bits]
        writer.writerow([method] + [repr(float(v)) if _finite(v) else "" for v in values])
    atomic_write_text(Path(out_dir) / RESULTS_CSV, buffer.getvalue())
