"""The ensemble: one PatchCore per backbone, each normalised by its training images' cross-fitted
scores, scores and maps averaged; one model file; export, decisions, update, the command line."""

import json

import pytest
import torch

from patchcore_fast import PatchCore, PatchCoreEnsemble, model_file, synthetic
from patchcore_fast.cli import main
from patchcore_fast.decision import THRESHOLD_QUANTILE
from patchcore_fast.errors import UserError
from patchcore_fast.evaluate import method_name

from images import texture_batch

PAIR = ["efficientnet_lite0", "efficientnet_lite1"]
SETTINGS = dict(device="cpu", image_size=64, resize=64, progress=False, coreset_ratio=0.25)


@pytest.fixture(scope="module")
def fitted():
    return PatchCore(backbone=PAIR, **SETTINGS).fit(texture_batch(range(12)))


@pytest.fixture(scope="module")
def test_images():
    return texture_batch(range(20, 24))


def normalised(scores, normalisation):
    return torch.stack([s / scale for s, scale in zip(scores, normalisation)]).mean(0)


def test_each_member_is_the_single_model_and_the_ensemble_averages_their_normalised_scores(fitted, test_images):
    assert isinstance(fitted, PatchCoreEnsemble) and not isinstance(fitted, PatchCore)
    assert [m.backbone_name for m in fitted.members] == PAIR
    alone = [PatchCore(backbone=name, **SETTINGS).fit(texture_batch(range(12))) for name in PAIR]
    singles = [m.predict(test_images) for m in alone]
    for member, single in zip(fitted.members, alone):
        assert torch.equal(member.memory_bank, single.memory_bank)
    for scale, single in zip(fitted.normalisation, alone):
        assert scale == pytest.approx(float(single.decision.normal_scores.double().mean()), rel=1e-12)
    pred = fitted.predict(test_images)
    assert torch.allclose(pred.scores, normalised([p.scores for p in singles], fitted.normalisation), atol=1e-5)
    assert torch.allclose(pred.maps, normalised([p.maps for p in singles], fitted.normalisation), atol=1e-5)
    assert pred.maps.shape == (4, 64, 64)
    assert pred.threshold == fitted.decision.threshold
    score_only = fitted.predict(test_images, maps=False)
    assert score_only.maps is None and torch.equal(score_only.scores, pred.scores)
    features = fitted.extract(test_images)
    assert len(features) == 2 and torch.allclose(fitted.score(features).scores, pred.scores, atol=1e-5)


def test_the_ensemble_decides_in_normalised_units_from_the_same_cross_fitted_images(fitted):
    members = [m.decision.normal_scores for m in fitted.members]
    assert len(members[0]) == len(members[1]) == 12  # the same folds: same images, same seed
    expected = normalised(members, fitted.normalisation)
    assert torch.allclose(fitted.decision.normal_scores, expected)
    assert float(fitted.decision.normal_scores.mean()) == pytest.approx(1.0)  # each member's average 1
    assert fitted.decision.threshold == pytest.approx(float(torch.quantile(expected, THRESHOLD_QUANTILE)))
    assert "cross-fitted" in fitted.decision.threshold_source


