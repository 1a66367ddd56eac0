"""Prediction: what scoring images returns, with the model's decision applied."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import _checks


@dataclass
class Prediction:
    scores: torch.Tensor  # [B] image anomaly scores
    maps: torch.Tensor | None  # [B, image_size, image_size] pixel anomaly scores (None: scores only)
    threshold: float | None = None  # the model's decision threshold, if it has one
    #: With predict(..., on_original=True): each map on its own image, [H_i, W_i], NaN where the
    #: model did not look (outside the centre crop). A tiled model's predictions always have them
    #: (and no `maps`), stitched at min(1, image_size / tile) map pixels per image pixel.
    original_maps: list[torch.Tensor] | None = None
    #: Each scored image's file path (or position among in-memory images); skipped files are absent.
    sources: list | None = None
    #: Each scored image's (width, height) as read.
    sizes: list | None = None

    @property
    def normalized(self) -> torch.Tensor | None:
        """Scores over the threshold: 1.0 is the threshold (None without one)."""
        return None if self.threshold is None else self.scores / self.threshold

    @property
    def is_anomalous(self) -> torch.Tensor | None:
        """Scores above the threshold (None without one)."""
        return None if self.threshold is None else self.scores > self.threshold

    @classmethod
    def concat(cls, parts: list["Prediction"], threshold: float | None) -> "Prediction":
        """One prediction of the parts' images, in order."""
        if not parts:
            raise ValueError("no images to score")
        joined = (lambda name: None if getattr(parts[0], name) is None else
                  [x for p in parts for x in getattr(p, name)])
        maps = None if any(p.maps is None for p in parts) else torch.cat([p.maps for p in parts])
        return cls(torch.cat([p.scores for p in parts]), maps, threshold, original_maps=joined("original_maps"),
                   sources=joined("sources"), sizes=joined("sizes"))


def gathered(scored, threshold: float | None, to_original, on_original: bool, maps: bool) -> Prediction:
    """One Prediction of the (Prediction, batch) pairs `scored` (a model's predict_batches), maps
    dropped as they come when `maps` is False; with `on_original`, each map drawn back on its image
    by `to_original(map, width, height)` where the batches did not already."""
    _checks.boolean(maps, "maps")
    _checks.boolean(on_original, "on_original")
    if on_original and not maps:
        raise ValueError("on_original draws the maps: it needs maps=True")
    parts = [part if maps else dataclasses.replace(part, maps=None, original_maps=None) for part, _ in scored]
    prediction = Prediction.concat(parts, threshold)
    if on_original and prediction.original_maps is None:
        prediction.original_maps = [to_original(m, w, h) for m, (w, h) in zip(prediction.maps, prediction.sizes)]
    return prediction
