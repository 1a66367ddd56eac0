"""Prediction: what scoring images returns, with the model's decision applied."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
