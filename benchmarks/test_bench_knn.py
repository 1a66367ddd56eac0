"""Nearest-neighbour search of the test patches in a 10 % memory bank: ours against torch
baselines and, where installed, faiss-cpu IndexFlatL2 (same machine, same threads)."""

import functools

import pytest

import patchcore_fast
from baselines import cdist_topk, faiss_flat_l2, flat_index, matmul_min
from conftest import CPU_PATHS, cuda_only

OURS = [f"patchcore_fast_{path}" for path in CPU_PATHS] + ["patchcore_fast_cuda", "patchcore_fast_warp32x64"]


def select(impl, device, benchmark, cpu_path):
    """Our knn with the variant `impl` names; skips it on a device where it does not exist."""
    if impl == "patchcore_fast_warp32x64":
        cuda_only(device, "warp32x64")
        return functools.partial(patchcore_fast.knn, cuda_kernel="warp32x64")
    if impl == "patchcore_fast_cuda":
        cuda_only(device, "patchcore_fast_cuda")
    elif impl.startswith("patchcore_fast_") and impl.split("_")[-1] in CPU_PATHS:
        cpu_path(device, impl.split("_")[-1], benchmark)
    elif impl == "faiss_flat_l2":
        if device.type != "cpu":
            pytest.skip("faiss-cpu")
        faiss = pytest.importorskip("faiss")
        benchmark.extra_info.update(faiss_threads=faiss.omp_get_max_threads())
    return patchcore_fast.knn


@pytest.mark.parametrize("impl", OURS + ["matmul_min", "faiss_flat_l2"])
def test_knn_k1(workload, timed, benchmark, impl, cpu_path):
    device, w, _, test, bank = workload
    ours = select(impl, device, benchmark, cpu_path)
    benchmark.group = f"knn-k1-{w.name}-{device.type}"
    benchmark.extra_info.update(workload=w.name, device=device.type, baseline=not impl.startswith("patchcore_fast"))
    if impl == "faiss_flat_l2":
        d, i = timed(device, faiss_flat_l2, 5, test, flat_index(bank), 1)
    else:
        d, i = timed(device, matmul_min if impl == "matmul_min" else ours, 5, test, bank)
    assert i.shape == (w.queries, 1)


@pytest.mark.parametrize("impl", OURS + ["cdist_topk", "faiss_flat_l2"])
def test_knn_k9(workload, timed, benchmark, impl, cpu_path):
    device, w, _, test, bank = workload
    if impl == "patchcore_fast_warp32x64":
        pytest.skip("k=9 runs the default layout")
    ours = select(impl, device, benchmark, cpu_path)
    benchmark.group = f"knn-k9-{w.name}-{device.type}"
    benchmark.extra_info.update(workload=w.name, device=device.type, baseline=not impl.startswith("patchcore_fast"))
    if impl == "faiss_flat_l2":
        d, i = timed(device, faiss_flat_l2, 5, test, flat_index(bank), 9)
    elif impl == "cdist_topk":
        d, i = timed(device, cdist_topk, 5, test, bank, 9)
    else:
        d, i = timed(device, ours, 5, test, bank, 9)
    assert i.shape == (w.queries, 9)
