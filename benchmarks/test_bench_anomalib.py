"""anomalib 2.7's Patchcore pieces against the same pieces on patchcore_fast (the integration's
KCenterGreedy and nearest_neighbors), on W_cpu, CPU, both cores, in one run; and a whole fit side
by side (tire's 210 training images, resnet18 with random weights, layers 2 and 3, 10 %).

The sampler comparison uses anomalib's own sparse random projection on both sides (so the picks are
the same, checked) and a fixed number of picks: anomalib's loop costs the same per pick, and a whole
10 % (3,136 picks of W_cpu's 31,360 rows) is measured too for ours.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

anomalib = pytest.importorskip("anomalib", reason="anomalib is not installed")

from anomalib.models.components import KCenterGreedy as AnomalibSampler  # noqa: E402
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: E402

from patchcore_fast import PatchCore  # noqa: E402
from patchcore_fast.backbones import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from patchcore_fast.data import Transform, iter_batches  # noqa: E402
from patchcore_fast.integrations import anomalib as integration  # noqa: E402

TIRE_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec3d_rgb" / "tire" / "train" / "good"

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


def fit_anomalib_with_our_kernels():
    """anomalib's PatchcoreModel fitted as its Lightning module does (train mode: each batch's
    embedding stored, then the coreset), on the same decoded images as ours, with our kernels."""
    torch.manual_seed(0)
    np.random.seed(0)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False).train()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    with integration.accelerate(), torch.no_grad():
        for batch in iter_batches(TIRE_TRAIN, Transform(256, 224, "center_crop"), 32):  # anomalib's batch
            model((batch - mean) / std)
        model.subsample_embedding(0.1)
    return {"bank": list(model.memory_bank.shape)}


def fit_patchcore_fast(cross_fitted_threshold=True):
    model = PatchCore(backbone="resnet18", weights="random", framing="center_crop", device="cpu", progress=False)
    model.fit(TIRE_TRAIN, cross_fitted_threshold=cross_fitted_threshold)
    return {"bank": [len(model.bank), model.config.embed_dim], **{k: round(v, 3) for k, v in model.timings.items()}}


# anomalib's fit computes no threshold (its Engine takes one from a validation pass afterwards), so
# "patchcore_fast-no-threshold" (the bank alone, as `fit --calibrate` builds it) is the like-for-like
# row; "patchcore_fast" is the default fit with its cross-fitted threshold.
@pytest.mark.parametrize("impl", ["anomalib-with-our-kernels", "patchcore_fast", "patchcore_fast-no-threshold"])
def test_fit_side_by_side(benchmark, impl):
    if not TIRE_TRAIN.is_dir():
        pytest.skip(f"tire's images are not at {TIRE_TRAIN}")
    benchmark.group = "fit-tire-resnet18-random-10pct-cpu"
    baseline = impl == "anomalib-with-our-kernels"
    benchmark.extra_info.update(anomalib=anomalib.__version__, threads=torch.get_num_threads(), baseline=baseline)
    fit = fit_anomalib_with_our_kernels if baseline else fit_patchcore_fast
    kwargs = {} if baseline else {"cross_fitted_threshold": impl == "patchcore_fast"}
    result = benchmark.pedantic(fit, kwargs=kwargs, rounds=3, iterations=1)
    benchmark.extra_info.update(result)  # the last round's bank shape (and our stage times)
