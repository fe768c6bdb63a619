"""COSDISH (Kang, Li and Zhou, AAAI 2016): Column Sampling based Discrete Supervised Hashing.

Reference: the authors' MATLAB COSDISH.m (as distributed with their hashing baselines), with the
solver of jiangqy/DDSH-TIP2018 (Solve.m, the same code); written from their formulas.

A shallow method (`ShallowMethod`): fitted once on features of the training split.

1. Standardise the features (zero mean, unit variance per dimension; constant dimensions are
   only centred).
2. B (n x q) starts as seeded random signs. `iterations` times (default 10, the code's T_sto):
   sample `columns` training items Omega (default q, the code's sc = q), take the similarity of
   every item to them, S~ (n x |Omega|: +1 when two items share a label, multi-label included,
   -r otherwise, r = #similar / #dissimilar of the block), then `alternations` times (default
   3, T_alt):
     - B_Omega bit by bit: the binary quadratic program of `dmuh.methods.components.discrete` (the authors'
       2-approximation by equal-size clustering, then a swap search);
     - B_Gamma = sign(S~_Gamma B_Omega), an entry whose argument is 0 (|.| < 1e-5) keeping its
       old value.
3. Out of sample: the ridge regression W = (X^T X + ridge I)^-1 X^T B (ridge = 1, the code's) of
   the codes on the standardised features X; code = sign(X W). The standardisation is folded into
   the returned layer: weight = (W / sigma)^T, bias = -(mu / sigma) W.

Memory: S~ is only ever the n x |Omega| block of sampled columns, built from the labels; X^T X is
D x D, formed from the raw features (no standardised copy). 100,000 x 512 features take about
0.4 GB as float64, and the fit a little more.

Deviations:
- dissimilar pairs are -r: COSDISH.m writes S (1 - r) + r (dissimilar +r), DDSH's trainDDSH.m
  S (1 + r) - r; +r would ask dissimilar items to be close, so DDSH's form is taken for both;
- the solver's swap search and current-bit candidate (see `dmuh.methods.components.discrete`;
  `search_starts=0` is the authors' solver);
- the standardisation statistics come from the training split (COSDISH.m standardises the
  training and test features together);
- retrieval codes: COSDISH.m ranks the training items by their learned B and encodes only the
  queries with W; here every item (query and database) is encoded by the hash layer sign(X W).

`objectives` keeps, per iteration, the sampled objective ||q S~_Gamma - B_Gamma B_Omega^T||^2 +
||q S~_Omega - B_Omega B_Omega^T||^2 of the codes it starts from and after every alternation (a
diagnostic). It is not monotone: sign(S~_Gamma B_Omega) maximises only the linear part of the
B_Gamma problem (it leaves out ||B_Gamma B_Omega^T||^2, which is not constant), and each bit of
B_Omega fits the residual of the bits before it, not of all the others, as in the authors' code.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from dmuh.codes.binary import sign
from dmuh.methods.base import register_method
from dmuh.methods.components.discrete import (
    SEARCH_STARTS,
    check_columns,
    sampled_objective,
    sampled_similarity,
    solve_sampled_codes,
)
from dmuh.methods.components.functional import (
    random_sign_codes,
)
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.utils.schema import Rule


@register_method("cosdish", display_name="COSDISH")
class COSDISH(ShallowMethod):
    """Discrete codes fitted to sampled columns of the label similarity, then a ridge regression."""

    hyper_parameters = {
        "columns": Param(int, Rule(minimum=2), "sampled columns (none: bits)", optional=True),
        "iterations": Param(int, Rule(minimum=0), "sampled blocks (the code's T_sto)"),
        "alternations": Param(int, Rule(minimum=1), "alternations of B and W per block (T_alt)"),
        "ridge": Param(float, Rule(above=0.0), "ridge of the out-of-sample regression"),
        "search_starts": Param(int, Rule(minimum=0), "random starts of the discrete code search"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        columns: Optional[int] = None,
        iterations: int = 10,
        alternations: int = 3,
        ridge: float = 1.0,
        search_starts: int = SEARCH_STARTS,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.columns = self.bits if columns is None else columns
        self.iterations = iterations
        self.alternations = alternations
        self.ridge = ridge
        self.search_starts = search_starts
        self.seed = seed
        self.objectives: List[List[float]] = []

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.check_features(features)
        labels = self.check_labels(labels, x.shape[0])
        check_columns(self.name, self.columns, x.shape[0])
        codes = self.fit_codes(labels)
        return self.regression(x, codes)

    def fit_codes(self, labels: torch.Tensor) -> torch.Tensor:
        """The discrete training codes B (n x bits, float64 +-1) of the column-sampling iterations."""
        n, q = labels.shape[0], self.bits
        generator = torch.Generator().manual_seed(self.seed)
        codes = random_sign_codes(n, q, self.seed).double()
        self.objectives = []
        for _ in range(self.iterations):
            omega = torch.randperm(n, generator=generator)[: self.columns]
            gamma = torch.ones(n, dtype=torch.bool)
            gamma[omega] = False
            # n x |Omega|, r over the whole block (the sampled items' own rows included), as the code
            block = q * sampled_similarity(labels, labels[omega])[0].double()
            target_gamma, target_omega = block[gamma], block[omega]
            codes_gamma, codes_omega = codes[gamma], codes[omega]
            objectives = [sampled_objective(target_gamma, target_omega, codes_gamma, codes_omega)]
            for _ in range(self.alternations):
                codes_omega = solve_sampled_codes(
                    target_omega,
                    target_gamma.t() @ codes_gamma,
                    codes_gamma.t() @ codes_gamma,
                    codes_omega,
                    self.search_starts,
                )
                # sign(S~_Gamma B_Omega); an argument of 0 keeps the old bit (the code's ex_sign)
                argument = target_gamma @ codes_omega / q
                codes_gamma = torch.where(argument.abs() < 1e-5, codes_gamma, sign(argument))
                objectives.append(sampled_objective(target_gamma, target_omega, codes_gamma, codes_omega))
            self.objectives.append(objectives)
            codes[gamma], codes[omega] = codes_gamma, codes_omega
        return codes

    def regression(self, x: torch.Tensor, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight (bits, D), bias (bits,)) of sign(((x - mu) / sigma) W), W the ridge regression."""
        n = x.shape[0]
        mean = x.mean(dim=0)
        std = x.std(dim=0)  # n - 1, as MATLAB's std
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant dimension is only centred
        # X^T X and X^T B of the standardised features from the raw ones: no n x D copy
        gram = (x.t() @ x - n * torch.outer(mean, mean)) / torch.outer(std, std)
        cross = (x.t() @ codes - torch.outer(mean, codes.sum(0))) / std[:, None]
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        projection = torch.linalg.solve(gram + self.ridge * eye, cross)  # (D, bits)
        weight = projection / std[:, None]
        return weight.t().float().contiguous(), (-(mean @ weight)).float()
