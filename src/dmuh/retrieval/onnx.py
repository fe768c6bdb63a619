"""Export a trained run's hashing network as ONNX (`dmuh export-onnx`).

The graph takes what `dmuh encode` feeds the network: images as float32 (N, C, H, W) pixel values
0..255 at the run's decode size (H = W = `image_size` in the model's metadata), or (N, D) feature
vectors for feature models. It applies the run's input pipeline (resize to the network's input
size, normalisation), the network and the method's continuous map, and returns

    codes   float32 (N, bits)  continuous codes h (before sign)
    binary  int8    (N, bits)  sign codes, +1 / -1 (sign(0) = +1, as dmuh.codes.binary.sign)

The batch dimension is dynamic. The run's identity (checkpoint sha256, method, model, bits),
channels and image size are stored in the model's metadata_props.

It uses the TorchScript-based exporter (`dynamo=False`): the torch.export-based one needs
onnxscript, which dmuh does not require.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from dmuh.codes.binary import sign
from dmuh.errors import ConfigError, DmuhError
from dmuh.retrieval.encoder import load_encoder
from dmuh.runs.config import IMAGE_SIZES
from dmuh.utils.io import atomic_path, refuse_overwrite

DEFAULT_OPSET = 17


def _graph_module(encoder):
    class HashingGraph(torch.nn.Module):
        """pixels (or features) -> (continuous codes, int8 sign codes), for export."""

        def __init__(self):
            super().__init__()
            self.model = encoder.model
            self.method = encoder.method
            # A run on `dmuh features` vectors: the graph takes images and runs their backbone first.
            backbone = encoder.image_backbone() if encoder.backbone_record is not None else None
            self.backbone = None if backbone is None else backbone.network
            self.backbone_pipeline = None if backbone is None else backbone.pipeline

        def forward(self, inputs):
            if self.backbone is not None:
                inputs = self.backbone.features(self.backbone_pipeline(inputs))
            codes = self.method.continuous_codes(self.model(encoder.pipeline(inputs)).float())
            return codes, sign(codes).to(torch.int8)

    return HashingGraph().eval()


def _opset_range():
    """The opsets this torch's TorchScript exporter writes (7 to 20 when torch does not say)."""
    try:
        from torch.onnx import _constants

        return _constants.ONNX_MIN_OPSET, getattr(
            _constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET
        )
    except (ImportError, AttributeError):
        return 7, 20


def export_onnx(
    run, out, opset: int = DEFAULT_OPSET, image_size: Optional[int] = None, overwrite: bool = False
) -> dict:
    """Write `out` (.onnx) for the run; returns the metadata stored in it."""
    out = Path(out)
    refuse_overwrite(out, overwrite)
    low, high = _opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ConfigError(
            f"opset: expected an integer >= {low} and <= {high} (what this torch exports), got {opset!r}", field="opset"
        )
    if image_size is not None and not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]:
        raise ConfigError(
            f"image_size: expected an integer >= {IMAGE_SIZES[0]} and <= {IMAGE_SIZES[1]}, got {image_size}",
            field="image_size",
        )
    try:
        import onnx
    except ImportError:
        raise DmuhError("export-onnx needs the onnx package: pip install onnx (or pip install 'dmuh[onnx]')") from None
    encoder = load_encoder(run, "cpu")
    size = image_size or encoder.image_size
    if encoder.channels is None:
        example = torch.zeros(2, encoder.model.input_shape[0])
    else:
        if not size:
            raise DmuhError(f"{run}: the run has no fixed image size; pass --image-size")
        example = torch.zeros(2, encoder.channels, size, size)
    graph = _graph_module(encoder)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation; the trace sees the static H, W checks.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. an opset above what the exporter was tested with
        try:
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=int(opset),
                input_names=["inputs"],
                output_names=["codes", "binary"],
                dynamic_axes={"inputs": {0: "batch"}, "codes": {0: "batch"}, "binary": {0: "batch"}},
            )
        except Exception as error:  # an operator the exporter cannot map
            raise DmuhError(f"{run}: ONNX export failed at opset {opset} ({str(error).splitlines()[0]})") from None
    model = onnx.load_from_string(buffer.getvalue())
    meta = {
        "dmuh_model": json.dumps(encoder.identity, sort_keys=True),
        "bits": str(encoder.bits),
        "channels": str(encoder.channels),
        "image_size": str(size if encoder.channels is not None else None),
        "inputs": "float32 (N, C, H, W) pixels 0..255" if encoder.channels is not None else "float32 (N, D) features",
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return meta
