"""PatchCore: fit a memory bank on defect-free images, score new images and pixels.

This class only wires the parts together: fit = patch features -> coreset -> index (workers.py
decides where the rows live); predict = the scoring module (scoring.py) -> the decision
(decision.py). The file format is model_file.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from . import _checks, decision, model_file, workers
from .backbones import FeatureExtractor, backbone_for, load_backbone
from .config import PatchCoreConfig, RunOptions
from .coreset import distances_to_bank, greedy_coreset
from .data import Batch, ImageData, count_images, iter_decoded, iter_image_batches, prefetched
from .ensemble import PatchCoreEnsemble, check_backbones
from .errors import UserError
from .index import FlatIndex, Index, build_index, for_run
from .index.pruned import left_out_probes
from .memory_bank import MemoryBank
from .prediction import Prediction, gathered
from .scoring import PatchFeatures, ScoringModule, check_patch_features, collect, prepared
from .stages import StageTimes
from .tiling import Stitcher, tile_views

class PatchCore:
    """PatchCore as in the authors' released code (amazon-science/patchcore-inspection): WideResNet-50
    layers 2 and 3, 1024-d locally aware patch features, a 10 % greedy coreset on a 128-d random
    projection, nearest-neighbour squared L2 scores, image score = largest patch score, maps
    upsampled and smoothed with sigma 4. Settings that change results form `config`
    (PatchCoreConfig, saved with the model); the others are run-time `options` (RunOptions)."""

    def __new__(cls, backbone: str | FeatureExtractor | list[str] | tuple[str, ...] = "wide_resnet50_2", *args,
                **kwargs):
        # A list of backbones makes the paper's ensemble of one model per backbone; Python then
        # skips __init__, as the object is not a PatchCore.
        if isinstance(backbone, (list, tuple)):
            if args:
                raise TypeError("an ensemble takes its settings by name: PatchCore(backbone=[...], coreset_ratio=...)")
            return PatchCoreEnsemble([cls(name, **kwargs) for name in check_backbones(backbone, kwargs)])
        return super().__new__(cls)

    def __init__(self, backbone: str | FeatureExtractor = "wide_resnet50_2",
                 layers: tuple[str, ...] | list[str] | None = None, coreset_ratio: float = 0.1,
                 framing: str = "whole", projection_dim: int | None = 128, num_neighbors: int = 1,
                 reweight: bool = False, image_size: int = 224, resize: int = 256, device: str | torch.device | None = None,
                 weights: str | None = None, embed_dim: int = 1024, seed: int = 0, reweight_neighbors: int = 9,
                 half_precision: bool = False, tile: int | None = None, tile_overlap: int = 0, **run_options):
        if isinstance(backbone, FeatureExtractor):
            if layers is not None or weights is not None:
                raise ValueError("layers and weights belong to load_backbone when backbone is a loaded FeatureExtractor")
            extractor = backbone
        else:
            extractor = load_backbone(backbone, layers, weights, image_size, seed)
        config = PatchCoreConfig(backbone=extractor.spec, framing=framing, image_size=image_size, resize=resize,
                                 embed_dim=embed_dim, half_precision=bool(half_precision), coreset_ratio=coreset_ratio,
                                 projection_dim=projection_dim, num_neighbors=num_neighbors, reweight=reweight,
                                 reweight_neighbors=reweight_neighbors, seed=seed, tile=tile,
                                 tile_overlap=tile_overlap)
        self._setup(config, extractor, RunOptions.from_arguments(device, run_options))

    @classmethod
    def from_config(cls, config: PatchCoreConfig, extractor: FeatureExtractor | None = None,
                    device: str | torch.device | None = None,
                    **run_options) -> "PatchCore":
        """A model for `config`; its backbone is loaded (and its weights' SHA-256 checked) unless given."""
        model = cls.__new__(cls)
        model._setup(config, backbone_for(config.backbone, config.image_size, extractor),
                     RunOptions.from_arguments(device, run_options))
        return model

    def _setup(self, config: PatchCoreConfig, extractor: FeatureExtractor, options: RunOptions):
        self.config, self.options = config, options
        self.transform = config.transform
        self.features = PatchFeatures(prepared(extractor, options.device, config.half_precision), config.embed_dim,
                                      config.half_precision, options.device)
        self.workers = workers.current()
        self.bank: MemoryBank | None = None
        self._grid: tuple[int, int] | None = None
        #: Seconds spent per stage (decode, features, coreset, index, threshold, search, maps), accumulated over calls.
        self.timings = StageTimes(options.device)

    def with_settings(self, **changes) -> "PatchCore":
        """An unfitted model with scoring settings or run-time options changed, sharing this one's
        backbone. Settings that change the features need a new model."""
        if PatchCoreConfig.FEATURE_FIELDS & set(changes):
            raise ValueError(f"{sorted(PatchCoreConfig.FEATURE_FIELDS & set(changes))} change the features: "
                             "build a new PatchCore")
        options = {k: v for k, v in changes.items() if k in RunOptions.names()}
        config = self.config.replace(**{k: v for k, v in changes.items() if k not in options})
        model = PatchCore.from_config(config, self.extractor, **{**dataclasses.asdict(self.options), **options})
        model._grid = self._grid
        return model

    device = property(lambda self: self.options.device)
    decision = property(lambda self: None if self.bank is None else self.bank.decision,
                        doc="the threshold and the good images' scores (decision.py); None before fit")
    backbone_name = property(lambda self: self.config.backbone.name)

    @property
    def bank_rows(self) -> int:
        """Rows of the memory bank (all ranks' under torchrun)."""
        self._check_fitted()
        return len(self.bank)
    batch_size = property(lambda self: self.options.batch_size)
    extractor = property(lambda self: self.features.extractor)
    memory_bank = property(lambda self: None if self.bank is None else self.bank.features, doc="bank rows [M, D]")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of one image: fixed by the backbone and the image size."""
        if self._grid is None:
            self._grid = self.features.grid(self.config.image_size, self.config.backbone.name)
        return self._grid

    def __repr__(self) -> str:
        c = self.config
        state = "not fitted" if self.bank is None else (f"bank {len(self.bank)} x {c.embed_dim} ({type(self.bank.index).__name__}),"
                                                        f" {self.bank.decision!r}")
        return (f"PatchCore({c.backbone.name} {list(c.backbone.layers)}, {c.framing} {c.image_size} px, "
                f"coreset {c.coreset_ratio:g}, k={c.num_neighbors}, on {self.device}; {state})")

    # ------------------------------------------------------------------ features
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> patch features [B, h * w, embed_dim] (float32)."""
        features, self._grid = self.features(images)
        return features

    def _step(self, desc: str, total: int | None = None):
        """A progress line for a step of the fit that takes a second or more on large banks."""
        return tqdm(total=total, desc=desc, disable=not self.options.progress, unit="image", leave=False)

    @property
    def micro_batch(self) -> int:
        """Images the backbone sees at once. Its floats for an image can depend on the batch it runs
        in (oneDNN: a batch of 1 and of 2 differ in the last bits at 64 px), so every process runs
        it on the same fixed micro-batches, aligned on the image's position in the data, and ranks
        take shares in whole micro-batches: shares even to a micro-batch, results independent of
        the rank count. On the CPU 2 images (1 for an odd batch size): measured at 224 px, 2 threads,
        time per image in micro-batches of 1 / 2 / 4 / 8: Lite0 22 / 20 / 20 / 24 ms, resnet18
        22 / 20 / 19 / 18 ms, WRN50 97 / 87 / 88 / 88 ms. On a GPU the whole batch."""
        return math.gcd(self.batch_size, 2) if self.device.type == "cpu" else self.batch_size

    def _embed_timed(self, images: torch.Tensor) -> torch.Tensor:
        with self.timings("features"):
            m = self.micro_batch
            if len(images) <= m:
                return self.embed(images)
            return torch.cat([self.embed(images[s : s + m]) for s in range(0, len(images), m)])

    def _batches(self, data, desc, view_side=None):
        total = count_images(data)
        batches = prefetched(iter_image_batches(data, self.transform, self.batch_size, self.options.skip_bad_images,
                                                view_side))  # decoded while the network runs
        return tqdm(self.timings.iterate(batches, "decode"), desc=desc,
                    total=None if total is None else -(-total // self.batch_size), disable=not self.options.progress,
                    unit="batch")

    @torch.no_grad()
    def extract(self, data: ImageData, desc: str = "features") -> torch.Tensor:
        """Patch features [images, patches, embed_dim] of images in any form `fit` accepts (a tiled
        model: [images, tiles x patches, embed_dim], every image giving the same tiles)."""
        if self.config.tiling is not None:
            return self._extract_tiles(data, desc)
        return collect((self._embed_timed(b.images) for b in self._batches(data, desc)), count_images(data), self.device)

    def _decoded(self, data: ImageData, desc: str, view_side: int | None = None):
        """Each image decoded at its own size, one at a time, with a progress bar (tiled models)."""
        self._one_process("tiles")
        return tqdm(self.timings.iterate(iter_decoded(data, self.options.skip_bad_images, view_side), "decode"),
                    desc=desc, total=count_images(data), disable=not self.options.progress, unit="image")

    def _extract_tiles(self, data: ImageData, desc: str) -> torch.Tensor:
        c, tiling = self.config, self.config.tiling
        per_image, tiles = [], []
        for item in self._decoded(data, desc):
            per_image.append(torch.cat([self._embed_timed(views) for views in
                                        tile_views(item.image, tiling, c.image_size, self.batch_size)]).reshape(-1, c.embed_dim))
            tiles.append((item.source, item.size, tiling.count(*item.size)))
        if len({count for *_, count in tiles}) > 1:
            (a, size_a, n_a), (b, size_b, n_b) = tiles[0], next(t for t in tiles if t[2] != tiles[0][2])
            raise ValueError(f"tiled fitting takes images of one size: {a} ({size_a[0]} x {size_a[1]} px) gives {n_a} "
                             f"{tiling.describe()}, {b} ({size_b[0]} x {size_b[1]} px) gives {n_b}")
        if not per_image:
            return torch.empty(0, self.grid[0] * self.grid[1], c.embed_dim, device=self.device)
        return torch.stack(per_image)

    def _one_process(self, what: str) -> None:
        if not isinstance(self.workers, workers.SingleProcess):
            raise UserError(f"{what} run in one process: run without torchrun")

    def _patch_rows(self, features: torch.Tensor) -> torch.Tensor:
        """The rows of per-image features [images, patches, dim] (or [rows, dim]); a tiled model's
        images hold a whole number of tiles' patches."""
        grid = self.grid
        if self.config.tiling is not None and features.dim() == 3 and features.shape[1] % (grid[0] * grid[1]) == 0:
            grid = (features.shape[1] // grid[1], grid[1])
        return check_patch_features(features, self.config.embed_dim, grid)

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(self, data: ImageData, cross_fitted_threshold: bool = True) -> "PatchCore":
        """Build the memory bank from defect-free images (folder, paths, PIL images, tensor, DataLoader).
        Inside a process group (torchrun) each rank embeds its share and the bank is sharded.
        `cross_fitted_threshold=False` skips the default threshold (three more coresets, about a
        third of a fit): for a model that `calibrate` will give one."""
        _checks.boolean(cross_fitted_threshold, "cross_fitted_threshold")
        self.check_fit_size(count_images(data))
        share = self.workers.share(data, self.micro_batch)
        empty = isinstance(share, (list, torch.Tensor)) and len(share) == 0  # a rank with no images
        features = torch.empty(0, self.grid[0] * self.grid[1], self.config.embed_dim) if empty else self.extract(share)
        return self.fit_features(features, cross_fitted_threshold)

    def check_fit_size(self, images: int | None, name: str = "coreset_ratio") -> None:
        """Before any work: a fit on `images` images (None: not known yet) selects at least one patch."""
        rows = None if images is None else images * self.grid[0] * self.grid[1]
        if rows is not None and int(rows * self.config.coreset_ratio) < 1:
            raise ValueError(f"{name} {self.config.coreset_ratio:g} of {rows:,} training patches ({images} images x "
                             f"{rows // images}) selects none: {name} must be at least {1 / rows:.2g}")

    @torch.no_grad()
    def fit_features(self, features: torch.Tensor, cross_fitted_threshold: bool = True) -> "PatchCore":
        """Build the memory bank from patch features [images, patches, dim] (or [rows, dim]) from `extract`
        (`cross_fitted_threshold` as in `fit`)."""
        c, grid = self.config, self.grid
        rows = self._patch_rows(features)
        size = int(self.workers.total(len(rows), "counting rows") * c.coreset_ratio)
        with self.timings("coreset"), tqdm(total=size, desc="coreset", unit="pick",
                                           disable=not self.options.progress) as bar:
            space = self.workers.selection_space(rows, c.projection_dim, c.seed)  # kept for the folds
            picks = self.workers.coreset(rows, c.coreset_ratio, c.projection_dim, c.seed,
                                         self.options.coreset_cuda_kernel, lambda done: bar.update(done - bar.n), space)
            bar.update(len(picks) - bar.n)
        with self.timings("index"), self._step("search index"):
            index = self.workers.index(rows, picks, self._build_index).to(self.device)
        scoring = self.scoring_module(index)
        decided = decision.Decision()
        images = self.workers.total(len(features), "counting images") if features.dim() == 3 else 0
        if cross_fitted_threshold and self._folds_select(images):  # the threshold: cross-fitted on the training images
            with self.timings("threshold"), self._step("threshold (cross-fitted)") as bar:
                normal = decision.cross_fitted_scores(
                    images, c.seed, lambda kept: self._fold_index(features, kept, index, space),
                    lambda fold, idx: scoring.patch_scores(self.workers.image_features(features, fold).to(self.device),
                                                           idx)[0], bar.update)
            if normal is not None and float(normal.max()) > 0:
                decided = decision.Decision(normal).with_threshold(
                    *decision.cross_fitted_threshold(normal, min(decision.FOLDS, images)))
        self.bank = MemoryBank(index, grid, c, decided)
        #: Images the bank was fitted on (None when fitted from pooled rows).
        self.fitted_images = images if features.dim() == 3 else None
        return self

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, data: ImageData) -> "PatchCore":
        """Adds defect-free images without a refit: their patches join the bank by continuing the
        greedy selection from the bank as it is (each new patch starts at its distance to the
        nearest bank row, coreset.continued_coreset), int(new patches x coreset_ratio) of them, and
        the old images are never read again. A cross-fitted threshold is updated the same way (the
        new images cross-fitted against the old bank plus the other folds' picks, their scores added
        to the old ones); a calibrated threshold is kept. One process only (not under torchrun)."""
        self._check_update()
        self.check_fit_size(count_images(data), "coreset_ratio (of the new images)")
        return self.update_features(self.extract(data, "features (update)"))

    def _check_fitted(self) -> None:
        if self.bank is None:
            raise UserError("fit() or PatchCore.load() first: the model has no memory bank")

    def _check_update(self) -> None:
        if self.bank is None:
            raise UserError("fit() or PatchCore.load() first: update adds images to a fitted model")
        self._one_process("updates")

    @torch.no_grad()
    def update_features(self, features: torch.Tensor) -> "PatchCore":
        """`update` from the new images' patch features [images, patches, dim] (from `extract`)."""
        self._check_update()
        c = self.config
        rows = self._patch_rows(features)
        if features.dim() != 3 or len(features) == 0:
            raise ValueError("update needs per-image features [images, patches, dim] of at least one image")
        self.check_fit_size(len(features), "coreset_ratio (of the new images)")
        old = self.bank.index.all_vectors().to(rows.device)
        with self.timings("coreset"), tqdm(total=int(len(rows) * c.coreset_ratio), desc="coreset (update)",
                                           unit="pick", disable=not self.options.progress) as bar:
            space, start = distances_to_bank(rows, old, c.projection_dim, c.seed)  # kept for the folds
            picks = self._continue(rows, space, start, lambda done: bar.update(done - bar.n))
            bar.update(len(picks) - bar.n)
        with self.timings("index"), self._step("search index"):
            index = self._build_index(torch.cat([old, rows[picks]]).contiguous(), rows, picks).to(self.device)
        decided = self.bank.decision
        with self.timings("threshold"), self._step("threshold (cross-fitted)") as bar:
            patches = features.shape[1]

            def fold_index(kept: list[int]) -> Index:
                at = (torch.tensor(kept, device=rows.device)[:, None] * patches
                      + torch.arange(patches, device=rows.device)).reshape(-1)
                fold_picks = at[self._continue(rows[at], space[at], start[at])]
                return self._build_index(torch.cat([old, rows[fold_picks]]).contiguous(), like=index)

            scoring = self.scoring_module(index)
            new = None if not self._folds_select(len(features)) else decision.cross_fitted_scores(
                len(features), c.seed, fold_index,
                lambda fold, idx: scoring.patch_scores(features[fold].to(self.device), idx)[0], bar.update)
        decided = decision.updated(decided, new, len(features))
        self.bank = MemoryBank(index, self.bank.grid, c, decided)
        #: Images the last update added.
        self.added_images = len(features)
        return self

    def _continue(self, rows: torch.Tensor, space: torch.Tensor, start: torch.Tensor, progress=None) -> torch.Tensor:
        """The continued greedy selection over `rows` (their selection space and distances to the bank)."""
        return greedy_coreset(rows, self.config.coreset_ratio, projection_dim=self.config.projection_dim,
                              seed=self.config.seed, initial_distances=start,
                              cuda_kernel=self.options.coreset_cuda_kernel, progress=progress, space=space)

    def _folds_select(self, images: int) -> bool:
        """Whether cross-fitting `images` images can fit every fold: each keeps enough patches for
        a coreset of at least one row (not so with a few images and a tiny ratio: then no threshold)."""
        kept = decision.fewest_kept_images(images) * self.grid[0] * self.grid[1]
        return images >= 2 and int(kept * self.config.coreset_ratio) >= 1

    def _fold_index(self, features: torch.Tensor, kept: list[int], whole: Index, space: torch.Tensor | None) -> Index:
        """A bank fitted as the model's own, on the images `kept` only (cross-fitting); its index
        takes the choices made for `whole`, the index of the bank of all images, and its coreset
        the rows' selection space `space` (of all images' rows) where there is one."""
        c = self.config
        rows = self.workers.image_rows(features, kept)
        if space is not None:
            space = self.workers.image_rows(space.reshape(len(features), -1, space.shape[-1]), kept)
        picks = self.workers.coreset(rows, c.coreset_ratio, c.projection_dim, c.seed, self.options.coreset_cuda_kernel,
                                     None, space)
        return self.workers.index(rows, picks, lambda bank, *_: self._build_index(bank, like=whole))

    def _build_index(self, bank_rows: torch.Tensor, rows: torch.Tensor | None = None,
                     picks: torch.Tensor | None = None, like: Index | None = None) -> Index:
        o = self.options
        probes = None if like is not None else lambda: left_out_probes(rows, picks, self.config.seed)
        return build_index(bank_rows, self.device, o.pruned_search, o.knn_cuda_kernel, probes, like)

    def scoring_module(self, index: Index | None = None) -> ScoringModule:
        """The scoring path (scoring.py) over `index` (default: the fitted bank's)."""
        if index is None:
            self._check_fitted()
        c = self.config
        return ScoringModule(self.features, self.bank.index if index is None else index, c.image_size,
                             c.num_neighbors, c.reweight, c.reweight_neighbors)

    def exportable(self):
        """The scoring path as plain float32 torch operators on the CPU (export.py)."""
        return self.scoring_module().exportable()

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, data: ImageData, on_original: bool = False, maps: bool = True) -> Prediction:
        """Image scores [B] and pixel maps [B, S, S] for images in any form `fit` accepts. With
        `on_original`, also each map drawn back on its own image (`Prediction.original_maps`).
        `maps=False` keeps the scores only (4 bytes an image instead of 4 S^2: a folder of any size);
        `predict_batches` hands each batch over as it is scored."""
        self._check_fitted()
        return gathered(self.predict_batches(data), self.bank.decision.threshold, self.transform.to_original,
                        on_original, maps)

    @torch.no_grad()
    def predict_batches(self, data: ImageData, view_side: int | None = None) -> Iterator[Prediction]:
        """(Prediction, data.Batch) batch by batch, as they are scored: memory does not grow with the
        number of images. `view_side`: each batch also carries its decoded images with the long side
        at most view_side (`Batch.views`; None under torchrun), to draw overlays without decoding again."""
        scoring = self.scoring_module()
        if self.config.tiling is not None:
            yield from self._predict_tiles(scoring, data, view_side)
            return
        batches = self._batches(self.workers.scoring_share(data, self.batch_size), "scoring", view_side)
        whole = self.workers.replica(self.bank.index, self.options.predict_bank, self._replica_index)
        if whole is not None:  # each rank scores its own images against its copy of the bank
            replica = self.scoring_module(whole)
            scored = ((self._labelled(self._score(replica, self._embed_timed(b.images)), b), b) for b in batches)
            yield from self.workers.gathered_predictions(scored, self.bank.decision.threshold)
            return
        shape = (self.grid[0] * self.grid[1], self.config.embed_dim)
        for features, batch in self.workers.feature_batches(batches, self._embed_timed, self.batch_size, shape):
            yield self._labelled(self._score(scoring, features), batch), batch

    @staticmethod
    def _labelled(part: Prediction, batch) -> Prediction:
        part.sources, part.sizes = batch.sources, batch.sizes
        return part

    def _replica_index(self, rows: torch.Tensor, like: Index) -> Index:
        with self.timings("index"):
            return self._build_index(rows, like=like).to(self.device)

    def _predict_tiles(self, scoring: ScoringModule, data: ImageData, view_side: int | None):
        """predict_batches for a tiled model: one image at a time, its tiles in batches, its map
        stitched on the whole image at the resolution the model saw it (tiling.py)."""
        c, threshold = self.config, self.bank.decision.threshold
        scale = min(1.0, c.image_size / c.tiling.side)
        for item in self._decoded(data, "scoring", view_side):
            stitcher, best = Stitcher(c.tiling, *item.size, scale), None
            for views in tile_views(item.image, c.tiling, c.image_size, self.batch_size):
                part = self._score(scoring, self._embed_timed(views))
                with self.timings("maps"):
                    stitcher.add(part.maps)
                top = part.scores.max()
                best = top if best is None else torch.maximum(best, top)
            yield (Prediction(best.reshape(1), None, threshold, original_maps=[stitcher.result()], sources=[item.source],
                              sizes=[item.size]),
                   Batch(None, [item.size], [item.source], None if item.view is None else [item.view]))

    @torch.no_grad()
    def score(self, features: torch.Tensor, batch_size: int = 64) -> Prediction:
        """Scores and maps (on the CPU) for patch features [images, patches, dim] from `extract`."""
        scoring = self.scoring_module()
        parts = [self._score(scoring, features[s : s + batch_size]) for s in range(0, len(features), batch_size)]
        return Prediction.concat(parts, self.bank.decision.threshold)

    def _score(self, scoring: ScoringModule, features: torch.Tensor) -> Prediction:
        with self.timings("search"):
            image_scores, patch_scores = scoring.patch_scores(features.to(self.device))
        with self.timings("maps"):
            maps = scoring.maps(patch_scores, self.bank.grid).cpu()
        return Prediction(image_scores.cpu(), maps, self.bank.decision.threshold)

    @torch.no_grad()
    def calibrate(self, good_images: ImageData, quantile: float = 0.99, defective_images: ImageData | None = None) -> "PatchCore":
        """Sets the decision threshold, saved with the model: the `quantile` of the scores of
        defect-free images the model was not fitted on, or, given labelled `defective_images` too,
        the F1-optimal threshold on both (decision.py)."""
        self._check_fitted()
        calibrated = decision.calibrated(self.bank.decision, lambda images: self.predict(images, maps=False).scores,
                                         good_images, quantile, defective_images)
        self.bank = self.bank.with_decision(calibrated)
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """The bank, its index, grid, decision and config in one file, written atomically (model_file.py)."""
        if self.bank is None:
            raise UserError("nothing to save: fit() first")
        self.workers.save(path, self.config, self.bank.grid, self.bank.index, self.bank.decision)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None,
             **run_options) -> "PatchCore | PatchCoreEnsemble":
        """A fitted model from `save`'s file (a PatchCoreEnsemble from an ensemble's); refuses
        changed backbone weights and unknown format versions."""
        state = workers.current().load(path)  # under torchrun: this rank's share of the bank
        if isinstance(state, model_file.EnsembleState):
            return PatchCoreEnsemble([cls.from_state(member, device, **run_options) for member in state.members],
                                     state.normalisation, state.decision)
        return cls.from_state(state, device, **run_options)

    @classmethod
    def from_state(cls, state: model_file.ModelState, device: str | torch.device | None = None,
                   **run_options) -> "PatchCore":
        """A fitted model from what its file held (model_file.load)."""
        model = cls.from_config(state.config, None, device, **run_options)
        index = for_run(state.index, model.options.pruned_search, model.options.knn_cuda_kernel).to(model.device)
        model.bank = MemoryBank(index, state.grid, state.config, state.decision)
        model._grid = state.grid
        return model
