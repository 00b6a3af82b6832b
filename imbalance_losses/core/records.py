"""Typed per-step diagnostics records.

Each module exposes what it decided on its last step as a frozen dataclass of tensors (``last``),
one entry per modality in mapping order. Reading the record costs nothing; converting it to
Python floats for a logger (:meth:`StepRecord.to_dict`) is the one place a host sync happens, and
only when the user asks for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

__all__ = ["StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """Base of every diagnostics record.

    ``modalities`` names the modalities in mapping order. Every other field is a tensor, either a
    per-modality vector of shape ``[M]`` (aligned with ``modalities``) or a scalar, or a plain
    Python value.

    Example:
        >>> import torch
        >>> from dataclasses import dataclass
        >>> from imbalance_losses import StepRecord
        >>> @dataclass(frozen=True)
        ... class MyRecord(StepRecord):
        ...     scores: torch.Tensor
        ...     step: int
        >>> MyRecord(("audio", "visual"), torch.tensor([0.25, 0.75]), 3).to_dict()
        {'scores/audio': 0.25, 'scores/visual': 0.75, 'step': 3.0}
    """

    modalities: tuple[str, ...]

    def to_dict(self) -> dict[str, float]:
        """Flatten to ``{"field/modality": value}`` (per-modality) and ``{"field": value}``.

        Ready for ``logger.log(record.to_dict())``. This reads the tensors on the host.
        """
        out: dict[str, float] = {}
        m = len(self.modalities)
        for field in dataclasses.fields(self):
            if field.name == "modalities":
                continue
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                flat = value.detach().float().cpu().reshape(-1).tolist()
                if value.dim() == 1 and value.shape[0] == m:
                    for name, v in zip(self.modalities, flat, strict=True):
                        out[f"{field.name}/{name}"] = v
                elif value.numel() == 1:
                    out[field.name] = flat[0]
                else:
                    for i, v in enumerate(flat):
                        out[f"{field.name}/{i}"] = v
            elif isinstance(value, bool | int | float):
                out[field.name] = float(value)
        return out
