"""MemoryBank: what fitting produces, and what a model file holds.

The coreset's patch features, the patch grid they were computed on, and the config that
produced them (which also decides how they are searched). Written and read whole, in one
safetensors file: the bank as a tensor, the rest as JSON metadata with a format version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .backbones import BackboneSpec
from .config import PatchCoreConfig
from .knn import knn
from .search_index import SearchIndex

#: Version 2: one "config" object (PatchCoreConfig). Version 1 ("settings" + "backbone", no
#: half_precision) is still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class MemoryBank:
    features: torch.Tensor        # [M, embed_dim] float32
    grid: tuple[int, int]         # patch grid of one image
    config: PatchCoreConfig
    #: Image scores of up to 8 training images, each scored against the bank without its own
    #: patches (what a good image scores), when fitted from per-image features; else None.
    normal_scores: torch.Tensor | None = None
    #: Decision threshold on image scores (PatchCore.calibrate), and how it was chosen.
    threshold: float | None = None
    threshold_source: str | None = None
    #: Pruned exact search over `features` (fit on the CPU with config.pruned_search), or None.
    index: SearchIndex | None = None

    def __post_init__(self):
        if self.features.dim() != 2 or self.features.shape[1] != self.config.embed_dim:
            raise ValueError(f"memory bank must be [M, {self.config.embed_dim}], got {tuple(self.features.shape)}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (rows, cols), got {self.grid!r}")
        if self.index is not None and not self.index.matches(self.features):
            raise ValueError("the search index was built for another memory bank")

    def __len__(self) -> int:
        return len(self.features)

    def to(self, device) -> "MemoryBank":
        return dataclasses.replace(self, features=self.features.to(device))

    def with_threshold(self, threshold: float, source: str) -> "MemoryBank":
        return dataclasses.replace(self, threshold=float(threshold), threshold_source=source)

    def colour_scale(self) -> tuple[float, float] | None:
        """The fixed scale of this model's heat maps: 0 to the decision threshold when calibrated (red
        means at or above it), else 0 to the highest score of a good image."""
        if self.threshold is not None:
            return 0.0, self.threshold
        if self.normal_scores is None or len(self.normal_scores) == 0:
            return None
        return 0.0, float(self.normal_scores.max())

    def search(self, queries: torch.Tensor, k: int):
        """(squared distances [Q, k], indices [Q, k]) of each query's k nearest bank entries: the
        index's pruned search on the CPU where it pays (the same results), else `knn`."""
        if self.index is not None and queries.device.type == "cpu" and self.features.device.type == "cpu":
            return self.index.search(queries, self.features, k)
        return knn(queries, self.features, k, cuda_kernel=self.config.knn_cuda_kernel)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Bank rows by index (any shape of indices)."""
        return self.features[indices]

    def save(self, path) -> None:
        """Writes the bank, grid and config to `path` atomically (a temporary file replaces it when complete)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format_version": FORMAT_VERSION, "patchcore_fast": __version__, "config": self.config.to_dict(),
                "grid": list(self.grid), "threshold": self.threshold, "threshold_source": self.threshold_source,
                "search_index": self.index.metadata() if self.index is not None else None}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
        os.close(fd)
        try:
            tensors = {"memory_bank": self.features.float().cpu().contiguous()}
            if self.normal_scores is not None:
                tensors["normal_scores"] = self.normal_scores.float().cpu().contiguous()
            if self.index is not None:
                tensors.update(self.index.tensors())
            save_file(tensors, tmp, metadata={"patchcore_fast": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path) -> "MemoryBank":
        """Reads a bank written by `save` (format versions 1 and 2), on the CPU."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["patchcore_fast"])
                features = f.get_tensor("memory_bank")
                normal = f.get_tensor("normal_scores") if "normal_scores" in f.keys() else None
                index_tensors = {name: f.get_tensor(name) for name in f.keys() if name.startswith("search_")}
        except Exception as error:
            raise ValueError(f"{path} is not a readable patchcore_fast model ({type(error).__name__}: {error})") from error
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path} has model format version {version}; this patchcore_fast ({__version__}) reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}: use the patchcore_fast that wrote it, "
                             "or fit the model again")
        try:
            if version == 1:  # settings and backbone apart; always centre-cropped; half precision not recorded
                config = PatchCoreConfig(backbone=BackboneSpec.from_dict(meta["backbone"]), framing="center_crop",
                                         **meta["settings"])
            else:
                config = PatchCoreConfig.from_dict(meta["config"])
            index = SearchIndex.restore(index_tensors, meta["search_index"]) if meta.get("search_index") else None
            return cls(features, tuple(meta["grid"]), config, normal, meta.get("threshold"), meta.get("threshold_source"),
                       index)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} has inconsistent model metadata: {error}") from error
