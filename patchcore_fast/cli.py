"""patchcore-fast: fit, predict, evaluate and the offline demo from the command line."""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

#: Status lines go to standard output and warnings and errors to standard error, all through this
#: logger (the handler is installed by main()); the result tables are the program's output and printed.
log = logging.getLogger("patchcore_fast")


def _model_args(args) -> dict:
    # Layer names go to the backbone as given; backbones.normalise_layers reads plain numbers as layerN.
    backbone = args.backbone[0] if len(args.backbone) == 1 else args.backbone  # several: an ensemble
    if not isinstance(backbone, str) and (args.layers or args.weights):
        raise ValueError("--layers and --weights are per backbone: an ensemble (several --backbone) uses each "
                         "backbone's defaults")
    return dict(backbone=backbone, layers=tuple(args.layers) if args.layers else None, framing=args.framing,
                image_size=args.image_size, resize=args.resize, device=args.device, weights=args.weights,
                skip_bad_images=args.skip_bad_images, pruned_search=not args.brute_force_search,
                batch_size=args.batch_size)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _stages(timings) -> str:
    """The stage timings of a run, one line: "decode 0.52 s, features 3.14 s, coreset 1.20 s, ..."."""
    return ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in timings.items())


def training_images(root: Path, category: str | None) -> tuple[list[Path], int]:
    """The good images `fit` learns from: ROOT/CATEGORY/train/good (MVTec AD layout) with --category,
    otherwise ROOT itself, any folder of images. Also how many other files were left alone."""
    from .data import image_files, other_files

    folder = Path(root) / category / "train" / "good" if category else Path(root)
    if category and not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} (MVTec AD layout: ROOT/CATEGORY/train/good)")
    images = image_files(folder)
    if not images:
        subfolders = sum(1 for p in folder.iterdir() if p.is_dir())
        raise ValueError(f"folder {folder} holds no image files" + (
            f" (its {subfolders} subfolder(s) are not searched)" if subfolders else ""))
    return images, len(other_files(folder))


def cmd_fit(args) -> None:
    from .decision import check_quantile
    from .model import PatchCore
    from .run_outputs import check_writable_file

    # Every argument and path is checked before any work: a typo must not throw a fit away.
    out = check_writable_file(args.out)
    if args.calibrate_defects and not args.calibrate:
        raise ValueError("--calibrate-defects needs --calibrate GOOD_FOLDER as well")
    try:
        check_quantile(args.quantile)
    except ValueError as error:
        raise ValueError(f"--quantile: {error}") from None
    images, ignored = training_images(args.root, args.category)
    calibration = training_images(args.calibrate, None)[0] if args.calibrate else None
    defective = training_images(args.calibrate_defects, None)[0] if args.calibrate_defects else None
    if args.tile_overlap and args.tile is None:
        raise ValueError("--tile-overlap needs --tile SIZE")
    model = PatchCore(coreset_ratio=args.ratio, progress=not args.quiet, tile=args.tile, tile_overlap=args.tile_overlap,
                      **_model_args(args))
    model.check_fit_size(len(images), "--ratio")
    seen = model.config.tiling.describe() + f", each resized to {model.config.image_size} x {model.config.image_size}" \
        if model.config.tiling else model.transform.describe()
    log.info(f"fitting {_count(len(images), 'image file')} ({seen})"
          + (f"; {ignored} other file(s) left alone" if ignored else ""))
    model.fit(images, cross_fitted_threshold=calibration is None)  # a calibration replaces it
    skipped = len(images) - model.fitted_images
    log.info(f"fitted on {_count(model.fitted_images, 'image')}" + (f" ({skipped} skipped)" if skipped else "")
          + f": memory bank {model.bank_rows:,} x {model.config.embed_dim}; {_stages(model.timings)}")
    if calibration is not None:
        model.calibrate(calibration, args.quantile, defective)
        log.info(f"threshold {model.decision.threshold:.6g}: {model.decision.threshold_source}")
    model.save(out)  # under torchrun: rank 0 writes the whole bank
    log.info(f"saved {out} ({model.backbone_name}, framing {model.config.framing})")


