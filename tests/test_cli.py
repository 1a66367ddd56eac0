"""The command line: evaluate, fit, predict, demo, and its error handling."""

import csv

import numpy as np
import pytest
import torch

from patchcore_fast import synthetic
from patchcore_fast.cli import main

SMALL = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--resize", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data") / "synthetic", seed=1, train=4, test_good=2, per_defect=1)


def test_evaluate_writes_results_tables_and_timings(dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["--quiet", "evaluate", str(dataset), "--categories", "brick", "grass", "--ratios", "0.25", "0.1",
                 "--out", str(out), *SMALL]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["category"]) for r in rows] == [
        ("PatchCore-25", "brick"), ("PatchCore-10", "brick"), ("PatchCore-25", "grass"), ("PatchCore-10", "grass")]
    assert all(0 <= float(r[k]) <= 100 for r in rows for k in ("image_auroc", "pixel_auroc", "pro"))
    timings = list(csv.DictReader(open(out / "timings.csv")))
    assert set(timings[0]) == {"method", "category", "features", "coreset", "index", "threshold", "search", "maps",
                               "metrics"}
    tables = (out / "tables.md").read_text()
    assert "| Method | Avg | brick | grass |" in tables and tables.count("PatchCore-25") == 4
    assert "### Image F1 at the calibrated threshold" in tables and all(0 <= float(r["f1"]) <= 100 for r in rows)
    assert "### PRO" in capsys.readouterr().out
    assert len(list((out / "overlays" / "brick").glob("*.png"))) == 6


