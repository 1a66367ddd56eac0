"""W1 on a GPU: correctness first, then CUDA-event timings against the baselines and the floors.

Usage: python benchmarks/gpu_report.py OUTDIR [PYTEST_BENCHMARK_JSON ...]
Writes OUTDIR/results.json: per workload and implementation the median seconds, the ratio
to the baseline of the same step, and the floor (FLOPs over the measured float32 rate,
bytes over the measured copy bandwidth).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import patchcore_fast  # noqa: E402
from patchcore_fast import metrics  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from baselines import authors_coreset, cdist_topk, matmul_min  # noqa: E402
from cuda_timing import cuda_time  # noqa: E402
from patchcore_fast.coreset import seeded_start  # noqa: E402
from patchcore_fast.reference import knn_reference  # noqa: E402
from workloads import W1  # noqa: E402

knn_module = importlib.import_module("patchcore_fast.knn")  # for CUDA_KERNELS (the package's `knn` is the function)



def metric_inputs(device, n=100, size=224):
    """Maps [n, size, size] and masks with a few rectangular defects in the second half."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for m in masks[n // 2 :]:
        for _ in range(3):
            y, x = torch.randint(0, size - 24, (2,), generator=g).tolist()
            h, w = torch.randint(4, 24, (2,), generator=g).tolist()
            m[y : y + h, x : x + w] = True
    maps = torch.rand(n, size, size, generator=g) + 0.5 * masks
    return maps.to(device), masks.to(device)


def ceilings():
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    copy_s = cuda_time(lambda: y.copy_(x), 10)
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    mm_s = cuda_time(lambda: a @ b, 5)
    return {"copy_bytes_per_s": 2 * x.numel() / copy_s, "fp32_flops_per_s": 2 * 8192**3 / mm_s}


def greedy_check(space, picks, initial):
    """Fraction of picks that are the farthest point (float64, 1e-5 relative slack)."""
    x = space.double()
    min_d = initial.double().clone()
    good = 0
    for pick in picks.tolist():
        good += bool(min_d[pick] >= min_d.max() * (1 - 1e-5))
        min_d = torch.minimum(min_d, (x - x[pick]).norm(dim=1))
        min_d[pick] = -1
    return good / len(picks)


