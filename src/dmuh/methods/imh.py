"""IMH (Shen, Shen, Shi, van den Hengel and Tang, CVPR 2013; TPAMI 2015 "Hashing on nonlinear
manifolds"): inductive manifold hashing, here IMH-tSNE.

Which IMH: the toolkits' single-modal image-retrieval baselines mean this one. CISiPLab's FIRe
(functions/loss/imh.py, `IMHLoss`) implements Shen et al.'s inductive hashing on manifolds with
t-SNE; Song et al.'s inter-media hashing (SIGMOD 2013, IMH_learn(feaTrain_vis, feaTrain_text))
is a cross-modal method that needs two modalities, so it is not the single-modal "IMH" of FIRe's
or DeepHash-style tables. Reference followed: FIRe's IMHLoss (the code the issue names) and the
paper's Eq. (the inductive embedding).

Fit on the training features X:
1. a base set: m = `anchors` (400) k-means centres c_j of X (`kmeans_iter` = 200 rounds;
   litekmeans-style Lloyd iterations from centres drawn from the items, seeded: FIRe uses
   faiss.Kmeans);
2. a bits-dimensional t-SNE embedding e_j of the centres (scikit-learn's exact t-SNE, PCA
   initialisation, perplexity 30, as FIRe; seeded);
3. the inductive embedding of any x: its k = `neighbours` (5) nearest centres, weighted by
   w_j proportional to exp(-||x - c_j||^2 / bandwidth) (bandwidth 512, FIRe's) normalised over
   those k: y(x) = sum_j w_j e_j; code = sign(y(x)) (FIRe quantises y by its sign as it is).
The out-of-sample function is an `AnchorEmbeddingHead` (centres, embedding, k, bandwidth).

Readings and deviations:
- The normalised weights are computed as a softmax over the k (the same numbers without the
  underflow of exp(-d / 512) when squared distances are in the thousands).
- t-SNE's perplexity must be below the number of centres: min(30, (m - 1) / 3) on tiny sets;
  with bits > the feature dimension PCA initialisation is impossible and t-SNE starts at random.
- sign(0) = +1.
"""

from __future__ import annotations

import numpy as np
import torch

from dmuh.errors import DmuhError
from dmuh.methods.base import Requirements, register_method
from dmuh.methods.components.params import SEED, Param
from dmuh.methods.components.shallow import ShallowMethod
from dmuh.methods.components.shallow_toolkit import lite_kmeans
from dmuh.models.heads import AnchorEmbeddingHead
from dmuh.utils.schema import Rule


@register_method("imh", display_name="IMH")
class IMH(ShallowMethod):
    """t-SNE of k-means centres, extended to every item by a kernel-weighted average of its nearest centres."""

    requires = Requirements(shallow=True, labels=False)
    hyper_parameters = {
        "anchors": Param(int, Rule(minimum=2), "k-means centres (the base set)"),
        "neighbours": Param(int, Rule(minimum=1), "nearest centres of the inductive embedding"),
        "bandwidth": Param(float, Rule(above=0.0), "Gaussian bandwidth of the weights (on squared distances)"),
        "kmeans_iter": Param(int, Rule(minimum=1), "k-means rounds"),
        "perplexity": Param(float, Rule(above=0.0), "t-SNE perplexity"),
        "seed": SEED,
    }

    def __init__(
        self,
        bits: int,
        num_train: int,
        num_classes: int,
        anchors: int = 400,
        neighbours: int = 5,
        bandwidth: float = 512.0,
        kmeans_iter: int = 200,
        perplexity: float = 30.0,
        seed: int = 0,
    ):
        super().__init__(bits, num_train, num_classes)
        self.anchors, self.neighbours, self.bandwidth = anchors, neighbours, bandwidth
        self.kmeans_iter, self.perplexity, self.seed = kmeans_iter, perplexity, seed

    def embed_centres(self, centres: torch.Tensor) -> torch.Tensor:
        """The t-SNE embedding (m, bits) of the centres."""
        from sklearn.manifold import TSNE  # scikit-learn is heavy to import; only this fit needs it

        m = centres.shape[0]
        perplexity = min(self.perplexity, (m - 1) / 3)
        init = "pca" if self.bits <= min(centres.shape) else "random"
        tsne = TSNE(self.bits, perplexity=perplexity, init=init, method="exact", random_state=self.seed)
        return torch.from_numpy(np.asarray(tsne.fit_transform(centres.numpy()), dtype=np.float64))

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> AnchorEmbeddingHead:
        x = self.check_features(features)
        count = min(self.anchors, x.shape[0])
        if count < 4:
            raise DmuhError(f"{self.name}: needs at least 4 training items for its k-means base set, got {count}")
        _, centres = lite_kmeans(x, count, self.kmeans_iter, torch.Generator().manual_seed(self.seed))
        embedding = self.embed_centres(centres)
        return AnchorEmbeddingHead.fitted(centres.float(), embedding.float(), self.neighbours, self.bandwidth)
