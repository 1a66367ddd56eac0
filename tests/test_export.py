"""Export of the whole scoring path: ONNX checked in onnxruntime against predict, and a torch.export
program; the kernels' custom operators are covered in test_torch_ops.py."""

import pytest
import torch

from patchcore_fast import PatchCore
from patchcore_fast.backbones import load_backbone
from patchcore_fast.cli import main
from patchcore_fast.errors import UserError
from patchcore_fast.export import check_onnx, export

from images import texture


@pytest.fixture(scope="module")
def model():
    m = PatchCore(backbone=load_backbone("efficientnet_lite0"), device="cpu", image_size=64, resize=72,
                  framing="center_crop", progress=False)
    return m.fit([texture(i, size=(96, 80)) for i in range(5)])


def test_onnx_scores_like_predict_with_any_batch(model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install --no-build-isolation -e ".[onnx]")')
    pytest.importorskip("onnxscript", reason='onnxscript is not installed (pip install --no-build-isolation -e ".[onnx]")')
    path = export(model, tmp_path / "m.onnx")
    images = [texture(20 + i, size=(96, 80), defect=i % 2 == 1) for i in range(3)]
    assert check_onnx(model, path, images) < 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["scores", "maps"]
    for b in (1, 4):  # the batch dimension is dynamic
        scores, maps = session.run(None, {"images": torch.rand(b, 3, 64, 64).numpy()})
        assert scores.shape == (b,) and maps.shape == (b, 64, 64)


def test_check_fails_on_a_graph_that_scores_differently(model, tmp_path):
    pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install --no-build-isolation -e ".[onnx]")')
    pytest.importorskip("onnxscript", reason='onnxscript is not installed (pip install --no-build-isolation -e ".[onnx]")')
    other = PatchCore(backbone=load_backbone("efficientnet_lite0"), device="cpu", image_size=64, resize=72,
                      framing="center_crop", progress=False).fit([texture(i, size=(96, 80)) for i in range(30, 33)])
    path = export(other, tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="differ from predict"):
        check_onnx(model, path, [texture(20, size=(96, 80))])


def test_torch_export_program_scores_like_predict(model, tmp_path):
    path = export(model, tmp_path / "m.pt2", "torch")
    program = torch.export.load(str(path)).module()
    images = [texture(40 + i, size=(96, 80)) for i in range(2)]
    batch = torch.stack([model.transform.image(i) for i in images])
    with torch.no_grad():
        scores, maps = program(batch)
    expected = model.predict(images)
    assert torch.allclose(scores, expected.scores, rtol=1e-4)
    assert torch.allclose(maps, expected.maps, rtol=1e-4, atol=1e-3)


def test_reweighting_models_are_refused(model, tmp_path):
    reweighted = model.with_settings(reweight=True).fit([texture(i, size=(96, 80)) for i in range(3)])
    with pytest.raises(UserError, match="re-weighting"):
        export(reweighted, tmp_path / "r.onnx")


def test_cli_export_with_check(model, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install --no-build-isolation -e ".[onnx]")')
    pytest.importorskip("onnxscript", reason='onnxscript is not installed (pip install --no-build-isolation -e ".[onnx]")')
    model.save(tmp_path / "m.pcf")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        texture(50 + i, size=(96, 80)).save(folder / f"{i}.png")
    assert main(["export", str(tmp_path / "m.pcf"), "--out", str(tmp_path / "m.onnx"), "--check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "outputs scores [B], maps [B, 64, 64]" in out and "onnxruntime vs predict on 2 images" in out
    assert main(["export", str(tmp_path / "m.pcf"), "--out", str(tmp_path / "m.pt2"), "--format", "torch",
                 "--check", str(folder)]) == 2  # --check needs ONNX: a clear error


def test_predict_and_export_run_one_scoring_module(model, monkeypatch):
    """The exported graph is the scoring module predict runs (scoring.py), its index swapped for an
    in-graph matmul + min: the same numbers, and a change to the module changes both alike."""
    from patchcore_fast.export import exportable
    from patchcore_fast.scoring import ScoringModule

    images = [texture(30 + i, size=(96, 80), defect=i == 1) for i in range(2)]
    batch = torch.stack([model.transform.image(i) for i in images])  # what the graph takes
    expected = model.predict(images)
    graph = exportable(model)
    assert isinstance(graph, ScoringModule) and type(graph.features) is type(model.scoring_module().features)
    scores, maps = graph(batch)
    assert torch.allclose(scores, expected.scores, rtol=1e-5) and torch.allclose(maps, expected.maps, rtol=1e-4, atol=1e-3)

    original = ScoringModule.maps
    monkeypatch.setattr(ScoringModule, "maps", lambda self, p, g: 2 * original(self, p, g))
    assert torch.allclose(exportable(model)(batch)[1], 2 * maps)
    assert torch.allclose(model.predict(images).maps, 2 * expected.maps, rtol=1e-4, atol=1e-3)
