"""One W1 knn launch, for profiling the fused kernel under Nsight Compute (see gpu_suite.sh)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import patchcore_fast  # noqa: E402
from workloads import W1  # noqa: E402

test = W1.test_features("cuda")
bank = W1.features("cuda")[: W1.bank_rows].contiguous()
patchcore_fast.knn(test, bank, 1)
torch.cuda.synchronize()
