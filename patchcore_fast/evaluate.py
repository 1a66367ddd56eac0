"""Fit and evaluate PatchCore on MVTec AD-layout categories; results in the paper's layout."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .data import MVTecCategory, load_mask
from .decision import quantile_threshold
from .ensemble import PatchCoreEnsemble
from .model import PatchCore
from .overlay import save_overlays
from .report import CategoryResult, evaluate_report, thin

METRICS = (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"), ("pro", "PRO"),
           ("f1", "Image F1 at the calibrated threshold"))
#: The threshold: this quantile of the validation/good images' scores where the category has them,
#: else the model's own, cross-fitted on its training images (decision.py).
CALIBRATION_QUANTILE = 0.99
#: PRO is the area under the per-region overlap curve up to this false positive rate (metrics.pro).
PRO_FPR_LIMIT = 0.3
STAGES = ("features", "coreset", "index", "threshold", "search", "maps", "metrics")


def method_name(ratio: float, model=None) -> str:
    """The paper's name (PatchCore-10 for a 10 % coreset), with an ensemble's members: PatchCore-10 Lite0+Lite2."""
    suffix = f" {model.method_suffix}" if isinstance(model, PatchCoreEnsemble) else ""
    return f"PatchCore-{ratio * 100:g}{suffix}"


def evaluate_category(root, category: str, ratios, out_dir: Path | None = None, progress: bool = True,
                      **model_args) -> tuple[list[dict], list[dict]]:
    """Fit each coreset ratio on train/good and score test/*. Features are extracted once and shared
    by the ratios. A list of backbones evaluates their ensemble (ensemble.py). Returns result rows (metrics in percent) and timing rows (seconds per stage)."""
    data = MVTecCategory.open(root, category)
    # The paper's protocol (resize + centre crop) unless asked otherwise, so tables stay comparable.
    model_args.setdefault("framing", "center_crop")
    base = PatchCore(coreset_ratio=ratios[0], progress=progress, **model_args)
    train = base.extract(data.train, desc=f"{category} train features")
    test = base.extract([item.path for item in data.test], desc=f"{category} test features")
    validation = base.extract(data.validation, desc=f"{category} validation features") if data.validation else None
    feature_seconds = base.timings["decode"] + base.timings["features"]  # images in, patch features out
    labels = torch.tensor([item.is_anomalous for item in data.test])
    masks = [load_mask(item, base.transform) for item in data.test]
    with_mask = [i for i, m in enumerate(masks) if m is not None]
    has_defect_masks = any(masks[i].any() for i in with_mask)

    results, timings, shown = [], [], []
    for n, ratio in enumerate(ratios):
        model = base.with_settings(coreset_ratio=ratio)  # same backbone, features shared
        model.fit_features(train)
        pred = model.score(test)
        start = time.perf_counter()
        threshold, source = calibrated_threshold(model, validation)
        row = {"method": method_name(ratio, model), "category": category,
               "image_auroc": 100 * metrics.auroc(pred.scores, labels),
               "f1": math.nan if threshold is None else 100 * f1_score(pred.scores > threshold, labels)}
        curve = None
        if has_defect_masks:
            maps = pred.maps[with_mask]
            gt = torch.stack([masks[i] for i in with_mask])
            row["pixel_auroc"] = 100 * metrics.pixel_auroc(maps, gt)
            fpr, overlap = metrics.pro_curve(maps, gt)
            row["pro"] = 100 * metrics.area_up_to(fpr, overlap, PRO_FPR_LIMIT) / PRO_FPR_LIMIT  # metrics.pro
            curve = thin(fpr.cpu().numpy(), overlap.cpu().numpy())
        else:  # no ground truth: image metrics only
            row["pixel_auroc"] = row["pro"] = math.nan
        metric_seconds = time.perf_counter() - start
        results.append(row)
        timings.append({"method": row["method"], "category": category,
                        "features": feature_seconds if n == 0 else 0.0, "coreset": model.timings["coreset"],
                        "index": model.timings["index"], "threshold": model.timings["threshold"],
                        "search": model.timings["search"], "maps": model.timings["maps"], "metrics": metric_seconds})
        overlays = []
        if out_dir is not None and n == 0:
            overlays = write_overlays(out_dir, category, model, data, pred, masks)
        shown.append(CategoryResult(
            method=row["method"], category=category, metrics=row, timings=timings[-1],
            names=[f"{item.defect}/{item.path.stem}" for item in data.test], scores=pred.scores.tolist(),
            labels=labels.tolist(), threshold=threshold, threshold_source=source, overlays=overlays,
            pro_curve=curve))
    return results, timings, shown


def calibrated_threshold(model: PatchCore, validation: torch.Tensor | None) -> tuple[float | None, str]:
    """(threshold, where it came from); None when there is nothing to set it from (no validation
    images, one training image)."""
    if validation is not None:
        threshold, source = quantile_threshold(model.score(validation).scores, CALIBRATION_QUANTILE)
        return threshold, source.replace("good images", "validation/good images")
    own = model.decision  # cross-fitted on the training images (decision.py)
    return own.threshold, own.threshold_source or "none"


def f1_score(flagged: torch.Tensor, labels: torch.Tensor) -> float:
    tp = int((flagged & labels).sum())
    wrong = int((flagged != labels).sum())
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 1.0


def write_overlays(out_dir: Path, category: str, model: PatchCore, data: MVTecCategory, pred, masks) -> list[str]:
    """Overlays of the test images in out_dir/overlays/CATEGORY; returns their paths relative to out_dir."""
    # the model's fixed scale: 0 to the highest good-image score; without one, this run's range
    low, high = model.decision.colour_scale() or (float(pred.maps.min()), float(pred.maps.max()))
    names = [f"{item.defect}_{item.path.stem}.png" for item in data.test]
    save_overlays(out_dir / "overlays" / category, [item.path for item in data.test], names,
                  pred.maps, [masks[i] if item.is_anomalous else None for i, item in enumerate(data.test)],
                  model.transform, model.batch_size, low, high, pred.scores)
    return [f"overlays/{category}/{name}" for name in names]


def evaluate(root, out_dir, categories=None, ratios=(0.1,), progress: bool = True, **model_args):
    """Evaluate every category (all found under root by default); writes results.csv, tables.md,
    timings.csv and report.html to out_dir and returns (results, timings, tables)."""
    out_dir = Path(out_dir)
    categories, ratios = check_arguments(root, categories, ratios)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, timings, shown = [], [], []
    for category in tqdm(categories, desc="categories", disable=not progress):
        r, t, s = evaluate_category(root, category, ratios, out_dir, progress=progress, **model_args)
        results += r
        timings += t
        shown += s
    write_csv(out_dir / "results.csv", results, ["method", "category", "image_auroc", "pixel_auroc", "pro", "f1"])
    write_csv(out_dir / "timings.csv", timings, ["method", "category", *STAGES])
    tables = markdown_tables(results)
    (out_dir / "tables.md").write_text(tables)
    settings = {"data": Path(root).resolve(), "categories": ", ".join(categories),
                "coreset ratios": ", ".join(f"{r:g}" for r in ratios),
                **{key: value for key, value in model_args.items() if value is not None}}
    evaluate_report(out_dir / "report.html", shown, settings)
    return results, timings, tables


def check_arguments(root, categories=None, ratios=(0.1,)) -> tuple[list[str], list[float]]:
    """The categories and ratios `evaluate` will run, checked before anything is written."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    found = MVTecCategory.categories(root)
    categories = list(categories or found)
    if not categories:
        raise FileNotFoundError(f"no categories (folders with train/good) under {root}")
    unknown = [c for c in categories if c not in found]
    if unknown:
        raise FileNotFoundError(f"no categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} under {root} "
                                f"(found: {', '.join(found) or 'none'})")
    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not 0 < r <= 1:
            raise ValueError(f"coreset ratios must be in (0, 1], got {r}")
    return categories, ratios


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in columns])


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return value


def markdown_tables(results: list[dict]) -> str:
    """One table per metric, the paper's layout: rows = method, columns = Avg then one per category."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    categories = list(dict.fromkeys(r["category"] for r in results))
    by_key = {(r["method"], r["category"]): r for r in results}
    parts = []
    for key, title in METRICS:
        lines = [f"### {title}", "", "| Method | Avg | " + " | ".join(categories) + " |",
                 "|---" * (len(categories) + 2) + "|"]
        for method in methods:
            values = [by_key[(method, c)][key] if (method, c) in by_key else math.nan for c in categories]
            finite = [v for v in values if not math.isnan(v)]
            avg = sum(finite) / len(finite) if finite else math.nan
            cells = ["-" if math.isnan(v) else f"{v:.1f}" for v in [avg, *values]]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
