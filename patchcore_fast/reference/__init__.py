"""Pure-torch references of the kernels: the test oracles, the benchmark baselines,
and the fallback when the compiled extension is missing."""

from .coreset import greedy_coreset_reference, pairwise_l2, reference_seeded_start
from .knn import knn_reference

__all__ = ["greedy_coreset_reference", "knn_reference", "pairwise_l2", "reference_seeded_start"]
