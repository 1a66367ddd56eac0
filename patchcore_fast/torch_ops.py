"""The two kernels as PyTorch custom operators, torch.ops.patchcore_fast.{greedy_coreset, knn}.

torch.compile and torch.export see an operator with a known output shape (its fake
implementation) instead of stopping at an opaque pybind11 call. The operators take inputs
already validated by the public functions (float32, 2-D, finite, one device), which call them.
"""

from __future__ import annotations

import torch

from ._extension import _C

REGISTERED = False

if _C is not None:

    @torch.library.custom_op("patchcore_fast::greedy_coreset", mutates_args=())
    def greedy_coreset_op(space: torch.Tensor, initial: torch.Tensor, n: int, cuda_kernel: str) -> torch.Tensor:
        return _C.greedy_coreset(space, initial, n, cuda_kernel=cuda_kernel)

    @greedy_coreset_op.register_fake
    def _(space, initial, n, cuda_kernel):
        return space.new_empty((n,), dtype=torch.long)

    @torch.library.custom_op("patchcore_fast::knn", mutates_args=())
    def knn_op(queries: torch.Tensor, bank: torch.Tensor, k: int, cuda_kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _C.knn(queries, bank, k, cuda_kernel=cuda_kernel)

    @knn_op.register_fake
    def _(queries, bank, k, cuda_kernel):
        rows = queries.shape[0]
        return queries.new_empty((rows, k)), queries.new_empty((rows, k), dtype=torch.long)

    REGISTERED = True
