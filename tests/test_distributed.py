"""torch.distributed (gloo, 2 and 3 CPU processes on 127.0.0.1): the sharded coreset, search and
model give exactly what one process gives; a rank that dies or hangs ends the job with a clear
error within the timeout and leaves no model file."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from patchcore_fast import PatchCore, greedy_coreset, knn
from patchcore_fast._extension import compiled

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built"),
              pytest.mark.skipif(not compiled(torch.device("cpu")), reason="the C++ extension is not built")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(ranks, scenario, out, timeout_s=60):
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "PATCHCORE_DIST_TIMEOUT": str(timeout_s), "PYTHONWARNINGS": "ignore"}
    return [subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)],
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(ranks)]


def finish(processes, limit_s):
    """(return codes, stderr texts, seconds) once every rank ended; all killed past limit_s."""
    start = time.monotonic()
    codes, errors = [], []
    for p in processes:
        try:
            _, err = p.communicate(timeout=max(1.0, limit_s - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            pytest.fail(f"ranks still running after {limit_s} s")
        codes.append(p.returncode)
        errors.append(err)
    return codes, errors, time.monotonic() - start


def run_ranks(ranks, scenario, out, limit_s=240):
    codes, errors, _ = finish(start_ranks(ranks, scenario, out), limit_s)
    assert codes == [0] * ranks, "\n".join(e[-3000:] for e in errors)
    return [torch.load(out / f"rank{r}.pt") for r in range(ranks)]


@pytest.mark.parametrize("ranks", [2, 3])
def test_coreset_picks_equal_one_process(tmp_path, ranks):
    results = run_ranks(ranks, "coreset", tmp_path)
    x = worker.random_rows()
    for projection in (32, None):
        expected = greedy_coreset(x, n=150, projection_dim=projection, seed=3)
        for r in results:
            assert torch.equal(r[f"picks_{projection}"], expected)
    dup = torch.cat([x[:40], x[:40], x[:20]])
    expected = greedy_coreset(dup, n=len(dup), projection_dim=None)
    assert sorted(expected.tolist()) == list(range(len(dup)))
    for r in results:
        assert torch.equal(r["picks_all"], expected)


@pytest.mark.parametrize("ranks", [2, 3])
def test_sharded_search_equals_knn(tmp_path, ranks):
    results = run_ranks(ranks, "search", tmp_path)
    bank, queries = worker.integer_rows(517, 24, 1), worker.integer_rows(203, 24, 2)
    for k in (1, 4):
        expected = knn(queries, bank, k)
        for r in results:
            d, i = r[f"search_{k}"]
            assert torch.equal(d, expected[0]) and torch.equal(i, expected[1])


def test_sharded_model_scores_like_one_process_and_saves_one_file(tmp_path):
    model = worker.small_model().with_settings(reweight=True).fit_features(worker.patch_features(7, 0))
    expected = model.score(worker.patch_features(4, 1))
    fit_dir = tmp_path / "fit"
    results = run_ranks(2, "fit_features", fit_dir)
    for r in results:  # scores, maps and the colour scale on every rank, equal to one process's
        assert torch.equal(r["scores"], expected.scores) and torch.equal(r["maps"], expected.maps)
        assert torch.equal(r["normal"], model.bank.decision.normal_scores)
    assert sum(r["rows"] for r in results) == len(model.bank)
    # the file rank 0 wrote: the whole bank, loadable in one process ...
    loaded = PatchCore.load(fit_dir / "model.pcf", device="cpu", progress=False)
    assert torch.equal(loaded.bank.features, model.bank.features)
    again = loaded.score(worker.patch_features(4, 1))
    assert torch.equal(again.scores, expected.scores) and torch.equal(again.maps, expected.maps)
    # ... or on another number of ranks
    results = run_ranks(3, "load", fit_dir / "load")
    for r in results:
        assert torch.equal(r["scores"], expected.scores) and torch.equal(r["maps"], expected.maps)
    assert sum(r["rows"] for r in results) == len(model.bank)


@pytest.mark.parametrize("data", ["images", "tire"])
def test_fit_and_predict_from_images_on_two_ranks_like_one(tmp_path, data):
    """From images (synthetic textures, or a slice of tire), each rank embeds its share (whole
    batches). The backbone's floats depend on its thread count (oneDNN), so the one-process
    reference runs with the ranks' settings (one thread)."""
    if data == "tire" and not worker.TIRE.is_dir():
        pytest.skip("tire images not found (../shared/data)")
    one = run_ranks(1, data, tmp_path / "one")[0]
    for ranks in (2, 3):
        for r in run_ranks(ranks, data, tmp_path / str(ranks)):
            assert torch.equal(r["scores"], one["scores"]) and torch.equal(r["maps"], one["maps"])
            assert r["sources"] == one["sources"]
            for choice in ("replicated", "sharded"):  # the bank copied to every rank, or queries travelling
                assert torch.equal(r[f"scores_{choice}"], one["scores"]) and torch.equal(r[f"maps_{choice}"], one["maps"])


