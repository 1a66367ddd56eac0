"""Locally aware patch features, the authors' aggregation computed without its large intermediates.

Per layer: 3 x 3 neighbourhoods (unfold, stride 1, zero padding 1), each neighbourhood vector
(channel-major, then the 3 x 3 window) average-pooled to `dim` values; deeper layers brought to
the first layer's grid by bilinear interpolation (align_corners=False); the layers' vectors
concatenated and average-pooled to `dim` again. One row per cell of the first layer's grid.

The authors interpolate the unfolded maps and pool afterwards. Both steps are linear and act on
different axes, so pooling first gives the same features (up to float rounding) from maps with
`dim` instead of 9 x C channels. reference/embedding.py keeps their literal order as the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_channels(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling along dim 1 of [B, C, L] (torch's adaptive_avg_pool1d bins)."""
    return F.adaptive_avg_pool2d(x.unsqueeze(1), (size, x.shape[-1])).squeeze(1)


def patch_embedding(feature_maps: list[torch.Tensor], dim: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C_l, H_l, W_l] per layer -> (features [B * H_0 * W_0, dim], (H_0, W_0))."""
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
