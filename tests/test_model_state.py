"""One explicit model state: PatchCoreConfig + MemoryBank, saved and read whole.

Each of the five silent-state bugs found in review has a test here that failed on the code
before the fix (checked against d80618f, the commit before it) and passes now; bug 1 (CUDA-only) is also checked
on the CUDA kernels' own source in tests/test_cuda_kernels_on_cpu.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import patchcore_fast
from patchcore_fast import PatchCore
from patchcore_fast.backbones import load_backbone
from patchcore_fast.cli import main
from patchcore_fast.config import PatchCoreConfig
from patchcore_fast.index import FlatIndex
from patchcore_fast import model_file
from patchcore_fast.model_file import FORMAT_VERSION
from patchcore_fast.reference import greedy_coreset_reference, knn_reference

from conftest import DEVICES
from images import texture, texture_batch


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def small_model(lite0, **kw):
    return PatchCore(backbone=lite0, device="cpu", image_size=64, resize=64, progress=False, **kw)


SCORE_IN_FRESH_PROCESS = """
import sys, torch
sys.path.insert(0, {tests!r})
from images import texture_batch
from patchcore_fast import PatchCore
model = PatchCore.load({path!r}, device="cpu", progress=False)
pred = model.predict(texture_batch(range(10, 13)))
torch.save({{"scores": pred.scores, "maps": pred.maps, "half": model.config.half_precision,
             "dtype": str(next(model.extractor.parameters()).dtype)}}, {out!r})
"""


def score_in_fresh_process(path, tmp_path):
    out = tmp_path / "pred.pt"
    code = SCORE_IN_FRESH_PROCESS.format(tests=str(Path(__file__).parent), path=str(path), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return torch.load(out)


# --- bug 1: -0.0 among initial distances --------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_negative_zero_start_distances_count_as_zero(device):
    """The documented "grow a bank" path: rows already in the bank start at distance 0, which
    torch may give as -0.0. It must rank as 0 (below every positive distance) on every path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (2600, 24), generator=g).float()
    initial = x.norm(dim=1)
    initial[::7] = -0.0
    ours = patchcore_fast.greedy_coreset(x.to(device), n=60, projection_dim=None, initial_distances=initial.to(device))
    assert torch.equal(ours.cpu(), greedy_coreset_reference(x, initial.abs(), 60))


# --- bug 2: half precision is part of the saved model -------------------------------------------
def test_bf16_model_round_trips_in_a_fresh_process(lite0, tmp_path):
    model = small_model(lite0, half_precision=True).fit(texture_batch(range(4)))
    pred = model.predict(texture_batch(range(10, 13)))
    path = tmp_path / "bf16.pcf"
    model.save(path)
    again = score_in_fresh_process(path, tmp_path)
    assert again["half"] is True and again["dtype"] == "torch.bfloat16"
    assert torch.equal(again["scores"], pred.scores) and torch.equal(again["maps"], pred.maps)
    assert next(lite0.parameters()).dtype == torch.float32  # the shared extractor was not converted


# --- bug 3: fit_features gives a complete model --------------------------------------------------
def test_fit_features_model_saves_scores_and_round_trips(lite0, tmp_path):
    features = small_model(lite0).extract(texture_batch(range(4)))
    model = small_model(lite0).fit_features(features)  # a fresh model: embed() never ran on it
    pred = model.predict(texture_batch(range(10, 13)))
    assert model.grid == (8, 8) and model.bank.grid == (8, 8)
    path = tmp_path / "features.pcf"
    model.save(path)
    again = score_in_fresh_process(path, tmp_path)
    assert torch.equal(again["scores"], pred.scores) and torch.equal(again["maps"], pred.maps)
    with pytest.raises(ValueError, match="patches per image"):
        small_model(lite0).fit_features(features[:, :10])
    with pytest.raises(ValueError, match="features must be"):
        small_model(lite0).fit_features(features[..., :5])


# --- bug 4: one transform for every form of an image --------------------------------------------
def test_crop_sized_tensor_and_pil_image_get_the_same_input(lite0):
    model = PatchCore(backbone=lite0, device="cpu", framing="center_crop", image_size=64, resize=72, progress=False)
    image = texture(5, (64, 64))
    as_tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    from_pil = model.transform.image(image)
    from_tensor = model.transform.tensor(as_tensor)[0]
    # PIL rounds its resized pixels to 8 bits; nothing else differs
    assert (from_pil - from_tensor).abs().max() < 2.5 / 255
    fitted = model.fit(texture_batch(range(3)))
    a, b = fitted.predict([image]).scores, fitted.predict(as_tensor[None]).scores
    assert torch.allclose(a, b, rtol=0.02)


