"""Image and MVTec AD readers: transforms, masks, and bad data."""

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_fast.data import ImageReadError, MVTecCategory, Transform, iter_batches, load_mask

from images import texture


def make_category(root, masks=True, mask_size=None):
    base = root / "widget"
    for sub in ("train/good", "test/good", "test/scratch", "test/dent", "ground_truth/scratch"):
        (base / sub).mkdir(parents=True)
    for i in range(3):
        texture(i, (80, 60)).save(base / "train" / "good" / f"{i:03d}.png")
        texture(10 + i, (80, 60)).save(base / "test" / "good" / f"{i:03d}.png")
    for i in range(2):
        texture(20 + i, (80, 60), defect=True).save(base / "test" / "scratch" / f"{i:03d}.png")
        texture(30 + i, (80, 60), defect=True).save(base / "test" / "dent" / f"{i:03d}.png")  # no masks
        mask = np.zeros((60, 80), np.uint8)
        mask[20:35, 26:42] = 255
        m = Image.fromarray(mask)
        if mask_size:
            m = m.resize(mask_size, Image.NEAREST)
        m.save(base / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return base


def test_mvtec_layout(tmp_path):
    make_category(tmp_path)
    with pytest.warns(RuntimeWarning, match="dent.*no mask"):
        cat = MVTecCategory.open(tmp_path, "widget")
    assert len(cat.train) == 3 and len(cat.test) == 7
    assert MVTecCategory.categories(tmp_path) == ["widget"]
    t = Transform(resize=64, crop=56)
    by_defect = {}
    for item in cat.test:
        by_defect.setdefault(item.defect, []).append(load_mask(item, t))
    assert all(m is not None and not m.any() for m in by_defect["good"])
    assert all(m is None for m in by_defect["dent"])  # image metrics only
    scratch = by_defect["scratch"][0]
    assert scratch.dtype == torch.bool and scratch.shape == (56, 56) and 0 < scratch.float().mean() < 0.2


def test_mask_of_another_size_is_resized_with_a_warning(tmp_path):
    make_category(tmp_path, mask_size=(160, 120))
    with pytest.warns(RuntimeWarning):
        cat = MVTecCategory.open(tmp_path, "widget")
    item = next(x for x in cat.test if x.defect == "scratch")
    with pytest.warns(RuntimeWarning, match="resized to the image"):
        mask = load_mask(item, Transform(64, 56))
    assert mask.any()


def test_empty_training_folder(tmp_path):
    (tmp_path / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        MVTecCategory.open(tmp_path, "widget")
    with pytest.raises(FileNotFoundError):
        MVTecCategory.open(tmp_path, "nothing")


def test_transform_matches_torchvision():
    import torchvision.transforms as T

    img = texture(5, (97, 61))
    ref = T.Compose([T.Resize(64), T.CenterCrop(56), T.ToTensor()])(img)
    ours = Transform(64, 56).image(img)
    assert ours.shape == ref.shape == (3, 56, 56)
    assert (ours - ref).abs().max() <= 1 / 255 + 1e-6


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        list(iter_batches([bad], Transform(64, 56), 4))
    with pytest.warns(RuntimeWarning, match="broken.png"):
        batches = list(iter_batches([bad, texture(1, (70, 70))], Transform(64, 56), 4, skip_bad=True))
    assert batches[0].shape == (1, 3, 56, 56)


def test_tensor_inputs_are_checked():
    t = Transform(64, 56)
    with pytest.raises(TypeError, match="floats"):
        t.tensor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        t.tensor(torch.zeros(2, 5, 64, 64))
    assert t.tensor(torch.rand(2, 1, 80, 100)).shape == (2, 3, 56, 56)
