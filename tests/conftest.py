import functools
import os
from pathlib import Path

import pytest
import torch

import patchcore_fast
from patchcore_fast import build_info

if os.environ.get("PATCHCORE_TEST_INSTALLED"):
    # CI's run against the installed wheel: the package under test must not be this source tree.
    _repository = Path(__file__).resolve().parents[1]
    _package = Path(patchcore_fast.__file__).resolve()
    if _repository in _package.parents:
        raise pytest.UsageError(f"PATCHCORE_TEST_INSTALLED is set but patchcore_fast was imported from {_package}")
    if not build_info()["extension"]:
        raise pytest.UsageError(f"the installed wheel's extension does not load: {build_info().get('import_error')}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: The CPU kernels' instruction-set paths this CPU runs (PATCHCORE_CPU_ISA forces each in turn).
CPU_PATHS = build_info().get("cpu_isa_supported") or ["generic"]


def kernel_params():
    """One test parameter per CPU path ("cpu:avx2") and per CUDA kernel given ("cuda:cached")."""
    return [f"cpu:{path}" for path in CPU_PATHS]


def kernel_fixtures(function, cuda_kernels, call_name):
    """Fixtures for a test module of one kernel: `kernel` (one parameter per CPU path this CPU runs
    and per CUDA variant when a GPU is present), `device`, and `call_name`: `function` with that
    variant's CUDA kernel passed explicitly (not a module switch). Assign the three to module names."""
    params = kernel_params() + [f"cuda:{k}" for k in cuda_kernels if "cuda" in DEVICES]

    @pytest.fixture(name="kernel", params=params)
    def kernel(request, monkeypatch):
        return use_kernel(request.param, monkeypatch)

    @pytest.fixture(name="device")
    def device(kernel):
        return kernel[0]

    @pytest.fixture(name=call_name)
    def call(kernel):
        return functools.partial(function, **kernel[1])

    return kernel, device, call


def use_kernel(param, monkeypatch):
    """(device, keyword arguments of the kernel call) for the CPU path or CUDA kernel `param` names."""
    name, _, variant = param.partition(":")
    if name == "cpu":
        monkeypatch.setenv("PATCHCORE_CPU_ISA", variant)
        return torch.device("cpu"), {}
    return torch.device(name), {"cuda_kernel": variant}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def integer_rows(rows, dim, generator, low=-4, high=5):
    """Small-integer features: every squared distance and dot product is exact in float32
    whatever the summation order, so kernels and references must agree bit for bit,
    ties included."""
    return torch.randint(low, high, (rows, dim), generator=generator).float()


def clustered_rows(rows, dim, generator, clusters=7):
    centres = torch.randint(-40, 41, (clusters, dim), generator=generator)
    labels = torch.randint(0, clusters, (rows,), generator=generator)
    noise = torch.randint(-2, 3, (rows, dim), generator=generator)
    return (centres[labels] + noise).float()
