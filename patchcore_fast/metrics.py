"""Anomaly detection metrics as the MVTec AD evaluation defines them, computed in torch on the
data's device: image AUROC, pixel AUROC, and PRO (per-region overlap) up to an FPR limit."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _flat(values, name: str) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    return t.reshape(-1)


def auroc(scores, labels) -> float:
    """Area under the ROC curve, equal to sklearn.metrics.roc_auc_score (ties count one half).

    Computed as the Mann-Whitney statistic from average ranks of tied groups, in float64, with
    one sort on the scores' device."""
    scores = _flat(scores, "scores")
    labels = _flat(labels, "labels").to(scores.device)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.numel()}) and labels ({labels.numel()}) differ in length")
    if not torch.isfinite(scores.double()).all():
        raise ValueError("scores contain NaN or infinite values")
    positive = labels.bool()
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError("AUROC needs both normal and anomalous samples")
    sorted_scores, order = torch.sort(scores.double())
    pos_sorted = positive[order].double()
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    mean_rank = (starts + ends + 1).double() / 2  # ranks are 1-based; a tie group shares its mean rank
    pos_cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=scores.device), torch.cumsum(pos_sorted, 0)])
    pos_in_group = pos_cum[ends] - pos_cum[starts]
    rank_sum = float((mean_rank * pos_in_group).sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def pixel_auroc(maps, masks) -> float:
    """AUROC over all pixels of all images: maps [N, H, W] scores, masks [N, H, W] (nonzero = defect)."""
    maps = maps if isinstance(maps, torch.Tensor) else torch.as_tensor(np.asarray(maps))
    masks = masks if isinstance(masks, torch.Tensor) else torch.as_tensor(np.asarray(masks))
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    return auroc(maps, masks)


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel: 1 / size of its 8-connected defect region (0 outside defects); number of regions."""
    weights = np.zeros(masks.shape, dtype=np.float64)
    regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        if count:
            sizes = np.bincount(labelled.ravel())
            per_pixel = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
            weights[i] = per_pixel
        regions += count
    return weights, regions


def pro_curve(maps, masks):
    """(FPR, PRO) at every distinct score threshold, from (0, 0) to (1, 1), as in MVTec AD's
    evaluation: regions are 8-connected components of the masks, each weighing the same; the FPR
    counts all defect-free pixels of all images."""
    maps = maps if isinstance(maps, torch.Tensor) else torch.as_tensor(np.asarray(maps))
    masks_np = (masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)) != 0
    if maps.dim() != 3 or tuple(maps.shape) != masks_np.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {masks_np.shape} must both be [N, H, W]")
    if not masks_np.any():
        raise ValueError("PRO needs at least one defect pixel in the masks")
    if masks_np.all():
        raise ValueError("PRO needs defect-free pixels in the masks")
    weights, regions = _region_weights(masks_np)
    device = maps.device
    scores = maps.reshape(-1).double()
    order = torch.argsort(scores, descending=True)
    ok = torch.as_tensor(~masks_np.reshape(-1), device=device)[order].double()
    overlap = torch.as_tensor(weights.reshape(-1), device=device)[order]
    fpr = torch.cumsum(ok, 0) / ok.sum()
    pro = torch.cumsum(overlap, 0) / regions
    sorted_scores = scores[order]
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    fpr, pro = fpr[last_of_tie].clamp(max=1.0), pro[last_of_tie].clamp(max=1.0)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    one = torch.ones(1, dtype=torch.float64, device=device)
    return torch.cat([zero, fpr, one]), torch.cat([zero, pro, one])


def area_up_to(x: torch.Tensor, y: torch.Tensor, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], interpolating y linearly at the limit."""
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    area = float((0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])).sum())
    if xs[-1] < limit:
        nxt = int(inside.sum())  # first point past the limit
        x0, x1, y0, y1 = float(x[nxt - 1]), float(x[nxt]), float(y[nxt - 1]), float(y[nxt])
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_limit) * (limit - x0)
    return area


def pro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (MVTec AD's AU-PRO)."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, overlap = pro_curve(maps, masks)
    return area_up_to(fpr, overlap, fpr_limit) / fpr_limit


def f1_optimal_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of the decision `score > threshold` (labels 1 = defective).
    Candidates are the midpoints between consecutive distinct scores (and just below the lowest);
    on equal F1 the lowest such threshold wins."""
    s = _flat(scores, "scores").double()
    y = _flat(labels, "labels").bool()
    if len(s) != len(y) or not bool(y.any()) or bool(y.all()):
        raise ValueError("need scores of both defect-free and defective images, one label per score")
    values = torch.unique(s)  # ascending
    candidates = torch.cat([values[:1] - 1e-6 * values[:1].abs().clamp_min(1.0), (values[1:] + values[:-1]) / 2])
    flagged = s[None, :] > candidates[:, None]
    tp = (flagged & y).sum(1).double()
    fp = (flagged & ~y).sum(1).double()
    fn = (~flagged & y).sum(1).double()
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = int(torch.argmax(f1))  # the first maximum: the lowest threshold
    return float(candidates[best]), float(f1[best])
