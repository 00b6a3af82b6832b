"""Running sums of per-modality statistics, pooled over micro-batches and processes.

Gradient accumulation and periodic decisions both need a statistic over *several* batches: the
sum of each modality's per-sample values and the number of samples. :class:`RunningSums` keeps
both on the device (no host sync while adding) and pools them across ranks with one all-reduce
when the value is needed, so the mean is exactly the mean over the global set of samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._distributed import ProcessGroup, all_reduce_sum

__all__ = ["RunningSums"]


class RunningSums:
    """Sum of per-modality values ``[M]`` and a sample count, since the last :meth:`reset`."""

    def __init__(self) -> None:
        self._sums: Tensor | None = None
        self._count: Tensor | None = None

    @property
    def empty(self) -> bool:
        """True when nothing was added since the last reset."""
        return self._sums is None

    def add(self, sums: Tensor, count: int | Tensor) -> None:
        """Add per-modality sums ``[M]`` over ``count`` samples (both stay on the device)."""
        sums = sums.detach().float()
        count_t = torch.as_tensor(count, dtype=torch.float32, device=sums.device)
        if self._sums is None or self._count is None:
            self._sums, self._count = sums.clone(), count_t.clone()
        else:
            if sums.shape != self._sums.shape:
                raise ValueError(
                    f"running sums have shape {tuple(self._sums.shape)} but {tuple(sums.shape)} "
                    "was added; the number of modalities changed between calls"
                )
            self._sums += sums
            self._count += count_t

    def pooled(self, group: ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
        """``(sums [M], count)`` summed over the processes of ``group`` (one all-reduce)."""
        if self._sums is None or self._count is None:
            raise RuntimeError("no statistics were added since the last reset")
        both = all_reduce_sum(torch.cat([self._sums, self._count.reshape(1)]), group)
        return both[:-1], both[-1]

    def mean(self, group: ProcessGroup | None = None) -> Tensor:
        """Pooled per-modality mean ``sums / count`` over every rank's samples."""
        sums, count = self.pooled(group)
        return sums / count

    def reset(self) -> None:
        """Forget everything added so far."""
        self._sums = self._count = None

    def state_dict(self) -> dict[str, Any]:
        """The local (not yet pooled) sums and count."""
        return {"sums": self._sums, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._sums, self._count = state["sums"], state["count"]
