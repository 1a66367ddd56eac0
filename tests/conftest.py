import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
