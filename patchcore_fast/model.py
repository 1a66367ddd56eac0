"""PatchCore: fit a memory bank on defect-free images, score new images and pixels."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .anomaly_map import anomaly_maps
from .backbones import BackboneSpec, load_backbone
from .coreset import greedy_coreset
from .data import Transform, count_images, iter_batches
from .embedding import patch_embedding
from .knn import knn

FORMAT_VERSION = 1


@dataclass
class Prediction:
    scores: torch.Tensor  # [B] image anomaly scores
    maps: torch.Tensor    # [B, image_size, image_size] pixel anomaly scores


class _StageTimer:
    """Adds the wall time of a `with` block to timings[stage], waiting for GPU work inside it."""

    def __init__(self, timings, stage, device):
        self.timings, self.stage, self.device = timings, stage, device

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[self.stage] += time.perf_counter() - self.start


class PatchCore:
    """PatchCore as in the authors' released code (amazon-science/patchcore-inspection).

    Defaults reproduce their setup: WideResNet-50 layers 2 and 3, 1024-d locally aware patch
    features, a 10 % greedy coreset on a 128-d random projection, nearest-neighbour squared L2
    scores, image score = largest patch score, maps upsampled and smoothed with sigma 4.
    `reweight=True` applies the paper's Eq. 7 to image scores (not in the authors' code).
    `half_precision=True` runs the backbone in bfloat16 (channels_last on CUDA); patch features,
    the coreset and the scores stay float32.
    """

    def __init__(self, backbone: str = "wide_resnet50_2", layers=None, coreset_ratio: float = 0.1,
                 projection_dim: int | None = 128, num_neighbors: int = 1, reweight: bool = False,
                 image_size: int = 224, resize: int = 256, device=None, weights: str | None = None,
                 embed_dim: int = 1024, batch_size: int = 16, seed: int = 0, reweight_neighbors: int = 9,
                 half_precision: bool = False, progress: bool = True, skip_bad_images: bool = False,
                 _extractor=None):
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        for name, value in (("num_neighbors", num_neighbors), ("embed_dim", embed_dim), ("batch_size", batch_size),
                            ("reweight_neighbors", reweight_neighbors)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.transform = Transform(resize=resize, crop=image_size)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.settings = dict(coreset_ratio=coreset_ratio, projection_dim=projection_dim, num_neighbors=num_neighbors,
                             reweight=reweight, reweight_neighbors=reweight_neighbors, image_size=image_size,
                             resize=resize, embed_dim=embed_dim, seed=seed)
        self.batch_size = batch_size
        self.progress = progress
        self.skip_bad_images = skip_bad_images
        self.half_precision = bool(half_precision)
        self.extractor = _extractor or load_backbone(backbone, layers, weights, image_size, seed)
        self.extractor = self.extractor.to(self.device)
        if self.half_precision:
            self.extractor = self.extractor.to(dtype=torch.bfloat16)
            if self.device.type == "cuda":
                self.extractor = self.extractor.to(memory_format=torch.channels_last)
        self.memory_bank: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None
        #: Seconds spent per stage (features, coreset, search, maps), accumulated over calls.
        self.timings: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ features
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> patch features [B, h * w, embed_dim] (float32)."""
        images = images.to(self.device, non_blocking=True)
        if self.half_precision:
            images = images.to(torch.bfloat16)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
        features, grid = patch_embedding(self.extractor(images), self.settings["embed_dim"])
        self.grid = grid
        return features.reshape(len(images), grid[0] * grid[1], -1)

    def _batches(self, data, desc, total=None):
        batches = iter_batches(data, self.transform, self.batch_size, self.skip_bad_images)
        return tqdm(batches, desc=desc, total=None if total is None else -(-total // self.batch_size),
                    disable=not self.progress, unit="batch")

    def _timed(self, stage: str):
        return _StageTimer(self.timings, stage, self.device)

    @torch.no_grad()
    def extract(self, data, desc: str = "features") -> torch.Tensor:
        """Patch features [images, patches, embed_dim] of images in any accepted form. When the number
        of images is known up front, they are written into one preallocated tensor."""
        total = count_images(data)
        out, chunks, filled = None, [], 0
        with self._timed("features"):
            for batch in self._batches(data, desc, total):
                features = self.embed(batch)
                if total is not None:
                    if out is None:
                        out = torch.empty(total, *features.shape[1:], device=self.device)
                    out[filled : filled + len(features)] = features
                else:
                    chunks.append(features)
                filled += len(features)
        if filled == 0:
            raise ValueError("no images")
        return out[:filled] if out is not None else torch.cat(chunks)

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(self, data) -> "PatchCore":
        """Build the memory bank from defect-free images (folder, paths, PIL images, tensor, DataLoader)."""
        return self.fit_features(self.extract(data))

    @torch.no_grad()
    def fit_features(self, features: torch.Tensor) -> "PatchCore":
        """Build the memory bank from patch features [images, patches, dim] (or [rows, dim])."""
        features = features.reshape(-1, features.shape[-1])
        with self._timed("coreset"), tqdm(total=1, desc="coreset", disable=not self.progress) as bar:
            picks = greedy_coreset(features, self.settings["coreset_ratio"],
                                   projection_dim=self.settings["projection_dim"], seed=self.settings["seed"])
            bar.update()
        self.memory_bank = features[picks].contiguous()
        return self

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, data) -> Prediction:
        """Image scores [B] and pixel maps [B, S, S] for images in any form `fit` accepts."""
        self._check_fitted()
        parts = []
        for batch in self._batches(data, "scoring", count_images(data)):
            with self._timed("features"):
                features = self.embed(batch)
            parts.append(self.score(features))
        if not parts:
            raise ValueError("no images to score")
        return Prediction(torch.cat([p.scores for p in parts]), torch.cat([p.maps for p in parts]))

    @torch.no_grad()
    def score(self, features: torch.Tensor, batch_size: int = 64) -> Prediction:
        """Scores and maps (on the CPU) for patch features [images, patches, dim] from `extract`."""
        self._check_fitted()
        scores, maps = [], []
        k = min(self.settings["num_neighbors"], len(self.memory_bank))
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size].to(self.device)
            b, patches, dim = chunk.shape
            with self._timed("search"):
                distances, indices = knn(chunk.reshape(-1, dim), self.memory_bank, k)
                patch_scores = distances.mean(dim=1).reshape(b, patches)  # the authors average over k
                image_scores, worst = patch_scores.max(dim=1)
                if self.settings["reweight"]:
                    rows = torch.arange(b, device=chunk.device)
                    nearest = indices.reshape(b, patches, k)[rows, worst, 0]
                    image_scores = image_scores * self._reweight(chunk[rows, worst], nearest)
            with self._timed("maps"):
                maps.append(anomaly_maps(patch_scores.reshape(b, *self.grid), self.settings["image_size"]).cpu())
            scores.append(image_scores.cpu())
        return Prediction(torch.cat(scores), torch.cat(maps))

    def _check_fitted(self):
        if self.memory_bank is None:
            raise RuntimeError("fit() or PatchCore.load() first: the model has no memory bank")

    def _reweight(self, worst_features: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7: 1 - softmax over the L2 distances from the worst patch to the b bank neighbours of its
        nearest bank entry (that entry first)."""
        b = min(self.settings["reweight_neighbors"], len(self.memory_bank))
        _, support = knn(self.memory_bank[nearest], self.memory_bank, b)
        distances = (worst_features[:, None, :] - self.memory_bank[support]).norm(dim=-1)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Memory bank (safetensors) and settings with backbone identity (JSON metadata) in one
        file, written atomically."""
        from safetensors.torch import save_file

        if self.memory_bank is None:
            raise RuntimeError("nothing to save: fit() first")
        path = Path(path)
        meta = {"format_version": FORMAT_VERSION, "patchcore_fast": __version__, "settings": self.settings,
                "backbone": self.extractor.spec.to_dict(), "grid": list(self.grid)}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
        os.close(fd)
        try:
            save_file({"memory_bank": self.memory_bank.float().cpu().contiguous()}, tmp,
                      metadata={"patchcore_fast": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path, device=None, progress: bool = True) -> "PatchCore":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["patchcore_fast"])
                bank = f.get_tensor("memory_bank")
        except Exception as error:
            raise ValueError(f"{path} is not a readable patchcore_fast model ({type(error).__name__}: {error})") from error
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has model format version {meta.get('format_version')}; this patchcore_fast "
                             f"({__version__}) reads version {FORMAT_VERSION}")
        spec = BackboneSpec.from_dict(meta["backbone"])
        s = meta["settings"]
        extractor = load_backbone(spec.name, spec.layers, spec.weights, s["image_size"], spec.seed)
        if spec.weights_sha256 and extractor.spec.weights_sha256 != spec.weights_sha256:
            raise ValueError(f"the backbone weights {spec.weights} differ from those the model in {path} was fitted with")
        model = cls(backbone=spec.name, layers=spec.layers, device=device, progress=progress, _extractor=extractor, **s)
        model.memory_bank = bank.to(model.device)
        model.grid = tuple(meta["grid"])
        return model
