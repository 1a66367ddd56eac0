"""Ctrl-C: long steps stop quickly, with one line and exit code 130; progress from inside the coreset."""

import os
import signal
import subprocess
import sys
import time

import torch

import patchcore_fast


def test_ctrl_c_during_the_coreset_exits_within_a_second():
    # 200 random images' worth of patches (156,800 x 1024): seconds of CPU coreset selection.
    cmd = [sys.executable, "-u", "-m", "patchcore_fast.cli", "kernels", "--train-images", "200", "--test-images", "1",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120
        while "training patches" not in proc.stdout.readline():  # printed just before the coreset starts
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.7)
        assert proc.poll() is None, "the coreset finished before the interrupt: make the workload larger"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        while "interrupted" not in (line := proc.stderr.readline()):  # the step stopped and the CLI said so
            assert line, "no message before exiting"
        stopped = time.monotonic() - sent
        proc.wait(timeout=30)
        exited = time.monotonic() - sent
    finally:
        proc.kill()
    rest = proc.stderr.read()
    assert proc.returncode == 130, rest
    assert line.strip() == "patchcore-fast: interrupted" and not rest.strip()  # one line, no traceback
    assert stopped < 1.0, f"took {stopped:.2f} s to stop"
    assert exited < 5.0, f"took {exited:.2f} s to exit"
    assert "coreset" not in proc.stdout.read()  # it stopped before reporting a coreset time


def test_coreset_and_search_report_progress_from_inside():
    x = torch.randn(60000, 256, generator=torch.Generator().manual_seed(0))
    picks_done, queries_done = [], []
    picks = patchcore_fast.greedy_coreset(x, 0.1, progress=picks_done.append)
    assert picks_done and picks_done == sorted(picks_done) and 0 < picks_done[-1] < len(picks)
    patchcore_fast.knn(x[:30000], x[30000:], 1, progress=queries_done.append)
    assert queries_done and queries_done == sorted(queries_done) and queries_done[-1] <= 30000


def test_a_raising_progress_callback_stops_the_selection():
    x = torch.randn(60000, 256, generator=torch.Generator().manual_seed(1))

    def stop(done):
        raise RuntimeError(f"stop at {done}")

    try:
        patchcore_fast.greedy_coreset(x, 0.1, progress=stop)
    except RuntimeError as error:
        assert "stop at" in str(error)
    else:
        raise AssertionError("the callback's exception was swallowed")
