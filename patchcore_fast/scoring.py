"""The scoring module: images -> patch features -> nearest-bank distances -> image scores and maps.

One `nn.Module` used by `PatchCore.predict` and by `export` alike. Predict searches the model's
index (flat, pruned or sharded); export swaps it for `InGraphIndex`, the same squared distances as
one matrix product and a min, so that the graph is plain torch operators.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .anomaly_map import anomaly_maps
from .embedding import patch_embedding
from .index import Index


class PatchFeatures(nn.Module):
    """backbone -> locally aware patch features [B, patches, embed_dim] (float32) and the grid."""

    def __init__(self, extractor: nn.Module, embed_dim: int, half_precision: bool = False,
                 device: torch.device = torch.device("cpu")):
        super().__init__()
        self.extractor = extractor
        self.embed_dim = embed_dim
        self.half_precision = half_precision
        self.device = device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, S, S] in [0, 1] -> (features [B, h * w, embed_dim], (h, w))."""
        images = images.to(self.device, non_blocking=True)
        if self.half_precision:
            images = images.to(torch.bfloat16)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
        features, grid = patch_embedding(self.extractor(images), self.embed_dim)
        return features.reshape(images.shape[0], grid[0] * grid[1], -1), grid  # shape[0]: len() would fix an exported batch


class InGraphIndex(nn.Module, Index):
    """A flat index as plain torch operators (for export): |q|^2 + |b|^2 - 2 q.b clamped at 0,
    the bank a constant of the graph."""

    kind = "flat"

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("bank", vectors.float().contiguous())
        self.register_buffer("bank_norm", vectors.float().square().sum(dim=1))

    @property
    def vectors(self):
        return self.bank

    def __len__(self):
        return len(self.bank)

    def search(self, queries, k=1, *, progress=None):
        distances = (queries.square().sum(dim=1, keepdim=True) + self.bank_norm[None, :]
                     - 2.0 * queries @ self.bank.T).clamp_min(0.0)
        if k == 1:
            value, index = distances.min(dim=1)
            return value[:, None], index[:, None]
        return distances.topk(k, dim=1, largest=False)

    def rows(self, indices):
        return self.bank[indices]

    def subset(self, keep):
        return InGraphIndex(self.bank[keep])

    def to(self, device):
        return nn.Module.to(self, device)

    def all_vectors(self):
        return self.bank


class ScoringModule(nn.Module):
    """A fitted model's scoring path. `index` may be any Index; k = num_neighbors distances are
    averaged into a patch score (the authors' k), the image score is the largest patch score
    (times the paper's Eq. 7 weight with `reweight`), maps are upsampled and smoothed (sigma 4)."""

    def __init__(self, features: PatchFeatures, index: Index, image_size: int, num_neighbors: int = 1,
                 reweight: bool = False, reweight_neighbors: int = 9):
        super().__init__()
        self.features = features
        self.index = index
        self.image_size = image_size
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors

    def patch_scores(self, features: torch.Tensor, index: Index | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores [b], patch scores [b, patches]) of patch features [b, patches, dim];
        `index` replaces the module's (leave-one-out scores)."""
        index = self.index if index is None else index
        b, patches, dim = features.shape
        k = min(self.num_neighbors, len(index))
        distances, indices = index.search(features.reshape(-1, dim), k)
        patch_scores = distances.mean(dim=1).reshape(b, patches)  # the authors average over k
        image_scores, worst = patch_scores.max(dim=1)
        if self.reweight:
            rows = torch.arange(b, device=features.device)
            nearest = indices.reshape(b, patches, k)[rows, worst, 0]
            image_scores = image_scores * self._eq7_weight(index, features[rows, worst], nearest)
        return image_scores, patch_scores

    def _eq7_weight(self, index: Index, worst_features: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7: 1 - softmax over the L2 distances from the worst patch to the b bank neighbours of its
        nearest bank entry (that entry first)."""
        b = min(self.reweight_neighbors, len(index))
        _, support = index.search(index.rows(nearest), b)
        distances = (worst_features[:, None, :] - index.rows(support)).norm(dim=-1)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    def maps(self, patch_scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[b, patches] -> pixel maps [b, S, S]."""
        return anomaly_maps(patch_scores.reshape(patch_scores.shape[0], *grid), self.image_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] in [0, 1], already framed as the model's Transform does -> (scores [B], maps [B, S, S])."""
        features, grid = self.features(images)
        image_scores, patch_scores = self.patch_scores(features)
        return image_scores, self.maps(patch_scores, grid)

    def exportable(self) -> "ScoringModule":
        """This module as plain float32 torch operators on the CPU: the same path, the index as a
        matrix product and a min (the bank gathered whole)."""
        features = PatchFeatures(copy.deepcopy(self.features.extractor).float().cpu().eval(), self.features.embed_dim,
                                 False, torch.device("cpu"))
        return ScoringModule(features, InGraphIndex(self.index.all_vectors().cpu()), self.image_size,
                             self.num_neighbors, self.reweight, self.reweight_neighbors).eval()
