"""Placeholder: `ARLLoss` is being implemented (see the open issue)."""

from __future__ import annotations

__all__: list[str] = []
