"""Timing on a GPU for the benchmark scripts: CUDA events around the work, after warm-up."""

from __future__ import annotations

import statistics

import torch


def cuda_time(fn, reps, warmup=1):
    """Median seconds of `fn` by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
