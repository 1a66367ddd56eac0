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


# Each backbone's two layers at its default image size ([C, H, W]; tests/test_backbones checks
# the channel counts against the networks).
BACKBONE_LAYERS = {
    "wide_resnet50_2": [(512, 28, 28), (1024, 14, 14)],
    "resnet18": [(128, 28, 28), (256, 14, 14)],
    "efficientnet_lite0": [(40, 28, 28), (112, 14, 14)],
    "efficientnet_lite1": [(40, 30, 30), (112, 15, 15)],
    "efficientnet_lite2": [(48, 33, 33), (120, 17, 17)],
}
AWKWARD = [
    ([(1, 3, 5, 7)], 1024),                           # one layer, 27 values repeated into 1024 bins
    ([(2, 113, 9, 6), (2, 57, 5, 3)], 1000),         # prime-ish channels, odd grids
    ([(1, 64, 7, 9), (1, 128, 4, 5), (1, 32, 2, 3)], 100),  # three layers: columns straddle layers
    ([(1, 7, 3, 4), (1, 300, 6, 8)], 33),            # the deeper layer on a finer grid
    ([(2, 1, 1, 1), (2, 2, 1, 1)], 1),               # one cell, one column
    ([(1, 2, 2, 2), (1, 3, 1, 1)], 5),               # a 1 x 1 deeper layer
]


def fused(maps, dim):
    from patchcore_fast._extension import _C
    if _C is None:
        pytest.skip("no compiled extension")
    return _C.patch_embedding(maps, dim)


@pytest.mark.parametrize("backbone", sorted(BACKBONE_LAYERS))
def test_fused_embedding_within_its_bound_of_the_authors_order(backbone):
    from patchcore_fast.embedding import embedding_error_bound
    g = torch.Generator().manual_seed(len(backbone))
    maps = [torch.randn(2, *s, generator=g) * 3 for s in BACKBONE_LAYERS[backbone]]
    ours = fused(maps, 1024)
    ref, _ = reference_patch_embedding(maps, 1024)
    bound = embedding_error_bound(maps, 1024)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= bound
    # The bound is meaningful: an error of a few ulps of the largest value, far below the features' spread.
    assert bound < 1e-4 * ref.std().item() * 100


@pytest.mark.parametrize("shapes,dim", AWKWARD)
def test_fused_embedding_on_awkward_shapes(shapes, dim):
    from patchcore_fast.embedding import embedding_error_bound, patch_embedding_torch
    g = torch.Generator().manual_seed(dim)
    maps = [torch.randn(*s, generator=g) for s in shapes]
    ours = fused(maps, dim)
    ref, _ = reference_patch_embedding(maps, dim)
    twin, _ = patch_embedding_torch(maps, dim)
    bound = embedding_error_bound(maps, dim)
    assert ours.shape == ref.shape == twin.shape
    assert (ours - ref).abs().max().item() <= bound
    assert (ours - twin).abs().max().item() <= bound


def test_fused_embedding_first_layer_is_the_authors_to_the_bit():
    """Bins summed in the authors' order and divided as torch's pooling does: the first layer's
    half of each row is their float exactly (only resampling the deeper layer may round otherwise)."""
    g = torch.Generator().manual_seed(5)
    maps = [torch.randn(2, 40, 28, 28, generator=g), torch.randn(2, 112, 14, 14, generator=g)]
    ours = fused(maps, 1024)
    ref, _ = reference_patch_embedding(maps, 1024)
    assert torch.equal(ours[:, :512], ref[:, :512])


def test_fused_embedding_same_on_every_cpu_path(monkeypatch):
    from patchcore_fast import build_info
    g = torch.Generator().manual_seed(9)
    maps = [torch.randn(3, 37, 11, 13, generator=g), torch.randn(3, 70, 6, 7, generator=g)]
    results = {}
    for path in build_info()["cpu_isa_supported"]:
        monkeypatch.setenv("PATCHCORE_CPU_ISA", path)
        results[path] = fused(maps, 300)
    first = next(iter(results.values()))
    assert all(torch.equal(first, r) for r in results.values()), list(results)


def test_fused_embedding_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(4, 24, 8, 8, generator=g), torch.randn(4, 48, 4, 4, generator=g)]
    whole = fused(maps, 256)
    one = torch.cat([fused([m[i : i + 1] for m in maps], 256) for i in range(4)])
    assert torch.equal(whole, one)


def test_patch_embedding_uses_the_kernel_and_accepts_bfloat16():
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 16, 6, 6, generator=g), torch.randn(2, 8, 3, 3, generator=g)]
    ours, grid = patch_embedding([m.bfloat16() for m in maps], 64)
    expected = fused([m.bfloat16().float() for m in maps], 64)
    assert grid == (6, 6) and ours.dtype == torch.float32 and torch.equal(ours, expected)


@pytest.mark.parametrize("maps,dim,message", [
    ([], 16, "no feature maps"),
    ([torch.zeros(1, 4, 3)], 16, "4-D float32"),
    ([torch.zeros(1, 4, 3, 3, dtype=torch.float64)], 16, "4-D float32"),
    ([torch.zeros(2, 4, 3, 3), torch.zeros(1, 4, 2, 2)], 16, "batch"),
    ([torch.zeros(1, 0, 3, 3)], 16, "empty"),
    ([torch.zeros(1, 4, 3, 3)], 0, "dim must be >= 1"),
])
def test_fused_embedding_refuses_bad_input(maps, dim, message):
    with pytest.raises(ValueError, match=message):
        fused(maps, dim)


def test_patch_embedding_refuses_no_maps():
    with pytest.raises(ValueError, match="at least one feature map"):
        patch_embedding([], 16)


def test_fused_embedding_of_no_images():
    assert fused([torch.zeros(0, 4, 3, 3), torch.zeros(0, 4, 2, 2)], 16).shape == (0, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA embedding kernel")
@pytest.mark.parametrize("shapes,dim", AWKWARD + [(BACKBONE_LAYERS[b], 1024) for b in sorted(BACKBONE_LAYERS)])
def test_cuda_embedding_within_its_bound_of_the_twin(shapes, dim):
    """The CUDA kernel (csrc/cuda/embedding_cuda.cu) on the GPU: the CPU twin's features within the
    stated bound, on awkward shapes and every backbone's layer shapes."""
    from patchcore_fast.embedding import embedding_error_bound, patch_embedding_torch
    g = torch.Generator().manual_seed(dim + len(shapes))
    maps = [torch.randn(*(s if len(s) == 4 else (2, *s)), generator=g) * 3 for s in shapes]
    ours = fused([m.cuda() for m in maps], dim)
    assert ours.is_cuda
    twin, _ = patch_embedding_torch(maps, dim)
    assert ours.shape == twin.shape
    assert (ours.cpu() - twin).abs().max().item() <= embedding_error_bound(maps, dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA embedding kernel")
def test_cuda_embedding_refuses_maps_on_two_devices():
    maps = [torch.randn(1, 8, 4, 4).cuda(), torch.randn(1, 8, 2, 2)]
    with pytest.raises(ValueError):
        fused(maps, 16)
