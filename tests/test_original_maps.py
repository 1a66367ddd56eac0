"""Maps drawn back on the original images: the centre crop undone, the border it discarded unknown."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast import PatchCore
from patchcore_fast.backbones import load_backbone
from patchcore_fast.cli import main
from patchcore_fast.data import Transform

from images import texture


def test_whole_framing_at_the_same_size_is_the_identity_and_resizes_otherwise():
    view = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))
    t = Transform(resize=64, crop=64, framing="whole")
    assert torch.allclose(t.to_original(view, 64, 64), view, atol=1e-6)
    big = t.to_original(view, 128, 96)
    assert big.shape == (96, 128) and not big.isnan().any()
    assert float(big.min()) >= float(view.min()) - 1e-6 and float(big.max()) <= float(view.max()) + 1e-6


def test_centre_crop_is_placed_back_and_the_border_is_unknown():
    t = Transform(resize=256, crop=224, framing="center_crop")
    left, top, right, bottom = t.box(400, 300)  # short side 300 -> 256: scale 300/256, crop 224 of it
    assert (right - left, bottom - top) == pytest.approx((224 * 300 / 256, 224 * 300 / 256), abs=0.5)  # int resize
    assert (left + right) / 2 == pytest.approx(200, abs=1) and (top + bottom) / 2 == pytest.approx(150, abs=1)
    view = torch.zeros(224, 224)
    view[100:124, 30:54] = 1.0  # a block left of the crop's centre
    original = t.to_original(view, 400, 300)
    assert original.shape == (300, 400)
    assert original[:, : math.floor(left)].isnan().all() and original[:, math.ceil(right) + 1 :].isnan().all()
    assert not original[math.ceil(top) : math.floor(bottom), math.ceil(left) : math.floor(right)].isnan().any()
    ys, xs = np.nonzero(original.nan_to_num().numpy() > 0.5)
    scale = 300 / 256
    assert xs.mean() == pytest.approx(left + 42 * scale, abs=2) and ys.mean() == pytest.approx(top + 112 * scale, abs=2)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_predict_on_original_gives_each_image_its_own_size(lite0):
    model = PatchCore(backbone=lite0, device="cpu", image_size=64, resize=72, framing="center_crop", progress=False)
    model.fit([texture(i, size=(96, 80)) for i in range(4)])
    images = [texture(10, size=(96, 80)), texture(11, size=(50, 120)), texture(12, size=(72, 72))]
    prediction = model.predict(images, on_original=True)
    assert [tuple(m.shape) for m in prediction.original_maps] == [(80, 96), (120, 50), (72, 72)]
    for m in prediction.original_maps:  # resize 72 > crop 64: a border on every side is unknown
        h, w = m.shape
        left, top, right, bottom = (round(v) for v in model.transform.box(w, h))
        assert m[: top - 1].isnan().all() and m[bottom + 1 :].isnan().all()
        assert m[:, : left - 1].isnan().all() and m[:, right + 1 :].isnan().all()
        assert not m[top + 1 : bottom - 1, left + 1 : right - 1].isnan().any()
    assert torch.equal(model.predict(images).maps, prediction.maps)


def test_cli_overlays_are_drawn_on_the_original_images(lite0, tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(4):
        texture(i, size=(96, 80)).save(folder / f"{i}.png")
    model = tmp_path / "m.pcf"
    assert main(["fit", str(folder), "--out", str(model), "--image-size", "64", "--resize", "72", "--framing",
                 "center_crop", "--quiet"]) == 0
    test = tmp_path / "test.png"
    texture(20, size=(130, 90), defect=True).save(test)
    assert main(["predict", str(model), str(test), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    overlay = Image.open(tmp_path / "p" / f"{tmp_path.name}_test.png")
    assert overlay.size[1] == 90 and overlay.size[0] > 130  # the image's own size, then the colour bar
    assert main(["predict", str(model), str(test), "--out", str(tmp_path / "q"), "--overlays", "model", "--quiet"]) == 0
    assert Image.open(tmp_path / "q" / f"{tmp_path.name}_test.png").size[1] == 64
