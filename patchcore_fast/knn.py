"""knn: the one entry point that validates and dispatches exact top-k squared-L2 search
to the CUDA kernel, the CPU kernel, or the pure-torch reference."""

from __future__ import annotations

import torch

from ._types import Progress

from . import _checks
from . import torch_ops  # noqa: F401  (registers torch.ops.patchcore_fast.*)
from ._extension import CUDA_MAX_K, _C, compiled
from .reference.knn import knn_reference

#: Largest number of query x bank distances the pure-torch fallback holds at once (64 MiB of
#: float32); the compiled kernels hold no distance matrix at all.
TILE_ELEMS = 1 << 24

# The CUDA kernel's warp layout (same results): "warp16x128", measured on an H200
# (benchmarks/NOTES.md), or "warp32x64", which reads a third fewer shared-memory bytes and
# has not yet run on a GPU. benchmarks/gpu_report.py times both.
CUDA_KERNELS = ("warp16x128", "warp32x64")
DEFAULT_CUDA_KERNEL = "warp16x128"


@torch.no_grad()
def knn(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, *, tile_elems: int = TILE_ELEMS,
        cuda_kernel: str = DEFAULT_CUDA_KERNEL, progress: Progress = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest bank rows of each query by squared L2.

    Returns (squared_distances [Q, k] ascending, indices [Q, k] int64); ties go to the
    lower bank index. Distances are float32 |q|^2 + |b|^2 - 2 q.b clamped at zero, the
    quantity float32 brute force and faiss IndexFlatL2 return. The Q x M matrix is never
    built: the compiled kernels keep their tiles in registers or on chip, the pure-torch
    fallback works in chunks of at most `tile_elems` distances. float16/bfloat16 inputs are
    upcast to float32. `cuda_kernel` picks the CUDA warp layout (same results). Values so
    large that squared distances would overflow float32 are refused with a ValueError, so
    every result is a finite distance and a valid index on every path. On the CPU,
    `progress(queries_done)` is called a few times a second and Ctrl-C stops the search
    (KeyboardInterrupt) within a fraction of a second.
    """
    queries = _checks.float_matrix(queries, "queries")
    bank = _checks.float_matrix(bank, "bank")
    _checks.same_device(queries, bank, "queries", "bank")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but bank rows have dim {bank.shape[1]}")
    k = _checks.integer(k, "k", 1, bank.shape[0])
    tile_elems = _checks.integer(tile_elems, "tile_elems", 1)
    if cuda_kernel not in CUDA_KERNELS:
        raise ValueError(f"cuda_kernel must be one of {CUDA_KERNELS}, got {cuda_kernel!r}")
    _checks.distances_fit_float32(queries, "queries", bank)

    if compiled(queries.device):
        if queries.device.type != "cuda" or k <= CUDA_MAX_K:
            if torch.compiler.is_compiling():  # the custom operator keeps the call in the traced graph
                return torch.ops.patchcore_fast.knn(queries, bank, k, cuda_kernel)
            return _C.knn(queries, bank, k, cuda_kernel=cuda_kernel, progress=progress)
    # Pure torch: no extension, or more neighbours than the fused CUDA kernel keeps.
    return knn_reference(queries, bank, k, chunk_elems=tile_elems)
