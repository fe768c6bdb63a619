"""UGACH (Zhang, Peng, Yuan, AAAI 2018): Unsupervised Generative Adversarial Cross-modal Hashing.

A label-free cross-modal method: a generator picks, for a query of one modality, informative
items of the other modality to challenge a discriminator; the discriminator (the hashing networks
that are retrieved) learns to rank a true neighbour from the correlation graph above the
generator's pick. Read from the authors' TensorFlow 1 code (PKU-ICST-MIPL/UGACH_AAAI2018:
`KNN/knn_*_cross5.py`, `UGACH-*/{gen,dis}_model_nn.py`, `UGACH-*/train_16.py`, `utils.py`);
[code] marks what is theirs, [reading] what is ours.

Correlation graph. [code] Per modality the K/2 = `neighbours` nearest training items by Euclidean
distance, the item itself first (its distance 0 makes it rank first in their argsort); an item's
row is its image neighbours then its text neighbours (`KNN_cross5`, K = 10), and the positives of
a query, of either direction, are the other modality's items at the row's (distinct) entries, so
the query's own pair is always one. [reading] The image side is the reference features as every
label-free method here keeps them (unit rows, `ReferenceFeatures`), where Euclidean and cosine
neighbours agree; the text side is the raw text vectors, Euclidean as theirs (`text_metric`
"cosine" ranks them by angle). The table (num_train, 2 * neighbours) int64 is a persistent buffer:
a resumed run keeps it. It is built once both the reference features and the training text are
there (the loop hands them over in that order, the text on every start: it is data, held as a
non-persistent buffer).

Generator. [code] Its own two-layer networks, one per modality, over the features (x -> tanh ->
linear -> sigmoid, `generator_hidden` wide; theirs are 8192 wide, here 1024 by default to keep
its scoring of the pool cheap), and the score of a candidate c for a query q is
-||g(q) - g(c)||^2. Candidates: [code] a random 1 / `sample_ratio` of the training items (theirs
50, drawn per query); [reading] drawn once per step and shared by the batch's queries, without
replacement. Selection: [code] `selections` (2) draws from softmax(score) over the pool, redrawn
while a draw is a positive (which is exactly a draw from the softmax renormalised over the pool's
non-positives; that is how it is done here). Policy gradient: [code] loss -mean(log p * reward)
with the discriminator's reward sigmoid(max(0, margin + d(q, pos) - d(q, neg))), detached;
[reading] log p under the distribution that drew the item (the pool's masked softmax: their code
normalises over the drawn items only, an artefact of feeding only those) and the same draws serve
the discriminator (theirs draws again for the generator's update, without the positive filter).

Discriminator. [code] The image and text hashing networks with sigmoid outputs, d the sum of
squared differences of the sigmoid codes, and the triplet hinge max(0, margin + d(q, pos) -
d(q, neg)) with margin bits / 8, for image queries against text items and text queries against
image items, both summed. Here the loop's network is the image network and `self.text_network`
(`CrossModalMethod`) the text one; the continuous codes are tanh(z / 2) = 2 sigmoid(z) - 1, whose
sign is their sigmoid(z) >= 0.5 bit, and d = ||c_a - c_b||^2 / 4 is their distance exactly.
Their weight decay (0.01) is left to the optimiser.

Items outside the batch. Text items' codes are computed fresh by the text network over the stored
training text (an MLP: cheap), so the positive and negative text items send gradients into it as
in the authors' code. Image items' codes come from a `TrainingMemory` of the latest image codes
(detached), written from the batch at every step: the image network is the loop's and sees only
the batch. So text queries rank only images seen so far (their positives include their own
image, which is in the batch; the pool of image candidates is drawn from the seen items).
Queries are always the batch's own, with fresh codes.

Schedule. The loop minimises the sum of the terms with one optimiser, so `forward` returns
{"discriminator": ..., "generator": ...}: the generator term sees the discriminator only through
the detached reward, the discriminator term sees the generator's picks only as indices.
`schedule="simultaneous"` (default) updates both at every step, where the authors alternate
whole epochs (1 discriminator epoch, then 2 generator epochs, 30 times); `schedule="alternate"`
does theirs by epoch (`discriminator_epochs`, `generator_epochs`: the inactive term is 0). They
also pre-train the discriminator against uniform random non-neighbours (their
`unsuper-pretrain-*-D-beta`): `warmup_epochs` such epochs come first (no generator term). Their
generator's learning rate is 10x the discriminator's under SGD: `generator_weight` scales its
term (under Adam it changes little, since no other term reaches the generator's weights).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmuh.errors import DmuhError
from dmuh.methods.base import Requirements, StepInputs, register_method
from dmuh.methods.components.crossmodal import CrossModalMethod, check_hidden
from dmuh.methods.components.memory import TrainingMemory
from dmuh.methods.components.params import Param
from dmuh.methods.components.reference import ReferenceFeatures, cosine_knn
from dmuh.utils.schema import Rule

TEXT_METRICS = ("euclidean", "cosine")
SCHEDULES = ("simultaneous", "alternate")
PHASES = ("both", "discriminator", "generator", "warmup")
_KNN_CHUNK = 1024  # query rows per distance block: bounds the (chunk, n) temporary


# -- the correlation graph ----------------------------------------------------------------------


@torch.no_grad()
def euclidean_knn(features: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) int64 indices of each row's k nearest other rows by Euclidean distance."""
    points = features.float()
    n = points.shape[0]
    squares = points.pow(2).sum(dim=1)
    rows = []
    for start in range(0, n, _KNN_CHUNK):
        block = points[start : start + _KNN_CHUNK]
        distance = squares[start : start + _KNN_CHUNK, None] + squares[None, :] - 2.0 * block @ points.t()
        own = torch.arange(start, start + block.shape[0], device=points.device)
        distance[torch.arange(block.shape[0], device=points.device), own] = float("inf")  # not one's own neighbour
        rows.append(distance.topk(k, dim=1, largest=False).indices)
    return torch.cat(rows)


