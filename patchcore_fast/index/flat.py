"""FlatIndex: brute force over every row with the `knn` kernels (CPU and CUDA)."""

from __future__ import annotations

import torch

from .. import _checks
from ..knn import DEFAULT_CUDA_KERNEL, knn
from .._types import Progress
from .base import Index


class FlatIndex(Index):
    kind = "flat"

    def __init__(self, vectors: torch.Tensor, cuda_kernel: str = DEFAULT_CUDA_KERNEL):
        self._vectors = _checks.float_matrix(vectors, "vectors")
        self.cuda_kernel = cuda_kernel  # a run-time choice (same results): see knn.CUDA_KERNELS

    @property
    def vectors(self) -> torch.Tensor:
        return self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def search(self, queries: torch.Tensor, k: int = 1, *, progress: Progress = None) -> tuple[torch.Tensor, torch.Tensor]:
        return knn(queries, self._vectors, k, cuda_kernel=self.cuda_kernel, progress=progress)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self._vectors[indices]

    def to(self, device: torch.device | str) -> Index:
        device = torch.device(device)
        return self if self._vectors.device == device else FlatIndex(self._vectors.to(device), self.cuda_kernel)

    def all_vectors(self) -> torch.Tensor:
        return self._vectors
