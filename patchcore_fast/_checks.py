"""Input validation shared by the public kernel functions: clear errors naming the argument."""

from __future__ import annotations

import math
import numbers

import torch

_UPCAST = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def float_matrix(value, name: str) -> torch.Tensor:
    """A finite, non-empty 2-D float32 contiguous copy or view of `value`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _UPCAST:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32), got {value.dtype}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(value.shape)}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(value.shape)}")
    value = value.to(torch.float32).contiguous()
    if not all_finite(value):
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def all_finite(value: torch.Tensor) -> bool:
    # NaN and +-inf propagate through a sum, so a finite sum proves every element finite;
    # one reduction is much cheaper than an elementwise mask. Only a non-finite sum
    # (which may also be an overflow of large finite values) needs the exact check.
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def float_vector(value, name: str, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _UPCAST:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but features are on {device}")
    value = value.to(torch.float32).contiguous()
    if not all_finite(value):
        raise ValueError(f"{name} contains NaN or infinite values")
    if bool((value < 0).any()):
        raise ValueError(f"{name} must be non-negative distances")
    return value + 0.0  # -0.0 becomes +0.0: as a sign bit it would outrank every distance in a packed key


def distances_fit_float32(value: torch.Tensor, name: str, other: torch.Tensor | None = None) -> None:
    """Refuses values so large that a float32 squared distance between rows could overflow.

    With every |x_j| <= a, |q|^2 + |b|^2 + 2 |q.b| <= 4 dim a^2; keeping that below float32's
    largest value means no path (expanded form, direct form, any summation order) ever meets
    inf or NaN, so results are defined and equal everywhere.
    """
    largest = max(_max_abs(value), _max_abs(other) if other is not None else 0.0)
    limit = math.sqrt(torch.finfo(torch.float32).max / (4.0 * value.shape[1]))
    if largest > limit:
        raise ValueError(f"{name} hold values up to {largest:.3g}; beyond {limit:.3g} (for dim {value.shape[1]}) "
                         "squared distances overflow float32: rescale the features")


def _max_abs(value: torch.Tensor) -> float:
    low, high = torch.aminmax(value)
    return max(-float(low), float(high))


def integer(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


def boolean(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
