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
from .backbones import FeatureExtractor
from .index import Index


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class PatchFeatures(nn.Module):
    """backbone -> locally aware patch features [B, patches, embed_dim] (float32) and the grid."""

    def __init__(self, extractor: nn.Module, embed_dim: int, half_precision: bool = False,
                 device: torch.device = torch.device("cpu")):
        super().__init__()
        self.extractor = extractor
        self.embed_dim = embed_dim
        self.half_precision = half_precision
        self.device = device

    @torch.no_grad()
    def grid(self, image_size: int, name: str) -> tuple[int, int]:
        """The patch grid of one image_size x image_size image; ValueError where it is too small."""
        try:
            _, grid = self(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError as error:  # e.g. a kernel larger than the feature map
            raise ValueError(f"image_size {image_size} is too small for {name}: {str(error).splitlines()[0]}") from error
        if min(grid) < 2:  # one patch per image: no neighbourhood, no map
            raise ValueError(f"image_size {image_size} gives {name} a {grid[0]} x {grid[1]} patch grid; at least "
                             "2 x 2 is needed: raise image_size")
        return tuple(grid)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, S, S] in [0, 1] -> (features [B, h * w, embed_dim], (h, w))."""
        images = images.to(self.device, non_blocking=True)
        if self.half_precision:
            images = images.to(torch.bfloat16)
        if (self.half_precision and self.device.type == "cuda") or (self.device.type == "cpu" and not _tracing()):
            # channels_last: oneDNN's NHWC convolutions on the CPU (measured 2 threads, 16 images at
            # 224 px: Lite0 0.46 -> 0.33 s, resnet18 0.32 -> 0.25 s; float32 rounding differences only)
            images = images.contiguous(memory_format=torch.channels_last)
        features, grid = patch_embedding(self.extractor(images), self.embed_dim)
        return features.reshape(images.shape[0], grid[0] * grid[1], -1), grid  # shape[0]: len() would fix an exported batch


def collect(batches, total: int | None, device: torch.device) -> torch.Tensor:
    """Patch features of every batch [images, patches, D]: written into one preallocated tensor
    when the number of images is known up front (never twice in memory), else concatenated."""
    parts, filled = [], 0
    for features in batches:
        if total is not None and not parts:
            parts.append(torch.empty(total, *features.shape[1:], device=device))
        if total is not None:
            parts[0][filled : filled + len(features)] = features
        else:
            parts.append(features)
        filled += len(features)
    if filled == 0:
        raise ValueError("no images")
    return parts[0][:filled] if total is not None else torch.cat(parts)


def check_patch_features(features: torch.Tensor, dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Rows [N, dim] of features [images, patches, dim] (patches = the grid's cells) or [rows, dim]."""
    if features.dim() not in (2, 3) or features.shape[-1] != dim:
        raise ValueError(f"features must be [images, patches, {dim}] or [rows, {dim}], got {tuple(features.shape)}")
    if features.dim() == 3 and features.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"features have {features.shape[1]} patches per image; this model's images give "
                         f"{grid[0]} x {grid[1]}")
    return features.reshape(-1, dim)


def prepared(extractor: FeatureExtractor, device: torch.device, half_precision: bool) -> FeatureExtractor:
    """The extractor on `device` (bfloat16 and channels_last on CUDA when asked), converting a copy
    so that a caller's extractor, perhaps shared with other models, is never changed."""
    dtype = torch.bfloat16 if half_precision else torch.float32
    parameter = next(extractor.parameters(), None)
    if parameter is not None and _same_device(parameter.device, device) and parameter.dtype == dtype:
        return extractor
    prepared = copy.deepcopy(extractor).to(device=device, dtype=dtype)
    if half_precision and device.type == "cuda":
        prepared = prepared.to(memory_format=torch.channels_last)
    return prepared


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 (the current GPU), cpu and cpu:0 are the same device."""
    def index(d):
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)
    return a.type == b.type and index(a) == index(b)


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
        `index` replaces the module's (the cross-fitted threshold's fold banks)."""
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
