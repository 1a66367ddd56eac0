"""PrunedIndex (pruned exact search) against knn: the same floats and indices on every CPU path,
on awkward sizes and adversarial data, and a build-time decision that refuses random data."""

import math

import pytest
import torch

import patchcore_fast
from patchcore_fast import knn
from patchcore_fast._extension import _C, compiled
from patchcore_fast.index import PrunedIndex

from conftest import CPU_PATHS, clustered_rows, integer_rows, use_kernel

needs_kernels = pytest.mark.skipif(not compiled(torch.device("cpu")), reason="the C++ extension is not built")


@pytest.fixture(params=[f"cpu:{p}" for p in CPU_PATHS])
def cpu_path(request, monkeypatch):
    return use_kernel(request.param, monkeypatch)


def pruned(queries, bank, k, index):
    """The kernel itself (no build-time decision): (distances, indices, share of brute force computed)."""
    d, i, computed, _ = _C.knn_pruned(queries, bank, k, index.basis, index.bank_screen, index.basis_rounding,
                                      index.bank_extension)
    return d, i, computed / (len(queries) * len(bank))


def assert_same_as_knn(queries, bank, k, index=None, rank=None):
    """The pruned kernel's answers are knn's, with the index given or built at `rank`, and (when
    rank >= 2) also as a cascade whose first screen has half the directions."""
    indexes = [index or PrunedIndex.build(bank, rank=rank)]
    if index is None and rank >= 2:
        indexes.append(PrunedIndex.build(bank, rank=rank, first_rank=rank // 2))
    kd, ki = knn(queries, bank, k)
    shares = []
    for index in indexes:
        d, i, share = pruned(queries, bank, k, index)
        kind = "cascade" if index.bank_extension is not None else "single screen"
        assert torch.equal(i, ki), f"{kind}: indices differ in {(i != ki).any(1).sum()} queries"
        assert torch.equal(d.view(torch.int32), kd.view(torch.int32)), kind  # bit for bit, signed zeros too
        shares.append(share)
    return shares[0]


def low_rank_rows(rows, dim, rank, generator, noise=0.05, scale=10.0):
    """Rows near a `rank`-dimensional subspace, like patch features: pruning has something to prune."""
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0].T
    centres = torch.randn(40, rank, generator=generator, dtype=torch.float64) * scale
    labels = torch.randint(0, 40, (rows,), generator=generator)
    coords = centres[labels] + torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    return (coords @ basis + noise * torch.randn(rows, dim, generator=generator, dtype=torch.float64)).float()


@needs_kernels
@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("queries,rows,dim", [(1, 1, 5), (37, 101, 20), (333, 1283, 130), (70, 9, 64)])
def test_integer_data_bit_identical_to_knn(cpu_path, queries, rows, dim, k):
    g = torch.Generator().manual_seed(queries * 7 + rows + k)
    bank = integer_rows(rows, dim, g, -2, 3)  # many exact ties
    q = integer_rows(queries, dim, g, -2, 3)
    assert_same_as_knn(q, bank, min(k, rows), rank=max(1, min(8, dim - 1)))


@needs_kernels
@pytest.mark.parametrize("k", [1, 9])
def test_float_data_identical_to_knn_and_to_float64_up_to_near_ties(cpu_path, k):
    g = torch.Generator().manual_seed(5)
    bank = low_rank_rows(3001, 257, 12, g)
    q = low_rank_rows(1111, 257, 12, g)
    share = assert_same_as_knn(q, bank, k, rank=16)
    assert share < 0.5  # structured data: most of the bank is never computed
    exact = torch.cdist(q.double(), bank.double()).square()
    _, i = pruned(q, bank, k, PrunedIndex.build(bank, rank=16))[:2]
    top = exact.topk(k, largest=False)
    differ = (i != top.indices).any(1)
    # where the indices differ, the float64 distances lie within float32 rounding of each other
    for row in differ.nonzero().flatten().tolist():
        ours = exact[row, i[row]]
        assert torch.allclose(ours, top.values[row], rtol=1e-5, atol=1e-3)


@needs_kernels
def test_duplicates_and_near_ties(cpu_path):
    g = torch.Generator().manual_seed(2)
    base = low_rank_rows(200, 96, 6, g)
    ulp = torch.nextafter(base, torch.full_like(base, math.inf)) - base
    bank = torch.cat([base, base, base + ulp, base.flip(0), base - ulp])  # duplicates and one-ulp neighbours
    q = torch.cat([base[:64], base[:64] + ulp[:64], low_rank_rows(50, 96, 6, g)])
    for k in (1, 2, 5):
        assert_same_as_knn(q, bank, k, rank=8)


@needs_kernels
def test_rows_that_differ_only_outside_the_screened_directions(cpu_path):
    g = torch.Generator().manual_seed(3)
    dim, rank = 64, 4
    bank = low_rank_rows(600, dim, rank, g, noise=0.0)
    index = PrunedIndex.build(bank, rank=rank)  # the subspace holds everything: residuals ~0
    outside = torch.randn(dim, generator=g)
    outside -= index.basis.T.double().float() @ (index.basis @ outside)
    outside /= outside.norm()
    # queries: bank rows pushed off the subspace by different amounts, so the residual term decides
    q = bank[:300] + torch.linspace(0.01, 3, 300)[:, None] * outside
    twins = bank[:300] + 0.5 * outside  # same projections as bank[:300], different residuals
    bank2 = torch.cat([bank, twins])
    assert_same_as_knn(q, bank2, 1, rank=rank)
    assert_same_as_knn(q, bank2, 4, rank=rank)


@needs_kernels
@pytest.mark.parametrize("scale", [1e-19, 1e-6, 1.0, 1e6])
def test_huge_and_tiny_norms(cpu_path, scale):
    g = torch.Generator().manual_seed(4)
    dim = 48
    limit = math.sqrt(torch.finfo(torch.float32).max / (4 * dim))  # knn's overflow limit
    bank = low_rank_rows(700, dim, 5, g)
    q = low_rank_rows(200, dim, 5, g)
    largest = max(bank.abs().max(), q.abs().max())
    factor = min(scale, 0.5 * limit / float(largest))
    bank, q = bank * factor, q * factor
    mixed = torch.cat([bank[:350], bank[350:] * 1e-3])  # norms over many orders of magnitude in one bank
    for b in (bank, mixed):
        assert_same_as_knn(q, b, 1, rank=6)
        assert_same_as_knn(q, b, 3, rank=6)


@needs_kernels
def test_bank_larger_than_one_screened_chunk():
    g = torch.Generator().manual_seed(6)
    bank = integer_rows(40_000, 6, g, -3, 4)  # > 2^15 rows: two chunks of the screen
    q = integer_rows(97, 6, g, -3, 4)
    assert_same_as_knn(q, bank, 1, rank=2)
    assert_same_as_knn(q, bank, 9, rank=2)


@needs_kernels
def test_decides_against_pruning_random_data_and_for_structured_data():
    g = torch.Generator().manual_seed(7)
    gaussian = torch.randn(3000, 512, generator=g)
    index = PrunedIndex.build(gaussian, torch.randn(500, 512, generator=g))
    assert not index.pays and index.probe_share > 0.5
    structured = low_rank_rows(3000, 512, 16, g)
    index = PrunedIndex.build(structured, low_rank_rows(500, 512, 16, g))
    assert index.pays and index.probe_share < 0.2
    # the search follows the decision and returns knn's results either way
    q = low_rank_rows(100, 512, 16, g)
    for decision in (None, False, True):
        d, i = index.search(q, 2, prune=decision)
        kd, ki = knn(q, structured, 2)
        assert torch.equal(d, kd) and torch.equal(i, ki)


def test_bad_input_is_refused_clearly():
    g = torch.Generator().manual_seed(8)
    bank = torch.randn(50, 16, generator=g)
    index = PrunedIndex.build(bank, rank=4)
    with pytest.raises(ValueError, match="built for a \\[50, 16\\] bank"):
        PrunedIndex.restore(torch.randn(51, 16), *index.state())
    with pytest.raises(ValueError, match="another memory bank"):
        PrunedIndex.restore(torch.randn(50, 16, generator=g), *index.state())
    assert torch.equal(PrunedIndex.restore(bank, *index.state()).bank_screen, index.bank_screen)
    with pytest.raises(ValueError, match="dim"):
        index.search(torch.randn(3, 15))
    with pytest.raises(ValueError, match="k must be in"):
        index.search(torch.randn(3, 16), 51)
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.full((3, 16), math.nan))
    with pytest.raises(ValueError, match="rank must be in"):
        PrunedIndex.build(bank, rank=17)
    with pytest.raises(ValueError, match="overflow"):
        index.search(torch.full((3, 16), 1e37), prune=True)
    with pytest.raises(ValueError, match="first_rank must be in"):
        PrunedIndex.build(bank, rank=4, first_rank=4)
    with pytest.raises(ValueError, match="first_rank needs rank"):
        PrunedIndex.build(bank, first_rank=2)
    cascade = PrunedIndex.build(bank, rank=6, first_rank=2)
    tensors, meta = cascade.state()
    restored = PrunedIndex.restore(bank, tensors, meta)
    assert torch.equal(restored.bank_extension, cascade.bank_extension) and restored.first_rank == 2
    broken = dict(tensors, search_bank_extension=tensors["search_bank_extension"].clone())
    broken["search_bank_extension"][7, -1] += 1.0  # no longer undoes the first screen's residual bound
    with pytest.raises(ValueError, match="cascade does not match"):
        PrunedIndex.restore(bank, broken, meta)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        PrunedIndex.restore(bank, {k: v for k, v in tensors.items() if k != "search_bank_extension"}, meta)
    if compiled(torch.device("cpu")):
        with pytest.raises(ValueError, match="bank_screen"):
            _C.knn_pruned(torch.randn(3, 16), bank, 1, index.basis, index.bank_screen[:, :-1], 0.0)
        with pytest.raises(ValueError, match="bank_extension"):
            _C.knn_pruned(torch.randn(3, 16), bank, 1, cascade.basis, cascade.bank_screen, 0.0,
                          cascade.bank_extension[:, 1:])


