"""A decoder from binary codes back to a real-valued representation (rank-preserving hashing).

Karaman et al.'s rank-preserving hashing trains, beside the hash function, a decoder that
reconstructs the original (unit-normalised) features from the binary codes. At search time the
candidates found over the codes alone are re-ranked by the cosine of the query's own features to
the decoded features of the candidates: the database's original features are never stored or
read (`dmuh.retrieval.index.faiss.Index.search_decoded`). The index file keeps the decoder as a safetensors
blob and its sizes, so nothing in it runs code.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmuh.errors import DmuhError, first_line


class FeatureDecoder(nn.Module):
    """codes {-1, +1} (n, bits) -> features (n, dim): Linear, ReLU, Linear."""

    def __init__(self, bits: int, dim: int, hidden: int = 1024):
        super().__init__()
        for name, value in (("bits", bits), ("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DmuhError(f"decoder: {name}={value!r} must be a positive integer")
        self.bits, self.dim, self.hidden = bits, dim, hidden
        self.layers = nn.Sequential(nn.Linear(bits, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    @property
    def config(self) -> Dict[str, int]:
        return {"bits": self.bits, "dim": self.dim, "hidden": self.hidden}

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.layers(codes)

    @torch.no_grad()
    def decode_packed(self, packed: np.ndarray) -> np.ndarray:
        """Unit-normalised decoded features (n, dim) float32 of packed codes (`dmuh.codes.binary.pack_bits`)."""
        bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=self.bits).astype(np.float32) * 2 - 1
        was_training = self.training
        self.eval()
        try:
            return F.normalize(self(torch.from_numpy(bits)), dim=1).numpy()
        finally:
            self.train(was_training)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()})

    @classmethod
    def from_bytes(cls, config: Dict[str, Any], data: bytes, where: str) -> "FeatureDecoder":
        """Rebuild a decoder from its `config` and `to_bytes` state; DmuhError naming `where`."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not isinstance(config, dict) or set(config) != {"bits", "dim", "hidden"}:
            raise DmuhError(f"{where}: unreadable decoder description {config!r}")
        try:
            state = load(bytes(data))
        except (SafetensorError, RuntimeError, ValueError) as error:
            raise DmuhError(f"{where}: corrupted decoder ({first_line(error)})") from None
        bits, dim, hidden = (config[key] for key in ("bits", "dim", "hidden"))
        # The sizes are checked against the stored tensors before anything is built from them.
        expected = {
            "layers.0.weight": (hidden, bits),
            "layers.0.bias": (hidden,),
            "layers.2.weight": (dim, hidden),
            "layers.2.bias": (dim,),
        }
        shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
        if shapes != expected or not all(tensor.dtype == torch.float32 for tensor in state.values()):
            raise DmuhError(f"{where}: corrupted decoder (its tensors {shapes} do not match its description {config})")
        decoder = cls(**config)
        decoder.load_state_dict(state)
        return decoder.eval()
