"""MemoryBank: what fitting produces. The index over the coreset's patch features (which owns
them), the patch grid they were computed on, the config that produced them, and the decision
state (cross-fitted scores of training images, threshold). Saved by model_file.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import PatchCoreConfig
from .decision import Decision
from .index import Index


@dataclass(frozen=True)
class MemoryBank:
    index: Index
    grid: tuple[int, int]         # patch grid of one image
    config: PatchCoreConfig
    decision: Decision = Decision()

    def __post_init__(self):
        if self.index.dim != self.config.embed_dim:
            raise ValueError(f"memory bank rows must have {self.config.embed_dim} values, got {self.index.dim}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (rows, cols), got {self.grid!r}")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def features(self) -> torch.Tensor:
        """The bank rows this process holds [M, embed_dim]."""
        return self.index.vectors

    def with_decision(self, decision: Decision) -> "MemoryBank":
        return dataclasses.replace(self, decision=decision)
