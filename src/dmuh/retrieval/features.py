"""Frozen features of a backbone: `dmuh features`.

    dmuh features --model timm:vit_small_patch14_dinov2.lvd142m --weights model.safetensors \\
        --data photos/ --out feats.npz
    dmuh train --method itq --data features:feats.npz --model mlp ...      # any shallow or MLP-head method
    dmuh encode --run RUN --images photos/ ...                             # images: the same backbone first

The features file is a .npz (no pickles): `features` (N, D) float32, `ids` (the ids codes files use
for the same items), `labels` and `class_names` when the data has them, `subsets` (train/test) when
it has them, and `backbone`, the JSON
record of the network that made them (`dmuh.retrieval.backbone`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

from dmuh.data.images import match_channels
from dmuh.data.pipeline import images_to_tensor
from dmuh.engine.runtime import Execution
from dmuh.errors import DataError
from dmuh.retrieval.backbone import RECORD_KEY, build_feature_backbone
from dmuh.retrieval.encoder import ENCODE_CHUNK, check_decode_memory
from dmuh.utils.io import atomic_path, refuse_overwrite


def decode_side(source, image_size: Optional[int]) -> int:
    """The decode size: `image_size`, else the side of the data's first (square) image."""
    if getattr(source, "channels", 1) is None or getattr(source, "features", None) is not None:
        raise DataError("data: holds feature vectors already; `dmuh features` reads images", field="data")
    if len(source.ids) == 0:
        raise DataError("data: holds no image", field="data")
    if image_size:
        return int(image_size)
    first = source.decode(np.array([0]))
    height, width = first.shape[1:3]
    if height != width:
        raise DataError(f"data: images of {width}x{height} px are not square; give --image-size N", field="data")
    return int(height)


def extract_features(
    source,
    backbone_spec: Dict[str, Any],
    execution: Execution,
    image_size: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Dict[str, Any]:
    """Every item of the image `source` through the backbone of `backbone_spec` (model,
    model_params, weights), in chunks; the arrays of a features file."""
    size = decode_side(source, image_size)
    channels = int(getattr(source, "channels", None) or 3)
    check_decode_memory(size, min(ENCODE_CHUNK, len(source.ids)), channels)
    sample = source.decode(np.array([0]), size=size)
    backbone = build_feature_backbone(
        backbone_spec["model"], backbone_spec.get("model_params"), backbone_spec.get("weights"), sample, size
    ).to(execution.device)
    chunks = []
    total = len(source.ids)
    for start in range(0, total, ENCODE_CHUNK):
        indices = np.arange(start, min(start + ENCODE_CHUNK, total))
        images = match_channels(source.decode(indices, size=size), backbone.channels)
        chunks.append(backbone.features(images_to_tensor(images), execution).numpy())
        if progress is not None:
            progress(int(indices[-1]) + 1, total)
    arrays: Dict[str, Any] = {
        "features": np.concatenate(chunks).astype(np.float32),
        "ids": np.asarray([str(i) for i in source.ids]),
        RECORD_KEY: np.asarray(json.dumps(backbone.record, sort_keys=True)),
    }
    subsets = getattr(source, "subsets", None)
    if subsets is not None:  # train/test of a data set: the protocols that split by them still can
        arrays["subsets"] = np.asarray(subsets, dtype=str)
    labels = getattr(source, "labels", None)
    if labels is not None and np.asarray(labels).ndim == 2 and np.asarray(labels).shape[1] > 0:
        arrays["labels"] = np.asarray(labels)
        names = getattr(source, "class_names", None)
        if names:
            arrays["class_names"] = np.asarray([str(n) for n in names])
    return arrays


def save_features(path, arrays: Dict[str, Any], overwrite: bool = False) -> None:
    """Write a features file: temporary name, then one rename; an existing file only with overwrite."""
    path = Path(path)
    refuse_overwrite(path, overwrite)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez(f, **arrays)
