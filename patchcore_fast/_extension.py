"""Loads the compiled kernels (patchcore_fast._C), or records why they are missing.

Without the extension the package still works: every kernel falls back to its pure-torch
reference, with one warning per process. Two cases are refused instead, because they would
fail later in a way that looks like a bug: an extension built against another torch release
(its symbols do not match: a linker error or worse), and one built with another CUDA major
version than torch's. A GPU the build has no kernels for gets the pure-torch path with one
warning.
"""

from __future__ import annotations

import re
import warnings

import torch

try:
    from . import _build_config
except ImportError:  # a source tree that was never built
    _build_config = None


def torch_mismatch(built: str, installed: str) -> str | None:
    """Why an extension built against torch `built` cannot run under torch `installed` (None when
    it can): C++ extensions are tied to their torch's major.minor release."""
    def release(version: str) -> tuple[int, ...]:
        match = re.match(r"(\d+)\.(\d+)", version)
        return (int(match[1]), int(match[2])) if match else ()

    if not built or release(built) == release(installed):
        return None
    base = re.match(r"[\d.]+", built)
    pin = base[0].rstrip(".") if base else built
    return (f"patchcore_fast was built against torch {built}, but torch {installed} is installed. "
            f"Install the torch it was built for (pip install torch=={pin}) or rebuild it against this "
            "torch: pip install --no-build-isolation --force-reinstall --no-deps patchcore_fast")


_MISMATCH = torch_mismatch(getattr(_build_config, "TORCH_VERSION", ""), torch.__version__)

try:
    from . import _C
except ImportError as error:  # not built, or built against another torch
    if _MISMATCH:
        raise ImportError(_MISMATCH) from None
    _C = None
    IMPORT_ERROR: Exception | None = error
else:
    IMPORT_ERROR = None
    if _MISMATCH:
        raise ImportError(_MISMATCH)


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


def cuda_architectures() -> list[str]:
    """The CUDA architectures this build has kernels for (CMake's notation: "80-real" machine
    code for sm_80, "90-virtual" PTX for compute_90, "86" both); empty without CUDA kernels."""
    if _C is None or not _C.build_info()["cuda"]:
        return []
    return [a for a in getattr(_build_config, "CUDA_ARCHITECTURES", "").replace(",", ";").split(";") if a]


def runs_on(capability: tuple[int, int], architectures: list[str]) -> bool:
    """Whether kernels built for `architectures` run on a GPU of compute `capability`: machine code
    for sm_XY runs on sm_XZ with Z >= Y (same major version); PTX for compute_XY is compiled by the
    driver for any GPU of capability >= X.Y."""
    for arch in architectures:
        match = re.fullmatch(r"(\d+)(\d)([af]?)(?:-(real|virtual))?", arch.strip())
        if match is None:
            continue
        built = (int(match[1]), int(match[2]))
        specific = bool(match[3])  # sm_90a: that exact GPU only
        machine_code, ptx = match[4] in (None, "real"), match[4] in (None, "virtual")
        if specific:
            if built == tuple(capability):
                return True
            continue
        if machine_code and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if ptx and built <= tuple(capability):
            return True
    return False


def compiled(device: torch.device) -> bool:
    """Whether the compiled kernels can run on `device`; warns once when they cannot."""
    # warnings.warn at stacklevel 1 reports each of these from one line of this file, so Python's
    # default filter shows it once per process.
    if _C is None:
        warnings.warn(f"patchcore_fast: compiled kernels unavailable ({IMPORT_ERROR}); "
                      "using the pure-torch reference implementations", RuntimeWarning)
        return False
    if device.type == "cuda":
        if not _C.build_info()["cuda"]:
            warnings.warn("patchcore_fast: this build has no CUDA kernels; using the pure-torch reference on the GPU",
                          RuntimeWarning)
            return False
        capability = torch.cuda.get_device_capability(device)
        architectures = cuda_architectures()
        if not runs_on(capability, architectures):
            warnings.warn(unsupported_gpu_message(torch.cuda.get_device_name(device), capability, architectures),
                          RuntimeWarning)
            return False
    return device.type in ("cpu", "cuda")


def unsupported_gpu_message(name: str, capability: tuple[int, int], architectures: list[str]) -> str:
    return (f"patchcore_fast: no CUDA kernels for {name} (sm_{capability[0]}{capability[1]}) in this build "
            f"(architectures {', '.join(architectures) or 'none'}); using the pure-torch reference on the GPU. "
            f"To compile for it: CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES={capability[0]}{capability[1]}-real "
            "pip install --no-build-isolation --force-reinstall --no-deps patchcore_fast")


def build_info() -> dict:
    """How the installed extension was built: CUDA compiled or not, CUDA version and
    architectures, the torch it was built against, CPU instruction sets, OpenMP threads."""
    info = {"extension": _C is not None, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_built_against": getattr(_build_config, "TORCH_VERSION", None)}
    if _C is None:
        info.update(cuda=False, cuda_version=None, openmp_threads=None, import_error=str(IMPORT_ERROR))
    else:
        info.update(_C.build_info())
        info["torch_built_against"] = getattr(_build_config, "TORCH_VERSION", info.get("torch_built_against"))
    info["cuda_architectures"] = cuda_architectures()
    return info
