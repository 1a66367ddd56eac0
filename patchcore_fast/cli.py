"""patchcore-fast: fit, predict, evaluate and the offline demo from the command line."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch


def _model_args(args) -> dict:
    # Layer names go to the backbone as given; backbones.normalise_layers reads plain numbers as layerN.
    return dict(backbone=args.backbone, layers=tuple(args.layers) if args.layers else None, framing=args.framing,
                image_size=args.image_size, resize=args.resize, device=args.device, weights=args.weights,
                skip_bad_images=args.skip_bad_images, pruned_search=not args.brute_force_search,
                batch_size=args.batch_size)


def _writable_file(path: Path) -> Path:
    """Checks, before any work, that `path` can be written as a file: nothing is written on failure."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name, e.g. {path / 'model.pcf'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {path}: no folder {parent}")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {path}: cannot write to {parent}")
    return path


def _writable_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"--out {path}: cannot write to {existing}")
    return path


def training_images(root: Path, category: str | None) -> tuple[list[Path], int]:
    """The good images `fit` learns from: ROOT/CATEGORY/train/good (MVTec AD layout) with --category,
    otherwise ROOT itself, any folder of images. Also how many other files were left alone."""
    from .data import image_files, other_files

    folder = Path(root) / category / "train" / "good" if category else Path(root)
    if category and not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} (MVTec AD layout: ROOT/CATEGORY/train/good)")
    images = image_files(folder)
    if not images:
        raise ValueError(f"{folder} holds no image files")
    return images, len(other_files(folder))


def cmd_fit(args) -> None:
    from .decision import check_quantile
    from .model import PatchCore

    # Every argument and path is checked before any work: a typo must not throw a fit away.
    out = _writable_file(Path(args.out))
    if args.calibrate_defects and not args.calibrate:
        raise ValueError("--calibrate-defects needs --calibrate GOOD_FOLDER as well")
    try:
        check_quantile(args.quantile)
    except ValueError as error:
        raise ValueError(f"--quantile: {error}") from None
    images, ignored = training_images(args.root, args.category)
    calibration = training_images(args.calibrate, None)[0] if args.calibrate else None
    defective = training_images(args.calibrate_defects, None)[0] if args.calibrate_defects else None
    model = PatchCore(coreset_ratio=args.ratio, progress=not args.quiet, **_model_args(args))
    print(f"fitting {len(images)} images ({model.transform.describe()})"
          + (f"; {ignored} other file(s) left alone" if ignored else ""))
    model.fit(images)
    if calibration is not None:
        model.calibrate(calibration, args.quantile, defective)
        print(f"threshold {model.bank.decision.threshold:.6g}: {model.bank.decision.threshold_source}")
    model.save(out)  # under torchrun: rank 0 writes the whole bank
    if not model.workers.is_main:
        return
    print(f"saved {out}: memory bank ({len(model.bank)}, {model.config.embed_dim}), {model.config.backbone.name}, "
          f"framing {model.config.framing}")


