"""Builds and runs our CUDA kernels on the CPU (shim/ and harness.cpp).

The .cu sources are compiled unchanged except for four mechanical rewrites that plain C++
cannot express: dynamic shared memory becomes a per-block buffer, `__shared__` becomes
`static` (each block is its own forked process), `kernel<<<...>>>(args)` becomes a call
to the shim's launcher, and the cooperative launch keeps the kernel's type.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
CSRC = HERE.parents[1] / "csrc"
SOURCES = ("coreset_shard_cuda.cu", "embedding_cuda.cu", "greedy_coreset_cuda.cu", "greedy_coreset_resident.cu",
           "knn_cuda.cu")


def as_cpu_source(text: str) -> str:
    text = re.sub(r"extern __shared__[^;]*?unsigned char (\w+)\[\];", r"unsigned char* \1 = emu::dynamic_shared();", text)
    text = text.replace("__shared__", "static")
    text = re.sub(r"(\w+)<<<", r"emu::launch(\1, ", text).replace(">>>", ")")
    return re.sub(r"cudaLaunchCooperativeKernel\(\s*reinterpret_cast<void\*>\((\w+)\)", r"emu::cooperative_launch(\1", text)


def build(out_dir: Path) -> Path:
    """Compiles the harness with the kernels' sources; returns the executable."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("g++ not found")
    (out_dir / "cuda").mkdir(parents=True, exist_ok=True)
    units = []
    for name in SOURCES:
        unit = out_dir / "cuda" / (Path(name).stem + ".cpp")
        unit.write_text(as_cpu_source((CSRC / "cuda" / name).read_text()))
        units.append(str(unit))
    exe = out_dir / "harness"
    cmd = [compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-I", str(HERE / "shim"), "-I", str(CSRC / "cuda"),
           "-o", str(exe), str(HERE / "harness.cpp"), *units]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CPU emulation failed:\n{result.stderr[-4000:]}")
    return exe


def run(exe: Path, kernel: str, x: torch.Tensor, initial: torch.Tensor, n: int, sms: int, smem_bytes: int,
        timeout: float = 600):
    """Picks (int64 [n]) of `kernel` on x, emulating `sms` multiprocessors with `smem_bytes` of
    shared memory per block; for "resident-stages" also the cycles [blocks * stages]."""
    header = np.array([x.shape[0], x.shape[1], n], dtype=np.int64).tobytes()
    payload = header + x.float().contiguous().numpy().tobytes() + initial.float().contiguous().numpy().tobytes()
    result = subprocess.run([str(exe), kernel, str(sms), str(smem_bytes)], input=payload, capture_output=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace").strip())
    out = np.frombuffer(result.stdout, dtype=np.int64)
    return torch.from_numpy(out[:n].copy()), torch.from_numpy(out[n:].copy())


def run_knn(exe: Path, queries: torch.Tensor, bank: torch.Tensor, k: int, splits: int, warp_rows: int,
            timeout: float = 600):
    """(squared distances [Q, k], indices [Q, k]) from the CUDA knn kernel, rows zero-padded to
    a multiple of 16 as the extension pads them; `splits` bank chunks are merged by its merge kernel."""
    dim = queries.shape[1]
    padded = (dim + 15) // 16 * 16
    pad = torch.nn.functional.pad
    q = pad(queries.float(), (0, padded - dim)).contiguous()
    b = pad(bank.float(), (0, padded - dim)).contiguous()
    header = np.array([q.shape[0], b.shape[0], padded, k, splits, warp_rows], dtype=np.int64).tobytes()
    result = subprocess.run([str(exe), "knn", "1", str(227 * 1024)], input=header + q.numpy().tobytes() + b.numpy().tobytes(),
                            capture_output=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace").strip())
    count = q.shape[0] * k
    distances = np.frombuffer(result.stdout[: 4 * count], dtype=np.float32).reshape(-1, k)
    indices = np.frombuffer(result.stdout[4 * count :], dtype=np.int64).reshape(-1, k)
    return torch.from_numpy(distances.copy()), torch.from_numpy(indices.copy())


def run_embedding(exe: Path, maps: list[torch.Tensor], dim: int, timeout: float = 600) -> torch.Tensor:
    """Patch features [B * H_0 * W_0, dim] from the CUDA embedding kernels."""
    batch = maps[0].shape[0]
    header = [len(maps), dim, batch] + [s for m in maps for s in m.shape[1:]]
    payload = np.array(header, dtype=np.int64).tobytes() + b"".join(m.float().contiguous().numpy().tobytes() for m in maps)
    result = subprocess.run([str(exe), "embedding", "1", str(227 * 1024)], input=payload, capture_output=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace").strip())
    out = np.frombuffer(result.stdout, dtype=np.float32).reshape(-1, dim)
    return torch.from_numpy(out.copy())


def run_shard_pass(exe: Path, space: torch.Tensor, min_distance: torch.Tensor, centres: torch.Tensor, offered: int,
                   timeout: float = 600):
    """One distributed-coreset round's pass on a shard (coreset_shard_cuda.cu), and its offer as
    csrc/cuda/cuda_ops.cpp makes it: (minima [rows], offered values [<= offered], their rows' indices)."""
    rows, dim = space.shape
    header = np.array([rows, dim, len(centres), offered], dtype=np.int64).tobytes()
    payload = (header + space.float().contiguous().numpy().tobytes() + min_distance.float().contiguous().numpy().tobytes()
               + centres.float().contiguous().numpy().tobytes())
    result = subprocess.run([str(exe), "shard-pass", "1", str(227 * 1024)], input=payload, capture_output=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace").strip())
    count = min(rows, offered)
    minima = np.frombuffer(result.stdout[: 4 * rows], dtype=np.float32)
    values = np.frombuffer(result.stdout[4 * rows : 4 * (rows + count)], dtype=np.float32)
    indices = np.frombuffer(result.stdout[4 * (rows + count) :], dtype=np.int64)
    return torch.from_numpy(minima.copy()), torch.from_numpy(values.copy()), torch.from_numpy(indices.copy())
