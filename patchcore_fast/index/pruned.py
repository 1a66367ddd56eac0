"""PrunedIndex: exact nearest-bank search that computes a small part of brute force's distances.

Built once per memory bank, and owning it: the bank's top principal directions and, per bank row, its
projection on them, an upper bound on the norm of the rest, and -|b|^2 / 2. A query's lower
bound on |q - b|^2 against every row is then one small matrix product (rank + 2 dimensions
instead of D), and only rows whose bound could beat the query's k-th distance get an exact
distance, computed exactly as `knn` computes it. The results are `knn`'s, float for float and
index for index; the rounding margin that makes this rigorous is derived in
csrc/cpu/search_bound.h.

Whether pruning pays is measured at build time on probe queries (patches like the ones to
come, e.g. training patches the coreset left out). Where it does not (random data, small D,
a tiny bank), `search` is plain `knn`. The screen runs on the CPU; on another device the index
is a FlatIndex of the same rows (`to`).
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from .._extension import _C, compiled
from ..knn import knn
from .base import Index
from .flat import FlatIndex

#: The screen costs (rank + 2) / D of brute force's arithmetic and leaves fewer rows the more
#: directions it has; how many fewer depends on the data (tire's 1024-d features: rank 64 leaves
#: ~2.5 %; textures of grass or gravel: 90 % at rank 64, 3-5 % at rank 256). So the rank is chosen
#: at build time from the probes among RANK_CHOICES (up to D / 2), minimising the predicted cost
#: (rows left + the screen's own share). Without probes: D / 16, at most 64.
RANK_CHOICES = (16, 32, 64, 128, 256)
RANK_SHARE = 16
MAX_RANK = 64
#: Probes on which each candidate rank is measured (the kernel's own count of exact distances).
RANK_PROBES = 512
#: Pruning is used when the probes predict at most this share of brute force's time: below it
#: the screen plus the exact rows are clearly cheaper; above it the gain is too small to matter.
PAYS_BELOW = 0.5
#: Probe queries measured at build time.
PROBES = 4096
#: Bank rows converted to float64 at a time while building.
CHUNK_ROWS = 65536
#: Rows whose stored projection is re-computed when an index is restored from a file.
CHECKED_ROWS = 8192


class PrunedIndex(Index):
    kind = "pruned"

    def __init__(self, vectors: torch.Tensor, basis: torch.Tensor, bank_screen: torch.Tensor, basis_rounding: float,
                 probe_share: float = 0.0, pays: bool = True):
        self._vectors = vectors
        self.basis = basis              # [rank, D] float32: top principal directions of the bank
        self.bank_screen = bank_screen  # [M, rank + 2] float32: projection, residual bound, -|b|^2 / 2
        self.basis_rounding = basis_rounding  # ||basis - its float64 original||_F
        self.probe_share = probe_share  # exact distances the probes needed, as a share of brute force's
        self.pays = pays                # pruning predicted to take at most PAYS_BELOW of brute force's time

    @property
    def vectors(self) -> torch.Tensor:
        return self._vectors

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def __len__(self) -> int:
        return len(self._vectors)

    @classmethod
    @torch.no_grad()
    def build(cls, bank: torch.Tensor, probes: torch.Tensor | None = None, rank: int | None = None) -> "PrunedIndex":
        """The index of `bank` [M, D] (float32, searched on the CPU). `probes` [P, D]: queries like
        the ones to come, on which the rank is chosen (RANK_CHOICES, measured with the kernel) and
        whether pruning pays is decided; without them the rank is D / 16 (at most 64) and pruning
        is assumed to pay. `rank` fixes the rank."""
        bank = _checks.float_matrix(bank, "bank").cpu()
        m, d = bank.shape
        if rank is not None:
            ranks = [_checks.integer(rank, "rank", 1, d)]
        else:
            ranks = [r for r in RANK_CHOICES if r <= d // 2] if probes is not None else []
            ranks = ranks or [max(1, min(MAX_RANK, d // RANK_SHARE))]
        # The bank's principal directions: the covariance summed in float32 per chunk of rows and in
        # float64 across chunks (any orthonormal basis keeps the search exact: the basis is then
        # made orthonormal in float64 and its float32 rounding enters the margin).
        total, second = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        for chunk in bank.split(CHUNK_ROWS):
            total += chunk.double().sum(dim=0)
            second += (chunk.T @ chunk).double()
        mean = total / m
        _, vectors = torch.linalg.eigh(second - m * torch.outer(mean, mean))  # m x the covariance
        top = max(ranks)
        basis64 = torch.linalg.qr(vectors[:, -top:].flip(1))[0].T.contiguous()  # orthonormal rows, leading first
        # Per row, once for the largest rank: the projections y (float64, stored as float32), the
        # squared norm of the part outside all `top` directions, and the squared norms of y's tails,
        # so that every smaller rank r has rho_r^2 = rho_top^2 + sum_{j >= r} y_j^2 (a sum of
        # positive terms: no cancellation; float64 error far below the float32 margin).
        inside32 = torch.empty(m, top)
        outside_sq = torch.empty(m, dtype=torch.float64)
        tails = torch.empty(m, len(ranks), dtype=torch.float64)
        half_sq = torch.empty(m)
        for start in range(0, m, CHUNK_ROWS):
            x = bank[start : start + CHUNK_ROWS].double()
            inside = x @ basis64.T
            rows = slice(start, start + len(x))
            inside32[rows] = inside.float()
            outside_sq[rows] = (x - inside @ basis64).square().sum(dim=1)
            tail = inside.square().flip(1).cumsum(1).flip(1)  # tail[:, j] = sum_{i >= j} y_i^2
            tails[rows] = torch.stack([tail[:, r] if r < top else torch.zeros(len(x), dtype=torch.float64)
                                       for r in ranks], dim=1)
            half_sq[rows] = _half_square_norms(x)

        def index_of_rank(n: int) -> "PrunedIndex":
            r = ranks[n]
            screen = torch.empty(m, r + 2)
            screen[:, :r] = inside32[:, :r]
            screen[:, r] = _round_up((outside_sq + tails[:, n]).sqrt() * (1 + 1e-9))
            screen[:, r + 1] = half_sq
            basis = basis64[:r].float().contiguous()
            return cls(bank, basis, screen, float((basis.double() - basis64[:r]).norm()))

        if probes is None:
            return index_of_rank(0)
        probes = _checks.float_matrix(probes, "probes").cpu()
        if len(probes) > RANK_PROBES:
            pick = torch.randperm(len(probes), generator=torch.Generator().manual_seed(0))[:RANK_PROBES]
            probes = probes[pick.sort().values]
        # Measured, not modelled: the kernel's own count on the probes, from the largest rank down
        # (cheap to measure: few rows survive) until the cost stops falling; the cost is the exact
        # distances plus the screen, as shares of brute force's arithmetic.
        best, best_cost = None, math.inf
        for n in reversed(range(len(ranks))):
            index = index_of_rank(n)
            index.probe_share = index.measure(probes)
            cost = index.probe_share + (ranks[n] + 2) / d
            if cost >= best_cost:
                break
            best, best_cost = index, cost
            if index.probe_share + (ranks[0] + 2) / d > PAYS_BELOW:
                break  # a smaller rank's bound is weaker: it leaves at least these rows and cannot pay
        best.pays = best_cost <= PAYS_BELOW
        return best

    def measure(self, probes: torch.Tensor, k: int = 1) -> float:
        """Share of brute force's exact distances the pruned search computes for `probes`."""
        if not compiled(torch.device("cpu")):
            return 1.0
        *_, computed = _C.knn_pruned(probes, self._vectors, k, self.basis, self.bank_screen, self.basis_rounding)
        return computed / (len(probes) * len(self._vectors))

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1, *, prune: bool | None = None, progress=None):
        """(squared distances [Q, k], indices [Q, k]): exactly `knn(queries, self.vectors, k)`.
        `prune`: None follows the build-time measurement."""
        queries = _checks.float_matrix(queries, "queries")
        bank = self._vectors
        if queries.shape[1] != bank.shape[1]:
            raise ValueError(f"queries have dim {queries.shape[1]} but bank rows have dim {bank.shape[1]}")
        k = _checks.integer(k, "k", 1, bank.shape[0])
        use = self.pays if prune is None else bool(prune)
        if (not use or queries.device.type != "cpu" or not compiled(queries.device)
                or torch.compiler.is_compiling()):
            return knn(queries, bank.to(queries.device), k, progress=progress)
        _checks.distances_fit_float32(queries, "queries", bank)
        distances, indices, _ = _C.knn_pruned(queries, bank, k, self.basis, self.bank_screen, self.basis_rounding,
                                              progress=progress)
        return distances, indices

    def rows(self, indices):
        return self._vectors[indices]

    def subset(self, keep):
        return FlatIndex(self._vectors[keep])

    def to(self, device):
        device = torch.device(device)
        return self if device.type == "cpu" else FlatIndex(self._vectors.to(device))

    def all_vectors(self):
        return self._vectors

    # ---------------------------------------------------------------- persistence (model_file.py)
    def state(self):
        return ({"search_basis": self.basis.contiguous(), "search_bank_screen": self.bank_screen.contiguous()},
                {"basis_rounding": self.basis_rounding, "probe_share": self.probe_share, "pays": self.pays})

    @classmethod
    def restore(cls, vectors: torch.Tensor, tensors: dict[str, torch.Tensor], meta: dict) -> "PrunedIndex":
        """The index a file holds, checked against the vectors it is stored with: a screen built for
        other rows would prune rows it must not, so it is refused (ValueError)."""
        basis, screen = tensors["search_basis"].float(), tensors["search_bank_screen"].float()
        if basis.dim() != 2 or screen.dim() != 2 or screen.shape[1] != basis.shape[0] + 2:
            raise ValueError("search index tensors have inconsistent shapes")
        if screen.shape[0] != len(vectors) or basis.shape[1] != vectors.shape[1]:
            raise ValueError(f"the search index was built for a [{screen.shape[0]}, {basis.shape[1]}] bank, "
                             f"not this [{len(vectors)}, {vectors.shape[1]}] one")
        rounding = float(meta["basis_rounding"])
        if not 0 <= rounding < 1e-3 or not math.isfinite(rounding):
            raise ValueError(f"search index basis_rounding {rounding!r} out of range")
        _check_screen_matches(vectors, basis, screen)
        return cls(vectors, basis, screen, rounding, float(meta["probe_share"]), bool(meta["pays"]))


