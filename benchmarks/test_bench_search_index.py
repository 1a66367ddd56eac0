"""Pruned exact search (PrunedIndex) against brute force on real and random features, on the CPU.

Tire (MVTec 3D-AD RGB, EfficientNet-Lite0, centre crop): bank = the 10 % coreset of the
164,640 training patches (16,464 x 1024), queries = all 87,808 test patches. The demo's textures
(brick, grass, gravel) generated at 320 training images: bank = 10 % of 250,880 patches
(25,088 x 1024), queries = all their test patches (70 images). Baselines in the
same run: our brute-force `knn` on each CPU path and faiss-cpu IndexFlatL2. Every pruned run
is checked against `knn` (identical floats and indices) before its time counts. Gaussian: the
same shapes of i.i.d. N(0, 1) data, where the index decides not to prune.
"""

import functools
import os

import pytest
import torch

import patchcore_fast
from baselines import faiss_flat_l2, flat_index
from conftest import CPU_PATHS
from real_features import texture_features, tire_features, tire_test_features

from patchcore_fast.index import PrunedIndex
from patchcore_fast.index.pruned import PROBES, left_out_probes

TEXTURES = ("brick", "grass", "gravel")

ROUNDS = 3


def bank_queries_probes(train, test):
    """(bank, queries, probes): probes are training patches the coreset left out, as at fit time."""
    picks = patchcore_fast.greedy_coreset(train, 0.1)
    return train[picks].contiguous(), test, left_out_probes(train, picks, 0)


@pytest.fixture(scope="module")
def tire():
    train, test = tire_features(), tire_test_features()
    if train is None or test is None:
        pytest.skip("tire images not found (../shared/data)")
    return bank_queries_probes(train, test)


@functools.cache
def texture(category):
    """(bank, queries, probes, index) of a texture category, built once for every implementation."""
    bank, queries, probes = bank_queries_probes(*texture_features(category))
    return bank, queries, probes, PrunedIndex.build(bank, probes)


@pytest.fixture(scope="module")
def gaussian():
    g = torch.Generator().manual_seed(0)
    bank, queries, probes = (torch.randn(n, 1024, generator=g) for n in (16_464, 87_808, PROBES))
    return bank, queries, probes


@pytest.fixture(scope="module")
def tire_index(tire):
    bank, _, probes = tire
    return PrunedIndex.build(bank, probes)


@pytest.fixture(scope="module")
def tire_knn(tire):
    """knn's answers on tire per k and CPU path (the generic path does not fuse multiply-adds, so
    its floats differ from avx2/avx512's), computed once each."""
    bank, queries, _ = tire

    @functools.cache
    def answer(k, path):
        return patchcore_fast.knn(queries, bank, k)

    return lambda k: answer(k, os.environ.get("PATCHCORE_CPU_ISA"))


def run(benchmark, cpu_path, impl, bank, queries, k, index=None, rounds=ROUNDS):
    """Times `impl` ("pruned_<path>", "knn_<path>", "faiss_flat_l2") on the data; returns its result."""
    benchmark.extra_info.update(queries=len(queries), bank=tuple(bank.shape), k=k)
    if impl == "faiss_flat_l2":
        faiss = pytest.importorskip("faiss")
        benchmark.extra_info.update(baseline=True, faiss_threads=faiss.omp_get_max_threads())
        fn, args = faiss_flat_l2, (queries, flat_index(bank), k)
    else:
        kind, path = impl.split("_", 1)
        cpu_path(torch.device("cpu"), path, benchmark)
        benchmark.extra_info.update(baseline=kind == "knn")
        if kind == "knn":
            fn, args = patchcore_fast.knn, (queries, bank, k)
        else:
            fn, args = index.search, (queries, k)
    fn(*args)  # warm-up
    return benchmark.pedantic(fn, args, rounds=rounds, iterations=1)


@pytest.mark.parametrize("impl", [f"pruned_{p}" for p in CPU_PATHS] + [f"knn_{p}" for p in CPU_PATHS] +
                         ["faiss_flat_l2"])
