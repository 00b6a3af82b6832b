"""Running sums of per-modality statistics, pooled over micro-batches and processes.

Gradient accumulation and periodic decisions both need a statistic over *several* batches: the
sum of each modality's per-sample values and the number of samples. :class:`RunningSums` keeps
both on the device (no host sync while adding) and pools them across ranks with one all-reduce
when the value is needed (:meth:`RunningSums.pool`), so the mean is exactly the mean over the
global set of samples.

The same all-reduce carries what every method needs to stay in step across ranks:

* the number of batch **rows** added, so an optimiser step whose global batch was empty (every
  rank had ``B = 0``) is recognised on every rank and made a no-op (:attr:`Pooled.empty`);
* a **failure flag**: a rank whose input failed validation in a call that pools joins the same
  collective with the flag set (:meth:`RunningSums.join_failed`) and raises its own error, and
  every other rank raises too, in the same call, so the ranks' collectives stay paired;
* optional **extra** values the caller wants summed in the same collective (a rank-consistency
  fingerprint, say).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .distributed import ProcessGroup, all_reduce_sum, is_distributed
from .dtypes import wide_dtype
from .validation import _assert_on_device

__all__ = ["Pooled", "RunningSums", "sample_mean", "wide_dtype"]

OTHER_RANK_FAILED = (
    "input validation failed on another rank in this same call (see that rank's error); every "
    "rank raises here so that the ranks' collectives stay paired: skip this batch on every rank "
    "or on none"
)


def sample_mean(sums: Tensor, count: Tensor) -> Tensor:
    """``sums / count`` in fp32, and zero (never ``0 / 0``) when ``count == 0``.

    A 0-dim ``count`` of another floating dtype is cast to the sums' dtype by the division
    itself (the same value as an explicit cast, one op less).
    """
    if count.dim() == 0 and count.is_floating_point() and sums.is_floating_point():
        return (sums / count.clamp_min(1.0)).float()
    return (sums / count.clamp_min(1.0).to(sums.dtype)).float()


class Pooled(NamedTuple):
    """What :meth:`RunningSums.pool` returns: sums over every rank since the last pool."""

    sums: Tensor
    """``[M]`` fp32, the per-modality sums over every rank's samples."""
    samples: Tensor
    """0-dim, the number of samples counted (fp64; fp32 on devices without fp64)."""
    extra: Tensor | None
    """The caller's ``extra`` values summed over ranks (``None`` if none were given)."""
    empty: bool
    """True when no rank added a single batch row: the step had no samples anywhere."""

    def mean(self) -> Tensor:
        """``sums / count`` (fp32), zero where ``count == 0``."""
        return sample_mean(self.sums, self.samples)


