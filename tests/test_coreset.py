"""greedy_coreset against the authors' loop (patchcore_fast.reference), on CPU and CUDA."""

import pytest
import torch

import patchcore_fast
from patchcore_fast.coreset import mean_start_distances, start_rows, seeded_start
from patchcore_fast.reference import greedy_coreset_reference, pairwise_l2

from conftest import DEVICES, clustered_rows, integer_rows, kernel_fixtures

kernel, device, coreset = kernel_fixtures(patchcore_fast.greedy_coreset, patchcore_fast.coreset.CUDA_KERNELS, "coreset")


def start(space, seed=0):
    return mean_start_distances(space, space[start_rows(len(space), 10, torch.Generator().manual_seed(seed))])


def assert_greedy(features, picks, initial):
    """Each pick is (up to float32 rounding) the farthest point from the picks before it,
    judged in float64: catches any skipped or wrong distance update."""
    x = features.double().cpu()
    picks = picks.cpu()
    min_d = initial.double().cpu().clone()
    for step, pick in enumerate(picks.tolist()):
        assert min_d[pick] >= min_d.max() * (1 - 1e-5) - 1e-6, f"step {step}: pick {pick} is not the farthest"
        min_d = torch.minimum(min_d, (x - x[pick]).norm(dim=1))
        min_d[pick] = -1
    assert len(set(picks.tolist())) == len(picks)


@pytest.mark.parametrize("dim", [3, 127, 128, 1024, 1536])
@pytest.mark.parametrize("rows", [1001, 2717])
def test_exact_equals_reference_on_integer_data(device, coreset, rows, dim):
    g = torch.Generator().manual_seed(rows + dim)
    x = integer_rows(rows, dim, g)
    initial = start(x)
    n = max(1, rows // 10)
    ours = coreset(x.to(device), n=n, projection_dim=None, initial_distances=initial.to(device))
    ref = greedy_coreset_reference(x, initial, n)
    assert ours.dtype == torch.int64 and ours.device.type == device.type
    assert torch.equal(ours.cpu(), ref)


def test_clustered_data_and_duplicate_rows_tie_to_lowest_index(device, coreset):
    g = torch.Generator().manual_seed(3)
    base = clustered_rows(600, 64, g)
    x = torch.cat([base, base[:200], base[100:150]])  # duplicates at higher indices
    initial = torch.zeros(len(x))  # every first pick is a tie
    ours = coreset(x.to(device), n=len(x), projection_dim=None, initial_distances=initial.to(device))
    ref = greedy_coreset_reference(x, initial, len(x))
    assert torch.equal(ours.cpu(), ref)
    assert ours[0].item() == 0
    assert sorted(ours.tolist()) == list(range(len(x)))  # n = N selects everything, once


@pytest.mark.parametrize("dim", [127, 1024])
def test_float_data_is_greedy_and_follows_reference(device, coreset, dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3001, dim, generator=g) * 3 + 1
    initial = start(x)
    ours = coreset(x.to(device), n=150, projection_dim=None, initial_distances=initial.to(device))
    assert_greedy(x, ours, initial)
    ref = greedy_coreset_reference(x, initial, 150)
    assert torch.equal(ours[:30].cpu(), ref[:30])


def test_projected_mode_matches_reference_pipeline(device, coreset):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4099, 256, generator=g).abs()  # ReLU-like features
    ours = coreset(x.to(device), 0.05, seed=5)
    space, initial = seeded_start(x, 128, 10, seed=5)
    assert len(ours) == int(4099 * 0.05)
    assert_greedy(space, ours, initial)
    assert torch.equal(ours[:40].cpu(), greedy_coreset_reference(space, initial, 40))


@pytest.mark.parametrize("rows, n", [(3, 3), (5, 2), (64, 64), (700, 1), (700, 31), (700, 33), (1300, 65), (1300, 200)])
def test_batch_and_tile_edges(device, coreset, rows, n):
    """Fewer rows than the candidate list, batches that end mid-panel, one pick, n = N."""
    g = torch.Generator().manual_seed(rows + n)
    x = integer_rows(rows, 21, g)
    initial = start(x)
    ours = coreset(x.to(device), n=n, projection_dim=None, initial_distances=initial.to(device))
    assert torch.equal(ours.cpu(), greedy_coreset_reference(x, initial, n))


def test_seed_repeats_and_varies(device, coreset):
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0)).to(device)
    a = coreset(x, 0.1, seed=1)
    assert torch.equal(a, coreset(x, 0.1, seed=1))
    assert not torch.equal(a, coreset(x, 0.1, seed=2))


def test_initial_distances_continue_an_existing_bank(device, coreset):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1500, 32, generator=g)
    bank = torch.randn(40, 32, generator=g)
    initial = pairwise_l2(x, bank).min(dim=1).values
    ours = coreset(x.to(device), n=60, projection_dim=None, initial_distances=initial.to(device))
    assert ours[0].item() == int(torch.argmax(initial))
    assert_greedy(x, ours, initial)


def test_half_precision_input_is_upcast(device, coreset):
    x = integer_rows(700, 48, torch.Generator().manual_seed(2))
    initial = start(x)
    for dtype in (torch.float16, torch.bfloat16):
        ours = coreset(x.to(device, dtype), n=70, projection_dim=None, initial_distances=initial.to(device))
        assert torch.equal(ours.cpu(), greedy_coreset_reference(x, initial, 70))


