"""Indexes over a memory bank's rows, one interface (`Index.search(queries, k)`, knn's contract):
`FlatIndex` (brute force, CPU and CUDA kernels), `PrunedIndex` (exact, fewer distances, CPU) and
`ShardedIndex` (rows spread over torch.distributed ranks, imported from index.sharded)."""

import torch

from .base import Index
from .flat import FlatIndex
from .pruned import PrunedIndex

__all__ = ["FlatIndex", "Index", "PrunedIndex", "build_index", "for_run"]


def build_index(bank: torch.Tensor, device: torch.device, pruned: bool = True, cuda_kernel: str = "warp16x128",
                probes=None, like: Index | None = None) -> Index:
    """The index a fitted bank gets: pruned on the CPU when asked (`probes()`: queries like the ones
    to come, on which it measures whether pruning pays; or the choices of `like`, a pruned index of
    a bank from the same data), flat elsewhere; on `device`."""
    like = getattr(like, "local", like)  # a sharded bank's choices are its own rows' index's
    if pruned and device.type == "cpu":
        if isinstance(like, PrunedIndex):
            return PrunedIndex.build(bank.cpu(), like=like)
        return PrunedIndex.build(bank.cpu(), probes() if probes is not None else None)
    return FlatIndex(bank.to(device), cuda_kernel)



def for_run(index: Index, pruned: bool = True, cuda_kernel: str = "warp16x128") -> Index:
    """An index read from a file, with this run's choices: pruned only if asked, the CUDA variant."""
    if hasattr(index, "with_local"):  # a rank's share of a sharded bank
        return index.with_local(for_run(index.local, pruned, cuda_kernel))
    if pruned and isinstance(index, PrunedIndex):
        return index
    return FlatIndex(index.vectors, cuda_kernel)
