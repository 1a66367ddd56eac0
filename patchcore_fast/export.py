"""Export of a fitted model's whole scoring path for deployment: ONNX, or a torch.export program.

The graph is `PatchCore`'s own scoring module (scoring.py) with its index swapped for an in-graph
one. It takes a [B, 3, S, S] float batch in [0, 1], already resized and cropped as the model's
Transform does it (`PatchCore.transform`), and returns the image scores [B] and the maps [B, S, S]:
backbone, patch embedding, the nearest bank distances as one plain matrix product and a min
(|q|^2 + |b|^2 - 2 q.b, clamped at 0; the k smallest averaged for k > 1), the maps' upsampling and
Gaussian smoothing. The bank is a constant of the graph. `check_onnx` runs the file in onnxruntime
against `PatchCore.predict` on the same images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import UserError

FORMATS = ("onnx", "torch")
#: Largest relative difference of an exported graph's image scores from predict's that check_onnx accepts.
SCORE_TOLERANCE = 1e-4


def exportable(model) -> nn.Module:
    """The model's scoring module as plain float32 torch operators on the CPU (scoring.py: the one
    predict runs, with its index as a matrix product and a min; an ensemble's members' together)."""
    if model.config.reweight:
        raise UserError("export: models with re-weighting (reweight=True, Eq. 7) are not exported; "
                        "fit with reweight=False")
    return model.exportable()


def example_batch(model, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, model.config.image_size, model.config.image_size,
                      generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def export(model, path, fmt: str = "onnx") -> Path:
    """Writes the scoring graph of `model` to `path` (.onnx, or a torch.export .pt2 program) with a
    dynamic batch dimension; returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    graph = exportable(model)
    example = (example_batch(model),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if fmt == "torch":
        program = torch.export.export(graph, example, dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        return path
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as error:
        raise UserError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from error
    program = torch.onnx.export(graph, example, input_names=["images"], output_names=["scores", "maps"],
                                dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    program.save(str(path))
    return path


@torch.no_grad()
def check_onnx(model, path, images) -> float:
    """Largest relative difference between the ONNX file's image scores (onnxruntime, CPU) and
    `model.predict`'s on `images` (any form predict takes); raises if beyond SCORE_TOLERANCE."""
    try:
        import onnxruntime
    except ImportError as error:
        raise UserError("checking an ONNX file needs onnxruntime: pip install onnxruntime") from error
    from .data import iter_batches

    batch = torch.cat(list(iter_batches(images, model.transform, model.batch_size)))  # what the graph takes
    expected = model.predict(images)  # from the images themselves (a tensor would be transformed again)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    scores, maps = torch.from_numpy(scores), torch.from_numpy(maps)
    if scores.shape != expected.scores.shape or maps.shape != expected.maps.shape:
        raise ValueError(f"{path}: outputs {tuple(scores.shape)}, {tuple(maps.shape)}; predict gives "
                         f"{tuple(expected.scores.shape)}, {tuple(expected.maps.shape)}")
    relative = float(((scores - expected.scores).abs() / expected.scores.abs().clamp_min(1e-12)).max())
    if relative > SCORE_TOLERANCE:
        raise ValueError(f"{path}: image scores differ from predict's by up to {relative:.3g} (relative), "
                         f"beyond {SCORE_TOLERANCE:g}")
    return relative
