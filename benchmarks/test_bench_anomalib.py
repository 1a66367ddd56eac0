"""anomalib 2.7's Patchcore pieces against the same pieces on patchcore_fast (the integration's
KCenterGreedy and nearest_neighbors), on W_cpu, CPU, both cores, in one run.

The sampler comparison uses anomalib's own sparse random projection on both sides (so the picks are
the same, checked) and a fixed number of picks: anomalib's loop costs the same per pick, and a whole
10 % (3,136 picks of W_cpu's 31,360 rows) is measured too for ours.
"""

import numpy as np
import pytest
import torch

anomalib = pytest.importorskip("anomalib", reason="anomalib is not installed")

from anomalib.models.components import KCenterGreedy as AnomalibSampler  # noqa: E402
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: E402

from patchcore_fast.integrations import anomalib as integration  # noqa: E402

PICKS = 500


def picks(sampler_class, embedding, ratio):
    torch.manual_seed(0)
    np.random.seed(0)
    return sampler_class(embedding, ratio).select_coreset_idxs()


@pytest.mark.parametrize("impl", ["anomalib", "patchcore_fast"])
def test_sampler(workload, benchmark, impl):
    device, w, train, _, _ = workload
    if device.type != "cpu":
        pytest.skip("CPU comparison")
    ratio = (PICKS + 0.5) / len(train)
    sampler = AnomalibSampler if impl == "anomalib" else integration.KCenterGreedy
    benchmark.group = f"anomalib-sampler-{w.name}-{PICKS}-picks-cpu"
    benchmark.extra_info.update(anomalib=anomalib.__version__, rows=len(train), baseline=impl == "anomalib")
    result = benchmark.pedantic(picks, (sampler, train, ratio), rounds=5, iterations=1)
    assert len(result) == PICKS
    if impl == "patchcore_fast":
        assert result == picks(AnomalibSampler, train, ratio)


def test_sampler_10pct_ours(workload, benchmark):
    device, w, train, _, _ = workload
    if device.type != "cpu":
        pytest.skip("CPU comparison")
    benchmark.group = f"anomalib-sampler-{w.name}-10pct-cpu"
    benchmark.extra_info.update(anomalib=anomalib.__version__, rows=len(train))
    benchmark.pedantic(picks, (integration.KCenterGreedy, train, 0.1), rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["anomalib", "patchcore_fast"])
def test_search(workload, benchmark, impl):
    device, w, _, test, bank = workload
    if device.type != "cpu":
        pytest.skip("CPU comparison")
    model = PatchcoreModel(layers=["layer2"], backbone="resnet18", pre_trained=False)
    model.memory_bank = bank
    search = PatchcoreModel.nearest_neighbors if impl == "anomalib" else integration.nearest_neighbors
    benchmark.group = f"anomalib-search-{w.name}-k1-cpu"
    benchmark.extra_info.update(anomalib=anomalib.__version__, baseline=impl == "anomalib")
    scores, locations = benchmark.pedantic(search, (model, test, 1), rounds=3, iterations=1)
    assert locations.shape == (len(test),)
