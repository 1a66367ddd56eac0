"""The CUDA kernels' own source, run on the CPU through a small CUDA shim
(tests/cuda_on_cpu): blocks are processes, threads are threads, barriers and warp shuffles
are real barriers. It checks the kernels' logic against the references on machines without
a GPU: for the coreset, indexing, the register / shared-memory / device-memory row stores,
the queue and its deferral, the barrier and the winner's slot; for knn, both warp layouts,
the fused top-k lists and the merge of bank chunks. Speed and the GPU memory model are not
modelled; the GPU tests cover those where a GPU exists."""

import shutil

import pytest
import torch

from conftest import integer_rows
from cuda_on_cpu import emulator
from patchcore_fast.coreset import mean_start_distances, start_rows
from patchcore_fast.reference import greedy_coreset_reference, knn_reference

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

KIB = 1024


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return emulator.build(tmp_path_factory.mktemp("cuda_on_cpu"))


def start(x):
    return mean_start_distances(x, x[start_rows(len(x), 10, torch.Generator().manual_seed(0))])


def float_rows(rows, dim, seed):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * 3 + 1


# (kernel, rows, dim, data, blocks, shared memory): each case sends rows through a different store.
CASES = [
    # 1,500 rows per block: 512 in registers, some in shared memory, the rest from device memory.
    ("resident", 3000, 128, "integer", 2, 64 * KIB),
    ("cached", 3000, 128, "integer", 2, 64 * KIB),
    ("resident", 3000, 128, "float", 2, 64 * KIB),
    # 64-wide rows (8 vectors in registers), everything on chip.
    ("resident", 2500, 3, "integer", 2, 227 * KIB),
    # Wide rows: 8 lanes per row, mostly from device memory; float4 exact path.
    ("resident", 1500, 1024, "float", 2, 64 * KIB),
    # 127 values: padded rows and the scalar exact path, three blocks.
    ("resident", 2000, 127, "float", 3, 50 * KIB),
    # Few distinct values: ties, and queued rows that could be a block's best (settled before arriving).
    ("resident", 2000, 16, "ternary", 2, 227 * KIB),
]


@pytest.mark.parametrize("kernel,rows,dim,data,blocks,smem", CASES)
def test_emulated_kernel_equals_reference(harness, kernel, rows, dim, data, blocks, smem):
    if data == "integer":
        x = integer_rows(rows, dim, torch.Generator().manual_seed(rows + dim))
    elif data == "ternary":
        x = integer_rows(rows, dim, torch.Generator().manual_seed(rows + dim), low=-1, high=2)
    else:
        x = float_rows(rows, dim, rows + dim)
    initial = start(x)
    n = 40
    picks, _ = emulator.run(harness, kernel, x, initial, n, blocks, smem)
    assert torch.equal(picks, greedy_coreset_reference(x, initial, n))


def test_emulated_stage_clock_keeps_the_picks(harness):
    x = integer_rows(1200, 64, torch.Generator().manual_seed(9))
    initial = start(x)
    picks, cycles = emulator.run(harness, "resident-stages", x, initial, 30, 2, 227 * KIB)
    assert torch.equal(picks, greedy_coreset_reference(x, initial, 30))
    cycles = cycles.view(2, 6)
    assert bool((cycles.sum(dim=1) > 0).all())


def test_emulated_kernel_refuses_rows_beyond_shared_memory(harness):
    x = integer_rows(4000, 8, torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="exceed the GPU coreset kernel's shared memory"):
        emulator.run(harness, "resident", x, start(x), 5, 1, 16 * KIB)


@pytest.mark.parametrize("warp_rows", [2, 4])
@pytest.mark.parametrize("k,splits", [(1, 1), (9, 2)])
def test_emulated_knn_equals_reference(harness, warp_rows, k, splits):
    g = torch.Generator().manual_seed(k * 10 + warp_rows)
    queries = integer_rows(150, 37, g, -2, 3)  # two query blocks, the second partly empty
    bank = integer_rows(300, 37, g, -2, 3)  # three bank tiles, many exact ties
    distances, indices = emulator.run_knn(harness, queries, bank, k, splits, warp_rows)
    ref_distances, ref_indices = knn_reference(queries, bank, k)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(distances, ref_distances)


@pytest.mark.parametrize("kernel", ["cached", "resident"])
def test_emulated_negative_zero_start_ranks_as_zero(harness, kernel):
    """Bug 1 of the model-state review: a -0.0 start distance (a row already in the bank) packed
    with its sign bit outranked every real distance, so the CUDA picks left the reference's."""
    x = integer_rows(2500, 3, torch.Generator().manual_seed(2500 + 3))
    initial = start(x)
    initial[::5] = -0.0
    picks, _ = emulator.run(harness, kernel, x, initial, 40, 2, 227 * KIB)
    assert torch.equal(picks, greedy_coreset_reference(x, initial.abs(), 40))


