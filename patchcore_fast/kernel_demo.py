"""Kernel demo: the coreset and knn kernels against their pure-torch references on random features."""

from __future__ import annotations

import time

import torch

from ._extension import build_info
from .coreset import greedy_coreset
from .knn import knn
from .coreset import seeded_start
from .reference import greedy_coreset_reference, knn_reference


def _timed(fn, device):
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def demo(train_images: int, test_images: int, device: torch.device) -> None:
    """One small category's worth of random 1024-d patch features (784 per image)."""
    print(f"build: {build_info()}")
    g = torch.Generator().manual_seed(0)
    train = torch.randn(train_images * 784, 1024, generator=g).abs_().to(device)
    test = torch.randn(test_images * 784, 1024, generator=g).abs_().to(device)
    print(f"device {device}: {len(train)} training patches, {len(test)} test patches, dim 1024")

    picks, ours = _timed(lambda: greedy_coreset(train, 0.1), device)
    space, initial = seeded_start(train)
    ref_picks, ref = _timed(lambda: greedy_coreset_reference(space, initial, len(picks)), device)
    same = (picks == ref_picks).float().mean().item()
    print(f"coreset 10% (128-d): patchcore_fast {ours * 1e3:8.1f} ms | authors' loop {ref * 1e3:8.1f} ms "
          f"| x{ref / ours:.1f} | same picks at {same:.1%} of positions")

    bank = train[picks]
    (d, i), ours = _timed(lambda: knn(test, bank, 1), device)
    (rd, ri), ref = _timed(lambda: knn_reference(test, bank, 1), device)
    print(f"knn k=1:             patchcore_fast {ours * 1e3:8.1f} ms | torch brute force {ref * 1e3:8.1f} ms "
          f"| x{ref / ours:.1f} | same neighbour for {(i == ri).float().mean().item():.2%} of queries")
