"""greedy_coreset: the one entry point that validates, projects, starts, and dispatches
to the CUDA kernel, the CPU kernel, or the pure-torch reference."""

from __future__ import annotations

import math
import numbers

import torch

from ._types import Progress

from . import _checks
from . import torch_ops  # noqa: F401  (registers torch.ops.patchcore_fast.*)
from ._extension import _C, compiled
from .knn import knn
from .reference.coreset import greedy_coreset_reference, pairwise_l2


# The CUDA kernels that run the selection (both give the same picks): "cached", the one
# measured on an H200 (benchmarks/NOTES.md), or "resident", which keeps a W1-sized
# selection on chip and has not yet run on a GPU. benchmarks/gpu_report.py times both.
CUDA_KERNELS = ("cached", "resident")
DEFAULT_CUDA_KERNEL = "cached"


def random_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> torch.Tensor:
    """Weights [dim_out, dim_in] of a freshly initialised bias-free nn.Linear, as the authors
    use: uniform in +-1/sqrt(dim_in) (kaiming_uniform with a = sqrt(5))."""
    bound = 1.0 / math.sqrt(dim_in)
    return torch.empty(dim_out, dim_in).uniform_(-bound, bound, generator=generator)


def start_rows(num_rows: int, num_starts: int, generator: torch.Generator) -> torch.Tensor:
    """The authors' start points: `num_starts` rows drawn without replacement (not selected)."""
    return torch.randperm(num_rows, generator=generator)[: min(num_starts, num_rows)]


