"""One rank of a multi-process test (tests/test_distributed.py starts several, as torchrun would:
RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT in the environment).

    python distributed_worker.py SCENARIO OUT_DIR

Each rank writes what it computed to OUT_DIR/rank<r>.pt for the test to compare with one process.
"""

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from patchcore_fast import PatchCore, distributed  # noqa: E402
from patchcore_fast.backbones import load_backbone  # noqa: E402

from images import texture_batch  # noqa: E402

TRAIN, TEST = range(0, 8), range(20, 31)  # 11 test images: several scoring steps, ranks run out unevenly


def random_rows(seed=0):
    return torch.randn(1003, 64, generator=torch.Generator().manual_seed(seed))


def integer_rows(rows, dim, seed):
    return torch.randint(-2, 3, (rows, dim), generator=torch.Generator().manual_seed(seed)).float()


def patch_features(images, seed):
    """Patch features shaped like small_model's ([images, 8 x 8, 1024]), with a few dominant
    directions as real features have."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(12, 1024, generator=g)
    return (torch.randn(images, 64, 12, generator=g) @ basis + 0.1 * torch.randn(images, 64, 1024, generator=g)).abs()


TIRE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec3d_rgb" / "tire"


def tire_slice():
    """A small slice of MVTec 3D-AD tire: 8 training images, 2 good and 2 cut test images (paths)."""
    from patchcore_fast.data import image_files

    return (image_files(TIRE / "train" / "good")[:8],
            image_files(TIRE / "test" / "good")[:2] + image_files(TIRE / "test" / "cut")[:2])


def small_model():
    return PatchCore(backbone=load_backbone("efficientnet_lite0"), device="cpu", image_size=64, resize=64,
                     progress=False, coreset_ratio=0.25, batch_size=2)


def main(scenario: str, out: Path) -> None:
    distributed.init_from_environment()
    rank, size = distributed.rank_and_size()
    result = {}
    if scenario == "coreset":
        x = random_rows()
        start, stop = distributed.shard(len(x))
        for projection in (32, None):
            result[f"picks_{projection}"] = distributed.greedy_coreset(x[start:stop], n=150, projection_dim=projection,
                                                                       seed=3)
        dup = torch.cat([x[:40], x[:40], x[:20]])  # duplicates: every row picked once, lowest index first
        start, stop = distributed.shard(len(dup))
        result["picks_all"] = distributed.greedy_coreset(dup[start:stop], n=len(dup), projection_dim=None)
    elif scenario == "search":
        bank, queries = integer_rows(517, 24, 1), integer_rows(203, 24, 2)  # many exact ties
        start, stop = distributed.shard(len(bank))
        for k in (1, 4):
            result[f"search_{k}"] = distributed.search(queries, bank[start:stop], torch.arange(start, stop), k,
                                                       len(bank))
    elif scenario == "fit_features":  # each rank fits on its share of the same features
        train, test = patch_features(7, 0), patch_features(4, 1)
        start, stop = distributed.shard(len(train))
        model = small_model().with_settings(reweight=True).fit_features(train[start:stop])
        model.save(out / "model.pcf")
        prediction = model.score(test)
        result.update(scores=prediction.scores, maps=prediction.maps, rows=len(model.bank.features),
                      normal=model.bank.decision.normal_scores)
    elif scenario == "load":  # the file rank 0 wrote, on any number of ranks
        model = PatchCore.load(out.parent / "model.pcf", device="cpu", progress=False)
        prediction = model.score(patch_features(4, 1))
        result.update(scores=prediction.scores, maps=prediction.maps, rows=len(model.bank.features))
    elif scenario in ("images", "tire"):  # fit and predict from images, each rank embedding its share
        train, test = (texture_batch(TRAIN), texture_batch(TEST)) if scenario == "images" else tire_slice()
        model = small_model().fit(train)
        prediction = model.predict(test)  # "auto": a small bank is copied to every rank
        result.update(scores=prediction.scores, maps=prediction.maps, sources=[str(s) for s in prediction.sources])
        for choice in ("replicated", "sharded"):  # each way of meeting the sharded bank
            model.options = dataclasses.replace(model.options, predict_bank=choice)
            prediction = model.predict(test)
            result.update({f"scores_{choice}": prediction.scores, f"maps_{choice}": prediction.maps})
    elif scenario == "die_saving":  # rank 1 dies when the bank is gathered for writing
        model = small_model().fit(texture_batch(TRAIN))
        if rank == 1:
            os._exit(3)
        model.save(out / "model.pcf")
    elif scenario in ("die", "hang"):
        model = small_model()

        def misbehave(step):
            if rank == 1 and step >= 5:  # progress comes once a round (a batch of picks)
                if scenario == "die":
                    os._exit(3)
                time.sleep(3600)

        features = model.extract(model.workers.share(texture_batch(TRAIN), model.batch_size))
        local = features.reshape(-1, features.shape[-1])
        distributed.greedy_coreset(local, 0.25, progress=misbehave)
        model.save(out / "model.pcf")  # never reached
    torch.save(result, out / f"rank{rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