@pytest.mark.parametrize("scenario", ["die", "die_saving", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_job_clearly(tmp_path, scenario):
    timeout_s = 15
    processes = start_ranks(2, scenario, tmp_path, timeout_s=timeout_s)
    if scenario == "hang":  # rank 1 sleeps inside the coreset: rank 0 must give up on its own
        codes, errors, seconds = finish(processes[:1], 4 * timeout_s + 60)
        processes[1].kill()
        processes[1].wait()
    else:
        codes, errors, seconds = finish(processes, 4 * timeout_s + 60)
        assert codes[1] == 3
    assert codes[0] != 0
    assert "DistributedError" in errors[0] and "another rank stopped" in errors[0], errors[0][-2000:]
    assert seconds < 3 * timeout_s + 60
    assert not any(tmp_path.glob("model.pcf*")), list(tmp_path.iterdir())


def test_cli_fit_and_predict_under_torchrun_match_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m patchcore_fast.cli fit/predict` writes the same model file and
    scores.csv as one process (with torchrun's one thread per process, as the backbone's floats
    depend on the thread count; ranks take whole micro-batches, as they depend on the batch too)."""
    from images import texture_batch

    from torchvision.utils import save_image

    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(texture_batch(range(6))):
        save_image(image, folder / f"{i:03d}.png")
    test = tmp_path / "test"
    test.mkdir()
    for i, image in enumerate(texture_batch(range(30, 33))):
        save_image(image, test / f"{i:03d}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATCHCORE_DIST_TIMEOUT": "120"}
    common = ["--quiet", "--image-size", "64", "--resize", "64", "--ratio", "0.25", "--batch-size", "2"]

    def cli(launcher, *args):
        result = subprocess.run([*launcher, "-m", "patchcore_fast.cli", *args], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    one = [sys.executable]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port())]
    cli(one, "fit", str(folder), "--out", str(tmp_path / "one.pcf"), *common)
    out = cli(two, "fit", str(folder), "--out", str(tmp_path / "two.pcf"), *common)
    assert "distributed: 2 ranks (gloo)" in out and out.count("saved") == 1
    a = PatchCore.load(tmp_path / "one.pcf", progress=False).bank
    b = PatchCore.load(tmp_path / "two.pcf", progress=False).bank
    assert torch.equal(a.features, b.features) and torch.equal(a.decision.normal_scores, b.decision.normal_scores)
    two[-1] = str(free_port())
    cli(one, "predict", str(tmp_path / "one.pcf"), str(test), "--out", str(tmp_path / "p1"), "--quiet", "--batch-size", "2")
    cli(two, "predict", str(tmp_path / "two.pcf"), str(test), "--out", str(tmp_path / "p2"), "--quiet", "--batch-size", "2")
    assert (tmp_path / "p1" / "scores.csv").read_text() == (tmp_path / "p2" / "scores.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == sorted(p.name for p in (tmp_path / "p1").iterdir())


def _rounds_in_one_process(x, initial, bounds, n):
    """The distributed coreset's rounds with shards [bounds[r], bounds[r + 1]) in one process: each
    shard's pass offers its farthest rows, the union picks the batch (what every rank does)."""
    from patchcore_fast._extension import _C

    shards = [_C.CoresetShard(x[a:b].contiguous(), initial[a:b].contiguous()) for a, b in zip(bounds, bounds[1:])]
    picks, centres, rounds = [], torch.empty(0, x.shape[1]), 0
    while len(picks) < n:
        values, indices, bound = [], [], -float("inf")
        for shard, start in zip(shards, bounds):
            v, local = shard.pass_(centres)
            assert len(v) <= _C.coreset_offered and torch.equal(v, v.sort(descending=True).values)
            values.append(v)
            indices.append(local + start)
            if len(v) == _C.coreset_offered:
                bound = max(bound, float(v[-1]))
        values, indices = torch.cat(values), torch.cat(indices)
        chosen = _C.coreset_pick_batch(values, indices, x[indices].contiguous(), bound, n - len(picks))
        assert len(chosen) >= 1
        new = indices[chosen]
        for shard, a, b in zip(shards, bounds, bounds[1:]):
            mine = new[(new >= a) & (new < b)] - a
            if len(mine):
                shard.pin(mine)
        centres = x[new].contiguous()
        picks += new.tolist()
        rounds += 1
    return torch.tensor(picks), rounds


@pytest.mark.parametrize("rows, dim, cuts, kind", [
    (3001, 37, [0, 1500, 3001], "gaussian"),
    (2500, 64, [0, 10, 10, 2100, 2500], "gaussian"),      # a tiny shard and an empty one
    (1200, 24, [0, 400, 800, 1200], "integers"),        # many exact ties
    (700, 5, [0, 100, 700], "clusters"),                # duplicates: every row picked once
])
def test_shard_rounds_pick_what_one_process_picks(rows, dim, cuts, kind):
    from patchcore_fast.coreset import seeded_start

    g = torch.Generator().manual_seed(rows)
    if kind == "gaussian":
        x = torch.randn(rows, dim, generator=g)
    elif kind == "integers":
        x = torch.randint(-2, 3, (rows, dim), generator=g).float()
    else:
        x = torch.randn(7, dim, generator=g)[torch.randint(0, 7, (rows,), generator=g)]
    _, initial = seeded_start(x, None, 10, seed=1)
    for n in (1, 97, 333, rows):
        expected = greedy_coreset(x, n=n, projection_dim=None, initial_distances=initial)
        picks, rounds = _rounds_in_one_process(x, initial, cuts, n)
        assert torch.equal(picks, expected), (n, (picks != expected).nonzero()[:3])
        assert rounds < n or n == 1 or kind == "clusters"


def test_shard_parts_refuse_bad_input():
    from patchcore_fast._extension import _C

    x = torch.randn(50, 8)
    with pytest.raises(ValueError, match="initial"):
        _C.CoresetShard(x, torch.zeros(49))
    shard = _C.CoresetShard(x, torch.ones(50))
    with pytest.raises(ValueError, match="centres"):
        shard.pass_(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="values"):
        _C.coreset_pick_batch(torch.zeros(3), torch.zeros(3), x[:3].contiguous(), 0.0, 1)
    with pytest.raises(RuntimeError, match="outside the shard"):
        shard.pin(torch.tensor([50]))


def test_shares_are_even_to_a_micro_batch_and_the_backbone_sees_the_same_micro_batches():
    """20 images on 2 ranks were split 16 / 4 when shares were whole batches of 8."""
    from patchcore_fast import distributed
    from patchcore_fast.backbones import load_backbone

    model = PatchCore(backbone=load_backbone("efficientnet_lite0"), device="cpu", image_size=64, resize=64,
                      batch_size=8, progress=False)
    m = model.micro_batch
    assert m == 2 and model.with_settings(batch_size=7).micro_batch == 1
    for count, ranks in ((20, 2), (21, 2), (210, 3), (7, 3), (2, 3)):
        shares = [distributed.shard(count, r, ranks, unit=m) for r in range(ranks)]
        assert shares[0][0] == 0 and shares[-1][1] == count
        assert all(shares[r][1] == shares[r + 1][0] for r in range(ranks - 1))
        assert all(start % m == 0 for start, _ in shares)  # every rank's batches start on a micro-batch
        sizes = [stop - start for start, stop in shares]
        assert max(sizes) - min(sizes) <= m, (count, ranks, sizes)
    from images import texture_batch

    images = texture_batch(range(9))
    whole = model._embed_timed(images)  # one batch of 8 and one of 1, run as micro-batches
    assert torch.equal(whole, torch.cat([model.embed(images[s : s + m]) for s in range(0, 9, m)]))
