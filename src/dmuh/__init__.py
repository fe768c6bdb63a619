"""dmuh: Deep Momentum Uncertainty Hashing and the baselines it is measured against.

The public Python API. `import dmuh` is light (it loads no torch): each name below is imported from
its layer on first use, so `dmuh --help` and a script that only reads codes start fast.

    import dmuh
    config = dmuh.TrainConfig(data="digits", protocol="digits", method="dmuh", bits=16, epochs=5, out="runs/d")
    dmuh.train(config)
    encoder = dmuh.load_encoder("runs/d")
    result = dmuh.evaluate_run("runs/d")
"""

from __future__ import annotations

import importlib

from dmuh.utils.version import __version__

# Public name -> the module that defines it (the layers: README "Package map").
_API = {
    # errors
    "DmuhError": "dmuh.errors",
    "ConfigError": "dmuh.errors",
    "DataError": "dmuh.errors",
    "RunError": "dmuh.errors",
    "SearchError": "dmuh.errors",
    # codes and metrics
    "sign": "dmuh.codes.binary",
    "pack_bits": "dmuh.codes.binary",
    "unpack_bits": "dmuh.codes.binary",
    "hamming_distance": "dmuh.codes.binary",
    "mean_average_precision": "dmuh.metrics.ranking",
    "precision_at_k": "dmuh.metrics.ranking",
    # data, networks, methods
    "open_source": "dmuh.data",
    "make_split": "dmuh.data",
    "available_protocols": "dmuh.data",
    "create_model": "dmuh.models",
    "available_models": "dmuh.models",
    "create_method": "dmuh.methods",
    "available_methods": "dmuh.methods",
    "HashingMethod": "dmuh.methods",
    # runs and training
    "TrainConfig": "dmuh.runs.config",
    "PretrainConfig": "dmuh.runs.config",
    "train": "dmuh.engine.trainer",
    "pretrain": "dmuh.engine.pretrain",
    "load_run": "dmuh.engine.builder",
    # retrieval
    "load_encoder": "dmuh.retrieval.encoder",
    "encode_images": "dmuh.retrieval.encoder",
    "build_index": "dmuh.retrieval.index",
    "open_index": "dmuh.retrieval.index",
    "SearchParams": "dmuh.retrieval.index",
    "SearchService": "dmuh.retrieval.service",
    # studies
    "evaluate_run": "dmuh.studies.evaluate",
    "compare": "dmuh.studies.compare",
}
_ALIASES = {"available_methods": "available"}  # public name -> the defining module's name

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'dmuh' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _ALIASES.get(name, name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
