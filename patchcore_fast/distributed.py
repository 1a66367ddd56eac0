"""PatchCore across processes with torch.distributed: gloo on CPUs, NCCL on GPUs, launched with torchrun.

Rows are split contiguously: rank r holds images [r * I / R, (r + 1) * I / R) of the I images (a
DistributedSampler split without shuffling), so the concatenation of the shards in rank order is
the single-process feature matrix and a row's global index is its rank's offset plus its local index.

- `greedy_coreset(local_rows, ...)`: exactly the picks of the single-process `greedy_coreset` on
  the concatenated rows (same seed, projection and start; each value is summed in a fixed order,
  so a row's floats do not depend on which rank computes it). One round = one pass over each
  rank's rows and one `all_gather` of each rank's farthest rows, from which every rank picks the
  same batch of centres (tens of picks per round; the single-process kernel's rule with ranks in
  place of threads, csrc/cpu/coreset_batch.h).
- `search(queries, local_bank, local_ids, k)`: every rank searches its shard, the per-query lists
  are gathered and merged by (distance, global bank index): exactly `knn` on the whole bank.
- The sharded bank itself is `index.sharded.ShardedIndex`; `workers.ProcessGroup` wires these into a
  fit, a prediction and a save (one ordinary model file written by rank 0, loadable anywhere).

Every collective waits at most PATCHCORE_DIST_TIMEOUT seconds (default 600) for the other ranks;
a rank that died or hangs makes the others fail with DistributedError naming the step.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _checks
from ._extension import _C, compiled
from .coreset import coreset_size, mean_start_distances, project, projection_weights, start_rows
from .errors import UserError
from .knn import knn

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(UserError):
    """Another rank died, or a collective waited longer than the timeout."""


def active() -> bool:
    """Inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    return rank_and_size()[0] == 0


