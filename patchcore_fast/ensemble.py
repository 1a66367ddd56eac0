"""PatchCoreEnsemble: one PatchCore per backbone, their image scores and maps combined.

The paper's strongest results (supplementary Table S4) come from ensembles: the authors' code fits
one PatchCore per backbone on the same images and averages the members' scores after scaling each
to [0, 1] by its minimum and maximum over the test images being scored, so that one image's score
depends on which other images are in the test set. Here each member is normalised by statistics
of its own training images instead, known at fit time: the cross-fitted scores its decision holds
(decision.py: each of up to 48 training images scored by a bank fitted without it, what a good
image the model has not seen scores). Member i's score s, and each pixel of its map, becomes
s / mean_i, mean_i the mean of those scores, and the ensemble's is the average over the members: a
typical good image scores about 1 with every member, whatever its backbone's feature scale. Only
a scale, no shift: a PatchCore score is a distance whose zero means "exactly like a training
patch", and a ratio keeps that zero, so scores stay positive and the threshold, the colour scale
(0 to the threshold) and score / threshold mean what they mean for one model (a shift to z-scores
would make good images score below zero). The ensemble's own decision is made in those units from
the same cross-fitted images: every member's folds hold the same images (same seed, same count).

Every member sees the images with the same framing, image size and tiles, so their maps share one
geometry; each decodes the images itself (the backbones differ, the decoding is a small share).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

from . import _checks, decision, model_file, workers
from .data import ImageData, count_images
from .decision import Decision
from .errors import UserError
from .prediction import Prediction, gathered

#: Short names of known backbones for method names in tables ("PatchCore-10 Lite0+Lite2").
SHORT_NAMES = {"efficientnet_lite0": "Lite0", "efficientnet_lite1": "Lite1", "efficientnet_lite2": "Lite2",
               "wide_resnet50_2": "WRN50", "wide_resnet101_2": "WRN101", "resnet18": "ResNet18",
               "resnet50": "ResNet50", "resnet101": "ResNet101", "densenet201": "DenseNet201"}


def check_backbones(backbones, settings: dict) -> list[str]:
    """The backbone names of an ensemble `PatchCore(backbone=[...], **settings)` asks for."""
    names = list(backbones)
    if len(names) < 2:
        raise ValueError(f"an ensemble needs at least two backbones, got {names}: for one, pass its name")
    if not all(isinstance(name, str) for name in names):
        raise TypeError("an ensemble's backbones are given by name (e.g. ['efficientnet_lite0', "
                        f"'efficientnet_lite2']), got {[type(n).__name__ for n in names]}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} given twice: an ensemble's members are different backbones")
    for key in ("layers", "weights"):
        if settings.get(key) is not None:
            raise ValueError(f"{key} differ between backbones: an ensemble's members use their own defaults")
    return names


def short_name(backbone: str) -> str:
    return SHORT_NAMES.get(backbone, backbone)


def normalisation_of(normal_scores: torch.Tensor | None, name: str) -> float:
    """The mean of a member's cross-fitted training scores: what its scores are divided by."""
    if normal_scores is None or len(normal_scores) < 2:
        raise UserError(f"{name}: an ensemble normalises each member by the cross-fitted scores of its training "
                        "images, and this one has fewer than 2 (fit on more images, or a larger coreset_ratio)")
    mean = float(normal_scores.double().mean())
    if not (math.isfinite(mean) and mean > 0):
        raise UserError(f"{name}: its training images' cross-fitted scores average {mean:.6g}: nothing to normalise by")
    return mean