@pytest.mark.parametrize("k", [1, 9])
def test_search_tire(tire, tire_index, tire_knn, benchmark, cpu_path, impl, k):
    bank, queries, _ = tire
    if k == 9 and impl == "faiss_flat_l2":
        pytest.skip("k = 9: ours against our brute force only")
    index = tire_index
    benchmark.group = f"search-tire-k{k}-cpu"
    benchmark.extra_info.update(workload="tire test patches vs 10 % bank", rank=index.rank,
                                first_rank=index.first_rank, probe_share=index.probe_share,
                                probe_cost=index.probe_cost, pays=index.pays)
    d, i = run(benchmark, cpu_path, impl, bank, queries, k, index)
    if impl.startswith("pruned"):
        assert index.pays
        kd, ki = tire_knn(k)
        differ = int((i != ki).any(1).sum())
        benchmark.extra_info.update(queries_differing_from_knn=differ)
        assert differ == 0 and torch.equal(d, kd)


@pytest.mark.parametrize("impl", [f"index_{CPU_PATHS[-1]}", f"knn_{CPU_PATHS[-1]}"])
def test_search_gaussian(gaussian, benchmark, cpu_path, impl):
    """The index refuses to prune random data; searching through it must cost what knn costs."""
    bank, queries, probes = gaussian
    index = PrunedIndex.build(bank, probes)
    assert not index.pays
    benchmark.group = "search-gaussian-k1-cpu"
    benchmark.extra_info.update(workload="N(0, 1) data of tire's shapes", probe_share=index.probe_share)
    d, i = run(benchmark, cpu_path, impl.replace("index_", "pruned_"), bank, queries, 1, index, rounds=2)
    assert i.shape == (len(queries), 1)


@pytest.mark.parametrize("impl", [f"pruned_{p}" for p in CPU_PATHS if p != "generic"] +
                         [f"knn_{p}" for p in CPU_PATHS if p != "generic"] + ["faiss_flat_l2"])
@pytest.mark.parametrize("category", TEXTURES)
def test_search_textures(category, benchmark, cpu_path, impl):
    """The demo's textures at 320 training images: features whose low-dimensional structure needs
    more directions than tire's; the index chooses its rank from the probes."""
    bank, queries, _, index = texture(category)
    benchmark.group = f"search-{category}-k1-cpu"
    benchmark.extra_info.update(workload=f"{category} (320 training images) test patches vs 10 % bank",
                                rank=index.rank, first_rank=index.first_rank, probe_share=index.probe_share,
                                probe_cost=index.probe_cost, pays=index.pays)
    d, i = run(benchmark, cpu_path, impl, bank, queries, 1, index, rounds=2)
    if impl.startswith("pruned"):
        kd, ki = patchcore_fast.knn(queries, bank, 1)
        assert torch.equal(i, ki) and torch.equal(d, kd)


@pytest.mark.parametrize("stage", ["coreset", "index"])
@pytest.mark.parametrize("category", ("tire",) + TEXTURES)
def test_index_build(category, stage, request, benchmark):
    """The build (rank and cascade chosen on the probes) against the coreset it follows, on the
    same data in the same run: the build should stay a small part of the fit."""
    if category == "tire":
        bank, _, probes = request.getfixturevalue("tire")
        train = tire_features()
    else:
        bank, _, probes, _ = texture(category)
        train = texture_features(category)[0]
    benchmark.group = f"search-index-build-{category}-cpu"
    if stage == "coreset":
        benchmark.extra_info.update(baseline=True)
        benchmark.pedantic(patchcore_fast.greedy_coreset, (train, 0.1), rounds=1, iterations=1)
        return
    index = benchmark.pedantic(PrunedIndex.build, (bank, probes), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(rank=index.rank, first_rank=index.first_rank, probe_share=index.probe_share,
                                probe_cost=index.probe_cost, pays=index.pays)