@torch.no_grad()
def modality_neighbours(features: torch.Tensor, count: int, metric: str = "euclidean") -> torch.Tensor:
    """(n, count) int64: each item itself, then its count - 1 nearest other items."""
    n = features.shape[0]
    own = torch.arange(n, device=features.device)[:, None]
    if count == 1:
        return own
    nearest = cosine_knn(features, count - 1) if metric == "cosine" else euclidean_knn(features, count - 1)
    return torch.cat([own, nearest], dim=1)


@torch.no_grad()
def correlation_graph(
    image_features: torch.Tensor, text_features: torch.Tensor, neighbours: int, text_metric: str = "euclidean"
) -> torch.Tensor:
    """UGACH's KNN_cross table (n, 2 * neighbours): each item's `neighbours` nearest items (itself
    first) by the image features, then by the text features. The image features are compared by
    cosine (on unit rows the same ranking as Euclidean)."""
    image = modality_neighbours(image_features, neighbours, "cosine")
    text = modality_neighbours(text_features.to(image_features.device), neighbours, text_metric)
    return torch.cat([image, text], dim=1)


def distinct_entries(rows: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: True at the first occurrence of each value of its row."""
    k = rows.shape[1]
    equal = rows[:, :, None] == rows[:, None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=rows.device).tril(-1)  # [k, j]: j < k
    return ~(equal & earlier).any(dim=2)


# -- the two losses -----------------------------------------------------------------------------


def code_distances(query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, S) distances of query codes (B, bits) to item codes (B, S, bits), both tanh(z / 2):
    ||c_q - c_x||^2 / 4, the authors' sum of squared differences of sigmoid(z)."""
    return (query[:, None, :] - items).pow(2).sum(dim=-1) / 4.0


def triplet_hinge(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """(B, S) max(0, margin + d(q, pos) - d(q, neg)), the discriminator's loss per triplet."""
    return F.relu(margin + code_distances(query, positives) - code_distances(query, negatives))


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of (B, S) values over the rows with weight 1 (0 when there is none)."""
    weights = weights.to(values.dtype)[:, None].expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def policy_gradient_loss(
    logits: torch.Tensor, choice: torch.Tensor, reward: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """REINFORCE: -mean(log softmax(logits)[choice] * reward) over the rows with weight 1.

    logits (B, P) over the candidate pool (-inf where a candidate may not be drawn), choice (B, S)
    the drawn candidates, reward (B, S) (detached here), weights (B,) 0/1."""
    log_p = F.log_softmax(logits, dim=1).gather(1, choice)
    return -masked_mean(log_p * reward.detach(), weights)


class Selection(NamedTuple):
    """One direction's draws for the batch: items are indices of the other modality."""

    positives: torch.Tensor  # (B, S) from the graph
    negatives: torch.Tensor  # (B, S) the generator's picks
    logits: torch.Tensor  # (B, P) the generator's masked scores of the pool (rows with no candidate: 0)
    choice: torch.Tensor  # (B, S) positions of the negatives in the pool
    valid: torch.Tensor  # (B,) the query had a candidate that is not a positive


class GeneratorNetwork(nn.Module):
    """The authors' generator branch: linear -> tanh (per hidden layer) -> linear -> sigmoid."""

    def __init__(self, input_dim: int, hidden: Sequence[int], bits: int):
        super().__init__()
        layers, width = [], input_dim
        for hidden_width in hidden:
            layers += [nn.Linear(width, hidden_width), nn.Tanh()]
            width = hidden_width
        layers.append(nn.Linear(width, bits))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(x.float()).float())


def generator_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, P) -||g(q) - g(c)||^2 of sigmoid codes."""
    return -(queries[:, None, :] - candidates[None, :, :]).pow(2).sum(dim=-1)


@register_method("ugach", display_name="UGACH")
class UGACH(CrossModalMethod):
    """Generator picks hard cross-modal negatives; the hashing networks learn a triplet hinge against them."""

    requires = Requirements(text=True, labels=False, reference_features=True)

    hyper_parameters = {
        "reference_dim": Param(int, Rule(minimum=1), "the reference features' length (set by the loop from the data)"),
        "neighbours": Param(int, Rule(minimum=1), "nearest neighbours in the reference per item"),
        "margin": Param(float, Rule(minimum=0.0), "the margin (none: bits / 8)", optional=True),
        "selections": Param(int, Rule(minimum=1)),
        "sample_ratio": Param(int, Rule(minimum=1)),
        "text_metric": Param(str, Rule(choices=TEXT_METRICS), "distance of the text reference"),
        "schedule": Param(str, Rule(choices=SCHEDULES), "order of the discriminator and generator epochs"),
        "discriminator_epochs": Param(int, Rule(minimum=1)),
        "generator_epochs": Param(int, Rule(minimum=1)),
        "warmup_epochs": Param(int, Rule(minimum=0), "epochs before the generator trains"),
        "generator_weight": Param(float, Rule(minimum=0.0), "weight of the generator's loss"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        text_dim: int = 1,
        reference_dim: int = 1,
        neighbours: int = 5,
        margin: Optional[float] = None,
        selections: int = 2,
        sample_ratio: int = 50,
        generator_hidden: Sequence[int] = (1024,),
        text_metric: str = "euclidean",
        schedule: str = "simultaneous",
        discriminator_epochs: int = 1,
        generator_epochs: int = 2,
        warmup_epochs: int = 0,
        generator_weight: float = 1.0,
        text_hidden: Sequence[int] = (8192,),
        text_dropout: float = 0.0,
    ):
        super().__init__(bits, num_train, num_classes, text_dim, text_hidden, text_dropout)
        self.reference_dim = reference_dim
        self.neighbours = neighbours
        self.margin = self.bits / 8.0 if margin is None else margin
        self.selections = selections
        self.sample_ratio = sample_ratio
        hidden = check_hidden("generator_hidden", generator_hidden)
        self.text_metric = text_metric
        self.schedule = schedule
        self.discriminator_epochs = discriminator_epochs
        self.generator_epochs = generator_epochs
        self.warmup_epochs = warmup_epochs
        self.generator_weight = generator_weight

        self.generator_image = GeneratorNetwork(self.reference_dim, hidden, self.bits)
        self.generator_text = GeneratorNetwork(self.text_dim, hidden, self.bits)
        self.reference = ReferenceFeatures()
        self.image_memory = TrainingMemory(self.num_train, self.num_classes, self.bits)
        self.register_buffer("knn", torch.zeros(0, 2 * self.neighbours, dtype=torch.int64))
        self.register_buffer("train_text", torch.zeros(0, self.text_dim), persistent=False)
        self.phase = self.phase_of(1)
        self.last_selection: Dict[str, Selection] = {}  # the latest step's draws (diagnostics)

    # -- data hand-over ---------------------------------------------------------------------------

    @property
    def pool_size(self) -> int:
        """Candidates per step: the authors' 1 / sample_ratio of the training items (at least 1)."""
        return max(1, -(-self.num_train // self.sample_ratio))

    def set_reference_features(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[0] != self.num_train:
            raise DmuhError(
                f"method 'ugach': reference features of shape {tuple(features.shape)}, "
                f"built for {self.num_train} training items"
            )
        if features.shape[1] != self.reference_dim:
            raise DmuhError(
                f"method parameter reference_dim={self.reference_dim}: the reference features have "
                f"{features.shape[1]} columns"
            )
        if self.neighbours > self.num_train:
            raise DmuhError(
                f"method parameter neighbours={self.neighbours}: more than the {self.num_train} training items"
            )
        self.reference.set(features)
        self.knn = torch.zeros(0, 2 * self.neighbours, dtype=torch.int64, device=self.knn.device)  # a new graph
        self.build_graph()

    def set_train_text(self, text: torch.Tensor) -> None:
        if tuple(text.shape) != (self.num_train, self.text_dim):
            raise DmuhError(
                f"method 'ugach': training text of shape {tuple(text.shape)}, built for "
                f"{(self.num_train, self.text_dim)}"
            )
        if not torch.isfinite(text).all():
            raise DmuhError("method 'ugach': training text has NaN or infinite values")
        self.train_text = text.float().to(self.knn.device)  # no copy when it is float32 on this device
        if self.knn.shape[0] == 0:  # a resumed run has its graph from the checkpoint
            self.build_graph()

    def build_graph(self) -> None:
        if self.reference.ready and self.train_text.shape[0] == self.num_train:
            graph = correlation_graph(self.reference.all(), self.train_text, self.neighbours, self.text_metric)
            self.knn = graph.to(self.knn.device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = state_dict.get(prefix + "knn")
        if saved is not None:  # the table's length is the training split's
            self.knn = torch.zeros(saved.shape, dtype=torch.int64, device=self.knn.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- schedule ---------------------------------------------------------------------------------

    def phase_of(self, epoch: int) -> str:
        """Which terms train in an epoch (1-based): "warmup" (discriminator against uniform random
        negatives), "both", or, alternating, "discriminator" or "generator"."""
        if epoch <= self.warmup_epochs:
            return "warmup"
        if self.schedule == "simultaneous":
            return "both"
        cycle = self.discriminator_epochs + self.generator_epochs
        return "discriminator" if (epoch - self.warmup_epochs - 1) % cycle < self.discriminator_epochs else "generator"

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.phase = self.phase_of(epoch)

    # -- codes ------------------------------------------------------------------------------------

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs / 2.0)  # 2 sigmoid(z) - 1: sign is the authors' sigmoid(z) >= 0.5 bit

    # -- one step ---------------------------------------------------------------------------------

    def select(
        self,
        query_codes: Optional[torch.Tensor],
        pool_codes: Optional[torch.Tensor],
        pool: torch.Tensor,
        rows: torch.Tensor,
        allowed: Optional[torch.Tensor] = None,
    ) -> Selection:
        """Positives from the graph rows (B, K) (their distinct entries, among `allowed` items when
        given) and negatives drawn from the pool by the generator's softmax, positives left out;
        codes None: uniform over the pool (warm-up)."""
        batch = rows.shape[0]
        candidates = distinct_entries(rows)
        if allowed is not None:
            candidates &= allowed[rows]
        positives = rows.gather(1, torch.multinomial(candidates.float(), self.selections, replacement=True))
        is_positive = (rows[:, :, None] == pool[None, None, :]).any(dim=1)  # (B, P)
        valid = ~is_positive.all(dim=1)
        if query_codes is None:
            scores = torch.zeros(batch, pool.numel(), device=rows.device)
        else:
            scores = generator_scores(query_codes, pool_codes)
        logits = scores.masked_fill(is_positive, float("-inf"))
        logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))  # no NaN in rows without a candidate
        choice = torch.multinomial(F.softmax(logits.detach(), dim=1), self.selections, replacement=True)
        return Selection(positives, pool[choice], logits, choice, valid)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if step.text is None:
            raise ValueError("UGACH needs the batch's text vectors (StepInputs.text)")
        if self.knn.shape[0] != self.num_train or self.train_text.shape[0] != self.num_train:
            raise DmuhError(
                "method 'ugach': the correlation graph is not built (the loop hands over the reference "
                "features and the training text before the first step)"
            )
        device = self.knn.device
        indices = step.indices.to(device)
        batch, count = indices.numel(), self.selections
        image_codes = self.continuous_codes(step.outputs.float())
        with torch.no_grad():
            shared_indices, shared_outputs, _ = step.shared()
            self.image_memory.write(shared_indices.to(device), self.continuous_codes(shared_outputs.float()))
        rows = self.knn[indices]

        # The generator's picks: text items for image queries, seen image items for text queries.
        text_pool = torch.randperm(self.num_train, device=device)[: self.pool_size]
        seen = self.image_memory.seen.nonzero().squeeze(1)
        image_pool = seen[torch.randperm(seen.numel(), device=device)[: self.pool_size]]
        uniform = self.phase == "warmup"
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.phase in ("both", "generator")):
            if uniform:
                i2t = self.select(None, None, text_pool, rows)
                t2i = self.select(None, None, image_pool, rows, allowed=self.image_memory.seen)
            else:
                i2t = self.select(
                    self.generator_image(self.reference.of(indices)),
                    self.generator_text(self.train_text[text_pool]),
                    text_pool,
                    rows,
                )
                t2i = self.select(
                    self.generator_text(step.text.float()),
                    self.generator_image(self.reference.of(image_pool)),
                    image_pool,
                    rows,
                    allowed=self.image_memory.seen,
                )
        self.last_selection = {"i2t": i2t, "t2i": t2i}

        # The discriminator: the batch's fresh codes as queries; text items fresh, image items from the memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.phase != "generator"):
            items = torch.cat([i2t.positives.reshape(-1), i2t.negatives.reshape(-1)])
            text_inputs = torch.cat([step.text.float(), self.train_text[items]])
            text_codes = self.encode_text(text_inputs)
            query_text = text_codes[:batch]
            positive_text, negative_text = text_codes[batch:].view(2, batch, count, self.bits)
            hinge_i2t = triplet_hinge(image_codes, positive_text, negative_text, self.margin)
            memory = self.image_memory.codes
            hinge_t2i = triplet_hinge(query_text, memory[t2i.positives], memory[t2i.negatives], self.margin)

        zero = image_codes.new_zeros(())
        discriminator = masked_mean(hinge_i2t, i2t.valid) + masked_mean(hinge_t2i, t2i.valid)
        reward_i2t, reward_t2i = torch.sigmoid(hinge_i2t.detach()), torch.sigmoid(hinge_t2i.detach())
        generator = zero
        if self.phase in ("both", "generator"):
            generator = self.generator_weight * (
                policy_gradient_loss(i2t.logits, i2t.choice, reward_i2t, i2t.valid)
                + policy_gradient_loss(t2i.logits, t2i.choice, reward_t2i, t2i.valid)
            )
        if self.phase == "generator":
            discriminator = zero
        self.step_stats = {
            "reward": 0.5 * (masked_mean(reward_i2t, i2t.valid) + masked_mean(reward_t2i, t2i.valid)),
            "violated": 0.5
            * (
                masked_mean((hinge_i2t.detach() > 0).float(), i2t.valid)
                + masked_mean((hinge_t2i.detach() > 0).float(), t2i.valid)
            ),
        }
        return {"discriminator": discriminator, "generator": generator}
