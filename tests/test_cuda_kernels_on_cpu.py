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