@pytest.mark.parametrize("shapes,dim", [
    ([(2, 40, 6, 5), (2, 112, 3, 3)], 64),        # Lite0-like channels, fewer than 9 C bins
    ([(1, 13, 4, 7), (1, 29, 2, 4), (1, 7, 1, 2)], 37),  # three layers, columns straddling layers
    ([(1, 5, 3, 3), (1, 6, 5, 4)], 1024),          # a deeper layer on a finer grid, bins repeated
])
def test_emulated_embedding_equals_the_authors_order(harness, shapes, dim):
    from patchcore_fast.embedding import embedding_error_bound
    from patchcore_fast.reference.embedding import reference_patch_embedding
    g = torch.Generator().manual_seed(dim)
    maps = [torch.randn(*s, generator=g) for s in shapes]
    ours = emulator.run_embedding(harness, maps, dim)
    ref, _ = reference_patch_embedding(maps, dim)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= embedding_error_bound(maps, dim)


# (rows, dim, centres per round): 16-wide blocks with and without a tail, one-float rows, wide rows
# whose centres pass through shared memory in chunks, and a shard smaller than one offer.
SHARD_CASES = [(700, 128, 37), (403, 37, 96), (300, 3, 64), (211, 1024, 11), (50, 20, 9)]


@pytest.mark.parametrize("rows,dim,count", SHARD_CASES)
def test_emulated_shard_pass_offers_what_a_cpu_shard_offers(harness, rows, dim, count):
    """Rounds of the distributed coreset's GPU pass (coreset_shard_cuda.cu) against the CPU shard
    (_C.CoresetShard): the same minima to the bit, so the same rows offered in the same order,
    equal minima by index and picked rows (-1) included; picks then cannot depend on placement."""
    from patchcore_fast import _C

    g = torch.Generator().manual_seed(rows + dim)
    space = torch.randn(rows, dim, generator=g) * 3 + 1
    space[1::7] = space[0]  # equal rows: ties between minima, broken by index
    minima = start(space)
    cpu = _C.CoresetShard(space.contiguous(), minima.clone())
    for _ in range(3):
        centres = space[torch.randperm(rows, generator=g)[:count]].contiguous()
        values, local = cpu.pass_(centres)
        emulated, offered_values, offered = emulator.run_shard_pass(harness, space, minima, centres, _C.coreset_offered)
        assert torch.equal(offered, local) and torch.equal(offered_values, values)
        assert torch.equal(emulated, cpu.min_distance)
        expected = torch.minimum(minima.double(), torch.cdist(space.double(), centres.double()).min(dim=1).values)
        kept = minima >= 0
        assert torch.allclose(emulated[kept].double(), expected[kept], rtol=1e-5, atol=1e-5)
        assert (emulated[~kept] == -1).all()
        picked = local[: min(3, len(local))]
        cpu.pin(picked)
        minima = emulated.clone()
        minima[picked] = -1.0


def test_distributed_coreset_with_emulated_gpu_shards_picks_what_one_process_picks(harness, tmp_path, monkeypatch):
    """The GPU path of distributed.greedy_coreset (GpuShard: minima on the device, the pass as
    coreset_shard_cuda.cu, offers back to the host) with the kernel emulated, in a one-rank
    process group: the picks of the single-process CPU coreset."""
    import types

    import torch.distributed as dist

    import patchcore_fast
    from patchcore_fast import _C, distributed

    def emulated_pass(space, min_distance, centres):
        minima, values, local = emulator.run_shard_pass(harness, space, min_distance, centres, _C.coreset_offered)
        min_distance.copy_(minima)  # in place, as the CUDA op updates it
        return values, local

    cpu = torch.device("cpu")
    proxy = types.SimpleNamespace(CoresetShard=lambda space, initial: distributed.GpuShard(space, initial, cpu),
                                  coreset_shard_pass_cuda=emulated_pass, coreset_pick_batch=_C.coreset_pick_batch,
                                  coreset_offered=_C.coreset_offered)
    monkeypatch.setattr(distributed, "_C", proxy)
    x = float_rows(1500, 64, 3)
    x[1::9] = x[0]  # ties
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stats = distributed.RoundStats()
        picks = distributed.greedy_coreset(x, 0.1, projection_dim=32, rounds=stats)
    finally:
        dist.destroy_process_group()
    assert torch.equal(picks, patchcore_fast.greedy_coreset(x, 0.1, projection_dim=32))
    assert stats.rounds >= 2  # several rounds, each a pass of the emulated kernel
