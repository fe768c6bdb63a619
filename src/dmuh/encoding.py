"""Encode images with a trained run into a codes file, and read codes files back.

A codes file (`dmuh encode --out FILE`) is one uncompressed .npz:

    format           "dmuh-codes"
    meta             JSON: version, bits, count, model identity (run path, checkpoint sha256, method,
                     model name, epoch), image size and channels the images were decoded at,
                     the images spec, class names
    codes            (n, ceil(bits / 8)) uint8, packed by `dmuh.codes.pack_bits` (padding bits zero)
    ids              (n,) str: the image paths (or source ids such as "digits:17")
    labels           (n, C) uint8 multi-hot, when the images have labels (class folders, list files)
    uncertainty      (n,) float32 image-level DMUH uncertainty mean_k |h_k - m_k| (Eq. 7), optional
    bit_uncertainty  (n, bits) float16 bit-level uncertainty |h_k - m_k| (Eq. 6), optional

It is written atomically; a truncated or corrupted file (the zip's CRC-32 covers every array) is a
DmuhError naming the file.

The network is rebuilt from the run directory alone (config.yaml + checkpoint.pt): the input
channels or feature width are read from the checkpoint's first weight, so neither the training
data nor pretrained weights are needed to encode or search. Both networks run in eval mode:
the momentum copy shares the hashing network's BatchNorm statistics (it copies its buffers), so
|h - m| measures how far the weights have moved, as in training, but does not depend on which
images share a batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dmuh.errors import DmuhError
from dmuh.io import atomic_path

CODES_FORMAT = "dmuh-codes"
CODES_VERSION = 1
ENCODE_CHUNK = 4096  # images decoded at a time: bounds memory for large collections
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


# ---------------------------------------------------------------------------------------------
# Codes files


@dataclass
class Codes:
    """Packed binary codes of n images, with what identifies them and the model that made them."""

    packed: np.ndarray  # (n, ceil(bits / 8)) uint8
    bits: int
    ids: List[str]
    labels: Optional[np.ndarray] = None  # (n, C) uint8 multi-hot
    class_names: Optional[List[str]] = None
    model: Dict[str, Any] = field(default_factory=dict)  # see `model_identity`
    image_size: Optional[int] = None
    channels: Optional[int] = None
    images: Optional[str] = None  # the images spec they were encoded from
    uncertainty: Optional[np.ndarray] = None  # (n,) float32
    bit_uncertainty: Optional[np.ndarray] = None  # (n, bits) float16

    def __post_init__(self):
        from dmuh.search import as_packed

        self.packed, self.bits = as_packed(self.packed, self.bits)
        n = self.packed.shape[0]
        self.ids = [str(i) for i in self.ids]
        if len(self.ids) != n:
            raise DmuhError(f"codes: {len(self.ids)} ids for {n} codes")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.uint8)
            if self.labels.ndim != 2 or self.labels.shape[0] != n:
                raise DmuhError(f"codes: labels of shape {self.labels.shape} for {n} codes")
        if self.uncertainty is not None:
            self.uncertainty = np.asarray(self.uncertainty, dtype=np.float32)
            if self.uncertainty.shape != (n,):
                raise DmuhError(f"codes: uncertainty of shape {self.uncertainty.shape} for {n} codes")
        if self.bit_uncertainty is not None:
            self.bit_uncertainty = np.asarray(self.bit_uncertainty, dtype=np.float16)
            if self.bit_uncertainty.shape != (n, self.bits):
                raise DmuhError(f"codes: bit uncertainty of shape {self.bit_uncertainty.shape} for {n} {self.bits}-bit codes")

    def __len__(self) -> int:
        return self.packed.shape[0]

    def identity(self) -> Dict[str, Any]:
        """What an index built from these codes keeps: the model and how images were decoded."""
        return {"model": dict(self.model), "image_size": self.image_size, "channels": self.channels}

    def save(self, path, overwrite: bool = True) -> None:
        path = Path(path)
        if path.exists() and not overwrite:
            raise DmuhError(f"{path} already exists; pass --force to replace it")
        meta = {"version": CODES_VERSION, "bits": self.bits, "count": len(self), "model": self.model,
                "image_size": self.image_size, "channels": self.channels, "images": self.images,
                "class_names": self.class_names}
        arrays = {"format": np.array(CODES_FORMAT), "meta": np.array(json.dumps(meta)),
                  "codes": self.packed, "ids": np.array(self.ids, dtype=str)}
        for name in ("labels", "uncertainty", "bit_uncertainty"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> "Codes":
        path = Path(path)
        if not path.is_file():
            raise DmuhError(f"{path}: codes file not found")
        try:
            with np.load(path, allow_pickle=False) as f:
                if "format" not in f.files or str(f["format"]) != CODES_FORMAT:
                    raise DmuhError(f"{path}: not a dmuh codes file (write one with `dmuh encode`)")
                arrays = {name: f[name] for name in f.files}  # reading checks each member's CRC-32
        except DmuhError:
            raise
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            raise DmuhError(f"{path}: truncated or corrupted codes file ({_first_line(error)})") from None
        try:
            meta = json.loads(str(arrays["meta"]))
        except (KeyError, ValueError):
            raise DmuhError(f"{path}: corrupted codes file (no readable meta)") from None
        if meta.get("version") != CODES_VERSION:
            raise DmuhError(f"{path}: codes format version {meta.get('version')!r}; this dmuh reads version {CODES_VERSION}")
        if "codes" not in arrays or "ids" not in arrays:
            raise DmuhError(f"{path}: corrupted codes file (missing codes or ids)")
        if arrays["codes"].shape[0] != meta.get("count"):
            raise DmuhError(f"{path}: corrupted codes file (meta says {meta.get('count')} codes, "
                            f"holds {arrays['codes'].shape[0]})")
        try:
            return cls(arrays["codes"], meta["bits"], arrays["ids"].tolist(), labels=arrays.get("labels"),
                       class_names=meta.get("class_names"), model=meta.get("model") or {},
                       image_size=meta.get("image_size"), channels=meta.get("channels"), images=meta.get("images"),
                       uncertainty=arrays.get("uncertainty"), bit_uncertainty=arrays.get("bit_uncertainty"))
        except DmuhError as error:
            raise DmuhError(f"{path}: {error}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Rebuilding a trained network without its data


def resolve_run(run) -> tuple:
    """A run directory, or the checkpoint.pt inside one -> (run_dir, checkpoint path)."""
    from dmuh.train import CHECKPOINT, CONFIG

    run = Path(run)
    run_dir = run.parent if run.is_file() else run
    if not (run_dir / CONFIG).is_file():
        raise DmuhError(f"--checkpoint {run}: not a run directory (no {CONFIG}); pass the directory `dmuh train --out` wrote")
    checkpoint = run if run.is_file() else run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise DmuhError(f"--checkpoint {run}: no {CHECKPOINT} in the run directory")
    return run_dir, checkpoint


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Encoder:
    """A trained run ready to turn images into codes (networks in eval mode)."""

    run_dir: Path
    config: Any  # TrainConfig
    model: Any  # HashNetwork
    method: Any  # HashingMethod (continuous_codes)
    momentum_network: Any  # the momentum copy's network, or None (not a DMUH run)
    pipeline: Any  # InputPipeline
    device: Any
    identity: Dict[str, Any]

    @property
    def bits(self) -> int:
        return int(self.config.bits)

    @property
    def channels(self) -> Optional[int]:
        return self.model.in_channels

    @property
    def image_size(self) -> Optional[int]:
        """The size images are decoded at: the run's decode size, else the network's input size."""
        if self.model.in_channels is None:
            return None
        return self.config.image_size or self.model.input_size

    def continuous(self, inputs, uncertainty: bool = False):
        """Continuous codes h (n, bits) float32 on CPU; with `uncertainty` also |h - m| (n, bits)."""
        import torch

        from dmuh.train import run_network

        if uncertainty and self.momentum_network is None:
            raise DmuhError(f"uncertainty needs a DMUH run (a momentum network); {self.run_dir} was trained "
                            f"with {self.config.method!r}")
        codes = self.method.continuous_codes

        def both(x):
            h = codes(self.model(x).float())
            return torch.cat([h, codes(self.momentum_network(x).float())], dim=1) if uncertainty else h

        out = run_network(both, inputs, self.pipeline, self.config, self.device)
        if not uncertainty:
            return out, None
        h, m = out[:, :self.bits], out[:, self.bits:]
        return h, (h - m).abs()


def load_encoder(run, device: str = "cpu") -> Encoder:
    """Rebuild a run's hashing network (and momentum copy) from config.yaml and checkpoint.pt."""
    from dmuh.config import TrainConfig, load_yaml
    from dmuh.data.pipeline import InputPipeline
    from dmuh.models.momentum import MomentumNetwork
    from dmuh.train import CONFIG, load_checkpoint, resolve_device

    run_dir, checkpoint_path = resolve_run(run)
    values = {**load_yaml(run_dir / CONFIG), "device": device, "init": "scratch", "pretrained": None, "compile": False}
    config = TrainConfig.from_dict(values, where=str(run_dir / CONFIG))
    device = resolve_device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    try:
        model = _model_from_state(config, checkpoint["model"])
        method = _method_from_state(config, checkpoint["method"], run_dir)
    except (RuntimeError, KeyError, ValueError) as error:
        raise DmuhError(f"{checkpoint_path}: does not fit the network of {run_dir / CONFIG} ({_first_line(error)})") from None
    momentum_network = None
    if method.uses_momentum and checkpoint.get("momentum") is not None:
        momentum = MomentumNetwork(model, method.momentum_alpha)
        momentum.load_state_dict(checkpoint["momentum"])
        momentum_network = momentum.network
    for module in (model, method, momentum_network):
        if module is not None:
            module.to(device).eval()
            module.requires_grad_(False)
    pipeline = InputPipeline(model.in_channels, model.input_size, "none")
    identity = {"run": str(run_dir.resolve()), "checkpoint_sha256": file_sha256(checkpoint_path),
                "method": config.method, "model": config.model, "bits": int(config.bits),
                "epoch": int(checkpoint.get("epoch", 0))}
    return Encoder(run_dir, config, model, method, momentum_network, pipeline, device, identity)


