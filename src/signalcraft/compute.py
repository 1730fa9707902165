"""Where torch runs: one rule for every ``device`` setting (cpu, cuda, auto)."""

from __future__ import annotations

from .errors import ConfigError


def torch_device(choice: str, key: str):
    """The torch device for a ``cpu`` / ``cuda`` / ``auto`` setting (auto: CUDA when
    present). ``key`` names the setting in the error for cuda without a CUDA device."""
    import torch

    if choice not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"{key}: unknown device {choice!r}; use auto, cuda or cpu.")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda requested but torch sees no CUDA device; use auto or cpu.")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")
