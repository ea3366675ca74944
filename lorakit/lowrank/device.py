"""Device selection shared by every command (``--device auto|cpu|cuda``).

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import torch

from lorakit.errors import OptionError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError("--device cuda was asked for but no CUDA device is available",
                              key="device", hint="use --device auto or cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise OptionError(f"unknown device {name!r} (use auto, cpu or cuda)", key="device")
