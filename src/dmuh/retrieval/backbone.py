"""The backbone a features file records (`dmuh features`, `dmuh.retrieval.features`): built to make
the features, and rebuilt, checked, for a run trained on them to encode images.

    dmuh features --model timm:vit_small_patch14_dinov2.lvd142m --weights model.safetensors \\
        --data photos/ --out feats.npz
    dmuh train --method itq --data features:feats.npz --model mlp ...      # any shallow or MLP-head method
    dmuh encode --run RUN --images photos/ ...                             # images: the same backbone first

The features file is a .npz (no pickles) with `features` (N, D) float32, `ids` (the ids codes files
use for the same items), `labels` and `class_names` when the data has them, and `backbone`: a JSON
record of the network that made the features (`model_config`, the `create_model` arguments, with
its input size and input transform; the decode size and channels; the weights file, its SHA-256, and
a SHA-256 of the backbone's weights as loaded). `dmuh.data.sources.FeatureSource` reads the record;
a run trained on the file keeps it (`RUN/feature_backbone.json`), and `load_feature_backbone`
rebuilds that network, checked against the record, so the run encodes images too.

A backbone without weights is built with random weights under a fixed seed (`RANDOM_INIT_SEED`);
its rebuild is checked like any other by the weights' SHA-256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from dmuh.data.pipeline import InputPipeline, images_to_tensor
from dmuh.engine.runtime import Execution, build_model, run_network
from dmuh.errors import ConfigError, DmuhError, first_line
from dmuh.models.registry import create_model, missing_weights_hint
from dmuh.runs.config import RunConfig
from dmuh.runs.files import BACKBONE
from dmuh.runs.layout import load_init
from dmuh.utils.io import file_sha256

RANDOM_INIT_SEED = 0
RECORD_KEY = "backbone"  # the features file's key of the backbone record (a JSON string)
RECORD_VERSION = 1


@dataclass
class FeatureBackbone:
    """A backbone that turns images into feature vectors (in eval mode), with what rebuilds it."""

    network: Any  # HashNetwork: its `features` are the vectors (the hash layer is unused)
    pipeline: InputPipeline
    record: Dict[str, Any]

    @property
    def channels(self) -> int:
        return int(self.network.in_channels)

    @property
    def image_size(self) -> int:
        """The size images are decoded at before the input pipeline (as when the features were made)."""
        return int(self.record["image_size"])

    def features(self, images: torch.Tensor, execution: Execution) -> torch.Tensor:
        """(n, C, H, W) uint8 images -> (n, D) float32 features, on the CPU."""
        return run_network(self.network.features, images, self.pipeline, execution, desc="features")

    def to(self, device) -> "FeatureBackbone":
        self.network.to(device)
        return self


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names and bytes of every tensor, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weights_file(weights) -> Optional[Path]:
    """The file `--weights` names: a file, or a `dmuh pretrain` run's backbone.safetensors."""
    if weights is None:
        return None
    path = Path(weights)
    if path.is_dir():
        if not (path / BACKBONE).is_file():
            raise ConfigError(
                f"weights {weights}: no {BACKBONE} in this folder (a `dmuh pretrain` run?)", field="weights"
            )
        return (path / BACKBONE).resolve()
    return path.resolve()


def _load_weights(network, path: Optional[Path], name: str, where: str) -> None:
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(f"{where} {path}: no such file{missing_weights_hint(name)}", field="weights")
    load_init(str(path), network, split=None)  # foreign files by the --pretrained rule, dmuh's checksummed


def build_feature_backbone(
    model: str,
    model_params: Optional[Dict[str, Any]],
    weights,
    sample: np.ndarray,
    image_size: int,
) -> FeatureBackbone:
    """The backbone `model` (options `model_params`) for images like `sample` (one decoded (1, S, S, C)
    uint8 image at the decode size `image_size`), with `weights` (a weights file or a `dmuh pretrain`
    run) or, without, random weights under RANDOM_INIT_SEED. A model that takes any input size is
    built at the decode size, as `dmuh train` builds it."""
    params = dict(model_params or {})
    for key in ("bits", "pretrained", "in_channels", "input_dim"):
        if key in params:
            raise ConfigError(f"model_params {key}: not a backbone option here", field="model_params")
    config = RunConfig(model=model, model_params=params, bits=8, hash_norm="none")
    weights_file = _weights_file(weights)
    if weights_file is not None and not weights_file.is_file():
        raise ConfigError(f"weights {weights}: no such file{missing_weights_hint(model)}", field="weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        network = build_model(config, images_to_tensor(sample))
    _load_weights(network, weights_file, model, "weights")
    network.eval().requires_grad_(False)
    record = {
        "version": RECORD_VERSION,
        "model": model,
        "model_config": dict(network.config),
        "image_size": int(image_size),
        "channels": int(network.in_channels),
        "feature_dim": int(network.feature_dim),
        "weights": None if weights_file is None else str(weights_file),
        "weights_file_sha256": None if weights_file is None else file_sha256(weights_file),
        "random_init_seed": RANDOM_INIT_SEED if weights_file is None else None,
        "weights_sha256": weights_sha256(network.backbone),
    }
    return FeatureBackbone(network, InputPipeline.for_network(network), record)


def load_feature_backbone(record: Dict[str, Any], where: str) -> FeatureBackbone:
    """Rebuild the backbone of a features file's record (`where` names its file in errors): the
    same architecture and input transform, the same weights (the file, or the seeded random ones),
    checked against the recorded SHA-256 of the weights."""
    try:
        model_config = dict(record["model_config"])
        weights = record.get("weights")
        expected = str(record["weights_sha256"])
        image_size = int(record["image_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise DmuhError(f"{where}: unreadable backbone record ({first_line(error)})") from None
    name = str(model_config.get("name", ""))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(record.get("random_init_seed") or RANDOM_INIT_SEED))
        network = create_model(**model_config)
    _load_weights(network, None if weights is None else Path(weights), name, f"{where}: the backbone's weights")
    network.eval().requires_grad_(False)
    if weights_sha256(network.backbone) != expected:
        made = f"from {weights}" if weights else f"at random under seed {record.get('random_init_seed')}"
        raise DmuhError(
            f"{where}: the backbone {name} rebuilt {made} does not have the weights the features were made "
            "with (its SHA-256 differs): the file changed, or another torch built the random weights"
        )
    record = {**record, "image_size": image_size}
    return FeatureBackbone(network, InputPipeline.for_network(network), record)
