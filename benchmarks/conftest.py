import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from workloads import W1, W_CPU  # noqa: E402

import patchcore_fast  # noqa: E402

#: The CPU kernels' instruction-set paths this CPU runs, worst to best (PATCHCORE_CPU_ISA forces one).
CPU_PATHS = patchcore_fast.build_info().get("cpu_isa_supported") or ["generic"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session", params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def workload(request):
    """(device, workload, training features, test features, memory bank)."""
    device = torch.device(request.param)
    w = W_CPU if device.type == "cpu" else W1
    train = w.features(device)
    test = w.test_features(device)
    bank = train[: w.bank_rows].contiguous()
    return device, w, train, test, bank


@pytest.fixture
def timed(benchmark):
    """Benchmark a call on a device, synchronising so that GPU work is inside the timing."""

    def run(device, fn, rounds, *args):
        def call():
            out = fn(*args)
            _sync(device)
            return out

        call()  # warm-up
        return benchmark.pedantic(call, rounds=rounds, iterations=1)

    return run


@pytest.fixture
def cpu_path(monkeypatch):
    """Forces one CPU instruction-set path for a benchmark and records it with the CPU model."""

    def use(device, path, benchmark):
        if device.type != "cpu":
            pytest.skip("CPU paths are CPU benchmarks")
        monkeypatch.setenv("PATCHCORE_CPU_ISA", path)
        benchmark.extra_info.update(cpu_path=path, cpu=cpu_model(), threads=torch.get_num_threads())

    return use


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cuda_only(device, what):
    if device.type != "cuda":
        pytest.skip(f"{what} is a CUDA kernel")
