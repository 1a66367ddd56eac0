"""Pixel anomaly maps: patch scores upsampled bilinearly, then Gaussian-smoothed exactly as
scipy.ndimage.gaussian_filter does it (sigma 4, truncate 4.0 -> 33 taps, 'reflect' borders),
computed in torch on the scores' device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_taps(sigma: float, truncate: float = 4.0, device=None) -> torch.Tensor:
    """scipy's normalised 1-D Gaussian kernel: radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    phi = torch.exp(-0.5 * (x / sigma) ** 2)
    return (phi / phi.sum()).float()


def reflect_indices(size: int, radius: int, device=None) -> torch.Tensor:
    """Source index of each padded position under scipy's 'reflect' (edge repeated: d c b a | a b c d)."""
    i = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def gaussian_blur(images: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of [B, H, W] with scipy.ndimage semantics."""
    taps = gaussian_taps(sigma, truncate, images.device)
    radius = (len(taps) - 1) // 2
    b, h, w = images.shape
    x = images.float()
    x = x[:, :, reflect_indices(w, radius, x.device)]  # along W
    x = F.conv1d(x.reshape(b * h, 1, -1), taps.view(1, 1, -1)).reshape(b, h, w)
    x = x.transpose(1, 2)[:, :, reflect_indices(h, radius, x.device)]  # along H
    x = F.conv1d(x.reshape(b * w, 1, -1), taps.view(1, 1, -1)).reshape(b, w, h)
    return x.transpose(1, 2).contiguous()


def anomaly_maps(patch_scores: torch.Tensor, size: int, sigma: float = 4.0) -> torch.Tensor:
    """[B, h, w] patch scores -> [B, size, size] smoothed pixel scores."""
    up = F.interpolate(patch_scores.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False)
    if sigma <= 0 or math.isclose(sigma, 0.0):
        return up.squeeze(1)
    return gaussian_blur(up.squeeze(1), sigma)
