"""patchcore_fast: PatchCore anomaly detection with fused C++/CUDA coreset and kNN kernels."""

from ._extension import build_info
from .coreset import greedy_coreset
from .knn import knn

__all__ = ["build_info", "greedy_coreset", "knn"]
__version__ = "0.1.0"
