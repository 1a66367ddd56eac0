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
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own default: once per place
        picks = patchcore_fast.greedy_coreset(x, n=10, projection_dim=None, initial_distances=x.norm(dim=1))
        d, i = patchcore_fast.knn(x[:5], x, 2)
    assert sum("pure-torch reference" in str(w.message) for w in caught) == 1
    assert torch.equal(picks, greedy_coreset_reference(x, x.norm(dim=1), 10))
    assert torch.equal(i, knn_reference(x[:5], x, 2)[1])


def test_which_gpus_a_build_runs_on():
    default = ["75-real", "80-real", "86-real", "89-real", "90-real", "90-virtual"]
    for capability in [(7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)]:
        assert _extension.runs_on(capability, default), capability  # sm_87 runs sm_86 code; 10.0+ JIT from PTX
    for capability in [(7, 0), (6, 1), (5, 2)]:
        assert not _extension.runs_on(capability, default), capability
    assert not _extension.runs_on((8, 0), ["90"]) and _extension.runs_on((9, 0), ["90"])
    assert not _extension.runs_on((10, 0), ["90-real"])  # machine code only runs within its major version
    assert _extension.runs_on((10, 0), ["80-virtual"]) and not _extension.runs_on((7, 5), ["80-virtual"])
    assert _extension.runs_on((9, 0), ["90a-real"]) and not _extension.runs_on((10, 0), ["90a-real"])
    assert not _extension.runs_on((9, 0), [])


class _FakeExtension:
    """A build with CUDA kernels, for the GPU checks on a machine without one."""

    @staticmethod
    def build_info():
        return {"cuda": True, "cuda_version": "13.0", "cuda_max_k": 64}


def test_a_gpu_the_build_lacks_gets_the_reference_path_and_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "_C", _FakeExtension())
    monkeypatch.setattr(_extension, "_build_config", type("Config", (), {"CUDA_ARCHITECTURES": "80-real;90-real"}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert not _extension.compiled(torch.device("cuda", 0))
        assert not _extension.compiled(torch.device("cuda", 0))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "Tesla T4 (sm_75)" in messages[0] and "80-real, 90-real" in messages[0]
    assert "CMAKE_CUDA_ARCHITECTURES=75-real" in messages[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _extension.compiled(torch.device("cuda", 0))


def test_another_torch_release_is_named_not_a_linker_error():
    assert _extension.torch_mismatch("2.14.1+cu130", "2.14.1+cu130") is None
    assert _extension.torch_mismatch("2.14.1+cu130", "2.14.2") is None  # same release line: same ABI
    message = _extension.torch_mismatch("2.14.1+cu130", "2.11.0+cu130")
    assert "built against torch 2.14.1+cu130" in message and "torch 2.11.0+cu130 is installed" in message
    assert "pip install torch==2.14.1" in message and "--no-build-isolation" in message
    assert _extension.torch_mismatch("", "2.11.0") is None  # a source tree that was never built


def test_the_build_records_its_torch_and_architectures():
    info = patchcore_fast.build_info()
    assert _extension.torch_mismatch(info["torch_built_against"], torch.__version__) is None
    assert info["torch_built_against"].startswith(torch.__version__.split("+")[0])
    if info["cuda"]:
        assert info["cuda_architectures"], "a CUDA build lists its architectures"
        for arch in info["cuda_architectures"]:  # each one readable, and its own GPU served
            number = arch.split("-")[0].rstrip("af")
            assert _extension.runs_on((int(number[:-1]), int(number[-1])), [arch]), arch
