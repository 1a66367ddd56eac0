"""Anomaly-map overlays: a heat map blended over the image, the ground-truth contour on top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ramp for values in [0, 1] -> [..., 3] floats in [0, 1]."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0.0, 0.0, 0.5], [0.0, 0.6, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pos = v * (len(stops) - 1)
    low = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    frac = pos - low
    return stops[low[..., 0]] * (1 - frac) + stops[low[..., 0] + 1] * frac


def contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def save_overlay(path: Path, image: torch.Tensor, anomaly_map: torch.Tensor, low: float, high: float,
                 mask: torch.Tensor | None = None, score: float | None = None,
                 threshold: float | None = None) -> None:
    """image [3, H, W] in [0, 1] and its map [H, W] (NaN: not looked at, drawn grey); the map is coloured on the fixed scale [low, high] (values above
    saturate red), with a colour bar on the right, the image score on top and the ground-truth
    contour (green) when a mask is given. With a threshold, the score is also shown relative to
    it, with the decision."""
    from PIL import ImageDraw

    rgb = image.permute(1, 2, 0).cpu().numpy()
    values = anomaly_map.cpu().numpy()
    unknown = np.isnan(values)
    heat = heat_colours((np.nan_to_num(values) - low) / max(high - low, 1e-12))
    out = 0.5 * rgb + 0.5 * heat
    # Where the model did not look (outside the centre crop): the image in grey, darkened, no heat.
    out[unknown] = 0.35 * rgb[unknown].mean(axis=-1, keepdims=True)
    if mask is not None:
        out[contour(mask.cpu().numpy().astype(bool))] = (0.0, 1.0, 0.0)
    size = out.shape[0]
    # Text grows with the picture (10 px lines on a 224 px overlay, 2048 px: about 45 px).
    font, line = _font(max(10, round(max(out.shape[:2]) / 45)))
    bar_width, label_width = max(8, size // 20), 6 * line
    canvas = Image.new("RGB", (out.shape[1] + bar_width + label_width, size), (255, 255, 255))
    canvas.paste(Image.fromarray((out * 255).round().astype(np.uint8)), (0, 0))
    ramp = heat_colours(np.linspace(1, 0, size))[:, None, :].repeat(bar_width, axis=1)  # top = high
    canvas.paste(Image.fromarray((ramp * 255).round().astype(np.uint8)), (out.shape[1], 0))
    draw = ImageDraw.Draw(canvas)
    x = out.shape[1] + bar_width + 3
    for fraction, value in ((0.0, high), (0.5, (low + high) / 2), (1.0, low)):
        y = min(max(int(fraction * size) - line // 2, 0), size - line - 1)
        draw.text((x, y), _short(value), fill=(0, 0, 0), font=font)
    if score is not None:
        _label(draw, 0, f"score {_short(score)}", (0, 0, 0), font, line)
        if threshold is not None:
            anomalous = score > threshold
            text = f"{score / threshold:.2f} x threshold: {'ANOMALOUS' if anomalous else 'normal'}"
            _label(draw, line + 4, text, (200, 0, 0) if anomalous else (0, 110, 0), font, line)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _font(size: int):
    """Pillow's built-in font at `size` px (its bitmap font where scalable fonts are missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size), size
    except (TypeError, OSError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default(), 11


def _label(draw, top: int, text: str, colour, font, line: int) -> None:
    width = draw.textlength(text, font=font)
    draw.rectangle((0, top, width + 6, top + line + 3), fill=colour)
    draw.text((3, top + 1), text, fill=(255, 255, 255), font=font)


def _short(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}".replace("e+0", "e").replace("e+", "e")


def save_overlays(folder: Path, paths, names, maps: torch.Tensor, masks, transform, batch_size: int,
                  low: float, high: float, scores=None, threshold: float | None = None) -> None:
    """One overlay per image file: `paths[i]` transformed as the model saw it, `maps[i]` on the
    colour scale [low, high], `masks[i]` (or None) as a contour, `scores[i]` printed on it, saved
    as folder / names[i]."""
    from .data import iter_batches

    index = 0
    for batch in iter_batches(list(paths), transform, batch_size):
        for image in batch:
            score = None if scores is None else float(scores[index])
            save_overlay(Path(folder) / names[index], image, maps[index], low, high, masks[index], score, threshold)
            index += 1


def save_overlays_on_originals(folder: Path, paths, names, maps, masks, low: float, high: float, scores=None,
                               threshold: float | None = None) -> None:
    """As save_overlays, on each original image file at its own size: `maps[i]` [H_i, W_i] from
    Prediction.original_maps, `masks[i]` the ground-truth mask file (or None), read at full size."""
    from .data import open_image, to_rgb

    for index, path in enumerate(paths):
        img = to_rgb(open_image(Path(path)))
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mask = None
        if masks[index] is not None:
            mask = torch.from_numpy(np.asarray(Image.open(masks[index]).convert("L").resize(img.size)) > 127)
        score = None if scores is None else float(scores[index])
        save_overlay(Path(folder) / names[index], image, maps[index], low, high, mask, score, threshold)
