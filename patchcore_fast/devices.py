"""Devices named by users: one canonical torch.device each, or one clear error."""

from __future__ import annotations

import torch

from .errors import UserError


def available() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def resolve(device=None) -> torch.device:
    """The device `device` names, spelt one way ("cpu", "cuda:N"), so that equal devices compare
    equal; None: the first GPU if there is one, else the CPU. A device this machine lacks, or a
    name torch does not know, is a UserError naming the devices there are."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"unknown device {device!r}: this machine has {', '.join(available())}") from error
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(device)!r}: this machine has no CUDA GPU (torch sees none); "
                            f"available: {', '.join(available())}")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(f"device {str(device)!r}: no such GPU; available: {', '.join(available())}")
        return torch.device("cuda", index)
    raise UserError(f"device {str(device)!r} is not supported: patchcore_fast runs on {', '.join(available())}")