def cmd_update(args) -> None:
    from .model import PatchCore
    from .run_outputs import check_writable_file

    out = check_writable_file(args.out)
    images, ignored = training_images(args.images, None)
    model = PatchCore.load(args.model, device=args.device, progress=not args.quiet, batch_size=args.batch_size,
                           skip_bad_images=args.skip_bad_images)
    before = model.bank_rows
    log.info(f"adding {_count(len(images), 'image file')} to {args.model} (bank {before:,} rows)"
             + (f"; {ignored} other file(s) left alone" if ignored else ""))
    model.update(images)
    skipped = len(images) - model.added_images
    d = model.decision
    log.info(f"added {_count(model.added_images, 'image')}" + (f" ({skipped} skipped)" if skipped else "")
             + f": memory bank {before:,} -> {model.bank_rows:,} rows; {_stages(model.timings)}")
    log.info("threshold " + ("none" if d.threshold is None else f"{d.threshold:.6g}: {d.threshold_source}"))
    model.save(out)
    log.info(f"saved {out}")


#: Overlays on the original images are drawn with their long side at most this many pixels: a
#: 12,000 px photograph gets a 2,048 px overlay (what a screen shows), in bounded memory.
OVERLAY_MAX_SIDE = 2048


def cmd_predict(args) -> None:
    from .data import image_paths
    from .model import PatchCore
    from .run_outputs import OutputFolder

    folder = OutputFolder(args.out, args.overwrite).check()
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"no model file {args.model}")
    paths = image_paths(args.images)
    model = PatchCore.load(args.model, device=args.device, progress=not args.quiet,
                           skip_bad_images=args.skip_bad_images, batch_size=args.batch_size)
    decision = model.decision
    scale = decision.colour_scale()
    if scale is None:  # a model fitted from pooled features: no good-image scores to set a scale
        log.info("this model has no fixed colour scale (fitted from pooled features): each overlay uses its own range")
    with _output_folder(folder) as out, open(out / "scores.csv", "w", newline="") as scores_csv:
        rows, names = [], set()
        write_score = _scores_writer(scores_csv, decision)
        view_side = OVERLAY_MAX_SIDE if args.overlays == "original" else None
        for part, batch in model.predict_batches(paths, view_side=view_side):
            for i, source in enumerate(part.sources):
                name = _overlay_name(Path(source), names)
                _draw_overlay(out / name, model, args.overlays, part, batch, i, scale)
                rows.append([str(source), float(part.scores[i]), name])
                write_score(*rows[-1])
            scores_csv.flush()  # written as it goes: an interrupted run keeps what it scored
        if not rows:
            raise ValueError("no images to score")
        from .report import predict_report

        config = model.config
        predict_report(out / "report.html", rows, decision.threshold, decision.threshold_source,
                       {"model": Path(args.model).resolve(), "images": ", ".join(map(str, args.images)),
                        "backbone": model.backbone_name, "framing": config.framing,
                        "coreset ratio": config.coreset_ratio, "bank rows": model.bank_rows,
                        "overlays": args.overlays, "device": model.device})
    if not model.workers.is_main:
        return
    folder.finish()
    scores = torch.tensor([r[1] for r in rows])
    verdict = ("no threshold: scores only (fit with --calibrate for decisions)" if decision.threshold is None else
               f"{int(decision.is_anomalous(scores).sum())} flagged anomalous at threshold {decision.threshold:.6g} "
               f"({decision.threshold_source})")
    log.info(f"scored {_count(len(rows), 'image')}: {verdict}; highest score {float(scores.max()):.6g}")
    log.info(f"outputs: {folder.path / 'report.html'}, {folder.path / 'scores.csv'}, "
             f"{_count(len(rows), 'overlay')} in {folder.path}; "
          f"{_stages(model.timings)}")


def _overlay_name(source: Path, taken: set) -> str:
    """FOLDER_STEM.png (so defect/000 and good/000 stay apart), made unique within the run."""
    stem = f"{source.parent.name}_{source.stem}" if source.parent.name else source.stem
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}.png"
    taken.add(name)
    return name