def cmd_predict(args) -> None:
    from .data import TestImage, image_paths, load_mask, mvtec_mask_path
    from .model import PatchCore
    from .overlay import save_overlays, save_overlays_on_originals

    out = _writable_folder(Path(args.out))
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"no model file {args.model}")
    paths = image_paths(args.images)
    model = PatchCore.load(args.model, device=args.device, progress=not args.quiet,
                           skip_bad_images=args.skip_bad_images, batch_size=args.batch_size)
    pred = model.predict(paths, on_original=args.overlays == "original")
    paths = [Path(p) for p in pred.sources]  # the files scored: unreadable ones skipped (--skip-bad-images)
    if not model.workers.is_main:  # every rank has the results; rank 0 writes them
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        if pred.threshold is None:
            writer.writerow(["path", "score"])
            for path, score in zip(paths, pred.scores.tolist()):
                writer.writerow([str(path), f"{score:.6f}"])
        else:  # normalised: 1.0 is the calibrated threshold
            writer.writerow(["path", "score", "normalized_score", "is_anomalous"])
            for path, score, norm, flag in zip(paths, pred.scores.tolist(), pred.normalized.tolist(),
                                               pred.is_anomalous.tolist()):
                writer.writerow([str(path), f"{score:.6f}", f"{norm:.6f}", int(flag)])
    scale = model.bank.decision.colour_scale()
    if scale is None:  # a model fitted from pooled features: no good-image scores to set a scale
        scale = float(pred.maps.min()), float(pred.maps.max())
        print("this model has no fixed colour scale (fitted from pooled features): overlays use this run's range")
    low, high = scale
    names = [f"{i:04d}_{p.stem}.png" for i, p in enumerate(paths)]
    if args.overlays == "original":  # each image at its own size; outside the centre crop in grey
        save_overlays_on_originals(out, paths, names, pred.original_maps, [mvtec_mask_path(p) for p in paths], low,
                                   high, pred.scores, pred.threshold)
    else:
        masks = []
        for path in paths:
            mask_path = mvtec_mask_path(path)
            masks.append(load_mask(TestImage(path, path.parent.name, mask_path), model.transform) if mask_path else None)
        save_overlays(out, paths, names, pred.maps, masks, model.transform, model.batch_size, low, high, pred.scores,
                      pred.threshold)
    print(f"scored {len(paths)} images: {out / 'scores.csv'}, overlays in {out}")


def cmd_export(args) -> None:
    from .data import image_paths
    from .export import check_onnx, export
    from .model import PatchCore

    out = _writable_file(Path(args.out))
    model = PatchCore.load(args.model, device="cpu", progress=False)
    export(model, out, args.format)
    s = model.config.image_size
    print(f"exported {out} ({args.format}): input images [B, 3, {s}, {s}] in [0, 1] after the model's transform "
          f"({model.transform.describe()}); outputs scores [B], maps [B, {s}, {s}]")
    if args.check:
        if args.format != "onnx":
            raise ValueError("--check runs onnxruntime: use it with --format onnx")
        images = []
        for item in args.check:
            images += image_paths([item])
        relative = check_onnx(model, out, images)
        print(f"onnxruntime vs predict on {len(images)} images: image scores within {relative:.2e} (relative)")


@contextlib.contextmanager
def _output_folder(out: Path):
    """`out` on rank 0 (or without torchrun); a scratch folder, removed afterwards, on other ranks,
    which compute the same results in step with rank 0."""
    from . import distributed

    if distributed.is_main():
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="patchcore-rank-") as scratch:
        yield Path(scratch)


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate

    _writable_folder(Path(args.out))
    with _output_folder(Path(args.out)) as out:
        _, _, tables = evaluate(args.root, out, categories=args.categories, ratios=args.ratios,
                                progress=not args.quiet, **_model_args(args))
    print(tables)
    print(f"results: {Path(args.out) / 'results.csv'}, timings: {Path(args.out) / 'timings.csv'}")


def cmd_demo(args) -> None:
    from . import synthetic
    from .evaluate import evaluate

    start = time.perf_counter()
    root = synthetic.dataset(args.seed, args.data)
    print(f"synthetic dataset (seed {args.seed}): {root}")
    out = Path(args.out)
    with _output_folder(out) as folder:
        _, _, tables = evaluate(root, folder, ratios=args.ratios, progress=not args.quiet,
                                backbone="efficientnet_lite0", device=args.device)
    print(tables)
    print(f"results: {out / 'results.csv'}, timings: {out / 'timings.csv'}")
    print(f"overlays: {out / 'overlays'}")
    print(f"done in {time.perf_counter() - start:.1f} s")


