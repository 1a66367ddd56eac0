"""The model file: one safetensors file holding a fitted model's state, with explicit migrations.

Format 5 (written now): a model's tensors "memory_bank" [M, D], "normal_scores" (optional) and its
index's own tensors; JSON metadata {"format_version": 5, "patchcore_fast": version, "config":
PatchCoreConfig, "grid": [h, w], "decision": {"threshold", "threshold_source"}, "index": {"kind", ...}}.
An ensemble (ensemble.py) is one file too: member i's tensors under "member{i}/" and its metadata
in "members" (a list of the above without the version), beside the ensemble's own "normalisation"
(what each member's scores are divided by), "decision" and "normal_scores".
Older files are read by migrating their metadata one version at a time; each step says what that
version meant. A key a file lacks is never filled with today's default.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ._version import __version__
from .config import PatchCoreConfig
from .decision import Decision
from .index import FlatIndex, Index, PrunedIndex

FORMAT_VERSION = 5


def _from_1(meta: dict) -> dict:
    """Format 1 kept "settings" and "backbone" apart. Every model then was centre-cropped, ran its
    backbone in float32, and had no threshold, colour scale or search index."""
    config = {**meta["settings"], "backbone": meta["backbone"], "framing": "center_crop", "half_precision": False}
    return {**meta, "format_version": 2, "config": config}


def _from_2(meta: dict) -> dict:
    """Format 2 held the config whole, with run-time choices inside it (the CUDA kernel variants
    and pruned_search, which never changed a result: dropped). Files written before framing
    existed (commit 4b6da9a) always used the centre crop. The threshold sat at the top level and
    the pruned index under "search_index"."""
    config = dict(meta["config"])
    for runtime in ("coreset_cuda_kernel", "knn_cuda_kernel", "pruned_search"):
        config.pop(runtime, None)
    config.setdefault("framing", "center_crop")
    index = {"kind": "pruned", **meta["search_index"]} if meta.get("search_index") else {"kind": "flat"}
    return {"format_version": 3, "patchcore_fast": meta.get("patchcore_fast"), "config": config,
            "grid": meta["grid"], "index": index,
            "decision": {"threshold": meta.get("threshold"), "threshold_source": meta.get("threshold_source")}}


def _from_3(meta: dict) -> dict:
    """Format 3 had no tiles: every image was seen whole or centre-cropped."""
    return {**meta, "format_version": 4, "config": {**meta["config"], "tile": None, "tile_overlap": 0}}


def _from_4(meta: dict) -> dict:
    """Format 4 held one model: format 5 only adds ensembles."""
    return {**meta, "format_version": 5}


#: How to read each older format: a step to the next version.
MIGRATIONS = {1: _from_1, 2: _from_2, 3: _from_3, 4: _from_4}


@dataclass(frozen=True)
class ModelState:
    """What a model file holds."""

    config: PatchCoreConfig
    grid: tuple[int, int]
    index: Index
    decision: Decision
    written_by: str | None = None  # the patchcore_fast version that wrote the file
    file_format: int = FORMAT_VERSION  # the format the file was written in (read through migrations)
    rows: tuple[int, int, int] | None = None  # (start, stop, total) when `index` holds a share of the bank


@dataclass(frozen=True)
class EnsembleState:
    """What an ensemble's model file holds: its members' states, what each member's scores are
    divided by, and the ensemble's own decision, in those units."""

    members: tuple[ModelState, ...]
    normalisation: tuple[float, ...]
    decision: Decision
    written_by: str | None = None
    file_format: int = FORMAT_VERSION


@dataclass(frozen=True)
class StreamedRows:
    """A float32 matrix [rows, dim] written as it arrives: `chunks` yields its rows in order."""

    rows: int
    dim: int
    chunks: Iterator[torch.Tensor]


def save(path, config: PatchCoreConfig, grid, index: Index, decision: Decision,
         bank: StreamedRows | None = None) -> None:
    """Writes the model to `path` atomically (`_write`). `bank`: the memory bank's rows streamed in
    (then never whole in memory; the index is flat)."""
    tensors, meta = _model_content(config, grid, index, decision, bank)
    _write(path, tensors, {"format_version": FORMAT_VERSION, "patchcore_fast": __version__, **meta})


def save_ensemble(path, members: list[tuple[PatchCoreConfig, tuple, Index, Decision]],
                  normalisation: list[float], decision: Decision) -> None:
    """Writes an ensemble to `path` atomically: each member (config, grid, index, decision) as
    `save` writes one model, its tensors under "member{i}/", and the ensemble's own state."""
    tensors, metas = {}, []
    for i, member in enumerate(members):
        member_tensors, meta = _model_content(*member)
        tensors.update({f"member{i}/{name}": value for name, value in member_tensors.items()})
        metas.append(meta)
    if decision.normal_scores is not None:
        tensors["normal_scores"] = decision.normal_scores
    _write(path, tensors, {"format_version": FORMAT_VERSION, "patchcore_fast": __version__, "members": metas,
                           "normalisation": [float(n) for n in normalisation],
                           "decision": {"threshold": decision.threshold, "threshold_source": decision.threshold_source}})


