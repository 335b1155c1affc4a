"""Choosing the device the user asked for, with a clear error when it is not there.

The dtype is a fixed set of names: `sdcompress.choices.resolve_dtype`.
"""

from __future__ import annotations

import torch

from sdcompress.errors import SdcError


def resolve_device(name: str = "auto") -> torch.device:
    if name in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SdcError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SdcError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SdcError(
                f"--device {name} does not exist; this machine has {torch.cuda.device_count()} GPU(s)."
            )
    elif device.type not in ("cpu", "mps"):
        raise SdcError(f"--device {name!r} is not supported; use auto, cpu or cuda.")
    return device
