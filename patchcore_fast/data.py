"""Images in: files, folders, PIL images, tensors or DataLoaders, turned into batches of
[B, 3, S, S] float tensors in [0, 1]; and the MVTec AD folder layout with its ground-truth masks.

Two framings: "center_crop" is the authors' transform (resize the short side, centre crop: the
MVTec AD protocol, which drops the border of every image), "whole" resizes the whole image to
S x S, as anomalib does by default, so a defect anywhere in a user's picture is seen. Either way
an image is resampled straight to what the model sees, so a long strip never becomes a huge
intermediate."""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

#: What fit, predict and calibrate read images from: a folder or a file, a list of paths or PIL
#: images, a tensor batch [B, 3, H, W], or an iterable of tensors, (tensor, ...) tuples or
#: {"image": tensor} dicts (a DataLoader).
ImageData = Union[str, os.PathLike, Image.Image, torch.Tensor, Iterable[Any]]

#: Files chosen as images in a folder (case-insensitive); other files are left alone and counted.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
                            ".pbm", ".pnm"})
FRAMINGS = ("whole", "center_crop")


class ImageReadError(ValueError):
    """An input file could not be read as an image."""


@dataclass(frozen=True)
class Transform:
    resize: int = 256
    crop: int = 224
    framing: str = "center_crop"

    def __post_init__(self):
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {self.framing!r}")
        if self.crop < 1 or (self.framing == "center_crop" and self.resize < self.crop):
            raise ValueError(f"need 1 <= image_size <= resize, got image_size={self.crop}, resize={self.resize}")

    def describe(self) -> str:
        if self.framing == "whole":
            return f"whole image resized to {self.crop} x {self.crop}"
        return f"short side resized to {self.resize}, centre {self.crop} x {self.crop} kept (MVTec AD protocol)"

    def image(self, img: Image.Image) -> torch.Tensor:
        return self.framed(to_rgb(img))

    def framed(self, rgb: Image.Image) -> torch.Tensor:
        """[3, S, S] in [0, 1]: what the model sees of an 8-bit RGB image (see to_rgb)."""
        arr = np.asarray(self._resample(rgb), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """Binary [S, S] bool mask, transformed like its image (bilinear resampling, > 0.5)."""
        arr = torch.from_numpy(np.asarray(self._resample(mask.convert("L")), dtype=np.uint8).copy()).float() / 255.0
        return arr > 0.5

    def _resample(self, img: Image.Image) -> Image.Image:
        """The S x S view of `img`. A centre crop of a large resize (more than 4 crops' worth of pixels,
        e.g. a long strip) is resampled from its box of the original instead, so memory stays a
        few times the output."""
        if self.framing == "whole":
            return img.resize((self.crop, self.crop), Image.BILINEAR)
        w, h = img.size
        nw, nh = self._size((w, h))
        top, left = int(round((nh - self.crop) / 2.0)), int(round((nw - self.crop) / 2.0))
        if nw * nh <= 4 * self.crop * self.crop:
            return img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + self.crop, top + self.crop))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return img.resize((self.crop, self.crop), Image.BILINEAR, box=box, reducing_gap=None)

    def tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] floats in [0, 1] (or [B, 1, H, W] grey) -> [B, 3, S, S]."""
        batch = rgb_batch(batch)
        h, w = batch.shape[-2:]
        if self.framing == "whole":
            if (h, w) != (self.crop, self.crop):
                batch = F.interpolate(batch.float(), size=(self.crop, self.crop), mode="bilinear",
                                      align_corners=False, antialias=True)
            return batch.float()
        # Always resize and crop, as for PIL images, even when the tensor already has the crop's size:
        # an image must give the same input whatever form it arrives in.
        nw, nh = self._size((w, h))
        if (nh, nw) != (h, w):
            batch = F.interpolate(batch.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        return self._crop(batch).float()

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom), in a width x height image's own pixels, of the region its
        S x S view shows: the whole image, or the centre crop's box."""
        if self.framing == "whole":
            return 0.0, 0.0, float(width), float(height)
        nw, nh = self._size((width, height))
        top, left = int(round((nh - self.crop) / 2.0)), int(round((nw - self.crop) / 2.0))
        sx, sy = width / nw, height / nh
        return left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy

    def to_original(self, view_map: torch.Tensor, width: int, height: int, out_size=None) -> torch.Tensor:
        """An S x S map drawn back on its width x height image: [height, width], bilinear, NaN where the
        view did not look (outside the centre crop): unknown, not invented. `out_size` (w, h): the
        same map sampled on a smaller copy of the image (an overlay of bounded size)."""
        left, top, right, bottom = self.box(width, height)
        out_w, out_h = out_size or (width, height)
        sx, sy = out_w / width, out_h / height
        rows = resampling_matrix(out_h, view_map.shape[0], top * sy, bottom * sy)
        cols = resampling_matrix(out_w, view_map.shape[1], left * sx, right * sx)
        out = (rows.nan_to_num() @ view_map.double().cpu()).float() @ cols.nan_to_num().float().T
        out[rows[:, 0].isnan()] = float("nan")
        out[:, cols[:, 0].isnan()] = float("nan")
        return out

    def _size(self, wh):
        """(width, height) with the short side at `resize`, as torchvision's Resize(int) rounds."""
        w, h = wh
        if w <= h:
            return self.resize, int(self.resize * h / w)
        return int(self.resize * w / h), self.resize

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        return x[..., top : top + self.crop, left : left + self.crop]


