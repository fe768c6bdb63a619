"""Encode images with a trained run: rebuild its networks from the run directory alone, and turn
images (or feature vectors) into packed sign codes, optionally with DMUH's uncertainty.

    encoder = load_encoder("runs/cifar10-dmuh-32", device="cpu")
    codes = encode_images(encoder, open_images("photos/"), uncertainty=True)   # a dmuh.codes.file.Codes
    codes.save("photos.npz")

The networks are rebuilt by `dmuh.runs.layout` from config.yaml and checkpoint.safetensors: neither the training data
nor pretrained weights are needed to encode or search. Both networks run in eval mode: the
momentum copy shares the hashing network's BatchNorm statistics (it copies its buffers), so
|h - m| measures how far the weights have moved, as in training, but does not depend on which
images share a batch. Reading image files is `dmuh.data.images`; the codes file is
`dmuh.codes.file`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from dmuh.codes.binary import pack_bits, sign
from dmuh.codes.file import Codes
from dmuh.data import open_source
from dmuh.data.images import match_channels
from dmuh.data.paired import Vocabulary
from dmuh.data.pipeline import InputPipeline, images_to_tensor
from dmuh.engine.builder import encode_text_vectors
from dmuh.engine.runtime import Execution, resolve_device, run_network
from dmuh.errors import ConfigError, DataError, DmuhError
from dmuh.retrieval.backbone import load_feature_backbone
from dmuh.runs.layout import (
    FEATURE_BACKBONE,
    VOCABULARY,
    load_checkpoint,
    load_run_config,
    read_feature_backbone,
    rebuild_networks,
    resolve_run,
)
from dmuh.utils.io import file_sha256, memory_budget

ENCODE_CHUNK = 4096  # images decoded at a time: bounds memory for large collections


@dataclass
class Encoder:
    """A trained run ready to turn images into codes (networks in eval mode)."""

    run_dir: Path
    config: Any  # TrainConfig
    model: Any  # HashNetwork
    method: Any  # HashingMethod (continuous_codes)
    momentum_network: Any  # the momentum copy's network, or None (not a DMUH run)
    pipeline: InputPipeline
    execution: Execution  # device, precision, memory layout, batch size
    identity: Dict[str, Any]  # run, checkpoint_sha256, method, model, bits, epoch, decoder
    vocabulary: Any = None  # a cross-modal run's `Vocabulary` (vocabulary.json), when its data had words
    # A run trained on `dmuh features` vectors: the record of the backbone that made them
    # (feature_backbone.json), and that backbone, rebuilt when images first come (`image_backbone`).
    backbone_record: Optional[Dict[str, Any]] = None
    backbone: Any = None  # dmuh.retrieval.backbone.FeatureBackbone

    @property
    def device(self) -> torch.device:
        return self.execution.device

    def with_batch_size(self, batch_size: int) -> "Encoder":
        """This encoder with `batch_size` images per forward pass (the run's config is left as it is)."""
        return dataclasses.replace(self, execution=dataclasses.replace(self.execution, batch_size=int(batch_size)))

    @property
    def bits(self) -> int:
        return int(self.config.bits)

    @property
    def channels(self) -> Optional[int]:
        """The channels of the images it encodes (None: feature vectors only). A run on the vectors
        of `dmuh features` encodes images too, through the backbone that made them."""
        if self.model.in_channels is None and self.backbone_record is not None:
            return int(self.backbone_record["channels"])
        return self.model.in_channels

    def image_backbone(self):
        """The feature backbone of a run trained on `dmuh features` vectors, rebuilt (and checked
        against its record) on first use."""
        if self.backbone is None:
            where = str(self.run_dir / FEATURE_BACKBONE)
            self.backbone = load_feature_backbone(self.backbone_record, where).to(self.device)
        return self.backbone

    def _vectors(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images as the network's input: a features run's images become their backbone's features."""
        if inputs.dim() == 4 and self.model.in_channels is None and self.backbone_record is not None:
            return self.image_backbone().features(inputs, self.execution)
        return inputs

    @property
    def image_size(self) -> Optional[int]:
        """The size images are decoded at: the run's `image_size` (config.yaml), else the size the
        network was trained at (`input_size`, from the checkpoint's `model_config`: a free-size
        model trained at the images' own size records it), so the codes of the run's own images
        are `dmuh evaluate`'s. The pipeline then resizes to `input_size` as training did."""
        if self.model.in_channels is None:
            return None if self.backbone_record is None else int(self.backbone_record["image_size"])
        return self.config.image_size or self.model.input_size

    def continuous(self, inputs, uncertainty: bool = False):
        """Continuous codes h (n, bits) float32 on CPU; with `uncertainty` also |h - m| (n, bits)."""
        if uncertainty and self.momentum_network is None:
            raise DmuhError(
                f"uncertainty needs a DMUH run (a momentum network); {self.run_dir} was trained "
                f"with {self.config.method!r}"
            )
        codes = self.method.continuous_codes
        inputs = self._vectors(inputs)

        def both(x):
            h = codes(self.model(x).float())
            return torch.cat([h, codes(self.momentum_network(x).float())], dim=1) if uncertainty else h

        out = run_network(both, inputs, self.pipeline, self.execution)
        if not uncertainty:
            return out, None
        h, m = out[:, : self.bits], out[:, self.bits :]
        return h, (h - m).abs()

    def require_text_network(self) -> None:
        if not self.method.requirements().text:
            raise DmuhError(
                f"{self.run_dir} was trained with {self.config.method!r}, which hashes images only; "
                "text needs a cross-modal run (dmuh-cross, dcmh, ugach)"
            )

    def text_vectors(self, texts) -> np.ndarray:
        """(n, V) vectors of texts (strings), as the run's training texts were made; a text with no
        word of the vocabulary is refused (it would match nothing)."""
        self.require_text_network()
        if self.vocabulary is None:
            raise DmuhError(
                f"{self.run_dir} has no {VOCABULARY}: its data gave text vectors without words, so "
                "texts cannot be encoded (encode text vectors with `dmuh encode --texts PAIRED_DATA`)"
            )
        return self.vocabulary.vectorize(list(texts), require_known=True)

    def text_codes(self, vectors: np.ndarray) -> np.ndarray:
        """Packed sign codes of (n, V) text vectors by the run's text network."""

        self.require_text_network()
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.method.text_dim:
            raise DmuhError(
                f"text vectors of shape {vectors.shape}: the run's text network takes {self.method.text_dim} columns"
            )
        h = encode_text_vectors(self.method, torch.from_numpy(vectors), self.execution)
        return pack_bits(sign(h).numpy())

    def features(self, inputs) -> np.ndarray:
        """The items' own representation (n, D) float32: feature vectors as they are, else the
        backbone's features of the images (the reference representation of label-free methods)."""
        if self.model.in_channels is None:
            return self._vectors(inputs).float().numpy()
        return run_network(self.model.features, inputs, self.pipeline, self.execution).numpy()


def load_encoder(run, device: str = "cpu") -> Encoder:
    """Rebuild a run's hashing network (and momentum copy) from config.yaml and checkpoint.safetensors."""
    run_dir, checkpoint_path = resolve_run(run)
    config = load_run_config(run_dir, device=device, compile=False)
    device = resolve_device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    model, method, momentum = rebuild_networks(checkpoint, checkpoint_path, run_dir, config)
    momentum_network = momentum.network if momentum is not None else None
    needs = method.requirements()
    if needs.retrieval_network == "momentum" and momentum_network is not None:
        # The momentum copy's codes are the retrieval codes; u = |m - h| is the same either way.
        model, momentum_network = momentum_network, model
    for module in (model, method, momentum_network):
        if module is not None:
            module.to(device)
    pipeline = InputPipeline.for_network(model)
    identity = {
        "run": str(run_dir.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "method": config.method,
        "model": config.model,
        "bits": int(config.bits),
        "epoch": int(checkpoint.get("epoch", 0)),
        # whether the run trained a decoder of its codes, so that `dmuh index build` knows without the
        # method registry (and torch)
        "decoder": bool(needs.decoder),
    }
    vocabulary = None
    if needs.text and (run_dir / VOCABULARY).is_file():
        vocabulary = Vocabulary.load(run_dir / VOCABULARY)
    execution = Execution.of(config, device)
    backbone_record = read_feature_backbone(run_dir)
    return Encoder(
        run_dir, config, model, method, momentum_network, pipeline, execution, identity, vocabulary, backbone_record
    )


def collection_encoder(
    run, device: str = "cpu", uncertainty: bool = False, batch_size: Optional[int] = None
) -> Encoder:
    """The encoder of a run for a collection of images (`encode_images`, `dmuh.retrieval.shards`):
    `uncertainty` needs a DMUH run (a momentum network); `batch_size` images per forward pass
    (default: the run's eval_batch_size)."""
    encoder = load_encoder(run, device)
    if uncertainty and encoder.momentum_network is None:
        raise ConfigError(
            f"uncertainty needs a DMUH run (a momentum network); {run} was trained with {encoder.config.method!r}",
            field="uncertainty",
        )
    return encoder.with_batch_size(batch_size) if batch_size else encoder


def encode_arrays(encoder: Encoder, images: np.ndarray, uncertainty: bool = False):
    """(n, H, W, C) uint8 images (or (n, D) features) -> (sign codes packed, bit uncertainty or None)."""
    images = match_channels(images, encoder.channels)
    if images.ndim == 4 and encoder.channels is None:
        raise DmuhError(f"{encoder.run_dir} encodes feature vectors ({encoder.config.model}), not images")
    if images.ndim == 2 and encoder.model.in_channels is not None:
        raise DmuhError(f"{encoder.run_dir} encodes images, not feature vectors")
    h, u = encoder.continuous(images_to_tensor(images), uncertainty)
    packed = pack_bits(sign(h).numpy())
    return packed, (None if u is None else u.numpy())


def encode_texts(encoder: Encoder, spec: str) -> Codes:
    """The text codes of `spec`: paired data (its text vectors, ids and labels) or a .txt file of
    texts, one per line (ids "line:N"), vectorised with the run's vocabulary."""

    path = Path(spec)
    labels = class_names = None
    if path.suffix.lower() == ".txt" and not path.exists():
        raise DataError(f"texts {spec}: not found", field="texts")
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"texts {spec}: cannot read ({str(error).splitlines()[0][:120]})", field="texts") from None
        numbered = [(i + 1, line.strip()) for i, line in enumerate(lines) if line.strip()]
        if not numbered:
            raise DataError(f"texts {spec}: holds no text", field="texts")
        ids = [f"line:{n}" for n, _ in numbered]
        vectors = encoder.text_vectors([text for _, text in numbered])
    else:
        source = open_source(spec)
        if getattr(source, "text", None) is None:
            raise DataError(
                f"texts {spec}: not paired data (no text vectors); give paired data or a .txt of texts", field="texts"
            )
        vectors, ids = source.text, source.ids
        if source.labeled:
            labels, class_names = source.labels, source.class_names
    identity = {**encoder.identity, "modality": "text"}
    return Codes(
        encoder.text_codes(vectors),
        encoder.bits,
        ids,
        labels=labels,
        class_names=class_names,
        model=identity,
        images=spec,
    )


def decode_size(encoder: Encoder, source, image_size: Optional[int] = None) -> Optional[int]:
    """The size `encode_images` decodes `source` at: `image_size`, else the run's; feature vectors
    (a source without channels) are never resized."""
    if getattr(source, "channels", 1) is None:
        return None
    return image_size or encoder.image_size


def check_decode_memory(size: Optional[int], count: int, channels: int) -> None:
    """Refuse an image size whose decoded chunk (uint8, and once more as the network's float
    batch, counted as 4 more bytes a pixel) would not fit in the memory available now."""
    if not size:
        return
    need = int(count) * int(size) ** 2 * int(channels) * 5
    budget = memory_budget()
    if need > budget:
        raise DmuhError(
            f"image size {size}: decoding {count:,} images at {size}x{size} takes about {need / 2**30:.1f} GiB, "
            f"more than the {budget / 2**30:.1f} GiB available; give a smaller --image-size"
        )


def encode_images(
    encoder: Encoder,
    source,
    uncertainty: bool = False,
    image_size: Optional[int] = None,
    images_spec: Optional[str] = None,
    progress=None,
    features: bool = False,
    items: Optional[np.ndarray] = None,
) -> Codes:
    """Encode every item of `source` (from `dmuh.data.open_images` or dmuh.data), or the items at
    the indices `items` (a shard of it), into a `Codes`; `features` also stores each item's own
    representation (`Encoder.features`)."""
    size = decode_size(encoder, source, image_size)
    items = np.arange(len(source.ids)) if items is None else np.asarray(items, dtype=np.int64)
    check_decode_memory(size, min(ENCODE_CHUNK, len(items)), encoder.channels or 3)
    packed, bit_uncertainty, representation = [], [], []
    for start in range(0, len(items), ENCODE_CHUNK):
        indices = items[start : start + ENCODE_CHUNK]
        batch = source.decode(indices, size=size)
        p, u = encode_arrays(encoder, batch, uncertainty)
        packed.append(p)
        if u is not None:
            bit_uncertainty.append(u)
        if features:
            representation.append(encoder.features(images_to_tensor(match_channels(batch, encoder.channels))))
        if progress is not None:
            progress(start + len(indices), len(items))
    u = np.concatenate(bit_uncertainty) if uncertainty else None
    labels = getattr(source, "labels", None)
    if labels is not None and np.asarray(labels).shape[1:] == (0,):  # an unlabeled source
        labels = None
    return Codes(
        np.concatenate(packed),
        encoder.bits,
        [source.ids[i] for i in items],
        labels=None if labels is None else np.asarray(labels)[items],
        class_names=getattr(source, "class_names", None) if labels is not None else None,
        model=encoder.identity,
        image_size=size,
        channels=encoder.channels,
        images=images_spec,
        uncertainty=None if u is None else u.mean(axis=1),
        bit_uncertainty=u,
        features=np.concatenate(representation) if features else None,
    )
