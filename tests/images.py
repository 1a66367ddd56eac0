"""Synthetic test images: smooth random textures, with an optional bright defect."""

import numpy as np
import torch
from PIL import Image


def texture(seed: int, size=(96, 80), defect: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.random((size[1] // 8 + 1, size[0] // 8 + 1, 3))
    img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize(size, Image.BICUBIC), dtype=np.float64)
    img = 0.7 * img + 0.3 * rng.random((size[1], size[0], 3)) * 255
    if defect:
        y, x = size[1] // 3, size[0] // 3
        img[y : y + size[1] // 4, x : x + size[0] // 5] = [255, 20, 20]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def texture_batch(seeds, size=64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(texture(s, (size, size)), dtype=np.float32) / 255).permute(2, 0, 1)
                        for s in seeds])