def _draw_overlay(path: Path, model, overlays: str, part, batch, i: int, scale) -> None:
    """One overlay: on the decoded image itself (at most OVERLAY_MAX_SIDE), or on the model's view."""
    import numpy as np
    from PIL import Image

    from .data import TestImage, bounded, load_mask, mvtec_mask_path, open_image, to_rgb
    from .overlay import save_overlay

    if not model.workers.is_main:
        return
    source, threshold = Path(part.sources[i]), part.threshold
    tiled = part.maps is None  # a tiled model's map covers the whole image already (tiling.py)
    own = part.original_maps[i] if tiled else part.maps[i]
    low, high = scale or (float(own.min()), float(own.max()))
    mask_path = mvtec_mask_path(source)
    if overlays == "model" and not tiled:
        mask = load_mask(TestImage(source, source.parent.name, mask_path), model.transform) if mask_path else None
        image = batch.images[i] if batch.images is not None else model.transform.image(open_image(source))
        save_overlay(path, image, part.maps[i], low, high, mask, float(part.scores[i]), threshold)
        return
    view = batch.views[i] if batch.views is not None else bounded(to_rgb(open_image(source)), OVERLAY_MAX_SIDE)
    width, height = part.sizes[i]
    if tiled:
        heat = torch.nn.functional.interpolate(own[None, None], size=(view.height, view.width), mode="bilinear",
                                               align_corners=False)[0, 0]
    else:
        heat = model.transform.to_original(part.maps[i], width, height, out_size=view.size)
    mask = None
    if mask_path is not None:
        mask = torch.from_numpy(np.asarray(open_image(mask_path).convert("L").resize(view.size, Image.NEAREST)) > 127)
    image = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    save_overlay(path, image, heat, low, high, mask, float(part.scores[i]), threshold)


def _scores_writer(file, decision):
    """Writes scores.csv's header to `file`; returns the function that writes one image's row."""
    writer = csv.writer(file)
    if decision.threshold is None:
        writer.writerow(["path", "score", "overlay"])
        return lambda source, score, name: writer.writerow([source, f"{score:.6f}", name])
    writer.writerow(["path", "score", "normalized_score", "is_anomalous", "overlay"])  # 1.0 is the threshold
    return lambda source, score, name: writer.writerow([source, f"{score:.6f}", f"{score / decision.threshold:.6f}",
                                                        int(score > decision.threshold), name])


def cmd_info(args) -> None:
    from . import model_file
    from ._version import __version__

    state = model_file.load(args.model)  # the file alone: no backbone weights needed
    size = Path(args.model).stat().st_size
    lines = [("model", f"{args.model} ({size / 1e6:.1f} MB)"),
             ("file format", f"{state.file_format} (written by patchcore_fast {state.written_by or 'unknown'}; "
                             f"this is {__version__})")]
    if isinstance(state, model_file.EnsembleState):
        lines.append(("ensemble", f"{len(state.members)} members; scores averaged after dividing each member's by "
                                  "the mean cross-fitted score of its training images"))
        for i, (member, scale) in enumerate(zip(state.members, state.normalisation)):
            lines += [(f"member {i} {key}", value) for key, value in _model_lines(member)]
            lines.append((f"member {i} normalised", f"score / {scale:.6g}"))
    else:
        lines += _model_lines(state)
    lines += _decision_lines(state.decision)
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))


def _model_lines(state) -> list[tuple[str, str]]:
    """What one model of a file holds (cmd_info), but its decision."""
    c, index = state.config, state.index
    b = c.backbone
    if getattr(index, "bank_extension", None) is not None:
        search = f"pruned, cascade of {index.first_rank} then {index.rank} directions"
    elif index.kind == "pruned":
        search = f"pruned, {index.rank} directions" + ("" if index.pays else " (not used: pruning did not pay)")
    else:
        search = "flat (brute force)"
    return [("backbone", f"{b.name} {list(b.layers)}, weights {b.weights}"
                         + (f" (sha256 {b.weights_sha256[:12]})" if b.weights_sha256 else "")),
            ("features", f"framing {c.framing}, {c.image_size} px" + (f" (resize {c.resize})" if c.framing == "center_crop"
                         else "") + (f", {c.tiling.describe()}" if c.tiling else "")
                         + f", {c.embed_dim}-d, grid {state.grid[0]} x {state.grid[1]}"
                         + (", bfloat16 backbone" if c.half_precision else "")),
            ("coreset", f"ratio {c.coreset_ratio:g}, projection {c.projection_dim}, seed {c.seed}"),
            ("scoring", f"k = {c.num_neighbors}" + (f", reweighted (Eq. 7, {c.reweight_neighbors} neighbours)"
                                                    if c.reweight else "")),
            ("bank", f"{len(index):,} rows x {c.embed_dim}; search index {search}")]