def _model_from_state(config, state: Dict[str, Any]):
    """The configured network sized by the checkpoint: input channels (images) or width (features)."""
    import torch

    from dmuh.train import build_model

    weights = [v for k, v in state.items() if k.startswith("backbone.") and k.endswith("weight") and v.dim() in (2, 4)]
    first = weights[0] if weights else state["hash_layer.weight"]
    probe = torch.zeros((1, first.shape[1], 1, 1) if first.dim() == 4 else (1, first.shape[1]))
    model = build_model(config, probe)
    model.load_state_dict(state)
    return model


def _method_from_state(config, state: Dict[str, Any], run_dir: Path):
    """The configured method with the checkpoint's state; buffers sized by the training set
    (memories of DPSH/DMUH) take the checkpoint's shapes."""
    import torch

    from dmuh.methods import create_method

    if "memory_labels" in state:
        label_shape = tuple(state["memory_labels"].shape)
    else:
        label_shape = (_num_train(run_dir), 1)
    method = create_method(config.method, bits=config.bits, train_labels=torch.zeros(label_shape), **config.method_params)
    buffers = dict(method.named_buffers())
    for name, value in state.items():
        if name in buffers and buffers[name].shape != value.shape:
            owner, _, leaf = name.rpartition(".")
            method.get_submodule(owner)._buffers[leaf] = torch.empty_like(value)
    method.load_state_dict(state)
    return method


