"""The distributed coreset and sharded search (torch.distributed, gloo, CPU) against one process.

Ranks are started once per module as a small pool (processes on 127.0.0.1, one thread each, as
torchrun starts them); each benchmark round sends every rank the same command on its stdin and
waits for all to answer, so a round's time is the job's time. Baselines in the same run, one
process with two threads: the batched single-process kernel (`greedy_coreset`) and `knn`. The
distributed coreset's rounds (count, picks per round, pass / all_gather / pick time, bytes) go
into extra_info; the cost model built from them is in benchmarks/NOTES.md.
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

ROWS, DIM, STEPS = 156_800, 128, 3_000      # W_cpu's selection space (projected), a fixed number of picks
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
    stats = distributed.RoundStats()
    if command == "coreset":
        distributed.greedy_coreset(local_rows, n=int(arg), projection_dim=None, rounds=stats)
    else:
        distributed.search(queries, local_bank, ids, int(arg), len(bank))
    print(json.dumps([time.perf_counter() - start, vars(stats)]), flush=True)
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
        answers = [json.loads(p.stdout.readline()) for p in self.ranks]
        self.last_rounds = [stats for _, stats in answers]
        return max(seconds for seconds, _ in answers)

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


@pytest.mark.parametrize("impl", ["two_ranks_gloo", "one_process_batched_kernel"])
def test_distributed_coreset_steps(benchmark, data, pool2, impl):
    rows = data[0]
    benchmark.group = f"distributed-coreset-{STEPS}-picks-{ROWS}x{DIM}-cpu"
    benchmark.extra_info.update(picks=STEPS, rows=ROWS, dim=DIM, threads=torch.get_num_threads())
    if impl == "two_ranks_gloo":
        benchmark.extra_info.update(ranks=2, threads_per_rank=1)
        benchmark.pedantic(pool2.run, (f"coreset {STEPS}",), rounds=3, iterations=1, warmup_rounds=1)
        benchmark.extra_info["rounds_per_rank"] = pool2.last_rounds
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
