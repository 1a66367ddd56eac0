"""The CPU kernels' instruction-set paths: reported, forced with PATCHCORE_CPU_ISA, and in agreement.

Builds nothing: it imports the installed extension and runs every path this CPU supports.
"""

import pytest
import torch

import patchcore_fast
from patchcore_fast.reference import greedy_coreset_reference, knn_reference

from conftest import CPU_PATHS, integer_rows


def test_build_info_names_the_path_of_each_kernel(monkeypatch):
    info = patchcore_fast.build_info()
    assert info["cpu_isa"] == info["cpu_isa_supported"][-1]  # the best this CPU runs, by default
    assert info["cpu_isa_supported"][0] == "generic"
    assert set(info["cpu_isa_supported"]) <= set(info["cpu_isa_compiled"])
    isa = info["cpu_isa"]
    codes = info["cpu_kernels"].pop("knn_pruned_codes")
    assert info["cpu_kernels"] == {"greedy_coreset": isa, "knn": isa, "patch_embedding": isa}
    assert codes in (isa, isa + "+vnni") and info["coded_screen_speedup"] == (
        4.0 if codes.endswith("vnni") else 1.0 if isa == "generic" else 2.0)
    monkeypatch.setenv("PATCHCORE_CPU_VNNI", "0")
    assert patchcore_fast.build_info()["cpu_kernels"]["knn_pruned_codes"] == isa
    monkeypatch.setenv("PATCHCORE_CPU_ISA", "generic")
    info = patchcore_fast.build_info()
    assert info["cpu_kernels"]["knn"] == "generic" and info["coded_screen_speedup"] == 1.0


def test_unknown_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATCHCORE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="PATCHCORE_CPU_ISA=sse9 is not a CPU path; choose one of: auto, generic"):
        patchcore_fast.knn(torch.ones(3, 4), torch.ones(5, 4))


def test_path_the_cpu_lacks_is_a_clear_error(monkeypatch):
    info = patchcore_fast.build_info()
    missing = [p for p in info["cpu_isa_compiled"] if p not in info["cpu_isa_supported"]]
    if not missing:
        pytest.skip("this CPU runs every compiled path")
    monkeypatch.setenv("PATCHCORE_CPU_ISA", missing[0])
    with pytest.raises(ValueError, match="this CPU lacks"):
        patchcore_fast.greedy_coreset(torch.randn(100, 8), 0.1)


def run_every_path(monkeypatch, fn):
    results = {}
    for path in CPU_PATHS:
        monkeypatch.setenv("PATCHCORE_CPU_ISA", path)
        results[path] = fn()
    return results


def test_every_path_picks_the_same_coreset_on_float_data(monkeypatch):
    """The exact distances are summed in one fixed order on every path, so picks agree even on
    data full of near-ties, not only where float32 is exact."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5003, 256, generator=g).abs()
    picks = run_every_path(monkeypatch, lambda: patchcore_fast.greedy_coreset(x, 0.1))
    for path, p in picks.items():
        assert torch.equal(p, picks["generic"]), path


def test_every_path_finds_the_same_neighbours(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(700, 96, generator=g), torch.randn(1500, 96, generator=g)
    out = run_every_path(monkeypatch, lambda: patchcore_fast.knn(q, b, 9))
    rd, ri = knn_reference(q, b, 9)
    for path, (d, i) in out.items():
        # float32 dot products in another order (or fused) differ in the last bits only
        torch.testing.assert_close(d, rd, rtol=1e-5, atol=1e-4)
        assert (i == ri).float().mean() > 0.999, path
    fused = [p for p in out if p != "generic"]  # FMA paths sum each dot product in the same order
    for path in fused:
        assert torch.equal(out[path][0], out[fused[0]][0]) and torch.equal(out[path][1], out[fused[0]][1])


@pytest.mark.parametrize("path", CPU_PATHS)
def test_each_path_against_the_references(monkeypatch, path):
    monkeypatch.setenv("PATCHCORE_CPU_ISA", path)
    g = torch.Generator().manual_seed(2)
    x = integer_rows(2003, 67, g)
    initial = x.norm(dim=1)
    assert torch.equal(patchcore_fast.greedy_coreset(x, n=150, projection_dim=None, initial_distances=initial),
                       greedy_coreset_reference(x, initial, 150))
    d, i = patchcore_fast.knn(x[:300], x[300:], 5)
    rd, ri = knn_reference(x[:300], x[300:], 5)
    assert torch.equal(d, rd) and torch.equal(i, ri)


def _fixed_order_reference(x, w):
    """x @ w.T with element k of each dot product in partial sum k % 16, the partial sums added in
    order and then pairwise (8, 4, 2, 1), every operation a float32 rounding: the order the compiled
    projection promises on every path."""
    pad = -x.shape[1] % 16
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(len(x), -1, 16)
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(len(w), -1, 16)
    acc = torch.zeros(len(x), len(w), 16)
    for block in range(xp.shape[1]):
        acc = acc + xp[:, None, block, :] * wp[None, :, block, :]
    for width in (8, 4, 2, 1):
        acc = torch.cat([acc[..., :width] + acc[..., width : 2 * width], acc[..., 2 * width :]], dim=-1)
    return acc[..., 0]


@pytest.mark.parametrize("rows, dim, out_dim", [(1, 1, 1), (13, 77, 7), (50, 16, 128), (9, 130, 5), (64, 1024, 13)])
def test_the_fixed_order_projection_is_one_order_on_every_path(monkeypatch, rows, dim, out_dim):
    from patchcore_fast._extension import _C

    g = torch.Generator().manual_seed(rows * dim)
    x, w = torch.randn(rows, dim, generator=g), torch.randn(out_dim, dim, generator=g)
    expected = _fixed_order_reference(x, w)
    for path in patchcore_fast.build_info()["cpu_isa_supported"]:
        monkeypatch.setenv("PATCHCORE_CPU_ISA", path)
        assert torch.equal(_C.fixed_order_projection(x, w), expected), path
        assert torch.equal(_C.fixed_order_projection(x[1:], w), expected[1:]), path  # a row alone
