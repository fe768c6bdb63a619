"""Bad-input audit of the `dmuh` command line: fault and bad-input cases, each run as a subprocess.

    python bench/bad_inputs.py                  # every case, one at a time
    python bench/bad_inputs.py --jobs 2         # two cases at once (about 10-15 minutes on 2 cores)
    python bench/bad_inputs.py --only yaml      # cases whose name or category holds "yaml"
    python bench/bad_inputs.py --list           # name, category and expectation of every case
    python bench/bad_inputs.py --all --jobs 2   # also the extended cases (more values of each kind)
    python bench/bad_inputs.py --details ...    # every case's outcome and message, not only the failures

Run it with the interpreter dmuh is installed in (e.g. /tmp/civenv/bin/python); every case runs
`python -m dmuh ARGV` with that interpreter. Each case builds what it needs (tiny data files, YAML
configs, a copy of one tiny run trained once at the start, a damaged file) in a fresh folder under
one temporary directory, which is removed at the end (--keep keeps it). Nothing outside it is
written: HOME, the dmuh cache, matplotlib's config folder and the like point into it.

A case expects "error" (the command must refuse the input cleanly), "ok" (it must succeed, and
pass the case's check of the result) or "either" (a clean refusal and a correct result are both
fine). Every case ends in one outcome:

    ok           an "ok"/"either" case that exited 0 and whose check (if any) passed
    clear error  nonzero exit, no "Traceback", at most 2 stderr lines, the last starting with "dmuh"
                 (argparse's usage + error lines count as clear, a wrapped usage as one line)
    traceback    stderr holds "Traceback" (an uncaught exception), or the process died of a signal
    silent       an "error" case that exited 0 (bad input accepted), or an "ok" case whose check
                 failed (a wrong result)
    lost         a file that existed before the case changed or vanished without --force, or a
                 security guard tripped (a marker file that only code run from the input creates)
    memory       peak memory (RSS, from wait4) more than MEMORY_LIMIT_MB above the floor for an input
                 under 1 MB: a tiny input that makes a huge allocation
    hang         the command ran past its timeout and was killed
    refused      an "ok" case refused with a clear error (valid input rejected)
    unclear      nonzero exit, no traceback, but not a clear message (several lines, last not "dmuh ...")
    skipped      a fixture the case needs could not be built, or its setup failed

The table counts outcomes per category; a list of every case that is not "ok"/"clear error"
follows, with its first stderr line (and, for a traceback, its last: the exception); then every
case's peak memory (the command's maximum resident set, ru_maxrss of its own process), its excess over the
floor, and the size of its inputs. A case with `alongside` runs a second command at the same time
(concurrent writers): neither may crash, and its check says whether anything reported done is lost.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

OUTCOMES = ("ok", "clear error", "traceback", "silent", "lost", "memory", "hang", "refused", "unclear", "skipped")
FAILURES = ("traceback", "silent", "lost", "memory", "hang", "refused", "unclear", "skipped")
# A case whose inputs (its folder's files, before the command) total under SMALL_INPUT_BYTES may
# take at most MEMORY_LIMIT_MB above the interpreter's floor (the peak RSS of importing what every
# command imports: torch alone is about 650 MB on a CUDA build, so an absolute bound would measure
# torch, not dmuh).
SMALL_INPUT_BYTES = 1 << 20
MEMORY_LIMIT_MB = 500
# Characters a clear error line may have: a message quoting a value must cut it.
MESSAGE_LIMIT = 500
MARKER = "MARKER-code-ran"  # created only by code run from a malicious input (security cases)
DEFAULT_TIMEOUT = 300.0

# The tiny training recipe every training case starts from: digits, 5 query + 20 train items per
# class, a width-8 smallcnn, 8 bits, 1 epoch (a few seconds of CPU).
TINY_FLAGS = {
    "data": "digits",
    "protocol": "per-class",
    "model": "smallcnn",
    "bits": "8",
    "epochs": "1",
    "batch_size": "50",
    "method": "dmuh",
    "trace_items": "4",
    "train_map_items": "50",
    "cache_dir": "off",
    "init": "scratch",
}
TINY_MODEL = {"input_size": "8", "width": "8"}
TINY_PROTOCOL = {"query_per_class": "5", "train_per_class": "20"}
TINY_YAML = {
    "data": "digits",
    "protocol": "per-class",
    "protocol_params": {"query_per_class": 5, "train_per_class": 20},
    "model": "smallcnn",
    "model_params": {"input_size": 8, "width": 8},
    "bits": 8,
    "epochs": 1,
    "batch_size": 50,
    "method": "dmuh",
    "trace_items": 4,
    "train_map_items": 50,
    "cache_dir": "off",
    "init": "scratch",
}
SMALL_PROTOCOL = {"query_per_class": "2", "train_per_class": "4"}  # for the 6-per-class image fixtures


# =============================================================================================
# Cases


# Cases run only with --all (the default audit stays within about 10-15 minutes on 2 cores).
EXTENDED = frozenset(
    """
train/batch-size-negative train/batch-size-float train/batch-size-absurd train/batch-size-text train/eval-batch-size-negative
train/lr-inf train/lr-0 train/lr-text train/lr-end-nan train/lr-end-negative train/lr-schedule-epochs-0 train/weight-decay-nan
train/weight-decay-absurd train/momentum-negative train/momentum-1 train/momentum-nan train/epochs-negative train/epochs-absurd
train/epochs-float train/bits-negative train/bits-float train/compile-maybe train/channels-last-2 train/allow-outside-root-maybe
train/image-size-3 train/image-size-text train/hash-norm-unknown train/split-seed-negative train/seed-negative train/seed-text
train/optimizer-unknown train/augment-unknown train/device-gpu train/grad-clip-0 train/grad-clip-negative train/grad-clip-nan
train/eval-every-minus-2 train/trace-items-negative train/checkpoint-every-0 train/train-map-items-negative
train/backbone-lr-scale-negative train/backbone-lr-scale-nan train/param-alpha-nan train/param-no-equals
train/model-param-width-text train/model-param-unknown train/protocol-param-unknown train/protocol-param-with-digits-protocol
train/data-root-with-digits
pretrain/temperature-nan pretrain/lr-nan pretrain/batch-size-0 pretrain/projection-dim-0
compare/seeds-text compare/grid-no-method compare/methods-empty compare/bits-0 compare/against-unknown
demo/epochs-negative demo/bits-text
yaml/epochs-true yaml/epochs-null yaml/lr-inf yaml/bits-list yaml/model-params-width-text yaml/amp-text yaml/data-root-list
yaml/non-mapping-scalar yaml/tab-indented yaml/is-a-directory yaml/method-params-unknown yaml/batch-size-0 yaml/typo-key
yaml/lr-1e9 yaml/protocol-params-list yaml/method-unknown yaml/flag-overrides-bad-field pretrain/yaml-unknown-key
data/idx-missing data/list-missing data/cifar-batches-missing data/unknown-scheme data/zip-member-corrupt data/image-zero-bytes
data/features-no-labels data/features-negative-label data/features-1d-features data/features-text-features
data/idx-truncated-header data/list-label-not-binary data/list-data-root-missing data/cifar-wrong-shape
data/list-absolute-allowed data/features-inf-row data/features-labels-too-few data/list-etc-passwd data/plain-file
data/folder-without-images data/features-image-size data/idx-label-count-mismatch data/zip-valid data/list-valid
run/evaluate-no-run-flag run/evaluate-a-file run/config-invalid-yaml run/config-method-changed
run/split-queries-are-train-checksum-kept run/split-not-a-split run/checkpoint-flip-9 run/checkpoint-header-only
run/checkpoint-is-a-directory run/convert-legacy-not-a-dict run/export-onnx-config-garbled run/config-model-changed
run/split-index-out-of-range run/encode-checkpoint-flip run/convert-legacy-truncated run/evaluate-empty-folder
run/config-bad-field
resume/empty-folder resume/log-wrong-columns resume/trace-truncated resume/change-model-width resume/checkpoint-flip
resume/change-protocol-param resume/config-garbled resume/epochs-0
security/pickle-checkpoint-figure-uncertainty security/pickle-checkpoint-figure-curves
security/torch-zip-checkpoint-evaluate security/init-plain-pickle security/pretrained-state-dict-npz-pickle
security/pickle-checkpoint-figure-topk
encode/batch-size-negative encode/image-size-negative encode/image-size-text encode/device-cuda-99 encode/run-missing
encode/list-not-utf8 encode/root-missing encode/device-unknown encode/features-into-image-run encode/list-escapes-root
index/build-ivf-nlist-negative index/build-hnsw-ef-search-negative index/build-nlist-text index/build-ivf-nlist-absurd
index/build-ivf-ok index/build-ivf-nprobe-above-nlist
index/build-codes-zero-bytes index/info-zero-bytes index/info-header-truncated index/info-flip-40 index/info-flip--1
search/index-missing search/queries-truncated index/info-missing index/info-codes-file-as-index
search/queries-list-missing-images search/image-garbage
search/k-text search/rerank-negative search/tau-negative search/tau-nan search/ef-search-0 search/k-huge search/nprobe-0
export-onnx/opset-negative export-onnx/image-size-negative export-onnx/no-run export-onnx/out-in-missing-folder
evaluate/device-unknown evaluate/legacy-positional
figure/uncertainty-no-run figure/curves-no-run figure/uncertainty-gallery-negative figure/uncertainty-items-0
figure/uncertainty-passes-0 figure/topk-max-k-negative figure/topk-points-0 figure/topk-spacing-unknown
figure/curves-log-missing figure/uncertainty-bits-shown-above-bits figure/curves-second-run-missing figure/topk-split-tampered
overwrite/figure-uncertainty-md overwrite/figure-curves-md overwrite/figure-topk-png overwrite/encode-out-is-checkpoint
overwrite/search-out-is-index overwrite/index-build-out-is-codes overwrite/demo-out-is-a-file overwrite/pretrain-out-is-a-file
overwrite/index-build-force
train/lr-end-above-lr train/protocol-unknown train/device-cuda-99 train/protocol-param-0 train/lr-10-max
pretrain/temperature-0 compare/seeds-negative compare/param-without-method yaml/lr-nan yaml/bits-text yaml/missing-file
yaml/valid-tiny data/features-missing data/image-truncated data/list-label-width run/split-garbage run/convert-without-legacy
resume/no-run security/init-pretrain-dir-with-pickle encode/no-run index/build-kind-unknown index/info-flip-10 search/tau-0
search/queries-list-empty export-onnx/opset-0 evaluate/ties-unknown figure/topk-no-run figure/topk-points-1
overwrite/figure-curves-png overwrite/compare-out-is-a-file
""".split()
)


class Ctx:
    """What a case's setup, check and guard functions see: its folder, the fixtures, the result."""

    def __init__(self, root: Path, fx: Path):
        self.root, self.fx = root, fx
        self.stdout = self.stderr = ""
        self.rc: Optional[int] = None
        self.alongside: Optional[tuple] = None  # (rc, stdout, stderr) of the case's second command

    def p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def marker(self) -> Path:
        return self.root / MARKER


Step = Callable[[Ctx], None]


@dataclass
class Case:
    name: str
    category: str
    argv: Sequence[str]  # "{fx}" and "{case}" are replaced by the fixtures' and the case's folders
    expect: str = "error"  # "error", "ok" or "either"
    setup: Sequence[Step] = ()
    check: Optional[Callable[[Ctx], Optional[str]]] = None  # a wrong result -> a message
    guard: Optional[Callable[[Ctx], Optional[str]]] = None  # a safety violation -> a message ("lost")
    protect: Optional[Sequence[str]] = None  # files (globs) that must not change; default: every file
    may_change: Sequence[str] = ()  # globs exempt from the default protection
    needs: Sequence[str] = ()  # fixtures
    timeout: Optional[float] = None
    extended: bool = False  # run only with --all
    alongside: Optional[Sequence[str]] = None  # a second command started at the same time (concurrency)


CASES: List[Case] = []


def case(name: str, category: str, argv: Sequence[str], expect: str = "error", setup=(), **kw) -> None:
    if callable(setup):
        setup = [setup]
    assert expect in ("error", "ok", "either"), expect
    assert not any(c.name == name for c in CASES), f"duplicate case {name}"
    CASES.append(Case(name, category, list(argv), expect, list(setup), extended=name in EXTENDED, **kw))


# -- argv builders ----------------------------------------------------------------------------


def _dashed(key: str) -> str:
    return "--" + key.replace("_", "-")


def tiny(
    *extra: str,
    cmd: str = "train",
    out: Optional[str] = "out",
    mp: Optional[Dict] = None,
    pp: Optional[Dict] = None,
    drop: Sequence[str] = (),
    **flags,
) -> List[str]:
    """`dmuh CMD` with the tiny recipe; flags=value overrides (None drops), mp / pp update the
    --model-param / --protocol-param sets (a value of None drops the key; a --protocol other than
    per-class drops the tiny per-class parameters unless pp is given)."""
    values = {k: v for k, v in TINY_FLAGS.items() if k not in drop}
    values.update(flags)
    argv = [cmd]
    for key, value in values.items():
        if value is not None:
            argv += [_dashed(key), str(value)]
    for flag, base, over in (("--model-param", TINY_MODEL, mp), ("--protocol-param", TINY_PROTOCOL, pp)):
        params = {**base, **(over or {})}
        if flag == "--protocol-param" and values.get("protocol", "per-class") != "per-class" and pp is None:
            params = {}
        for key, value in params.items():
            if value is not None:
                argv += [flag, f"{key}={value}"]
    if out is not None:
        argv += ["--out", out]
    return argv + list(extra) + ["--quiet"]


def pretrain(*extra: str, **flags) -> List[str]:
    flags.setdefault("objective", "ce")
    return tiny(*extra, cmd="pretrain", drop=("method", "trace_items", "train_map_items", "init"), **flags)


def compare(*extra: str, **flags) -> List[str]:
    argv = tiny(cmd="compare", drop=("method", "bits"), **flags)
    return argv[:-1] + list(extra) + ["--quiet"]


# -- setup steps ------------------------------------------------------------------------------


def copy_fx(name: str, dst: Optional[str] = None) -> Step:
    """Copy fixture `name` (a file or folder) into the case folder."""

    def step(ctx: Ctx) -> None:
        src, target = ctx.fx / name, ctx.p(dst or name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)

    return step


def run_copy(dst: str = "run", src: str = "base") -> Step:
    return copy_fx(src, dst)


def write(rel: str, content: Union[str, bytes, Callable[[Ctx], Union[str, bytes]]]) -> Step:
    def step(ctx: Ctx) -> None:
        data = content(ctx) if callable(content) else content
        path = ctx.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return step


def mkdir(rel: str) -> Step:
    return lambda ctx: ctx.p(rel).mkdir(parents=True, exist_ok=True)


def delete(rel: str) -> Step:
    def step(ctx: Ctx) -> None:
        path = ctx.p(rel)
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return step


def flip(rel: str, offset: Union[int, str]) -> Step:
    """Invert the byte at `offset` (negative: from the end; "mid": the middle)."""

    def step(ctx: Ctx) -> None:
        path = ctx.p(rel)
        data = bytearray(path.read_bytes())
        at = len(data) // 2 if offset == "mid" else int(offset) % len(data)
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))

    return step


def truncate(rel: str, keep: Union[float, int]) -> Step:
    """Keep the first `keep` bytes (a float: that fraction of the file)."""

    def step(ctx: Ctx) -> None:
        path = ctx.p(rel)
        data = path.read_bytes()
        n = int(len(data) * keep) if isinstance(keep, float) else keep
        path.write_bytes(data[:n])

    return step


def yaml_config(rel: str = "cfg.yaml", raw: str = "", drop: Sequence[str] = (), **over) -> Step:
    """The tiny recipe as YAML, minus `drop`, with `over` (dumped) and `raw` (verbatim) appended."""

    def step(ctx: Ctx) -> None:
        import yaml

        values = {k: v for k, v in TINY_YAML.items() if k not in drop and k not in over}
        values.update(over)
        text = yaml.safe_dump(values, sort_keys=False) + raw
        ctx.p(rel).write_text(text)

    return step


def edit_yaml(rel: str, raw_replace: Callable[[str], str]) -> Step:
    def step(ctx: Ctx) -> None:
        path = ctx.p(rel)
        path.write_text(raw_replace(path.read_text()))

    return step


def set_yaml_field(rel: str, key: str, value_text: str) -> Step:
    """Replace the line `key: ...` of a YAML file with `key: value_text`."""
    return edit_yaml(rel, lambda text: re.sub(rf"(?m)^{re.escape(key)}:.*$", f"{key}: {value_text}", text, count=1))


