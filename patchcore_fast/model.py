"""PatchCore: fit a memory bank on defect-free images, score new images and pixels."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import distributed
from .anomaly_map import anomaly_maps
from .backbones import FeatureExtractor, load_backbone
from .config import PatchCoreConfig
from .coreset import DEFAULT_CUDA_KERNEL as DEFAULT_CORESET_KERNEL
from .coreset import coreset_size, greedy_coreset
from .data import count_images, expand_images, image_sizes, iter_batches
from .embedding import patch_embedding
from .errors import UserError
from .knn import DEFAULT_CUDA_KERNEL as DEFAULT_KNN_KERNEL
from .memory_bank import FORMAT_VERSION, MemoryBank  # noqa: F401  (FORMAT_VERSION: the file format written)
from .metrics import f1_optimal_threshold
from .search_index import PROBES, SearchIndex


@dataclass
class Prediction:
    scores: torch.Tensor  # [B] image anomaly scores
    maps: torch.Tensor    # [B, image_size, image_size] pixel anomaly scores
    threshold: float | None = None  # the model's calibrated decision threshold, if it has one
    #: With predict(..., on_original=True): each map on its own image, [H_i, W_i], NaN where the
    #: model did not look (outside the centre crop).
    original_maps: list[torch.Tensor] | None = None

    @property
    def normalized(self) -> torch.Tensor | None:
        """Scores over the threshold: 1.0 is the threshold (None for an uncalibrated model)."""
        return None if self.threshold is None else self.scores / self.threshold

    @property
    def is_anomalous(self) -> torch.Tensor | None:
        """Scores above the threshold (None for an uncalibrated model)."""
        return None if self.threshold is None else self.scores > self.threshold


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

    State: `config` (PatchCoreConfig, immutable: everything that changes features or scores),
    `extractor` (the backbone it names) and, once fitted, `bank` (MemoryBank). `backbone` may be
    a name or an already loaded FeatureExtractor (load_backbone), shared between models.
    """

    def __init__(self, backbone: str | FeatureExtractor = "wide_resnet50_2", layers=None, coreset_ratio: float = 0.1,
                 framing: str = "whole",
                 projection_dim: int | None = 128, num_neighbors: int = 1, reweight: bool = False,
                 image_size: int = 224, resize: int = 256, device=None, weights: str | None = None,
                 embed_dim: int = 1024, batch_size: int = 16, seed: int = 0, reweight_neighbors: int = 9,
                 half_precision: bool = False, progress: bool = True, skip_bad_images: bool = False,
                 coreset_cuda_kernel: str = DEFAULT_CORESET_KERNEL, knn_cuda_kernel: str = DEFAULT_KNN_KERNEL,
                 pruned_search: bool = True):
        if isinstance(backbone, FeatureExtractor):
            if layers is not None or weights is not None:
                raise ValueError("layers and weights belong to load_backbone when backbone is a loaded FeatureExtractor")
            extractor = backbone
        else:
            extractor = load_backbone(backbone, layers, weights, image_size, seed)
        config = PatchCoreConfig(backbone=extractor.spec, framing=framing, image_size=image_size, resize=resize,
                                 embed_dim=embed_dim,
                                 half_precision=bool(half_precision), coreset_ratio=coreset_ratio,
                                 projection_dim=projection_dim, num_neighbors=num_neighbors, reweight=reweight,
                                 reweight_neighbors=reweight_neighbors, seed=seed,
                                 coreset_cuda_kernel=coreset_cuda_kernel, knn_cuda_kernel=knn_cuda_kernel,
                                 pruned_search=pruned_search)
        self._setup(config, extractor, device, batch_size, progress, skip_bad_images)

    @classmethod
    def from_config(cls, config: PatchCoreConfig, extractor: FeatureExtractor | None = None, device=None,
                    batch_size: int = 16, progress: bool = True, skip_bad_images: bool = False) -> "PatchCore":
        """A model for `config`; its backbone is loaded (and its weights' SHA-256 checked) unless given."""
        spec = config.backbone
        if extractor is None:
            extractor = load_backbone(spec.name, spec.layers, spec.weights, config.image_size, spec.seed)
        if extractor.spec != spec:
            what = "weights" if extractor.spec.weights_sha256 != spec.weights_sha256 else "backbone"
            raise ValueError(f"the {what} differ from those the config names: {extractor.spec} vs {spec}")
        model = cls.__new__(cls)
        model._setup(config, extractor, device, batch_size, progress, skip_bad_images)
        return model

    def _setup(self, config, extractor, device, batch_size, progress, skip_bad_images):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.config = config
        self.transform = config.transform
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.progress = progress
        self.skip_bad_images = skip_bad_images
        self.extractor = _prepared(extractor, self.device, config.half_precision)
        self.bank: MemoryBank | None = None
        self._grid: tuple[int, int] | None = None
        #: Seconds spent per stage (features, coreset, search, maps), accumulated over calls.
        self.timings: dict[str, float] = defaultdict(float)

    def with_settings(self, **changes) -> "PatchCore":
        """An unfitted model with some scoring settings changed (coreset_ratio, projection_dim,
        num_neighbors, reweight, reweight_neighbors, seed, pruned_search, the CUDA kernels), sharing this one's
        backbone. Settings that change the features need a new model."""
        feature_fields = {"backbone", "framing", "image_size", "resize", "embed_dim", "half_precision"}
        if feature_fields & set(changes):
            raise ValueError(f"{sorted(feature_fields & set(changes))} change the features: build a new PatchCore")
        model = PatchCore.from_config(self.config.replace(**changes), self.extractor, self.device, self.batch_size,
                                      self.progress, self.skip_bad_images)
        model._grid = self._grid
        return model

    @property
    def memory_bank(self) -> torch.Tensor | None:
        """The bank's features [M, embed_dim], or None before fitting."""
        return None if self.bank is None else self.bank.features

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of one image: fixed by the backbone and the image size."""
        if self._grid is None:
            probe = torch.zeros(1, 3, self.config.image_size, self.config.image_size)
            with torch.no_grad():
                self.embed(probe)
        return self._grid

    # ------------------------------------------------------------------ features
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> patch features [B, h * w, embed_dim] (float32)."""
        images = images.to(self.device, non_blocking=True)
        if self.config.half_precision:
            images = images.to(torch.bfloat16)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
        features, grid = patch_embedding(self.extractor(images), self.config.embed_dim)
        self._grid = tuple(grid)
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
        """Build the memory bank from defect-free images (folder, paths, PIL images, tensor, DataLoader).
        Inside a process group (torchrun) each rank embeds its share and the bank is sharded."""
        if distributed.active():
            return self.fit_features(self._extract_share(self._share(data, "fit")))
        return self.fit_features(self.extract(data))

    def _extract_share(self, share) -> torch.Tensor:
        """Features of this rank's share of the images; none ([0, patches, dim]) for an empty share."""
        if len(share):
            return self.extract(share)
        return torch.empty(0, self.grid[0] * self.grid[1], self.config.embed_dim, device=self.device)

    def _share(self, data, what: str):
        """This rank's contiguous share of `data`'s images (a list of items or a tensor batch)."""
        if isinstance(data, torch.Tensor):
            batch = data[None] if data.dim() == 3 else data
            start, stop = distributed.shard(len(batch), unit=self.batch_size)
            return batch[start:stop]
        if not isinstance(data, (str, Path, list, tuple, Image.Image)):
            raise UserError(f"under torchrun, {what} takes a folder, a list of images or a tensor batch "
                            "(each rank takes its share of them)")
        items = expand_images(data)
        start, stop = distributed.shard(len(items), unit=self.batch_size)
        return items[start:stop]

    @torch.no_grad()
    def fit_features(self, features: torch.Tensor) -> "PatchCore":
        """Build the memory bank from patch features [images, patches, dim] (or [rows, dim]) from `extract`."""
        c = self.config
        if features.dim() not in (2, 3) or features.shape[-1] != c.embed_dim:
            raise ValueError(f"features must be [images, patches, {c.embed_dim}] or [rows, {c.embed_dim}], "
                             f"got {tuple(features.shape)}")
        if features.dim() == 3 and features.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"features have {features.shape[1]} patches per image; this model's images give "
                             f"{self.grid[0]} x {self.grid[1]}")
        per_image = features if features.dim() == 3 else None
        features = features.reshape(-1, features.shape[-1])
        sharded = distributed.active()  # `features` are this rank's share; picks are global rows
        counts = distributed.row_counts(len(features), "counting rows") if sharded else [len(features)]
        size = coreset_size(sum(counts), c.coreset_ratio)
        with self._timed("coreset"), tqdm(total=size, desc="coreset", unit="pick", disable=not self.progress) as bar:
            if sharded:
                picks = distributed.greedy_coreset(features.cpu(), c.coreset_ratio, projection_dim=c.projection_dim,
                                                   seed=c.seed, progress=lambda done: bar.update(done - bar.n))
            else:
                picks = greedy_coreset(features, c.coreset_ratio, projection_dim=c.projection_dim, seed=c.seed,
                                       cuda_kernel=c.coreset_cuda_kernel, progress=lambda done: bar.update(done - bar.n))
            bar.update(size - bar.n)
        if sharded:
            offset = sum(counts[: distributed.rank_and_size()[0]])
            ids = ((picks >= offset) & (picks < offset + len(features))).nonzero().flatten()
            bank = distributed.ShardedBank(features[(picks[ids] - offset).to(features.device)].contiguous(), self.grid,
                                           c, ids=ids, total=len(picks))
        else:
            bank = MemoryBank(features[picks].contiguous(), self.grid, c)
        if c.pruned_search and bank.features.device.type == "cpu" and not sharded:
            with self._timed("index"):
                bank = dataclasses.replace(bank, index=SearchIndex.build(bank.features, self._probes(features, picks)))
        if per_image is not None:
            with self._timed("scale"):
                bank = dataclasses.replace(bank, normal_scores=self._normal_scores(per_image, picks, bank))
        self.bank = bank
        return self

    def _probes(self, features: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """Training patches the coreset left out, a seeded sample: queries like the ones to come, on
        which the search index measures whether pruning pays."""
        left_out = torch.ones(len(features), dtype=torch.bool, device=features.device)
        left_out[picks] = False
        rows = left_out.nonzero().flatten()
        if len(rows) == 0:
            return features
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.config.seed))[:PROBES]
        return features[rows[order.to(rows.device)]]

    #: Training images scored without their own patches to set the heat maps' colour scale.
    NORMAL_SAMPLE = 8

    def _normal_scores(self, per_image: torch.Tensor, picks: torch.Tensor, bank: MemoryBank) -> torch.Tensor | None:
        """Image scores of a seeded sample of training images, each against the bank without the
        rows picked from it: how a good image the model has not seen scores."""
        images, patches = per_image.shape[:2]
        sharded = isinstance(bank, distributed.ShardedBank)
        counts = distributed.row_counts(images, "counting images") if sharded else [images]
        if sum(counts) < 2:
            return None
        generator = torch.Generator().manual_seed(self.config.seed)
        sample = torch.randperm(sum(counts), generator=generator)[: self.NORMAL_SAMPLE].tolist()
        source = (picks // patches).to(bank.features.device)
        if sharded:
            source = source[bank.ids.to(source.device)]  # the source image of each row this rank holds
            first = sum(counts[: distributed.rank_and_size()[0]])
        scores = []
        for image in sample:
            if sharded:  # the image's features from the rank that embedded it
                owner = next(r for r in range(len(counts)) if sum(counts[:r]) <= image < sum(counts[: r + 1]))
                mine = owner == distributed.rank_and_size()[0]
                local = per_image[image - first] if mine else torch.zeros_like(per_image[0])
                features = distributed.broadcast(local.cpu(), owner, "sharing a training image")
                others = bank.without(source != image)
            else:
                features = per_image[image]
                others = MemoryBank(bank.features[source != image], bank.grid, bank.config)
            image_scores, _ = self._score_chunk(others, features[None].to(self.device))
            scores.append(image_scores.cpu())
        return torch.cat(scores)

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, data, on_original: bool = False) -> Prediction:
        """Image scores [B] and pixel maps [B, S, S] for images in any form `fit` accepts. With
        `on_original`, also each map drawn back on its own image (`Prediction.original_maps`)."""
        prediction = self._predict(data)
        if on_original:
            sizes = image_sizes(data)
            prediction.original_maps = [self.transform.to_original(m, w, h) for m, (w, h) in zip(prediction.maps, sizes)]
        return prediction

    def _predict(self, data) -> Prediction:
        bank = self._fitted_bank()
        if distributed.active():  # each rank embeds its share; every rank scores every image
            local = self._extract_share(self._share(data, "predict"))
            features = distributed.all_gather_rows(local.cpu(), "sharing test features")
            if len(features) == 0:
                raise ValueError("no images to score")
            return self.score(features)
        parts = []
        for batch in self._batches(data, "scoring", count_images(data)):
            with self._timed("features"):
                features = self.embed(batch)
            parts.append(self.score(features))
        if not parts:
            raise ValueError("no images to score")
        return Prediction(torch.cat([p.scores for p in parts]), torch.cat([p.maps for p in parts]), self.bank.threshold)

    @torch.no_grad()
    def calibrate(self, good_images, quantile: float = 0.99, defective_images=None) -> "PatchCore":
        """Sets the decision threshold, saved with the model: the `quantile` of the scores of
        defect-free images the model was not fitted on (linear interpolation between order
        statistics), or, given labelled `defective_images` too, the F1-optimal threshold on both."""
        bank = self._fitted_bank()
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
        scores = self.predict(good_images).scores.double()
        if defective_images is not None:
            defective = self.predict(defective_images).scores.double()
            labels = torch.cat([torch.zeros(len(scores)), torch.ones(len(defective))])
            threshold, f1 = f1_optimal_threshold(torch.cat([scores, defective]), labels)
            source = f"F1-optimal (F1 {f1:.3f}) on {len(scores)} good and {len(defective)} defective images"
        else:
            threshold = float(torch.quantile(scores, quantile))
            source = f"quantile {quantile:g} of {len(scores)} good images"
        if not threshold > 0:
            raise ValueError(f"the calibration images give threshold {threshold}: no usable threshold")
        self.bank = bank.with_threshold(threshold, source)
        return self

    @torch.no_grad()
    def score(self, features: torch.Tensor, batch_size: int = 64) -> Prediction:
        """Scores and maps (on the CPU) for patch features [images, patches, dim] from `extract`."""
        bank = self._fitted_bank()
        c = self.config
        scores, maps = [], []
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size].to(self.device)
            b = len(chunk)
            with self._timed("search"):
                image_scores, patch_scores = self._score_chunk(bank, chunk)
            with self._timed("maps"):
                maps.append(anomaly_maps(patch_scores.reshape(b, *bank.grid), c.image_size).cpu())
            scores.append(image_scores.cpu())
        return Prediction(torch.cat(scores), torch.cat(maps), bank.threshold)

    def _score_chunk(self, bank: MemoryBank, chunk: torch.Tensor):
        """(image scores [b], patch scores [b, patches]) of patch features [b, patches, dim]."""
        c = self.config
        b, patches, dim = chunk.shape
        k = min(c.num_neighbors, len(bank))
        distances, indices = bank.search(chunk.reshape(-1, dim), k)
        patch_scores = distances.mean(dim=1).reshape(b, patches)  # the authors average over k
        image_scores, worst = patch_scores.max(dim=1)
        if c.reweight:
            rows = torch.arange(b, device=chunk.device)
            nearest = indices.reshape(b, patches, k)[rows, worst, 0]
            image_scores = image_scores * self._reweight(bank, chunk[rows, worst], nearest)
        return image_scores, patch_scores

    def _fitted_bank(self) -> MemoryBank:
        if self.bank is None:
            raise UserError("fit() or PatchCore.load() first: the model has no memory bank")
        return self.bank

    def _reweight(self, bank: MemoryBank, worst_features: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7: 1 - softmax over the L2 distances from the worst patch to the b bank neighbours of its
        nearest bank entry (that entry first)."""
        b = min(self.config.reweight_neighbors, len(bank))
        _, support = bank.search(bank.rows(nearest), b)
        distances = (worst_features[:, None, :] - bank.rows(support)).norm(dim=-1)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """The memory bank, its grid and the config (backbone identity included) in one file,
        written atomically (see MemoryBank.save)."""
        if self.bank is None:
            raise UserError("nothing to save: fit() first")
        self.bank.save(path)

    @classmethod
    def load(cls, path, device=None, progress: bool = True, batch_size: int = 16,
             skip_bad_images: bool = False) -> "PatchCore":
        """A fitted model from `save`'s file; refuses changed backbone weights and unknown format versions."""
        bank = MemoryBank.load(path)
        spec = bank.config.backbone
        extractor = load_backbone(spec.name, spec.layers, spec.weights, bank.config.image_size, spec.seed)
        if spec.weights_sha256 and extractor.spec.weights_sha256 != spec.weights_sha256:
            raise ValueError(f"the backbone weights {spec.weights} differ from those the model in {path} was fitted with")
        model = cls.from_config(bank.config, extractor, device, batch_size, progress, skip_bad_images)
        if distributed.active():  # each rank keeps its contiguous share of the bank rows
            bank = distributed.ShardedBank.from_bank(bank)
        model.bank = bank.to(model.device)
        model._grid = bank.grid
        return model


def _prepared(extractor: FeatureExtractor, device: torch.device, half_precision: bool) -> FeatureExtractor:
    """The extractor on `device` (bfloat16 and channels_last on CUDA when asked), converting a copy
    so that a caller's extractor, perhaps shared with other models, is never changed."""
    dtype = torch.bfloat16 if half_precision else torch.float32
    parameter = next(extractor.parameters(), None)
    if parameter is not None and parameter.device == device and parameter.dtype == dtype:
        return extractor
    prepared = copy.deepcopy(extractor).to(device=device, dtype=dtype)
    if half_precision and device.type == "cuda":
        prepared = prepared.to(memory_format=torch.channels_last)
    return prepared
