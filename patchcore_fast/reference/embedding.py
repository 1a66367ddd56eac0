"""The authors' patch embedding, step by step in their order (the oracle for patch_embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor):
    """[B, C, H, W] -> ([B, H * W, C, 3, 3], (H, W)): each cell's 3 x 3 neighbourhood."""
    unfolded = F.unfold(x, kernel_size=3, stride=1, padding=1, dilation=1)
    grid = [(s + 2 * 1 - 1 * (3 - 1) - 1) // 1 + 1 for s in x.shape[-2:]]
    unfolded = unfolded.reshape(*x.shape[:2], 3, 3, -1).permute(0, 4, 1, 2, 3)
    return unfolded, grid


def reference_patch_embedding(feature_maps: list[torch.Tensor], dim: int = 1024):
    features = [patchify(x.float()) for x in feature_maps]
    shapes = [f[1] for f in features]
    features = [f[0] for f in features]
    ref = shapes[0]
    for i in range(1, len(features)):
        f = features[i]
        h, w = shapes[i]
        f = f.reshape(f.shape[0], h, w, *f.shape[2:])
        f = f.permute(0, -3, -2, -1, 1, 2)
        base = f.shape
        f = f.reshape(-1, *f.shape[-2:])
        f = F.interpolate(f.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False).squeeze(1)
        f = f.reshape(*base[:-2], ref[0], ref[1])
        f = f.permute(0, -2, -1, 1, 2, 3)
        f = f.reshape(len(f), -1, *f.shape[-3:])
        features[i] = f
    features = [f.reshape(-1, *f.shape[-3:]) for f in features]
    # Each layer: flatten the neighbourhood and average-pool it to `dim` (the authors' MeanMapper).
    pooled = [F.adaptive_avg_pool1d(f.reshape(len(f), 1, -1), dim).squeeze(1) for f in features]
    stacked = torch.stack(pooled, dim=1)
    # The authors' Aggregator: all layers' vectors pooled to `dim` again.
    merged = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), dim).reshape(len(stacked), -1)
    return merged, tuple(ref)
