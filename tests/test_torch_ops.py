"""The kernels as torch custom operators: correct fake implementations, and graphs that keep them."""

import pytest
import torch

import patchcore_fast
from patchcore_fast import torch_ops

from conftest import DEVICES, integer_rows

pytestmark = pytest.mark.skipif(not torch_ops.REGISTERED, reason="needs the compiled extension")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn(37, 19, generator=g).to(device), torch.randn(101, 19, generator=g).to(device)
    torch.library.opcheck(torch.ops.patchcore_fast.knn.default, (q, b, 3, "warp16x128"))
    torch.library.opcheck(torch.ops.patchcore_fast.greedy_coreset.default, (b, b.norm(dim=1), 10, "cached"))


def test_compiled_graph_keeps_the_operators():
    x = integer_rows(600, 24, torch.Generator().manual_seed(1))
    initial = x.norm(dim=1)

    def pipeline(rows, start):
        picks = torch.ops.patchcore_fast.greedy_coreset(rows, start, 60, "cached")
        return torch.ops.patchcore_fast.knn(rows[:50], rows[picks], 2, "warp16x128")

    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    d, i = compiled(x, initial)
    picks = patchcore_fast.greedy_coreset(x, n=60, projection_dim=None, initial_distances=initial)
    rd, ri = patchcore_fast.knn(x[:50], x[picks], 2)
    assert torch.equal(d, rd) and torch.equal(i, ri)


def test_exported_program_names_the_operator():
    class Search(torch.nn.Module):
        def __init__(self, bank):
            super().__init__()
            self.register_buffer("bank", bank)

        def forward(self, queries):
            return torch.ops.patchcore_fast.knn(queries, self.bank, 1, "warp16x128")

    bank = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    program = torch.export.export(Search(bank), (torch.randn(30, 16),))
    assert "patchcore_fast.knn" in str(program.graph)
    q = torch.randn(30, 16)
    assert torch.equal(program.module()(q)[1], patchcore_fast.knn(q, bank)[1])


def test_public_functions_compile():
    g = torch.Generator().manual_seed(3)
    q, b = torch.randn(40, 12, generator=g), torch.randn(300, 12, generator=g)
    compiled = torch.compile(lambda q, b: patchcore_fast.knn(q, b, 2), backend="aot_eager")
    d, i = compiled(q, b)
    rd, ri = patchcore_fast.knn(q, b, 2)
    assert torch.equal(d, rd) and torch.equal(i, ri)
