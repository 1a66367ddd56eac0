"""The distributed coreset's GPU path on one GPU (NCCL, one rank), for benchmarks/gpu_suite.sh.

Usage: python benchmarks/gpu_distributed_coreset.py OUTDIR. Writes OUTDIR/distributed_coreset.json:
  - correctness: distributed.greedy_coreset on CUDA rows in a one-rank NCCL group (each round's
    pass the CUDA kernel, the offers through NCCL) against the single-process CPU coreset: the
    same picks;
  - its rounds (count, picks per round, pass / gather / pick seconds, bytes per round);
  - one pass of 96 centres over large shards timed with CUDA events after warm-up, against its
    floors: the rows read once at the measured copy bandwidth, and 3 x rows x 96 x dim float32
    operations at the measured float32 rate (the kernel is exact and unfused by design).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import patchcore_fast
from patchcore_fast import distributed

sys.path.insert(0, str(Path(__file__).parent))
from cuda_timing import cuda_time  # noqa: E402


def main(out: Path) -> None:
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("nccl", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            x = torch.randn(156_800, 128, generator=torch.Generator().manual_seed(0))
            stats = distributed.RoundStats()
            started = time.perf_counter()
            picks = distributed.greedy_coreset(x.to(device), n=3000, projection_dim=None, rounds=stats)
            seconds = time.perf_counter() - started
            reference = patchcore_fast.greedy_coreset(x, n=3000, projection_dim=None)
            result["nccl_one_rank"] = {"rows": list(x.shape), "picks": 3000, "same_picks_as_cpu": bool(torch.equal(picks, reference)),
                                       "seconds": seconds, "rounds": stats.rounds, "picks_per_round": stats.picks_per_round,
                                       "pass_s": stats.pass_s, "gather_s": stats.gather_s, "pick_s": stats.pick_s,
                                       "bytes_per_round": stats.bytes_sent / max(1, stats.rounds)}
        finally:
            dist.destroy_process_group()

    # floors: copy bandwidth and the float32 rate, measured here
    big = torch.empty(1 << 28, device=device)
    copy_s = cuda_time(lambda: big.clone(), 5)
    bandwidth = 2 * big.numel() * 4 / copy_s
    a = torch.randn(8192, 8192, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False
    flops = 2 * 8192**3 / cuda_time(lambda: a @ a, 5)
    del big, a
    passes = []
    for rows in (1_000_000, 10_000_000):
        space = torch.randn(rows, 128, device=device)
        shard = distributed.GpuShard(space, torch.full((rows,), 1e4), device)
        centres = space[:96].clone()
        seconds = cuda_time(lambda: shard.pass_(centres), 5, warmup=2)
        passes.append({"rows": rows, "dim": 128, "centres": 96, "seconds": seconds,
                       "floor_bytes_s": rows * 128 * 4 / bandwidth, "floor_flops_s": 3 * rows * 96 * 128 / flops})
        del space, shard
    result["pass"] = passes
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    result["float32_TFLOPs"] = flops / 1e12
    (out / "distributed_coreset.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    main(Path(sys.argv[1]))