@needs_kernels
def test_cascade_screens_again_only_what_its_first_stage_keeps():
    g = torch.Generator().manual_seed(12)
    # 4 strong directions and 28 weaker ones: rank 4 alone leaves many rows, rank 32 few
    scales = torch.cat([torch.full((4,), 20.0), torch.full((28,), 4.0)])
    basis = torch.linalg.qr(torch.randn(128, 32, generator=g, dtype=torch.float64))[0].T
    rows = lambda n: ((torch.randn(n, 32, generator=g, dtype=torch.float64) * scales) @ basis).float()
    bank, q = rows(4000), rows(600)
    cascade = PrunedIndex.build(bank, rank=32, first_rank=4)
    single = PrunedIndex.build(bank, rank=32)
    first_only = PrunedIndex.build(bank, rank=4)
    assert_same_as_knn(q, bank, 3, index=cascade)
    *_, computed, extended = _C.knn_pruned(q, bank, 3, cascade.basis, cascade.bank_screen, cascade.basis_rounding,
                                           cascade.bank_extension)
    pairs = len(q) * len(bank)
    # the extension sees exactly what a rank-4 screen would compute; the exact rows are about the rank-32 screen's
    assert 0 < extended / pairs <= first_only.measure(q, k=3) + 0.02
    assert computed / pairs < 0.5 * (extended / pairs)
    assert computed / pairs <= single.measure(q, k=3) * 1.5 + 0.01
    assert cascade.measure(q, k=3) == computed / pairs
    assert cascade.probe_cost < first_only.probe_cost  # screening further is cheaper than computing what rank 4 leaves


