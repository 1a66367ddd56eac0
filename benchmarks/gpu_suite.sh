#!/usr/bin/env bash
# On a machine with a GPU: build the extension, run the CUDA tests, run the GPU benchmarks,
# and write OUTDIR/results.json (see gpu_report.py). Usage: bash benchmarks/gpu_suite.sh OUTDIR
# Anything that exercises the not-yet-measured "resident" coreset kernel runs in its own
# process after the rest, so that a failure there (a trap kills the CUDA context) costs
# nothing else. The CPU emulation of the CUDA kernels (tests/test_cuda_kernels_on_cpu.py)
# is skipped here: the real kernels run instead.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
repo=$PWD

echo "== build"
$py -m pip install --no-build-isolation --no-deps --no-index -v . \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir=/tmp/patchcore_build >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
grep -E "ptxas info *: Used|spill" "$out/build.log" | sort -u | tail -12
$py -c "import patchcore_fast, json; print(json.dumps(patchcore_fast.build_info()))"

echo "== tests"
(cd /tmp && $py -m pytest "$repo/tests" -q -p no:cacheprovider -k "not resident and not emulated" 2>&1 | tee "$out/tests.log" | tail -5)
(cd /tmp && timeout 300 $py -m pytest "$repo/tests" -q -p no:cacheprovider -k "resident and not emulated" 2>&1 \
  | tee "$out/tests_resident.log" | tail -8)

echo "== pytest-benchmark (GPU)"
(cd /tmp && $py -m pytest "$repo/benchmarks" -q -k "cuda and not resident" -p no:cacheprovider \
  --benchmark-json="$out/bench.json" --benchmark-columns=median,min,max,rounds 2>&1 | tee "$out/bench.log" | tail -25)
(cd /tmp && timeout 120 $py -m pytest "$repo/benchmarks" -q -k "cuda and resident" -p no:cacheprovider \
  --benchmark-json="$out/bench_resident.json" --benchmark-columns=median,min,max,rounds 2>&1 \
  | tee "$out/bench_resident.log" | tail -8)

echo "== distributed coreset on one GPU (NCCL, one rank)"
timeout 300 $py benchmarks/gpu_distributed_coreset.py "$out" 2>&1 | tee "$out/distributed_coreset.log" | tail -30

echo "== report"
timeout 400 $py benchmarks/gpu_report.py "$out" "$out/bench.json" "$out/bench_resident.json" 2>&1 | tee "$out/report.log"

if [ -n "${NCU:-}" ]; then
  echo "== Nsight Compute: knn kernel"
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 180 "$ncu_bin" --clock-control none -k regex:knn_tiles -c 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    $py benchmarks/ncu_knn.py >"$out/ncu_knn.txt" 2>&1
  grep -E "Duration|Throughput|Occupancy|Stall|Issue|Registers|Executed Ipc|Block Limit" "$out/ncu_knn.txt" | head -40
fi
