"""Hashing networks: registered backbones + a linear hash layer, created by name.

model = create_model("cnnf", bits=32, pretrained=None)
z = model(x)            # (N, bits) raw hash-layer outputs
f = model.features(x)   # (N, model.feature_dim) backbone features
"""

from dmuh.models import backbones as _backbones  # noqa: F401  (registers the built-in models)
from dmuh.models import external as _external  # noqa: F401  (registers the timm: and tv: families)
from dmuh.models.network import HashNetwork
from dmuh.models.pretrained import load_pretrained_backbone, read_state_dict
from dmuh.models.registry import available_models, create_model, register_model

__all__ = [
    "HashNetwork",
    "available_models",
    "create_model",
    "load_pretrained_backbone",
    "read_state_dict",
    "register_model",
]
