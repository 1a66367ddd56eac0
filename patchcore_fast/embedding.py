"""Locally aware patch features, the authors' aggregation computed without its large intermediates.

Per layer: 3 x 3 neighbourhoods (unfold, stride 1, zero padding 1), each neighbourhood vector
(channel-major, then the 3 x 3 window) average-pooled to `dim` values; deeper layers brought to
the first layer's grid by bilinear interpolation (align_corners=False); the layers' vectors
concatenated and average-pooled to `dim` again. One row per cell of the first layer's grid.

All of it is a fixed linear map of the feature maps. `patch_embedding` runs the compiled kernel
(csrc/embedding_bins.h: each output column is a few contiguous bins of one layer's neighbourhood
vector, summed straight from the maps, deeper layers summed on their own grid and resampled
once), `patch_embedding_torch` is its pure-torch twin (used when tracing for export, or without
the extension): the authors interpolate the unfolded maps and pool afterwards, both linear on
different axes, so it pools first, from maps with `dim` instead of 9 x C channels.
reference/embedding.py keeps the authors' literal order as the oracle.

How far they may differ from the oracle: each output is a convex combination (non-negative
weights summing to 1) of at most n = 4 * layers * (ceil(9 C / dim) + 1) map values per layer
(bins, bilinear taps, layers), summed in a different order; float32 sums of n terms each carry
at most (n + 3) * 2^-24 * max |value| of error (the +3: the divisions and weight products), so
|fused - oracle| <= 2 (n + 3) 2^-24 max |map| (tests/test_embedding_and_maps.py checks this bound).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._extension import _C, compiled


def pool_channels(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling along dim 1 of [B, C, L] (torch's adaptive_avg_pool1d bins)."""
    return F.adaptive_avg_pool2d(x.unsqueeze(1), (size, x.shape[-1])).squeeze(1)


def embedding_error_bound(feature_maps: list[torch.Tensor], dim: int) -> float:
    """The largest |difference| between two correct float32 evaluations of the embedding (module text)."""
    layers = len(feature_maps)
    terms = max(4 * layers * (-(-9 * m.shape[1] // dim) + 1) for m in feature_maps)
    largest = max(float(m.detach().float().abs().max()) if m.numel() else 0.0 for m in feature_maps)
    return 2 * (terms + 3) * 2.0**-24 * largest


def patch_embedding(feature_maps: list[torch.Tensor], dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C_l, H_l, W_l] per layer -> (features [B * H_0 * W_0, dim], (H_0, W_0)), float32."""
    if not feature_maps:
        raise ValueError("patch_embedding needs at least one feature map")
    grid = tuple(int(s) for s in feature_maps[0].shape[-2:])
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if not tracing and compiled(feature_maps[0].device):
        return _C.patch_embedding([m.float().contiguous() for m in feature_maps], dim), grid
    return patch_embedding_torch(feature_maps, dim)


def patch_embedding_torch(feature_maps: list[torch.Tensor], dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """patch_embedding in plain torch operators (traceable, exportable)."""
    batch, _, height, width = feature_maps[0].shape
    per_layer = []
    for fmap in feature_maps:
        fmap = fmap.float()
        h, w = fmap.shape[-2:]
        neighbourhoods = F.unfold(fmap, kernel_size=3, padding=1)  # [B, C * 9, h * w]
        pooled = pool_channels(neighbourhoods, dim).reshape(batch, dim, h, w)
        if (h, w) != (height, width):
            pooled = F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False)
        per_layer.append(pooled)
    # [B, dim, L, H, W] -> rows of [layer0 (dim), layer1 (dim), ...] -> pooled to dim.
    stacked = torch.stack(per_layer, dim=2).permute(0, 3, 4, 2, 1).reshape(batch * height * width, len(per_layer) * dim)
    merged = F.adaptive_avg_pool1d(stacked.unsqueeze(1), dim).squeeze(1)
    return merged, (height, width)
