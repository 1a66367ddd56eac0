"""High-resolution images in tiles: an image is cut into square tiles of `side` pixels (neighbours
sharing `overlap` pixels, the last tile of a row or column flush with the image's edge), each
tile resized to the model's S x S input, so the model sees a 2,048 px part at the resolution it
sees a 224 px part with `side` 224. Each image's tile maps are blended into one map on the image
(`Stitcher`), and its score is its highest patch score over all tiles. Memory is bounded by one
batch of tiles and the image's own map, whatever the image's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import resampling_matrix


@dataclass(frozen=True)
class Tiling:
    side: int         # tile side, in the image's own pixels
    overlap: int = 0  # pixels shared by neighbouring tiles

    def __post_init__(self):
        if isinstance(self.side, bool) or not isinstance(self.side, int) or self.side < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {self.side!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap < self.side:
            raise ValueError(f"tile_overlap must be a whole number of pixels in [0, tile), got {self.overlap!r}")

    def starts(self, length: int) -> list[int]:
        """Where the tiles along one side of `length` pixels start (one tile if it is not longer)."""
        if length <= self.side:
            return [0]
        step = self.side - self.overlap
        count = math.ceil((length - self.side) / step) + 1
        return [min(i * step, length - self.side) for i in range(count)]

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of every tile, row by row."""
        w, h = min(self.side, width), min(self.side, height)
        return [(x, y, x + w, y + h) for y in self.starts(height) for x in self.starts(width)]

    def count(self, width: int, height: int) -> int:
        return len(self.starts(width)) * len(self.starts(height))

    def describe(self) -> str:
        return f"tiles of {self.side} x {self.side} px" + (f" overlapping by {self.overlap} px" if self.overlap else "")


def tile_views(image: Image.Image | torch.Tensor, tiling: Tiling, size: int, batch: int) -> Iterator[torch.Tensor]:
    """The tiles of one image (8-bit RGB PIL image, or a float tensor [3, H, W] in [0, 1]), each
    resized to size x size, in batches [b, 3, size, size] of at most `batch` tiles."""
    width, height = (image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2]))
    boxes = tiling.boxes(width, height)
    for start in range(0, len(boxes), batch):
        views = []
        for left, top, right, bottom in boxes[start : start + batch]:
            if isinstance(image, Image.Image):
                tile = image.resize((size, size), Image.BILINEAR, box=(left, top, right, bottom), reducing_gap=None)
                views.append(torch.from_numpy(np.asarray(tile, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0)
            else:
                tile = image[None, :, top:bottom, left:right].float()
                if tile.shape[-2:] != (size, size):
                    tile = F.interpolate(tile, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                views.append(tile[0])
        yield torch.stack(views)


class Stitcher:
    """One map on a width x height image from its tiles' S x S maps, drawn at `scale` map pixels
    per image pixel. Where tiles overlap they are blended with weights that ramp linearly across
    the overlap (each tile trusted least at its own border, where its smoothing met the edge).
    The weights are products of one ramp per axis and the tiles form a grid, so the total weight
    at (y, x) is a product of two sums along the axes: one map in memory, not two."""

    def __init__(self, tiling: Tiling, width: int, height: int, scale: float = 1.0):
        self.tiling = tiling
        self.out_w, self.out_h = max(1, round(width * scale)), max(1, round(height * scale))
        self.scale = scale
        self.boxes = tiling.boxes(width, height)
        self.sum = torch.zeros(self.out_h, self.out_w)
        self.total_x = torch.zeros(self.out_w, dtype=torch.float64)
        self.total_y = torch.zeros(self.out_h, dtype=torch.float64)
        self.added = 0
        self.columns = len(tiling.starts(width))

    def _axis(self, start: float, stop: float, limit: int, samples: int):
        """For a tile spanning [start, stop) of an output axis of `limit` pixels: the pixels it
        touches [lo, hi), its bilinear resampling onto them [hi - lo, samples] (data.py's, so
        the geometry is exact at any scale) and their blending weights (0 outside the tile)."""
        lo, hi = max(0, math.floor(start)), min(limit, math.ceil(stop))
        matrix = resampling_matrix(hi - lo, samples, start - lo, stop - lo)
        centres = torch.arange(lo, hi, dtype=torch.float64) + 0.5
        ramp = max(self.tiling.overlap * self.scale, 1.0)
        weight = (torch.minimum(centres - start, stop - centres) / ramp).clamp(1e-6, 1.0)
        weight[matrix[:, 0].isnan()] = 0.0
        return lo, hi, matrix.nan_to_num(), weight

    def add(self, maps: torch.Tensor) -> None:
        """The next tiles' maps [b, S, S], in the order of `tiling.boxes`."""
        for tile_map in maps.double().cpu():
            left, top, right, bottom = self.boxes[self.added]
            x0, x1, cols, wx = self._axis(left * self.scale, right * self.scale, self.out_w, tile_map.shape[1])
            y0, y1, rows, wy = self._axis(top * self.scale, bottom * self.scale, self.out_h, tile_map.shape[0])
            self.sum[y0:y1, x0:x1] += ((rows @ tile_map @ cols.T) * (wy[:, None] * wx[None, :])).float()
            if self.added < self.columns:  # the first row of tiles holds every column once
                self.total_x[x0:x1] += wx
            if self.added % self.columns == 0:  # the first column holds every row once
                self.total_y[y0:y1] += wy
            self.added += 1

    def result(self) -> torch.Tensor:
        """The blended map [out_h, out_w] (every pixel lies in some tile)."""
        if self.added != len(self.boxes):
            raise RuntimeError(f"{self.added} of {len(self.boxes)} tiles added")
        self.sum /= self.total_y[:, None].float()
        self.sum /= self.total_x[None, :].float()
        return self.sum
