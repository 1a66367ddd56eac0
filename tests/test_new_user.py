"""What a new user tripped over (issue 19), one test per item; each failed on main before (8c924ce)."""

import csv
import os

import pytest
import torch
from PIL import Image

from patchcore_fast import PatchCore
from patchcore_fast.backbones import load_backbone
from patchcore_fast.cli import build_parser, main

from images import texture, texture_batch

SMALL = ["--image-size", "64", "--resize", "64", "--device", "cpu"]


def write_images(folder, seeds, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        texture(s, size).save(folder / f"{s:03d}.png")
    return folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small model file and the folder it was fitted on."""
    root = tmp_path_factory.mktemp("fitted")
    train = write_images(root / "train", range(4))
    model = PatchCore(backbone=load_backbone("efficientnet_lite0"), device="cpu", image_size=64, resize=64,
                      progress=False).fit(train)
    model.save(root / "m.pcf")
    return root / "m.pcf", train


# --- 1: devices the machine lacks, or misspelt -------------------------------------------------------
@pytest.mark.parametrize("device", ["gpu", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_device_the_machine_lacks_is_a_user_error(fitted, tmp_path, capsys, device):
    model, train = fitted
    assert main(["--quiet", "--device", device, "predict", str(model), str(train), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cpu" in err and "bug" not in err
    assert not (tmp_path / "p").exists()


# --- 2 and 3: every argument before any work, messages naming what can be typed ----------------------
def test_unwritable_out_and_tiny_ratio_are_refused_before_extraction(tmp_path, monkeypatch, capsys):
    train = write_images(tmp_path / "train", range(3))

    def extract_must_not_run(self, *args, **kwargs):
        raise AssertionError("features were extracted before the arguments were checked")

    monkeypatch.setattr(PatchCore, "extract", extract_must_not_run)
    assert main(["--quiet", "fit", str(train), "--out", "/proc/m.pcf", *SMALL]) == 2
    assert "/proc" in capsys.readouterr().err
    assert main(["--quiet", "fit", str(train), "--out", str(tmp_path / "m.pcf"), "--ratio", "0.0001", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--ratio" in err and "at least" in err and "pass n" not in err
    assert main(["--quiet", "fit", str(train), "--out", str(tmp_path / "m.pcf"), "--image-size", "7",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "image_size 7" in err and "patch grid" in err


# --- 4: one run's outputs never mixed with another's --------------------------------------------------
def test_output_folder_of_another_run_needs_overwrite(fitted, tmp_path, capsys):
    model, train = fitted
    out = tmp_path / "p"
    assert main(["--quiet", "predict", str(model), str(train), "--out", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) == 4
    one = tmp_path / "one.png"
    texture(9, (64, 64)).save(one)
    assert main(["--quiet", "predict", str(model), str(one), "--out", str(out), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err and len(list(out.glob("*.png"))) == 4  # nothing touched
    assert main(["--quiet", "predict", str(model), str(one), "--out", str(out), "--device", "cpu", "--overwrite"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 1 and sorted(p.name for p in out.glob("*.png")) == [rows[0]["overlay"]]
    (out / "mine.txt").write_text("a user's file")  # never removed, never mixed with
    assert main(["--quiet", "predict", str(model), str(one), "--out", str(out), "--device", "cpu", "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (out / "mine.txt").exists()


# --- 5: a very large image: bounded overlay, bounded memory -------------------------------------------
def test_overlays_of_large_images_are_bounded(fitted, tmp_path, monkeypatch):
    from patchcore_fast import cli

    monkeypatch.setattr(cli, "OVERLAY_MAX_SIDE", 100)  # the same rule as 2,048 px, on a small image
    model, _ = fitted
    big = tmp_path / "big.png"
    texture(3, (400, 300)).save(big)
    assert main(["--quiet", "predict", str(model), str(big), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    overlay = Image.open(tmp_path / "p" / f"{tmp_path.name}_big.png")
    assert overlay.size[1] == 75 and overlay.size[0] < 200  # 400 x 300 drawn at 100 x 75, plus colour bar


# --- 6: a folder without images says which, and that subfolders are not read ---------------------------
def test_a_folder_of_folders_names_itself(fitted, tmp_path, capsys):
    model, _ = fitted
    (tmp_path / "test" / "good").mkdir(parents=True)
    texture(1, (64, 64)).save(tmp_path / "test" / "good" / "0.png")
    assert main(["--quiet", "predict", str(model), str(tmp_path / "test"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "test") in err and "subfolder" in err


# --- 8: images far smaller than the model's input ------------------------------------------------------
def test_tiny_images_are_scored_with_a_warning(fitted, tmp_path, capsys):
    model, _ = fitted
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (90, 90, 90)).save(tiny)
    assert main(["--quiet", "predict", str(model), str(tiny), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: image" in err and "1 x 1 px" in err and "far smaller" in err


# --- 10: help texts and --version ----------------------------------------------------------------------
def test_every_option_has_help_and_version_prints(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = " ".join(subparsers["fit"].format_help().split())
    assert "blocks.4 blocks.10" in text and "(default: 0.1)" in text
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("patchcore-fast 0.")


# --- 12: plurals, print(model), a predict summary, overlays named by folder, stage timings -------------
def test_summaries_names_and_repr(fitted, tmp_path, capsys):
    model, train = fitted
    one = write_images(tmp_path / "one", [5])
    assert main(["fit", str(one), "--out", str(tmp_path / "m1.pcf"), "--quiet", *SMALL, "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "fitting 1 image file " in out and "fitted on 1 image:" in out and "coreset" in out
    folders = tmp_path / "data"
    for defect in ("good", "crack"):
        write_images(folders / defect, [0])
    assert main(["predict", str(model), str(folders / "good"), str(folders / "crack"), "--out", str(tmp_path / "p"),
                 "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "scored 2 images" in out and "scores.csv" in out and "features" in out
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert [r["overlay"] for r in rows] == ["good_000.png", "crack_000.png"]
    text = repr(PatchCore.load(model, device="cpu", progress=False))
    assert "efficientnet_lite0" in text and "bank" in text and "threshold" in text
