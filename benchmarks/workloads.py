"""The workloads of DESIGN.md, as synthetic feature tensors of the same shapes.

W_cpu: one small category on the 2-core CI machine (40 training images, 20 test images).
W1:    one MVTec AD category on an H200 (200 training images, 100 test images).
Every image gives 784 patch features of 1024 dims (a 28 x 28 layer-2 grid). Features are
non-negative, like pooled CNN activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PATCHES_PER_IMAGE = 28 * 28


@dataclass(frozen=True)
class Workload:
    name: str
    train_images: int
    test_images: int
    dim: int = 1024
    ratio: float = 0.1

    @property
    def rows(self) -> int:
        return self.train_images * PATCHES_PER_IMAGE

    @property
    def queries(self) -> int:
        return self.test_images * PATCHES_PER_IMAGE

    @property
    def bank_rows(self) -> int:
        return int(self.rows * self.ratio)

    def features(self, device, seed=0) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(self.rows, self.dim, generator=g, device=device).abs_()

    def test_features(self, device, seed=1) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(self.queries, self.dim, generator=g, device=device).abs_()


W_CPU = Workload("W_cpu", train_images=40, test_images=20)
W1 = Workload("W1", train_images=200, test_images=100)