def test_fit_then_predict(dataset, tmp_path):
    model = tmp_path / "brick.pcf"
    assert main(["--quiet", "fit", str(dataset), "--category", "brick", "--out", str(model), *SMALL]) == 0
    out = tmp_path / "pred"
    test = dataset / "brick" / "test"
    assert main(["--quiet", "predict", str(model), str(test / "good"), str(test / "hole" / "000.png"),
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 3 and all(float(r["score"]) > 0 for r in rows)
    assert len(list(out.glob("*.png"))) == 3


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "/no/such/folder", "--out", "x"], "no such folder"),
    (["fit", "/no/such/folder", "--category", "c", "--out", "m.pcf"], "no folder /no/such/folder/c/train/good"),
    (["fit", "/no/such/folder", "--out", "m.pcf"], "no such folder"),
    (["fit", ".", "--out", "/no/such/dir/m.pcf"], "no folder /no/such/dir"),
    (["evaluate", ".", "--categories", "nope", "--out", "x"], "no category nope"),
    (["predict", "/no/such/model.pcf", "img.png"], "no model file"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_backbone_and_debug(dataset, capsys):
    argv = ["--quiet", "fit", str(dataset), "--category", "brick", "--out", "m.pcf", "--backbone", "nonet"]
    assert main(argv) == 2
    assert "unknown backbone" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown backbone"):
        main(["--debug", *argv[1:]])


def test_generated_dataset_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, train=2, test_good=1, per_defect=1)
    b = synthetic.generate(tmp_path / "b", seed=3, train=2, test_good=1, per_defect=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert {p.name for p in (a / "gravel" / "ground_truth").iterdir()} == set(synthetic.DEFECTS)


def test_fit_a_plain_folder_of_good_images(dataset, tmp_path, capsys):
    folder = tmp_path / "good"
    folder.mkdir()
    for p in sorted((dataset / "brick" / "train" / "good").iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "broken.png").write_bytes(b"not a png")
    model = tmp_path / "m.pcf"
    assert main(["--quiet", "fit", str(folder), "--out", str(model), *SMALL]) == 2  # broken.png named, nothing saved
    assert "broken.png" in capsys.readouterr().err and not model.exists()
    assert main(["fit", str(folder), "--out", str(model), "--skip-bad-images", *SMALL]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "fitting 5 image files (whole image resized to 64 x 64); 1 other file(s) left alone" in out
    assert "fitted on 4 images (1 skipped)" in out  # what was used, not what was found
    warned = [line for line in captured.err.splitlines() if "warning:" in line]  # one line, once, by name
    assert len(warned) == 1 and warned[0].startswith("patchcore-fast: warning: skipped: cannot read image")
    assert "broken.png" in warned[0] and "RuntimeWarning" not in captured.err
    assert "framing whole" in out and model.is_file()
    pred = tmp_path / "pred"
    assert main(["predict", str(model), str(folder), "--out", str(pred), "--skip-bad-images", "--quiet"]) == 0
    assert len(list(pred.glob("*.png"))) == 4  # Thumbs.db left alone, broken.png skipped


def test_outputs_are_checked_before_any_work(dataset, tmp_path, capsys):
    folder_out = tmp_path / "exists"
    folder_out.mkdir()
    assert main(["--quiet", "fit", str(dataset), "--category", "brick", "--out", str(folder_out), *SMALL]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(folder_out.iterdir()) == []
    assert main(["--quiet", "evaluate", str(dataset), "--categories", "nope", "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()


def test_overlays_use_the_models_fixed_scale(dataset, tmp_path):
    """A good image's overlay is the same whether it is predicted alone or next to a defect."""
    from PIL import Image

    from patchcore_fast import PatchCore

    model_path = tmp_path / "brick.pcf"
    assert main(["--quiet", "fit", str(dataset), "--category", "brick", "--out", str(model_path), *SMALL]) == 0
    model = PatchCore.load(model_path, device="cpu", progress=False)
    low, high = model.bank.decision.colour_scale()
    assert low == 0 and high > 0 and len(model.bank.decision.normal_scores) == 4  # all 4 training images, each left out
    good = dataset / "brick" / "test" / "good" / "000.png"
    defect = next((dataset / "brick" / "test").glob("[!g]*/000.png"))
    alone, together = tmp_path / "alone", tmp_path / "together"
    assert main(["--quiet", "predict", str(model_path), str(good), "--out", str(alone)]) == 0
    assert main(["--quiet", "predict", str(model_path), str(good), str(defect), "--out", str(together)]) == 0
    a, b = Image.open(alone / "good_000.png"), Image.open(together / "good_000.png")
    width, height = Image.open(good).size
    assert a.size[1] == height and width + max(8, height // 20) < a.size[0] < width + 100  # image, colour bar, labels
    # equal up to the backbone's rounding in a batch of one vs two (per-run scaling moved whole colours)
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


def test_calibrated_threshold_gives_decisions(dataset, tmp_path):
    from patchcore_fast import PatchCore

    model_path = tmp_path / "brick.pcf"
    good = dataset / "brick" / "test" / "good"
    assert main(["--quiet", "fit", str(dataset), "--category", "brick", "--out", str(model_path), "--calibrate",
                 str(good), "--quantile", "0.5", *SMALL]) == 0
    model = PatchCore.load(model_path, device="cpu", progress=False)
    plain = PatchCore.from_config(model.config, device="cpu", progress=False)
    plain.bank = model.bank  # the same bank: the scores the threshold came from
    expected = float(torch.quantile(plain.predict(sorted(good.iterdir())).scores.double(), 0.5))
    assert model.bank.decision.threshold == pytest.approx(expected, rel=1e-6)
    assert model.bank.decision.colour_scale() == (0.0, model.bank.decision.threshold)
    out = tmp_path / "pred"
    defect = next((dataset / "brick" / "test").glob("[!g]*/000.png"))
    assert main(["--quiet", "predict", str(model_path), str(good), str(defect), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert set(rows[0]) == {"path", "score", "normalized_score", "is_anomalous", "overlay"}
    assert all((out / row["overlay"]).is_file() for row in rows)
    for row in rows:
        norm = float(row["score"]) / model.bank.decision.threshold
        assert float(row["normalized_score"]) == pytest.approx(norm, rel=1e-5)
        assert row["is_anomalous"] == str(int(norm > 1))


def test_f1_optimal_calibration_from_labelled_folders(dataset, tmp_path):
    from patchcore_fast import PatchCore
    from patchcore_fast.metrics import f1_optimal_threshold

    model_path = tmp_path / "brick.pcf"
    good = dataset / "brick" / "test" / "good"
    defects = next(p for p in (dataset / "brick" / "test").iterdir() if p.is_dir() and p.name != "good")
    assert main(["--quiet", "fit", str(dataset), "--category", "brick", "--out", str(model_path), "--calibrate",
                 str(good), "--calibrate-defects", str(defects), *SMALL]) == 0
    model = PatchCore.load(model_path, device="cpu", progress=False)
    assert model.bank.decision.threshold_source.startswith("F1-optimal")
    plain = PatchCore.from_config(model.config, device="cpu", progress=False)
    plain.bank = model.bank
    scores = torch.cat([plain.predict(sorted(good.iterdir())).scores, plain.predict(sorted(defects.iterdir())).scores])
    labels = torch.cat([torch.zeros(len(list(good.iterdir()))), torch.ones(len(list(defects.iterdir())))])
    assert model.bank.decision.threshold == pytest.approx(f1_optimal_threshold(scores, labels)[0], rel=1e-6)
    assert main(["--quiet", "fit", str(dataset), "--category", "brick", "--out", str(tmp_path / "x.pcf"),
                 "--calibrate-defects", str(defects), *SMALL]) == 2  # needs --calibrate too


def test_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score as sk_f1

    from patchcore_fast.evaluate import f1_score

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        flagged, labels = torch.rand(30, generator=g) > 0.5, torch.rand(30, generator=g) > 0.4
        assert f1_score(flagged, labels) == pytest.approx(sk_f1(labels.numpy(), flagged.numpy()), abs=1e-12)
