"""Turning a device name from a config or command line into a ``torch.device``.

The platform's one device resolver: extraction, trunk training, distillation, bulk
classification and the tools all call :func:`resolve_device`.
"""

from __future__ import annotations

import re

import torch

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a usable ``torch.device``.

    Args:
        name: ``auto`` picks CUDA when available, else the CPU. A ``torch.device`` is
            checked the same way (by its name).

    Raises:
        ValueError: one line, for an unknown name or a CUDA device this machine lacks.
    """
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    m = _CUDA_RE.match(key)
    if m is None:
        raise ValueError(f"device '{name}' is not one of: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device '{name}': CUDA is not available on this machine; use device=cpu or auto")
    index = int(m.group(1)) if m.group(1) is not None else None
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")