def _decision_lines(d) -> list[tuple[str, str]]:
    threshold = ("none (scores only; calibrate to set one)" if d.threshold is None
                 else f"{d.threshold:.6g} ({d.threshold_source})")
    lines = [("threshold", threshold)]
    if d.normal_scores is not None:
        lines.append(("good scores", f"{len(d.normal_scores)} training images scored without their own patches: "
                                     f"median {float(d.normal_scores.median()):.6g}, highest {float(d.normal_scores.max()):.6g}"))
    return lines


def cmd_export(args) -> None:
    from .data import image_paths
    from .export import check_onnx, export
    from .model import PatchCore
    from .run_outputs import check_writable_file

    out = check_writable_file(args.out)
    images = image_paths(args.check) if args.check else None
    model = PatchCore.load(args.model, device="cpu", progress=False)
    export(model, out, args.format)
    s = model.config.image_size
    log.info(f"exported {out} ({args.format}): input images [B, 3, {s}, {s}] in [0, 1] after the model's transform "
          f"({model.transform.describe()}); outputs scores [B], maps [B, {s}, {s}]")
    if args.check:
        if args.format != "onnx":
            raise ValueError("--check runs onnxruntime: use it with --format onnx")
        relative = check_onnx(model, out, images)
        log.info(f"onnxruntime vs predict on {len(images)} images: image scores within {relative:.2e} (relative)")


@contextlib.contextmanager
def _output_folder(folder):
    """The run's output folder on rank 0 (or without torchrun), created and emptied of the previous
    run's outputs; a scratch folder, removed afterwards, on other ranks, which compute the same
    results in step with rank 0."""
    from . import distributed

    if distributed.is_main():
        yield folder.prepare()
        return
    with tempfile.TemporaryDirectory(prefix="patchcore-rank-") as scratch:
        yield Path(scratch)


def cmd_evaluate(args) -> None:
    from .evaluate import check_arguments, evaluate
    from .run_outputs import OutputFolder

    folder = OutputFolder(args.out, args.overwrite).check()
    check_arguments(args.root, args.categories, args.ratios)
    with _output_folder(folder) as out:
        _, _, tables = evaluate(args.root, out, categories=args.categories, ratios=args.ratios,
                                progress=not args.quiet, **_model_args(args))
    folder.finish()
    print(tables)
    log.info(f"report: {folder.path / 'report.html'}; results: {folder.path / 'results.csv'}, "
             f"timings: {folder.path / 'timings.csv'}")


def cmd_demo(args) -> None:
    from . import synthetic
    from .evaluate import evaluate
    from .run_outputs import OutputFolder

    start = time.perf_counter()
    folder = OutputFolder(args.out, overwrite=True).check()  # the demo replaces its own earlier outputs
    root = synthetic.dataset(args.seed, args.data)
    log.info(f"synthetic dataset (seed {args.seed}): {root}")
    with _output_folder(folder) as out:
        _, _, tables = evaluate(root, out, ratios=args.ratios, progress=not args.quiet,
                                backbone="efficientnet_lite0", device=args.device)
    folder.finish()
    print(tables)
    log.info(f"report: {folder.path / 'report.html'}; results: {folder.path / 'results.csv'}, "
             f"timings: {folder.path / 'timings.csv'}")
    log.info(f"overlays: {folder.path / 'overlays'}")
    log.info(f"done in {time.perf_counter() - start:.1f} s")


