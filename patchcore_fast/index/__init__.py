"""Indexes over a memory bank's rows, one interface (`Index.search(queries, k)`, knn's contract):
`FlatIndex` (brute force, CPU and CUDA kernels), `PrunedIndex` (exact, fewer distances, CPU) and
`ShardedIndex` (rows spread over torch.distributed ranks, imported from index.sharded)."""

from .base import Index
from .flat import FlatIndex
from .pruned import PrunedIndex

__all__ = ["FlatIndex", "Index", "PrunedIndex"]
