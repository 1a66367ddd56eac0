"""patchcore_fast: PatchCore anomaly detection with fused C++/CUDA coreset and kNN kernels."""

__version__ = "0.1.0"

from ._extension import build_info  # noqa: E402
from .coreset import greedy_coreset  # noqa: E402
from .knn import knn  # noqa: E402
from .model import PatchCore, Prediction  # noqa: E402
from .search_index import SearchIndex  # noqa: E402

__all__ = ["PatchCore", "Prediction", "SearchIndex", "build_info", "greedy_coreset", "knn"]
