"""Real patch features for the benchmarks: tire's training images (MVTec 3D-AD RGB, in
../shared/data) through EfficientNet-Lite0, extracted once and cached outside the repository.

164,640 rows x 1024 (210 images x 784 patches), 0.67 GB of float32. The cache lives in
$PATCHCORE_BENCH_CACHE or ~/.cache/patchcore_fast (never in the project tree).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TIRE_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec3d_rgb" / "tire" / "train" / "good"


def cache_dir() -> Path:
    return Path(os.environ.get("PATCHCORE_BENCH_CACHE", Path.home() / ".cache" / "patchcore_fast"))


def tire_features() -> torch.Tensor | None:
    """[164640, 1024] float32 features of tire/train/good, or None where the data is absent."""
    return _cached("tire_train_efficientnet_lite0_center_crop.pt", [TIRE_TRAIN])


def tire_test_features() -> torch.Tensor | None:
    """[87808, 1024] float32 features of every tire/test image (112 x 784 patches), as `evaluate`
    searches them, or None where the data is absent."""
    test = TIRE_TRAIN.parent.parent / "test"
    folders = sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []
    return _cached("tire_test_efficientnet_lite0_center_crop.pt", folders)


def _cached(name: str, folders: list[Path]) -> torch.Tensor | None:
    path = cache_dir() / name
    if path.exists():
        return torch.load(path)
    if not folders or not all(f.is_dir() for f in folders):
        return None
    from patchcore_fast import PatchCore

    model = PatchCore(backbone="efficientnet_lite0", framing="center_crop", device="cpu", progress=False)
    features = torch.cat([model.extract(f).reshape(-1, model.config.embed_dim) for f in folders]).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(features, tmp)
    tmp.replace(path)
    return features