def cmd_kernels(args) -> None:
    from .kernel_demo import demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    demo(args.train_images, args.test_images, torch.device(device))


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--quiet, --debug and --device, accepted before and after the subcommand. On the subcommands
    their defaults are suppressed, so a flag given before the subcommand is not reset after it."""
    common = argparse.ArgumentParser(add_help=False)
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    common.add_argument("--quiet", action="store_true", default=default(False), help="no progress bars")
    common.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks of errors")
    common.add_argument("--device", default=default(None), help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore-fast", description=__doc__, parents=[_common_options(False)])
    after = [_common_options(True)]
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p, ratio=True, framing="whole"):
        p.add_argument("--backbone", default="efficientnet_lite0",
                       help="efficientnet_lite0 (offline default) or a torchvision model, e.g. wide_resnet50_2 (the paper's)")
        p.add_argument("--framing", choices=("whole", "center_crop"), default=framing,
                       help=f"whole image, or the MVTec AD resize + centre crop (default: {framing})")
        p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files with a warning")
        p.add_argument("--layers", nargs="+", help="layer names or numbers (default: layer2 layer3)")
        if ratio:
            p.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--resize", type=int, default=256)
        p.add_argument("--weights", default=None, help="backbone weights file (default: ImageNet)")
        p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch")
        p.add_argument("--brute-force-search", action="store_true",
                       help="no search index: every test patch meets every bank row (same results, slower on the CPU)")

    p = sub.add_parser("fit", parents=after, help="fit on a folder of good images (or ROOT/CATEGORY/train/good) and save")
    p.add_argument("root", help="a folder of good images, or an MVTec AD root with --category")
    p.add_argument("--category", help="MVTec AD layout: fit on ROOT/CATEGORY/train/good")
    p.add_argument("--calibrate", metavar="FOLDER", help="good images not used for fitting: sets the decision threshold")
    p.add_argument("--calibrate-defects", metavar="FOLDER",
                   help="defective images: with --calibrate, the threshold is the F1-optimal one on both folders")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="threshold = this quantile of the calibration images' scores (default 0.99)")
    p.add_argument("--out", required=True)
    model_options(p)
    p.set_defaults(run=cmd_fit)

    p = sub.add_parser("predict", parents=after, help="score images with a saved model")
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="predictions")
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch")
    p.add_argument("--overlays", choices=("original", "model"), default="original",
                   help="draw maps on each original image (default; outside the centre crop in grey) or on the "
                        "model's S x S view")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files with a warning")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("export", parents=after, help="export a model's whole scoring path (ONNX or torch.export)")
    p.add_argument("model")
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx")
    p.add_argument("--out", required=True, help="the file to write (.onnx, or .pt2 for torch)")
    p.add_argument("--check", nargs="+", metavar="IMAGES",
                   help="images or folders to score with onnxruntime and predict; fails beyond 1e-4 relative")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("evaluate", parents=after, help="fit and evaluate MVTec AD-layout categories")
    p.add_argument("root")
    p.add_argument("--categories", nargs="+")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1])
    p.add_argument("--out", required=True)
    model_options(p, ratio=False, framing="center_crop")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("demo", parents=after, help="the offline demo: synthetic defects on real textures, EfficientNet-Lite0")
    p.add_argument("--out", default="demo-results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="where to keep the generated dataset (default: a cache folder)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1])
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("kernels", parents=after, help="time the coreset and knn kernels against the references on random data")
    p.add_argument("--train-images", type=int, default=40)
    p.add_argument("--test-images", type=int, default=20)
    p.set_defaults(run=cmd_kernels)
    return parser


def main(argv=None) -> int:
    from .errors import UserError

    args = build_parser().parse_args(argv)
    try:
        _join_process_group(args)
        args.run(args)
    except KeyboardInterrupt:  # every long step stops within about a second; files are written atomically
        print(f"\n{_program()}: interrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as error:  # a condition of this machine, not a bug
        if args.debug:
            raise
        print(f"{_program()}: error: out of memory ({str(error).splitlines()[0]}): try a smaller --batch-size, "
              "or --device cpu", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError, UserError) as error:
        # Bad input, files or setup: one line, exit code 2 (--debug shows where).
        if args.debug:
            raise
        print(f"{_program()}: error: {error}", file=sys.stderr)
        return 2
    except Exception:  # anything else is a bug in patchcore_fast (or below it): never dressed up
        traceback.print_exc()
        print(f"{_program()}: internal error: this is a bug; please report it with the traceback above "
              "and the output of `patchcore-fast kernels`", file=sys.stderr)
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
        print(f"distributed: {size} ranks ({torch.distributed.get_backend()})")


if __name__ == "__main__":
    sys.exit(main())
