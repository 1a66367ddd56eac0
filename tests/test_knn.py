"""knn against float32 brute force (patchcore_fast.reference), on CPU and CUDA."""

import os
import subprocess
import sys

import pytest
import torch

import patchcore_fast
from patchcore_fast.knn import CUDA_KERNELS
from patchcore_fast.reference import knn_reference

from conftest import DEVICES, clustered_rows, integer_rows, kernel_fixtures

kernel, device, search = kernel_fixtures(patchcore_fast.knn, CUDA_KERNELS, "search")


@pytest.mark.parametrize("k", [1, 2, 9, 16])
@pytest.mark.parametrize("dim", [3, 127, 128, 1024, 1536])
def test_equals_reference_on_integer_data(device, search, dim, k):
    g = torch.Generator().manual_seed(dim * 100 + k)
    queries = integer_rows(331, dim, g, -2, 3)
    bank = integer_rows(1283, dim, g, -2, 3)  # many exact ties
    d, i = search(queries.to(device), bank.to(device), k)
    rd, ri = knn_reference(queries, bank, k)
    assert d.shape == (331, k) and i.dtype == torch.int64
    assert torch.equal(d.cpu(), rd)
    assert torch.equal(i.cpu(), ri)


def test_duplicate_bank_rows_tie_to_lower_index(device, search):
    g = torch.Generator().manual_seed(1)
    base = clustered_rows(300, 24, g)
    bank = torch.cat([base, base, base.flip(0)])
    queries = torch.cat([base[:50], clustered_rows(77, 24, g)])
    d, i = search(queries.to(device), bank.to(device), 3)
    rd, ri = knn_reference(queries, bank, 3)
    assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)
    assert torch.equal(i[:50, 0].cpu(), torch.arange(50))


@pytest.mark.parametrize("k", [1, 9])
def test_float_data_matches_float64_brute_force(device, search, k):
    g = torch.Generator().manual_seed(k)
    queries = torch.randn(777, 200, generator=g).abs()
    bank = torch.randn(2049, 200, generator=g).abs()
    d, i = search(queries.to(device), bank.to(device), k)
    exact = torch.cdist(queries.double(), bank.double()).pow(2)
    ed, ei = torch.sort(exact, dim=1, stable=True)
    scale = (queries.double().norm(dim=1, keepdim=True) ** 2 + bank.double().norm(dim=1).max() ** 2)
    assert ((d.cpu().double() - ed[:, :k]).abs() <= 1e-5 * scale).all()
    # Indices must match wherever the float64 gap to the next neighbour exceeds float32 noise.
    gap = (ed[:, 1 : k + 1] - ed[:, :k]) > 1e-4 * scale
    assert torch.equal(i.cpu()[gap], ei[:, :k][gap])


def test_k_equals_bank_size_and_single_rows(device, search):
    bank = integer_rows(5, 7, torch.Generator().manual_seed(0))
    d, i = search(bank[:1].to(device), bank.to(device), 5)
    rd, ri = knn_reference(bank[:1], bank, 5)
    assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)


def test_more_neighbours_than_the_cuda_lists_hold(device, search):
    g = torch.Generator().manual_seed(2)
    queries, bank = integer_rows(100, 16, g), integer_rows(500, 16, g)
    d, i = search(queries.to(device), bank.to(device), 40)
    rd, ri = knn_reference(queries, bank, 40)
    assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)


@pytest.mark.parametrize("queries", [1, 5, 13, 97])
@pytest.mark.parametrize("bank", [1, 7, 31, 33, 65])
def test_sizes_around_the_tile_shapes(device, search, queries, bank):
    """Query and bank counts below, at and past the register tiles (4-12 queries x 8-32 bank rows)."""
    g = torch.Generator().manual_seed(queries * 100 + bank)
    q, b = integer_rows(queries, 19, g), integer_rows(bank, 19, g)
    k = min(3, bank)
    d, i = search(q.to(device), b.to(device), k)
    rd, ri = knn_reference(q, b, k)
    assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)


def test_reference_chunks_give_the_same_answer():
    g = torch.Generator().manual_seed(3)
    queries, bank = integer_rows(1000, 33, g), integer_rows(5000, 33, g)
    full = knn_reference(queries, bank, 4)
    tiny = knn_reference(queries, bank, 4, chunk_elems=999)
    assert torch.equal(full[0], tiny[0]) and torch.equal(full[1], tiny[1])


def test_half_precision_and_strided_inputs(device, search):
    g = torch.Generator().manual_seed(4)
    queries, bank = integer_rows(200, 64, g), integer_rows(300, 64, g)
    rd, ri = knn_reference(queries[:, ::2].contiguous(), bank[:, ::2].contiguous(), 2)
    for dtype in (torch.float16, torch.bfloat16):
        d, i = search(queries.to(device, dtype)[:, ::2], bank.to(device, dtype)[:, ::2], 2)
        assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)


MEMORY_PROBE = """
import resource, torch, patchcore_fast
q = torch.randn(20000, 8); b = torch.randn(20000, 8)
patchcore_fast.knn(q[:10], b[:10], 1)  # load everything once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
patchcore_fast.knn(q, b, 1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_cpu_memory_stays_bounded():
    # A full 20000 x 20000 float32 distance matrix would take 1.6 GB; the kernel holds register tiles.
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    grown_kib = int(out.stdout.strip().splitlines()[-1])
    assert grown_kib < 200 * 1024, f"peak memory grew by {grown_kib} KiB"


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a GPU")
def test_cuda_memory_stays_small():
    q = torch.randn(20000, 64, device="cuda")
    b = torch.randn(20000, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    patchcore_fast.knn(q, b, 4)
    assert torch.cuda.max_memory_allocated() - base < 20 * 1024 * 1024
