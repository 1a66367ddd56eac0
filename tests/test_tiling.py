"""High-resolution images in tiles: the tile grid, the stitched map, and tiled fit and predict."""

import pytest
import torch
from PIL import Image

from patchcore_fast import PatchCore
from patchcore_fast.backbones import load_backbone
from patchcore_fast.cli import main
from patchcore_fast.tiling import Stitcher, Tiling, tile_views

from images import texture

SMALL = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.mark.parametrize("length, side, overlap", [(1, 7, 0), (7, 7, 3), (8, 7, 0), (100, 7, 3), (1000, 224, 32),
                                                   (225, 224, 0), (97, 10, 9)])
def test_tiles_cover_the_image_with_the_overlap_and_end_at_its_edge(length, side, overlap):
    starts = Tiling(side, overlap).starts(length)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert starts[-1] + min(side, length) == length  # the last tile is flush with the edge
    for a, b in zip(starts, starts[1:]):
        assert 0 < b - a <= side - overlap  # neighbours overlap by at least `overlap`: nothing uncovered
    boxes = Tiling(side, overlap).boxes(length, 5)
    assert len(boxes) == len(starts) == Tiling(side, overlap).count(length, 5)


def test_tiling_settings_are_checked():
    for side, overlap in [(0, 0), (8, 8), (8, -1), (8.0, 0), (True, 0), (8, 1.5)]:
        with pytest.raises(ValueError, match="tile"):
            Tiling(side, overlap)
    with pytest.raises(ValueError, match="framing='whole'"):
        PatchCore(backbone="efficientnet_lite0", framing="center_crop", tile=224, device="cpu")
    with pytest.raises(ValueError, match="tile_overlap needs tile"):
        PatchCore(backbone="efficientnet_lite0", tile_overlap=8, device="cpu")


@pytest.mark.parametrize("overlap", [0, 5, 13])
def test_stitched_maps_blend_tiles_and_keep_what_they_agree_on(overlap):
    tiling = Tiling(20, overlap)
    width, height = 67, 45
    boxes = tiling.boxes(width, height)
    # tiles that all see the same constant: the blend is that constant everywhere
    stitcher = Stitcher(tiling, width, height)
    stitcher.add(torch.full((len(boxes), 8, 8), 3.5))
    assert torch.allclose(stitcher.result(), torch.full((height, width), 3.5))
    # tiles of a linear ramp in x, each tile's own part of it: the blend is the ramp (bilinear
    # resizing and a convex blend of agreeing tiles reproduce it), at full and at half scale
    for scale in (1.0, 0.5):
        stitcher = Stitcher(tiling, width, height, scale)
        for left, top, right, bottom in boxes:
            x = left + (torch.arange(40) + 0.5) * (right - left) / 40 - 0.5
            stitcher.add(x.expand(40, 40)[None])
        out = stitcher.result()
        assert out.shape == (round(height * scale), round(width * scale))
        expected = (torch.arange(out.shape[1]) + 0.5) / scale - 0.5
        inner = slice(2, -2)  # bilinear resizing clamps at a tile's outer edge
        assert torch.allclose(out[:, inner], expected[inner].expand(out.shape[0], -1), atol=0.35 / scale)
    with pytest.raises(RuntimeError, match="tiles added"):
        Stitcher(tiling, width, height).result()


def test_tile_views_crop_and_resize_pil_and_tensor_images_alike():
    image = texture(3, (150, 90))
    tiling = Tiling(64, 16)
    views = torch.cat(list(tile_views(image, tiling, 32, batch=4)))
    assert views.shape == (tiling.count(150, 90), 3, 32, 32)
    tensor = torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1).float() / 255
    tensor_views = torch.cat(list(tile_views(tensor, tiling, 64, batch=5)))
    left, top, right, bottom = tiling.boxes(150, 90)[4]
    assert torch.allclose(tensor_views[4], tensor[:, top:bottom, left:right])  # same size: the crop itself


def test_a_tiled_model_scores_each_image_by_its_highest_tile(lite0):
    train = [texture(s, (150, 110)) for s in range(3)]
    tiled = PatchCore(backbone=lite0, device="cpu", image_size=64, progress=False, tile=80, tile_overlap=20).fit(train)
    image = texture(30, (150, 110), defect=True)
    pred = tiled.predict([image])
    assert pred.maps is None and pred.original_maps[0].shape == (round(110 * 0.8), round(150 * 0.8))
    tiles = torch.cat(list(tile_views(image, tiled.config.tiling, 64, batch=16)))
    each = tiled.score(tiled.embed(tiles))
    assert pred.scores[0] == each.scores.max()
    # the bank holds the training images' tiles: int(images x tiles x patches x ratio) rows
    assert len(tiled.bank) == int(3 * tiled.config.tiling.count(150, 110) * 64 * 0.1)
    with pytest.raises(ValueError, match="images of one size"):
        tiled.with_settings().fit([texture(1, (150, 110)), texture(2, (300, 110))])
    assert tiled.predict([image], maps=False).original_maps is None
    before = len(tiled.bank)
    tiled.update([texture(s, (150, 110)) for s in (5, 6)])  # new images' tiles continue the selection
    assert len(tiled.bank) == before + int(2 * tiled.config.tiling.count(150, 110) * 64 * 0.1)


def test_an_image_of_one_tile_scores_as_the_whole_image_model(lite0):
    """tile = image_size on images of that size: one tile, resized by nothing: the same features,
    bank, scores and maps as the untiled model (up to the backbone's last bits: a tile runs in a
    batch of its image's tiles, a whole image in a micro-batch of two images)."""
    train = [texture(s, (64, 64)) for s in range(4)]
    test = [texture(s, (64, 64), defect=s % 2 == 0) for s in (20, 21)]
    whole = PatchCore(backbone=lite0, device="cpu", image_size=64, progress=False).fit(train)
    tiled = PatchCore(backbone=lite0, device="cpu", image_size=64, progress=False, tile=64).fit(train)
    assert torch.allclose(whole.memory_bank, tiled.memory_bank, rtol=1e-4, atol=1e-4)
    a, b = whole.predict(test), tiled.predict(test)
    assert torch.allclose(a.scores, b.scores, rtol=1e-4)
    assert torch.allclose(torch.stack(b.original_maps), a.maps, atol=1e-4 * float(a.maps.max()))


def test_cli_fits_and_predicts_in_tiles(tmp_path, capsys):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir(), test.mkdir()
    for s in range(3):
        texture(s, (200, 120)).save(train / f"{s}.png")
    texture(9, (200, 120), defect=True).save(test / "bad.png")
    model = tmp_path / "m.pcf"
    assert main(["--quiet", "fit", str(train), "--out", str(model), "--tile", "100", "--tile-overlap", "20", *SMALL]) == 0
    assert "tiles of 100 x 100 px overlapping by 20 px, each resized to 64 x 64" in capsys.readouterr().out
    assert main(["info", str(model)]) == 0
    assert "tiles of 100 x 100 px overlapping by 20 px" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert main(["--quiet", "predict", str(model), str(test), "--out", str(out)]) == 0
    assert Image.open(out / "test_bad.png").size[1] == 120  # the overlay on the original image
    assert main(["--quiet", "fit", str(train), "--out", str(model), "--tile-overlap", "20", *SMALL]) == 2
    assert "--tile-overlap needs --tile" in capsys.readouterr().err
