"""Faiss-free baselines as users run them today: each returns what our kernels return."""

from __future__ import annotations

import torch

from patchcore_fast.coreset import seeded_start
from patchcore_fast.reference import greedy_coreset_reference


def authors_coreset(features: torch.Tensor, ratio: float | None, projection_dim: int | None = 128, seed: int = 0,
                    n: int | None = None):
    """The authors' approximate greedy sampler: projection, mean-distance start, per-step loop
    (int(N * ratio) picks, or `n`)."""
    space, initial = seeded_start(features, projection_dim, 10, seed)
    return greedy_coreset_reference(space, initial, n if n is not None else int(features.shape[0] * ratio))


def matmul_min(queries: torch.Tensor, bank: torch.Tensor):
    """Nearest neighbour by a full float32 distance matrix and a row minimum."""
    d = (queries * queries).sum(1, keepdim=True) - 2 * queries @ bank.T + (bank * bank).sum(1)
    values, indices = d.clamp_min_(0).min(dim=1)
    return values[:, None], indices[:, None]


def cdist_topk(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """k nearest neighbours by torch.cdist and torch.topk."""
    values, indices = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    return values.square(), indices


def faiss_flat_l2(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """faiss-cpu IndexFlatL2 (exact, BLAS + its own top-k), index built outside the timing when
    given a prebuilt index as `bank`. Benchmarks only: faiss is never a dependency."""
    import faiss

    index = bank if isinstance(bank, faiss.Index) else flat_index(bank)
    distances, indices = index.search(queries.numpy(), k)
    return torch.from_numpy(distances), torch.from_numpy(indices)


def flat_index(bank: torch.Tensor):
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.numpy())
    return index