@needs_kernels
def test_build_chooses_the_single_screen_of_least_measured_cost_then_weighs_its_cascade():
    from patchcore_fast.index.pruned import RANK_CHOICES, _judged

    g = torch.Generator().manual_seed(13)
    bank = low_rank_rows(3000, 512, 16, g)
    probes = low_rank_rows(512, 512, 16, g)  # RANK_PROBES: the build measures all of them
    index = PrunedIndex.build(bank, probes)
    ranks = [r for r in RANK_CHOICES if r <= 256]
    singles = [PrunedIndex.build(bank, rank=r) for r in ranks]
    for c in singles:
        c.measure(probes)
    chosen = min(singles, key=lambda c: c.probe_cost)
    # the one cascade weighed: the chosen screen first, then up to twice its directions
    wider = min(256, next(r for r in ranks + [256] if r >= 2 * chosen.rank))
    cascade = PrunedIndex.build(bank, rank=wider, first_rank=chosen.rank)
    cascade.measure(probes)
    expected = cascade if _judged(cascade) < _judged(chosen) else chosen
    assert index.pays
    assert (index.rank, index.first_rank) == (expected.rank, expected.first_rank)
    assert index.probe_cost == pytest.approx(expected.probe_cost)
    assert_same_as_knn(probes[:100], bank, 3, index=index)


@needs_kernels
def test_progress_is_reported():
    g = torch.Generator().manual_seed(9)
    bank = low_rank_rows(2000, 64, 6, g)
    q = low_rank_rows(5000, 64, 6, g)
    seen = []
    index = PrunedIndex.build(bank, rank=4)
    index.search(q, 1, prune=True, progress=seen.append)
    assert seen and all(0 < s <= len(q) for s in seen)


def mirror_ties(queries, pairs, dim, inside, generator):
    """Queries and a bank holding, for each query, `pairs` mirror pairs q + v, q - v (equal distances
    in exact arithmetic, float32 noise in knn's) and nothing outside the first `inside` coordinates:
    there the screen's bound equals the distance but for rounding, so only its margin keeps the
    rows it must keep."""
    q = torch.zeros(queries, dim)
    q[:, :inside] = torch.randn(queries, inside, generator=generator) * 30
    v = torch.zeros(queries, pairs, dim)
    v[:, :, :inside] = torch.randn(queries, pairs, inside, generator=generator)
    v *= torch.linspace(1.0, 1.001, pairs)[None, :, None] / v.norm(dim=2, keepdim=True)  # near-equal lengths
    bank = torch.cat([q[:, None] + v, q[:, None] - v], dim=1).reshape(-1, dim)
    return q, bank


