"""Nearest-neighbour search of the test patches in a 10 % memory bank: ours against torch baselines."""

import sys

import pytest

import patchcore_fast
from baselines import cdist_topk, matmul_min

knn_module = sys.modules["patchcore_fast.knn"]


@pytest.mark.parametrize("impl", ["patchcore_fast", "patchcore_fast_warp32x64", "matmul_min"])
def test_knn_k1(workload, timed, benchmark, impl, cuda_variant):
    device, w, _, test, bank = workload
    if impl == "patchcore_fast_warp32x64":
        cuda_variant(device, knn_module, "warp32x64")
    benchmark.group = f"knn-k1-{w.name}-{device.type}"
    benchmark.extra_info.update(workload=w.name, device=device.type, baseline=impl == "matmul_min")
    fn = matmul_min if impl == "matmul_min" else patchcore_fast.knn
    d, i = timed(device, fn, 5, test, bank)
    assert i.shape == (w.queries, 1)


@pytest.mark.parametrize("impl", ["patchcore_fast", "cdist_topk"])
def test_knn_k9(workload, timed, benchmark, impl):
    device, w, _, test, bank = workload
    benchmark.group = f"knn-k9-{w.name}-{device.type}"
    benchmark.extra_info.update(workload=w.name, device=device.type, baseline=impl != "patchcore_fast")
    if impl == "patchcore_fast":
        d, i = timed(device, patchcore_fast.knn, 5, test, bank, 9)
    else:
        d, i = timed(device, cdist_topk, 5, test, bank, 9)
    assert i.shape == (w.queries, 9)
