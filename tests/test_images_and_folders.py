"""Users' own images and folders: decoding, whole-image framing, memory on long strips."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast import PatchCore
from patchcore_fast.backbones import load_backbone
from patchcore_fast.data import Transform, image_files, open_image, other_files

from images import texture


def rgb_of(transform_input) -> np.ndarray:
    return (Transform(resize=64, crop=64, framing="whole").image(transform_input) * 255).round().byte().permute(1, 2, 0).numpy()


def reference_rgb(arr8: np.ndarray) -> np.ndarray:
    """What the 8-bit rendering gives through the same transform."""
    return rgb_of(Image.fromarray(arr8))


def write_png16_rgb(path, arr16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow writes only 8-bit RGB)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def gradient():
    """An 8-bit RGB picture with every channel varying."""
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path, gradient):
    grey8 = gradient[..., 0]
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit, 65535 = white
    img = open_image(tmp_path / "g16.png")
    assert img.mode.startswith("I")
    assert np.array_equal(rgb_of(img), reference_rgb(np.stack([grey8] * 3, -1)))


def test_16_bit_rgb(tmp_path, gradient):
    write_png16_rgb(tmp_path / "c16.png", gradient.astype(np.uint16) * 257)
    assert np.array_equal(rgb_of(open_image(tmp_path / "c16.png")), reference_rgb(gradient))


def test_palette_and_cmyk(tmp_path, gradient):
    palette = Image.fromarray(gradient).quantize(64)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(rgb_of(open_image(tmp_path / "p.png")), reference_rgb(np.asarray(palette.convert("RGB"))))
    cmyk = Image.fromarray(gradient).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    assert open_image(tmp_path / "c.tif").mode == "CMYK"
    assert np.array_equal(rgb_of(open_image(tmp_path / "c.tif")), reference_rgb(np.asarray(cmyk.convert("RGB"))))


def test_exif_orientation_is_applied(tmp_path, gradient):
    upright = gradient[:, :48]  # 64 high, 48 wide
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # stored turned left: 48 high, 64 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "r.jpg", exif=exif, quality=100, subsampling=0)
    shown = open_image(tmp_path / "r.jpg")
    seen = Transform(resize=64, crop=64, framing="whole").image(shown)
    expected = Transform(resize=64, crop=64, framing="whole").image(Image.fromarray(upright))
    assert (seen - expected).abs().mean() < 0.02  # JPEG noise only; a wrong turn differs by ~0.3


@pytest.mark.parametrize("framing", ["whole", "center_crop"])
def test_long_strip_is_resampled_within_a_few_output_sizes(framing):
    import tracemalloc

    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 16000, 3), dtype=np.uint8))
    transform = Transform(resize=256, crop=224, framing=framing)
    tracemalloc.start()
    out = transform.image(strip)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (3, 224, 224)
    assert peak < 8 * 224 * 224 * 3 * 4  # a few float outputs; resizing the strip whole would be 1.5 GB


def test_folders_choose_images_by_extension(tmp_path):
    for name in ("a.png", "B.JPG", "c.tiff"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    for name in ("Thumbs.db", "notes.txt", "desktop.ini"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    assert [p.name for p in image_files(tmp_path)] == ["B.JPG", "a.png", "c.tiff"]
    assert [p.name for p in other_files(tmp_path)] == ["Thumbs.db", "desktop.ini", "notes.txt"]


def test_whole_framing_sees_a_defect_at_the_border():
    """A magenta block near the top edge: cut away by the centre crop, seen in the whole image."""
    lite0 = load_backbone("efficientnet_lite0")
    train = [texture(s, (160, 96)) for s in range(6)]
    clean = texture(40, (160, 96))
    marked = np.asarray(clean).copy()
    marked[2:14, 60:100] = (255, 0, 255)
    marked = Image.fromarray(marked)
    scores = {}
    for framing in ("whole", "center_crop"):
        model = PatchCore(backbone=lite0, framing=framing, image_size=128, resize=192, device="cpu", progress=False,
                          coreset_ratio=0.25).fit(train)
        scores[framing] = model.predict([clean, marked]).scores
    assert scores["whole"][1] > 1.5 * scores["whole"][0]
    assert scores["center_crop"][1] == scores["center_crop"][0]  # the crop never sees it
