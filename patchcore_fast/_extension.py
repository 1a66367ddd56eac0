"""Loads the compiled kernels (patchcore_fast._C), or records why they are missing.

Without the extension the package still works: every kernel falls back to its
pure-torch reference, with one warning per process.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C
except ImportError as error:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR: Exception | None = error
else:
    IMPORT_ERROR = None

_warned_fallback = False


def _check_cuda_matches_torch() -> None:
    """The extension's CUDA major version must be torch's, or its kernels would not load."""
    if _C is None:
        return
    info = _C.build_info()
    if not info["cuda"] or torch.version.cuda is None:
        return
    ours = info["cuda_version"].split(".")[0]
    theirs = torch.version.cuda.split(".")[0]
    if ours != theirs:
        raise RuntimeError(
            f"patchcore_fast was compiled with CUDA {info['cuda_version']} but torch uses CUDA "
            f"{torch.version.cuda}. Rebuild against this torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps ."
        )


_check_cuda_matches_torch()

#: Largest k the fused CUDA knn kernel keeps per query (0 without CUDA kernels).
CUDA_MAX_K = _C.build_info()["cuda_max_k"] if _C is not None else 0


def compiled(device: torch.device) -> bool:
    """Whether the compiled kernels can run on `device`; warns once when they are missing."""
    global _warned_fallback
    if _C is None:
        if not _warned_fallback:
            warnings.warn(
                f"patchcore_fast: compiled kernels unavailable ({IMPORT_ERROR}); "
                "using the pure-torch reference implementations",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_fallback = True
        return False
    if device.type == "cuda" and not _C.build_info()["cuda"]:
        if not _warned_fallback:
            warnings.warn(
                "patchcore_fast: this build has no CUDA kernels; using the pure-torch reference on the GPU",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_fallback = True
        return False
    return device.type in ("cpu", "cuda")


def build_info() -> dict:
    """How the installed extension was built: CUDA compiled or not, CUDA version, OpenMP threads."""
    info = {"extension": _C is not None, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if _C is None:
        info.update(cuda=False, cuda_version=None, openmp_threads=None, import_error=str(IMPORT_ERROR))
    else:
        info.update(_C.build_info())
    return info
