"""Brute-force top-k squared L2, in query chunks so that memory stays bounded."""

from __future__ import annotations

import torch


@torch.no_grad()
def knn_reference(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_elems: int = 1 << 26):
    """(squared distances [Q, k] ascending, indices [Q, k]); ties go to the lower index.

    Distances use the expanded form |q|^2 + |b|^2 - 2 q.b clamped at zero, as
    float32 brute force and faiss IndexFlatL2 do. A stable sort keeps ties in index order.
    """
    bank_sq = (bank * bank).sum(dim=1)
    rows = max(1, chunk_elems // bank.shape[0])
    out_d, out_i = [], []
    for start in range(0, queries.shape[0], rows):
        q = queries[start : start + rows]
        d = ((q * q).sum(dim=1, keepdim=True) - 2 * q @ bank.T + bank_sq).clamp_min(0)
        values, indices = torch.sort(d, dim=1, stable=True)
        out_d.append(values[:, :k])
        out_i.append(indices[:, :k])
    return torch.cat(out_d), torch.cat(out_i)
