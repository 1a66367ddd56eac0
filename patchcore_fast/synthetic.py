"""A small MVTec-layout dataset with synthetic defects on real texture photos (scikit-image's
brick, grass and gravel), generated once per seed and cached: the offline demo's data.

Defects are painted with exact masks: scratches (thin lines), holes (dark ellipses), stains
(tinted blobs) and foreign patches (a piece of another texture)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = {"brick": (1.0, 0.72, 0.6), "grass": (0.75, 1.0, 0.65), "gravel": (0.95, 0.95, 1.0)}
DEFECTS = ("scratch", "hole", "stain", "patch")
VERSION = 1
SIZE = 256


def default_root(seed: int) -> Path:
    base = Path(os.environ.get("PATCHCORE_FAST_CACHE", Path.home() / ".cache" / "patchcore_fast"))
    return base / f"synthetic-v{VERSION}-seed{seed}"


def _texture(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)().astype(np.float32)


def _sample(texture: np.ndarray, tint, rng) -> np.ndarray:
    """A random 256 x 256 crop, flipped and rotated, tinted to RGB, with mild brightness jitter."""
    y, x = rng.integers(0, texture.shape[0] - SIZE + 1), rng.integers(0, texture.shape[1] - SIZE + 1)
    crop = np.rot90(texture[y : y + SIZE, x : x + SIZE], rng.integers(4))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    rgb = crop[..., None] * np.asarray(tint, np.float32) * rng.uniform(0.92, 1.08)
    return np.clip(rgb, 0, 255)


def _defect(kind: str, img: np.ndarray, other: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    mask_img = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask_img)
    cy, cx = rng.integers(48, SIZE - 48, 2)
    out = img.copy()
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.integers(50, 110)
        dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(2, 5)))
        mask = np.asarray(mask_img) > 0
        out[mask] = 235 if img.mean() < 128 else 20
    elif kind == "hole":
        ry, rx = rng.integers(7, 18, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        mask = np.asarray(mask_img) > 0
        out[mask] = out[mask] * 0.1
    elif kind == "stain":
        ry, rx = rng.integers(12, 28, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        mask = np.asarray(mask_img) > 0
        colour = np.asarray([rng.uniform(0, 80), rng.uniform(60, 160), rng.uniform(150, 255)], np.float32)
        out[mask] = 0.35 * out[mask] + 0.65 * colour
    else:  # a foreign patch
        h, w = rng.integers(24, 48, 2)
        draw.rectangle([cx - w // 2, cy - h // 2, cx - w // 2 + w - 1, cy - h // 2 + h - 1], fill=255)
        mask = np.asarray(mask_img) > 0
        out[mask] = other[mask]
    return out, mask


def generate(root: Path, seed: int = 0, train: int = 30, test_good: int = 12, per_defect: int = 5) -> Path:
    """Write the dataset under `root` (atomically: a finished dataset or none)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    textures = {name: _texture(name) for name in CATEGORIES}
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for name, tint in CATEGORIES.items():
            others = [n for n in CATEGORIES if n != name]
            base = staging / name

            def save(img, path):
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.astype(np.uint8)).save(path)

            for i in range(train):
                save(_sample(textures[name], tint, rng), base / "train" / "good" / f"{i:03d}.png")
            for i in range(test_good):
                save(_sample(textures[name], tint, rng), base / "test" / "good" / f"{i:03d}.png")
            for kind in DEFECTS:
                for i in range(per_defect):
                    other_name = others[int(rng.integers(len(others)))]
                    other = _sample(textures[other_name], CATEGORIES[other_name], rng)
                    img, mask = _defect(kind, _sample(textures[name], tint, rng), other, rng)
                    save(img, base / "test" / kind / f"{i:03d}.png")
                    save(mask.astype(np.uint8) * 255, base / "ground_truth" / kind / f"{i:03d}_mask.png")
        (staging / "COMPLETE").write_text(f"synthetic v{VERSION} seed {seed}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def dataset(seed: int = 0, root: Path | None = None) -> Path:
    """The cached dataset for `seed`, generated on first use."""
    root = Path(root) if root is not None else default_root(seed)
    if not (root / "COMPLETE").is_file():
        generate(root, seed)
    return root
