"""Decisions on image scores: the threshold, normalised scores, calibration and the colour scale.

A fitted model keeps one `Decision`: up to NORMAL_SAMPLE leave-one-out scores of its training
images (what a good image it has not seen scores), and optionally a threshold with a sentence
saying how it was chosen. The overlays' colour scale follows from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .metrics import f1_optimal_threshold

#: Training images scored without their own patches to set the heat maps' colour scale.
NORMAL_SAMPLE = 8


@dataclass(frozen=True)
class Decision:
    #: Image scores of up to NORMAL_SAMPLE training images, each scored against the bank without
    #: its own patches (what a good image scores), when fitted from per-image features; else None.
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


def normal_sample(num_images: int, seed: int) -> list[int]:
    """The training images (a seeded sample of NORMAL_SAMPLE) scored to set the colour scale."""
    if num_images < 2:
        return []
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:NORMAL_SAMPLE].tolist()


def leave_one_out_scores(sample: list[int], image_features, source_image: torch.Tensor, index,
                         score_features, progress=None) -> torch.Tensor | None:
    """Image scores of the `sample` training images, each against the index without the rows
    picked from it (`source_image` [len(index)]: the image each bank row came from).
    `image_features(i)` gives image i's patch features [patches, D]; `score_features(features,
    index)` its image score."""
    if not sample:
        return None
    scores = []
    for image in sample:
        keep = source_image != image
        if not bool(keep.any()):  # every bank row came from this image: nothing to score it against
            continue
        scores.append(score_features(image_features(image)[None], index.subset(keep)).cpu())
        if progress is not None:
            progress(1)
    return torch.cat(scores) if scores else None