def left_out_probes(rows: torch.Tensor, picks: torch.Tensor, seed: int) -> torch.Tensor:
    """Up to PROBES training patches the coreset left out (a seeded sample): queries like the ones
    to come, on which `build` measures whether pruning pays."""
    left_out = torch.ones(len(rows), dtype=torch.bool)
    left_out[picks.cpu()] = False
    candidates = left_out.nonzero().flatten()
    if len(candidates) == 0:
        return rows.cpu()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:PROBES]
    return rows.cpu()[candidates[order]]


def _half_square_norms(x64: torch.Tensor) -> torch.Tensor:
    return (-0.5 * x64.square().sum(1)).float()


def _check_screen_matches(vectors: torch.Tensor, basis: torch.Tensor, screen: torch.Tensor) -> None:
    """Every row's stored -|b|^2 / 2, and a seeded sample of rows' projections, must be those of
    `vectors` (to float32 rounding, whatever the summation order): otherwise the index belongs to
    another bank."""
    rank = basis.shape[0]
    for start in range(0, len(vectors), CHUNK_ROWS):
        x = vectors[start : start + CHUNK_ROWS].double()
        stored = screen[start : start + len(x), rank + 1].double()
        if not torch.allclose(_half_square_norms(x).double(), stored, rtol=1e-5, atol=0.0):
            raise ValueError("the search index was built for another memory bank (row norms differ)")
    sample = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:CHECKED_ROWS]
    x = vectors[sample].double()
    inside = x @ basis.double().T
    scale = x.norm(dim=1, keepdim=True) * 1e-4
    if bool(((inside - screen[sample, :rank].double()).abs() > scale + 1e-30).any()):
        raise ValueError("the search index was built for another memory bank (projections differ)")


def _round_up(values: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never below the float64 value."""
    out = values.float()
    low = out.double() < values
    return torch.where(low, torch.nextafter(out, torch.full_like(out, math.inf)), out)