def split_checksum(record: dict) -> str:
    fields = ("protocol", "seed", "topk", "fingerprint", "params", "query", "train", "database")
    text = json.dumps({k: record.get(k) for k in fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def edit_split(rel: str, change: Callable[[dict], None], checksum: str = "recompute") -> Step:
    """Edit split.json; checksum: "keep" the old one, "drop" it, or "recompute" it (a consistent file)."""

    def step(ctx: Ctx) -> None:
        path = ctx.p(rel)
        record = json.loads(path.read_text())
        change(record)
        if checksum == "drop":
            record.pop("checksum", None)
        elif checksum == "recompute" and "checksum" in record:
            record["checksum"] = split_checksum(record)
        path.write_text(json.dumps(record, separators=(",", ":")) + "\n")

    return step


def queries_are_training_items(record: dict) -> None:
    record["query"] = list(record["train"][: len(record["query"])])


class OpensMarker:
    """Unpickling this calls open(path, "w"): the marker file exists iff code from the file ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(
    rel: str, kind: str = "pickle", wrap: Callable[[object], object] = lambda evil: {"model": evil}
) -> Step:
    """A pickle that creates ctx.marker when unpickled: plain pickle, or torch.save's zip format."""

    def step(ctx: Ctx) -> None:
        payload = wrap(OpensMarker(str(ctx.marker)))
        path = ctx.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "torch":
            import torch

            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=2))

    return step


def evil_npz(rel: str, key: str = "features", other: Optional[Dict[str, np.ndarray]] = None) -> Step:
    """An .npz whose `key` is an object array (a pickle that creates the marker)."""

    def step(ctx: Ctx) -> None:
        arrays = dict(other or {})
        arrays[key] = np.array([OpensMarker(str(ctx.marker)), 1], dtype=object)
        np.savez(ctx.p(rel), **arrays)

    return step


def no_marker(ctx: Ctx) -> Optional[str]:
    return f"SECURITY: {MARKER} was created: code from the input ran" if ctx.marker.exists() else None


def digits_arrays(count: Optional[int] = None):
    """(features (N, 64) float32, labels (N,) int64, images (N, 8, 8) uint8) of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    features, labels = digits.data.astype(np.float32), digits.target.astype(np.int64)
    if count is not None:
        features, labels, images = features[:count], labels[:count], images[:count]
    return features, labels, images


def features_npz(rel: str, edit: Optional[Callable[[Dict[str, np.ndarray]], None]] = None) -> Step:
    def step(ctx: Ctx) -> None:
        features, labels, _ = digits_arrays()
        arrays = {"features": features.copy(), "labels": labels.copy()}
        if edit:
            edit(arrays)
        np.savez(ctx.p(rel), **arrays)

    return step


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(
    rel: str,
    classes: int = 10,
    per_class: int = 6,
    empty: Sequence[str] = (),
    bad: Optional[Dict[str, bytes]] = None,
    sizes: Optional[Dict[int, int]] = None,
) -> Step:
    """rel/<class>/<i>.png from the digits (8x8 grayscale); `empty` class folders with no image,
    `bad` {relative path: bytes} written as is, `sizes` {item number: edge} resized images."""

    def step(ctx: Ctx) -> None:
        from PIL import Image

        _, labels, images = digits_arrays()
        root = ctx.p(rel)
        number = 0
        for c in range(classes):
            folder = root / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, index in enumerate(np.flatnonzero(labels == c)[:per_class]):
                pixels = images[index]
                if sizes and number in sizes:
                    pixels = np.asarray(Image.fromarray(pixels).resize((sizes[number], sizes[number])))
                (folder / f"{i}.png").write_bytes(png_bytes(pixels))
                number += 1
        for name in empty:
            (root / name).mkdir(parents=True, exist_ok=True)
        for name, data in (bad or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)

    return step


def zip_folder(src_rel: str, zip_rel: str) -> Step:
    def step(ctx: Ctx) -> None:
        src = ctx.p(src_rel)
        with zipfile.ZipFile(ctx.p(zip_rel), "w") as archive:
            for path in sorted(src.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(src).as_posix())

    return step


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 ndim, big-endian dims, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def idx_folder(
    rel: str,
    *,
    train_labels=None,
    test_labels=None,
    truncate_images: Optional[int] = None,
    magic: Optional[bytes] = None,
    label_count: Optional[int] = None,
) -> Step:
    """rel/train-*-idx?-ubyte (300 digits) and rel/t10k-* (100 digits), then the damage asked for."""

    def step(ctx: Ctx) -> None:
        _, labels, images = digits_arrays()
        root = ctx.p(rel)
        root.mkdir(parents=True, exist_ok=True)
        pairs = {"train": (images[:300], labels[:300].copy()), "t10k": (images[300:400], labels[300:400].copy())}
        if train_labels is not None:
            train_labels(pairs["train"][1])
        if test_labels is not None:
            test_labels(pairs["t10k"][1])
        for prefix, (pixels, classes) in pairs.items():
            image_data, label_data = idx_bytes(pixels), idx_bytes(classes[:label_count] if label_count else classes)
            if prefix == "train" and truncate_images is not None:
                image_data = image_data[:truncate_images]
            if prefix == "train" and magic is not None:
                image_data = magic + image_data[4:]
            (root / f"{prefix}-images-idx3-ubyte").write_bytes(image_data)
            (root / f"{prefix}-labels-idx1-ubyte").write_bytes(label_data)

    return step


def list_setup(
    lines: Callable[[Ctx], List[str]],
    list_rel: str = "root/list.txt",
    encoding: str = "utf-8",
    images: str = "outside",
    classes: int = 2,
    per_class: int = 8,
) -> Step:
    """PNGs in <images>/c<C>_<i>.png (next to root/), and a list file of `lines(ctx)`."""

    def step(ctx: Ctx) -> None:
        _, labels, pixels = digits_arrays()
        folder = ctx.p(images)
        folder.mkdir(parents=True, exist_ok=True)
        ctx.p("root").mkdir(parents=True, exist_ok=True)
        for c in range(classes):
            for i, index in enumerate(np.flatnonzero(labels == c)[:per_class]):
                (folder / f"c{c}_{i}.png").write_bytes(png_bytes(pixels[index]))
        path = ctx.p(list_rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes("\n".join(lines(ctx)).encode(encoding) + b"\n")

    return step


def listed(prefix: Callable[[Ctx], str], classes: int = 2, per_class: int = 8) -> Callable[[Ctx], List[str]]:
    """List lines `PREFIX/c<C>_<i>.png 0 1 ...` for every image list_setup writes."""

    def lines(ctx: Ctx) -> List[str]:
        out = []
        for c in range(classes):
            for i in range(per_class):
                labels = " ".join("1" if k == c else "0" for k in range(classes))
                out.append(f"{prefix(ctx)}/c{c}_{i}.png {labels}")
        return out

    return lines


# -- checks -----------------------------------------------------------------------------------


def _last_number(pattern: str, text: str) -> Optional[float]:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def trained(out: str = "out", min_epoch: int = 1) -> Callable[[Ctx], Optional[str]]:
    """The run has a checkpoint and a log reaching `min_epoch`, and the summary's MAP is in [0, 1]."""

    def check(ctx: Ctx) -> Optional[str]:
        run = ctx.p(out)
        if not (run / "checkpoint.safetensors").is_file():
            return f"no {out}/checkpoint.safetensors"
        value = _last_number(r"\bmap (-?[0-9.eE+-]+|nan|inf)", ctx.stdout)
        if value is None:
            return "no MAP in the summary line"
        if not (0.0 <= value <= 1.0):
            return f"MAP {value} outside [0, 1]"
        loss = _last_number(r"\bloss (-?[0-9.eE+-]+|nan|inf)", ctx.stdout)
        if loss is not None and not np.isfinite(loss):
            return f"loss {loss} is not finite"
        log = run / "log.csv"
        if log.is_file():
            rows = [line for line in log.read_text().splitlines()[1:] if line.strip()]
            if not rows or int(float(rows[-1].split(",")[0])) < min_epoch:
                return f"log.csv does not reach epoch {min_epoch}"
        return None

    return check


def made(*rels: str, min_size: int = 1) -> Callable[[Ctx], Optional[str]]:
    def check(ctx: Ctx) -> Optional[str]:
        for rel in rels:
            path = ctx.p(rel)
            if not path.is_file() or path.stat().st_size < min_size:
                return f"{rel} was not written"
        return None

    return check


def all_of(*checks) -> Callable[[Ctx], Optional[str]]:
    def check(ctx: Ctx) -> Optional[str]:
        for one in checks:
            message = one(ctx)
            if message:
                return message
        return None

    return check


def map_printed(ctx: Ctx) -> Optional[str]:
    values = [float(v) for v in re.findall(r"MAP@all \(ties \w+\): (\S+)", ctx.stdout)]
    if not values:
        return "no MAP@all line printed"
    bad = [v for v in values if not (0.0 <= v <= 1.0)]
    return f"MAP {bad[0]} outside [0, 1]" if bad else None


def eval_json(rel: str) -> Callable[[Ctx], Optional[str]]:
    def check(ctx: Ctx) -> Optional[str]:
        try:
            report = json.loads(ctx.p(rel).read_text())
        except (OSError, ValueError) as error:
            return f"{rel}: no readable report ({error})"
        maps = [v.get("map") for v in (report.get("map_by_ties") or {}).values()]
        if not maps or not all(isinstance(m, (int, float)) and 0.0 <= m <= 1.0 for m in maps):
            return f"{rel}: MAP values {maps} not in [0, 1]"
        return None

    return check


def search_json(k: int, queries: Optional[int] = None, order: str = "distance") -> Callable[[Ctx], Optional[str]]:
    """The --json report: `queries` queries, 1..k results each, ranked by `order` (re-ranked
    results by weighted_distance), no negative Hamming distance."""

    def check(ctx: Ctx) -> Optional[str]:
        try:
            report = json.loads(ctx.stdout)
        except ValueError:
            return "stdout is not the JSON report"
        found = report.get("queries") or []
        if queries is not None and len(found) != queries:
            return f"{len(found)} query results, expected {queries}"
        for query in found:
            results = query.get("results") or []
            if not results or len(results) > k:
                return f"query {query.get('query')}: {len(results)} results for --k {k}"
            ranked = [r.get(order) for r in results]
            if None in ranked or ranked != sorted(ranked):
                return f"query {query.get('query')}: {order} {ranked[:5]}... not in rank order"
            if min(r["distance"] for r in results) < 0:
                return f"query {query.get('query')}: a negative Hamming distance"
        return None

    return check


def codes_count(rel: str, count: int) -> Callable[[Ctx], Optional[str]]:
    def check(ctx: Ctx) -> Optional[str]:
        try:
            with np.load(ctx.p(rel), allow_pickle=False) as f:
                n = f["codes"].shape[0]
        except Exception as error:  # noqa: BLE001 - any failure is a wrong result
            return f"{rel}: unreadable codes file ({type(error).__name__})"
        return None if n == count else f"{rel}: {n} codes, expected {count}"

    return check


def stderr_mentions(word: str) -> Callable[[Ctx], Optional[str]]:
    return lambda ctx: None if word.lower() in ctx.stderr.lower() else f"no {word!r} on stderr"


def unchanged_text(rel: str, text: str) -> Callable[[Ctx], Optional[str]]:
    return lambda ctx: None if ctx.p(rel).read_text() == text else f"{rel} changed"


# =============================================================================================
# The cases


def define_cases() -> None:
    define_flag_cases()
    define_yaml_cases()
    define_data_cases()
    define_run_directory_cases()
    define_resume_cases()
    define_security_cases()
    define_retrieval_cases()
    define_figure_cases()
    define_overwrite_cases()
    define_hardening_cases()


def define_flag_cases() -> None:
    F = "flags"
    bad_train = {
        "batch-size-0": dict(batch_size="0"),
        "batch-size-negative": dict(batch_size="-5"),
        "batch-size-text": dict(batch_size="abc"),
        "batch-size-float": dict(batch_size="1.5"),
        "batch-size-absurd": dict(batch_size="1e12"),
        "eval-batch-size-0": dict(eval_batch_size="0"),
        "eval-batch-size-negative": dict(eval_batch_size="-1"),
        "lr-negative": dict(lr="-0.05"),
        "lr-nan": dict(lr="nan"),
        "lr-inf": dict(lr="inf"),
        "lr-1e9": dict(lr="1e9"),
        "lr-0": dict(lr="0"),
        "lr-text": dict(lr="fast"),
        "lr-end-negative": dict(lr_end="-1"),
        "lr-end-above-lr": dict(lr="0.05", lr_end="1"),
        "lr-end-nan": dict(lr_end="nan"),
        "lr-schedule-epochs-0": dict(lr_schedule_epochs="0"),
        "weight-decay-negative": dict(weight_decay="-1"),
        "weight-decay-nan": dict(weight_decay="nan"),
        "weight-decay-absurd": dict(weight_decay="1e6"),
        "momentum-2": dict(momentum="2"),
        "momentum-negative": dict(momentum="-0.1"),
        "momentum-1": dict(momentum="1"),
        "momentum-nan": dict(momentum="nan"),
        "warmup-epochs-negative": dict(warmup_epochs="-1"),
        "epochs-0": dict(epochs="0"),
        "epochs-negative": dict(epochs="-1"),
        "epochs-float": dict(epochs="2.5"),
        "epochs-absurd": dict(epochs="1000000"),
        "bits-0": dict(bits="0"),
        "bits-100000": dict(bits="100000"),
        "bits-negative": dict(bits="-8"),
        "bits-float": dict(bits="8.0"),
        "amp-maybe": dict(amp="maybe"),
        "compile-maybe": dict(compile="maybe"),
        "channels-last-2": dict(channels_last="2"),
        "allow-outside-root-maybe": dict(allow_outside_root="maybe"),
        "image-size-0": dict(image_size="0"),
        "image-size-3": dict(image_size="3"),
        "image-size-100000": dict(image_size="100000"),
        "image-size-text": dict(image_size="big"),
        "hash-norm-unknown": dict(hash_norm="layernorm"),
        "protocol-unknown": dict(protocol="nosuch"),
        "protocol-cifar10-on-digits": dict(protocol="cifar10"),
        "split-seed-negative": dict(split_seed="-1"),
        "seed-negative": dict(seed="-1"),
        "seed-text": dict(seed="abc"),
        "model-unknown": dict(model="nosuchnet"),
        "method-unknown": dict(method="nosuch"),
        "optimizer-unknown": dict(optimizer="adam"),
        "augment-unknown": dict(augment="rotate"),
        "device-gpu": dict(device="gpu"),
        "device-cuda-99": dict(device="cuda:99"),
        "grad-clip-0": dict(grad_clip="0"),
        "grad-clip-negative": dict(grad_clip="-1"),
        "grad-clip-nan": dict(grad_clip="nan"),
        "eval-every-minus-2": dict(eval_every="-2"),
        "trace-items-negative": dict(trace_items="-1"),
        "checkpoint-every-0": dict(checkpoint_every="0"),
        "train-map-items-negative": dict(train_map_items="-1"),
        "backbone-lr-scale-negative": dict(backbone_lr_scale="-1"),
        "backbone-lr-scale-nan": dict(backbone_lr_scale="nan"),
        "init-missing": dict(init="no/such/pretrain-run"),
        "pretrained-missing": dict(pretrained="missing.pth"),
    }
    for name, flags in bad_train.items():
        case(f"train/{name}", F, tiny(**flags))
    case("train/param-alpha-text", F, tiny("-p", "alpha=abc"))
    case("train/param-alpha-2", F, tiny("-p", "alpha=2"))
    case("train/param-alpha-nan", F, tiny("-p", "alpha=.nan"))
    case("train/param-unknown", F, tiny("-p", "nosuchparam=1"))
    case("train/param-no-equals", F, tiny("-p", "alpha"))
    case("train/model-param-width-0", F, tiny(mp={"width": "0"}))
    # A learning-rate warm-up longer than the run is accepted: the rate ramps up for the whole run.
    case("train/warmup-epochs-above-epochs", F, tiny(warmup_epochs="5"), expect="ok")
    case("train/model-param-width-text", F, tiny(mp={"width": "abc"}))
    case("train/model-param-unknown", F, tiny(mp={"nosuch": "1"}))
    case("train/protocol-param-text", F, tiny(pp={"query_per_class": "abc"}))
    case("train/protocol-param-0", F, tiny(pp={"query_per_class": "0"}))
    case("train/protocol-param-too-many", F, tiny(pp={"query_per_class": "100000"}))
    case("train/protocol-param-unknown", F, tiny(pp={"nosuch": "1"}))
    case("train/protocol-param-with-digits-protocol", F, tiny(protocol="digits", pp={"query_per_class": "5"}))
    case("train/unknown-flag", F, tiny("--nosuch-flag", "1"))
    case("train/cache-dir-is-a-file", F, tiny(cache_dir="notes.txt"), setup=write("notes.txt", "my notes\n"))
    # accepted values: must train
    case("train/image-size-8", F, tiny(image_size="8"), expect="ok", check=trained())
    case("train/hash-norm-none", F, tiny(hash_norm="none"), expect="ok", check=trained())
    case(
        "train/protocol-per-class-folder",
        F,
        tiny(data="imgs", pp=SMALL_PROTOCOL),
        expect="ok",
        setup=copy_fx("imgs"),
        check=trained(),
    )
    case("train/data-root-with-digits", F, tiny(data_root="no/such/root"), expect="either", check=trained())
    case("train/lr-10-max", F, tiny(lr="10", lr_end="0"), expect="either", check=trained())

    P = "flags-pretrain"
    for name, flags in {
        "epochs-0": dict(epochs="0"),
        "objective-unknown": dict(objective="byol"),
        "unlabeled-batch-size-1": dict(unlabeled_batch_size="1"),
        "temperature-0": dict(temperature="0"),
        "temperature-nan": dict(temperature="nan"),
        "projection-dim-0": dict(projection_dim="0"),
        "lr-nan": dict(lr="nan"),
        "batch-size-0": dict(batch_size="0"),
    }.items():
        case(f"pretrain/{name}", P, pretrain(**flags))
    case("pretrain/ok", P, pretrain(), expect="ok", check=made("out/backbone.safetensors"))

    C = "flags-compare"
    case("compare/bits-text", C, compare("--methods", "dmuh", "--bits", "8,abc"))
    case("compare/bits-0", C, compare("--methods", "dmuh", "--bits", "0"))
    case("compare/methods-unknown", C, compare("--methods", "nosuch", "--bits", "8"))
    case("compare/methods-empty", C, compare("--methods", "", "--bits", "8"))
    case("compare/seeds-negative", C, compare("--methods", "dmuh", "--bits", "8", "--seeds", "-1"))
    case("compare/seeds-text", C, compare("--methods", "dmuh", "--bits", "8", "--seeds", "a,b"))
    case("compare/grid-no-values", C, compare("--methods", "dmuh", "--bits", "8", "--grid", "dmuh.alpha="))
    case("compare/grid-no-method", C, compare("--methods", "dmuh", "--bits", "8", "--grid", "alpha=0.5"))
    case("compare/jobs-0", C, compare("--methods", "dmuh", "--bits", "8", "--jobs", "0"))
    case("compare/against-unknown", C, compare("--methods", "dmuh", "--bits", "8", "--against", "nosuch"))
    case("compare/param-without-method", C, compare("--methods", "dmuh", "--bits", "8", "-p", "alpha=0.5"))

    D = "flags-demo"
    case("demo/epochs-0", D, ["demo", "--epochs", "0", "--out", "demo"])
    case("demo/epochs-negative", D, ["demo", "--epochs", "-3", "--out", "demo"])
    case("demo/bits-text", D, ["demo", "--bits", "abc", "--epochs", "1", "--out", "demo"])
    case("demo/bits-0", D, ["demo", "--bits", "0", "--epochs", "1", "--out", "demo"])


