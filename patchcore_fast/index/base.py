"""Index: a memory bank's rows and the one way to search them.

An index owns its vectors (as faiss's do): it is built from a bank and answers
`search(queries, k)` with `knn`'s contract (squared distances [Q, k] ascending, indices [Q, k],
ties to the lower index), so no caller can search one bank with an index built for another.
Flat (brute force), pruned (exact, fewer distances) and sharded (rows spread over ranks) indexes
share this interface; `PatchCore`, the scoring module and export see only it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .._types import Progress


class Index(ABC):
    #: The name a model file records (see model_file.py); sharded indexes are saved as flat ones.
    kind: str = ""

    @property
    @abstractmethod
    def vectors(self) -> torch.Tensor:
        """The rows this process holds [m, D] (all of them, except in a sharded index)."""

    @abstractmethod
    def __len__(self) -> int:
        """Rows in the whole index."""

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int = 1, *, progress: Progress = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distances [Q, k] ascending, indices [Q, k] int64) of each query's k nearest rows."""

    @abstractmethod
    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows by index (any shape of indices) -> [*indices.shape, D]."""

    @abstractmethod
    def to(self, device: torch.device) -> "Index":
        """This index for searching on `device`."""

    @abstractmethod
    def all_vectors(self) -> torch.Tensor:
        """Every row [len(self), D], in index order (a collective for a sharded index)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a model file keeps besides the vectors: tensors and JSON metadata."""
        return {}, {}

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} x {self.dim}, {self.vectors.device})"
