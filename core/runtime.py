"""Where and in what precision code runs: the names configs use (`runtime.device`, `runtime.dtype`,
`reward.dtype`) turned into torch objects, with one clear error for a device that is not there."""

from __future__ import annotations

import torch

from core.config import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype a config name stands for (a torch dtype passes through)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto`: CUDA when visible, else the CPU; `cuda` without a visible GPU is an error saying what to set."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is set but no CUDA device is visible: set it to cpu or auto")
    return torch.device(name)
