"""Feature extraction per stage, in one run: decoding and resizing, the backbone's forward, and the
locally aware embedding (the compiled kernel against its pure-torch twin, the baseline), for
EfficientNet-Lite0 (ImageNet weights, offline), resnet18 and wide_resnet50_2 (random weights:
the same arithmetic as trained ones). 64 of tire's training images at 224 px in batches of 16,
as issue 27 measures them; the machine's threads (torch.get_num_threads()).

The goal (issue 27): the embedding at most a quarter of the backbone's time for every backbone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchcore_fast.backbones import load_backbone
from patchcore_fast.data import Transform, image_files, iter_batches
from patchcore_fast.embedding import embedding_error_bound, patch_embedding, patch_embedding_torch

TIRE_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec3d_rgb" / "tire" / "train" / "good"
IMAGES, BATCH, SIZE = 64, 16, 224
BACKBONES = {"efficientnet_lite0": None, "resnet18": "random", "wide_resnet50_2": "random"}


@pytest.fixture(scope="module")
def files():
    if not TIRE_TRAIN.is_dir():
        pytest.skip(f"tire's images are not at {TIRE_TRAIN}")
    return image_files(TIRE_TRAIN)[:IMAGES]


@pytest.fixture(scope="module")
def batches(files):
    return list(iter_batches(files, Transform(256, SIZE, "center_crop"), BATCH))


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request, batches):
    """(name, extractor, feature maps of every batch)."""
    extractor = load_backbone(request.param, weights=BACKBONES[request.param], image_size=SIZE).eval()
    with torch.no_grad():
        maps = [extractor(b) for b in batches]
    return request.param, extractor, maps


def test_decode(benchmark, files):
    benchmark.group = f"features-decode-{IMAGES}-images"
    benchmark.extra_info.update(images=IMAGES, threads=torch.get_num_threads())
    benchmark.pedantic(lambda: list(iter_batches(files, Transform(256, SIZE, "center_crop"), BATCH)), rounds=3,
                       iterations=1)


@pytest.mark.parametrize("stage", ["backbone", "embedding-torch", "embedding-fused"])
def test_stage(benchmark, batches, backbone, stage):
    name, extractor, maps = backbone
    benchmark.group = f"features-{name}-{IMAGES}-images"
    benchmark.extra_info.update(images=IMAGES, batch=BATCH, threads=torch.get_num_threads(),
                                baseline=stage == "embedding-torch",
                                layers=[list(m.shape[1:]) for m in maps[0]])
    if stage == "backbone":
        def run():
            with torch.no_grad():
                return [extractor(b) for b in batches]
    else:
        embed = patch_embedding_torch if stage == "embedding-torch" else patch_embedding
        def run():
            return [embed(m, 1024)[0] for m in maps]
    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    if stage == "embedding-fused":  # the kernel's features are the twin's (within the stated bound)
        for m, ours in zip(maps, out):
            twin, _ = patch_embedding_torch(m, 1024)
            assert (ours - twin).abs().max().item() <= embedding_error_bound(m, 1024)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_embedding_cuda(benchmark, backbone, impl):
    """The embedding on a GPU: the CUDA kernel against the pure-torch twin on the same device, the
    feature maps already there (the backbone's output); synchronised, after a warm-up round."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    name, _, maps = backbone
    maps = [[m.cuda() for m in batch] for batch in maps]
    benchmark.group = f"features-{name}-{IMAGES}-images-embedding-cuda"
    benchmark.extra_info.update(images=IMAGES, batch=BATCH, baseline=impl == "torch",
                                device=torch.cuda.get_device_name())
    embed = patch_embedding_torch if impl == "torch" else patch_embedding

    def run():
        out = [embed(m, 1024)[0] for m in maps]
        torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    if impl == "fused":
        for m, ours in zip(maps, out):
            twin, _ = patch_embedding_torch([x.cpu() for x in m], 1024)
            assert (ours.cpu() - twin).abs().max().item() <= embedding_error_bound(m, 1024)
