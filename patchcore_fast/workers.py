"""The processes that share a fit or a prediction: this one alone, or the ranks of a torch.distributed
process group (torchrun). `PatchCore` asks `current()` and calls the same methods either way; all
sharding lives here and in index.sharded.

A worker set answers: which images this process embeds (`share`), the coreset picks over every
process's rows (`coreset`), the index over the picked rows (`index`), a training image's features
wherever they were computed (`image_features`), the test features every process scores
(`feature_batches`), where a whole index read from a file lives (`place`) and who writes files (`save`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from . import distributed, model_file
from .coreset import greedy_coreset
from .errors import UserError
from .index import FlatIndex, Index


class SingleProcess:
    is_main = True

    def share(self, data, unit: int):
        return data

    def coreset(self, rows: torch.Tensor, ratio, projection_dim, seed, cuda_kernel, progress) -> torch.Tensor:
        return greedy_coreset(rows, ratio, projection_dim=projection_dim, seed=seed, cuda_kernel=cuda_kernel,
                              progress=progress)

    def total(self, count: int, what: str) -> int:
        return count

    def index(self, rows: torch.Tensor, picks: torch.Tensor, build) -> Index:
        """`build(bank_rows, rows, picks)` makes the index of the picked rows."""
        return build(rows[picks.to(rows.device)].contiguous(), rows, picks)

    def image_features(self, per_image: torch.Tensor, image: int) -> torch.Tensor:
        return per_image[image]

    def image_rows(self, per_image: torch.Tensor, images: list[int]) -> torch.Tensor:
        """The patch rows of `images` (ascending image numbers) held here, in image order."""
        return per_image[images].reshape(-1, per_image.shape[-1])

    def feature_batches(self, batches, embed, batch_size: int, feature_shape):
        """(features [b, patches, D], batch) for each batch, embedded by `embed`."""
        for batch in batches:
            yield embed(batch.images), batch

    def place(self, index: Index) -> Index:
        return index

    def save(self, path, config, grid, index: Index, decision) -> None:
        model_file.save(path, config, grid, index, decision)


class ProcessGroup:
    """Rank r embeds a contiguous share of the images (whole batches, see distributed.shard), holds
    the bank rows picked from them, and scores every test image against the sharded bank."""

    @property
    def is_main(self) -> bool:
        return distributed.is_main()

    def share(self, data, unit: int):
        if isinstance(data, torch.Tensor):
            batch = data[None] if data.dim() == 3 else data
            start, stop = distributed.shard(len(batch), unit=unit)
            return batch[start:stop]
        if not isinstance(data, (str, Path, list, tuple, Image.Image)):
            raise UserError("under torchrun, images come as a folder, a list of images or a tensor batch "
                            "(each rank takes its share of them)")
        from .data import expand_images

        items = expand_images(data)
        start, stop = distributed.shard(len(items), unit=unit)
        return items[start:stop]

    def coreset(self, rows, ratio, projection_dim, seed, cuda_kernel, progress):
        return distributed.greedy_coreset(rows.cpu(), ratio, projection_dim=projection_dim, seed=seed,
                                          progress=progress)

    def total(self, count: int, what: str) -> int:
        return sum(distributed.row_counts(count, what))

    def index(self, rows, picks, build):
        from .index.sharded import ShardedIndex

        counts = distributed.row_counts(len(rows), "counting rows")
        offset = sum(counts[: distributed.rank_and_size()[0]])
        ids = ((picks >= offset) & (picks < offset + len(rows))).nonzero().flatten()
        local = rows[(picks[ids] - offset).to(rows.device)].contiguous()
        return ShardedIndex(FlatIndex(local) if len(local) else _empty(rows), ids, len(picks))

    def image_features(self, per_image, image):
        counts = distributed.row_counts(len(per_image), "counting images")
        owner = next(r for r in range(len(counts)) if sum(counts[:r]) <= image < sum(counts[: r + 1]))
        first = sum(counts[: distributed.rank_and_size()[0]])
        mine = owner == distributed.rank_and_size()[0]
        local = per_image[image - first] if mine else torch.zeros(per_image.shape[1:], device=per_image.device)
        return distributed.broadcast(local.cpu(), owner, "sharing a training image").to(per_image.device)

    def image_rows(self, per_image, images):
        counts = distributed.row_counts(len(per_image), "counting images")
        first = sum(counts[: distributed.rank_and_size()[0]])
        mine = [i - first for i in images if first <= i < first + len(per_image)]
        return per_image[mine].reshape(-1, per_image.shape[-1])

    def feature_batches(self, batches, embed, batch_size, feature_shape):
        """Every rank embeds its share, then every rank scores every image (the bank is sharded)."""
        import torch.distributed as dist

        local, sizes, sources = [], [], []
        for batch in batches:
            local.append(embed(batch.images).cpu())
            sizes += batch.sizes
            sources += batch.sources
        features = distributed.all_gather_rows(torch.cat(local) if local else torch.empty(0, *feature_shape), "sharing features")
        everyone = [None] * dist.get_world_size()
        with distributed.collective("sharing image names"):
            dist.all_gather_object(everyone, (sizes, [str(s) for s in sources]))
        sizes = [s for part in everyone for s in part[0]]
        sources = [s for part in everyone for s in part[1]]
        from .data import Batch

        for start in range(0, len(features), batch_size):
            stop = start + batch_size
            yield features[start:stop], Batch(None, sizes[start:stop], sources[start:stop])

    def place(self, index):
        from .index.sharded import ShardedIndex

        return ShardedIndex.from_whole(index.all_vectors())

    def save(self, path, config, grid, index, decision):
        """Rank 0 writes one ordinary model file (the bank gathered whole); the others wait for it.
        A rank that fails before the write leaves no file."""
        whole = FlatIndex(index.all_vectors())
        error = None
        if distributed.is_main():
            try:
                model_file.save(path, config, grid, whole, decision)
            except Exception as e:  # reported on every rank, not only here
                error = e
        failed = distributed.all_gather(torch.tensor([error is not None]), "saving the model")
        if error is not None:
            raise error
        if any(bool(f) for f in failed):
            raise distributed.DistributedError(f"rank 0 could not write {path}")


def _empty(like: torch.Tensor) -> Index:
    from .index.sharded import _Empty

    return _Empty(like)


def current() -> SingleProcess | ProcessGroup:
    """The worker set of this process: a process group when torchrun started several ranks."""
    return ProcessGroup() if distributed.active() else SingleProcess()