def _num_train(run_dir: Path) -> int:
    from dmuh.data.protocols import Split
    from dmuh.train import SPLIT

    path = run_dir / SPLIT
    return len(Split.load(path).train) if path.is_file() else 1


# ---------------------------------------------------------------------------------------------
# Images to encode


def read_image(path, channels: int, size: Optional[int], data: Optional[bytes] = None, name: Optional[str] = None) -> np.ndarray:
    """One image file (or its bytes) -> (size, size, channels) uint8; DmuhError naming it if unreadable."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(path)
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
        image = image.convert("L" if channels == 1 else "RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)  # as dmuh.data sources resize
    except FileNotFoundError:
        raise DmuhError(f"{name}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DmuhError(f"{name}: cannot read image ({_first_line(error)})") from None
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


class ImageFiles:
    """Unlabeled image files: paths under a directory or inside a zip, or listed one per line."""

    labels = None
    class_names = None

    def __init__(self, paths: Sequence[str], base: Optional[Path] = None, zip_path: Optional[Path] = None, channels: int = 3):
        self.ids = list(paths)
        self.base = base
        self.zip_path = zip_path
        self.channels = channels
        if not self.ids:
            raise DmuhError(f"{zip_path or base}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")

    def __len__(self) -> int:
        return len(self.ids)

    def decode(self, indices=None, size: Optional[int] = None) -> np.ndarray:
        indices = range(len(self)) if indices is None else indices
        archive = zipfile.ZipFile(self.zip_path) if self.zip_path is not None else None
        try:
            def one(i):
                relative = self.ids[int(i)]
                if archive is not None:
                    try:
                        data = archive.read(relative)
                    except (KeyError, zipfile.BadZipFile, OSError) as error:
                        raise DmuhError(f"{self.zip_path}:{relative}: cannot read image ({_first_line(error)})") from None
                    return read_image(None, self.channels, size, data=data, name=f"{self.zip_path}:{relative}")
                path = Path(relative) if self.base is None else self.base / relative
                return read_image(path, self.channels, size)

            if archive is not None:  # one zip handle is not safe to share between threads
                arrays = [one(i) for i in indices]
            else:
                with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                    arrays = list(pool.map(one, indices))
        finally:
            if archive is not None:
                archive.close()
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DmuhError(f"{self.zip_path or self.base}: images differ in size; pass --image-size to resize them")
        return np.stack(arrays) if arrays else np.zeros((0, size or 0, size or 0, self.channels), np.uint8)


def _list_image_files(path: Path) -> List[str]:
    def visible(relative: str) -> bool:
        parts = relative.split("/")
        return not any(p.startswith(".") or p == "__MACOSX" for p in parts) and Path(relative).suffix.lower() in IMAGE_EXTENSIONS

    if path.is_dir():
        files = []
        for folder, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [(Path(folder) / f).relative_to(path).as_posix() for f in filenames]
        return sorted(f for f in files if visible(f))
    with zipfile.ZipFile(path) as archive:
        return sorted(n for n in archive.namelist() if not n.endswith("/") and visible(n))


def open_images(spec: str, root: Optional[str] = None, channels: int = 3):
    """The images to encode, with labels where known.

    One image file. A directory or .zip: an ImageFolder (label = parent folder) when every image sits in a class
    folder, else unlabeled files. A .txt list: `path 0 1 0 ...` lines (labeled, as HashNet's lists)
    or bare paths (unlabeled), relative to --root or else to the list's folder. Anything else goes
    to `dmuh.data.open_source` (digits, cifar-batches:DIR, idx:DIR, features:FILE.npz, ...).
    """
    from dmuh.data import open_source

    path = Path(spec)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:  # one image
        return ImageFiles([path.name], base=path.parent, channels=channels)
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip"):
        try:
            files = _list_image_files(path)
        except (OSError, zipfile.BadZipFile) as error:
            raise DmuhError(f"--images {spec}: cannot read ({_first_line(error)})") from None
        if not files:  # CIFAR batches, IDX files, ...
            return open_source(spec, root=root)
        if all("/" in f for f in files):
            return open_source(f"folder:{spec}", channels=channels)
        if path.is_dir():
            return ImageFiles(files, base=path, channels=channels)
        return ImageFiles(files, zip_path=path, channels=channels)
    if path.is_file() and path.suffix.lower() == ".txt":
        try:
            lines = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as error:
            raise DmuhError(f"--images {spec}: cannot read list file ({_first_line(error)})") from None
        base = Path(root) if root else path.parent
        if lines and all(len(fields) > 1 for fields in lines):
            return open_source(f"list:{spec}", root=str(base), channels=channels)
        if not base.is_dir() and base.suffix.lower() == ".zip":
            return ImageFiles([" ".join(f) for f in lines], zip_path=base, channels=channels)
        return ImageFiles([" ".join(f) for f in lines], base=base, channels=channels)
    return open_source(spec, root=root)


def _match_channels(images: np.ndarray, channels: Optional[int]) -> np.ndarray:
    """(n, H, W, c) uint8 -> `channels` channels: grey is repeated to RGB, RGB turned grey (ITU-R 601)."""
    if images.ndim != 4 or channels is None or images.shape[3] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=3)
    grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]


def encode_arrays(encoder: Encoder, images: np.ndarray, uncertainty: bool = False):
    """(n, H, W, C) uint8 images (or (n, D) features) -> (sign codes packed, bit uncertainty or None)."""
    from dmuh.codes import pack_bits, sign
    from dmuh.data.pipeline import images_to_tensor

    images = _match_channels(images, encoder.channels)
    if images.ndim == 4 and encoder.channels is None:
        raise DmuhError(f"{encoder.run_dir} encodes feature vectors ({encoder.config.model}), not images")
    if images.ndim == 2 and encoder.channels is not None:
        raise DmuhError(f"{encoder.run_dir} encodes images, not feature vectors")
    h, u = encoder.continuous(images_to_tensor(images), uncertainty)
    packed = pack_bits(sign(h).numpy())
    return packed, (None if u is None else u.numpy())


def encode_images(encoder: Encoder, source, uncertainty: bool = False, image_size: Optional[int] = None,
                  images_spec: Optional[str] = None, progress=None) -> Codes:
    """Encode every item of `source` (from `open_images` or dmuh.data) into a `Codes`."""
    size = image_size or encoder.image_size
    if getattr(source, "channels", 1) is None:  # feature vectors are never resized
        size = None
    packed, bit_uncertainty = [], []
    for start in range(0, len(source.ids), ENCODE_CHUNK):
        indices = np.arange(start, min(start + ENCODE_CHUNK, len(source.ids)))
        p, u = encode_arrays(encoder, source.decode(indices, size=size), uncertainty)
        packed.append(p)
        if u is not None:
            bit_uncertainty.append(u)
        if progress is not None:
            progress(int(indices[-1]) + 1, len(source.ids))
    u = np.concatenate(bit_uncertainty) if uncertainty else None
    labels = getattr(source, "labels", None)
    return Codes(
        np.concatenate(packed), encoder.bits, source.ids,
        labels=None if labels is None else np.asarray(labels),
        class_names=getattr(source, "class_names", None) if labels is not None else None,
        model=encoder.identity, image_size=size, channels=encoder.channels, images=images_spec,
        uncertainty=None if u is None else u.mean(axis=1), bit_uncertainty=u,
    )
