"""ADSH (Jiang and Li, AAAI 2018): Asymmetric Deep Supervised Hashing.

Reference: the authors' jiangqy/ADSH-AAAI2018, ADSH_pytorch/ADSH_CIFAR_10.py (the outer loop,
`calc_sim`, the discrete update of V) and ADSH_pytorch/utils/adsh_loss.py (the network's loss);
cross-checked with swuxyj/DeepHash-pytorch ADSH.py. Written from their formulas, not copied.
(FIRe's `adsh` is another method, Angular Deep Supervised Hashing.)

The method trains on the database: its training split is the database (`--protocol
cifar10-asym` or `asymmetric`, train = database). It learns the codes V (n x q, +-1) of the
database items directly, and the network only for queries, on `samples` sampled items Omega:

- every `passes` epochs (one of the code's outer iterations) a new Omega of `samples` items is
  drawn (seeded by seed and round) and S~ (|Omega| x n) is formed from the labels: +1 when two
  items share a label, -r otherwise, r = #similar / #dissimilar over the block (`calc_sim`'s soft
  constraint); an epoch runs over Omega only (`Requirements.epoch_items`);
- every batch, with u = tanh(z) of the batch's items (all in Omega):

      L = [sum_{i, j} (u_i . V_j - q S~_ij)^2 + gamma sum_i ||V_i - u_i||^2] / (n B)

  (adsh_loss.py, its division by num_train times batch size), and U_i = u_i is kept;
- after the last epoch of an iteration (`on_epoch_end`), V is updated bit by bit from U:
      Q = -2 q S~^T U - 2 gamma U_bar    (U_bar: U in the rows of Omega, 0 elsewhere)
      V_:k = -sign(2 V_:-k U_:-k^T U_:k + Q_:k)

Retrieval (the paper's evaluation): queries by sign(tanh(z)) of the network, database items by
their learned V (`Requirements.database_codes`; a database item outside the training split by the
network); `-p database=network` encodes the database by the network too. V starts at 0 (the
code's): until the first update every learned code reads +1.

Defaults (the authors' CIFAR-10 script): samples = 2,000, passes = 3, gamma = 200; their recipe is
50 iterations (`--epochs 150`), batch 64, SGD lr 1e-3 with weight decay 5e-4, the rate divided by
10 at iterations 10, 20, 30, 40 (dmuh's schedule is its own).

Deviations: sign(0) = +1 in the V update (numpy's sign gives 0); a pass drops Omega's ragged last
batch (the loop's full batches); the code's S~ of a batch is the rows of the sampled block's, as
here (DeepHash-pytorch recomputes r per batch).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from dmuh.codes.binary import sign
from dmuh.errors import DmuhError
from dmuh.methods.base import HashingMethod, Requirements, StepInputs, pairwise_similarity, register_method
from dmuh.methods.components.discrete import dissimilar_weight
from dmuh.methods.components.params import Param
from dmuh.methods.components.two_stage import TrainingLabels
from dmuh.utils.schema import Rule

DATABASE_ENCODINGS = ("learned", "network")
CHUNK = 8192  # database rows per block of S~ in the V update


@register_method("adsh", display_name="ADSH (asymmetric)")
class ADSH(HashingMethod):
    """Database codes learned directly by discrete updates; the network learns the queries' codes."""

    requires = Requirements(epoch_items=True, database_codes=True)
    hyper_parameters = {
        "samples": Param(int, Rule(minimum=1), "query points sampled per iteration (the code's num_samples)"),
        "passes": Param(int, Rule(minimum=1), "epochs over each sample (the code's epochs): one iteration"),
        "gamma": Param(float, Rule(minimum=0.0), "weight of ||V_Omega - U||^2"),
        "database": Param(str, Rule(choices=DATABASE_ENCODINGS), "database codes: learned V or the network's"),
        "seed": Param(int, Rule(minimum=0), "seed of the sampling"),
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        samples: int = 2000,
        passes: int = 3,
        gamma: float = 200.0,
        database: str = "learned",
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.samples, self.passes, self.gamma, self.database, self.seed = samples, passes, gamma, database, seed
        self.train_labels = TrainingLabels(self.num_train, self.num_classes)
        self.register_buffer("codes", torch.zeros(self.num_train, self.bits))  # V
        self.register_buffer("omega", torch.zeros(self.samples, dtype=torch.long))
        self.register_buffer("slot", torch.full((self.num_train,), -1, dtype=torch.long))  # position in Omega
        self.register_buffer("sample_outputs", torch.zeros(self.samples, self.bits))  # U
        self.register_buffer("dissimilar", torch.zeros(()))
        self.register_buffer("sampled", torch.zeros((), dtype=torch.bool))
        self.notes.append(
            "trains on the labels of the database it searches (asymmetric protocol: --protocol cifar10-asym "
            "or asymmetric, train = database); its MAP is not comparable with symmetric protocols' rows"
        )

    def set_train_labels(self, labels: torch.Tensor) -> None:
        super().set_train_labels(labels)
        if self.samples > self.num_train:
            raise DmuhError(
                f"method {self.name!r}: samples={self.samples} query points sampled from "
                f"{self.num_train} training items (lower -p samples)"
            )

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if (epoch - 1) % self.passes == 0 or not bool(self.sampled):
            self.sample((epoch - 1) // self.passes)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        if epoch % self.passes == 0:
            self.update_codes()

    def epoch_items(self, epoch: int) -> torch.Tensor:
        return self.omega

    @torch.no_grad()
    def sample(self, round_: int) -> None:
        """Omega of iteration `round_` (the same on every rank and on resuming), its r, and U = 0."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_)
        omega = torch.randperm(self.num_train, generator=generator)[: self.samples].to(self.omega.device)
        self.omega.copy_(omega)
        self.slot.fill_(-1)
        self.slot[omega] = torch.arange(self.samples, device=omega.device)
        labels = self.train_labels.labels
        self.dissimilar.fill_(dissimilar_weight(pairwise_similarity(labels[omega], labels)))
        self.sample_outputs.zero_()
        self.sampled.fill_(True)

    def similarity(self, labels: torch.Tensor, database_labels: torch.Tensor) -> torch.Tensor:
        """S~ (rows x database rows): +1 similar, -r dissimilar."""
        similar = pairwise_similarity(labels.float(), database_labels)
        return similar * (1.0 + self.dissimilar) - self.dissimilar

    @torch.no_grad()
    def update_codes(self) -> None:
        """V bit by bit from U (the code's "learning binary codes: discrete coding")."""
        q, outputs, codes = self.bits, self.sample_outputs, self.codes
        sample_labels = self.train_labels.labels[self.omega]
        target = torch.empty_like(codes)  # Q = -2 q S~^T U - 2 gamma U_bar, by blocks of database rows
        for start in range(0, self.num_train, CHUNK):
            block = self.similarity(self.train_labels.labels[start : start + CHUNK], sample_labels)
            target[start : start + CHUNK] = -2 * q * block @ outputs
        target[self.omega] -= 2 * self.gamma * outputs
        gram = outputs.t() @ outputs  # U^T U: column k is U^T U_:k
        for k in range(q):
            others = torch.arange(q, device=codes.device) != k
            codes[:, k] = -sign(2 * codes[:, others] @ gram[others, k] + target[:, k])

    def database_codes(self) -> Optional[torch.Tensor]:
        return self.codes if self.database == "learned" else None

    def continuous_codes(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(outputs)

    def forward(self, step: StepInputs) -> Dict[str, torch.Tensor]:
        if self.training:  # U of the global batch's sampled items
            indices, outputs, _ = step.shared()
            slots = self.slot[indices]
            kept = slots >= 0
            self.sample_outputs[slots[kept]] = torch.tanh(outputs[kept].float())
        u = self.continuous_codes(step.outputs.float())
        similar = self.similarity(step.labels, self.train_labels.labels)
        normaliser = self.num_train * u.shape[0]
        return {
            "pairwise": (u @ self.codes.t() - self.bits * similar).pow(2).sum() / normaliser,
            "quantization": self.gamma * (self.codes[step.indices] - u).pow(2).sum() / normaliser,
        }