def test_one_model_file_round_trips_and_older_single_files_still_load(fitted, test_images, tmp_path, capsys):
    path = tmp_path / "ensemble.pcf"
    fitted.save(path)
    loaded = PatchCore.load(path, device="cpu", progress=False)
    assert isinstance(loaded, PatchCoreEnsemble) and loaded.normalisation == fitted.normalisation
    expected = fitted.predict(test_images)
    got = loaded.predict(test_images)
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.maps, expected.maps)
    assert loaded.decision.threshold == fitted.decision.threshold
    assert torch.equal(loaded.decision.normal_scores, fitted.decision.normal_scores.float().double())

    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 members" in out and "member 1 backbone    efficientnet_lite1" in out and "member 0 normalised" in out
    single = tmp_path / "single.pcf"
    fitted.members[0].save(single)
    assert isinstance(PatchCore.load(single, device="cpu", progress=False), PatchCore)
    # a format 4 file (one model, before ensembles) reads as before
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(single), "pt") as f:
        meta = json.loads(f.metadata()["patchcore_fast"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = 4
    save_file(tensors, str(tmp_path / "v4.pcf"), metadata={"patchcore_fast": json.dumps(meta)})
    v4 = PatchCore.load(tmp_path / "v4.pcf", device="cpu", progress=False)
    assert model_file.load(tmp_path / "v4.pcf").file_format == 4
    assert torch.equal(v4.predict(test_images).scores, fitted.members[0].predict(test_images).scores)


def test_calibration_and_update_keep_the_ensembles_units(fitted, test_images):
    model = PatchCore(backbone=PAIR, **SETTINGS).fit(texture_batch(range(12)), cross_fitted_threshold=False)
    assert model.decision.threshold is None and model.decision.normal_scores is not None
    model.calibrate(texture_batch(range(30, 36)), quantile=0.5)
    good = model.predict(texture_batch(range(30, 36))).scores
    assert model.decision.threshold == pytest.approx(float(torch.quantile(good.double(), 0.5)))
    before, normalisation = model.bank_rows, list(model.normalisation)
    model.update(texture_batch(range(40, 46)))
    assert model.added_images == 6 and model.bank_rows > before
    assert all(len(m.decision.normal_scores) == 18 for m in model.members)
    assert len(model.decision.normal_scores) == 18
    assert model.normalisation == normalisation  # kept from the fit
    assert model.decision.threshold_source.startswith("quantile 0.5")  # a calibrated threshold is kept
    new = normalised([m.decision.normal_scores[12:] for m in model.members], model.normalisation)
    assert torch.allclose(model.decision.normal_scores[12:], new)


def test_bad_ensembles_are_refused_with_a_reason(fitted):
    with pytest.raises(ValueError, match="at least two backbones"):
        PatchCore(backbone=["efficientnet_lite0"], **SETTINGS)
    with pytest.raises(ValueError, match="given twice"):
        PatchCore(backbone=["efficientnet_lite0", "efficientnet_lite0"], **SETTINGS)
    with pytest.raises(ValueError, match="layers differ"):
        PatchCore(backbone=PAIR, layers=("blocks.4",), **SETTINGS)
    with pytest.raises(TypeError, match="by name"):
        PatchCore(backbone=["efficientnet_lite0", 3], **SETTINGS)
    with pytest.raises(UserError, match="fit"):
        PatchCore(backbone=PAIR, **SETTINGS).predict(texture_batch(range(2)))
    with pytest.raises(UserError, match="fewer than 2"):  # nothing to normalise by
        PatchCore(backbone=PAIR, **SETTINGS).fit(texture_batch(range(1)))
    with pytest.raises(UserError, match="once per member"):
        fitted.predict(iter(texture_batch(range(2))))
    with pytest.raises(ValueError, match="one features tensor per member"):
        fitted.score(fitted.members[0].extract(texture_batch(range(2))))


def test_the_exported_ensemble_matches_predict(fitted, tmp_path):
    pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install --no-build-isolation -e ".[onnx]")')
    pytest.importorskip("onnxscript", reason='onnxscript is not installed (pip install --no-build-isolation -e ".[onnx]")')
    from PIL import Image

    from patchcore_fast.export import check_onnx, export

    images = [Image.fromarray((t.permute(1, 2, 0).numpy() * 255).astype("uint8")) for t in texture_batch(range(50, 53))]
    path = export(fitted, tmp_path / "ensemble.onnx")
    assert check_onnx(fitted, path, images) < 1e-4
    graph = fitted.exportable()
    batch = texture_batch(range(50, 53))
    scores, maps = graph(batch)
    expected = fitted.predict(batch)
    assert torch.allclose(scores, expected.scores, atol=1e-3) and maps.shape == expected.maps.shape


def test_tables_name_the_members_and_the_command_line_fits_an_ensemble(fitted, tmp_path, capsys):
    assert method_name(0.1, fitted) == "PatchCore-10 Lite0+Lite1"
    assert method_name(0.1, fitted.members[0]) == "PatchCore-10"
    data = synthetic.generate(tmp_path / "data", seed=3, train=6, test_good=1, per_defect=1)
    model = tmp_path / "m.pcf"
    small = ["--image-size", "64", "--resize", "64", "--device", "cpu"]
    assert main(["--quiet", "fit", str(data / "grass" / "train" / "good"), "--out", str(model), "--backbone", *PAIR,
                 *small]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0 + efficientnet_lite1" in out
    assert main(["--quiet", "predict", str(model), str(data / "grass" / "test" / "good"), "--out",
                 str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "scores.csv").read_text().count("\n") == 2
    assert main(["fit", str(data / "grass" / "train" / "good"), "--out", str(model), "--backbone", *PAIR,
                 "--layers", "blocks.4", *small]) == 2
    assert "per backbone" in capsys.readouterr().err


def test_a_tiled_ensemble_combines_its_members_stitched_maps(tmp_path):
    from images import texture

    def images(seeds):
        return [texture(s, (160, 120)) for s in seeds]

    model = PatchCore(backbone=PAIR, **SETTINGS, tile=64, tile_overlap=8).fit(images(range(6)))
    pred = model.predict(images((20, 21)))
    assert pred.maps is None and [m.shape for m in pred.original_maps] == [(120, 160)] * 2
    members = [m.predict(images((20, 21))) for m in model.members]
    for i in range(2):
        assert torch.allclose(pred.original_maps[i], normalised([p.original_maps[i] for p in members], model.normalisation))
    assert torch.allclose(pred.scores, normalised([p.scores for p in members], model.normalisation))
    model.save(tmp_path / "tiled.pcf")
    again = PatchCore.load(tmp_path / "tiled.pcf", device="cpu", progress=False).predict(images((20, 21)))
    assert torch.equal(again.scores, pred.scores)
