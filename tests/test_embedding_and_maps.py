"""Patch embedding and anomaly maps against second, literal implementations."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from patchcore_fast.anomaly_map import anomaly_maps, gaussian_blur
from patchcore_fast.embedding import patch_embedding
from patchcore_fast.reference.embedding import reference_patch_embedding


@pytest.mark.parametrize("shapes", [
    [(2, 512, 28, 28), (2, 1024, 14, 14)],       # WideResNet-50 layer2, layer3
    [(2, 40, 28, 28), (2, 112, 14, 14)],         # EfficientNet-Lite0 stride 8 and 16 (fewer than 1024 values)
    [(1, 64, 7, 9), (1, 128, 4, 5), (1, 32, 2, 3)],  # three layers, odd grids
    [(3, 256, 10, 10)],                          # one layer
])
def test_embedding_equals_the_authors_order(shapes):
    g = torch.Generator().manual_seed(len(shapes))
    maps = [torch.randn(*s, generator=g) for s in shapes]
    ours, grid = patch_embedding(maps, 1024)
    ref, ref_grid = reference_patch_embedding(maps, 1024)
    assert grid == ref_grid == shapes[0][-2:]
    assert ours.shape == (shapes[0][0] * shapes[0][2] * shapes[0][3], 1024)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_other_embedding_sizes():
    maps = [torch.randn(1, 16, 6, 6), torch.randn(1, 8, 3, 3)]
    ours, _ = patch_embedding(maps, 100)
    ref, _ = reference_patch_embedding(maps, 100)
    assert ours.shape == (36, 100) and torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 224, 224), (1, 9, 40), (1, 40, 7)])
def test_gaussian_blur_is_scipys(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 50
    ours = gaussian_blur(x, 4.0)
    ref = np.stack([ndimage.gaussian_filter(m.double().numpy(), sigma=4.0) for m in x])
    assert np.abs(ours.numpy() - ref).max() < 1e-5 * 50


def test_anomaly_maps_shape_and_constant_input():
    maps = anomaly_maps(torch.full((3, 28, 28), 2.5), 224)
    assert maps.shape == (3, 224, 224)
    assert torch.allclose(maps, torch.full_like(maps, 2.5), atol=1e-5)
