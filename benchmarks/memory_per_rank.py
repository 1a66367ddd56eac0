"""Peak resident memory per rank of a sharded fit, save, load and predict, for 1, 2 and 3 ranks on
the same data (issue 21: what the features and the bank take must fall as 1 / ranks).

    python benchmarks/memory_per_rank.py            # runs 1, 2 and 3 ranks, prints a table

Each rank measures, for each phase, its peak resident memory above the baseline taken after
start-up (torch, the backbone, the process group), the peak being reset before the phase
(/proc/self/clear_refs). The training features are synthetic (IMAGES images of Lite0's grid,
1024-d, a few dominant directions as real features have), each rank generating only its share;
predict scores TEST_IMAGES of tire's test images, streamed batch by batch. Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

IMAGES, TEST_IMAGES = 240, 32
TIRE_TEST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec3d_rgb" / "tire" / "test"


def _status(field: str) -> float:
    """A /proc/self/status field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def rank_main(out: Path) -> None:
    import gc

    import torch

    from patchcore_fast import PatchCore, distributed
    from patchcore_fast.data import image_files

    distributed.init_from_environment()
    rank, size = distributed.rank_and_size()
    model = PatchCore(backbone="efficientnet_lite0", progress=False)
    patches = model.grid[0] * model.grid[1]
    gc.collect()
    baseline = _status("VmRSS")
    phases, own = {}, {}
    began = [baseline]

    def phase(name):  # the phase's peak above the baseline, and above what was held when it began
        gc.collect()
        phases[name] = round(_status("VmHWM") - baseline)
        own[name] = round(_status("VmHWM") - began[0])
        _reset_peak()
        began[0] = _status("VmRSS")

    _reset_peak()
    start, stop = distributed.shard(IMAGES)
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(24, 1024, generator=g)
    features = torch.empty(stop - start, patches, 1024)
    for i in range(start, stop):  # image i's features, whatever the rank count
        gi = torch.Generator().manual_seed(1000 + i)
        features[i - start] = (torch.randn(patches, 24, generator=gi) @ basis
                               + 0.2 * torch.randn(patches, 1024, generator=gi)).abs()
    phase("training features")
    model.fit_features(features)
    phase("fit")
    path = out / "memory.pcf"
    model.save(path)
    phase("save")
    del model, features
    gc.collect()
    _reset_peak()
    began[0] = _status("VmRSS")
    loaded = PatchCore.load(path, progress=False)
    phase("load")
    tests = [p for d in sorted(TIRE_TEST.iterdir()) for p in image_files(d)][:TEST_IMAGES]
    scored = sum(len(part.scores) for part, _ in loaded.predict_batches(tests))
    phase("predict")
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "ranks": size, "baseline": round(baseline),
                                                      "scored": scored, "peak": phases, "own": own}))
    distributed.shutdown()


def run(ranks: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, "--rank", str(out)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] + command[1:]
    subprocess.run(command, env=env, check=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ranks in (1, 2, 3):
            rows += run(ranks, Path(folder) / str(ranks))
    names = ["training features", "fit", "save", "load", "predict"]
    print("Peak MiB above the rank's start-up baseline (in brackets: above what the rank held when the phase began)")
    print("| ranks | rank | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for r in rows:
        cells = [f"{r['peak'][n]} ({r['own'][n]})" for n in names]
        print(f"| {r['ranks']} | {r['rank']} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank":
        rank_main(Path(sys.argv[2]))
    else:
        main()