def _model_content(config: PatchCoreConfig, grid, index: Index, decision: Decision,
                   bank: StreamedRows | None = None) -> tuple[dict, dict]:
    """One model's tensors and metadata (without the format version)."""
    tensors, index_meta = index.state()
    tensors = {**tensors, "memory_bank": bank if bank is not None else index.all_vectors()}
    if decision.normal_scores is not None:
        tensors["normal_scores"] = decision.normal_scores
    return tensors, {"config": config.to_dict(), "grid": list(grid), "index": {"kind": index.kind, **index_meta},
                     "decision": {"threshold": decision.threshold, "threshold_source": decision.threshold_source}}


def _write(path, tensors: dict, meta: dict) -> None:
    """A temporary file in the same folder, flushed to disk, replaces `path` only when complete.
    The file's mode follows the umask, like any new file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=folder)
    try:
        os.close(fd)
        _write_safetensors(tmp, tensors, {"patchcore_fast": json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)  # the rename itself reaches the disk


def _write_safetensors(path, tensors: dict, metadata: dict[str, str]) -> None:
    """The safetensors layout (little-endian u64 header length, JSON header padded to 8 bytes,
    then each tensor's bytes in header order), written tensor by tensor so that a StreamedRows
    matrix is never whole in memory. safetensors reads the file like one of its own."""
    shapes, sources = {}, {}
    for name, value in tensors.items():
        if isinstance(value, StreamedRows):
            shapes[name], sources[name] = [value.rows, value.dim], value.chunks
        else:
            value = value.detach().float().cpu().contiguous()
            shapes[name], sources[name] = list(value.shape), [value.reshape(-1, *value.shape[1:])]
    header, offset = {"__metadata__": metadata}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape in shapes.items():
            written = 0
            for chunk in sources[name]:
                chunk = chunk.detach().float().cpu().contiguous()
                f.write(chunk.numpy().tobytes())
                written += chunk.numel()
            if written != math.prod(shape):
                raise ValueError(f"{name}: {written} values written, {math.prod(shape)} declared")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


def load(path, share=None) -> ModelState | EnsembleState:
    """Reads a model file of any readable format, on the CPU. `share(rows)` -> (start, stop): only
    those rows of the memory bank are read (a rank's share); the index is then a flat index of
    them and `rows` says where they sit. An ensemble's file gives an EnsembleState (never shared)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file {path}")
    rows = None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["patchcore_fast"])
            if share is None or "members" in meta:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            else:
                bank = f.get_slice("memory_bank")
                total = bank.get_shape()[0]
                start, stop = share(total)
                rows = (start, stop, total)
                tensors = {"memory_bank": bank[start:stop]}
                if "normal_scores" in f.keys():
                    tensors["normal_scores"] = f.get_tensor("normal_scores")
    except Exception as error:
        raise ValueError(f"{path} is not a readable patchcore_fast model ({type(error).__name__}: {error})") from error
    version = meta.get("format_version")
    if version != FORMAT_VERSION and version not in MIGRATIONS:
        raise ValueError(f"{path} has model format version {version}; this patchcore_fast ({__version__}) reads "
                         f"versions {', '.join(map(str, [*MIGRATIONS, FORMAT_VERSION]))}: use the patchcore_fast "
                         "that wrote it, or fit the model again")
    try:
        written_as = meta["format_version"]
        while meta["format_version"] != FORMAT_VERSION:
            meta = MIGRATIONS[meta["format_version"]](meta)
        written_by = meta.get("patchcore_fast")
        if "members" not in meta:
            return _model_state(meta, tensors, rows, written_by, written_as)
        members = tuple(_model_state(m, {name.split("/", 1)[1]: value for name, value in tensors.items()
                                         if name.startswith(f"member{i}/")}, None, written_by, written_as)
                        for i, m in enumerate(meta["members"]))
        normalisation = tuple(float(scale) for scale in meta["normalisation"])
        if len(normalisation) != len(members) or len(members) < 2:
            raise ValueError(f"{len(members)} members and {len(normalisation)} normalisations")
        decision = Decision(tensors.get("normal_scores"), meta["decision"]["threshold"],
                            meta["decision"]["threshold_source"])
        return EnsembleState(members, normalisation, decision, written_by, written_as)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} has inconsistent model contents: {error}") from error


def _model_state(meta: dict, tensors: dict, rows, written_by, written_as) -> ModelState:
    config = PatchCoreConfig.from_dict(meta["config"])
    vectors = tensors.pop("memory_bank").float()
    index = _restore_index(vectors, tensors, meta["index"]) if rows is None else FlatIndex(vectors)
    decision = Decision(tensors.get("normal_scores"), meta["decision"]["threshold"], meta["decision"]["threshold_source"])
    return ModelState(config, tuple(meta["grid"]), index, decision, written_by, written_as, rows)


def _restore_index(vectors: torch.Tensor, tensors: dict, meta: dict) -> Index:
    kind = meta["kind"]
    if kind == "pruned":
        return PrunedIndex.restore(vectors, tensors, meta)
    if kind == "flat":
        return FlatIndex(vectors)
    raise ValueError(f"unknown index kind {kind!r}: written by a newer patchcore_fast?")
