"""The authors' PatchCore pipeline, literally: their embedding order, their per-step coreset loop,
brute-force nearest neighbours, and scipy's Gaussian filter. The oracle for PatchCore.predict: it
imports nothing from the rest of the package, so a bug there cannot pass its own oracle."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .coreset import greedy_coreset_reference, reference_seeded_start
from .embedding import reference_patch_embedding
from .knn import knn_reference


@torch.no_grad()
def reference_predict(extractor, train_images: torch.Tensor, test_images: torch.Tensor, ratio: float = 0.1,
                      projection_dim: int = 128, seed: int = 0, embed_dim: int = 1024, sigma: float = 4.0):
    """(image scores [M], maps [M, S, S], coreset picks) for images already transformed to [*, 3, S, S]."""
    bank_features, _ = reference_patch_embedding(extractor(train_images), embed_dim)
    space, initial = reference_seeded_start(bank_features, projection_dim, 10, seed)
    picks = greedy_coreset_reference(space, initial, int(len(bank_features) * ratio))
    bank = bank_features[picks]

    test_features, grid = reference_patch_embedding(extractor(test_images), embed_dim)
    distances, _ = knn_reference(test_features, bank, 1)
    patch_scores = distances[:, 0].reshape(len(test_images), *grid)
    image_scores = patch_scores.reshape(len(test_images), -1).max(dim=1).values
    size = test_images.shape[-1]
    upsampled = F.interpolate(patch_scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    maps = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in upsampled.squeeze(1).numpy()])
    return image_scores, torch.from_numpy(maps), picks