class EnsembleGraph(nn.Module):
    """The exportable ensemble: each member's scoring graph (export.py), normalised and averaged
    as `PatchCoreEnsemble` does it. images [B, 3, S, S] -> (scores [B], maps [B, S, S])."""

    def __init__(self, members: list[nn.Module], normalisation: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("scale", torch.tensor(normalisation, dtype=torch.float32))

    def forward(self, images: torch.Tensor):
        outputs = [member(images) for member in self.members]
        scores = torch.stack([s for s, _ in outputs])  # [members, B]
        maps = torch.stack([m for _, m in outputs])    # [members, B, S, S]
        return (scores / self.scale[:, None]).mean(0), (maps / self.scale[:, None, None, None]).mean(0)


class PatchCoreEnsemble:
    """One PatchCore per backbone on the same images, with the same settings; image scores and
    maps are the average of the members' after normalising each by its training images' scores
    (module docstring). `PatchCore(backbone=[...])` makes one, and `PatchCore.load` reads one
    back. Members: `members`, PatchCore models (this module only calls them: model.py builds them)."""

    def __init__(self, members: list, normalisation: list[float] | None = None, decided: Decision | None = None):
        """From its member models (PatchCore objects of one configuration but the backbone, fitted
        or not); `normalisation` and `decided` come with fitted members (a model file's)."""
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        self._setup(list(members), normalisation, decided or Decision())

    def _setup(self, members: list, normalisation, decided: Decision):
        self.members = members
        #: Each member's scores are divided by this: the mean of its cross-fitted training scores (None before fit).
        self.normalisation = None if normalisation is None else [float(n) for n in normalisation]
        #: The ensemble's threshold and its good images' scores, in normalised units (decision.py).
        self.decision = decided
        #: Images the ensemble was fitted on (None when fitted from pooled rows).
        self.fitted_images = None

    # ------------------------------------------------------------------ what it shares with a PatchCore
    #: The settings every member shares (framing, image size, coreset ratio, tiles, ...); each
    #: member's backbone is its own (`members[i].config.backbone`; the first member's is here).
    config = property(lambda self: self.members[0].config)
    transform = property(lambda self: self.members[0].transform)
    options = property(lambda self: self.members[0].options)
    device = property(lambda self: self.members[0].device)
    batch_size = property(lambda self: self.members[0].batch_size)
    workers = property(lambda self: self.members[0].workers)
    grid = property(lambda self: self.members[0].grid)
    backbone_name = property(lambda self: " + ".join(m.backbone_name for m in self.members))
    method_suffix = property(lambda self: "+".join(short_name(m.backbone_name) for m in self.members),
                             doc="the members' short names for tables: Lite0+Lite2")

    @property
    def bank_rows(self) -> int:
        self._check_fitted()
        return sum(len(m.bank) for m in self.members)

    @property
    def timings(self) -> Counter:
        """Seconds per stage, summed over the members (each decodes and embeds the images)."""
        total = Counter()
        for member in self.members:
            total.update(member.timings)
        return total

    def __repr__(self) -> str:
        state = "not fitted" if self.normalisation is None else f"{self.bank_rows:,} bank rows, {self.decision!r}"
        return f"PatchCoreEnsemble({self.backbone_name}; {state})"

    def _check_fitted(self) -> None:
        if self.normalisation is None:
            raise UserError("fit() or PatchCore.load() first: the ensemble has no memory banks")

    def _one_process(self) -> None:
        if not isinstance(self.workers, workers.SingleProcess):
            raise UserError("ensembles run in one process: run without torchrun")

    @staticmethod
    def _rereadable(data: ImageData) -> ImageData:
        """`data` itself: every member reads the images, so a one-pass iterator is refused."""
        if isinstance(data, Iterator):
            raise UserError("an ensemble reads the images once per member: pass a folder, a list of paths or images, "
                            "a tensor or a DataLoader, not a one-pass iterator (e.g. list(iterator))")
        return data

    def check_fit_size(self, images: int | None, name: str = "coreset_ratio") -> None:
        for member in self.members:
            member.check_fit_size(images, name)

    def with_settings(self, **changes) -> "PatchCoreEnsemble":
        """An unfitted ensemble with scoring settings or run-time options changed (PatchCore.with_settings)."""
        return PatchCoreEnsemble([m.with_settings(**changes) for m in self.members])

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(self, data: ImageData, cross_fitted_threshold: bool = True) -> "PatchCoreEnsemble":
        """Fits every member on `data`, one after the other (one member's features in memory at a
        time). The members are always cross-fitted (that is what normalises them);
        `cross_fitted_threshold=False` only leaves the ensemble without a threshold, for `calibrate`."""
        _checks.boolean(cross_fitted_threshold, "cross_fitted_threshold")
        self._one_process()
        self.check_fit_size(count_images(self._rereadable(data)))
        for member in self.members:
            member.fit(data)
        return self._normalised(cross_fitted_threshold)

    def extract(self, data: ImageData, desc: str = "features") -> list[torch.Tensor]:
        """Each member's patch features of the images (PatchCore.extract), in member order."""
        return [m.extract(self._rereadable(data), f"{desc} ({short_name(m.backbone_name)})") for m in self.members]

    @torch.no_grad()
    def fit_features(self, features: list[torch.Tensor], cross_fitted_threshold: bool = True) -> "PatchCoreEnsemble":
        """`fit` from each member's patch features (from `extract`)."""
        self._one_process()
        for member, own in zip(self.members, self._per_member(features), strict=True):
            member.fit_features(own)
        return self._normalised(cross_fitted_threshold)

    def _per_member(self, features) -> list:
        if not isinstance(features, (list, tuple)) or len(features) != len(self.members):
            raise ValueError(f"an ensemble takes one features tensor per member ({len(self.members)}, from "
                             f"extract), got {type(features).__name__}")
        return list(features)

    def _normalised(self, threshold: bool) -> "PatchCoreEnsemble":
        """The members' normalisation from their cross-fitted scores, and the ensemble's decision."""
        self.normalisation = [normalisation_of(m.decision.normal_scores, m.backbone_name) for m in self.members]
        normal = self._combined([m.decision.normal_scores for m in self.members])
        self.decision = Decision(normal)
        if threshold:
            self.decision = self.decision.with_threshold(
                *decision.cross_fitted_threshold(normal, min(decision.FOLDS, len(normal))))
        self.fitted_images = self.members[0].fitted_images
        return self

    def _combined(self, per_member: list):
        """The average of the members' normalised scores or maps (tensors of one shape)."""
        return torch.stack([x / scale for x, scale in zip(per_member, self.normalisation, strict=True)]).mean(0)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, data: ImageData) -> "PatchCoreEnsemble":
        """Adds defect-free images to every member (PatchCore.update); the normalisation stays that
        of the fit (a calibrated threshold keeps its meaning), the new images' cross-fitted scores
        join the ensemble's good-image scores and a cross-fitted threshold is recomputed."""
        return self._updated(lambda member: member.update(self._rereadable(data)))

    @torch.no_grad()
    def update_features(self, features: list[torch.Tensor]) -> "PatchCoreEnsemble":
        """`update` from each member's patch features of the new images (from `extract`)."""
        own = dict(zip(map(id, self.members), self._per_member(features)))
        return self._updated(lambda member: member.update_features(own[id(member)]))

    def _updated(self, update_member) -> "PatchCoreEnsemble":
        self._check_fitted()
        self._one_process()
        before = [len(m.decision.normal_scores) for m in self.members]
        for member in self.members:
            update_member(member)
        new = [m.decision.normal_scores[n:] for m, n in zip(self.members, before)]
        self.added_images = self.members[0].added_images
        self.decision = decision.updated(self.decision, self._combined(new) if len(new[0]) else None,
                                         self.added_images)
        return self

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, data: ImageData, on_original: bool = False, maps: bool = True) -> Prediction:
        """Image scores and maps as PatchCore.predict gives them, in the ensemble's units."""
        self._check_fitted()
        return gathered(self.predict_batches(data), self.decision.threshold, self.transform.to_original,
                        on_original, maps)

    @torch.no_grad()
    def predict_batches(self, data: ImageData, view_side: int | None = None):
        """(Prediction, data.Batch) batch by batch (PatchCore.predict_batches): the members score
        each batch in turn and their parts are combined."""
        self._check_fitted()
        self._rereadable(data)
        streams = [m.predict_batches(data, view_side if i == 0 else None) for i, m in enumerate(self.members)]
        for scored in zip(*streams, strict=True):
            parts = [part for part, _ in scored]
            if any(p.sources != parts[0].sources for p in parts):  # the same files skipped by each member
                raise RuntimeError("the ensemble's members scored different images")
            yield self._combined_prediction(parts), scored[0][1]

    @torch.no_grad()
    def score(self, features: list[torch.Tensor], batch_size: int = 64) -> Prediction:
        """Scores and maps for each member's patch features (from `extract`)."""
        self._check_fitted()
        return self._combined_prediction([m.score(f, batch_size) for m, f in
                                          zip(self.members, self._per_member(features))])

    def _combined_prediction(self, parts: list[Prediction]) -> Prediction:
        first = parts[0]
        maps = None if any(p.maps is None for p in parts) else self._combined([p.maps for p in parts])
        original = None if any(p.original_maps is None for p in parts) else [
            self._combined(list(per_image)) for per_image in zip(*(p.original_maps for p in parts))]
        return Prediction(self._combined([p.scores for p in parts]), maps, self.decision.threshold,
                          original_maps=original, sources=first.sources, sizes=first.sizes)

    @torch.no_grad()
    def calibrate(self, good_images: ImageData, quantile: float = 0.99,
                  defective_images: ImageData | None = None) -> "PatchCoreEnsemble":
        """Sets the ensemble's threshold (PatchCore.calibrate), in its units; saved with it."""
        self._check_fitted()
        self.decision = decision.calibrated(self.decision, lambda images: self.predict(images, maps=False).scores,
                                            good_images, quantile, defective_images)
        return self

    def exportable(self) -> EnsembleGraph:
        """The ensemble's scoring path as one module of plain torch operators (export.py)."""
        self._check_fitted()
        return EnsembleGraph([m.scoring_module().exportable() for m in self.members], self.normalisation).eval()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Every member, the normalisation and the decision in one model file (model_file.py)."""
        self._check_fitted()
        self._one_process()
        model_file.save_ensemble(path, [(m.config, m.bank.grid, m.bank.index, m.bank.decision) for m in self.members],
                                 self.normalisation, self.decision)