def test_any_strides(device, coreset):
    x = integer_rows(900, 80, torch.Generator().manual_seed(4))
    initial = start(x[:, ::2])
    strided = x.to(device)[:, ::2]
    assert not strided.is_contiguous()
    ours = coreset(strided, n=90, projection_dim=None, initial_distances=initial.to(device))
    assert torch.equal(ours.cpu(), greedy_coreset_reference(x[:, ::2].contiguous(), initial, 90))


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a GPU")
@pytest.mark.parametrize("kernel", patchcore_fast.coreset.CUDA_KERNELS)
def test_cpu_and_cuda_agree(kernel):
    x = torch.randn(20000, 1024, generator=torch.Generator().manual_seed(8))
    cpu = patchcore_fast.greedy_coreset(x, 0.1)
    gpu = patchcore_fast.greedy_coreset(x.cuda(), 0.1, cuda_kernel=kernel)
    # The projections come from different BLAS libraries, so a near-tie late in the run may
    # break differently; the start of the selection must coincide.
    assert torch.equal(cpu[:100], gpu[:100].cpu())


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a GPU")
@pytest.mark.parametrize("kernel", patchcore_fast.coreset.CUDA_KERNELS)
@pytest.mark.parametrize("dim", [64, 128, 1024])
def test_cuda_large_inputs_use_every_row_store(kernel, dim):
    """More rows per block than registers and shared memory hold, so rows come from
    registers, shared memory and device memory in one selection."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 1500 * sms + 7
    g = torch.Generator(device="cuda").manual_seed(dim)
    x = torch.randint(-4, 5, (rows, dim), generator=g, device="cuda").float()
    initial = start(x)
    ours = patchcore_fast.greedy_coreset(x, n=200, projection_dim=None, initial_distances=initial, cuda_kernel=kernel)
    assert torch.equal(ours, greedy_coreset_reference(x, initial, 200))


def test_unknown_cuda_kernel_is_refused():
    x = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="cuda_kernel"):
        patchcore_fast._extension._C.greedy_coreset(x, torch.zeros(10), 3, cuda_kernel="fastest")


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a GPU")
def test_resident_stage_profile_keeps_the_picks():
    """The resident kernel's stage clock (benchmarks) changes nothing it selects."""
    x = integer_rows(5000, 128, torch.Generator().manual_seed(4)).cuda()
    initial = start(x)
    picks, cycles = patchcore_fast._extension._C.greedy_coreset_stages(x, initial, 300)
    assert torch.equal(picks, greedy_coreset_reference(x, initial, 300))
    assert cycles.shape[1] == 6 and bool((cycles.sum(dim=1) > 0).all())


def test_a_subset_selects_the_same_in_the_whole_sets_selection_space():
    """The cross-fitted threshold's folds reuse the fit's projection (patchcore_fast.coreset.selection_space)."""
    from patchcore_fast.coreset import selection_space

    x = torch.randn(3001, 77, generator=torch.Generator().manual_seed(5)).abs()
    subset = torch.randperm(3001, generator=torch.Generator().manual_seed(6))[:1999].sort().values
    for projection_dim in (16, None, 77):
        space = selection_space(x, projection_dim, seed=4)
        expected = patchcore_fast.greedy_coreset(x[subset], 0.1, projection_dim=projection_dim, seed=4)
        assert torch.equal(patchcore_fast.greedy_coreset(x[subset], 0.1, projection_dim=projection_dim, seed=4, space=space[subset]),
                           expected)
    with pytest.raises(ValueError, match="selection space"):
        patchcore_fast.greedy_coreset(x, 0.1, projection_dim=16, space=torch.zeros(3001, 17))
    with pytest.raises(ValueError, match="selection space"):
        patchcore_fast.greedy_coreset(x, 0.1, projection_dim=16, space=torch.zeros(3000, 16))


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a GPU")
def test_gpu_shard_pass_offers_what_the_cpu_shard_offers():
    """distributed.GpuShard on a real GPU (coreset_shard_cuda.cu) against _C.CoresetShard: the
    same minima to the bit and the same offers, round after round (the CPU emulation checks the
    same without a GPU: tests/test_cuda_kernels_on_cpu.py)."""
    from patchcore_fast import _C, distributed

    g = torch.Generator().manual_seed(11)
    space = torch.randn(20_011, 131, generator=g)
    space[1::13] = space[0]
    initial = torch.full((len(space),), 1e4)
    cpu, gpu = _C.CoresetShard(space, initial), distributed.GpuShard(space, initial, torch.device("cuda"))
    for _ in range(4):
        centres = space[torch.randperm(len(space), generator=g)[:96]].contiguous()
        (v_cpu, i_cpu), (v_gpu, i_gpu) = cpu.pass_(centres), gpu.pass_(centres)
        assert torch.equal(i_gpu, i_cpu) and torch.equal(v_gpu, v_cpu)
        assert torch.equal(gpu.min_distance.cpu(), cpu.min_distance)
        cpu.pin(i_cpu[:5])
        gpu.pin(i_cpu[:5])