# --- bug 5: another network's weights are refused ------------------------------------------------
def test_foreign_weights_file_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="does not hold efficientnet_lite0 weights"):
        load_backbone("efficientnet_lite0", weights=path)
    with pytest.raises(ValueError, match="does not hold resnet50 weights"):
        load_backbone("resnet50", weights=path)


# --- overflow: one defined answer on every path ------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_values_that_overflow_float32_distances_are_refused(device):
    ok = torch.randn(40, 16, device=device)
    huge = ok.clone()
    huge[3, 2] = 3e18
    with pytest.raises(ValueError, match="overflow float32"):
        patchcore_fast.knn(huge, ok, 1)
    with pytest.raises(ValueError, match="overflow float32"):
        patchcore_fast.knn(ok, huge, 1)
    with pytest.raises(ValueError, match="overflow float32"):
        patchcore_fast.greedy_coreset(huge, n=3, projection_dim=None)
    # just inside the limit, every path gives finite distances and valid indices, as the reference
    edge = ok.clone()
    edge[3] = 1e17
    d, i = patchcore_fast.knn(edge, ok, 2)
    rd, ri = knn_reference(edge.cpu(), ok.cpu(), 2)
    assert bool(torch.isfinite(d).all()) and bool((i >= 0).all()) and torch.equal(i.cpu(), ri)


# --- the state objects ---------------------------------------------------------------------------
def test_config_is_immutable_and_complete(lite0):
    model = small_model(lite0, coreset_ratio=0.25, reweight=True)
    with pytest.raises(AttributeError):
        model.config.coreset_ratio = 0.5
    restored = PatchCoreConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    assert restored == model.config
    other = model.with_settings(coreset_ratio=0.1)
    assert other.config.coreset_ratio == 0.1 and model.config.coreset_ratio == 0.25
    assert other.extractor is model.extractor
    with pytest.raises(ValueError, match="change the features"):
        model.with_settings(image_size=32)
    with pytest.raises(ValueError, match="knn_cuda_kernel"):
        small_model(lite0, knn_cuda_kernel="fastest")


def test_two_models_choose_their_kernels_independently(lite0):
    a = small_model(lite0, coreset_cuda_kernel="resident", knn_cuda_kernel="warp32x64")
    b = small_model(lite0)
    assert (a.options.coreset_cuda_kernel, a.options.knn_cuda_kernel) == ("resident", "warp32x64")
    assert (b.options.coreset_cuda_kernel, b.options.knn_cuda_kernel) == ("cached", "warp16x128")
    assert a.config == b.config  # run-time choices: not part of what the model file keeps
    assert a.with_settings(coreset_ratio=0.2).options.knn_cuda_kernel == "warp32x64"


def test_format_version_1_files_still_load(lite0, tmp_path):
    """A file as the previous format wrote it: settings and backbone apart, no half precision."""
    from safetensors.torch import save_file

    model = small_model(lite0).fit(texture_batch(range(4)))
    pred = model.predict(texture_batch(range(10, 13)))
    config = model.config.to_dict()
    assert config["framing"] == "whole"
    model = PatchCore.from_config(model.config.replace(framing="center_crop"), lite0, device="cpu", progress=False)
    model = model.fit(texture_batch(range(4)))
    pred = model.predict(texture_batch(range(10, 13)))
    config = model.config.to_dict()
    settings = {k: config[k] for k in ("coreset_ratio", "projection_dim", "num_neighbors", "reweight",
                                       "reweight_neighbors", "image_size", "resize", "embed_dim", "seed")}
    meta = {"format_version": 1, "patchcore_fast": "0.1.0", "settings": settings, "backbone": config["backbone"],
            "grid": [8, 8]}
    path = tmp_path / "v1.pcf"
    save_file({"memory_bank": model.memory_bank}, str(path), metadata={"patchcore_fast": json.dumps(meta)})
    loaded = PatchCore.load(path, device="cpu", progress=False)
    assert loaded.config == model.config
    assert torch.equal(loaded.predict(texture_batch(range(10, 13))).scores, pred.scores)
    assert FORMAT_VERSION == 5 and model_file.load(path).grid == (8, 8)


