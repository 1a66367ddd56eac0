"""knn: the one entry point that validates and dispatches exact top-k squared-L2 search
to the CUDA kernel, the CPU kernel, or the pure-torch reference."""

from __future__ import annotations

import torch

from . import _checks
from ._extension import CUDA_MAX_K, _C, compiled
from .reference.knn import knn_reference

#: Largest number of query x bank distances the CPU kernel holds at once (64 MiB of float32).
TILE_ELEMS = 1 << 24

# The CUDA kernel's warp layout (same results): "warp16x128", measured on an H200
# (benchmarks/NOTES.md), or "warp32x64", which reads a third fewer shared-memory bytes and
# has not yet run on a GPU. benchmarks/gpu_report.py times both.
CUDA_KERNELS = ("warp16x128", "warp32x64")
CUDA_KERNEL = "warp16x128"


@torch.no_grad()
def knn(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, *, tile_elems: int = TILE_ELEMS):
    """Exact k nearest bank rows of each query by squared L2.

    Returns (squared_distances [Q, k] ascending, indices [Q, k] int64); ties go to the
    lower bank index. Distances are float32 |q|^2 + |b|^2 - 2 q.b clamped at zero, the
    quantity float32 brute force and faiss IndexFlatL2 return. The Q x M matrix is never
    built: the CPU kernel works in tiles of at most `tile_elems` distances, the CUDA
    kernel keeps its tiles on chip. float16/bfloat16 inputs are upcast to float32.
    """
    queries = _checks.float_matrix(queries, "queries")
    bank = _checks.float_matrix(bank, "bank")
    _checks.same_device(queries, bank, "queries", "bank")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but bank rows have dim {bank.shape[1]}")
    k = _checks.integer(k, "k", 1, bank.shape[0])
    tile_elems = _checks.integer(tile_elems, "tile_elems", 1)

    if compiled(queries.device):
        if queries.device.type != "cuda" or k <= CUDA_MAX_K:
            return _C.knn(queries, bank, k, cuda_kernel=CUDA_KERNEL)
    # Pure torch: no extension, or more neighbours than the fused CUDA kernel keeps.
    return knn_reference(queries, bank, k, chunk_elems=tile_elems)
