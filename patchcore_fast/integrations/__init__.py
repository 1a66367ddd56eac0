"""Drop-in use of patchcore_fast's kernels inside other anomaly-detection frameworks."""