def cmd_kernels(args) -> None:
    from .devices import resolve
    from .kernel_demo import demo

    demo(args.train_images, args.test_images, resolve(args.device))


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--quiet, --debug and --device, accepted before and after the subcommand. On the subcommands
    their defaults are suppressed, so a flag given before the subcommand is not reset after it."""
    common = argparse.ArgumentParser(add_help=False)
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    common.add_argument("--quiet", action="store_true", default=default(False), help="no progress bars")
    common.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks of errors")
    common.add_argument("--device", default=default(None),
                        help="cpu, cuda, cuda:1, ... (default: the first GPU if there is one, else cpu)")
    return common


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="patchcore-fast", description=__doc__, parents=[_common_options(False)],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"patchcore-fast {__version__}")
    after = [_common_options(True)]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        return sub.add_parser(name, parents=after, help=help, description=help,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def model_options(p, ratio=True, framing="whole"):
        p.add_argument("--backbone", nargs="+", default=["efficientnet_lite0"], metavar="NAME",
                       help="efficientnet_lite0, _lite1 or _lite2 (offline ImageNet weights) or a torchvision model, "
                            "e.g. wide_resnet50_2 (the paper's); several: an ensemble of one model per backbone, "
                            "scores averaged after normalising each by its training images' scores")
        p.add_argument("--framing", choices=("whole", "center_crop"), default=framing,
                       help="whole image resized to the model's square, or the MVTec AD resize + centre crop")
        p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files with a warning")
        p.add_argument("--layers", nargs="+", metavar="LAYER",
                       help="backbone layers, names or numbers (default: the last blocks at strides 8 and 16 for "
                            "EfficientNet-Lite, e.g. blocks.4 blocks.10 for lite0; layer2 layer3 for ResNets)")
        if ratio:
            p.add_argument("--ratio", type=float, default=0.1,
                           help="coreset ratio: the share of training patches kept in the memory bank, in (0, 1]")
        p.add_argument("--image-size", type=int, default=224, help="side of the square the model sees, in pixels")
        p.add_argument("--resize", type=int, default=256, help="short side before the centre crop (--framing center_crop)")
        p.add_argument("--weights", default=None, help="backbone weights file (default: ImageNet)")
        p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch")
        p.add_argument("--brute-force-search", action="store_true",
                       help="no search index: every test patch meets every bank row (same results, slower on the CPU)")

    p = command("fit", "fit on a folder of good images (or ROOT/CATEGORY/train/good) and save the model")
    p.add_argument("root", help="a folder of good images, or an MVTec AD root with --category")
    p.add_argument("--category", help="MVTec AD layout: fit on ROOT/CATEGORY/train/good")
    p.add_argument("--calibrate", metavar="FOLDER", help="good images not used for fitting: sets the decision threshold")
    p.add_argument("--calibrate-defects", metavar="FOLDER",
                   help="defective images: with --calibrate, the threshold is the F1-optimal one on both folders")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="threshold = this quantile of the calibration images' scores, in (0, 1]")
    p.add_argument("--out", required=True, metavar="MODEL", help="the model file to write (e.g. model.pcf)")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="cut each image into SIZE x SIZE px tiles, each seen at --image-size (high-resolution "
                        "parts; the model keeps it, predict tiles alike)")
    p.add_argument("--tile-overlap", type=int, default=0, metavar="PX", help="pixels neighbouring tiles share")
    model_options(p)
    p.set_defaults(run=cmd_fit)

    p = command("predict", "score images with a saved model: scores.csv and heat-map overlays")
    p.add_argument("model", help="a model file written by fit")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (subfolders are not searched)")
    p.add_argument("--out", default="predictions", metavar="FOLDER", help="where scores.csv and the overlays go")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch")
    p.add_argument("--overlays", choices=("original", "model"), default="original",
                   help=f"draw maps on each original image (long side at most {OVERLAY_MAX_SIDE} px; outside the "
                        "centre crop in grey) or on the model's S x S view")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files with a warning")
    p.set_defaults(run=cmd_predict)

    p = command("update", "add good images to a saved model without a refit (the bank grows by the coreset ratio)")
    p.add_argument("model", help="a model file written by fit (or update)")
    p.add_argument("images", help="a folder of new good images (subfolders are not searched)")
    p.add_argument("--out", required=True, metavar="MODEL", help="the model file to write (may be MODEL itself)")
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files with a warning")
    p.set_defaults(run=cmd_update)

    p = command("info", "what a model file holds: settings, bank, search index, threshold and its origin, format")
    p.add_argument("model", help="a model file written by fit")
    p.set_defaults(run=cmd_info)

    p = command("export", "export a model's whole scoring path (ONNX or torch.export)")
    p.add_argument("model", help="a model file written by fit")
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx", help="ONNX, or a torch.export program")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (.onnx, or .pt2 for torch)")
    p.add_argument("--check", nargs="+", metavar="IMAGE",
                   help="images or folders to score with onnxruntime and predict; fails beyond 1e-4 relative")
    p.set_defaults(run=cmd_export)

    p = command("evaluate", "fit and evaluate MVTec AD-layout categories: the paper's tables")
    p.add_argument("root", help="an MVTec AD-layout root: ROOT/CATEGORY/{train/good, test, ground_truth}")
    p.add_argument("--categories", nargs="+", metavar="CATEGORY", help="categories to evaluate (default: all found)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1], metavar="RATIO",
                   help="coreset ratios, one model each (the paper's: 0.25 0.1 0.01)")
    p.add_argument("--out", required=True, metavar="FOLDER", help="where results.csv, tables.md, timings.csv go")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    model_options(p, ratio=False, framing="center_crop")
    p.set_defaults(run=cmd_evaluate)

    p = command("demo", "the offline demo: synthetic defects on real textures, EfficientNet-Lite0")
    p.add_argument("--out", default="demo-results", metavar="FOLDER", help="where the results go (replaces the last demo's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    p.add_argument("--data", default=None, metavar="FOLDER",
                   help="where to keep the generated dataset (default: a cache folder)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1], metavar="RATIO", help="coreset ratios")
    p.set_defaults(run=cmd_demo)

    p = command("kernels", "time the coreset and knn kernels against the references on random data")
    p.add_argument("--train-images", type=int, default=40, help="training images' worth of random rows (784 each)")
    p.add_argument("--test-images", type=int, default=20, help="test images' worth of random queries")
    p.set_defaults(run=cmd_kernels)
    return parser


class _ProgramLines(logging.Handler):
    """The CLI's output: status lines on standard output, warnings and errors as one line naming the
    program on standard error, each printed above any progress bar."""

    LABELS = {logging.WARNING: "warning", logging.ERROR: "error", logging.CRITICAL: "internal error"}

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        message = record.getMessage()
        if getattr(record, "unlabelled", False):  # e.g. "patchcore-fast: interrupted"
            tqdm.write(f"{_program()}: {message}", file=sys.stderr)
        elif record.levelno >= logging.WARNING:
            tqdm.write(f"{_program()}: {self.LABELS.get(record.levelno, 'error')}: {message}", file=sys.stderr)
        else:
            tqdm.write(message, file=sys.stdout)


@contextlib.contextmanager
def _program_output():
    """Routes the package's log and Python warnings through _ProgramLines for one run of main()."""
    handler = _ProgramLines(level=logging.INFO)
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def one_line(message, category, filename, lineno, file=None, line=None):
        log.warning(str(message))

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            warnings.simplefilter("always", RuntimeWarning)  # each skipped or suspicious file once, by name
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with _program_output():
        return _run(args)


