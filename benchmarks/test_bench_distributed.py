"""The distributed coreset and sharded search (torch.distributed, gloo, CPU) against one process.

Ranks are started once per module as a small pool (processes on 127.0.0.1, one thread each, as
torchrun starts them); each benchmark round sends every rank the same command on its stdin and
waits for all to answer, so a round's time is the job's time. Baselines in the same run, one
process: the batched single-process kernel (`greedy_coreset`, `knn`) and the same one-pick-per-step
loop without collectives (`_C.coreset_step`). The per-step cost model is in benchmarks/NOTES.md.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patchcore_fast
from patchcore_fast._extension import _C

ROWS, DIM, STEPS = 156_800, 128, 500        # W_cpu's selection space (projected), a fixed number of steps
BANK, QUERIES = 16_464, 8_192                 # tire's bank size, 1024-d

POOL = r"""
import json, sys, time, torch
from patchcore_fast import distributed
distributed.init_from_environment(600)
rows = torch.randn({rows}, {dim}, generator=torch.Generator().manual_seed(0))
bank = torch.randn({bank}, 1024, generator=torch.Generator().manual_seed(1))
queries = torch.randn({queries}, 1024, generator=torch.Generator().manual_seed(2))
a, b = distributed.shard(len(rows))
ba, bb = distributed.shard(len(bank))
local_rows, local_bank, ids = rows[a:b].contiguous(), bank[ba:bb].contiguous(), torch.arange(ba, bb)
print("ready", flush=True)
for line in sys.stdin:
    command, arg = line.split()
    start = time.perf_counter()
    if command == "coreset":
        distributed.greedy_coreset(local_rows, n=int(arg), projection_dim=None)
    else:
        distributed.search(queries, local_bank, ids, int(arg), len(bank))
    print(json.dumps(time.perf_counter() - start), flush=True)
distributed.shutdown()
"""


class Pool:
    def __init__(self, ranks):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        code = POOL.format(rows=ROWS, dim=DIM, bank=BANK, queries=QUERIES)
        self.ranks = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE) for r in range(ranks)]
        for p in self.ranks:
            assert p.stdout.readline().strip() == "ready"

    def run(self, command):
        for p in self.ranks:
            p.stdin.write(command + "\n")
            p.stdin.flush()
        return max(json.loads(p.stdout.readline()) for p in self.ranks)

    def close(self):
        for p in self.ranks:
            p.stdin.close()
            p.wait(timeout=60)


@pytest.fixture(scope="module")
def pool2():
    pool = Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def data():
    rows = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    bank = torch.randn(BANK, 1024, generator=torch.Generator().manual_seed(1))
    queries = torch.randn(QUERIES, 1024, generator=torch.Generator().manual_seed(2))
    return rows, bank, queries


def one_pick_per_step(rows, steps):
    """The distributed algorithm's arithmetic on one process: a full pass per pick, no collectives."""
    min_distance = torch.full((len(rows),), float("inf"))
    value, index = _C.coreset_step(rows, min_distance, None)
    for _ in range(steps):
        min_distance[index] = -float("inf")
        value, index = _C.coreset_step(rows, min_distance, rows[index].contiguous())


@pytest.mark.parametrize("impl", ["two_ranks_gloo", "one_process_step_loop", "one_process_batched_kernel"])
def test_distributed_coreset_steps(benchmark, data, pool2, impl):
    rows = data[0]
    benchmark.group = f"distributed-coreset-{STEPS}-steps-{ROWS}x{DIM}-cpu"
    benchmark.extra_info.update(steps=STEPS, rows=ROWS, dim=DIM, threads=torch.get_num_threads())
    if impl == "two_ranks_gloo":
        benchmark.extra_info.update(ranks=2, threads_per_rank=1)
        benchmark.pedantic(pool2.run, (f"coreset {STEPS}",), rounds=3, iterations=1, warmup_rounds=1)
    elif impl == "one_process_step_loop":
        benchmark.pedantic(one_pick_per_step, (rows, STEPS), rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(patchcore_fast.greedy_coreset, (rows,), {"n": STEPS, "projection_dim": None}, rounds=3,
                           iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["two_ranks_gloo", "one_process_knn"])
def test_sharded_search(benchmark, data, pool2, impl):
    _, bank, queries = data
    benchmark.group = f"distributed-search-{QUERIES}x{BANK}x1024-k1-cpu"
    benchmark.extra_info.update(queries=QUERIES, bank=BANK)
    if impl == "two_ranks_gloo":
        benchmark.pedantic(pool2.run, ("search 1",), rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(patchcore_fast.knn, (queries, bank, 1), rounds=3, iterations=1, warmup_rounds=1)
