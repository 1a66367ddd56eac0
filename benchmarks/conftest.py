import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from workloads import W1, W_CPU  # noqa: E402


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
def cuda_variant(monkeypatch):
    """Selects a not-default CUDA kernel of `module` for one benchmark; skips on the CPU."""

    def use(device, module, kernel):
        if device.type != "cuda":
            pytest.skip(f"{kernel} is a CUDA kernel")
        monkeypatch.setattr(module, "CUDA_KERNEL", kernel)

    return use
