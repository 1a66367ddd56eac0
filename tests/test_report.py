"""report.html of evaluate and predict: its parts, and the page itself in a real browser
(Debian's chromium, headless): it loads from disk with no errors, its script runs and its plots
are drawn."""

import csv
import re
import shutil
import subprocess

import numpy as np
import pytest

from patchcore_fast import report, synthetic
from patchcore_fast.cli import main

SMALL = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--resize", "64", "--device", "cpu"]


def test_roc_curve_is_sklearns():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    fpr, tpr = report.roc_curve(scores, labels)
    ref_fpr, ref_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)
    assert np.isclose(np.trapezoid(tpr, fpr), metrics.roc_auc_score(labels, scores))


def test_gallery_shows_false_alarms_then_misses_first():
    scores = [0.9, 0.1, 0.5, 0.7, 0.2, 0.95]
    labels = [True, True, False, False, False, True]
    # at 0.6: image 3 is a false alarm, image 1 a miss
    assert report.gallery_order(scores, labels, 0.6) == [3, 1, 5, 0, 2, 4]
    assert report.gallery_order(scores, labels, None) == [5, 0, 3, 2, 4, 1]


def test_thin_keeps_ends_and_bounds_points():
    x = np.linspace(0, 1, 10_001)
    tx, ty = report.thin(x, x ** 2, 500)
    assert len(tx) <= 500 and tx[0] == 0 and tx[-1] == 1 and np.allclose(ty, tx ** 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An evaluate run and a predict run on a small synthetic dataset: (evaluate folder, predict folder)."""
    root = tmp_path_factory.mktemp("report")
    data = synthetic.generate(root / "data", seed=2, train=4, test_good=2, per_defect=1)
    evaluated, model, predicted = root / "eval", root / "brick.pcf", root / "pred"
    assert main(["--quiet", "evaluate", str(data), "--categories", "brick", "--out", str(evaluated), *SMALL]) == 0
    assert main(["--quiet", "fit", str(data), "--category", "brick", "--out", str(model),
                 "--calibrate", str(data / "brick" / "test" / "good"), *SMALL]) == 0
    folders = [str(p) for p in sorted((data / "brick" / "test").iterdir())]
    assert main(["--quiet", "predict", str(model), *folders, "--out", str(predicted), "--device", "cpu"]) == 0
    return evaluated, predicted


def test_evaluate_report_holds_tables_plots_gallery_and_settings(runs):
    evaluated, _ = runs
    page = (evaluated / "report.html").read_text()
    result = next(csv.DictReader(open(evaluated / "results.csv")))
    assert f"{float(result['image_auroc']):.2f}" in page and "Pixel AUROC" in page and "Timings" in page
    assert page.count("<svg") == 3  # ROC, PRO, histogram
    assert report.CURVE_COLOUR in page and report.GOOD_COLOUR in page and report.DEFECT_COLOUR in page
    links = re.findall(r'<img src="([^"]+)"', page)
    assert links and all((evaluated / link).is_file() for link in links)  # relative links to the run's overlays
    assert "threshold " in page and "efficientnet_lite0" in page and "patchcore_fast</th>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from anywhere: it opens offline


def test_predict_report_lists_every_image_with_its_decision(runs):
    _, predicted = runs
    page = (predicted / "report.html").read_text()
    rows = list(csv.DictReader(open(predicted / "scores.csv")))
    assert page.count('<img class="thumb"') == len(rows)
    for row in rows:
        assert row["path"] in page and (predicted / row["overlay"]).is_file()
    decisions = sorted(re.findall(r'data-value="(anomalous|normal)"', page))
    assert decisions == sorted("anomalous" if r["is_anomalous"] == "1" else "normal" for r in rows)
    assert "quantile" in page  # where the threshold came from


def chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def browse(page, tmp_path, height=2400):
    """(DOM after scripts ran, console lines, screenshot as an RGB array) of `page` in headless chromium."""
    from PIL import Image

    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    shot = tmp_path / f"{page.parent.name}.png"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
              "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    taken = subprocess.run([*common, f"--window-size=1280,{height}", f"--screenshot={shot}", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    console = [line for line in (dom.stderr + taken.stderr).splitlines() if "CONSOLE" in line]
    return dom.stdout, console, np.asarray(Image.open(shot).convert("RGB"))


def colour_pixels(image, colour: str, tolerance=40) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image.astype(int) - rgb).sum(axis=2) < tolerance).sum())


def test_reports_open_in_a_real_browser_with_no_errors_and_drawn_plots(runs, tmp_path):
    evaluated, predicted = runs
    dom, console, image = browse(evaluated / "report.html", tmp_path)
    assert not [line for line in console if "rror" in line], console
    assert "PatchCore evaluation" in dom
    assert colour_pixels(image, report.CURVE_COLOUR) > 300  # the ROC and PRO curves
    assert colour_pixels(image, report.DEFECT_COLOUR, 60) > 100  # the defective images' histogram (alpha-blended)
    dom, console, image = browse(predicted / "report.html", tmp_path)
    assert not [line for line in console if "rror" in line], console
    assert re.search(r'<span id="page">page 1 of 1</span>', dom), "the table's script did not run"
    assert colour_pixels(image, report.CURVE_COLOUR, 60) > 100  # the score histogram
