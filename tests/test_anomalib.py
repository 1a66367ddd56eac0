"""patchcore_fast.integrations.anomalib against real anomalib (installed by .ci/run): the same picks
as anomalib's sampler with its projection, the same search results, the same scores from an anomalib
PatchcoreModel fitted both ways."""

from pathlib import Path

import numpy as np
import pytest
import torch

anomalib = pytest.importorskip("anomalib", reason='anomalib is not installed here (pip install --no-build-isolation -e ".[anomalib]")')

from anomalib.models.components import KCenterGreedy as AnomalibSampler  # noqa: E402
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: E402

from patchcore_fast.integrations import anomalib as integration  # noqa: E402

from images import texture_batch  # noqa: E402

TIRE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec3d_rgb" / "tire"


def seeded(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def test_version_is_the_tested_one():
    assert integration._version_ok(anomalib.__version__), anomalib.__version__


@pytest.mark.parametrize("rows,dim,ratio", [(3001, 256, 0.05), (517, 64, 0.3)])
def test_same_picks_as_anomalib_with_its_projection(rows, dim, ratio):
    embedding = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows))
    seeded(1)
    expected = AnomalibSampler(embedding, ratio).select_coreset_idxs()
    seeded(1)
    ours = integration.KCenterGreedy(embedding, ratio).select_coreset_idxs()
    assert ours == expected
    seeded(1)
    assert torch.equal(integration.KCenterGreedy(embedding, ratio).sample_coreset(), embedding[expected])


def test_own_projection_is_patchcore_fast_greedy_coreset():
    import patchcore_fast

    embedding = torch.randn(800, 200, generator=torch.Generator().manual_seed(2))
    ours = integration.KCenterGreedy(embedding, 0.1, projection="patchcore_fast").select_coreset_idxs()
    assert ours == patchcore_fast.greedy_coreset(embedding, n=80).tolist()
    with pytest.raises(ValueError, match="projection"):
        integration.KCenterGreedy(embedding, 0.1, projection="pca")


@pytest.mark.parametrize("k", [1, 9])
def test_same_search_results_as_anomalib(k):
    g = torch.Generator().manual_seed(3)
    model = PatchcoreModel(layers=["layer2"], backbone="resnet18", pre_trained=False)
    model.memory_bank = torch.randn(700, 96, generator=g)
    queries = torch.randn(333, 96, generator=g)
    expected = PatchcoreModel.nearest_neighbors(model, queries, k)
    ours = integration.nearest_neighbors(model, queries, k)
    assert ours[0].shape == expected[0].shape and ours[1].shape == expected[1].shape
    assert torch.equal(ours[1], expected[1])
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-5)


def images(split):
    if TIRE.is_dir():
        from patchcore_fast.data import Transform, image_files, open_image

        transform = Transform(resize=128, crop=128, framing="whole")
        files = image_files(TIRE / "train" / "good")[:6] if split == "train" else (
            image_files(TIRE / "test" / "good")[:2] + image_files(TIRE / "test" / "cut")[:2])
        return torch.stack([transform.image(open_image(f)) for f in files])
    return texture_batch(range(6) if split == "train" else range(20, 24), size=128)


def fitted(accelerated: bool):
    torch.manual_seed(0)  # the same random backbone both ways (no weights can be downloaded here)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False).train()
    model(images("train"))
    seeded(5)
    if accelerated:
        with integration.accelerate():
            model.subsample_embedding(0.1)
    else:
        model.subsample_embedding(0.1)
    model.eval()
    if accelerated:
        with integration.accelerate():
            return model, model(images("test"))
    return model, model(images("test"))


def test_anomalib_patchcore_fitted_both_ways_scores_the_same():
    plain, expected = fitted(False)
    fast, ours = fitted(True)
    assert torch.equal(fast.memory_bank, plain.memory_bank)  # the same coreset
    # Distances come from the same expanded form in a different order: they agree to float32 rounding
    # of |q|^2 + |b|^2, which is large against these small distances (a random, untrained backbone).
    scale = float(plain.memory_bank.norm(dim=1).max()) ** 2
    torch.testing.assert_close(ours.pred_score, expected.pred_score, rtol=1e-4, atol=1e-6 * scale ** 0.5)
    torch.testing.assert_close(ours.anomaly_map, expected.anomaly_map, rtol=1e-4, atol=1e-6 * scale ** 0.5)
    # and the patch is undone
    from anomalib.models.image.patchcore import torch_model

    assert torch_model.KCenterGreedy is AnomalibSampler
    assert torch_model.PatchcoreModel.nearest_neighbors is not integration.nearest_neighbors