@needs_kernels
@pytest.mark.parametrize("k", [1, 4])
def test_bound_equal_to_the_distance_keeps_rounding_ties(cpu_path, k):
    g = torch.Generator().manual_seed(10)
    q, bank = mirror_ties(300, 6, 64, 8, g)
    assert_same_as_knn(q, bank, k, rank=8)


# --- in the model: built at fit time, saved and loaded with it, same scores as brute force -----
@pytest.fixture(scope="module")
def lite0():
    from patchcore_fast.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


@needs_kernels
def test_model_builds_saves_and_uses_the_index_with_knn_results(lite0, tmp_path):
    from patchcore_fast import PatchCore

    g = torch.Generator().manual_seed(11)
    train = low_rank_rows(60 * 64, 1024, 12, g).reshape(60, 64, 1024)
    test = low_rank_rows(5 * 64, 1024, 12, g).reshape(5, 64, 1024)
    pruned_model = PatchCore(backbone=lite0, device="cpu", image_size=64, resize=64, progress=False)
    pruned_model.fit_features(train)
    plain = pruned_model.with_settings(pruned_search=False).fit_features(train)
    assert isinstance(pruned_model.bank.index, PrunedIndex) and pruned_model.bank.index.pays
    assert type(plain.bank.index).__name__ == "FlatIndex" and "index" in pruned_model.timings
    a, b = pruned_model.score(test), plain.score(test)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    path = tmp_path / "pruned.pcf"
    pruned_model.save(path)
    loaded = PatchCore.load(path, device="cpu", progress=False)
    index, original = loaded.bank.index, pruned_model.bank.index
    assert isinstance(index, PrunedIndex) and index.pays == original.pays and index.probe_share == original.probe_share
    assert torch.equal(index.bank_screen, original.bank_screen) and torch.equal(index.basis, original.basis)
    c = loaded.score(test)
    assert torch.equal(c.scores, a.scores) and torch.equal(c.maps, a.maps)


# --- the first screen in 8-bit codes (csrc/cpu/isa/code_tile.h, search_bound.h step 5) ---------
@needs_kernels
def test_coded_screen_is_the_same_with_and_without_vnni(monkeypatch):
    """AVX512_VNNI and the two-instruction form compute the same integers, so the same screen
    values: the same rows computed, not only the same answers."""
    if "avx512" not in patchcore_fast.build_info()["cpu_isa_supported"]:
        pytest.skip("this CPU has no AVX-512 path")
    monkeypatch.setenv("PATCHCORE_CPU_ISA", "avx512")
    g = torch.Generator().manual_seed(21)
    bank, q = low_rank_rows(3000, 200, 24, g), low_rank_rows(700, 200, 24, g)
    for first_rank in (None, 7):  # a single screen; a cascade whose codes need padding (7 -> 8)
        index = PrunedIndex.build(bank, rank=24, first_rank=first_rank)
        args = (q, bank, 3, index.basis, index.bank_screen, index.basis_rounding, index.bank_extension)
        with_vnni = _C.knn_pruned(*args)
        monkeypatch.setenv("PATCHCORE_CPU_VNNI", "0")
        without = _C.knn_pruned(*args)
        monkeypatch.delenv("PATCHCORE_CPU_VNNI")
        assert torch.equal(with_vnni[0], without[0]) and torch.equal(with_vnni[1], without[1])
        assert with_vnni[2:] == without[2:]
        kd, ki = knn(q, bank, 3)
        assert torch.equal(with_vnni[1], ki) and torch.equal(with_vnni[0], kd)


@needs_kernels
def test_coded_screen_keeps_what_its_code_errors_could_hide(cpu_path):
    """Rows whose projections are large in one coordinate and small elsewhere: their 8-bit codes
    lose the small coordinates entirely (the code error is most of their small part), so a screen
    that ignored its code errors would rule out nearest rows; ours returns knn's answers."""
    g = torch.Generator().manual_seed(22)
    dim = 48
    base = torch.zeros(600, dim)
    base[:, 0] = 1000.0  # one dominant coordinate sets every row's scale
    base[:, 1:16] = torch.randn(600, 15, generator=g) * 3.0  # below one code step (1000 / 127)
    bank = base + torch.randn(600, dim, generator=g) * 0.01
    q = base[torch.randint(0, 600, (300,), generator=g)] + torch.randn(300, dim, generator=g) * 0.5
    assert_same_as_knn(q, bank, 2, rank=16)


@needs_kernels
def test_first_screen_over_2048_directions_is_refused():
    bank = torch.randn(50, 2100)
    index = PrunedIndex.build(bank, rank=2049)
    with pytest.raises(ValueError, match="first screen has 2049 directions; at most 2048"):
        index.search(bank[:3], 1, prune=True)
