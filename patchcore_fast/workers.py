"""The processes that share a fit or a prediction: this one alone, or the ranks of a torch.distributed
process group (torchrun). `PatchCore` asks `current()` and calls the same methods either way; all
sharding lives here and in index.sharded.

A worker set answers: which images this process embeds (`share`), the coreset picks over every
process's rows (`coreset`), the index over the picked rows (`index`), a training image's features
wherever they were computed (`image_features`), the test features every process scores
(`feature_batches`) or, with the bank copied to every process for predict (`replica`), the
predictions every process made (`gathered_predictions`), which rows of a model file this process
reads (`load`) and who writes files (`save`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from PIL import Image

from . import distributed, model_file
from .coreset import greedy_coreset, selection_space
from .errors import UserError
from .index import FlatIndex, Index
from .prediction import Prediction


class SingleProcess:
    is_main = True

    def share(self, data, unit: int):
        return data

    def scoring_share(self, data, unit: int):
        return data

    def selection_space(self, rows: torch.Tensor, projection_dim, seed) -> torch.Tensor | None:
        return selection_space(rows, projection_dim, seed)

    def coreset(self, rows: torch.Tensor, ratio, projection_dim, seed, cuda_kernel, progress,
                space: torch.Tensor | None = None) -> torch.Tensor:
        return greedy_coreset(rows, ratio, projection_dim=projection_dim, seed=seed, cuda_kernel=cuda_kernel,
                              progress=progress, space=space)

    def total(self, count: int, what: str) -> int:
        return count

    def index(self, rows: torch.Tensor, picks: torch.Tensor, build) -> Index:
        """`build(bank_rows, rows, picks)` makes the index of the picked rows."""
        return build(rows[picks.to(rows.device)].contiguous(), rows, picks)

    def image_features(self, per_image: torch.Tensor, images: list[int]) -> torch.Tensor:
        """Features [len(images), patches, D] of `images` (image numbers), in that order."""
        return per_image[images]

    def image_rows(self, per_image: torch.Tensor, images: list[int]) -> torch.Tensor:
        """The patch rows of `images` (ascending image numbers) held here, in image order."""
        return per_image[images].reshape(-1, per_image.shape[-1])

    def feature_batches(self, batches, embed, batch_size: int, feature_shape):
        """(features [b, patches, D], batch) for each batch, embedded by `embed`."""
        for batch in batches:
            yield embed(batch.images), batch

    def replica(self, index: Index, choice: str, build) -> Index | None:
        """The whole bank's index on this rank for predict (None: score through `index` itself)."""
        return None

    def gathered_predictions(self, scored, threshold):
        """(Prediction, batch) of every rank's batches in the images' order: here, `scored` itself."""
        yield from scored

    def load(self, path) -> model_file.ModelState:
        return model_file.load(path)

    def save(self, path, config, grid, index: Index, decision) -> None:
        model_file.save(path, config, grid, index, decision)