def mean_start_distances(space: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each row's mean L2 distance to the start points' rows `centres`. On the CPU each value is
    summed in one fixed order, so a row gets the same float in one process or on any rank of a
    distributed run (patchcore_fast.distributed)."""
    if space.device.type == "cpu" and compiled(space.device):
        return _C.mean_distances(space, centres.contiguous())
    return pairwise_l2(space, centres).mean(dim=1)


def project(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """features @ weights.T; on the CPU each element in one fixed order (as mean_start_distances)."""
    if features.device.type == "cpu" and compiled(features.device):
        return _C.fixed_order_projection(features, weights.contiguous())
    return features @ weights.to(features.device).T


def seeded_start(features: torch.Tensor, projection_dim: int | None = 128, num_starts: int = 10, seed: int = 0,
                 draw_start: bool = True, space: torch.Tensor | None = None):
    """The authors' seeded setup, the one place it is written: one CPU generator seeded with `seed`
    draws the projection (skipped when projection_dim is None or equals the width), then the
    start rows. Returns (selection space [N, projection_dim], start distances [N] or None).
    `space`: the features' selection space already computed (`selection_space`); the projection is
    then drawn but not applied again."""
    generator = torch.Generator().manual_seed(seed)
    weights = projection_weights(features.shape[1], projection_dim, generator)
    if space is None:
        space = features if weights is None else project(features, weights)
    if not draw_start:
        return space, None
    starts = start_rows(len(space), num_starts, generator).to(space.device)
    return space, mean_start_distances(space, space[starts])


def selection_space(features: torch.Tensor, projection_dim: int | None = 128, seed: int = 0) -> torch.Tensor | None:
    """The space `greedy_coreset(features, projection_dim=..., seed=...)` selects in, when each row's
    projection depends on that row alone (the CPU kernel's fixed summation order), so that the rows
    of any subset of the features have the subset's space: a fit's cross-fitted folds reuse it.
    None where that does not hold (CUDA, no extension)."""
    if features.device.type != "cpu" or not compiled(features.device):
        return None
    return seeded_start(features, projection_dim, seed=seed, draw_start=False)[0]


def projection_weights(dim: int, projection_dim: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """The seeded projection's weights [projection_dim, dim], or None where the authors skip it
    (projection_dim None or equal to the width)."""
    if projection_dim is None or projection_dim == dim:
        return None
    return random_projection(dim, projection_dim, generator)


def coreset_size(num_rows: int, ratio=None, n=None) -> int:
    if (ratio is None) == (n is None):
        raise ValueError("give exactly one of ratio (a fraction in (0, 1]) or n (a number of points)")
    if n is not None:
        return _checks.integer(n, "n", 1, num_rows)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    size = int(num_rows * ratio)  # the authors' rounding
    if size < 1:
        raise ValueError(f"ratio {ratio} of {num_rows} points selects no point: the ratio must be at least "
                         f"{1 / num_rows:.2g} (or give n, a number of points)")
    return size


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    ratio: float | None = None,
    *,
    n: int | None = None,
    projection_dim: int | None = 128,
    num_starts: int = 10,
    seed: int = 0,
    initial_distances: torch.Tensor | None = None,
    cuda_kernel: str = DEFAULT_CUDA_KERNEL,
    progress: Progress = None,
    space: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy k-center coreset of the rows of `features` [N, D]: int64 indices in selection order.

    Give `ratio` (size = int(N * ratio), as the authors round) or `n`. By default the
    selection runs on a random 128-d projection and starts from each point's mean
    distance to `num_starts` random points, like the authors' approximate sampler;
    `projection_dim=None` runs it on the features themselves (exact variant).
    `initial_distances` [N] (L2, in the space the selection runs in) replaces the random
    start: the first pick is its argmax. Continuing a coreset from an existing memory
    bank is `initial_distances` = each row's distance to its nearest bank entry.

    Randomness: `seed` seeds one CPU torch.Generator that draws, in this order, the
    projection weights and then the start points, so a given seed gives the same
    projection and start on every device; the selection itself is deterministic
    (ties go to the lowest index), so results repeat exactly for a seed on a device.
    float16/bfloat16 features are upcast; the selection runs in float32. `cuda_kernel` picks
    the CUDA kernel (same picks; see CUDA_KERNELS). Values so large that squared distances
    would overflow float32 are refused with a ValueError. `progress(picks_done)`, if given, is
    called from inside the CPU selection a few times a second; Ctrl-C stops the CPU selection
    within one pass (milliseconds) with KeyboardInterrupt. `space`: `selection_space(features,
    projection_dim, seed)` if already computed (or rows of a larger set's), to skip the projection.
    """
    features = _checks.float_matrix(features, "features")
    num_rows, dim = features.shape
    size = coreset_size(num_rows, ratio, n)
    num_starts = _checks.integer(num_starts, "num_starts", 1)
    if projection_dim is not None:
        projection_dim = _checks.integer(projection_dim, "projection_dim", 1)
    seed = _checks.integer(seed, "seed", 0)
    if cuda_kernel not in CUDA_KERNELS:
        raise ValueError(f"cuda_kernel must be one of {CUDA_KERNELS}, got {cuda_kernel!r}")

    if space is not None:
        width = dim if projection_dim is None or projection_dim == dim else projection_dim
        space = _checks.float_matrix(space, "space")
        if space.shape != (num_rows, width) or space.device != features.device:
            raise ValueError(f"space must be the features' selection space [{num_rows}, {width}] on {features.device}, "
                             f"got {tuple(space.shape)} on {space.device}")
    space, initial = seeded_start(features, projection_dim, num_starts, seed, draw_start=initial_distances is None,
                                  space=space)
    _checks.distances_fit_float32(space, "features" if space is features else "projected features")
    if initial_distances is not None:
        initial = _checks.float_vector(initial_distances, "initial_distances", num_rows, features.device)

    if compiled(features.device):
        if torch.compiler.is_compiling():  # the custom operator keeps the call in the traced graph
            return torch.ops.patchcore_fast.greedy_coreset(space, initial, size, cuda_kernel)
        return _C.greedy_coreset(space, initial, size, cuda_kernel=cuda_kernel, progress=progress)
    return greedy_coreset_reference(space, initial, size)


@torch.no_grad()
def distances_to_bank(features: torch.Tensor, bank: torch.Tensor, projection_dim: int | None = 128, seed: int = 0,
                      space: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the features' selection space [N, width], each row's L2 distance [N] to its nearest `bank` row
    in that space): the state a greedy selection (same projection_dim and seed) is in when it has
    picked the bank's rows, from which it continues (`continued_coreset`). `space` as in greedy_coreset."""
    features = _checks.float_matrix(features, "features")
    bank = _checks.float_matrix(bank, "bank")
    if bank.shape[1] != features.shape[1]:
        raise ValueError(f"bank must be [M, {features.shape[1]}] like the features' rows, got {tuple(bank.shape)}")
    bank = bank.to(features.device)
    if space is None:
        space = seeded_start(features, projection_dim, seed=seed, draw_start=False)[0]
    bank_space = seeded_start(bank, projection_dim, seed=seed, draw_start=False)[0]
    _checks.distances_fit_float32(space, "projected features", bank_space)
    nearest = knn(space.contiguous(), bank_space.contiguous(), 1)[0][:, 0]
    return space, nearest.clamp_min(0).sqrt()


@torch.no_grad()
def continued_coreset(features: torch.Tensor, bank: torch.Tensor, ratio: float | None = None, *, n: int | None = None,
                      projection_dim: int | None = 128, seed: int = 0, cuda_kernel: str = DEFAULT_CUDA_KERNEL,
                      progress: Progress = None) -> torch.Tensor:
    """The greedy selection continued from an existing memory bank `bank` [M, D] (selected with the
    same projection_dim and seed) over new rows `features` [N, D]: int64 indices into the features,
    in the order the selection adds them. Each new row starts at its distance to the nearest bank
    row (`distances_to_bank`), so a new row that a bank row already covers is picked late or never.
    Its cost grows with N (and M through one nearest-row search), never with the rows the bank was
    selected from. Give `ratio` (int(N * ratio) picks) or `n`."""
    space, initial = distances_to_bank(features, bank, projection_dim, seed)
    return greedy_coreset(features, ratio, n=n, projection_dim=projection_dim, seed=seed, initial_distances=initial,
                          cuda_kernel=cuda_kernel, progress=progress, space=space)
