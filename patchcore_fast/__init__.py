"""patchcore_fast: PatchCore anomaly detection with fused C++/CUDA coreset and kNN kernels."""

from ._version import __version__  # noqa: E402,F401

from ._extension import build_info  # noqa: E402
from .coreset import continued_coreset, greedy_coreset  # noqa: E402
from .knn import knn  # noqa: E402
from .index import FlatIndex, Index, PrunedIndex  # noqa: E402
from .model import PatchCore  # noqa: E402
from .ensemble import PatchCoreEnsemble  # noqa: E402
from .prediction import Prediction  # noqa: E402

__all__ = ["FlatIndex", "Index", "PatchCore", "PatchCoreEnsemble", "Prediction", "PrunedIndex", "build_info", "continued_coreset", "greedy_coreset", "knn"]