def define_yaml_cases() -> None:
    Y = "yaml"
    run = ["train", "--config", "cfg.yaml", "--out", "out", "--quiet"]
    bad = {
        "model-params-scalar": dict(raw="model_params: 8\n", drop=("model_params",)),
        "lr-0.05abc": dict(raw="lr: 0.05abc\n"),
        "epochs-quoted": dict(raw='epochs: "1"\n', drop=("epochs",)),
        "epochs-1.5": dict(raw="epochs: 1.5\n", drop=("epochs",)),
        "epochs-true": dict(raw="epochs: true\n", drop=("epochs",)),
        "epochs-null": dict(raw="epochs: null\n", drop=("epochs",)),
        "method-params-list-value": dict(raw="method_params: {alpha: [1, 2]}\n"),
        "method-params-unknown": dict(raw="method_params: {nosuch: 1}\n"),
        "unknown-key": dict(raw="nosuch_key: 1\n"),
        "typo-key": dict(raw="batchsize: 64\n"),
        "lr-nan": dict(raw="lr: .nan\n"),
        "lr-inf": dict(raw="lr: .inf\n"),
        "lr-1e9": dict(raw="lr: 1.0e+9\n"),
        "batch-size-0": dict(raw="batch_size: 0\n", drop=("batch_size",)),
        "bits-text": dict(raw="bits: abc\n", drop=("bits",)),
        "bits-list": dict(raw="bits: [8, 16]\n", drop=("bits",)),
        "model-params-width-text": dict(raw="model_params: {input_size: 8, width: abc}\n", drop=("model_params",)),
        "protocol-params-list": dict(raw="protocol_params: [1, 2]\n", drop=("protocol_params",)),
        "method-unknown": dict(raw="method: nosuch\n", drop=("method",)),
        "amp-text": dict(raw="amp: maybe\n"),
        "data-root-list": dict(raw="data_root: [a]\n"),
        "duplicate-key": dict(raw="epochs: 2\n"),
    }
    for name, spec in bad.items():
        case(f"yaml/{name}", Y, run, setup=yaml_config(**spec))
    case("yaml/non-mapping-list", Y, run, setup=write("cfg.yaml", "- epochs\n- 1\n"))
    case("yaml/non-mapping-scalar", Y, run, setup=write("cfg.yaml", "just some text\n"))
    case("yaml/invalid-syntax", Y, run, setup=write("cfg.yaml", "epochs: [1, 2\nbits: 8\n"))
    case("yaml/tab-indented", Y, run, setup=write("cfg.yaml", "model_params:\n\twidth: 8\n"))
    case("yaml/binary-garbage", Y, run, setup=write("cfg.yaml", bytes(range(256)) * 4))
    case("yaml/not-utf8", Y, run, setup=write("cfg.yaml", "data: digits\nout: caf\xe9\n".encode("latin-1")))
    case("yaml/missing-file", Y, run)
    case("yaml/is-a-directory", Y, run, setup=mkdir("cfg.yaml"))
    case(
        "yaml/empty-file-with-flags",
        Y,
        tiny("--config", "cfg.yaml"),
        expect="ok",
        setup=write("cfg.yaml", ""),
        check=trained(),
    )
    case("yaml/valid-tiny", Y, run, expect="ok", setup=yaml_config(), check=trained())
    case(
        "yaml/flag-overrides-bad-field",
        Y,
        run + ["--epochs", "1"],
        expect="either",
        setup=yaml_config(raw="epochs: 1.5\n", drop=("epochs",)),
        check=trained(),
    )
    case(
        "pretrain/yaml-unknown-key",
        Y,
        ["pretrain", "--config", "cfg.yaml", "--out", "out", "--quiet"],
        setup=yaml_config(
            raw="objective: ce\nnosuch_key: 1\n", drop=("method", "trace_items", "train_map_items", "init")
        ),
    )
    case(
        "compare/yaml-garbage",
        Y,
        ["compare", "--config", "cfg.yaml", "--methods", "dmuh", "--bits", "8", "--out", "out"],
        setup=write("cfg.yaml", b"\x00\x01\x02garbage\xff\xfe"),
    )


