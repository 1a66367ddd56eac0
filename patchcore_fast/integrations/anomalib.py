"""anomalib's Patchcore on patchcore_fast's coreset and search, in one line.

    from patchcore_fast.integrations.anomalib import accelerate

    with accelerate():                 # anomalib's own projection: the picks can equal anomalib's
        engine.fit(model=Patchcore(...), datamodule=data)

or `install()` once (undo with `uninstall()`). Inside, anomalib's `KCenterGreedy` sampler is this
module's `KCenterGreedy` (same interface; the greedy loop runs in patchcore_fast's kernel) and
`PatchcoreModel.nearest_neighbors` runs `patchcore_fast.knn` (same returns: L2 distances, one
column squeezed for one neighbour). `accelerate(projection="patchcore_fast")` uses this package's
own seeded 128-d projection and start instead of anomalib's sparse random projection.

Tested with anomalib 2.7.0 (TESTED_VERSIONS); other versions are refused by `install` unless
`check_version=False`, since the patched names are anomalib internals.
"""

from __future__ import annotations

import contextlib

import torch

from ..coreset import greedy_coreset
from ..knn import knn

#: anomalib versions whose PatchcoreModel and KCenterGreedy this module was tested against.
TESTED_VERSIONS = (">=2.7.0", "<2.8")
PROJECTIONS = ("anomalib", "patchcore_fast")

_saved: dict | None = None


def _anomalib():
    try:
        import anomalib
        from anomalib.models.image.patchcore import torch_model
    except ImportError as error:
        raise ImportError("patchcore_fast.integrations.anomalib needs anomalib (pip install 'anomalib>=2.7,<2.8')") \
            from error
    return anomalib, torch_model


def _version_ok(version: str) -> bool:
    major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    return major_minor == (2, 7)


class KCenterGreedy:
    """anomalib's k-center-greedy sampler interface (`select_coreset_idxs`, `sample_coreset`) on
    patchcore_fast's kernel.

    projection="anomalib": anomalib's SparseRandomProjection(eps=0.9) and its random start row
    (the same draws from the same global random generators), then the start row's distances as
    the kernel's initial distances: the picks equal anomalib's except where two distances lie within
    float32 rounding of each other (the kernel sums each distance in one fixed order), and a picked
    row is never picked again (anomalib's loop can re-pick when every distance left is zero).
    projection="patchcore_fast": `patchcore_fast.greedy_coreset(embedding, sampling_ratio)`.
    """

    def __init__(self, embedding: torch.Tensor, sampling_ratio: float, projection: str = "anomalib") -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        self.embedding = embedding
        self.projection = projection
        self.coreset_size = int(embedding.shape[0] * sampling_ratio)
        if self.coreset_size <= 0:
            raise ValueError(f"sampling_ratio {sampling_ratio} of {embedding.shape[0]} rows selects no row")
        self.sampling_ratio = sampling_ratio

    def select_coreset_idxs(self) -> list[int]:
        if self.projection == "patchcore_fast":
            return greedy_coreset(self.embedding.reshape(len(self.embedding), -1), n=self.coreset_size).tolist()
        from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

        if self.embedding.ndim == 2:
            features = SparseRandomProjection(eps=0.9).fit(self.embedding).transform(self.embedding)
        else:
            features = self.embedding.reshape(self.embedding.shape[0], -1)
        start = int(torch.randint(high=len(features), size=(1,), device=features.device))
        if self.coreset_size == 1:
            return [start]
        initial = torch.linalg.norm(features - features[start], ord=2, dim=1)  # anomalib's first update
        rest = greedy_coreset(features.float(), n=self.coreset_size - 1, projection_dim=None,
                              initial_distances=initial.float())
        return [start] + rest.tolist()

    def sample_coreset(self) -> torch.Tensor:
        return self.embedding[self.select_coreset_idxs()]


def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchcoreModel.nearest_neighbors on patchcore_fast.knn: (L2 distances, bank indices), [n, k],
    or [n] for one neighbour, as anomalib returns them."""
    distances, indices = knn(embedding, self.memory_bank, n_neighbors)
    distances = distances.sqrt()
    if n_neighbors == 1:
        return distances[:, 0], indices[:, 0]
    return distances, indices


def install(projection: str = "anomalib", check_version: bool = True) -> None:
    """Makes anomalib's Patchcore use patchcore_fast until `uninstall()`."""
    global _saved
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    anomalib, torch_model = _anomalib()
    if check_version and not _version_ok(anomalib.__version__):
        raise RuntimeError(f"anomalib {anomalib.__version__} is untested (tested: {', '.join(TESTED_VERSIONS)}); "
                           "pass check_version=False to try anyway")
    if _saved is None:
        _saved = {"sampler": torch_model.KCenterGreedy, "search": torch_model.PatchcoreModel.nearest_neighbors}

    def sampler(embedding, sampling_ratio):
        return KCenterGreedy(embedding, sampling_ratio, projection)

    torch_model.KCenterGreedy = sampler
    torch_model.PatchcoreModel.nearest_neighbors = nearest_neighbors


def uninstall() -> None:
    """Restores anomalib's own sampler and search."""
    global _saved
    if _saved is None:
        return
    _, torch_model = _anomalib()
    torch_model.KCenterGreedy = _saved["sampler"]
    torch_model.PatchcoreModel.nearest_neighbors = _saved["search"]
    _saved = None


@contextlib.contextmanager
def accelerate(projection: str = "anomalib", check_version: bool = True):
    """`install()` for the duration of a `with` block."""
    install(projection, check_version)
    try:
        yield
    finally:
        uninstall()