class RunningSums:
    """Sum of per-modality values ``[M]`` and a sample count, since the last :meth:`reset`."""

    def __init__(self) -> None:
        self._sums: Tensor | None = None
        self._count: Tensor | None = None
        self._rows = 0  # batch rows added (host int; ignored samples are rows, not counted)
        self._device: torch.device | None = None  # of the last added sums (kept over reset)

    @property
    def empty(self) -> bool:
        """True when nothing was added since the last reset."""
        return self._sums is None

    def add(self, sums: Tensor, count: int | Tensor, rows: int | None = None) -> None:
        """Add per-modality sums ``[M]`` over ``count`` samples (both stay on the device).

        ``rows`` is the number of batch rows behind the sums (a host int; default ``count``
        when that is an int). It differs from ``count`` when some samples are not counted
        (``ignore_index`` targets); only whether any rank added a row matters (:meth:`pool`).

        The sums are kept in fp32 and the count in fp64, exact past ``2**24`` samples (fp32 on
        devices without fp64, such as Apple's MPS). An integer ``count`` is written with
        ``torch.full``, which needs no host-to-device copy. Stored state on another device (a
        checkpoint loaded with ``map_location="cpu"``) moves to the device of ``sums``.
        """
        if rows is None:
            if isinstance(count, Tensor):
                raise TypeError("RunningSums.add: pass rows= (a host int) with a tensor count")
            rows = count
        self._rows += int(rows)
        sums = sums.detach().float()
        self._device = sums.device
        dtype = wide_dtype(sums.device)
        if isinstance(count, Tensor):
            count_t = count.detach().to(device=sums.device, dtype=dtype)
        else:
            count_t = torch.full((), float(count), dtype=dtype, device=sums.device)
        if self._sums is None or self._count is None:  # kept as given: never changed in place
            self._sums, self._count = sums, count_t
            return
        if sums.shape != self._sums.shape:
            raise ValueError(
                f"running sums have shape {tuple(self._sums.shape)} but {tuple(sums.shape)} "
                "was added; the number of modalities changed between calls"
            )
        if self._sums.device != sums.device:
            self._sums = self._sums.to(sums.device)
            self._count = self._count.to(device=sums.device, dtype=dtype)
        self._sums = self._sums + sums  # out of place: an added tensor is never changed
        self._count = self._count + count_t

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

    def _payload(
        self, size: int, device: torch.device, *, failed: bool, extra: Tensor | None
    ) -> Tensor:
        """``[sums(size), count, rows, added, failed, *extra]`` in the count dtype.

        The three flags are written with ``fill_`` from Python numbers: no host-to-device copy.
        """
        if self._sums is None or self._count is None:
            device = self._device or device
            sums = torch.zeros(size + 1, device=device, dtype=wide_dtype(device))  # + count
        else:
            if self._sums.shape[0] != size:
                raise ValueError(
                    f"running sums have {self._sums.shape[0]} values but {size} are pooled; "
                    "the number of modalities changed between calls"
                )
            sums = torch.cat([self._sums.to(self._count.dtype), self._count.reshape(1)])
        flags = sums.new_zeros(3)
        for i, value in enumerate((self._rows, not self.empty, failed)):
            if value:
                flags[i].fill_(float(value))
        parts = [sums, flags]
        if extra is not None:
            parts.append(extra.detach().to(device=sums.device, dtype=sums.dtype).reshape(-1))
        return torch.cat(parts)

    def pool(
        self,
        size: int,
        device: torch.device,
        group: ProcessGroup | None = None,
        *,
        missing: str,
        extra: Tensor | None = None,
    ) -> Pooled:
        """Pool everything added since the last pool over the ranks of ``group``, then reset.

        One all-reduce of ``[sums(size), count, rows, added, failed, *extra]``. A rank that
        added nothing (its share of an uneven last batch was empty) joins with zeros, so the
        other ranks never wait for it. ``device`` places those zeros when this pool never saw a
        tensor (otherwise the device of the last added sums, where the other ranks pool).

        Returns :class:`Pooled`; ``empty`` is True when no rank added a row (a no-op step for
        the caller). A rank that added rows makes no host read; one that did not reads the
        pooled row count.

        Raises:
            RuntimeError: ``missing``, when nothing at all was added (not even an empty batch)
                in a single process, or on any rank of a group in which no rank added anything;
                or, on every rank but the failing one, when another rank called
                :meth:`join_failed` in the same call.
        """
        distributed = is_distributed(group)
        if self.empty and not distributed:
            raise RuntimeError(missing)
        if not distributed:  # the payload's values, without building it (no collective)
            return self._local(size, extra)
        added, had_rows = not self.empty, self._rows > 0
        pooled = all_reduce_sum(self._payload(size, device, failed=False, extra=extra), group)
        self.reset()
        if distributed:
            _assert_on_device(pooled[size + 3] == 0, OTHER_RANK_FAILED, RuntimeError)
            if not added and float(pooled[size + 2]) == 0:
                raise RuntimeError(missing + " (on every rank)")
        empty = not had_rows and (not distributed or float(pooled[size + 1]) == 0)
        return Pooled(
            sums=pooled[:size].float(),
            samples=pooled[size],
            extra=None if extra is None else pooled[size + 4 :],
            empty=empty,
        )

    def _local(self, size: int, extra: Tensor | None) -> Pooled:
        """:meth:`pool` in a single process: the same values, with no payload to assemble."""
        assert self._sums is not None and self._count is not None
        if self._sums.shape[0] != size:
            raise ValueError(
                f"running sums have {self._sums.shape[0]} values but {size} are pooled; "
                "the number of modalities changed between calls"
            )
        sums, count, rows = self._sums, self._count, self._rows
        if extra is not None:
            extra = extra.detach().to(device=count.device, dtype=count.dtype).reshape(-1)
        self.reset()
        return Pooled(sums=sums, samples=count, extra=extra, empty=rows == 0)

    def join_failed(
        self,
        size: int,
        device: torch.device,
        group: ProcessGroup | None = None,
        *,
        extra_size: int = 0,
    ) -> None:
        """Join the :meth:`pool` collective of this call with the failure flag set (under DDP).

        For a rank whose input failed validation in a call in which the other ranks pool: it
        calls this and then raises its own error, and every other rank's :meth:`pool` raises
        too, so all ranks fail in the same call, and every rank's pool is reset (the statistics of
        the failed call's step are dropped everywhere alike). ``size`` and ``extra_size`` must be
        what the other ranks pool. Without a process group it does nothing: the bad batch raises
        and the statistics added before it stay.
        """
        if is_distributed(group):
            extra = torch.zeros(extra_size) if extra_size else None
            self.reset()
            all_reduce_sum(self._payload(size, device, failed=True, extra=extra), group)

    @contextmanager
    def failing_together(
        self,
        size: int,
        device: torch.device,
        group: ProcessGroup | None = None,
        *,
        extra_size: int = 0,
        due: bool = True,
    ) -> Iterator[None]:
        """``with pool.failing_together(...): <checks>``: an exception inside joins the pool.

        If the block raises and ``due`` (this call pools), :meth:`join_failed` runs before the
        exception propagates, so the other ranks fail in the same call instead of waiting.
        """
        try:
            yield
        except Exception:
            if due:
                self.join_failed(size, device, group, extra_size=extra_size)
            raise

    def reset(self) -> None:
        """Forget everything added so far."""
        self._sums = self._count = None
        self._rows = 0

    def state_dict(self) -> dict[str, Any]:
        """Copies of the local (not yet pooled) sums and count; later adds do not change them."""
        return {
            "sums": None if self._sums is None else self._sums.clone(),
            "count": None if self._count is None else self._count.clone(),
            "rows": self._rows,
        }

    def all_ranks_state(
        self, size: int, device: torch.device, group: ProcessGroup | None = None
    ) -> dict[str, Any]:
        """:meth:`state_dict` of every rank's sums together, nothing reset: one all-reduce of
        the :meth:`pool` payload (call it on every rank of ``group``). For a checkpoint that one
        rank writes and every rank reads; without a process group, the local state.
        """
        if not is_distributed(group):
            return self.state_dict()
        total = all_reduce_sum(self._payload(size, device, failed=False, extra=None), group)
        if float(total[size + 2]) == 0:  # no rank added anything: nothing to resume
            return {"sums": None, "count": None, "rows": 0}
        return {
            "sums": total[:size].float(),
            "count": total[size].clone(),
            "rows": round(float(total[size + 1])),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (copies of) what :meth:`state_dict` returned."""
        sums, count = state["sums"], state["count"]
        self._sums = None if sums is None else sums.detach().clone().float()
        self._count = (
            None if count is None else count.detach().to(wide_dtype(count.device), copy=True)
        )
        # older states have no row count: every counted sample was a row
        self._rows = int(state.get("rows", 0 if count is None else round(float(count))))
