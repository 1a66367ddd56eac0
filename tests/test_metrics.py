"""Metrics against scikit-learn and a deliberately plain PRO (every unique score a threshold)."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore_fast import metrics


def plain_pro(maps, masks, limit=0.3):
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks) != 0
    regions = []
    for image, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [image[labelled == r] for r in range(1, count + 1)]
    ok_scores = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(np.mean(ok_scores >= t))
        ys.append(np.mean([np.mean(r >= t) for r in regions]))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_at) / 2
            break
    return area / limit


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_sklearn(device, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(3001) < 0.3
    scores = np.round(rng.normal(size=3001) + labels, 1)  # many ties
    ours = metrics.auroc(torch.tensor(scores, device=device), torch.tensor(labels, device=device))
    assert abs(ours - roc_auc_score(labels, scores)) < 1e-9


def test_pixel_auroc_equals_sklearn(device):
    rng = np.random.default_rng(1)
    masks = rng.random((4, 32, 32)) < 0.1
    maps = rng.random((4, 32, 32)).astype(np.float32) + masks * 0.3
    ours = metrics.pixel_auroc(torch.tensor(maps, device=device), torch.tensor(masks, device=device))
    assert abs(ours - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-9


def random_masks(rng, n, size, blobs):
    masks = np.zeros((n, size, size), bool)
    for m in masks[1:]:  # the first image is defect-free
        for _ in range(rng.integers(1, blobs + 1)):
            y, x = rng.integers(0, size, 2)
            h, w = rng.integers(1, 6, 2)
            m[y : y + h, x : x + w] = True
    masks[1, 0, :] = True          # a region along the border
    masks[2, size - 1, size - 1] = True  # a one-pixel region in a corner
    return masks


@pytest.mark.parametrize("seed", range(3))
def test_pro_equals_the_plain_definition(device, seed):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 5, 24, blobs=6)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2)  # ties too
    ours = metrics.pro(torch.tensor(maps, device=device), torch.tensor(masks))
    assert abs(ours - plain_pro(maps, masks)) < 1e-9
    for limit in (0.05, 1.0):
        assert abs(metrics.pro(torch.tensor(maps), masks, limit) - plain_pro(maps, masks, limit)) < 1e-9


def test_pro_of_constant_and_perfect_maps():
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 3, 16, blobs=3)
    constant = np.zeros(masks.shape)
    assert abs(metrics.pro(constant, masks) - plain_pro(constant, masks)) < 1e-12
    assert metrics.pro(masks.astype(float), masks) == pytest.approx(1.0)


def test_metric_errors():
    with pytest.raises(ValueError, match="defect pixel"):
        metrics.pro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="both normal and anomalous"):
        metrics.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="differ"):
        metrics.auroc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_f1_optimal_threshold_separates_and_is_the_best_possible():
    from patchcore_fast.metrics import f1_optimal_threshold

    threshold, f1 = f1_optimal_threshold(torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0]), torch.tensor([0, 0, 0, 1, 1]))
    assert 3.0 < threshold < 10.0 and f1 == 1.0
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.randn(40, generator=g), torch.randn(15, generator=g) + 1.5])
    labels = torch.cat([torch.zeros(40), torch.ones(15)]).bool()
    threshold, f1 = f1_optimal_threshold(scores, labels)
    flagged = scores > threshold
    tp, fp, fn = (flagged & labels).sum(), (flagged & ~labels).sum(), (~flagged & labels).sum()
    assert f1 == pytest.approx(float(2 * tp / (2 * tp + fp + fn)))
    for t in torch.cat([scores - 1e-4, scores + 1e-4]):  # no threshold does better
        f = scores > t
        tp, fp, fn = (f & labels).sum(), (f & ~labels).sum(), (~f & labels).sum()
        assert float(2 * tp / (2 * tp + fp + fn)) <= f1 + 1e-6  # float32 division
    with pytest.raises(ValueError, match="both"):
        f1_optimal_threshold(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
