"""Coreset selection, ours against the authors' loop: 10 % of the workload, 128-d projection."""

import pytest

import patchcore_fast
from baselines import authors_coreset


@pytest.mark.parametrize("impl", ["patchcore_fast", "patchcore_fast_resident", "authors_loop"])
def test_coreset_10pct_projected(workload, timed, benchmark, impl, cuda_variant):
    device, w, train, _, _ = workload
    if impl == "patchcore_fast_resident":
        cuda_variant(device, patchcore_fast.coreset, "resident")
    benchmark.group = f"coreset-10pct-128d-{w.name}-{device.type}"
    benchmark.extra_info.update(workload=w.name, device=device.type, baseline=impl == "authors_loop")
    if impl.startswith("patchcore_fast"):
        picks = timed(device, patchcore_fast.greedy_coreset, 5, train, w.ratio)
    else:
        picks = timed(device, authors_coreset, 3 if device.type == "cpu" else 2, train, w.ratio)
    assert len(picks) == w.bank_rows
