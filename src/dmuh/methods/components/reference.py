"""The fixed representation a label-free method preserves, as a component it holds.

Label-free methods learn codes that keep the structure of a reference representation of the
training items: the data's own vectors (`features:` data), or the backbone's features of the
images when training starts (after `--init`, e.g. a `dmuh pretrain --objective simclr` run).
The loop computes it once (`dmuh.engine.builder.reference_features`) and hands it to the method
(`HashingMethod.set_reference_features`), which keeps it here: L2-normalised rows in float16, a
buffer of the method's state, so a resumed run has the same targets although its backbone has
moved since (n = 50,000 items of 512 dimensions take 51 MB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmuh.errors import DmuhError


class ReferenceFeatures(nn.Module):
    """features (n, D) float16, unit rows; (0, 0) until `set` is called."""

    def __init__(self):
        super().__init__()
        self.register_buffer("features", torch.zeros(0, 0, dtype=torch.float16))

    @property
    def ready(self) -> bool:
        return self.features.numel() > 0

    @torch.no_grad()
    def set(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[0] < 2:
            raise DmuhError(f"reference features: expected (n >= 2, D), got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise DmuhError("reference features: NaN or infinite values")
        self.features = F.normalize(features.float(), dim=1).to(torch.float16)

    def of(self, indices: torch.Tensor) -> torch.Tensor:
        """Unit rows of the training items at `indices`, float32."""
        if not self.ready:
            raise DmuhError("reference features: not set (the loop sets them before the first step)")
        return self.features[indices].float()

    def all(self) -> torch.Tensor:
        return self.of(torch.arange(self.features.shape[0], device=self.features.device))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = state_dict.get(prefix + "features")
        if saved is not None:  # its size is the data's, known only from the checkpoint
            self.features = torch.zeros(saved.shape, dtype=torch.float16, device=self.features.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def cosine_pairs(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, B') cosine similarities of the rows of two matrices."""
    return F.normalize(first.float(), dim=1) @ F.normalize(second.float(), dim=1).t()


PAIRINGS = ("halves", "all")


def similarity_mse(codes: torch.Tensor, reference: torch.Tensor, pairs: str) -> torch.Tensor:
    """Mean squared difference of the codes' and the reference's cosine similarities over the
    batch pairs `pairs` ("halves": i with i + B/2; "all": every i != j)."""
    count = codes.shape[0]
    if count < 2:
        raise DmuhError(f"similarity of codes: a batch of {count} item has no pair (use --batch-size >= 2)")
    if pairs == "halves":
        half = count // 2
        first, second = slice(0, half), slice(half, 2 * half)
        code_cos = F.cosine_similarity(codes[first], codes[second], dim=1)
        reference_cos = F.cosine_similarity(reference[first], reference[second], dim=1)
        return F.mse_loss(code_cos, reference_cos)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=codes.device)
    difference = cosine_pairs(codes, codes) - cosine_pairs(reference, reference)
    return difference[off_diagonal].pow(2).mean()


_KNN_CHUNK = 1024  # query rows per similarity block: bounds the (chunk, n) temporary


@torch.no_grad()
def cosine_knn(features: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) int64 indices of each row's k nearest other rows by cosine similarity."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    n = unit.shape[0]
    rows = []
    for start in range(0, n, _KNN_CHUNK):
        similarity = unit[start : start + _KNN_CHUNK] @ unit.t()
        own = torch.arange(start, min(start + _KNN_CHUNK, n), device=unit.device)
        similarity[torch.arange(len(own), device=unit.device), own] = -float("inf")  # not one's own neighbour
        rows.append(similarity.topk(k, dim=1).indices)
    return torch.cat(rows)


def sample_pair_distances(features: torch.Tensor, max_pairs: int, seed: int, chunk: int = 16384) -> torch.Tensor:
    """Cosine distances 1 - f_i . f_j of pairs i != j of unit rows: every pair i < j when there are
    at most `max_pairs`, else `max_pairs` pairs drawn uniformly with a seeded generator. float64, CPU."""
    n = features.shape[0]
    if n * (n - 1) // 2 <= max_pairs:
        first, second = torch.triu_indices(n, n, 1)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        first = torch.randint(0, n, (max_pairs,), generator=generator)
        second = (first + torch.randint(1, n, (max_pairs,), generator=generator)) % n  # never first itself
    distances = []
    for start in range(0, first.numel(), chunk):
        a = features[first[start : start + chunk].to(features.device)].float()
        b = features[second[start : start + chunk].to(features.device)].float()
        distances.append((1.0 - (a * b).sum(dim=1)).double().cpu())
    return torch.cat(distances)