def init_from_environment(timeout_s: float | None = None) -> bool:
    """Joins the process group torchrun describes (WORLD_SIZE > 1; RANK, MASTER_ADDR, MASTER_PORT):
    NCCL where this rank has a GPU, else gloo. Returns whether this process is one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        timeout = float(timeout_s if timeout_s is not None else os.environ.get("PATCHCORE_DIST_TIMEOUT",
                                                                                DEFAULT_TIMEOUT_S))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        with collective("joining the process group"):
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        atexit.register(shutdown)  # a group left open at exit can abort the process (gloo's threads)
    return active()


def shutdown() -> None:
    """Leaves the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(count: int, rank: int | None = None, size: int | None = None, unit: int = 1) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of `count` items, in whole runs of `unit` items
    (the backbone's micro-batches, whose floats can depend on the batch they run in), as even as
    those runs allow."""
    if rank is None or size is None:
        rank, size = rank_and_size()
    units = -(-count // unit)
    return min(count, units * rank // size * unit), min(count, units * (rank + 1) // size * unit)


@contextlib.contextmanager
def collective(what: str):
    """Turns a failed or timed-out collective into one clear DistributedError."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as error:  # gloo/NCCL errors, timeouts, a peer's closed connection
        rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else ("?", "?")
        raise DistributedError(f"rank {rank} of {size}: {what} failed: another rank stopped, or did not answer "
                               f"within the timeout (PATCHCORE_DIST_TIMEOUT): {str(error).splitlines()[0]}") from error


def _comm_device() -> torch.device:
    """Where collectives take their tensors: the GPU with NCCL, the CPU with gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather(tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape and dtype on every rank), in rank order, on this tensor's device."""
    device = _comm_device()
    local = tensor.to(device).contiguous()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    with collective(what):
        dist.all_gather(out, local)
    return [t.to(tensor.device) for t in out]


def all_gather_rows(local: torch.Tensor, what: str) -> torch.Tensor:
    """The concatenation, in rank order, of every rank's `local` [n_r, ...] (n_r may differ)."""
    counts = [int(c) for c in all_gather(torch.tensor([len(local)]), what)]
    padded = torch.zeros(max(counts), *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = all_gather(padded, what)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def broadcast(tensor: torch.Tensor, source: int, what: str) -> torch.Tensor:
    """`tensor` as rank `source` holds it (every rank passes a tensor of the same shape and dtype)."""
    buffer = tensor.to(_comm_device()).contiguous()
    with collective(what):
        dist.broadcast(buffer, source)
    return buffer.to(tensor.device)


def row_counts(local_rows: int, what: str) -> list[int]:
    return [int(c) for c in all_gather(torch.tensor([local_rows], dtype=torch.int64), what)]


def _owner(index: int, offsets: list[int]) -> int:
    """The rank whose rows hold global row `index` (offsets: each rank's first row, plus the total)."""
    for rank in range(len(offsets) - 1):
        if offsets[rank] <= index < offsets[rank + 1]:
            return rank
    raise IndexError(index)


def gather_rows(local: torch.Tensor, indices: torch.Tensor, offsets: list[int], what: str) -> torch.Tensor:
    """Rows `indices` (global) of the distributed matrix whose shard this rank holds as `local`: each
    from its owner, exactly (a broadcast per owning rank)."""
    rank = dist.get_rank()
    out = torch.zeros(len(indices), local.shape[1], dtype=local.dtype, device=local.device)
    for source in range(len(offsets) - 1):
        mine = (indices >= offsets[source]) & (indices < offsets[source + 1])
        if not bool(mine.any()):
            continue
        part = local[indices[mine] - offsets[rank]] if source == rank else out[mine]
        out[mine] = broadcast(part, source, what)
    return out


# ---------------------------------------------------------------------------------------- coreset
@dataclass
class RoundStats:
    """What a distributed coreset's rounds cost on this rank: one pass, one all_gather, one pick each."""
    rounds: int = 0
    picks_per_round: float = 0.0
    pass_s: float = 0.0      # this rank's passes over its rows
    gather_s: float = 0.0    # the all_gathers (waiting for the slowest rank included)
    pick_s: float = 0.0      # picking from the union, pinning
    bytes_sent: int = 0      # this rank's offers

    def add(self, pass_s: float, gather_s: float, pick_s: float, sent: int) -> None:
        self.rounds += 1
        self.pass_s += pass_s
        self.gather_s += gather_s
        self.pick_s += pick_s
        self.bytes_sent += sent


class GpuShard:
    """A rank's shard of the distributed coreset on its GPU, with the CPU shard's interface
    (_C.CoresetShard: pass_, pin): its rows of the selection space and their running minima live
    on the device, and each round's pass is csrc/cuda/coreset_shard_cuda.cu, whose minima are the
    CPU pass's floats; only the offers (97 rows) come back to the host."""

    def __init__(self, space: torch.Tensor, initial: torch.Tensor, device: torch.device):
        self.space = space.to(device).contiguous()
        self.min_distance = initial.to(device).contiguous().clone()

    def pass_(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, local = _C.coreset_shard_pass_cuda(self.space, self.min_distance,
                                                   centres.to(self.space.device).contiguous())
        return values.cpu(), local.cpu()

    def pin(self, local_rows: torch.Tensor) -> None:
        self.min_distance[local_rows.to(self.space.device)] = -1.0  # below every distance: never offered first


@torch.no_grad()
def greedy_coreset(local_rows: torch.Tensor, ratio: float | None = None, *, n: int | None = None,
                   projection_dim: int | None = 128, num_starts: int = 10, seed: int = 0,
                   progress=None, rounds: "RoundStats | None" = None, space: torch.Tensor | None = None) -> torch.Tensor:
    """Global row indices, in selection order, of the greedy coreset of the rows spread over the
    ranks (this rank's share `local_rows` [n_r, D], rank order = row order): on every rank, exactly
    what `patchcore_fast.greedy_coreset(all rows, ...)` returns on the CPU. Each round's pass runs
    where `local_rows` live: on a GPU as a CUDA kernel with the CPU's arithmetic (the offers then
    travel by NCCL where the group uses it), else on the CPU; the picks are the same either way.
    The projection and the picks themselves run on the CPU.
    `rounds`, if given, is filled with the rounds' count, bytes and times (RoundStats). `space`: this
    rank's rows already projected (`coreset.selection_space`), to skip the projection."""
    if not (dist.is_available() and dist.is_initialized()):  # one rank is allowed: a 1-GPU NCCL check
        raise DistributedError("distributed.greedy_coreset needs a process group (launch with torchrun); in "
                               "one process use patchcore_fast.greedy_coreset")
    device = local_rows.device
    local = _checks.float_matrix(local_rows, "local_rows").cpu() if len(local_rows) else local_rows.float().cpu()
    counts = row_counts(len(local), "counting rows")
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    total, offset = offsets[-1], offsets[dist.get_rank()]
    size = coreset_size(total, ratio, n)
    seed = _checks.integer(seed, "seed", 0)
    num_starts = _checks.integer(num_starts, "num_starts", 1)
    if not compiled(torch.device("cpu")) or not compiled(device):
        raise DistributedError(f"the distributed coreset on {device.type} needs the compiled extension "
                               "(patchcore_fast._C) with kernels for it")

    generator = torch.Generator().manual_seed(seed)  # the single-process draw order: projection, then starts
    weights = projection_weights(local.shape[1], projection_dim, generator)
    if space is not None:
        space = _checks.float_matrix(space, "space").cpu() if len(space) else space.float().cpu()
        if space.shape != (len(local), local.shape[1] if weights is None else weights.shape[0]):
            raise ValueError(f"space must be this rank's selection space, got {tuple(space.shape)} for "
                             f"{tuple(local.shape)} rows")
    else:
        space = project(local, weights) if weights is not None else local
    largest = all_gather(torch.tensor([float(space.abs().max()) if len(space) else 0.0], dtype=torch.float64),
                         "checking value ranges")
    _checks.distances_fit_float32(torch.full((1, space.shape[1]), max(float(v) for v in largest)),
                                  "projected features" if weights is not None else "features")
    centres = gather_rows(space, start_rows(total, num_starts, generator), offsets, "sharing the start rows")
    min_distance = mean_start_distances(space, centres) if len(space) else torch.empty(0)

    # Rounds: each rank's pass lowers its rows' minima by the last round's picks and offers its
    # farthest rows (_C.coreset_offered of them) as float32 rows [value, global index (its int64
    # bits in two slots), row]; one all_gather; every rank then picks the same batch from the union
    # (_C.coreset_pick_batch, the single-process kernel's rule: picks identical to it,
    # csrc/cpu/coreset_batch.h).
    shard = GpuShard(space, min_distance, device) if device.type == "cuda" else _C.CoresetShard(space.contiguous(),
                                                                                                  min_distance)
    dim = space.shape[1]
    offer = torch.empty(_C.coreset_offered, 3 + dim)
    no_row = torch.iinfo(torch.int64).max  # padding: never a candidate
    picks: list[int] = []
    centres = torch.empty(0, dim)
    stats = rounds if rounds is not None else RoundStats()
    while len(picks) < size:
        started = time.perf_counter()
        values, local = shard.pass_(centres)
        passed = time.perf_counter()
        index = torch.full((len(offer),), no_row, dtype=torch.int64)
        index[: len(values)] = local + offset
        offer[:, 0], offer[:, 3:] = -math.inf, 0
        offer[: len(values), 0], offer[: len(values), 3:] = values, space[local]
        offer[:, 1:3] = index.view(torch.float32).view(-1, 2)
        offers = torch.stack(all_gather(offer, f"coreset round {stats.rounds + 1} ({len(picks)} of {size} picks)"))
        gathered = time.perf_counter()
        indices = offers[:, :, 1:3].contiguous().view(torch.int64).squeeze(-1)  # [ranks, offered]
        full = (indices != no_row).all(dim=1)  # a full offer's last value bounds the rank's other rows
        bound = float(offers[full, -1, 0].max()) if bool(full.any()) else -math.inf
        union, indices = offers[indices != no_row], indices[indices != no_row]
        chosen = _C.coreset_pick_batch(union[:, 0].contiguous(), indices, union[:, 3:].contiguous(), bound,
                                       size - len(picks))
        new = indices[chosen]
        centres = union[chosen, 3:].contiguous()
        mine = new[(new >= offset) & (new < offset + len(space))] - offset
        if len(mine):
            shard.pin(mine)
        picks.extend(new.tolist())
        stats.add(passed - started, gathered - passed, time.perf_counter() - gathered, offer.numel() * 4)
        if progress is not None:
            progress(len(picks))
    stats.picks_per_round = len(picks) / max(1, stats.rounds)
    return torch.tensor(picks, dtype=torch.int64)


# ---------------------------------------------------------------------------------------- search
@torch.no_grad()
def search(queries: torch.Tensor, local, local_ids: torch.Tensor, k: int, total: int):
    """(squared distances [Q, k], global bank indices [Q, k]) on every rank: each rank searches its
    shard (`local`: its rows [m, D], searched with knn, or anything with `search(queries, k)` and
    `vectors`, or None for no rows; their global indices `local_ids`, ascending), the lists are
    gathered and merged by (distance, index): exactly `knn(queries, whole bank, k)`. `queries` must
    be the same on every rank."""
    k = _checks.integer(k, "k", 1, total)
    q = queries.shape[0]
    rows = 0 if local is None else len(local) if isinstance(local, torch.Tensor) else len(local.vectors)
    local_k = min(k, rows)
    distances = torch.full((q, k), math.inf, device=queries.device)
    indices = torch.full((q, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=queries.device)
    if local_k > 0:
        d, i = knn(queries, local, local_k) if isinstance(local, torch.Tensor) else local.search(queries, local_k)
        distances[:, :local_k] = d
        indices[:, :local_k] = local_ids.to(i.device)[i]
    all_d = torch.cat(all_gather(distances, "merging search results"), dim=1)
    all_i = torch.cat(all_gather(indices, "merging search results"), dim=1)
    order = torch.argsort(all_i, dim=1, stable=True)  # by index, then (stably) by distance
    all_d, all_i = all_d.gather(1, order), all_i.gather(1, order)
    order = torch.argsort(all_d, dim=1, stable=True)[:, :k]
    return all_d.gather(1, order), all_i.gather(1, order)