def resampling_matrix(out_size: int, in_size: int, start: float, stop: float) -> torch.Tensor:
    """[out_size, in_size] bilinear weights (pixel centres, edges clamped) taking samples that span
    [start, stop) of the output axis onto it; rows of output pixels outside that span are NaN."""
    centres = torch.arange(out_size, dtype=torch.float64) + 0.5
    position = (centres - start) / (stop - start) * in_size - 0.5
    low = position.floor()
    weight = position - low
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low.long().clamp(0, in_size - 1)), 1 - weight, accumulate=True)
    matrix.index_put_((rows, (low.long() + 1).clamp(0, in_size - 1)), weight, accumulate=True)
    matrix[(centres < start) | (centres > stop)] = float("nan")
    return matrix


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB with the pixels the file means: camera orientation (EXIF) applied, 16-bit grey
    scaled (not clipped) to 8 bits, transparency over black, palette and CMYK converted."""
    img = ImageOps.exif_transpose(img, in_place=False) if img.getexif().get(0x0112, 1) != 1 else img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (Pillow opens 16-bit PNGs as I;16 or I): 65535 is white.
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":  # floating-point grey: taken as [0, 1]
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large but allowed: fine
            with open(path, "rb") as file:  # decoded once, in place (a copy would double a large image)
                img = Image.open(file)
                img.load()
                return img
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"cannot read image {path}: it has more pixels than Pillow's safety limit of "
                             f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels (a guard against decompression bombs); "
                             "if the file is trusted, reduce it first") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


def image_files(folder: Path) -> list[Path]:
    """The image files of `folder` by extension (IMAGE_SUFFIXES), sorted; whether their content is an
    image is found when they are read (an error naming the file, or a warning with skip_bad_images)."""
    return [p for p in _visible_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]


def other_files(folder: Path) -> list[Path]:
    """Visible files of `folder` that image_files leaves out (Thumbs.db, notes, ...)."""
    return [p for p in _visible_files(folder) if p.suffix.lower() not in IMAGE_SUFFIXES]


def _visible_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def image_paths(items) -> list[Path]:
    """The image files named by `items` (files and folders, in order; a folder gives its image
    files, sorted, without reading subfolders): the one path expansion of the command line."""
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = image_files(path)
            if not files:
                subfolders = sum(1 for p in path.iterdir() if p.is_dir())
                raise ValueError(f"folder {path} holds no image files" + (
                    f" (its {subfolders} subfolder(s) are not searched: name them)" if subfolders else ""))
            paths += files
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return paths


def expand_images(data) -> list:
    """The items `data` names: a folder's image files, one file, one PIL image, or the list given."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            files = image_files(path)
            if not files:
                raise ValueError(f"folder {path} holds no images (files ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
            return files
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        return [path]
    if isinstance(data, Image.Image):
        return [data]
    return list(data)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor | None  # [b, 3, S, S] in [0, 1], as the model sees them
    sizes: list                  # each image's (width, height) as read (EXIF orientation applied)
    sources: list                # each image's file path, or its position among in-memory images
    #: With iter_image_batches(view_side=...): each decoded image as 8-bit RGB with its long side
    #: at most view_side (for drawing overlays without decoding it again); else None.
    views: list | None = None


#: An image whose shorter side is below this share of the model's input side is almost always a
#: mistake (a thumbnail, an icon, a broken export): it is upscaled many times, and a warning says so.
SMALL_IMAGE_SHARE = 0.25


def iter_image_batches(data, transform: Transform, batch_size: int, skip_bad: bool = False,
                       view_side: int | None = None) -> Iterator[Batch]:
    """Batches from a folder, a file, a list of paths or PIL images, a tensor batch, or an iterable
    of tensors / (tensor, ...) tuples / {"image": tensor} dicts (a DataLoader), each image decoded
    once. Unreadable files raise ImageReadError naming the file, or are skipped with a warning
    when `skip_bad` (and are then in no batch). Images much smaller than the model's input
    (SMALL_IMAGE_SHARE) are scored with a warning."""
    position = 0
    if isinstance(data, torch.Tensor) or not isinstance(data, (str, Path, Image.Image, list, tuple)):
        items = [data] if isinstance(data, torch.Tensor) else (_loader_tensor(item) for item in data)
        for item in items:
            size = (int(item.shape[-1]), int(item.shape[-2]))
            batch = transform.tensor(item)
            for start in range(0, len(batch), batch_size):
                part = batch[start : start + batch_size]
                yield Batch(part, [size] * len(part), list(range(position, position + len(part))))
                position += len(part)
        return
    pending, sizes, sources, views = [], [], [], []
    for item in expand_images(data):
        if isinstance(item, torch.Tensor):
            framed = transform.tensor(item)
            pending.extend(framed)
            sizes += [(int(item.shape[-1]), int(item.shape[-2]))] * len(framed)
            sources += list(range(position, position + len(framed)))
            position += len(framed)
        else:
            rgb = _readable_rgb(item, skip_bad)
            if rgb is None:
                continue
            pending.append(transform.framed(rgb))
            sizes.append(rgb.size)
            sources.append(position if isinstance(item, Image.Image) else Path(item))
            _warn_if_small(rgb.size, transform.crop, sources[-1])
            if view_side is not None:
                views.append(bounded(rgb, view_side))
            del rgb
            position += 1
        while len(pending) >= batch_size:
            yield Batch(torch.stack(pending[:batch_size]), sizes[:batch_size], sources[:batch_size],
                        views[:batch_size] if view_side is not None else None)
            pending, sizes, sources, views = (pending[batch_size:], sizes[batch_size:], sources[batch_size:],
                                              views[batch_size:])
    if pending:
        yield Batch(torch.stack(pending), sizes, sources, views if view_side is not None else None)


def rgb_batch(batch: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] (or one [3, H, W]) float images in [0, 1], grey and RGBA made RGB; else a clear error."""
    if batch.dim() == 3:
        batch = batch[None]
    if batch.dim() != 4 or batch.shape[1] not in (1, 3, 4):
        raise ValueError(f"image tensors must be [B, 3, H, W], got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise TypeError(f"image tensors must be floats in [0, 1], got {batch.dtype}")
    return batch[:, :3] if batch.shape[1] == 4 else batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


@dataclass(frozen=True)
class Decoded:
    """One input image at its own size: 8-bit RGB (from a file or PIL image) or a float tensor [3, H, W]."""
    image: Image.Image | torch.Tensor
    size: tuple[int, int]        # (width, height)
    source: Any                  # file path, or position among in-memory images
    view: Image.Image | None     # with view_side: the image with its long side at most view_side


def _readable_rgb(item, skip_bad: bool) -> Image.Image | None:
    """A file path's or PIL image's pixels as 8-bit RGB (to_rgb); None for an unreadable file
    skipped with a warning when `skip_bad` (else its ImageReadError)."""
    try:
        img = item if isinstance(item, Image.Image) else open_image(Path(item))
    except ImageReadError as error:
        if not skip_bad:
            raise
        warnings.warn(f"skipped: {error}", RuntimeWarning, stacklevel=3)
        return None
    return to_rgb(img)  # the decoded file is dropped here: a large image is held once


def iter_decoded(data, skip_bad: bool = False, view_side: int | None = None) -> Iterator[Decoded]:
    """Each image of `data` (any form iter_image_batches takes) decoded once, at its own size, one at
    a time (for tiling: a large image is never framed whole). Unreadable files as in iter_image_batches."""
    def tensors(batch, position):
        batch = rgb_batch(batch)
        for offset, image in enumerate(batch):
            yield Decoded(image, (int(image.shape[-1]), int(image.shape[-2])), position + offset, None)

    position = 0
    if isinstance(data, torch.Tensor) or not isinstance(data, (str, Path, Image.Image, list, tuple)):
        for item in [data] if isinstance(data, torch.Tensor) else (_loader_tensor(item) for item in data):
            yield from tensors(item, position)
            position += len(rgb_batch(item))
        return
    for item in expand_images(data):
        if isinstance(item, torch.Tensor):
            yield from tensors(item, position)
            position += len(rgb_batch(item))
            continue
        rgb = _readable_rgb(item, skip_bad)
        if rgb is None:
            continue
        source = position if isinstance(item, Image.Image) else Path(item)
        yield Decoded(rgb, rgb.size, source, bounded(rgb, view_side) if view_side is not None else None)
        position += 1


def prefetched(items: Iterable, depth: int = 1) -> Iterator:
    """The items of `items`, made by a background thread at most `depth` items ahead of the
    consumer: the next batch is decoded and resized while the network runs on this one, and
    memory holds at most depth + 1 batches. An exception raised making an item is raised here,
    in its place; closing the iterator (or an exception in the consumer) stops the producer."""
    made: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                made.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((end, error))

    threading.Thread(target=produce, name="patchcore_fast-decode", daemon=True).start()
    try:
        while True:
            item, error = made.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def bounded(rgb: Image.Image, side: int) -> Image.Image:
    """`rgb` with its long side at most `side` (an independent copy either way)."""
    if max(rgb.size) <= side:
        return rgb.copy()
    scale = side / max(rgb.size)
    return rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR,
                      reducing_gap=3.0)


def _warn_if_small(size, model_side: int, source) -> None:
    if min(size) < SMALL_IMAGE_SHARE * model_side:
        warnings.warn(f"image {source} is {size[0]} x {size[1]} px, far smaller than the model's {model_side} x "
                      f"{model_side} input: it is upscaled, and its score means little", RuntimeWarning, stacklevel=3)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation (a quarter turn swaps them), without a copy."""
    turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (img.size[1], img.size[0]) if turned else img.size


def _loader_tensor(item) -> torch.Tensor:
    if isinstance(item, dict):
        item = item["image"]
    elif isinstance(item, (tuple, list)):
        item = item[0]
    return item


def iter_batches(data, transform: Transform, batch_size: int, skip_bad: bool = False) -> Iterator[torch.Tensor]:
    """The image tensors [b, 3, S, S] of iter_image_batches."""
    for batch in iter_image_batches(data, transform, batch_size, skip_bad):
        yield batch.images


def count_images(data) -> int | None:
    """Number of images `data` will give, when known without reading them."""
    if isinstance(data, torch.Tensor):
        return 1 if data.dim() == 3 else len(data)
    if isinstance(data, (str, Path, Image.Image, list, tuple)):
        return sum(1 if not isinstance(x, torch.Tensor) else (1 if x.dim() == 3 else len(x)) for x in expand_images(data))
    dataset = getattr(data, "dataset", None)
    return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None


@dataclass(frozen=True)
class TestImage:
    path: Path
    defect: str          # "good" or the defect type
    mask_path: Path | None  # None for good images, and for defects whose masks are missing

    @property
    def is_anomalous(self) -> bool:
        return self.defect != "good"


@dataclass(frozen=True)
class MVTecCategory:
    """One category in the MVTec AD layout: <root>/<category>/train/good, test/<defect>,
    ground_truth/<defect>/<name>_mask.png."""

    root: Path
    name: str
    train: list[Path]
    test: list[TestImage]
    validation: list[Path] = ()  # validation/good when the category has one (MVTec 3D-AD does)

    @classmethod
    def open(cls, root, category: str) -> "MVTecCategory":
        base = Path(root) / category
        if not base.is_dir():
            raise FileNotFoundError(f"no category folder {base}")
        train = image_files(base / "train" / "good")
        if not train:
            raise ValueError(f"training folder {base / 'train' / 'good'} is empty")
        test = []
        test_root = base / "test"
        if not test_root.is_dir():
            raise FileNotFoundError(f"no test folder {test_root}")
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            defect = defect_dir.name
            missing = 0
            for path in image_files(defect_dir):
                mask = mvtec_mask_path(path)
                missing += defect != "good" and mask is None
                test.append(TestImage(path, defect, mask))
            if missing:
                warnings.warn(f"{missing} image(s) in {defect_dir} have no mask; pixel metrics leave them out",
                              RuntimeWarning, stacklevel=2)
        if not test:
            raise ValueError(f"test folder {test_root} holds no images")
        validation = image_files(base / "validation" / "good") if (base / "validation" / "good").is_dir() else []
        return cls(Path(root), category, train, test, validation)

    @staticmethod
    def categories(root) -> list[str]:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no such folder: {root}")
        return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def mvtec_mask_path(image: Path) -> Path | None:
    """The ground-truth mask of an MVTec AD test image <category>/test/<defect>/<name>:
    <category>/ground_truth/<defect>/<stem>_mask.png when it exists; None for good images and
    for images outside that layout."""
    image = Path(image)
    if image.parent.parent.name != "test" or image.parent.name == "good":
        return None
    candidate = image.parent.parent.parent / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    return candidate if candidate.is_file() else None


def load_mask(item: TestImage, transform: Transform) -> torch.Tensor | None:
    """The item's binary mask on the model's grid: all False for good images, None when missing.
    A mask whose size differs from its image is first resized to it, with a warning."""
    if not item.is_anomalous:
        return torch.zeros(transform.crop, transform.crop, dtype=torch.bool)
    if item.mask_path is None:
        return None
    mask = open_image(item.mask_path)
    with Image.open(item.path) as img:
        size = img.size
    if mask.size != size:
        warnings.warn(f"mask {item.mask_path} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}; "
                      "resized to the image", RuntimeWarning, stacklevel=2)
        mask = mask.convert("L").resize(size, Image.NEAREST)
    return transform.mask(mask)
