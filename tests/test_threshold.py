"""The decision out of the box: a threshold cross-fitted on the training images (each scored by a
bank fitted without its fold), stated with its origin, replaced by calibration; `info` shows it."""

import torch

from patchcore_fast import PatchCore, decision
from patchcore_fast.backbones import load_backbone
from patchcore_fast.cli import main

import pytest


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_folds_are_disjoint_and_each_image_is_scored_without_its_fold():
    seen = []

    def fold_index(kept):
        seen.append(set(kept))
        return frozenset(kept)

    def score_image(images, index):
        assert not set(images) & index  # the bank never holds an image it scores
        return torch.tensor(images, dtype=torch.float64)

    scores = decision.cross_fitted_scores(100, 3, fold_index, score_image)
    assert len(seen) == decision.FOLDS and len(scores) == decision.FOLDS * decision.IMAGES_PER_FOLD
    held_out = [set(range(100)) - kept for kept in seen]
    assert set().union(*held_out) == set(range(100)) and sum(map(len, held_out)) == 100  # a partition
    assert torch.equal(scores, decision.cross_fitted_scores(100, 3, fold_index, score_image))  # seeded
    assert len(decision.cross_fitted_scores(5, 0, fold_index, score_image)) == 5  # small fits score every image
    assert decision.cross_fitted_scores(1, 0, fold_index, score_image) is None


def test_default_fit_has_a_cross_fitted_threshold_equal_to_refitting(lite0):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(9, 3, 64, 64, generator=g)
    model = PatchCore(backbone=lite0, device="cpu", image_size=64, resize=64, progress=False, coreset_ratio=0.25)
    features = model.extract(images)
    model.fit_features(features)
    d = model.bank.decision
    assert d.threshold is not None and d.threshold_source.startswith("cross-fitted: quantile 0.99 of 9 training")
    assert d.threshold == pytest.approx(float(torch.quantile(d.normal_scores, decision.THRESHOLD_QUANTILE)))
    assert "threshold" in model.timings
    # the first fold's first image, scored by a model fitted from scratch on the other folds' images
    order = torch.randperm(9, generator=torch.Generator().manual_seed(model.config.seed)).tolist()
    fold = order[0::decision.FOLDS]
    kept = [i for i in range(9) if i not in fold]
    refit = model.with_settings().fit_features(features[kept])
    assert float(refit.score(features[fold[0]][None]).scores[0]) == pytest.approx(float(d.normal_scores[0]), rel=1e-6)
    # calibration replaces it, and says so
    model.calibrate(images[:4], quantile=0.5)
    assert not model.bank.decision.threshold_source.startswith("cross-fitted")
    # a model that calibrate will give a threshold can skip it: the same bank, no threshold until then
    bare = model.with_settings().fit_features(features, cross_fitted_threshold=False)
    assert torch.equal(bare.bank.index.vectors, model.bank.index.vectors)
    assert bare.bank.decision.threshold is None and bare.bank.decision.normal_scores is None
    assert "threshold" not in bare.timings
    with pytest.raises(TypeError, match="cross_fitted_threshold"):
        model.with_settings().fit(images, cross_fitted_threshold="no")


def test_info_prints_settings_bank_and_threshold(lite0, tmp_path, capsys):
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = PatchCore(backbone=lite0, device="cpu", image_size=64, resize=64, progress=False).fit(images)
    path = tmp_path / "m.pcf"
    model.save(path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0 ['blocks.4', 'blocks.10']" in out and "ratio 0.1" in out
    assert f"{len(model.bank):,} rows x 1024" in out and "cross-fitted" in out and "file format  5" in out
    assert main(["info", str(tmp_path / "missing.pcf")]) == 2
