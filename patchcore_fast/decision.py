"""Decisions on image scores: the threshold, normalised scores, calibration and the colour scale.

A fitted model keeps one `Decision`: scores of training images that the bank scoring them was
fitted without (what a good image the model has not seen scores), and a threshold with a sentence
saying how it was chosen. Out of the box the threshold comes from the training images by
cross-fitting (FOLDS folds; each fold's images scored against a bank fitted on the other folds
with the same settings; the threshold is the THRESHOLD_QUANTILE quantile of those scores);
`calibrate` replaces it with one from held-out images. The overlays' colour scale follows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .metrics import f1_optimal_threshold

#: Cross-fitting: folds of the training images, and at most this many images scored per fold (each
#: fold costs one coreset on the other folds' patches; the scores then cost little).
FOLDS = 3
IMAGES_PER_FOLD = 16
#: The default threshold: this quantile of the cross-fitted training scores (with 48 scores it lies
#: between the two highest: about one unseen good image in a hundred is flagged).
THRESHOLD_QUANTILE = 0.99


@dataclass(frozen=True)
class Decision:
    #: Image scores of up to FOLDS x IMAGES_PER_FOLD training images, each scored by a bank fitted
    #: without its fold (what a good image scores), when fitted from per-image features; else None.
    normal_scores: torch.Tensor | None = None
    threshold: float | None = None
    threshold_source: str | None = None

    def with_threshold(self, threshold: float, source: str) -> "Decision":
        if not threshold > 0:
            raise ValueError(f"the calibration images give threshold {threshold}: no usable threshold")
        return dataclasses.replace(self, threshold=float(threshold), threshold_source=source)

    def normalized(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Scores over the threshold: 1.0 is the threshold (None without one)."""
        return None if self.threshold is None else scores / self.threshold

    def is_anomalous(self, scores: torch.Tensor) -> torch.Tensor | None:
        return None if self.threshold is None else scores > self.threshold

    def colour_scale(self) -> tuple[float, float] | None:
        """The fixed scale of the model's heat maps: 0 to the threshold when there is one (red means
        at or above it), else 0 to the highest score of a good image; None when neither is known."""
        if self.threshold is not None:
            return 0.0, self.threshold
        if self.normal_scores is None or len(self.normal_scores) == 0:
            return None
        return 0.0, float(self.normal_scores.max())

    def __repr__(self) -> str:
        if self.threshold is not None:
            return f"threshold {self.threshold:.6g} ({self.threshold_source})"
        return "no threshold"


def check_quantile(quantile: float) -> float:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    return float(quantile)


def quantile_threshold(good_scores: torch.Tensor, quantile: float) -> tuple[float, str]:
    """The `quantile` of defect-free images' scores (linear interpolation between order statistics)."""
    quantile = check_quantile(quantile)
    threshold = float(torch.quantile(good_scores.double(), quantile))
    return threshold, f"quantile {quantile:g} of {len(good_scores)} good images"


def f1_threshold(good_scores: torch.Tensor, defective_scores: torch.Tensor) -> tuple[float, str]:
    """The F1-optimal threshold on labelled good and defective images' scores."""
    scores = torch.cat([good_scores.double(), defective_scores.double()])
    labels = torch.cat([torch.zeros(len(good_scores)), torch.ones(len(defective_scores))])
    threshold, f1 = f1_optimal_threshold(scores, labels)
    return threshold, (f"F1-optimal (F1 {f1:.3f}) on {len(good_scores)} good and {len(defective_scores)} "
                       "defective images")


def calibrated(current: Decision, image_scores, good_images, quantile: float,
               defective_images=None) -> Decision:
    """`current` with the threshold `calibrate` sets: the `quantile` of the scores of good images
    the model was not fitted on or, given labelled defective images too, the F1-optimal threshold
    on both. `image_scores(images)` scores images in any form predict takes."""
    quantile = check_quantile(quantile)
    good = image_scores(good_images)
    if defective_images is not None:
        threshold, source = f1_threshold(good, image_scores(defective_images))
    else:
        threshold, source = quantile_threshold(good, quantile)
    return current.with_threshold(threshold, source)


def cross_fitted_scores(num_images: int, seed: int, fold_index, score_images, progress=None) -> torch.Tensor | None:
    """Image scores of up to FOLDS x IMAGES_PER_FOLD training images, each scored against a bank
    fitted without its fold: `fold_index(kept_images)` fits one (a list of image numbers in, an
    index out), `score_images(images, index)` scores a fold's images (their scores [n]). None with
    fewer than 2 images."""
    if num_images < 2:
        return None
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    folds = [order[f::FOLDS] for f in range(min(FOLDS, num_images))]
    scores = []
    for fold in folds:
        held_out = set(fold)
        index = fold_index([i for i in range(num_images) if i not in held_out])
        scored = fold[:IMAGES_PER_FOLD]
        scores += [float(v) for v in score_images(scored, index)]
        if progress is not None:
            progress(len(scored))
    return torch.tensor(scores, dtype=torch.float64)


def fewest_kept_images(num_images: int) -> int:
    """Images in the smallest set a cross-fitting fold keeps (`cross_fitted_scores`'s folds): a fold
    whose kept patches give a coreset of no row cannot be fitted, so callers check this first."""
    folds = min(FOLDS, num_images)
    return num_images - -(-num_images // folds) if folds else 0


def cross_fitted_threshold(scores: torch.Tensor, folds: int) -> tuple[float, str]:
    threshold, _ = quantile_threshold(scores, THRESHOLD_QUANTILE)
    return threshold, (f"cross-fitted: quantile {THRESHOLD_QUANTILE:g} of {len(scores)} training images, each scored "
                       f"by a bank fitted without it ({folds} folds)")


def updated(old: Decision, new_scores: torch.Tensor | None, new_images: int) -> Decision:
    """The decision after `update` added `new_images` images whose cross-fitted scores are
    `new_scores` (None: too few to cross-fit): the scores join the old ones; a cross-fitted (or
    absent) threshold is recomputed from all of them, a calibrated one is kept (the user chose it)."""
    if new_scores is None or len(new_scores) == 0:
        return old
    scores = new_scores if old.normal_scores is None else torch.cat([old.normal_scores, new_scores])
    updated = dataclasses.replace(old, normal_scores=scores)
    if old.threshold is not None and not (old.threshold_source or "").startswith("cross-fitted"):
        return updated
    if float(scores.max()) <= 0:
        return updated
    threshold, _ = quantile_threshold(scores, THRESHOLD_QUANTILE)
    return updated.with_threshold(threshold, f"cross-fitted: quantile {THRESHOLD_QUANTILE:g} of {len(scores)} "
                                             f"training images, each scored by a bank fitted without it "
                                             f"({len(new_scores)} of them from {new_images} images added by update)")
