"""PrunedIndex: exact nearest-bank search that computes a small part of brute force's distances.

Built once per memory bank, and owning it: the bank's top principal directions and, per bank row, its
projection on them, an upper bound on the norm of the rest, and -|b|^2 / 2. A query's lower
bound on |q - b|^2 against every row is then one small matrix product (rank + 2 dimensions
instead of D), and only rows whose bound could beat the query's k-th distance get an exact
distance, computed exactly as `knn` computes it. The results are `knn`'s, float for float and
index for index; the rounding margin that makes this rigorous is derived in
csrc/cpu/search_bound.h.

The kernel screens in 8-bit integer codes of the projections (4 products per instruction and lane
with AVX512_VNNI, 2 on other x86 paths, against float32's one), with each code's error inside
the bound, and computes a row exactly only for the panel vectors of queries that keep it.
An index can also be a cascade (`first_rank`): a screen over the leading r1 directions for every
row, and the remaining rank - r1 directions added only for the rows it keeps (the same bound).

Whether pruning pays and the rank are chosen at build time from measurements on probe queries
(patches like the ones to come, e.g. training patches the coreset left out). Where pruning does
not pay (random data, small D, a tiny bank), `search` is plain `knn`. The screen runs on the CPU;
on another device the index is a FlatIndex of the same rows (`to`).
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from .._extension import _C, compiled
from ..knn import knn
from .._types import Progress
from .base import Index
from .flat import FlatIndex

#: The screen costs (rank + 2) / D of brute force's arithmetic over the codes' speed-up
#: (coded_screen_speedup) and leaves fewer rows the more directions it has; how many fewer depends
#: on the data (tire's 1024-d features: rank 64 leaves ~3 %; textures of grass or gravel: 75-80 %
#: at rank 64, 3 % at rank 256). So the rank is chosen at build time from the probes among
#: RANK_CHOICES (up to D / 2), minimising the predicted cost (rows left + the screen's own
#: share). Without probes: D / 16, at most 64.
RANK_CHOICES = (16, 32, 64, 128, 192, 256)
RANK_SHARE = 16
MAX_RANK = 64
#: Probes on which each candidate rank is measured (the kernel's own count of exact distances).
RANK_PROBES = 512
#: Whether a cascade beats the chosen single screen is judged with these weights on the probes'
#: counts (per unit of the screens' arithmetic): the extension screens gathered rows one panel
#: vector at a time, at several times the cost of its arithmetic, and test patches need more exact
#: rows than the probes (training patches the coreset left out sit nearer the bank): least squares
#: of measured search times of test patches on the probes' counts (brick, grass and gravel, 13 ranks
#: and cascades each, AVX2 and AVX-512 paths; benchmarks/NOTES.md, issue 20) put 6.2-7.7 on the
#: extension and 2.7-3.4 on the exact rows.
CASCADE_EXTENSION_WEIGHT = 7.0
CASCADE_EXACT_WEIGHT = 3.0
#: Pruning is used when the probes predict at most this share of brute force's time: below it
#: the screen plus the exact rows are clearly cheaper; above it the gain is too small to matter.
PAYS_BELOW = 0.5
#: Probe queries measured at build time.
PROBES = 4096
#: Bank rows whose covariance gives the directions (an evenly strided sample of larger banks).
COVARIANCE_ROWS = 8192
#: Bank rows converted to float64 at a time while building (64 MB at D = 1024).
CHUNK_ROWS = 1024
#: Rows whose stored projection is re-computed when an index is restored from a file.
CHECKED_ROWS = 8192


class PrunedIndex(Index):
    kind = "pruned"

    def __init__(self, vectors: torch.Tensor, basis: torch.Tensor, bank_screen: torch.Tensor, basis_rounding: float,
                 probe_share: float = 0.0, pays: bool = True, bank_extension: torch.Tensor | None = None,
                 probe_cost: float | None = None):
        self._vectors = vectors
        self.basis = basis              # [rank, D] float32: top principal directions of the bank
        self.bank_screen = bank_screen  # [M, r1 + 2] float32: projection on the first r1, residual bound, -|b|^2 / 2
        # [M, rank - r1 + 2] float32 for a cascade (r1 < rank): projection on the rest, residual
        # bound at the full rank, minus the rank-r1 bound; None when r1 = rank.
        self.bank_extension = bank_extension
        self.basis_rounding = basis_rounding  # ||basis - its float64 original||_F
        self.probe_share = probe_share  # exact distances the probes needed, as a share of brute force's
        # the probes' predicted time as a share of brute force's: screen, extension and exact rows
        self.probe_cost = probe_share + self._screen_cost(1.0) if probe_cost is None else probe_cost
        self.pays = pays                # pruning predicted to take at most PAYS_BELOW of brute force's time
        self.probe_extended = 0.0       # share of rows the extension screened for the probes (measure)

    @property
    def vectors(self) -> torch.Tensor:
        return self._vectors

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    @property
    def first_rank(self) -> int:
        """Directions of the first screen (= rank unless the index is a cascade)."""
        return self.bank_screen.shape[1] - 2

    def _screen_cost(self, extended_share: float) -> float:
        """The screens' arithmetic as a share of brute force's, `extended_share` of the rows
        reaching the extension."""
        d = self._vectors.shape[1]
        extension = 0 if self.bank_extension is None else self.bank_extension.shape[1]
        return (self.first_rank + 2) / d / coded_screen_speedup() + extended_share * extension / d

    def __len__(self) -> int:
        return len(self._vectors)

    @classmethod
    @torch.no_grad()
    def build(cls, bank: torch.Tensor, probes: torch.Tensor | None = None, rank: int | None = None,
              first_rank: int | None = None, like: "PrunedIndex | None" = None) -> "PrunedIndex":
        """The index of `bank` [M, D] (float32, searched on the CPU). `probes` [P, D]: queries like
        the ones to come, on which the rank and the cascade are chosen (RANK_CHOICES, measured with
        the kernel) and whether pruning pays is decided; without them the rank is D / 16 (at most
        64) and pruning is assumed to pay. `rank` fixes the rank, and `first_rank` (< rank) makes
        the index a cascade with a first screen of that many directions. `like`: an index of a
        bank from the same data (e.g. a fit on a subset of the images) whose directions, ranks and
        decision are taken instead of measured: no covariance, no probes; still exact."""
        bank = _checks.float_matrix(bank, "bank").cpu()
        m, d = bank.shape
        if first_rank is not None and rank is None:
            raise ValueError("first_rank needs rank")
        if like is not None:
            if rank is not None or probes is not None:
                raise ValueError("like takes the rank and the decision from that index: give no rank or probes")
            if like.vectors.shape[1] != d:
                raise ValueError(f"like is an index of {like.vectors.shape[1]}-d rows, the bank has {d}")
            rank, first_rank = like.rank, (like.first_rank if like.first_rank < like.rank else None)
        if rank is not None:
            ranks = [_checks.integer(rank, "rank", 1, d)]
            if first_rank is not None:
                ranks.insert(0, _checks.integer(first_rank, "first_rank", 1, ranks[0] - 1))
        else:
            ranks = [r for r in RANK_CHOICES if r <= d // 2] if probes is not None else []
            ranks = ranks or [max(1, min(MAX_RANK, d // RANK_SHARE))]
        # The bank's principal directions: the covariance summed in float32 per chunk of rows and in
        # float64 across chunks (any orthonormal basis keeps the search exact: the basis is then
        # made orthonormal in float64 and its float32 rounding enters the margin).
        top = max(ranks)
        if like is not None:  # the other index's directions, made orthonormal in float64 again
            basis64 = torch.linalg.qr(like.basis.double().T)[0].T.contiguous()
        else:
            # From an evenly strided sample of at most COVARIANCE_ROWS rows: the directions only
            # need to be good, and the sample keeps this cost flat as banks grow.
            sample = bank[:: -(-m // COVARIANCE_ROWS)]
            total, second = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
            for chunk in sample.split(CHUNK_ROWS):
                total += chunk.sum(dim=0, dtype=torch.float64)
                second += (chunk.T @ chunk).double()
            mean = total / len(sample)
            # n x the covariance, decomposed in float32 (a third of float64's time; the directions only
            # need to be good, and the QR below makes them orthonormal in float64)
            _, vectors = torch.linalg.eigh((second - len(sample) * torch.outer(mean, mean)).float())
            vectors = vectors.double()
            basis64 = torch.linalg.qr(vectors[:, -top:].flip(1))[0].T.contiguous()  # orthonormal rows, leading first
        # Per row, once for the largest rank: the projections y (float64, stored as float32), an
        # upper bound on the squared norm of the part outside all `top` directions, |x|^2 - |y|^2
        # plus its float64 rounding bound (the sums' (d + top) 2^-53 |x|^2 and the basis's
        # departure from orthonormality, ~1e-15 |x|^2: far below the float32 margin), and the
        # squared norms of y's tails, so that every smaller rank r has rho_r^2 = rho_top^2 +
        # sum_{j >= r} y_j^2 (a sum of positive terms).
        slack = 4 * (d + top + 16) * 2.0**-53 + 1e-13
        inside32 = torch.empty(m, top)
        outside_sq = torch.empty(m, dtype=torch.float64)
        tails = torch.empty(m, len(ranks), dtype=torch.float64)
        half_sq = torch.empty(m)
        for start in range(0, m, CHUNK_ROWS):
            x = bank[start : start + CHUNK_ROWS].double()
            inside = x @ basis64.T
            rows = slice(start, start + len(x))
            inside32[rows] = inside.float()
            norm_sq = torch.einsum("ij,ij->i", x, x)
            inside_sq = inside.square()
            # tails[:, n] = sum_{i >= ranks[n]} y_i^2: the segments between ranks, summed from the last
            segments = torch.stack([inside_sq[:, lo:hi].sum(dim=1) for lo, hi in zip(ranks, ranks[1:] + [top])], 1)
            tails[rows] = segments.flip(1).cumsum(1).flip(1)
            projected_sq = tails[rows, 0] + inside_sq[:, : ranks[0]].sum(dim=1)
            outside_sq[rows] = (norm_sq - projected_sq).clamp_min(0) + slack * norm_sq
            half_sq[rows] = (-0.5 * norm_sq).float()

        def index_of(n: int, first: int | None = None) -> "PrunedIndex":
            """Rank ranks[n]; a cascade with a first screen of rank ranks[first] when given."""
            r = ranks[n]
            r1 = r if first is None else ranks[first]

            def residual(i: int) -> torch.Tensor:  # R_b at rank ranks[i], rounded up
                return _round_up((outside_sq + tails[:, i]).sqrt() * (1 + 1e-9))

            screen = torch.empty(m, r1 + 2)
            screen[:, :r1] = inside32[:, :r1]
            screen[:, r1] = residual(n if first is None else first)
            screen[:, r1 + 1] = half_sq
            extension = None
            if first is not None:
                extension = torch.empty(m, r - r1 + 2)
                extension[:, : r - r1] = inside32[:, r1:r]
                extension[:, r - r1] = residual(n)
                extension[:, r - r1 + 1] = -screen[:, r1]
            basis = basis64[:r].float().contiguous()
            return cls(bank, basis, screen, float((basis.double() - basis64[:r]).norm()), bank_extension=extension)

        if like is not None:
            index = index_of(1, first=0) if first_rank is not None else index_of(0)
            index.probe_share, index.probe_cost, index.pays = like.probe_share, like.probe_cost, like.pays
            return index
        if first_rank is not None:
            cascade = index_of(1, first=0)
            if probes is not None:
                cascade.measure(_checks.float_matrix(probes, "probes").cpu()[:RANK_PROBES])
                cascade.pays = cascade.probe_cost <= PAYS_BELOW
            return cascade
        if probes is None:
            return index_of(0)
        probes = _checks.float_matrix(probes, "probes").cpu()
        if len(probes) > RANK_PROBES:
            pick = torch.randperm(len(probes), generator=torch.Generator().manual_seed(0))[:RANK_PROBES]
            probes = probes[pick.sort().values]
        # Measured, not modelled: the kernel's own counts on the probes, single screens from the
        # largest rank down (cheap to measure: few rows survive) until a rank leaves at least the
        # best cost so far in rows alone: a smaller rank leaves at least as many.
        best, measured = None, {}
        for n in reversed(range(len(ranks))):
            index = measured[n] = index_of(n)
            index.measure(probes)
            if best is None or index.probe_cost < best.probe_cost:
                best, chosen = index, n
            if index.probe_share >= best.probe_cost:
                break
        # Then one cascade: the chosen screen first, then the rest of twice its directions (the
        # largest rank at most), or, when the chosen rank is the largest, three quarters of it
        # first. Its first screen keeps what the chosen one keeps, and the extension rescreens
        # those rows with a few more directions instead of computing them: it pays when it rules
        # out enough of them (tire: 64 then 128; textures: 192 then 256). The probes decide, with
        # the cascade weights above, against the chosen screen judged the same way.
        top = len(ranks) - 1
        wider = min(top, next((n for n in range(len(ranks)) if ranks[n] >= 2 * ranks[chosen]), top))
        first = chosen if chosen < top else next((n for n in range(top) if 4 * ranks[n] >= 3 * ranks[top]), None)
        if first is not None and first < wider:
            cascade = index_of(wider, first=first)
            cascade.measure(probes)
            if _judged(cascade) < _judged(best):
                best = cascade
        best.pays = best.probe_cost <= PAYS_BELOW
        return best

    def measure(self, probes: torch.Tensor, k: int = 1) -> float:
        """Share of brute force's exact distances the pruned search computes for `probes` (also
        kept, with the predicted cost, in probe_share and probe_cost)."""
        if not compiled(torch.device("cpu")):
            return 1.0
        *_, computed, extended = _C.knn_pruned(probes, self._vectors, k, self.basis, self.bank_screen,
                                               self.basis_rounding, self.bank_extension)
        pairs = len(probes) * len(self._vectors)
        self.probe_share = computed / pairs
        self.probe_extended = extended / pairs  # rows the extension screened (in whole panels)
        self.probe_cost = self.probe_share + self._screen_cost(extended / pairs)
        return self.probe_share

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1, *, prune: bool | None = None,
               progress: Progress = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        distances, indices, *_ = _C.knn_pruned(queries, bank, k, self.basis, self.bank_screen, self.basis_rounding,
                                               self.bank_extension, progress=progress)
        return distances, indices

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self._vectors[indices]

    def to(self, device: torch.device | str) -> Index:
        device = torch.device(device)
        return self if device.type == "cpu" else FlatIndex(self._vectors.to(device))

    def all_vectors(self) -> torch.Tensor:
        return self._vectors

    # ---------------------------------------------------------------- persistence (model_file.py)
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"search_basis": self.basis.contiguous(), "search_bank_screen": self.bank_screen.contiguous()}
        if self.bank_extension is not None:
            tensors["search_bank_extension"] = self.bank_extension.contiguous()
        return tensors, {"basis_rounding": self.basis_rounding, "probe_share": self.probe_share,
                         "probe_cost": self.probe_cost, "pays": self.pays}

    @classmethod
    def restore(cls, vectors: torch.Tensor, tensors: dict[str, torch.Tensor], meta: dict) -> "PrunedIndex":
        """The index a file holds, checked against the vectors it is stored with: a screen built for
        other rows would prune rows it must not, so it is refused (ValueError)."""
        basis, screen = tensors["search_basis"].float(), tensors["search_bank_screen"].float()
        extension = tensors.get("search_bank_extension")
        extension = None if extension is None else extension.float()
        if basis.dim() != 2 or screen.dim() != 2:
            raise ValueError("search index tensors have inconsistent shapes")
        rank, first = basis.shape[0], screen.shape[1] - 2
        if extension is None and first != rank:
            raise ValueError("search index tensors have inconsistent shapes")
        if extension is not None and (not 1 <= first < rank or extension.dim() != 2
                                      or extension.shape != (len(screen), rank - first + 2)):
            raise ValueError("search index tensors have inconsistent shapes (cascade)")
        if screen.shape[0] != len(vectors) or basis.shape[1] != vectors.shape[1]:
            raise ValueError(f"the search index was built for a [{screen.shape[0]}, {basis.shape[1]}] bank, "
                             f"not this [{len(vectors)}, {vectors.shape[1]}] one")
        rounding = float(meta["basis_rounding"])
        if not 0 <= rounding < 1e-3 or not math.isfinite(rounding):
            raise ValueError(f"search index basis_rounding {rounding!r} out of range")
        _check_screen_matches(vectors, basis, screen, extension)
        share = float(meta["probe_share"])
        cost = meta.get("probe_cost")
        return cls(vectors, basis, screen, rounding, share, bool(meta["pays"]), extension,
                   None if cost is None else float(cost))


def coded_screen_speedup() -> float:
    """How many times float32's multiply-adds per instruction the 8-bit first screen does on the
    CPU path in use (4 with AVX512_VNNI, 2 on other x86 paths, 1 on the portable one)."""
    return float(_C.build_info()["coded_screen_speedup"]) if _C is not None else 1.0


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


def _check_screen_matches(vectors: torch.Tensor, basis: torch.Tensor, screen: torch.Tensor,
                          extension: torch.Tensor | None) -> None:
    """Every row's stored -|b|^2 / 2, and a seeded sample of rows' projections, must be those of
    `vectors` (to float32 rounding, whatever the summation order): otherwise the index belongs to
    another bank. A cascade's extension must undo the first screen's residual bound exactly."""
    first = screen.shape[1] - 2
    for start in range(0, len(vectors), CHUNK_ROWS):
        x = vectors[start : start + CHUNK_ROWS].double()
        stored = screen[start : start + len(x), first + 1].double()
        if not torch.allclose(_half_square_norms(x).double(), stored, rtol=1e-5, atol=0.0):
            raise ValueError("the search index was built for another memory bank (row norms differ)")
    projections = screen[:, :first]
    if extension is not None:
        if not torch.equal(extension[:, -1], -screen[:, first]):
            raise ValueError("the search index's cascade does not match its first screen")
        projections = torch.cat([projections, extension[:, :-2]], dim=1)
    sample = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:CHECKED_ROWS]
    x = vectors[sample].double()
    inside = x @ basis.double().T
    scale = x.norm(dim=1, keepdim=True) * 1e-4
    if bool(((inside - projections[sample].double()).abs() > scale + 1e-30).any()):
        raise ValueError("the search index was built for another memory bank (projections differ)")


def _judged(index: PrunedIndex) -> float:
    """An index's predicted cost with the cascade weights (from its probe measurement)."""
    d = index.vectors.shape[1]
    extension = 0 if index.bank_extension is None else index.bank_extension.shape[1]
    screen = (index.first_rank + 2) / d / coded_screen_speedup()
    return (screen + CASCADE_EXTENSION_WEIGHT * index.probe_extended * extension / d
            + CASCADE_EXACT_WEIGHT * index.probe_share)


def _round_up(values: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never below the float64 value."""
    out = values.float()
    low = out.double() < values
    return torch.where(low, torch.nextafter(out, torch.full_like(out, math.inf)), out)