def _run(args) -> int:
    from .errors import UserError

    try:
        from .devices import resolve

        resolve(args.device)  # a device this machine lacks is a user error, before any work
        _join_process_group(args)
        args.run(args)
    except KeyboardInterrupt:  # every long step stops within about a second; files are written atomically
        log.error("interrupted", extra={"unlabelled": True})
        return 130
    except torch.OutOfMemoryError as error:  # a condition of this machine, not a bug
        if args.debug:
            raise
        log.error(f"out of memory ({str(error).splitlines()[0]}): try a smaller --batch-size, or --device cpu")
        return 2
    except (FileNotFoundError, ValueError, OSError, UserError) as error:
        # Bad input, files or setup: one line, exit code 2 (--debug shows where).
        if args.debug:
            raise
        log.error(str(error))
        return 2
    except Exception:  # anything else is a bug in patchcore_fast (or below it): never dressed up
        traceback.print_exc()
        log.critical("this is a bug; please report it with the traceback above and the output of "
                     "`patchcore-fast kernels`")
        return 1
    finally:
        from . import distributed

        distributed.shutdown()
    return 0


def _program() -> str:
    """The name errors start with; under torchrun it says which rank speaks."""
    from . import distributed

    return f"patchcore-fast[rank {distributed.rank_and_size()[0]}]" if distributed.active() else "patchcore-fast"


def _join_process_group(args) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group; ranks other than 0 work silently
    (their standard output is discarded; errors still reach standard error, marked with the rank)."""
    from . import distributed

    if not distributed.init_from_environment():
        return
    rank, size = distributed.rank_and_size()
    if rank != 0:
        args.quiet = True
        sys.stdout = open(os.devnull, "w")
    else:
        log.info(f"distributed: {size} ranks ({torch.distributed.get_backend()})")


if __name__ == "__main__":
    sys.exit(main())
