"""Bad input gets a clear ValueError/TypeError naming the argument, never a crash."""

import pytest
import torch

import patchcore_fast

from conftest import DEVICES

ok = torch.randn(50, 8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: patchcore_fast.greedy_coreset(ok.numpy(), 0.1), TypeError, "features"),
        (lambda: patchcore_fast.greedy_coreset(ok.long(), 0.1), TypeError, "features"),
        (lambda: patchcore_fast.greedy_coreset(ok[0], 0.1), ValueError, "2-D"),
        (lambda: patchcore_fast.greedy_coreset(torch.empty(0, 8), 0.1), ValueError, "empty"),
        (lambda: patchcore_fast.greedy_coreset(torch.full((5, 3), float("nan")), 0.5), ValueError, "NaN"),
        (lambda: patchcore_fast.greedy_coreset(ok.index_put((torch.tensor([3]),), torch.tensor(float("inf"))), 0.5), ValueError, "infinite"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.0), ValueError, "ratio"),
        (lambda: patchcore_fast.greedy_coreset(ok, 1.5), ValueError, "ratio"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.001), ValueError, "selects no point"),
        (lambda: patchcore_fast.greedy_coreset(ok), ValueError, "exactly one"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.1, n=3), ValueError, "exactly one"),
        (lambda: patchcore_fast.greedy_coreset(ok, n=51), ValueError, "n must be"),
        (lambda: patchcore_fast.greedy_coreset(ok, n=0), ValueError, "n must be"),
        (lambda: patchcore_fast.greedy_coreset(ok, n=2.5), TypeError, "n must be an integer"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.1, num_starts=0), ValueError, "num_starts"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.1, projection_dim=0), ValueError, "projection_dim"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.1, initial_distances=torch.ones(49)), ValueError, "initial_distances"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.1, initial_distances=-torch.ones(50)), ValueError, "non-negative"),
        (lambda: patchcore_fast.greedy_coreset(ok, 0.1, initial_distances=torch.full((50,), float("nan"))), ValueError, "initial_distances"),
        (lambda: patchcore_fast.knn(ok, ok, 0), ValueError, "k must be"),
        (lambda: patchcore_fast.knn(ok, ok, 51), ValueError, "k must be"),
        (lambda: patchcore_fast.knn(ok, torch.randn(50, 9)), ValueError, "dim"),
        (lambda: patchcore_fast.knn(ok[:, None], ok), ValueError, "queries must be 2-D"),
        (lambda: patchcore_fast.knn(ok, torch.empty(0, 8)), ValueError, "bank is empty"),
        (lambda: patchcore_fast.knn(torch.full((2, 8), float("nan")), ok), ValueError, "queries contains NaN"),
        (lambda: patchcore_fast.knn(ok, ok.int()), TypeError, "bank"),
        (lambda: patchcore_fast.knn(ok, ok, 1, tile_elems=0), ValueError, "tile_elems"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_large_finite_values_are_not_mistaken_for_inf():
    x = torch.full((10, 4), 3e38)
    # the validation sum overflows but the values are finite: the error is about the distances
    with pytest.raises(ValueError, match="overflow float32"):
        patchcore_fast.knn(x[:2], x, 1)
    x = torch.full((10, 4), 1e19)  # squared norms overflow; the values and their sum do not
    with pytest.raises(ValueError, match="overflow float32"):
        patchcore_fast.greedy_coreset(x, n=2, projection_dim=None)


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a GPU")
def test_mixed_devices():
    with pytest.raises(ValueError, match="queries is on"):
        patchcore_fast.knn(ok, ok.cuda())
    with pytest.raises(ValueError, match="initial_distances is on"):
        patchcore_fast.greedy_coreset(ok.cuda(), 0.1, initial_distances=torch.ones(50))
