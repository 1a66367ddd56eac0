"""Metrics on 100 maps of 224 x 224 (5 M pixels): ours against scikit-learn's roc_auc_score."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchcore_fast import metrics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def maps_and_masks():
    rng = np.random.default_rng(0)
    masks = np.zeros((100, 224, 224), bool)
    for m in masks[50:]:
        for _ in range(3):
            y, x = rng.integers(0, 200, 2)
            m[y : y + rng.integers(4, 24), x : x + rng.integers(4, 24)] = True
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    return maps, masks, roc_auc_score(masks.ravel(), maps.ravel())


@pytest.mark.parametrize("impl", ["patchcore_fast-cpu", "sklearn"] + (["patchcore_fast-cuda"] if "cuda" in DEVICES else []))
def test_pixel_auroc_5m(benchmark, maps_and_masks, impl):
    maps, masks, expected = maps_and_masks
    benchmark.group = "pixel-auroc-5M"
    if impl == "sklearn":
        fn = lambda: roc_auc_score(masks.ravel(), maps.ravel())  # noqa: E731
    else:
        device = impl.split("-")[1]
        m, k = torch.tensor(maps, device=device), torch.tensor(masks, device=device)

        def fn():
            out = metrics.pixel_auroc(m, k)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
    value = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert abs(value - expected) < 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_pro_5m(benchmark, maps_and_masks, device):
    maps, masks, _ = maps_and_masks
    benchmark.group = "pro-5M"
    m = torch.tensor(maps, device=device)
    value = benchmark.pedantic(lambda: metrics.pro(m, masks), rounds=3, iterations=1, warmup_rounds=1)
    assert 0 <= value <= 1