class ProcessGroup:
    """Rank r embeds a contiguous share of the training images (whole micro-batches, see
    distributed.shard) and holds the bank rows picked from them, never the whole bank: not to fit,
    save (rows stream to rank 0's file), load (only its rows are read) or predict (test batches are
    dealt out in turn and their features, the queries, travel to every rank a step at a time)."""

    @property
    def is_main(self) -> bool:
        return distributed.is_main()

    def share(self, data, unit: int):
        """A contiguous share of the images (for a fit: rank order is row order), in whole runs of `unit`."""
        items = self._items(data)
        start, stop = distributed.shard(len(items), unit=unit)
        return items[start:stop]

    def scoring_share(self, data, unit: int):
        """Runs of `unit` images (whole batches) dealt out in turn: rank r takes runs r, r + R, ...,
        so the batches the ranks embed at one step are consecutive in the images' order and can be
        scored and handed on in that order, a step at a time (`feature_batches`)."""
        items = self._items(data)
        rank, size = distributed.rank_and_size()
        runs = [slice(start, start + unit) for start in range(rank * unit, len(items), size * unit)]
        if isinstance(items, torch.Tensor):
            return torch.cat([items[r] for r in runs]) if runs else items[:0]
        return [item for r in runs for item in items[r]]

    @staticmethod
    def _items(data):
        if isinstance(data, torch.Tensor):
            return data[None] if data.dim() == 3 else data
        if not isinstance(data, (str, Path, list, tuple, Image.Image)):
            raise UserError("under torchrun, images come as a folder, a list of images or a tensor batch "
                            "(each rank takes its share of them)")
        from .data import expand_images

        return expand_images(data)

    def selection_space(self, rows, projection_dim, seed):
        """This rank's rows projected (the fixed-order CPU projection: a row's floats are its own)."""
        return selection_space(rows.cpu(), projection_dim, seed) if len(rows) else None

    def coreset(self, rows, ratio, projection_dim, seed, cuda_kernel, progress, space=None):
        # rows on a GPU: each round's pass runs there (distributed.GpuShard), the picks unchanged
        return distributed.greedy_coreset(rows, ratio, projection_dim=projection_dim, seed=seed,
                                          progress=progress, space=space)

    def total(self, count: int, what: str) -> int:
        return sum(distributed.row_counts(count, what))

    def index(self, rows, picks, build):
        """Each rank's picked rows under the index `build` makes of them (searched exactly, so the
        merged results are the whole bank's)."""
        from .index.sharded import ShardedIndex

        counts = distributed.row_counts(len(rows), "counting rows")
        offset = sum(counts[: distributed.rank_and_size()[0]])
        ids = ((picks >= offset) & (picks < offset + len(rows))).nonzero().flatten()
        local_picks = (picks[ids] - offset).to(rows.device)
        local = rows[local_picks].contiguous()
        return ShardedIndex(build(local, rows, local_picks) if len(local) else _empty(rows), ids, len(picks))

    def image_features(self, per_image, images):
        counts = distributed.row_counts(len(per_image), "counting images")
        rank = distributed.rank_and_size()[0]
        out = torch.zeros(len(images), *per_image.shape[1:])
        wanted = torch.tensor(images, dtype=torch.int64)
        first = 0
        for owner, count in enumerate(counts):  # each owner's images in one broadcast
            mine = (wanted >= first) & (wanted < first + count)
            if bool(mine.any()):
                part = per_image[(wanted[mine] - first).to(per_image.device)].cpu() if owner == rank else out[mine]
                out[mine] = distributed.broadcast(part, owner, "sharing training images")
            first += count
        return out.to(per_image.device)

    def image_rows(self, per_image, images):
        counts = distributed.row_counts(len(per_image), "counting images")
        first = sum(counts[: distributed.rank_and_size()[0]])
        mine = [i - first for i in images if first <= i < first + len(per_image)]
        return per_image[mine].reshape(-1, per_image.shape[-1])

    def feature_batches(self, batches, embed, batch_size, feature_shape):
        """Step by step, every rank embeds its next batch of its `scoring_share` (or none once it has
        run out); then each rank's batch, in rank order (the images' order), goes to every rank and
        is scored there against the sharded bank before the next one comes: queries travel, the
        bank does not, and a rank holds one batch of queries at a time whatever the rank count."""
        import torch.distributed as dist

        from .data import Batch

        batches, position = iter(batches), 0
        while True:
            batch = next(batches, None)
            local = embed(batch.images).cpu() if batch is not None else torch.empty(0, *feature_shape)
            names = (batch.sizes, list(batch.sources)) if batch is not None else ([], [])
            counts = distributed.row_counts(len(local), "sharing features")
            if sum(counts) == 0:  # every rank has run out
                return
            everyone = [None] * dist.get_world_size()
            with distributed.collective("sharing image names"):
                dist.all_gather_object(everyone, names)
            rank = distributed.rank_and_size()[0]
            for owner, (count, (sizes, sources)) in enumerate(zip(counts, everyone)):
                if count:
                    part = local if owner == rank else torch.empty(count, *feature_shape)
                    sources = _global_positions(sources, position)
                    position += count
                    yield distributed.broadcast(part, owner, "sharing features"), Batch(None, sizes, sources)

    def replica(self, index: Index, choice: str, build) -> Index | None:
        """For predict, when `choice` says so ("replicated", or "auto" and the whole bank fits every
        rank: REPLICA_MEMORY_SHARE): the whole bank gathered once onto this rank, under the index
        `build(rows, like)` makes of it (this rank's shard's choices), so that each rank scores its
        own images with no communication per query. None: keep the bank sharded (queries travel)."""
        if choice == "sharded":
            return None
        if choice == "auto":
            needed = REPLICA_OVERHEAD * len(index) * index.dim * 4
            fits = torch.tensor([needed <= REPLICA_MEMORY_SHARE * available_memory(index.vectors.device)])
            if not all(bool(f) for f in distributed.all_gather(fits, "deciding where the bank lives")):
                return None
        return build(index.all_vectors().to(index.vectors.device), index.local)

    def gathered_predictions(self, scored, threshold):
        """Step by step, every rank scores its next batch of its `scoring_share` (or none once it has
        run out); every rank's results (scores and maps, not features) then go to every rank, in
        rank order (the images' order), like `feature_batches`."""
        import torch.distributed as dist

        from .data import Batch

        scored, position = iter(scored), 0
        while True:
            done = next(scored, None)
            mine = None if done is None else (done[0].scores.cpu(), done[0].maps.cpu(), done[0].sizes,
                                               list(done[0].sources))
            everyone = [None] * dist.get_world_size()
            with distributed.collective("sharing predictions"):
                dist.all_gather_object(everyone, mine)
            if all(part is None for part in everyone):
                return
            for part in everyone:
                if part is not None:
                    scores, maps, sizes, sources = part
                    sources = _global_positions(sources, position)
                    position += len(sources)
                    yield Prediction(scores, maps, threshold, sources=sources, sizes=sizes), Batch(None, sizes, sources)

    def load(self, path) -> model_file.ModelState:
        """The model with this rank's contiguous share of the bank: only those rows are read."""
        from .index.sharded import ShardedIndex

        state = model_file.load(path, share=distributed.shard)
        if isinstance(state, model_file.EnsembleState):
            raise UserError(f"{path} holds an ensemble: ensembles run in one process (run without torchrun)")
        start, stop, total = state.rows
        return dataclasses.replace(state, index=ShardedIndex(state.index, torch.arange(start, stop), total))

    def save(self, path, config, grid, index, decision):
        """Rank 0 writes one ordinary model file while the bank's rows stream to it in order, a
        chunk at a time (no rank holds the whole bank); the others send their rows and wait. A rank
        that fails before the end leaves no file."""
        chunks = index.ordered_chunks(SAVE_CHUNK_ROWS)
        error = None
        if distributed.is_main():
            try:
                bank = model_file.StreamedRows(len(index), index.dim, chunks)
                model_file.save(path, config, grid, index, decision, bank)
            except distributed.DistributedError:
                raise
            except Exception as e:  # reported on every rank, not only here
                error = e
        for _ in chunks:  # the other ranks' part of each chunk (and rank 0's, after an error)
            pass
        failed = distributed.all_gather(torch.tensor([error is not None]), "saving the model")
        if error is not None:
            raise error
        if any(bool(f) for f in failed):
            raise distributed.DistributedError(f"rank 0 could not write {path}")


#: Bank rows sent to the writing rank at a time when a sharded model is saved.
SAVE_CHUNK_ROWS = 8192

#: predict_bank="auto" replicates the bank when REPLICA_OVERHEAD x its float32 rows (the rows, the
#: pruned index's screens and codes, the gather's buffers) fit in this share of the memory the
#: device has free: the rest is the backbone's, the batches' and the caller's.
REPLICA_MEMORY_SHARE = 0.25
REPLICA_OVERHEAD = 2.0


def available_memory(device: torch.device) -> int:
    """Bytes free on `device` (a CUDA device's free memory; on the CPU the system's available
    memory, or 0 where it cannot be read: then nothing is replicated)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _global_positions(sources: list, first: int) -> list:
    """A rank's sources with in-memory images' positions (ints, counted within the rank's share)
    made positions in the caller's data: the batches come in the images' order from `first` on."""
    return [first + n if isinstance(s, int) else s for n, s in enumerate(sources)]


def _empty(like: torch.Tensor) -> Index:
    from .index.sharded import _Empty

    return _Empty(like)


def current() -> SingleProcess | ProcessGroup:
    """The worker set of this process: a process group when torchrun started several ranks."""
    return ProcessGroup() if distributed.active() else SingleProcess()
