"""The extension reports how it was built, and the package works without it."""

import warnings

import torch

import patchcore_fast
from patchcore_fast import _extension
from patchcore_fast.reference import greedy_coreset_reference, knn_reference


def test_build_info_describes_the_extension():
    info = patchcore_fast.build_info()
    assert info["extension"], info.get("import_error")
    assert isinstance(info["cuda"], bool)
    assert info["openmp_threads"] >= 1
    if info["cuda"]:
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]


def test_without_the_extension_the_references_run_and_warn_once(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_warned_fallback", False)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picks = patchcore_fast.greedy_coreset(x, n=10, projection_dim=None, initial_distances=x.norm(dim=1))
        d, i = patchcore_fast.knn(x[:5], x, 2)
    assert sum("pure-torch reference" in str(w.message) for w in caught) == 1
    assert torch.equal(picks, greedy_coreset_reference(x, x.norm(dim=1), 10))
    assert torch.equal(i, knn_reference(x[:5], x, 2)[1])
