"""The one choice of the wide floating dtype, shared by the checks and the statistics."""

from __future__ import annotations

import torch

__all__ = ["wide_dtype"]


def wide_dtype(device: torch.device) -> torch.dtype:
    """fp64, for exact sample counts and for statistics whose squares must not overflow; fp32
    where the device has no fp64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64
