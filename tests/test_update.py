"""New good images without a refit: the greedy selection continued from a bank, PatchCore.update
and `patchcore-fast update`."""

import pytest
import torch

from patchcore_fast import PatchCore, synthetic
from patchcore_fast.backbones import load_backbone
from patchcore_fast.cli import main
from patchcore_fast.coreset import continued_coreset, distances_to_bank, greedy_coreset
from patchcore_fast.errors import UserError

from conftest import clustered_rows
from images import texture

SMALL = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--resize", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.mark.parametrize("rows, dim, first, more, projection_dim", [
    (1_037, 37, 61, 140, None), (2_311, 200, 97, 301, 128), (517, 1024, 13, 40, 128)])
def test_continuing_from_a_bank_is_the_greedy_selection_from_that_bank(rows, dim, first, more, projection_dim):
    """Every pick of the continued selection is (in float64, up to the float32 distances' rounding) the row
    farthest from the bank and the picks before it, in the selection space; a bank of a whole
    selection's first picks is continued with that selection's next picks (near ties aside)."""
    x = clustered_rows(rows, dim, torch.Generator().manual_seed(rows))
    whole = greedy_coreset(x, n=first + more, projection_dim=projection_dim, initial_distances=torch.full((rows,), 1e9))
    taken = set(whole[:first].tolist())
    rest = torch.tensor([i for i in range(rows) if i not in taken])
    picks = continued_coreset(x[rest], x[whole[:first]], n=more, projection_dim=projection_dim)
    assert len(set(picks.tolist())) == more
    space = distances_to_bank(x, x[:1], projection_dim)[0].double()
    covered = torch.cdist(space[rest], space[whole[:first]]).min(dim=1).values
    for pick in picks.tolist():
        assert covered[pick] >= covered.max() * (1 - 1e-3)  # float32 expanded-form distances
        covered = torch.minimum(covered, torch.cdist(space[rest], space[rest[pick : pick + 1]])[:, 0])
    agree = (rest[picks] == whole[first:]).float().mean()
    assert agree == 1 or (projection_dim is not None and agree > 0.1)  # ties broken apart by rounding


def test_distances_to_bank_are_nearest_row_distances_in_the_selection_space():
    g = torch.Generator().manual_seed(5)
    x, bank = torch.randn(300, 40, generator=g), torch.randn(70, 40, generator=g)
    space, distance = distances_to_bank(x, bank, projection_dim=None)
    assert torch.equal(space, x)
    assert torch.allclose(distance, torch.cdist(x.double(), bank.double()).min(dim=1).values.float(), rtol=1e-4, atol=1e-4)
    projected, _ = distances_to_bank(x, bank, projection_dim=16)
    assert projected.shape == (300, 16)
    # a row equal to a bank row starts at zero: it is never picked before an uncovered row
    assert distances_to_bank(bank[:3], bank, projection_dim=None)[1].abs().max() < 1e-2
    with pytest.raises(ValueError, match="bank must be"):
        distances_to_bank(x, bank[:, :39])
    with pytest.raises(ValueError, match="bank is empty"):
        distances_to_bank(x, bank[:0])


def small_model(lite0, **kw):
    return PatchCore(backbone=lite0, device="cpu", image_size=64, resize=64, progress=False, **kw)


def test_update_grows_the_bank_by_the_ratio_of_the_new_images(lite0, tmp_path):
    old_images = [texture(s, (64, 64)) for s in range(6)]
    new_images = [texture(s, (64, 64)) for s in range(6, 11)]
    model = small_model(lite0).fit(old_images)
    old_rows = model.memory_bank.clone()
    old_scores = model.bank.decision.normal_scores
    patches = model.grid[0] * model.grid[1]
    before_new = model.predict(new_images).scores
    model.update(new_images)
    assert model.added_images == 5
    assert len(model.bank) == len(old_rows) + int(5 * patches * 0.1)
    assert torch.equal(model.memory_bank[: len(old_rows)], old_rows)  # the old bank is kept as it was
    # the added rows are the new images' own patches, picked as the continued selection picks them
    features = model.extract(new_images).reshape(-1, 1024)
    picks = continued_coreset(features, old_rows, 0.1)
    assert torch.equal(model.memory_bank[len(old_rows):], features[picks])
    # the new images are now covered: they score lower than before
    assert (model.predict(new_images).scores < before_new).all()
    d = model.bank.decision
    assert torch.equal(d.normal_scores[: len(old_scores)], old_scores) and len(d.normal_scores) == len(old_scores) + 5
    assert d.threshold == pytest.approx(float(torch.quantile(d.normal_scores, 0.99)))
    assert "from 5 images added by update" in d.threshold_source
    path = tmp_path / "m.pcf"
    model.save(path)
    again = PatchCore.load(path, progress=False)
    assert torch.equal(again.memory_bank, model.memory_bank) and again.bank.decision.threshold == d.threshold


def test_update_keeps_a_calibrated_threshold_and_checks_its_input(lite0):
    model = small_model(lite0).fit([texture(s, (64, 64)) for s in range(4)])
    model.calibrate([texture(s, (64, 64)) for s in (30, 31, 32)])
    threshold = model.bank.decision.threshold
    model.update([texture(s, (64, 64)) for s in (7, 8, 9)])
    assert model.bank.decision.threshold == threshold and "good images" in model.bank.decision.threshold_source
    with pytest.raises(UserError, match="fit"):
        small_model(lite0).update([texture(1, (64, 64))])
    with pytest.raises(ValueError, match="per-image features"):
        model.update_features(torch.zeros(64, 1024))
    with pytest.raises(ValueError, match="patches per image"):
        model.update_features(torch.zeros(2, 10, 1024))
    with pytest.raises(ValueError, match="selects none"):
        small_model(lite0, coreset_ratio=0.001).fit([texture(1, (64, 64))] * 20).update([texture(2, (64, 64))])


def test_cli_update_writes_a_new_model(tmp_path, capsys):
    data = synthetic.generate(tmp_path / "data", seed=2, train=6, test_good=1, per_defect=1)
    train = data / "grass" / "train" / "good"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for n, p in enumerate(sorted(train.iterdir())):
        (first if n < 3 else second).joinpath(p.name).write_bytes(p.read_bytes())
    model, updated = tmp_path / "m.pcf", tmp_path / "m2.pcf"
    assert main(["--quiet", "fit", str(first), "--out", str(model), *SMALL]) == 0
    capsys.readouterr()
    assert main(["--quiet", "update", str(model), str(second), "--out", str(updated)]) == 0
    out = capsys.readouterr().out
    assert "added 3 images: memory bank 19 -> 38 rows" in out and "from 3 images added by update" in out
    assert main(["info", str(updated)]) == 0
    assert "38 rows x 1024" in capsys.readouterr().out
    assert main(["update", str(model), str(tmp_path / "missing"), "--out", str(updated)]) == 2
