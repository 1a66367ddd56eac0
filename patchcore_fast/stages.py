"""StageTimes: wall seconds per named stage (decode, features, coreset, index, scale, search, maps)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class StageTimes(defaultdict):
    """A dict of seconds per stage; `with times("search"): ...` adds the block's wall time, waiting
    for GPU work started inside it."""

    def __init__(self, device: torch.device):
        super().__init__(float)
        self.device = device

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self[stage] += time.perf_counter() - start

    def iterate(self, iterable, stage: str):
        """The items of `iterable`, the time spent producing each added to `stage` (e.g. decoding
        the next batch of images)."""
        items = iter(iterable)
        while True:
            with self(stage):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item