def stage_breakdown(space, initial, steps, kernel_seconds):
    """Where a step of the resident kernel goes: per stage, the mean over blocks of its share of
    the block's cycles, and that share of the measured time per step (microseconds)."""
    picks, cycles = patchcore_fast._extension._C.greedy_coreset_stages(space, initial, steps)
    share = (cycles.double() / cycles.sum(dim=1, keepdim=True).double()).mean(dim=0)
    step_us = kernel_seconds / steps * 1e6
    names = ["publish", "arrive_and_settle", "wait", "centre", "pass", "reduce"]
    out = {"step_us": step_us, "same_picks_as_plain_call": bool(torch.equal(
        picks, patchcore_fast._extension._C.greedy_coreset(space, initial, steps, cuda_kernel="resident")))}
    for name, s, worst in zip(names, share.tolist(), (cycles.double() / steps).max(dim=0).values.tolist()):
        out[name] = {"share": s, "us": s * step_us, "max_block_cycles_per_step": worst}
    return out


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build": patchcore_fast.build_info()}
    info["ceilings"] = ceil = ceilings()
    w = W1
    train, test = w.features("cuda"), w.test_features("cuda")
    bank = train[: w.bank_rows].contiguous()
    results, checks = [], {}

    def save():
        """Writes what is measured so far, so a kernel that fails later loses nothing before it."""
        report = {"info": info, "checks": checks, "results": results}
        report["pytest_benchmark"] = [
            {"name": b["name"], "group": b["group"], "median_s": b["stats"]["median"]}
            for path in sys.argv[2:] if Path(path).exists()
            for b in json.loads(Path(path).read_text())["benchmarks"]
        ]
        (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=float))

    def add(step, impl, seconds, baseline=None, flops=None, bytes_=None):
        floor = max(flops / ceil["fp32_flops_per_s"] if flops else 0.0, bytes_ / ceil["copy_bytes_per_s"] if bytes_ else 0.0)
        row = {"workload": w.name, "step": step, "impl": impl, "median_s": seconds}
        if baseline:
            row["ratio_to_baseline"] = baseline / seconds
        if floor:
            row["floor_s"] = floor
            row["over_floor"] = seconds / floor
        results.append(row)
        print(f"{step:28s} {impl:26s} {seconds * 1e3:10.2f} ms" + (f"  x{baseline / seconds:7.1f} vs baseline" if baseline else "")
              + (f"  floor {floor * 1e3:.2f} ms" if floor else ""), flush=True)

    # --- knn: each CUDA warp layout ----------------------------------------------------------
    knn_flops = 2.0 * w.queries * w.bank_rows * w.dim
    knn_bytes = (w.queries + w.bank_rows) * w.dim * 4
    reference = {k: knn_reference(test, bank, k) for k in (1, 9)}
    base_k1 = cuda_time(lambda: matmul_min(test, bank), 10)
    add("knn_k1", "matmul_min_fp32", base_k1)
    torch.backends.cuda.matmul.allow_tf32 = True
    add("knn_k1", "matmul_min_tf32", cuda_time(lambda: matmul_min(test, bank), 10), base_k1)
    torch.backends.cuda.matmul.allow_tf32 = False
    base_k9 = cuda_time(lambda: cdist_topk(test, bank, 9), 5)
    add("knn_k9", "cdist_topk", base_k9)
    for kernel in knn_module.CUDA_KERNELS:
        impl = f"patchcore_fast_{kernel}"
        for k in (1, 9):
            d, i = patchcore_fast.knn(test, bank, k, cuda_kernel=kernel)
            rd, ri = reference[k]
            rel = ((d - rd).abs() / rd.clamp_min(1e-12)).max().item()
            checks[f"knn_k{k}_{kernel}"] = {"indices_equal_fraction": (i == ri).float().mean().item(),
                                            "max_rel_distance_error": rel}
            print(f"knn k={k} check ({kernel})", checks[f"knn_k{k}_{kernel}"], flush=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        patchcore_fast.knn(test, bank, 1, cuda_kernel=kernel)
        torch.cuda.synchronize()
        checks[f"knn_extra_peak_bytes_{kernel}"] = torch.cuda.max_memory_allocated() - before
        add("knn_k1", impl, cuda_time(lambda: patchcore_fast.knn(test, bank, 1, cuda_kernel=kernel), 20), base_k1,
            flops=knn_flops, bytes_=knn_bytes)
        add("knn_k9", impl, cuda_time(lambda: patchcore_fast.knn(test, bank, 9, cuda_kernel=kernel), 20), base_k9,
            flops=knn_flops, bytes_=knn_bytes)
        save()

    # --- metrics on 5 M pixels (100 maps of 224 x 224) ---------------------------------------
    maps, masks = metric_inputs("cuda")
    expected = roc_auc_score(masks.cpu().numpy().ravel(), maps.cpu().numpy().ravel())
    checks["pixel_auroc_minus_sklearn"] = metrics.pixel_auroc(maps, masks) - expected
    add("pixel_auroc_5M", "patchcore_fast", cuda_time(lambda: metrics.pixel_auroc(maps, masks), 10))
    add("pro_5M", "patchcore_fast", cuda_time(lambda: metrics.pro(maps, masks), 5))

    save()

    # --- coreset 10 %, 128-d projection, and 1 % exact 1024-d: each CUDA kernel ---------------
    space, initial = seeded_start(train)
    steps = w.bank_rows
    n_exact = int(w.rows * 0.01)
    coreset_flops = 3.0 * steps * w.rows * 128  # subtract, multiply, add per element per step
    ref = authors_coreset(train, w.ratio)
    ref_exact = authors_coreset(train, 0.01, projection_dim=None)
    base = cuda_time(lambda: authors_coreset(train, w.ratio), 2)
    base_exact = cuda_time(lambda: authors_coreset(train, 0.01, projection_dim=None), 2)
    add("coreset_10pct_128d", "authors_loop", base)
    add("coreset_1pct_exact", "authors_loop", base_exact)
    picks_by_kernel = {}
    for kernel in patchcore_fast.coreset.CUDA_KERNELS:
        impl = f"patchcore_fast_{kernel}"
        ours = patchcore_fast.greedy_coreset(train, w.ratio, cuda_kernel=kernel)
        ours_exact = patchcore_fast.greedy_coreset(train, 0.01, projection_dim=None, cuda_kernel=kernel)
        same = ours == ref
        first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else len(ours)
        check = {
            "n": len(ours), "identical_to_reference": bool(same.all()), "first_difference": first_diff,
            "fraction_positions_equal": same.float().mean().item(),
            "greedy_valid_fraction": greedy_check(space, ours, initial),
            "exact_1pct_identical_to_reference": bool((ours_exact == ref_exact).all()),
            "exact_1pct_fraction_positions_equal": (ours_exact == ref_exact).float().mean().item(),
        }
        # Both kernels settle every uncertain row with the same float32 sums: picks must be equal.
        if picks_by_kernel:
            first_picks, first_exact = next(iter(picks_by_kernel.values()))
            check["identical_to_other_kernel"] = bool(torch.equal(ours, first_picks) and torch.equal(ours_exact, first_exact))
        picks_by_kernel[kernel] = (ours, ours_exact)
        checks[f"coreset_{kernel}"] = check
        print(f"coreset check ({kernel})", check, flush=True)
        save()
        add("coreset_10pct_128d", impl, cuda_time(lambda: patchcore_fast.greedy_coreset(train, w.ratio, cuda_kernel=kernel), 10),
            base, flops=coreset_flops, bytes_=w.rows * w.dim * 4)
        kernel_only = cuda_time(
            lambda: patchcore_fast._extension._C.greedy_coreset(space, initial, steps, cuda_kernel=kernel), 10)
        add("coreset_10pct_128d_kernel", impl, kernel_only, base, flops=coreset_flops)
        add("coreset_1pct_exact", impl,
            cuda_time(lambda: patchcore_fast.greedy_coreset(train, 0.01, projection_dim=None, cuda_kernel=kernel), 5), base_exact,
            flops=3.0 * n_exact * w.rows * w.dim, bytes_=w.rows * w.dim * 4)
        if kernel == "resident":
            checks["coreset_resident_stages_10pct"] = stage_breakdown(space, initial, steps, kernel_only)
            print("resident stages, 10 % 128-d:", checks["coreset_resident_stages_10pct"], flush=True)
        save()

    save()
    print(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