def test_format_version_3_files_load_without_tiles(lite0, tmp_path):
    """Format 3 had no tiles: its config lacks tile and tile_overlap, and means whole images."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = small_model(lite0).fit(texture_batch(range(4)))
    path = tmp_path / "v4.pcf"
    model.save(path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["patchcore_fast"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format_version"] == 5 and meta["config"]["tile"] is None
    meta["format_version"] = 3
    del meta["config"]["tile"], meta["config"]["tile_overlap"]
    save_file(tensors, str(tmp_path / "v3.pcf"), metadata={"patchcore_fast": json.dumps(meta)})
    loaded = PatchCore.load(tmp_path / "v3.pcf", device="cpu", progress=False)
    assert loaded.config == model.config and loaded.config.tiling is None
    assert model_file.load(tmp_path / "v3.pcf").file_format == 3


def test_a_bank_streamed_into_the_file_reads_like_a_whole_one_and_a_share_reads_only_its_rows(lite0, tmp_path):
    """Under torchrun rank 0 writes the bank as its rows stream in (model_file.StreamedRows) and each
    rank reads only its share: both must be the ordinary file and its rows."""
    from safetensors import safe_open

    model = small_model(lite0).fit(texture_batch(range(4)))
    c, grid, index, decided = model.config, model.bank.grid, model.bank.index, model.bank.decision
    bank = index.all_vectors()
    whole, streamed = tmp_path / "whole.pcf", tmp_path / "streamed.pcf"
    model_file.save(whole, c, grid, index, decided)
    chunks = (bank[s : s + 7] for s in range(0, len(bank), 7))  # awkward chunk size
    flat = FlatIndex(bank[:1])  # only its kind and state are written
    model_file.save(streamed, c, grid, flat, decided, model_file.StreamedRows(len(bank), bank.shape[1], chunks))
    with safe_open(str(streamed), framework="pt") as f:  # safetensors' own reader
        assert torch.equal(f.get_tensor("memory_bank"), bank)
        assert torch.equal(f.get_tensor("normal_scores"), decided.normal_scores.float())
    a, b = model_file.load(whole), model_file.load(streamed)
    assert torch.equal(a.index.vectors, b.index.vectors) and a.decision.threshold == b.decision.threshold
    part = model_file.load(streamed, share=lambda rows: (rows // 3, rows // 2))
    assert part.rows == (len(bank) // 3, len(bank) // 2, len(bank))
    assert torch.equal(part.index.vectors, bank[len(bank) // 3 : len(bank) // 2])
    short = (bank[s : s + 7] for s in range(0, len(bank) - 1, 7))
    with pytest.raises(ValueError, match="declared"):
        model_file.save(tmp_path / "short.pcf", c, grid, flat, decided,
                        model_file.StreamedRows(len(bank) + 3, bank.shape[1], short))
    assert not list(tmp_path.glob("short.pcf*"))  # nothing left behind


# --- the command line -----------------------------------------------------------------------------
def test_common_flags_before_or_after_the_subcommand(tmp_path, capsys):
    for argv in (["--quiet", "--device", "cpu", "predict", "/no/model.pcf", "x.png"],
                 ["predict", "/no/model.pcf", "x.png", "--quiet", "--device", "cpu"]):
        assert main(argv) == 2
        assert "no model file" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["predict", "/no/model.pcf", "x.png", "--debug"])


def test_internal_errors_show_a_traceback_and_ask_for_a_report(monkeypatch, capsys):
    from patchcore_fast import kernel_demo

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(kernel_demo, "demo", broken)
    assert main(["kernels", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "kernel exploded" in err and "please report it" in err


def test_missing_weights_are_a_user_error_naming_the_cli_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import socket

    def offline(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    for part in ("train", "test"):
        (tmp_path / "c" / part / "good").mkdir(parents=True)
        texture(1, (64, 64)).save(tmp_path / "c" / part / "good" / "0.png")
    assert main(["--quiet", "fit", str(tmp_path), "--category", "c", "--out", "m.pcf", "--backbone", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert "--weights PATH" in err and len(err.strip().splitlines()) == 1
