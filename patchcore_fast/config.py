"""PatchCoreConfig: everything that changes a model's features or scores, in one immutable value.

A fitted model's config is saved with its memory bank and rebuilt from the file, so a model
scores after loading exactly as it did when fitted. Run-time choices that do not change a
result (device, batch size, progress bars, the CUDA kernel variants, whether the CPU search is
pruned) are `PatchCore` arguments, not part of it.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from .backbones import BackboneSpec
from .coreset import CUDA_KERNELS as CORESET_CUDA_KERNELS
from .coreset import DEFAULT_CUDA_KERNEL as DEFAULT_CORESET_KERNEL
from .data import FRAMINGS, Transform
from .knn import CUDA_KERNELS as KNN_CUDA_KERNELS
from .tiling import Tiling
from .knn import DEFAULT_CUDA_KERNEL as DEFAULT_KNN_KERNEL


@dataclass(frozen=True)
class PatchCoreConfig:
    backbone: BackboneSpec        # name, layers, weights source and SHA-256, init seed
    framing: str = "whole"        # "whole": the whole image; "center_crop": the MVTec AD protocol
    image_size: int = 224         # side of the square the model sees (and the maps are drawn on)
    resize: int = 256             # short side before the centre crop ("center_crop" only)
    embed_dim: int = 1024         # patch feature size after pooling
    half_precision: bool = False  # backbone in bfloat16
    coreset_ratio: float = 0.1
    projection_dim: int | None = 128  # None: the exact coreset on the features themselves
    num_neighbors: int = 1        # bank neighbours averaged into a patch score (the authors' k)
    reweight: bool = False        # the paper's Eq. 7
    reweight_neighbors: int = 9
    seed: int = 0                 # coreset projection and start
    tile: int | None = None       # tiles of this many pixels, each seen at image_size (tiling.py); None: whole images
    tile_overlap: int = 0         # pixels neighbouring tiles share

    #: The fields that change the patch features (a model with others needs other features).
    FEATURE_FIELDS: ClassVar[frozenset] = frozenset({"backbone", "framing", "image_size", "resize", "embed_dim",
                                                     "half_precision", "tile", "tile_overlap"})

    def __post_init__(self):
        ratio = self.coreset_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {ratio!r}")
        for name in ("image_size", "resize", "embed_dim", "num_neighbors", "reweight_neighbors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim < 1):
            raise ValueError(f"projection_dim must be a positive integer or None, got {self.projection_dim!r}")
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {self.framing!r}")
        if self.framing == "center_crop" and self.resize < self.image_size:
            raise ValueError(f"need image_size <= resize, got image_size={self.image_size}, resize={self.resize}")
        if self.tile is not None:
            Tiling(self.tile, self.tile_overlap)  # checks both
            if self.framing != "whole":
                raise ValueError("tile cuts the whole image into tiles: use it with framing='whole'")
        elif self.tile_overlap != 0:
            raise ValueError("tile_overlap needs tile")

    @property
    def tiling(self) -> Tiling | None:
        """How images are cut into tiles (None: each image is seen whole or centre-cropped)."""
        return None if self.tile is None else Tiling(self.tile, self.tile_overlap)

    @property
    def transform(self) -> Transform:
        return Transform(resize=self.resize, crop=self.image_size, framing=self.framing)

    def replace(self, **changes) -> "PatchCoreConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "backbone": self.backbone.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "PatchCoreConfig":
        """The config `to_dict` wrote: every field present (a file of an older format is migrated
        first, see model_file.py), none unknown."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}: written by a newer patchcore_fast?")
        missing = sorted(known - set(d))
        if missing:
            raise ValueError(f"model settings {missing} missing")
        return cls(**{**d, "backbone": BackboneSpec.from_dict(d["backbone"])})


PREDICT_BANK = ("auto", "replicated", "sharded")


@dataclass(frozen=True)
class RunOptions:
    """How a model runs, without changing any result; not saved with it."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 16          # images per backbone batch
    progress: bool = True         # progress bars
    skip_bad_images: bool = False  # unreadable image files skipped with a warning instead of an error
    coreset_cuda_kernel: str = DEFAULT_CORESET_KERNEL  # CUDA variants: the same results (coreset.CUDA_KERNELS)
    knn_cuda_kernel: str = DEFAULT_KNN_KERNEL
    pruned_search: bool = True    # build a PrunedIndex when fitting on the CPU; used where it pays
    #: Under torchrun, how predict meets a sharded bank: "replicated" (each rank copies the whole bank
    #: once and scores its own images, no communication per query), "sharded" (queries travel to every
    #: rank), "auto" (replicated when the bank fits: workers.REPLICA_MEMORY_SHARE).
    predict_bank: str = "auto"

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.coreset_cuda_kernel not in CORESET_CUDA_KERNELS:
            raise ValueError(f"coreset_cuda_kernel must be one of {CORESET_CUDA_KERNELS}, got {self.coreset_cuda_kernel!r}")
        if self.knn_cuda_kernel not in KNN_CUDA_KERNELS:
            raise ValueError(f"knn_cuda_kernel must be one of {KNN_CUDA_KERNELS}, got {self.knn_cuda_kernel!r}")
        if not isinstance(self.pruned_search, bool):
            raise ValueError(f"pruned_search must be True or False, got {self.pruned_search!r}")
        if self.predict_bank not in PREDICT_BANK:
            raise ValueError(f"predict_bank must be one of {PREDICT_BANK}, got {self.predict_bank!r}")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_arguments(cls, device, options: dict) -> "RunOptions":
        """Run options from PatchCore's keyword arguments, the device resolved (devices.resolve)."""
        from .devices import resolve

        unknown = sorted(set(options) - cls.names())
        if unknown:
            raise TypeError(f"unknown PatchCore arguments {unknown}; run-time options are {sorted(cls.names())}")
        return cls(**{**options, "device": resolve(device)})
