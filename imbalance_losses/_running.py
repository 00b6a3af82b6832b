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

from ._distributed import ProcessGroup, all_reduce_sum, is_distributed

__all__ = ["RunningSums", "sample_mean"]


def sample_mean(sums: Tensor, count: Tensor) -> Tensor:
    """``sums / count`` in fp32, and zero (never ``0 / 0``) when ``count == 0``."""
    return (sums / count.clamp_min(1.0).to(sums.dtype)).float()


def _count_dtype(device: torch.device) -> torch.dtype:
    """fp64 for exact sample counts, fp32 where the device has no fp64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class RunningSums:
    """Sum of per-modality values ``[M]`` and a sample count, since the last :meth:`reset`."""

    def __init__(self) -> None:
        self._sums: Tensor | None = None
        self._count: Tensor | None = None
        self._device: torch.device | None = None  # of the last added sums (kept over reset)

    @property
    def empty(self) -> bool:
        """True when nothing was added since the last reset."""
        return self._sums is None

    def add(self, sums: Tensor, count: int | Tensor) -> None:
        """Add per-modality sums ``[M]`` over ``count`` samples (both stay on the device).

        The sums are kept in fp32 and the count in fp64, exact past ``2**24`` samples (fp32 on
        devices without fp64, such as Apple's MPS). An integer ``count`` is written with
        ``torch.full``, which needs no host-to-device copy. Stored state on another device (a
        checkpoint loaded with ``map_location="cpu"``) moves to the device of ``sums``.
        """
        sums = sums.detach().float()
        self._device = sums.device
        dtype = _count_dtype(sums.device)
        if isinstance(count, Tensor):
            count_t = count.detach().to(device=sums.device, dtype=dtype)
        else:
            count_t = torch.full((), float(count), dtype=dtype, device=sums.device)
        if self._sums is None or self._count is None:
            self._sums, self._count = sums.clone(), count_t.clone()
            return
        if sums.shape != self._sums.shape:
            raise ValueError(
                f"running sums have shape {tuple(self._sums.shape)} but {tuple(sums.shape)} "
                "was added; the number of modalities changed between calls"
            )
        if self._sums.device != sums.device:
            self._sums = self._sums.to(sums.device)
            self._count = self._count.to(device=sums.device, dtype=dtype)
        self._sums += sums
        self._count += count_t

    def pooled(self, group: ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
        """``(sums [M] fp32, count)`` summed over the ranks of ``group`` (one all-reduce)."""
        if self._sums is None or self._count is None:
            raise RuntimeError("no statistics were added since the last reset")
        both = torch.cat([self._sums.to(self._count.dtype), self._count.reshape(1)])
        both = all_reduce_sum(both, group)
        return both[:-1].float(), both[-1]

    def mean(self, group: ProcessGroup | None = None) -> Tensor:
        """Pooled per-modality mean ``sums / count`` over every rank's samples (fp32).

        Zero when no rank contributed a sample (``count == 0``), never ``0 / 0``.
        """
        return sample_mean(*self.pooled(group))

    def pooled_or_join(
        self, size: int, device: torch.device, group: ProcessGroup | None, *, message: str
    ) -> tuple[Tensor, Tensor]:
        """:meth:`pooled`, where a rank that added nothing joins the collective with zeros.

        A rank whose share of an uneven last batch was empty must still take part in the
        all-reduce, or every other rank would wait for it; its zeros change no sum. If no rank
        added anything (or, in a single process, nothing was added), ``RuntimeError(message)``
        is raised, on every rank alike. Only a rank that joined empty reads the pooled count on
        the host; a rank with samples makes no host read.

        ``device`` is used for the zeros only if this pool never saw a tensor (otherwise the
        device of the last added sums, which is where the other ranks pool).
        """
        joined = self.empty
        if joined:
            if not is_distributed(group):
                raise RuntimeError(message)
            self.add(torch.zeros(size, device=self._device or device), 0)
        sums, count = self.pooled(group)
        if joined and float(count) == 0:
            self.reset()
            raise RuntimeError(message + " (on every rank)")
        return sums, count

    def reset(self) -> None:
        """Forget everything added so far."""
        self._sums = self._count = None

    def state_dict(self) -> dict[str, Any]:
        """Copies of the local (not yet pooled) sums and count; later adds do not change them."""
        return {
            "sums": None if self._sums is None else self._sums.clone(),
            "count": None if self._count is None else self._count.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (copies of) what :meth:`state_dict` returned."""
        sums, count = state["sums"], state["count"]
        self._sums = None if sums is None else sums.detach().clone().float()
        self._count = (
            None if count is None else count.detach().to(_count_dtype(count.device), copy=True)
        )
