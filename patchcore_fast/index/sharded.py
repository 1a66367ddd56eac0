"""ShardedIndex: a bank whose rows are spread over the ranks of a process group.

Rank r holds a contiguous run of rows (or, for a fold bank, some of them) with their global
indices; `search` is a collective: each rank searches its rows, the per-query lists are gathered
and merged by (distance, global index), exactly `knn` on the whole bank. Every rank must call
`search`, `rows` and `all_vectors` together, with the same arguments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import distributed
from .._types import Progress
from .base import Index
from .flat import FlatIndex


class ShardedIndex(Index):
    kind = "flat"  # saved as one whole flat bank (rank 0 writes it)

    def __init__(self, local: Index, ids: torch.Tensor, total: int):
        if len(ids) != len(local.vectors):
            raise ValueError("a sharded index needs the global index of each of its rows")
        self.local = local  # this rank's rows, searched by any index kind
        self.ids = ids.cpu()  # their global indices, ascending
        self.total = total

    @classmethod
    def from_whole(cls, vectors: torch.Tensor) -> "ShardedIndex":
        """This rank's contiguous share of a whole bank (e.g. one read from a file)."""
        start, stop = distributed.shard(len(vectors))
        return cls(FlatIndex(vectors[start:stop].contiguous()), torch.arange(start, stop), len(vectors))

    @property
    def vectors(self) -> torch.Tensor:
        return self.local.vectors

    def __len__(self) -> int:
        return self.total

    def search(self, queries: torch.Tensor, k: int = 1, *, progress: Progress = None) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.local if len(self.ids) else None
        return distributed.search(queries, local, self.ids, k, self.total)

    def to(self, device: torch.device | str) -> Index:
        return ShardedIndex(self.local.to(device), self.ids, self.total)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` (global, the same on every rank), each from the rank that holds it."""
        flat = indices.reshape(-1).cpu()
        position = {g: i for i, g in enumerate(self.ids.tolist())}
        rank = dist.get_rank()
        holders = torch.tensor([rank if g in position else -1 for g in flat.tolist()], dtype=torch.int64)
        holders = torch.stack(distributed.all_gather(holders, "looking up bank rows")).max(0).values
        if bool((holders < 0).any()):
            raise IndexError(f"bank rows {flat[holders < 0].tolist()[:5]} are outside the bank of {self.total}")
        out = torch.zeros(len(flat), self.dim)
        for source in sorted(set(holders.tolist())):
            where = holders == source
            if source == rank:
                part = self.vectors[[position[g] for g in flat[where].tolist()]].cpu()
            else:
                part = out[where]
            out[where] = distributed.broadcast(part, source, "looking up bank rows")
        return out.reshape(*indices.shape, -1).to(self.vectors.device)

    def ordered_chunks(self, rows_per_chunk: int):
        """The whole bank's rows in global order, `rows_per_chunk` at a time (a collective per chunk;
        every rank iterates, and only a chunk is ever held): for writing a file without any rank
        holding the whole bank."""
        for start in range(0, self.total, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.total)
            mine = (self.ids >= start) & (self.ids < stop)
            rows = distributed.all_gather_rows(self.vectors[mine.to(self.vectors.device)].cpu(), "writing the bank")
            ids = distributed.all_gather_rows(self.ids[mine], "writing the bank")
            chunk = torch.empty(stop - start, self.dim)
            chunk[ids - start] = rows
            yield chunk

    def with_local(self, local: Index) -> "ShardedIndex":
        """The same rows under another index of them (e.g. this run's choice of kernel)."""
        return ShardedIndex(local, self.ids, self.total)

    def all_vectors(self) -> torch.Tensor:
        """The whole bank on every rank, rows in global order."""
        rows = distributed.all_gather_rows(self.vectors.cpu(), "gathering the bank")
        ids = distributed.all_gather_rows(self.ids, "gathering the bank")
        whole = torch.empty_like(rows)
        whole[ids] = rows
        return whole


class _Empty(FlatIndex):
    """No rows on this rank (a bank that picked none of them): searched by nobody."""

    def __init__(self, like: torch.Tensor):
        self._vectors = like[:0]
        self.cuda_kernel = "warp16x128"