def define_data_cases() -> None:
    D = "data"
    small = SMALL_PROTOCOL
    for name, spec in {
        "missing-path": "no/such/folder",
        "features-missing": "features:missing.npz",
        "idx-missing": "idx:no/such",
        "list-missing": "list:missing.txt",
        "cifar-batches-missing": "cifar-batches:no/such",
        "unknown-scheme": "hdf5:data.h5",
    }.items():
        case(f"data/{name}", D, tiny(data=spec))
    case("data/plain-file", D, tiny(data="notes.md"), setup=write("notes.md", "# not data\n"))
    # image folders and zips
    case("data/empty-class-folder", D, tiny(data="imgs", pp=small), setup=image_folder("imgs", empty=["c_empty"]))
    case(
        "data/folder-without-images",
        D,
        tiny(data="imgs", pp=small),
        setup=[mkdir("imgs/a"), mkdir("imgs/b"), write("imgs/a/readme.txt", "x")],
    )
    case("data/not-a-zip", D, tiny(data="images.zip", pp=small), setup=write("images.zip", "this is not a zip\n" * 20))
    case(
        "data/zip-truncated",
        D,
        tiny(data="images.zip", pp=small),
        setup=[image_folder("imgs"), zip_folder("imgs", "images.zip"), delete("imgs"), truncate("images.zip", 0.5)],
    )
    case(
        "data/zip-member-corrupt",
        D,
        tiny(data="images.zip", pp=small),
        setup=[image_folder("imgs"), zip_folder("imgs", "images.zip"), delete("imgs"), flip("images.zip", 200)],
    )
    case(
        "data/zip-valid",
        D,
        tiny(data="images.zip", pp=small),
        expect="ok",
        setup=[image_folder("imgs"), zip_folder("imgs", "images.zip"), delete("imgs")],
        check=trained(),
    )
    case(
        "data/image-garbage-bytes",
        D,
        tiny(data="imgs", pp=small),
        setup=image_folder("imgs", bad={"c0/bad.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20}),
    )
    case("data/image-zero-bytes", D, tiny(data="imgs", pp=small), setup=image_folder("imgs", bad={"c1/empty.png": b""}))
    case(
        "data/image-truncated",
        D,
        tiny(data="imgs", pp=small),
        setup=[image_folder("imgs"), truncate("imgs/c2/0.png", 0.5)],
    )
    case("data/image-sizes-mixed", D, tiny(data="imgs", pp=small), setup=image_folder("imgs", sizes={3: 12}))

    # features .npz
    def nan_row(arrays):
        arrays["features"][7, 3] = np.nan

    def inf_row(arrays):
        arrays["features"][11, 0] = np.inf

    def drop_labels(arrays):
        del arrays["labels"]

    def short_labels(arrays):
        arrays["labels"] = arrays["labels"][:-5]

    def negative_label(arrays):
        arrays["labels"][3] = -1

    def one_dim(arrays):
        arrays["features"] = arrays["features"][:, 0].copy()

    def text_features(arrays):
        arrays["features"] = arrays["features"].astype(str)

    mlp = dict(data="features:f.npz", model="mlp", mp={"input_size": None, "width": None, "hidden": "[16]"})
    for name, edit in {
        "nan-row": nan_row,
        "inf-row": inf_row,
        "no-labels": drop_labels,
        "labels-too-few": short_labels,
        "negative-label": negative_label,
        "1d-features": one_dim,
        "text-features": text_features,
    }.items():
        case(f"data/features-{name}", D, tiny(**mlp), setup=features_npz("f.npz", edit))
    case("data/features-truncated", D, tiny(**mlp), setup=[features_npz("f.npz"), truncate("f.npz", 0.6)])
    case("data/features-not-npz", D, tiny(**mlp), setup=write("f.npz", "features,labels\n1,2\n"))
    case("data/features-valid", D, tiny(**mlp), expect="ok", setup=features_npz("f.npz"), check=trained())
    case("data/features-image-size", D, tiny(image_size="8", **mlp), setup=features_npz("f.npz"))
    # IDX
    idx = dict(data="idx:mnist", pp=small)

    def label_200(classes):
        classes[5] = 200

    case("data/idx-label-out-of-range", D, tiny(**idx), setup=idx_folder("mnist", test_labels=label_200))
    case("data/idx-truncated-images", D, tiny(**idx), setup=idx_folder("mnist", truncate_images=16 + 64 * 100 + 10))
    case("data/idx-truncated-header", D, tiny(**idx), setup=idx_folder("mnist", truncate_images=6))
    case("data/idx-bad-magic", D, tiny(**idx), setup=idx_folder("mnist", magic=b"\x12\x34\x08\x03"))
    case("data/idx-label-count-mismatch", D, tiny(**idx), setup=idx_folder("mnist", label_count=250))
    case("data/idx-valid", D, tiny(**idx), expect="ok", setup=idx_folder("mnist"), check=trained())
    # list files
    lst = dict(data="list:root/list.txt", data_root="root", pp=small)
    up = listed(lambda ctx: "../outside")
    absolute = listed(lambda ctx: str(ctx.p("outside")))
    case("data/list-escapes-root", D, tiny(**lst), setup=list_setup(up))
    case("data/list-absolute-elsewhere", D, tiny(**lst), setup=list_setup(absolute))
    case(
        "data/list-escapes-root-allowed",
        D,
        tiny(allow_outside_root="true", **lst),
        expect="ok",
        setup=list_setup(up),
        check=trained(),
    )
    case(
        "data/list-absolute-allowed",
        D,
        tiny(allow_outside_root="true", **lst),
        expect="ok",
        setup=list_setup(absolute),
        check=trained(),
    )
    case(
        "data/list-allowed-but-missing-files",
        D,
        tiny(allow_outside_root="true", **lst),
        setup=[list_setup(up), delete("outside")],
    )
    case(
        "data/list-etc-passwd",
        D,
        tiny(**lst),
        setup=list_setup(lambda ctx: ["/etc/passwd 1 0"] + listed(lambda c: "../outside")(ctx)[1:]),
    )
    inside = listed(lambda ctx: "imgs")
    lst_in = lst
    case(
        "data/list-not-utf8",
        D,
        tiny(**lst_in),
        setup=list_setup(
            lambda ctx: ["imgs/caf\xe9.png 1 0"] + inside(ctx)[1:], images="root/imgs", encoding="latin-1"
        ),
    )
    case(
        "data/list-label-width",
        D,
        tiny(**lst_in),
        setup=list_setup(lambda ctx: inside(ctx)[:-1] + ["imgs/c1_7.png 0 1 0"], images="root/imgs"),
    )
    case(
        "data/list-label-not-binary",
        D,
        tiny(**lst_in),
        setup=list_setup(lambda ctx: inside(ctx)[:-1] + ["imgs/c1_7.png 0 7"], images="root/imgs"),
    )
    case("data/list-empty", D, tiny(**lst_in), setup=list_setup(lambda ctx: [""], images="root/imgs"))
    case(
        "data/list-missing-image",
        D,
        tiny(**lst_in),
        setup=list_setup(lambda ctx: inside(ctx) + ["imgs/nosuch.png 1 0"], images="root/imgs"),
    )
    case(
        "data/list-valid", D, tiny(**lst_in), expect="ok", setup=list_setup(inside, images="root/imgs"), check=trained()
    )
    case(
        "data/list-data-root-missing",
        D,
        tiny(**{**lst_in, "data_root": "no/such/root"}),
        setup=list_setup(inside, images="root/imgs"),
    )
    # CIFAR batches
    case(
        "data/cifar-garbage-batch",
        D,
        tiny(data="cifar-batches:cifar", pp=small),
        setup=[write("cifar/data_batch_1", b"garbage" * 100), write("cifar/test_batch", b"garbage" * 100)],
    )
    case(
        "data/cifar-wrong-shape",
        D,
        tiny(data="cifar-batches:cifar", pp=small),
        setup=[
            write("cifar/data_batch_1", pickle.dumps({b"data": np.zeros((10, 5), np.uint8), b"labels": [0] * 10})),
            write("cifar/test_batch", pickle.dumps({b"data": np.zeros((10, 5), np.uint8), b"labels": [0] * 10})),
        ],
    )


def define_run_directory_cases() -> None:
    R = "run-directory"
    ev = ["evaluate", "--run", "run", "--quiet"]
    need = ("base",)
    case(
        "run/evaluate-ok",
        R,
        ev,
        expect="ok",
        setup=run_copy(),
        needs=need,
        check=all_of(map_printed, eval_json("run/eval.json")),
    )
    case("run/evaluate-missing-run", R, ["evaluate", "--run", "no/such/run"])
    case("run/evaluate-no-run-flag", R, ["evaluate"])
    case("run/evaluate-empty-folder", R, ev, setup=mkdir("run"))
    case("run/evaluate-a-file", R, ["evaluate", "--run", "notes.txt"], setup=write("notes.txt", "x\n"))
    case("run/config-missing", R, ev, setup=[run_copy(), delete("run/config.yaml")], needs=need)
    case("run/config-garbled", R, ev, setup=[run_copy(), write("run/config.yaml", bytes(range(256)))], needs=need)
    case("run/config-invalid-yaml", R, ev, setup=[run_copy(), write("run/config.yaml", "bits: [8\n")], needs=need)
    case(
        "run/config-bad-field", R, ev, setup=[run_copy(), set_yaml_field("run/config.yaml", "bits", "abc")], needs=need
    )
    case(
        "run/config-bits-changed",
        R,
        ev,
        setup=[run_copy(), set_yaml_field("run/config.yaml", "bits", "16")],
        needs=need,
    )
    case(
        "run/config-model-changed",
        R,
        ev,
        setup=[run_copy(), edit_yaml("run/config.yaml", lambda t: t.replace("width: 8", "width: 16"))],
        needs=need,
    )
    case(
        "run/config-method-changed",
        R,
        ev,
        setup=[run_copy(), set_yaml_field("run/config.yaml", "method", "hashnet")],
        needs=need,
    )
    case(
        "run/config-data-changed",
        R,
        ev,
        setup=[run_copy(), features_npz("f.npz"), set_yaml_field("run/config.yaml", "data", "features:f.npz")],
        needs=need,
    )
    case(
        "run/split-missing",
        R,
        ev,
        expect="either",
        setup=[run_copy(), delete("run/split.json")],
        needs=need,
        check=map_printed,
    )
    case(
        "run/split-queries-are-train-checksum-kept",
        R,
        ev,
        setup=[run_copy(), edit_split("run/split.json", queries_are_training_items, "keep")],
        needs=need,
    )
    case(
        "run/split-queries-are-train-no-checksum",
        R,
        ev,
        setup=[run_copy(), edit_split("run/split.json", queries_are_training_items, "drop")],
        needs=need,
    )
    case(
        "run/split-queries-are-train-consistent",
        R,
        ev,
        setup=[run_copy(), edit_split("run/split.json", queries_are_training_items, "recompute")],
        needs=need,
    )
    case("run/split-truncated", R, ev, setup=[run_copy(), truncate("run/split.json", 0.5)], needs=need)
    case(
        "run/split-empty-query",
        R,
        ev,
        setup=[run_copy(), edit_split("run/split.json", lambda r: r.update(query=[]), "recompute")],
        needs=need,
    )
    case(
        "run/split-index-out-of-range",
        R,
        ev,
        setup=[run_copy(), edit_split("run/split.json", lambda r: r["database"].append(10**6), "recompute")],
        needs=need,
    )
    case("run/split-garbage", R, ev, setup=[run_copy(), write("run/split.json", b"\x00garbage\xff")], needs=need)
    case("run/split-not-a-split", R, ev, setup=[run_copy(), write("run/split.json", "[1, 2, 3]\n")], needs=need)
    for offset in (0, 9, 200, "mid", -1):
        case(
            f"run/checkpoint-flip-{offset}",
            R,
            ev,
            setup=[run_copy(), flip("run/checkpoint.safetensors", offset)],
            needs=need,
        )
    case("run/checkpoint-truncated", R, ev, setup=[run_copy(), truncate("run/checkpoint.safetensors", 0.5)], needs=need)
    case(
        "run/checkpoint-header-only", R, ev, setup=[run_copy(), truncate("run/checkpoint.safetensors", 64)], needs=need
    )
    case("run/checkpoint-zero-bytes", R, ev, setup=[run_copy(), write("run/checkpoint.safetensors", b"")], needs=need)
    case("run/checkpoint-missing", R, ev, setup=[run_copy(), delete("run/checkpoint.safetensors")], needs=need)
    case(
        "run/checkpoint-is-a-directory",
        R,
        ev,
        setup=[run_copy(), delete("run/checkpoint.safetensors"), mkdir("run/checkpoint.safetensors")],
        needs=need,
    )
    case(
        "run/checkpoint-of-other-run",
        R,
        ev,
        setup=[run_copy(), copy_fx("feat/checkpoint.safetensors", "run/checkpoint.safetensors")],
        needs=("base", "feat"),
    )
    case(
        "run/encode-checkpoint-flip",
        R,
        ["encode", "--run", "run", "--images", "imgs", "--out", "c.npz", "--quiet"],
        setup=[run_copy(), copy_fx("imgs"), flip("run/checkpoint.safetensors", "mid")],
        needs=need,
    )
    case(
        "run/export-onnx-config-garbled",
        R,
        ["export-onnx", "--run", "run", "--out", "m.onnx"],
        setup=[run_copy(), write("run/config.yaml", "::: not yaml :::\n\t-")],
        needs=need,
    )
    case("run/convert-without-legacy", R, ["convert-checkpoint", "--run", "run"], setup=run_copy(), needs=need)
    case(
        "run/convert-legacy-ok",
        R,
        ["convert-checkpoint", "--run", "run"],
        expect="ok",
        setup=[run_copy(), delete("run/checkpoint.safetensors"), copy_fx("legacy.pt", "run/checkpoint.pt")],
        needs=("base", "legacy"),
        check=made("run/checkpoint.safetensors"),
    )
    case(
        "run/convert-legacy-truncated",
        R,
        ["convert-checkpoint", "--run", "run"],
        setup=[
            run_copy(),
            delete("run/checkpoint.safetensors"),
            copy_fx("legacy.pt", "run/checkpoint.pt"),
            truncate("run/checkpoint.pt", 0.5),
        ],
        needs=("base", "legacy"),
    )
    case(
        "run/convert-legacy-not-a-dict",
        R,
        ["convert-checkpoint", "--run", "run"],
        setup=[run_copy(), delete("run/checkpoint.safetensors"), write("run/checkpoint.pt", pickle.dumps([1, 2, 3]))],
        needs=need,
    )
    case(
        "run/legacy-only-evaluate",
        R,
        ev,
        setup=[run_copy(), delete("run/checkpoint.safetensors"), copy_fx("legacy.pt", "run/checkpoint.pt")],
        needs=("base", "legacy"),
    )


def define_resume_cases() -> None:
    R = "resume"
    need = ("base",)
    resume = ["train", "--resume", "--out", "run", "--epochs", "3", "--quiet"]
    case(
        "resume/ok",
        R,
        resume,
        expect="ok",
        setup=run_copy(),
        needs=need,
        may_change=["run/*"],
        check=trained("run", min_epoch=3),
    )
    case(
        "resume/fewer-epochs-than-trained",
        R,
        ["train", "--resume", "--out", "run", "--epochs", "1", "--quiet"],
        setup=run_copy(),
        needs=need,
    )
    case(
        "resume/epochs-0",
        R,
        ["train", "--resume", "--out", "run", "--epochs", "0", "--quiet"],
        setup=run_copy(),
        needs=need,
    )
    case("resume/no-run", R, resume)
    case("resume/empty-folder", R, resume, setup=mkdir("run"))
    case(
        "resume/log-garbage",
        R,
        resume,
        expect="either",
        setup=[run_copy(), write("run/log.csv", b"\x00\xffnot,a,log\n")],
        needs=need,
        may_change=["run/*"],
        check=trained("run", min_epoch=3),
    )
    case(
        "resume/log-wrong-columns",
        R,
        resume,
        expect="either",
        setup=[run_copy(), write("run/log.csv", "a,b,c\n1,2,3\n")],
        needs=need,
        may_change=["run/*"],
        check=trained("run", min_epoch=3),
    )
    case(
        "resume/trace-garbage",
        R,
        resume,
        expect="ok",
        setup=[run_copy(), write("run/uncertainty_trace.npz", b"garbage" * 50)],
        needs=need,
        may_change=["run/*"],
        check=all_of(trained("run", min_epoch=3), stderr_mentions("uncertainty_trace")),
    )
    case(
        "resume/trace-truncated",
        R,
        resume,
        expect="ok",
        setup=[run_copy(), truncate("run/uncertainty_trace.npz", 0.5)],
        needs=need,
        may_change=["run/*"],
        check=trained("run", min_epoch=3),
    )
    case(
        "resume/config-garbled", R, resume, setup=[run_copy(), write("run/config.yaml", bytes(range(200)))], needs=need
    )
    case(
        "resume/checkpoint-truncated",
        R,
        resume,
        setup=[run_copy(), truncate("run/checkpoint.safetensors", 0.7)],
        needs=need,
    )
    case("resume/checkpoint-flip", R, resume, setup=[run_copy(), flip("run/checkpoint.safetensors", "mid")], needs=need)
    case(
        "resume/split-tampered",
        R,
        resume,
        setup=[run_copy(), edit_split("run/split.json", queries_are_training_items, "recompute")],
        needs=need,
    )
    case("resume/change-bits", R, resume + ["--bits", "16"], setup=run_copy(), needs=need)
    case("resume/change-model-width", R, resume + ["--model-param", "width=16"], setup=run_copy(), needs=need)
    case(
        "resume/change-data",
        R,
        resume + ["--data", "features:f.npz"],
        setup=[run_copy(), features_npz("f.npz")],
        needs=need,
    )
    case(
        "resume/change-protocol-param",
        R,
        resume + ["--protocol-param", "query_per_class=6"],
        setup=run_copy(),
        needs=need,
    )
    case("resume/train-into-existing-run", R, tiny(out="run"), setup=run_copy(), needs=need)


def define_security_cases() -> None:
    S = "security"
    need = ("base",)
    legacy = [run_copy(), delete("run/checkpoint.safetensors")]
    commands = {
        "evaluate": ["evaluate", "--run", "run", "--quiet"],
        "encode": ["encode", "--run", "run", "--images", "imgs", "--out", "c.npz", "--quiet"],
        "export-onnx": ["export-onnx", "--run", "run", "--out", "m.onnx"],
        "convert-checkpoint": ["convert-checkpoint", "--run", "run"],
        "train-resume": ["train", "--resume", "--out", "run", "--epochs", "3", "--quiet"],
        "figure-topk": ["figure", "topk", "--run", "run", "--out", "fig"],
        "figure-uncertainty": ["figure", "uncertainty", "--run", "run", "--out", "fig"],
        "figure-curves": ["figure", "curves", "--run", "run", "--out", "fig"],
    }
    for name, argv in commands.items():
        case(
            f"security/pickle-checkpoint-{name}",
            S,
            argv,
            setup=legacy + [evil_pickle("run/checkpoint.pt"), copy_fx("imgs")],
            needs=need,
            guard=no_marker,
            expect="either" if name == "figure-curves" else "error",
        )
    case(
        "security/torch-zip-checkpoint-convert",
        S,
        ["convert-checkpoint", "--run", "run"],
        setup=legacy + [evil_pickle("run/checkpoint.pt", kind="torch")],
        needs=need,
        guard=no_marker,
    )
    case(
        "security/torch-zip-checkpoint-evaluate",
        S,
        ["evaluate", "--run", "run", "--quiet"],
        setup=legacy + [evil_pickle("run/checkpoint.pt", kind="torch")],
        needs=need,
        guard=no_marker,
    )
    case(
        "security/search-run-with-pickle-checkpoint",
        S,
        ["search", "--index", "{fx}/index.dmuhidx", "--run", "run", "--image", "imgs/c0/0.png"],
        setup=legacy + [evil_pickle("run/checkpoint.pt"), copy_fx("imgs")],
        needs=("base", "index"),
        guard=no_marker,
    )
    case("security/init-pickle", S, tiny(init="evil.pth"), setup=evil_pickle("evil.pth", kind="torch"), guard=no_marker)
    case("security/init-plain-pickle", S, tiny(init="evil.pth"), setup=evil_pickle("evil.pth"), guard=no_marker)
    case(
        "security/pretrained-pickle",
        S,
        tiny(pretrained="evil.pth"),
        setup=evil_pickle("evil.pth", kind="torch"),
        guard=no_marker,
    )
    case(
        "security/init-pretrain-dir-with-pickle",
        S,
        tiny(init="pre"),
        setup=[
            write("pre/config.yaml", "model: smallcnn\n"),
            evil_pickle("pre/backbone.pt", kind="torch"),
            evil_pickle("pre/backbone.safetensors"),
        ],
        guard=no_marker,
    )
    case(
        "security/yaml-python-tag",
        S,
        ["train", "--config", "cfg.yaml", "--out", "out", "--quiet"],
        setup=write("cfg.yaml", lambda ctx: f"data: !!python/object/apply:builtins.open [{str(ctx.marker)!r}, w]\n"),
        guard=no_marker,
    )
    case(
        "security/run-config-python-tag",
        S,
        ["evaluate", "--run", "run", "--quiet"],
        setup=[
            run_copy(),
            lambda ctx: ctx.p("run/config.yaml").write_text(
                ctx.p("run/config.yaml")
                .read_text()
                .replace("augment: none", f"augment: !!python/object/apply:builtins.open [{str(ctx.marker)!r}, w]")
            ),
        ],
        needs=need,
        guard=no_marker,
    )
    case(
        "security/features-npz-object-array",
        S,
        tiny(data="features:f.npz", model="mlp", mp={"input_size": None, "width": None}),
        setup=evil_npz("f.npz", "features", {"labels": np.arange(2)}),
        guard=no_marker,
    )
    case(
        "security/cifar-batch-pickle",
        S,
        tiny(data="cifar-batches:cifar", pp=SMALL_PROTOCOL),
        setup=[
            evil_pickle("cifar/data_batch_1", wrap=lambda e: {b"data": e, b"labels": [0]}),
            evil_pickle("cifar/test_batch", wrap=lambda e: {b"data": e, b"labels": [0]}),
        ],
        guard=no_marker,
    )
    case(
        "security/codes-npz-object-array",
        S,
        ["index", "build", "--codes", "c.npz", "--out", "i.dmuhidx"],
        setup=evil_npz("c.npz", "ids", {"format": np.array("dmuh-codes"), "codes": np.zeros((2, 1), np.uint8)}),
        guard=no_marker,
    )
    case(
        "security/search-queries-object-array",
        S,
        ["search", "--index", "{fx}/index.dmuhidx", "--queries", "q.npz"],
        setup=evil_npz("q.npz", "ids", {"format": np.array("dmuh-codes"), "codes": np.zeros((2, 1), np.uint8)}),
        needs=("index",),
        guard=no_marker,
    )
    case(
        "security/pretrained-state-dict-npz-pickle",
        S,
        tiny(pretrained="w.npz"),
        setup=evil_npz("w.npz", "weight"),
        guard=no_marker,
    )


def define_retrieval_cases() -> None:
    E, I, S, X, V, FL = "encode", "index", "search", "export-onnx", "evaluate", "files"  # noqa: E741 - short names of the command kinds
    enc = ["encode", "--run", "run", "--images", "imgs", "--out", "c.npz", "--quiet"]
    base = [run_copy(), copy_fx("imgs")]
    need = ("base",)
    case("encode/ok", E, enc + ["--uncertainty"], expect="ok", setup=base, needs=need, check=codes_count("c.npz", 60))
    for name, extra in {
        "batch-size-0": ["--batch-size", "0"],
        "batch-size-negative": ["--batch-size", "-1"],
        "image-size-0": ["--image-size", "0"],
        "image-size-negative": ["--image-size", "-4"],
        "image-size-text": ["--image-size", "big"],
        "device-unknown": ["--device", "tpu"],
        "device-cuda-99": ["--device", "cuda:99"],
    }.items():
        case(f"encode/{name}", E, enc + extra, setup=base, needs=need)
    case(
        "encode/images-missing",
        E,
        ["encode", "--run", "run", "--images", "no/such", "--out", "c.npz"],
        setup=run_copy(),
        needs=need,
    )
    case("encode/images-empty-folder", E, enc, setup=[run_copy(), mkdir("imgs")], needs=need)
    case(
        "encode/images-garbage-png",
        E,
        enc,
        setup=[run_copy(), image_folder("imgs", bad={"c0/bad.png": b"not a png"})],
        needs=need,
    )
    case("encode/no-run", E, ["encode", "--images", "imgs", "--out", "c.npz"], setup=copy_fx("imgs"))
    case(
        "encode/run-missing",
        E,
        ["encode", "--run", "no/such", "--images", "imgs", "--out", "c.npz"],
        setup=copy_fx("imgs"),
    )
    case(
        "encode/uncertainty-non-dmuh-run",
        E,
        ["encode", "--run", "run", "--images", "features:f.npz", "--out", "c.npz", "--uncertainty", "--quiet"],
        setup=[run_copy(src="feat"), features_npz("f.npz")],
        needs=("feat",),
    )
    case(
        "encode/list-missing-images",
        E,
        ["encode", "--run", "run", "--images", "q.txt", "--out", "c.npz", "--quiet"],
        setup=[run_copy(), write("q.txt", "nosuch/a.png\nnosuch/b.png\n")],
        needs=need,
    )
    case(
        "encode/list-not-utf8",
        E,
        ["encode", "--run", "run", "--images", "q.txt", "--out", "c.npz", "--quiet"],
        setup=base + [write("q.txt", "imgs/c0/0.png\nimgs/caf\xe9.png\n".encode("latin-1"))],
        needs=need,
    )
    case(
        "encode/list-escapes-root",
        E,
        ["encode", "--run", "run", "--images", "lists/q.txt", "--out", "c.npz", "--quiet"],
        expect="either",
        setup=base + [write("lists/q.txt", "../imgs/c0/0.png\n")],
        needs=need,
        check=codes_count("c.npz", 1),
    )
    case(
        "encode/root-missing",
        E,
        ["encode", "--run", "run", "--images", "q.txt", "--root", "no/such", "--out", "c.npz"],
        setup=base + [write("q.txt", "c0/0.png\n")],
        needs=need,
    )
    case(
        "encode/features-into-image-run",
        E,
        ["encode", "--run", "run", "--images", "features:f.npz", "--out", "c.npz", "--quiet"],
        setup=[run_copy(), features_npz("f.npz")],
        needs=need,
    )
    # index build / info
    ib = ["index", "build", "--codes", "c.npz", "--out", "i.dmuhidx"]
    codes = copy_fx("codes.npz", "c.npz")
    case("index/build-ok", I, ib, expect="ok", setup=codes, needs=("codes",), check=made("i.dmuhidx"))
    case(
        "index/build-ivf-ok",
        I,
        ib + ["--kind", "ivf", "--nlist", "2"],
        expect="ok",
        setup=codes,
        needs=("codes",),
        check=made("i.dmuhidx"),
    )
    for name, extra in {
        "ivf-nlist-0": ["--kind", "ivf", "--nlist", "0"],
        "ivf-nlist-negative": ["--kind", "ivf", "--nlist", "-1"],
        "ivf-nlist-absurd": ["--kind", "ivf", "--nlist", "100000"],
        "flat-with-nlist": ["--kind", "flat", "--nlist", "4"],
        "hnsw-m-0": ["--kind", "hnsw", "--m", "0"],
        "hnsw-ef-search-negative": ["--kind", "hnsw", "--ef-search", "-5"],
        "kind-unknown": ["--kind", "lsh"],
        "nlist-text": ["--kind", "ivf", "--nlist", "many"],
    }.items():
        case(f"index/build-{name}", I, ib + extra, setup=codes, needs=("codes",))
    case(
        "index/build-ivf-nprobe-above-nlist",
        I,
        ib + ["--kind", "ivf", "--nlist", "2", "--nprobe", "50"],
        expect="either",
        setup=codes,
        needs=("codes",),
        check=made("i.dmuhidx"),
    )
    case("index/build-codes-missing", FL, ib)
    case("index/build-codes-not-npz", FL, ib, setup=write("c.npz", "id,code\n1,0101\n"))
    case("index/build-codes-truncated", FL, ib, setup=[codes, truncate("c.npz", 0.6)], needs=("codes",))
    case("index/build-codes-flipped", FL, ib, setup=[codes, flip("c.npz", "mid")], needs=("codes",))
    case("index/build-codes-is-features-npz", FL, ib, setup=features_npz("c.npz"))
    case("index/build-codes-zero-bytes", FL, ib, setup=write("c.npz", b""))
    info = ["index", "info", "i.dmuhidx"]
    idx = copy_fx("index.dmuhidx", "i.dmuhidx")
    case(
        "index/info-ok",
        I,
        info,
        expect="ok",
        setup=idx,
        needs=("index",),
        check=lambda ctx: None if "checksum ok" in ctx.stdout else "no 'checksum ok' line",
    )
    case("index/info-missing", FL, info)
    case("index/info-garbage", FL, info, setup=write("i.dmuhidx", b"garbage" * 64))
    case("index/info-zero-bytes", FL, info, setup=write("i.dmuhidx", b""))
    case("index/info-truncated", FL, info, setup=[idx, truncate("i.dmuhidx", 0.5)], needs=("index",))
    case("index/info-header-truncated", FL, info, setup=[idx, truncate("i.dmuhidx", 12)], needs=("index",))
    for offset in (10, 40, "mid", -1):
        case(f"index/info-flip-{offset}", FL, info, setup=[idx, flip("i.dmuhidx", offset)], needs=("index",))
    case("index/info-codes-file-as-index", FL, ["index", "info", "c.npz"], setup=codes, needs=("codes",))
    # search
    sq = ["search", "--index", "i.dmuhidx", "--queries", "q.npz"]
    sfx = [idx, copy_fx("codes.npz", "q.npz")]
    sneed = ("index", "codes")
    case("search/ok", S, sq + ["--k", "5", "--json"], expect="ok", setup=sfx, needs=sneed, check=search_json(5, 60))
    case(
        "search/rerank-ok",
        S,
        sq + ["--k", "5", "--rerank", "20", "--json"],
        expect="ok",
        setup=sfx,
        needs=sneed,
        check=search_json(5, 60, order="weighted_distance"),
    )
    case(
        "search/image-ok",
        S,
        ["search", "--index", "i.dmuhidx", "--image", "imgs/c3/1.png", "--k", "3", "--json"],
        expect="ok",
        setup=[idx, copy_fx("imgs")],
        needs=("index",),
        check=search_json(3, 1),
    )
    case(
        "search/k-huge",
        S,
        sq + ["--k", "100000", "--json"],
        expect="either",
        setup=sfx,
        needs=sneed,
        check=search_json(100000, 60),
    )
    for name, extra in {
        "k-0": ["--k", "0"],
        "k-negative": ["--k", "-1"],
        "k-text": ["--k", "ten"],
        "rerank-0": ["--rerank", "0"],
        "rerank-negative": ["--rerank", "-1"],
        "tau-0": ["--rerank", "10", "--tau", "0"],
        "tau-negative": ["--rerank", "10", "--tau", "-1"],
        "tau-nan": ["--rerank", "10", "--tau", "nan"],
        "tau-without-rerank": ["--tau", "0.5"],
        "nprobe-0": ["--nprobe", "0"],
        "ef-search-0": ["--ef-search", "0"],
    }.items():
        case(f"search/{name}", S, sq + extra, setup=sfx, needs=sneed)
    case("search/no-queries", S, ["search", "--index", "i.dmuhidx"], setup=idx, needs=("index",))
    case("search/index-missing", FL, sq, setup=copy_fx("codes.npz", "q.npz"), needs=("codes",))
    case("search/index-flipped", FL, sq, setup=sfx + [flip("i.dmuhidx", "mid")], needs=sneed)
    case("search/index-truncated", FL, sq, setup=sfx + [truncate("i.dmuhidx", 0.7)], needs=sneed)
    case("search/queries-wrong-bits", S, sq, setup=[idx, copy_fx("codes16.npz", "q.npz")], needs=("index", "codes16"))
    case(
        "search/run-wrong-bits",
        S,
        ["search", "--index", "i.dmuhidx", "--run", "run", "--image", "imgs/c0/0.png"],
        setup=[idx, copy_fx("imgs"), run_copy(src="feat")],
        needs=("index", "feat"),
    )
    case("search/queries-not-npz", FL, sq, setup=[idx, write("q.npz", "hello\n")], needs=("index",))
    case("search/queries-truncated", FL, sq, setup=sfx + [truncate("q.npz", 0.5)], needs=sneed)
    case(
        "search/queries-list-missing-images",
        FL,
        ["search", "--index", "i.dmuhidx", "--queries", "q.txt"],
        setup=[idx, write("q.txt", "nosuch.png\n")],
        needs=("index",),
    )
    case(
        "search/queries-list-empty",
        FL,
        ["search", "--index", "i.dmuhidx", "--queries", "q.txt"],
        setup=[idx, write("q.txt", "# nothing\n\n")],
        needs=("index",),
    )
    case(
        "search/image-missing",
        FL,
        ["search", "--index", "i.dmuhidx", "--image", "nosuch.png"],
        setup=idx,
        needs=("index",),
    )
    case(
        "search/image-garbage",
        FL,
        ["search", "--index", "i.dmuhidx", "--image", "bad.png"],
        setup=[idx, write("bad.png", b"\x89PNG\r\n\x1a\ngarbage")],
        needs=("index",),
    )
    case(
        "search/rerank-without-uncertainty",
        S,
        sq + ["--rerank", "10"],
        setup=[idx, copy_fx("codes_plain.npz", "q.npz")],
        needs=("index", "codes_plain"),
    )
    # export-onnx
    ex = ["export-onnx", "--run", "run", "--out", "m.onnx"]
    case("export-onnx/ok", X, ex, expect="ok", setup=run_copy(), needs=need, check=made("m.onnx", min_size=1000))
    for name, extra in {
        "opset-0": ["--opset", "0"],
        "opset-negative": ["--opset", "-1"],
        "opset-999": ["--opset", "999"],
        "image-size-0": ["--image-size", "0"],
        "image-size-negative": ["--image-size", "-8"],
        "image-size-2": ["--image-size", "2"],
    }.items():
        case(f"export-onnx/{name}", X, ex + extra, setup=run_copy(), needs=need)
    case("export-onnx/run-missing", X, ["export-onnx", "--run", "no/such", "--out", "m.onnx"])
    case("export-onnx/no-run", X, ["export-onnx", "--out", "m.onnx"])
    case(
        "export-onnx/out-in-missing-folder",
        X,
        ["export-onnx", "--run", "run", "--out", "no/such/dir/m.onnx"],
        expect="either",
        setup=run_copy(),
        needs=need,
        check=made("no/such/dir/m.onnx"),
    )
    # evaluate flags
    ev = ["evaluate", "--run", "run", "--quiet"]
    case("evaluate/ties-unknown", V, ev + ["--ties", "random"], setup=run_copy(), needs=need)
    case("evaluate/device-unknown", V, ev + ["--device", "tpu"], setup=run_copy(), needs=need)
    case(
        "evaluate/json-into-missing-folder",
        V,
        ev + ["--json", "no/such/r.json"],
        expect="either",
        setup=run_copy(),
        needs=need,
        check=made("no/such/r.json"),
    )
    case("evaluate/json-is-a-directory", V, ev + ["--json", "adir"], setup=[run_copy(), mkdir("adir")], needs=need)
    case(
        "evaluate/legacy-positional",
        V,
        ["evaluate", "run", "--quiet"],
        expect="ok",
        setup=run_copy(),
        needs=need,
        check=map_printed,
    )
    case(
        "evaluate/feature-run-ok",
        V,
        ev,
        expect="ok",
        setup=[run_copy(src="feat"), copy_fx("digits.npz")],
        needs=("feat",),
        check=map_printed,
    )


def define_figure_cases() -> None:
    G = "figure"
    need = ("base",)
    for fig in ("uncertainty", "curves", "topk"):
        case(f"figure/{fig}-run-missing", G, ["figure", fig, "--run", "no/such/run", "--out", "fig"])
        case(f"figure/{fig}-no-run", G, ["figure", fig, "--out", "fig"])
        case(
            f"figure/{fig}-ok",
            G,
            ["figure", fig, "--run", "run", "--out", "fig"],
            expect="ok",
            setup=run_copy(),
            needs=need,
            check=made("fig.png", "fig.md"),
        )
    case(
        "figure/curves-second-run-missing",
        G,
        ["figure", "curves", "--run", "run", "--run", "no/such", "--out", "fig"],
        setup=run_copy(),
        needs=need,
    )
    case(
        "figure/curves-log-garbage",
        G,
        ["figure", "curves", "--run", "run", "--out", "fig"],
        setup=[run_copy(), write("run/log.csv", b"\x00\x01garbage\n")],
        needs=need,
    )
    case(
        "figure/curves-log-missing",
        G,
        ["figure", "curves", "--run", "run", "--out", "fig"],
        setup=[run_copy(), delete("run/log.csv")],
        needs=need,
    )
    case(
        "figure/uncertainty-trace-garbage",
        G,
        ["figure", "uncertainty", "--run", "run", "--out", "fig"],
        setup=[run_copy(), write("run/uncertainty_trace.npz", b"garbage" * 10)],
        needs=need,
    )
    case(
        "figure/uncertainty-non-dmuh-run",
        G,
        ["figure", "uncertainty", "--run", "run", "--out", "fig"],
        setup=[run_copy(src="feat"), copy_fx("digits.npz")],
        needs=("feat",),
    )
    for name, extra in {
        "bits-shown-0": ["--bits-shown", "0"],
        "gallery-negative": ["--gallery", "-1"],
        "items-0": ["--items", "0"],
        "passes-0": ["--passes", "0"],
    }.items():
        case(
            f"figure/uncertainty-{name}",
            G,
            ["figure", "uncertainty", "--run", "run", "--out", "fig"] + extra,
            setup=run_copy(),
            needs=need,
        )
    case(
        "figure/uncertainty-bits-shown-above-bits",
        G,
        ["figure", "uncertainty", "--run", "run", "--out", "fig", "--bits-shown", "100"],
        expect="either",
        setup=run_copy(),
        needs=need,
        check=made("fig.png"),
    )
    for name, extra in {
        "max-k-0": ["--max-k", "0"],
        "max-k-negative": ["--max-k", "-5"],
        "points-1": ["--points", "1"],
        "points-0": ["--points", "0"],
        "spacing-unknown": ["--spacing", "cubic"],
    }.items():
        case(
            f"figure/topk-{name}",
            G,
            ["figure", "topk", "--run", "run", "--out", "fig"] + extra,
            setup=run_copy(),
            needs=need,
        )
    case(
        "figure/topk-split-tampered",
        G,
        ["figure", "topk", "--run", "run", "--out", "fig"],
        setup=[run_copy(), edit_split("run/split.json", queries_are_training_items, "recompute")],
        needs=need,
    )


def define_overwrite_cases() -> None:
    O = "overwrite"  # noqa: E741
    need = ("base",)
    user = write("mine.txt", "a user's file, not to be replaced\n")
    case(
        "overwrite/encode-out",
        O,
        ["encode", "--run", "run", "--images", "imgs", "--out", "mine.txt", "--quiet"],
        setup=[run_copy(), copy_fx("imgs"), user],
        needs=need,
    )
    case(
        "overwrite/encode-out-is-checkpoint",
        O,
        ["encode", "--run", "run", "--images", "imgs", "--out", "run/checkpoint.safetensors", "--quiet"],
        setup=[run_copy(), copy_fx("imgs")],
        needs=need,
    )
    case(
        "overwrite/encode-out-force",
        O,
        ["encode", "--run", "run", "--images", "imgs", "--out", "mine.npz", "--force", "--quiet"],
        expect="ok",
        setup=[run_copy(), copy_fx("imgs"), write("mine.npz", "old\n")],
        needs=need,
        check=codes_count("mine.npz", 60),
    )
    case(
        "overwrite/index-build-out",
        O,
        ["index", "build", "--codes", "c.npz", "--out", "mine.txt"],
        setup=[copy_fx("codes.npz", "c.npz"), user],
        needs=("codes",),
    )
    case(
        "overwrite/index-build-out-is-codes",
        O,
        ["index", "build", "--codes", "c.npz", "--out", "c.npz"],
        setup=copy_fx("codes.npz", "c.npz"),
        needs=("codes",),
    )
    case(
        "overwrite/index-build-force",
        O,
        ["index", "build", "--codes", "c.npz", "--out", "mine.txt", "--force"],
        expect="ok",
        setup=[copy_fx("codes.npz", "c.npz"), user],
        needs=("codes",),
        check=lambda ctx: None if ctx.p("mine.txt").read_bytes().startswith(b"DMUHIDX") else "not replaced by an index",
    )
    case(
        "overwrite/search-out",
        O,
        ["search", "--index", "i.dmuhidx", "--queries", "q.npz", "--out", "mine.txt"],
        setup=[copy_fx("index.dmuhidx", "i.dmuhidx"), copy_fx("codes.npz", "q.npz"), user],
        needs=("index", "codes"),
    )
    case(
        "overwrite/search-out-is-index",
        O,
        ["search", "--index", "i.dmuhidx", "--queries", "q.npz", "--out", "i.dmuhidx"],
        setup=[copy_fx("index.dmuhidx", "i.dmuhidx"), copy_fx("codes.npz", "q.npz")],
        needs=("index", "codes"),
    )
    case(
        "overwrite/export-onnx-out",
        O,
        ["export-onnx", "--run", "run", "--out", "mine.txt"],
        setup=[run_copy(), user],
        needs=need,
    )
    case(
        "overwrite/evaluate-json",
        O,
        ["evaluate", "--run", "run", "--json", "mine.txt", "--quiet"],
        setup=[run_copy(), user],
        needs=need,
    )
    case(
        "overwrite/evaluate-json-is-config",
        O,
        ["evaluate", "--run", "run", "--json", "run/config.yaml", "--quiet"],
        setup=run_copy(),
        needs=need,
    )
    case(
        "overwrite/evaluate-existing-eval-json",
        O,
        ["evaluate", "--run", "run", "--quiet"],
        setup=[run_copy(), write("run/eval.json", '{"mine": true}\n')],
        needs=need,
    )
    case(
        "overwrite/evaluate-json-force",
        O,
        ["evaluate", "--run", "run", "--json", "mine.txt", "--force", "--quiet"],
        expect="ok",
        setup=[run_copy(), user],
        needs=need,
        check=eval_json("mine.txt"),
    )
    for fig in ("uncertainty", "curves", "topk"):
        for ext in ("png", "md"):
            case(
                f"overwrite/figure-{fig}-{ext}",
                O,
                ["figure", fig, "--run", "run", "--out", "mine"],
                setup=[run_copy(), write(f"mine.{ext}", "a user's file\n")],
                needs=need,
            )
    case(
        "overwrite/figure-default-out",
        O,
        ["figure", "curves", "--run", "run"],
        setup=[run_copy(), write("run/figure-curves.md", "my notes\n")],
        needs=need,
    )
    case("overwrite/train-out-is-a-file", O, tiny(out="mine.txt"), setup=user)
    case(
        "overwrite/train-out-holds-user-config",
        O,
        tiny(out="mine"),
        setup=[write("mine/config.yaml", "# my own config, not dmuh's\nfoo: 1\n"), write("mine/notes.txt", "x\n")],
    )
    case(
        "overwrite/train-out-holds-user-files",
        O,
        tiny(out="mine"),
        expect="either",
        setup=[write("mine/notes.txt", "x\n"), write("mine/data.csv", "1,2\n")],
        check=trained("mine"),
    )
    case("overwrite/pretrain-out-is-a-file", O, pretrain(out="mine.txt"), setup=user)
    case(
        "overwrite/pretrain-existing-backbone",
        O,
        pretrain(out="pre"),
        setup=[write("pre/backbone.safetensors", b"my weights"), write("pre/config.yaml", "objective: ce\n")],
    )
    case("overwrite/compare-out-is-a-file", O, compare("--methods", "dmuh", "--bits", "8", out="mine.txt"), setup=user)
    case(
        "overwrite/compare-existing-results",
        O,
        compare("--methods", "dmuh", "--bits", "8", out="cmp"),
        setup=[write("cmp/results.md", "# my results\n"), write("cmp/results.csv", "mine\n")],
    )
    case(
        "overwrite/demo-existing-results",
        O,
        ["demo", "--bits", "8", "--epochs", "1", "--out", "demo"],
        setup=write("demo/results.md", "# my demo table\n"),
    )
    case("overwrite/demo-out-is-a-file", O, ["demo", "--bits", "8", "--epochs", "1", "--out", "mine.txt"], setup=user)
    case(
        "overwrite/convert-existing-safetensors",
        O,
        ["convert-checkpoint", "--run", "run"],
        setup=[run_copy(), copy_fx("legacy.pt", "run/checkpoint.pt")],
        needs=("base", "legacy"),
    )


# =============================================================================================
# Hardening II (issue 31): amplification, fields deep inside dmuh's files, silent results,
# outputs that are inputs, the service's flags, concurrent writers


def _dmuh_src():
    """Import dmuh from this checkout (setup steps that re-sign a file dmuh wrote)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


YAML_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
)
FLOW_BOMB = "[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " + (
    "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
)


def npy_header(shape, descr: str = "|u1") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def bomb_npz(rel: str, member: str, others: Dict[str, np.ndarray], inflated_mb: int = 1024) -> Step:
    """An .npz whose `member` deflates from about 1 MB per GB to `inflated_mb` MB of zeros (a zip bomb),
    next to the small arrays `others`."""

    def step(ctx: Ctx) -> None:
        with zipfile.ZipFile(ctx.p(rel), "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for name, array in others.items():
                archive.writestr(f"{name}.npy", npy_bytes(array))
            with archive.open(f"{member}.npy", "w", force_zip64=True) as out:
                out.write(npy_header((inflated_mb << 20,)))
                block = bytes(1 << 20)
                for _ in range(inflated_mb):
                    out.write(block)

    return step


def huge_header_npz(rel: str, member: str, shape, others: Dict[str, np.ndarray], descr: str = "|u1") -> Step:
    """An .npz whose `member`'s header declares `shape` (terabytes) over a few bytes of data."""

    def step(ctx: Ctx) -> None:
        with zipfile.ZipFile(ctx.p(rel), "w") as archive:
            for name, array in others.items():
                archive.writestr(f"{name}.npy", npy_bytes(array))
            archive.writestr(f"{member}.npy", npy_header(shape, descr) + bytes(64))

    return step


CODES_META = {"version": 1, "bits": 8, "count": 4, "model": {}, "image_size": 8, "channels": 1, "images": None,
              "class_names": None}  # fmt: skip


def codes_arrays(meta=None, **over) -> Dict[str, np.ndarray]:
    """The arrays of a small codes file (4 codes of 8 bits), `meta` and arrays replaced as given."""
    meta = CODES_META if meta is None else meta
    arrays = {
        "format": np.array("dmuh-codes"),
        "meta": np.array(meta if isinstance(meta, str) else json.dumps(meta)),
        "codes": np.arange(4, dtype=np.uint8).reshape(4, 1),
        "ids": np.array([f"a/{i}.png" for i in range(4)]),
    }
    arrays.update(over)
    return {k: v for k, v in arrays.items() if v is not None}


def codes_file(rel: str, meta=None, **over) -> Step:
    def step(ctx: Ctx) -> None:
        with open(ctx.p(rel), "wb") as f:
            np.savez(f, **codes_arrays(meta, **over))

    return step


def edit_codes(rel: str, change: Callable[[Dict[str, np.ndarray]], None]) -> Step:
    """Change a codes file's arrays (meta as a dict under "meta") and write it back."""

    def step(ctx: Ctx) -> None:
        path = ctx.p(rel)
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        meta = json.loads(str(arrays["meta"]))
        arrays["meta"] = meta
        change(arrays)
        arrays["meta"] = np.array(json.dumps(arrays["meta"]))
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    return step


def codes_subset(prefix: str, count: int) -> Callable[[Dict], None]:
    """Keep the first `count` codes, renamed PREFIX:i (new items for `index add`)."""

    def change(arrays: Dict) -> None:
        for name in ("codes", "labels", "uncertainty", "bit_uncertainty", "features"):
            if name in arrays:
                arrays[name] = arrays[name][:count]
        arrays["ids"] = np.array([f"{prefix}:{i}" for i in range(count)])
        arrays["meta"]["count"] = count

    return change


def rewrite_index(rel: str, header_change=None, sections_change=None) -> Step:
    """Re-sign an index file after changing its header or sections (checksums recomputed)."""

    def step(ctx: Ctx) -> None:
        _dmuh_src()
        from dmuh.retrieval.index.file import read_index_file, write_index_file

        header, sections = read_index_file(ctx.p(rel), ("flat", "ivf", "hnsw"))
        for key in ("sections", "payload_size", "payload_sha256"):
            header.pop(key)
        if header_change:
            header_change(header)
        if sections_change:
            sections_change(sections)
        write_index_file(ctx.p(rel), header, list(sections.items()))

    return step


def rewrite_checkpoint(rel: str, change: Callable[[dict], None]) -> Step:
    """Change a checkpoint's state and write it back with a valid checksum (a re-signed file)."""

    def step(ctx: Ctx) -> None:
        _dmuh_src()
        from dmuh.runs.checkpoint import load_state, save_state

        state = load_state(ctx.p(rel), "checkpoint")
        change(state)
        save_state(ctx.p(rel), state, "checkpoint")

    return step


def first_weight_set(value: float) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
        state["model"][key].view(-1)[0] = value

    return change


def optimizer_wrong_shape(state: dict) -> None:
    import torch

    for slot in state["optimizer"]["state"].values():
        for name, value in slot.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                slot[name] = torch.zeros(value.numel() + 3)
                return


def sqlite_db(rel: str, keep: Optional[float] = None) -> Step:
    """An SQLite database (what a Milvus Lite file is), cut to `keep` of its size."""

    def step(ctx: Ctx) -> None:
        import sqlite3

        path = ctx.p(rel)
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.execute("create table t (x)")
            connection.executemany("insert into t values (?)", [(b"x" * 2000,)] * 50)
            connection.commit()
        if keep is not None:
            path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return step


def link(rel: str, target: str, hard: bool = False) -> Step:
    def step(ctx: Ctx) -> None:
        if hard:
            os.link(ctx.p(target), ctx.p(rel))
        else:
            ctx.p(rel).symlink_to(ctx.p(target))

    return step


def index_count(rel: str) -> Optional[int]:
    _dmuh_src()
    from dmuh.retrieval.index import open_index

    with open_index(rel) as index:
        return len(index)


def both_succeeded_and_count(rel: str, count: int) -> Callable[[Ctx], Optional[str]]:
    """Both writers of an index reported success, and the index holds what both did."""

    def guard(ctx: Ctx) -> Optional[str]:
        if ctx.rc != 0 or (ctx.alongside or (None,))[0] != 0:
            return None  # a refusal: classified from the messages
        try:
            found = index_count(str(ctx.p(rel)))
        except Exception as error:  # noqa: BLE001 - a damaged index is lost work
            return f"{rel} unreadable after both writers: {type(error).__name__}: {error}"
        return None if found == count else f"{rel} holds {found} codes after both writers reported success, not {count}"

    return guard


def one_run_kept(out: str, marker: str = "checkpoint.safetensors") -> Callable[[Ctx], Optional[str]]:
    """Of two writers of one run directory exactly one succeeded and its run is whole."""

    def guard(ctx: Ctx) -> Optional[str]:
        codes = [ctx.rc, (ctx.alongside or (None,))[0]]
        if codes.count(0) == 2:
            return f"both writers of {out} reported success: one's result is gone"
        if codes.count(0) == 1 and not (ctx.p(out) / marker).is_file():
            return f"a writer reported success but {out}/{marker} is missing"
        return None

    return guard


def define_hardening_cases() -> None:
    A, F, SI, IN, SV, CO = "amplify", "fields", "silent", "inputs", "serve-flags", "concurrent"
    base = run_copy()
    codes_fx = copy_fx("codes.npz", "c.npz")
    small_codes = {"format": np.array("dmuh-codes"), "meta": np.array(json.dumps(CODES_META)),
                   "ids": np.array([f"a/{i}.png" for i in range(4)])}  # fmt: skip
    features_labels = {"labels": np.arange(50) % 5}
    yaml_bomb = write("bomb.yaml", YAML_BOMB)

    # -- class 1: a tiny input, a huge allocation ---------------------------------------------
    case("amplify/train-config-alias-bomb", A, ["train", "--config", "bomb.yaml", "--out", "r"], setup=yaml_bomb)
    case("amplify/compare-config-alias-bomb", A, ["compare", "--config", "bomb.yaml", "--methods", "dmuh",
                                                   "--out", "r"], setup=yaml_bomb)  # fmt: skip
    case("amplify/pretrain-config-alias-bomb", A, ["pretrain", "--config", "bomb.yaml", "--out", "r"], setup=yaml_bomb)
    case("amplify/evaluate-run-config-alias-bomb", A, ["evaluate", "--run", "run", "--quiet"],
         setup=[base, write("run/config.yaml", YAML_BOMB)], needs=("base",))  # fmt: skip
    case("amplify/resume-run-config-alias-bomb", A, ["train", "--resume", "--out", "run", "--quiet"],
         setup=[base, write("run/config.yaml", YAML_BOMB)], needs=("base",))  # fmt: skip
    case("amplify/figure-run-config-alias-bomb", A, ["figure", "curves", "--run", "run"],
         setup=[base, write("run/config.yaml", YAML_BOMB)], needs=("base",))  # fmt: skip
    case("amplify/train-config-nested-5000", A, ["train", "--config", "deep.yaml", "--out", "r"],
         setup=write("deep.yaml", "bits: " + "[" * 5000 + "]" * 5000 + "\n"))  # fmt: skip
    case("amplify/train-config-huge-scalar", A, ["train", "--config", "big.yaml", "--out", "r"],
         setup=write("big.yaml", "epochs: " + "x" * 900_000 + "\n"))  # fmt: skip
    case("amplify/train-param-flow-alias-bomb", A, tiny("-p", f"alpha={FLOW_BOMB}"))
    case("amplify/codes-zip-bomb-index-build", A, ["index", "build", "--codes", "bomb.npz", "--out", "i.dmuhidx"],
         setup=bomb_npz("bomb.npz", "codes", small_codes))  # fmt: skip
    case("amplify/codes-zip-bomb-search-queries", A, ["search", "--index", "i.dmuhidx", "--queries", "bomb.npz"],
         setup=[copy_fx("index.dmuhidx", "i.dmuhidx"), bomb_npz("bomb.npz", "codes", small_codes)],
         needs=("index",))  # fmt: skip
    case("amplify/codes-ids-zip-bomb-index-build", A, ["index", "build", "--codes", "bomb.npz", "--out", "i.dmuhidx"],
         setup=bomb_npz("bomb.npz", "ids", {k: v for k, v in codes_arrays().items() if k != "ids"}))  # fmt: skip
    case("amplify/features-zip-bomb-train", A, tiny(data="features:bomb.npz", model="mlp", protocol="per-class",
         mp={"input_size": None, "width": None}), setup=bomb_npz("bomb.npz", "features", features_labels))  # fmt: skip
    case("amplify/codes-header-terabytes-index-build", A, ["index", "build", "--codes", "h.npz", "--out", "i.dmuhidx"],
         setup=huge_header_npz("h.npz", "codes", (10**12, 1), small_codes))  # fmt: skip
    case("amplify/features-header-terabytes-train", A, tiny(data="features:h.npz", model="mlp",
         mp={"input_size": None, "width": None}), setup=huge_header_npz("h.npz", "features", (10**9, 4096),
         features_labels, "<f4"))  # fmt: skip
    case("amplify/trace-zip-bomb-figure-uncertainty", A, ["figure", "uncertainty", "--run", "run", "--out", "fig"],
         setup=[base, bomb_npz("run/uncertainty_trace.npz", "hashing", {"items": np.arange(4), "epochs": np.arange(2)})],
         needs=("base",))  # fmt: skip
    case("amplify/split-nested-5000-evaluate",
        A,
        ["evaluate", "--run", "run", "--quiet"],
        setup=[
            base,
            edit_split("run/split.json", lambda r: r["params"].__setitem__("deep", None)),
            edit_yaml("run/split.json", lambda t: t.replace('"deep":null', '"deep":' + "[" * 5000 + "]" * 5000)),
        ],
        needs=("base",))  # fmt: skip
    for name, flags in (
        ("hnsw-m-1e8", ["--kind", "hnsw", "--m", "100000000"]),
        ("hnsw-ef-construction-1e9", ["--kind", "hnsw", "--ef-construction", "1000000000"]),
        ("hnsw-ef-search-2-32", ["--kind", "hnsw", "--ef-search", "4294967296"]),
        ("ivf-nlist-2-40", ["--kind", "ivf", "--nlist", "1099511627776"]),
        ("ivf-nprobe-2-32", ["--kind", "ivf", "--nprobe", "4294967296"]),
    ):
        case(f"amplify/index-build-{name}", A, ["index", "build", "--codes", "c.npz", "--out", "i.dmuhidx", *flags],
             setup=codes_fx, needs=("codes",))  # fmt: skip
    case("amplify/search-ef-search-2-32", A, ["search", "--index", "h.dmuhidx", "--queries", "c.npz", "--ef-search",
         "4294967296"], setup=[copy_fx("index_hnsw.dmuhidx", "h.dmuhidx"), codes_fx], needs=("index_hnsw",))  # fmt: skip
    case("amplify/search-k-past-int64", A, ["search", "--index", "i.dmuhidx", "--queries", "c.npz", "--k",
         "99999999999999999999"], setup=[copy_fx("index.dmuhidx", "i.dmuhidx"), codes_fx], needs=("index",))  # fmt: skip
    case("amplify/encode-image-size-60000", A, ["encode", "--run", "run", "--images", "imgs", "--out", "o.npz",
         "--image-size", "60000", "--quiet"], setup=[base, copy_fx("imgs")], needs=("base",))  # fmt: skip
    case("amplify/export-onnx-image-size-60000", A, ["export-onnx", "--run", "run", "--out", "m.onnx", "--image-size",
         "60000"], setup=base, needs=("base",))  # fmt: skip
    case("amplify/train-image-size-60000", A, tiny(image_size="60000"))

    # -- class 5: every serve flag has a range (the HTTP requests are tests/serve) -------------
    for name, flags in (
        ("max-upload-mb-inf", ["--max-upload-mb", "inf"]),
        ("max-upload-mb-nan", ["--max-upload-mb", "nan"]),
        ("max-upload-mb-1e12", ["--max-upload-mb", "1e12"]),
        ("timeout-inf", ["--timeout", "inf"]),
        ("timeout-nan", ["--timeout", "nan"]),
        ("threads-1e6", ["--threads", "1000000"]),
        ("max-k-1e11", ["--max-k", "99999999999"]),
        ("max-pixels-1e11", ["--max-pixels", "99999999999"]),
        ("port-negative", ["--port", "-1"]),
    ):
        case(f"serve-flags/{name}", SV, ["serve", "--index", "i.dmuhidx", *flags],
             setup=copy_fx("index.dmuhidx", "i.dmuhidx"), needs=("index",), timeout=60)  # fmt: skip

    # -- class 2: fields of the wrong type or shape deep inside dmuh's own files ---------------
    build = ["index", "build", "--codes", "x.npz", "--out", "i.dmuhidx"]
    for name, meta in (
        ("meta-a-list", "[1, 2]"),
        ("meta-a-string", '"text"'),
        ("meta-bits-text", {**CODES_META, "bits": "8"}),
        ("meta-no-bits", {k: v for k, v in CODES_META.items() if k != "bits"}),
        ("meta-bits-huge", {**CODES_META, "bits": 2**70}),
        ("meta-count-negative", {**CODES_META, "count": -4}),
        ("meta-model-a-list", {**CODES_META, "model": [1]}),
        ("meta-nested-5000", "[" * 5000 + "]" * 5000),
    ):
        case(f"fields/codes-{name}", F, build, setup=codes_file("x.npz", meta))
    case("fields/codes-codes-float", F, build, setup=codes_file("x.npz", codes=np.zeros((4, 1), np.float32)))
    case("fields/codes-codes-3d", F, build, setup=codes_file("x.npz", codes=np.zeros((4, 1, 1), np.uint8)))
    info = ["index", "info", "i.dmuhidx"]
    idx = copy_fx("index.dmuhidx", "i.dmuhidx")
    for name, change in (
        ("bits-text", lambda h: h.__setitem__("bits", "8")),
        ("count-negative", lambda h: h.__setitem__("count", -1)),
        ("params-a-list", lambda h: h.__setitem__("params", [1])),
        ("meta-a-string", lambda h: h.__setitem__("meta", "x")),
        ("next-id-past-int64", lambda h: h.__setitem__("next_id", 2**70)),
    ):
        case(f"fields/index-header-{name}", F, info, setup=[idx, rewrite_index("i.dmuhidx", change)], needs=("index",))
    case("fields/index-hnsw-ef-search-text", F, ["index", "info", "h.dmuhidx"],
         setup=[copy_fx("index_hnsw.dmuhidx", "h.dmuhidx"),
                rewrite_index("h.dmuhidx", lambda h: h["params"].__setitem__("ef_search", "128"))],
         needs=("index_hnsw",))  # fmt: skip
    for name, change in (
        ("names-a-dict", lambda s: s.__setitem__("names", b'{"a": 1}')),
        ("names-not-json", lambda s: s.__setitem__("names", b"\xff\xfe")),
        ("names-nested-5000", lambda s: s.__setitem__("names", b"[" * 5000 + b"]" * 5000)),
        ("ids-odd-length", lambda s: s.__setitem__("ids", s["ids"] + b"\x01\x02\x03")),
    ):
        case(f"fields/index-{name}", F, info, setup=[idx, rewrite_index("i.dmuhidx", None, change)], needs=("index",))
    case("fields/index-header-not-an-object", F, info,
         setup=write("i.dmuhidx", lambda ctx: struct.pack("<8sII", b"DMUHIDX\n", 9, __import__("zlib").crc32(b"[1, 2, 3]"))
                     + b"[1, 2, 3]"))  # fmt: skip
    evaluate = ["evaluate", "--run", "run", "--quiet"]
    case("fields/split-index-past-int64", F, evaluate,
         setup=[base, edit_split("run/split.json", lambda r: r["query"].__setitem__(0, 2**64))], needs=("base",))  # fmt: skip
    case("fields/split-seed-past-int64", F, evaluate,
         setup=[base, edit_split("run/split.json", lambda r: r.__setitem__("seed", 2**70))], needs=("base",))  # fmt: skip
    case("fields/split-query-nested", F, evaluate,
         setup=[base, edit_split("run/split.json", lambda r: r["query"].__setitem__(0, [[[1]]]))], needs=("base",))  # fmt: skip
    ckpt = "run/checkpoint.safetensors"
    case("fields/checkpoint-epoch-text", F, evaluate,
         setup=[base, rewrite_checkpoint(ckpt, lambda s: s.__setitem__("epoch", "2"))], needs=("base",))  # fmt: skip
    case("fields/checkpoint-model-a-list", F, evaluate,
         setup=[base, rewrite_checkpoint(ckpt, lambda s: s.__setitem__("model", [1, 2]))], needs=("base",))  # fmt: skip
    case("fields/checkpoint-optimizer-a-string", F, ["train", "--resume", "--out", "run", "--epochs", "3", "--quiet"],
         setup=[base, rewrite_checkpoint(ckpt, lambda s: s.__setitem__("optimizer", "adam"))], needs=("base",))  # fmt: skip
    case("fields/checkpoint-optimizer-wrong-shape", F, ["train", "--resume", "--out", "run", "--epochs", "3", "--quiet"],
         setup=[base, rewrite_checkpoint(ckpt, optimizer_wrong_shape)], needs=("base",))  # fmt: skip
    milvus = ["index", "build", "--codes", "c.npz", "--backend", "milvus", "--uri", "m.db", "--out", "m.dmuhidx"]
    case("fields/milvus-uri-garbage", F, milvus, setup=[codes_fx, write("m.db", bytes(range(256)) * 20)],
         needs=("codes",))  # fmt: skip
    case("fields/milvus-uri-a-folder", F, milvus, setup=[codes_fx, mkdir("m.db")], needs=("codes",))
    case("fields/milvus-uri-text-file", F, milvus, setup=[codes_fx, write("m.db", "hello\n")], needs=("codes",))
    case("fields/milvus-uri-truncated-sqlite", F, milvus, setup=[codes_fx, sqlite_db("m.db", 0.5)], needs=("codes",))

    # -- class 3: silent wrong results -----------------------------------------------------------
    case("silent/checkpoint-nan-weight-evaluate", SI, evaluate,
         setup=[base, rewrite_checkpoint(ckpt, first_weight_set(float("nan")))], needs=("base",))  # fmt: skip
    case("silent/checkpoint-inf-weight-encode", SI, ["encode", "--run", "run", "--images", "imgs", "--out", "o.npz",
         "--quiet"], setup=[base, copy_fx("imgs"), rewrite_checkpoint(ckpt, first_weight_set(float("inf")))],
         needs=("base",))  # fmt: skip
    case("silent/checkpoint-nan-weight-resume", SI, ["train", "--resume", "--out", "run", "--epochs", "3", "--quiet"],
         setup=[base, rewrite_checkpoint(ckpt, first_weight_set(float("nan")))], needs=("base",))  # fmt: skip
    case("silent/checkpoint-negative-epoch-resume", SI, ["train", "--resume", "--out", "run", "--epochs", "3",
         "--quiet"], setup=[base, rewrite_checkpoint(ckpt, lambda s: s.__setitem__("epoch", -5))],
         needs=("base",))  # fmt: skip
    case("silent/checkpoint-negative-epoch-evaluate", SI, evaluate,
         setup=[base, rewrite_checkpoint(ckpt, lambda s: s.__setitem__("epoch", -1))], needs=("base",))  # fmt: skip
    sq = ["search", "--index", "i.dmuhidx", "--queries", "c.npz", "--rerank", "uncertainty"]
    case("silent/codes-bit-uncertainty-inf-rerank", SI, sq,
         setup=[idx, codes_fx, edit_codes("c.npz", lambda a: a["bit_uncertainty"].__setitem__((0, 0), np.inf))],
         needs=("index",))  # fmt: skip
    case("silent/codes-bit-uncertainty-negative-rerank", SI, sq,
         setup=[idx, codes_fx, edit_codes("c.npz", lambda a: a["bit_uncertainty"].__setitem__((0, 1), -1))],
         needs=("index",))  # fmt: skip
    case("silent/codes-uncertainty-nan-index-build", SI, ["index", "build", "--codes", "c.npz", "--out", "j.dmuhidx"],
         setup=[codes_fx, edit_codes("c.npz", lambda a: a["uncertainty"].__setitem__(0, np.nan))],
         needs=("codes",))  # fmt: skip
    case("silent/codes-ids-2d-index-build", SI, build,
         setup=codes_file("x.npz", ids=np.array([[f"a/{i}.png"] for i in range(4)])))  # fmt: skip
    case("silent/features-zero-columns-train", SI, tiny(data="features:f.npz", model="mlp",
         mp={"input_size": None, "width": None}), setup=features_npz("f.npz", lambda a: a.__setitem__(
         "features", np.zeros((len(a["labels"]), 0), np.float32))))  # fmt: skip
    case("silent/search-nprobe-2-32", SI, ["search", "--index", "v.dmuhidx", "--queries", "c.npz", "--nprobe",
         "4294967296"], setup=[copy_fx("index_ivf.dmuhidx", "v.dmuhidx"), codes_fx], needs=("index_ivf",))  # fmt: skip
    case("silent/search-tau-inf", SI, sq + ["--tau", "inf"], setup=[idx, codes_fx], needs=("index",))
    case("silent/search-tau-1e-320", SI, sq + ["--tau", "1e-320"], expect="either", setup=[idx, codes_fx],
         needs=("index",), check=lambda ctx: None if "results" in ctx.stdout or "rank" in ctx.stdout else "no results")  # fmt: skip

    # -- class 4: --force never replaces an input of the same command ---------------------------
    force = "--force"
    case("inputs/evaluate-json-is-checkpoint", IN, ["evaluate", "--run", "run", "--json", ckpt, force, "--quiet"],
         setup=base, needs=("base",), protect=["run/*"])  # fmt: skip
    case("inputs/evaluate-json-is-split", IN, ["evaluate", "--run", "run", "--json", "run/split.json", force,
         "--quiet"], setup=base, needs=("base",), protect=["run/*"])  # fmt: skip
    case("inputs/evaluate-json-is-data", IN, ["evaluate", "--run", "run", "--data", "features:d.npz", "--json",
         "d.npz", force, "--quiet"], setup=[run_copy("run", "feat"), copy_fx("digits.npz", "d.npz")],
         needs=("feat",), protect=["d.npz", "run/*"])  # fmt: skip
    case("inputs/evaluate-json-own-report", IN, ["evaluate", "--run", "run", "--json", "run/eval.json", force,
         "--quiet"], expect="ok", setup=[base, write("run/eval.json", "{}")], needs=("base",),
         protect=["run/checkpoint.safetensors", "run/config.yaml"], check=eval_json("run/eval.json"))  # fmt: skip
    si = ["search", "--index", "i.dmuhidx", "--queries", "c.npz"]
    case("inputs/search-out-is-index", IN, si + ["--out", "i.dmuhidx", force], setup=[idx, codes_fx],
         needs=("index",), protect=["i.dmuhidx"])  # fmt: skip
    case("inputs/search-out-is-queries", IN, si + ["--out", "c.npz", force], setup=[idx, codes_fx], needs=("index",),
         protect=["c.npz"])  # fmt: skip
    case("inputs/search-out-symlink-to-index", IN, si + ["--out", "link.json", force],
         setup=[idx, codes_fx, link("link.json", "i.dmuhidx")], needs=("index",), protect=["i.dmuhidx"])  # fmt: skip
    case("inputs/search-out-hardlink-to-index", IN, si + ["--out", "hard.json", force],
         setup=[idx, codes_fx, link("hard.json", "i.dmuhidx", hard=True)], needs=("index",),
         protect=["i.dmuhidx"])  # fmt: skip
    enc = ["encode", "--run", "run", "--images", "imgs", "--quiet", force]
    case("inputs/encode-out-is-an-input-image", IN, enc + ["--out", "imgs/c0/0.png"], setup=[base, copy_fx("imgs")],
         needs=("base",), protect=["imgs/*/*"])  # fmt: skip
    case("inputs/encode-out-is-checkpoint", IN, enc + ["--out", ckpt], setup=[base, copy_fx("imgs")],
         needs=("base",), protect=["run/*"])  # fmt: skip
    # A hard link is a second name of the checkpoint: the atomic write (temporary file, then a rename)
    # replaces the name, not the file the run holds, so writing there destroys nothing.
    case("inputs/encode-out-hardlink-to-checkpoint", IN, enc + ["--out", "ck.npz"], expect="either",
         setup=[base, copy_fx("imgs"), link("ck.npz", ckpt, hard=True)], needs=("base",), protect=["run/*"],
         check=codes_count("ck.npz", 60))  # fmt: skip
    case("inputs/encode-shards-into-the-run", IN, ["encode", "--run", "run", "--images", "imgs", "--shards", "run",
         "--quiet", force], setup=[base, copy_fx("imgs")], needs=("base",), protect=["run/*"])  # fmt: skip
    case("inputs/index-build-out-is-codes", IN, ["index", "build", "--codes", "c.npz", "--out", "c.npz", force],
         setup=codes_fx, needs=("codes",), protect=["c.npz"])  # fmt: skip
    case("inputs/index-build-out-symlink-to-codes", IN, ["index", "build", "--codes", "c.npz", "--out", "l.dmuhidx",
         force], setup=[codes_fx, link("l.dmuhidx", "c.npz")], needs=("codes",), protect=["c.npz"])  # fmt: skip
    case("inputs/export-onnx-out-is-checkpoint", IN, ["export-onnx", "--run", "run", "--out", ckpt, force],
         setup=base, needs=("base",), protect=["run/*"])  # fmt: skip
    case("inputs/export-onnx-out-is-config", IN, ["export-onnx", "--run", "run", "--out", "run/config.yaml", force],
         setup=base, needs=("base",), protect=["run/*"])  # fmt: skip

    # -- class 6: concurrent writers -------------------------------------------------------------
    adds = [idx, codes_fx, copy_fx("codes.npz", "a.npz"), copy_fx("codes.npz", "b.npz"),
            edit_codes("a.npz", codes_subset("a", 10)), edit_codes("b.npz", codes_subset("b", 7))]  # fmt: skip
    case("concurrent/index-add-twice", CO, ["index", "add", "--index", "i.dmuhidx", "--codes", "a.npz"],
         expect="ok", alongside=["index", "add", "--index", "i.dmuhidx", "--codes", "b.npz"], setup=adds,
         needs=("index",), may_change=["i.dmuhidx"], guard=both_succeeded_and_count("i.dmuhidx", 77))  # fmt: skip
    case("concurrent/index-add-and-remove", CO, ["index", "add", "--index", "i.dmuhidx", "--codes", "a.npz"],
         expect="ok", alongside=["index", "remove", "--index", "i.dmuhidx", "--ids", "gone.txt"],
         setup=adds + [write("gone.txt", "0\n1\n2\n3\n4\n")], needs=("index",), may_change=["i.dmuhidx"],
         guard=both_succeeded_and_count("i.dmuhidx", 65))  # fmt: skip
    case("concurrent/train-same-out", CO, tiny(out="same"), expect="either", alongside=tiny(out="same"),
         guard=one_run_kept("same"), check=trained("same"))  # fmt: skip
    case("concurrent/pretrain-same-out", CO, pretrain(out="same"), expect="either", alongside=pretrain(out="same"),
         guard=one_run_kept("same", "backbone.safetensors"))  # fmt: skip


# =============================================================================================
# Fixtures: built once, shared read-only by the cases (copied where a case changes them)


def _fixture_data(fx: Path) -> None:
    features, labels, _ = digits_arrays()
    np.savez(fx / "digits.npz", features=features, labels=labels)
    ctx = Ctx(fx, fx)
    image_folder("imgs")(ctx)


def _fixture_legacy(fx: Path) -> None:
    """checkpoint.pt as older dmuh wrote it: torch.save of the checkpoint's plain state (no code)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dmuh.runs.layout import load_checkpoint

    state = load_checkpoint(fx / "base" / "checkpoint.safetensors")
    torch.save(state, fx / "legacy.pt")


FEAT_ARGV = tiny(
    data="features:{fx}/digits.npz",
    model="mlp",
    bits="16",
    method="regu",
    out="{fx}/feat",
    mp={"input_size": None, "width": None, "hidden": "[16]"},
)
FIXTURES: Dict[str, dict] = {
    "data": dict(deps=(), make=_fixture_data),
    "base": dict(deps=("data",), argv=tiny(epochs="2", out="{fx}/base")),
    "feat": dict(deps=("data",), argv=FEAT_ARGV),
    "codes": dict(
        deps=("base",),
        argv=[
            "encode",
            "--run",
            "{fx}/base",
            "--images",
            "{fx}/imgs",
            "--out",
            "{fx}/codes.npz",
            "--uncertainty",
            "--quiet",
        ],
    ),
    "codes_plain": dict(
        deps=("base",),
        argv=["encode", "--run", "{fx}/base", "--images", "{fx}/imgs", "--out", "{fx}/codes_plain.npz", "--quiet"],
    ),
    "codes16": dict(
        deps=("feat",),
        argv=[
            "encode",
            "--run",
            "{fx}/feat",
            "--images",
            "features:{fx}/digits.npz",
            "--out",
            "{fx}/codes16.npz",
            "--quiet",
        ],
    ),
    "index": dict(deps=("codes",), argv=["index", "build", "--codes", "{fx}/codes.npz", "--out", "{fx}/index.dmuhidx"]),
    "index_hnsw": dict(
        deps=("codes",),
        argv=["index", "build", "--codes", "{fx}/codes.npz", "--kind", "hnsw", "--out", "{fx}/index_hnsw.dmuhidx"],
    ),
    "index_ivf": dict(
        deps=("codes",),
        argv=["index", "build", "--codes", "{fx}/codes.npz", "--kind", "ivf", "--out", "{fx}/index_ivf.dmuhidx"],
    ),
    "legacy": dict(deps=("base",), make=_fixture_legacy),
}
# fixture files a case may copy, by the fixture that makes them
FIXTURE_OF = {
    "digits.npz": "data",
    "imgs": "data",
    "base": "base",
    "feat": "feat",
    "codes.npz": "codes",
    "codes_plain.npz": "codes_plain",
    "codes16.npz": "codes16",
    "index.dmuhidx": "index",
    "index_hnsw.dmuhidx": "index_hnsw",
    "index_ivf.dmuhidx": "index_ivf",
    "legacy.pt": "legacy",
}


def required_fixtures(cases: Sequence[Case]) -> List[str]:
    wanted = set()
    for c in cases:
        wanted.update(c.needs)
        wanted.add("data")  # every case may copy imgs / digits.npz
    order, seen = [], set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in FIXTURES[name]["deps"]:
            visit(dep)
        order.append(name)

    for name in sorted(wanted):
        visit(name)
    return order


# =============================================================================================
# Running and classifying


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str = ""
    rc: Optional[int] = None
    seconds: float = 0.0
    stderr: str = ""
    peak_mb: Optional[float] = None  # the command's peak RSS (the larger of two, with `alongside`)
    input_bytes: int = 0


class Runner:
    def __init__(self, tmp: Path, python: str, timeout_scale: float, threads: int):
        self.tmp, self.python, self.timeout_scale = tmp, python, timeout_scale
        self.fx = tmp / "fixtures"
        self.fx.mkdir()
        (tmp / "cases").mkdir()
        home = tmp / "home"
        home.mkdir()
        self.env = dict(os.environ)
        self.env.update(
            HOME=str(home),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_CONFIG_HOME=str(home / ".config"),
            DMUH_CACHE_DIR=str(tmp / "dmuh-cache"),
            MPLCONFIGDIR=str(home / "mpl"),
            TORCH_HOME=str(home / "torch"),
            PYTHONDONTWRITEBYTECODE="1",
            MPLBACKEND="Agg",
            TMPDIR=str(tmp / "t"),
            PYTHONUNBUFFERED="1",
            COLUMNS="100",
        )
        (tmp / "t").mkdir()
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                self.env[var] = str(threads)
        self.env.pop("WORLD_SIZE", None)
        if self.env.get("PYTHONPATH"):  # each case runs in its own folder: a relative entry would miss
            self.env["PYTHONPATH"] = os.pathsep.join(
                os.path.abspath(p) for p in self.env["PYTHONPATH"].split(os.pathsep)
            )
        self.fixture_errors: Dict[str, str] = {}
        self.floor = 0.0  # MB: `floor_mb`, measured once the fixtures are built
        self.counter = 0
        self.lock = threading.Lock()

    def fill(self, argv: Sequence[str], case_dir: Path) -> List[str]:
        return [a.replace("{fx}", str(self.fx)).replace("{case}", str(case_dir)) for a in argv]

    def dmuh(self, argv: Sequence[str], cwd: Path, timeout: float, with_memory: bool = False):
        """(returncode or None on timeout, stdout, stderr, seconds), and the peak RSS in MB
        (`with_memory`: its ru_maxrss, read through MEASURE_WRAPPER)."""
        return run_measured([self.python, "-m", "dmuh", *argv], cwd, self.env, timeout, with_memory)

    def floor_mb(self) -> float:
        """The peak RSS of importing what the commands import (torch, numpy, FAISS when there, the
        CLI and the training, retrieval and serving code): what no case can go below."""
        code = (
            "import importlib, torch, numpy, dmuh.cli, dmuh.engine.trainer, dmuh.retrieval.index, dmuh.retrieval.service\n"
            "for name in ('faiss', 'fastapi', 'uvicorn'):\n"
            "    try: importlib.import_module(name)\n"
            "    except ImportError: pass"
        )
        rc, _, err, _, peak = run_measured([self.python, "-c", code], self.tmp, self.env, DEFAULT_TIMEOUT, True)
        if rc != 0:
            print(f"floor measurement failed: {err.strip().splitlines()[-1:]}", file=sys.stderr)
        return peak or 0.0

    # -- fixtures -------------------------------------------------------------------------------

    def build_fixtures(self, names: Sequence[str], jobs: int) -> None:
        done: Dict[str, concurrent.futures.Future] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            pending = list(names)
            while pending:
                ready = [n for n in pending if all(d in done and done[d].done() for d in FIXTURES[n]["deps"])]
                if not ready:
                    concurrent.futures.wait(
                        [f for f in done.values() if not f.done()], return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    continue
                for name in ready:
                    pending.remove(name)
                    done[name] = pool.submit(self._build_fixture, name)
            concurrent.futures.wait(list(done.values()))

    def _build_fixture(self, name: str) -> None:
        spec = FIXTURES[name]
        broken = [d for d in spec["deps"] if d in self.fixture_errors]
        if broken:
            self.fixture_errors[name] = f"needs fixture {broken[0]}"
            return
        started = time.monotonic()
        try:
            if "make" in spec:
                spec["make"](self.fx)
            else:
                rc, out, err, _, _ = self.dmuh(
                    self.fill(spec["argv"], self.fx), self.fx, DEFAULT_TIMEOUT * self.timeout_scale * 2
                )
                if rc != 0:
                    lines = [line for line in err.splitlines() if line.strip()]
                    self.fixture_errors[name] = f"`dmuh {' '.join(spec.get('argv', [])[:3])} ...` exit {rc}: " + (
                        lines[-1] if lines else "no stderr"
                    )
        except Exception as error:  # noqa: BLE001 - reported, cases that need it are skipped
            self.fixture_errors[name] = f"{type(error).__name__}: {error}"
        state = self.fixture_errors.get(name, "ok")
        print(f"fixture {name}: {state} ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)

    # -- cases ----------------------------------------------------------------------------------

    def run_case(self, number: int, c: Case, total: int) -> Result:
        started = time.monotonic()
        result = self._run_case(number, c)
        result.seconds = time.monotonic() - started
        with self.lock:
            self.counter += 1
            print(
                f"[{self.counter}/{total}] {c.name}: {result.outcome} ({result.seconds:.1f} s)"
                + (f"  {result.detail[:120]}" if result.outcome in FAILURES else ""),
                file=sys.stderr,
                flush=True,
            )
        return result

    def _run_case(self, number: int, c: Case) -> Result:
        missing = [n for n in c.needs if n in self.fixture_errors] + (["data"] if "data" in self.fixture_errors else [])
        if missing:
            return Result(c, "skipped", f"fixture {missing[0]} failed: {self.fixture_errors[missing[0]]}")
        case_dir = self.tmp / "cases" / f"{number:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', c.name)}"
        case_dir.mkdir(parents=True)
        ctx = Ctx(case_dir, self.fx)
        try:
            for step in c.setup:
                step(ctx)
        except Exception as error:  # noqa: BLE001
            return Result(c, "skipped", f"setup failed: {type(error).__name__}: {error}")
        before = snapshot(case_dir)
        input_bytes = folder_bytes(case_dir)
        timeout = (c.timeout or DEFAULT_TIMEOUT) * self.timeout_scale
        second = None
        if c.alongside is not None:  # a second writer, started at the same moment as the case's command
            second = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            other = second.submit(self.dmuh, self.fill(c.alongside, case_dir), case_dir, timeout, True)
        rc, out, err, _, peak = self.dmuh(self.fill(c.argv, case_dir), case_dir, timeout, True)
        if second is not None:
            o_rc, o_out, o_err, _, o_peak = other.result()
            second.shutdown()
            ctx.alongside = (o_rc, o_out, o_err)
            peak = max(peak or 0.0, o_peak or 0.0)
        ctx.rc, ctx.stdout, ctx.stderr = rc, out, err
        after = snapshot(case_dir)
        outcome, detail = classify(c, ctx, before, after)
        if outcome in ("ok", "clear error") and input_bytes < SMALL_INPUT_BYTES and peak is not None:
            if peak - self.floor > MEMORY_LIMIT_MB:
                outcome, detail = (
                    "memory",
                    (
                        f"peak {peak:.0f} MB, {peak - self.floor:.0f} MB above the floor, for {input_bytes / 1024:.0f} KB "
                        f"of input; {detail}"
                    ),
                )
        detail = detail.replace(str(case_dir) + os.sep, "").replace(str(self.fx), "{fx}")  # short, stable paths
        return Result(c, outcome, detail, rc, stderr=err, peak_mb=peak, input_bytes=input_bytes)


# Linux records the memory high-water mark of the process image an exec replaces in the new
# program's ru_maxrss, and subprocess forks (vfork) from the caller: a command started by a large
# process would report the caller's peak. So a small interpreter starts the command and writes
# its waited-for child's ru_maxrss (KB) to a file; its exit status is the command's.
MEASURE_WRAPPER = """
import os, resource, signal, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
if rc < 0:
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
"""


def run_measured(command: Sequence[str], cwd: Path, env: Dict[str, str], timeout: float, with_memory: bool):
    """Run `command` -> (returncode or None on timeout, stdout, stderr, seconds, peak RSS in MB or
    None: its maximum resident set, ru_maxrss, read through MEASURE_WRAPPER). It is reaped with
    os.wait4; its output is read by two threads meanwhile."""
    started = time.monotonic()
    peak_file = None
    if with_memory:  # measured one process further down: see MEASURE_WRAPPER
        handle, peak_file = tempfile.mkstemp(prefix="peak-", suffix=".txt")
        os.close(handle)
        command = [sys.executable, "-c", MEASURE_WRAPPER, peak_file, *command]
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    chunks: Dict[str, bytes] = {}

    def drain(name: str, stream) -> None:
        chunks[name] = stream.read()

    readers = [
        threading.Thread(target=drain, args=(name, stream), daemon=True)
        for name, stream in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    deadline = started + timeout
    status = usage = None
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if timed_out:  # the reader threads end once the process group is gone
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for reader in readers:
        reader.join(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    rc = None if timed_out else proc.returncode
    peak = None
    if peak_file is not None:
        with contextlib.suppress(OSError, ValueError):
            peak = int(Path(peak_file).read_text().strip()) / 1024.0
        with contextlib.suppress(OSError):
            os.unlink(peak_file)
    out, err = chunks.get("out", b""), chunks.get("err", b"")
    return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - started, peak


def folder_bytes(root: Path) -> int:
    """The total size of the regular files under `root` (links not followed)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                stat = os.lstat(os.path.join(dirpath, name))
                if not os.path.islink(os.path.join(dirpath, name)):
                    total += stat.st_size
    return total


def snapshot(root: Path) -> Dict[str, str]:
    """{relative path: sha256} of every regular file under root."""
    hashes = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            except OSError:
                continue
            hashes[path.relative_to(root).as_posix()] = digest.hexdigest()
    return hashes


def protected_files(c: Case, before: Dict[str, str]) -> List[str]:
    forced = "--force" in c.argv
    if c.protect is not None:
        return [p for p in before if any(fnmatch.fnmatch(p, g) for g in c.protect)]
    if forced:
        return []
    return [p for p in before if not any(fnmatch.fnmatch(p, g) for g in c.may_change)]


def stderr_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.strip()]


def message_lines(stderr: str) -> List[str]:
    """stderr's non-empty lines, argparse's usage block (`usage: ...` and its indented continuation
    lines, wrapped when a command has many flags) counted as one line."""
    lines = stderr_lines(stderr)
    if lines and lines[0].startswith("usage:"):
        rest = 1
        while rest < len(lines) and lines[rest][:1].isspace():
            rest += 1
        lines = [lines[0]] + lines[rest:]
    return lines


def is_clear(stderr: str) -> bool:
    lines = message_lines(stderr)
    return (
        bool(lines)
        and "Traceback" not in stderr
        and len(lines) <= 2
        and lines[-1].lstrip().startswith("dmuh")
        and len(lines[-1]) <= MESSAGE_LIMIT
        and "internal error" not in lines[-1]
    )


def classify(c: Case, ctx: Ctx, before: Dict[str, str], after: Dict[str, str]):
    if ctx.alongside is not None:  # the second command of a concurrency case: no crash, no unclear message
        o_rc, _, o_err = ctx.alongside
        o_lines = stderr_lines(o_err)
        if o_rc is None:
            return "hang", "the second command was killed after the timeout"
        if "Traceback" in o_err or o_rc < 0:
            return "traceback", f"second command: {o_lines[-1] if o_lines else f'exit {o_rc}'}"
        if o_rc != 0 and not is_clear(o_err):
            return "unclear", f"second command, exit {o_rc}: {o_lines[0] if o_lines else '(no stderr)'}"
    if c.guard is not None:
        message = c.guard(ctx)
        if message:
            return "lost", message
    changed = [p for p in protected_files(c, before) if after.get(p) != before[p]]
    if changed:
        what = "vanished" if changed[0] not in after else "changed"
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        return "lost", f"{changed[0]} {what} without --force{more}"
    lines = stderr_lines(ctx.stderr)
    first = lines[0] if lines else "(no stderr)"
    if ctx.rc is None:
        return "hang", f"killed after the timeout; stderr: {first}"
    if "Traceback" in ctx.stderr:
        return "traceback", f"{first} ... {lines[-1]}" if len(lines) > 1 else first
    if ctx.rc < 0:
        try:
            name = signal.Signals(-ctx.rc).name
        except ValueError:
            name = f"signal {-ctx.rc}"
        return "traceback", f"killed by {name}; stderr: {first}"
    if ctx.rc == 0:
        if c.expect == "error":
            return "silent", "exit 0 (accepted)" + (f"; stderr: {first}" if lines else "")
        message = c.check(ctx) if c.check is not None else None
        if message:
            return "silent", f"wrong result: {message}"
        return "ok", ""
    if is_clear(ctx.stderr):
        if c.expect == "ok":
            return "refused", f"exit {ctx.rc}: {lines[-1]}"
        return "clear error", lines[-1]
    shown = message_lines(ctx.stderr)
    return "unclear", f"exit {ctx.rc}: {first}" + (f" ({len(shown)} stderr lines)" if len(shown) > 2 else "")


# =============================================================================================
# Report


def table(results: Sequence[Result]) -> str:
    columns = ("tried",) + OUTCOMES
    categories = []
    for r in results:
        if r.case.category not in categories:
            categories.append(r.case.category)
    rows = []
    header = "| category | " + " | ".join(columns) + " |"
    rows.append(header)
    rows.append("|---|" + "---:|" * len(columns))
    for category in categories + ["total"]:
        chosen = [r for r in results if category == "total" or r.case.category == category]
        counts = [len(chosen)] + [sum(r.outcome == o for r in chosen) for o in OUTCOMES]
        label = f"**{category}**" if category == "total" else category
        cells = [f"**{n}**" if category == "total" else str(n) for n in counts]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def failure_list(results: Sequence[Result], every: bool = False) -> str:
    bad = [r for r in results if every or r.outcome not in ("ok", "clear error")]
    if not bad:
        return "Every case gave a clear error or the expected result."
    lines = ["| case | category | expect | outcome | exit | first stderr line / detail |", "|---|---|---|---|---:|---|"]
    order = {o: i for i, o in enumerate(OUTCOMES)}
    for r in sorted(bad, key=lambda r: (order[r.outcome], r.case.category, r.case.name)):
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        if len(detail) > 220:
            detail = detail[:217] + "..."
        lines.append(
            f"| {r.case.name} | {r.case.category} | {r.case.expect} | {r.outcome} | "
            f"{'' if r.rc is None else r.rc} | {detail} |"
        )
    return "\n".join(lines)


def memory_list(results: Sequence[Result], floor: float) -> str:
    """Every case's peak memory, largest first: peak RSS, its excess over the floor, the input size."""
    measured = [r for r in results if r.peak_mb is not None]
    lines = [
        f"Peak memory per case (ru_maxrss of each command; floor {floor:.0f} MB = the imports alone; a case with under "
        f"{SMALL_INPUT_BYTES >> 20} MB of input may take at most {MEMORY_LIMIT_MB} MB above it):",
        "",
        "| case | outcome | peak MB | above floor MB | input KB |",
        "|---|---|---:|---:|---:|",
    ]
    for r in sorted(measured, key=lambda r: -r.peak_mb):
        lines.append(
            f"| {r.case.name} | {r.outcome} | {r.peak_mb:.0f} | {r.peak_mb - floor:.0f} | {r.input_bytes / 1024:.0f} |"
        )
    if measured:
        small = [r for r in measured if r.input_bytes < SMALL_INPUT_BYTES]
        worst = max(small, key=lambda r: r.peak_mb) if small else None
        if worst is not None:
            lines.append("")
            lines.append(
                f"Largest peak among the {len(small)} cases with under 1 MB of input: {worst.peak_mb:.0f} MB "
                f"({worst.peak_mb - floor:.0f} MB above the floor), {worst.case.name}."
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="run the cases whose name or category contains SUBSTRING (repeatable: any of them)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once [1]")
    parser.add_argument("--list", action="store_true", help="list the cases (name, category, expectation) and exit")
    parser.add_argument(
        "--all",
        action="store_true",
        help="add the extended cases (more values of the same kinds; about twice the time)",
    )
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help=f"multiply every case's timeout ({DEFAULT_TIMEOUT:g} s) by this [1]",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP/MKL threads of each dmuh process (0: leave the environment's) [1]"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs `python -m dmuh` [this one]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument(
        "--details", action="store_true", help="list every case with its outcome and message, not only the failures"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a case is not ok / a clear error")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs: expected a positive integer")

    define_cases()
    unknown = EXTENDED - {c.name for c in CASES}
    assert not unknown, f"EXTENDED names no case: {sorted(unknown)}"
    cases = [
        c
        for c in CASES
        if (args.all or not c.extended) and (not args.only or any(s in c.name or s in c.category for s in args.only))
    ]
    if args.list:
        for c in cases:
            print(f"{c.name}\t{c.category}\t{c.expect}" + ("\t(--all)" if c.extended else ""))
        by_category: Dict[str, int] = {}
        for c in cases:
            by_category[c.category] = by_category.get(c.category, 0) + 1
        print(f"\n{len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in by_category.items()), file=sys.stderr)
        return 0
    if not cases:
        print(f"no case matches --only {' '.join(args.only)}", file=sys.stderr)
        return 2
    probe = subprocess.run([args.python, "-c", "import dmuh"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"{args.python} cannot import dmuh: {probe.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 2

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="dmuh-bad-inputs-"))
    try:
        runner = Runner(tmp, args.python, args.timeout_scale, args.threads)
        fixtures = required_fixtures(cases)
        print(f"{len(cases)} cases, fixtures {', '.join(fixtures)}; working in {tmp}", file=sys.stderr, flush=True)
        runner.build_fixtures(fixtures, args.jobs)
        runner.floor = runner.floor_mb()
        print(f"memory floor (imports alone): {runner.floor:.0f} MB", file=sys.stderr, flush=True)
        fixture_hashes = snapshot(runner.fx)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(runner.run_case, i, c, len(cases)) for i, c in enumerate(cases, start=1)]
            results = [f.result() for f in futures]
        touched = [p for p, h in fixture_hashes.items() if snapshot(runner.fx).get(p) != h]
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"# dmuh bad-input audit: {len(results)} cases, {time.monotonic() - started:.0f} s, --jobs {args.jobs}\n")
    print(table(results))
    print()
    print(failure_list(results, every=args.details))
    print()
    print(memory_list(results, runner.floor))
    if runner.fixture_errors:
        print("\nFixtures that failed (their cases are 'skipped'):")
        for name, error in runner.fixture_errors.items():
            print(f"- {name}: {error}")
    if touched:
        print(f"\nWarning: a case changed the shared fixtures: {', '.join(touched[:5])}")
    failed = any(r.outcome not in ("ok", "clear error") for r in results)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
