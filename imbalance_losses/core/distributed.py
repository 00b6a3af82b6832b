"""The one place that talks to ``torch.distributed``.

Every statistic that drives a coefficient or a structural decision goes through
:func:`all_reduce_sum` before use, so every rank computes the same value, equal to what one process
would compute on the global batch. Without an initialised process group it is the identity, so
single-process use needs no setup.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ProcessGroup",
    "all_gather_rows",
    "all_reduce_sum",
    "gathering_together",
    "is_distributed",
    "is_sharded",
    "same_on_all_ranks",
    "stream_seed",
    "world_size",
]

ProcessGroup = dist.ProcessGroup
"""The type of the optional ``process_group`` argument every module accepts."""


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and has more than one member."""
    return dist.is_available() and dist.is_initialized() and world_size(group) > 1


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is an FSDP2-sharded ``DTensor`` (checked by type name: no import of
    ``torch.distributed.tensor`` on the hot path, and no failure where it is unavailable)."""
    return type(tensor).__name__ == "DTensor"


def world_size(group: ProcessGroup | None = None) -> int:
    """Processes in ``group`` (the default group when ``None``); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def _transport_error(what: str, shape: tuple[int, ...], err: RuntimeError) -> RuntimeError:
    return RuntimeError(
        f"imbalance_losses: the {what} of {shape} statistics failed on rank {dist.get_rank()}; "
        "another rank most likely raised an error or exited before reaching the same call (look "
        f"at the other ranks' tracebacks). The backend said: {err}"
    )


def _all_reduce(tensor: Tensor, group: ProcessGroup | None, op: dist.ReduceOp.RedOpType) -> Tensor:
    if not is_distributed(group):
        return tensor.detach()
    out = tensor.detach().clone()
    try:
        dist.all_reduce(out, op=op, group=group)
    except RuntimeError as err:  # DistBackendError and gloo's transport errors are RuntimeErrors
        raise _transport_error("all-reduce", tuple(tensor.shape), err) from err
    return out


def _all_gather(tensor: Tensor, group: ProcessGroup | None) -> list[Tensor]:
    out = [torch.empty_like(tensor) for _ in range(world_size(group))]
    try:
        dist.all_gather(out, tensor.contiguous(), group=group)
    except RuntimeError as err:
        raise _transport_error("all-gather", tuple(tensor.shape), err) from err
    return out


def all_reduce_sum(tensor: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Sum ``tensor`` over the processes of ``group`` and return the result.

    The result is detached from autograd and the input is never modified. Without a process
    group it is ``tensor.detach()`` itself (no copy, no communication). It stays on the tensor's
    device: no host sync beyond the collective itself.

    Raises:
        RuntimeError: the collective failed (typically another rank died: gloo's "connection
            reset by peer"); the message says so and chains the backend's error.
    """
    return _all_reduce(tensor, group, dist.ReduceOp.SUM)


def same_on_all_ranks(values: Tensor, group: ProcessGroup | None = None) -> bool:
    """Whether every rank of ``group`` holds exactly ``values`` (``True`` without DDP).

    One all-reduce (maximum) of ``[v, -v]``: the values agree iff ``max_r v == min_r v``
    elementwise, exactly, whatever their magnitude. Every rank reads the same pooled result, so
    every rank gets the same answer. A host read: for decisions taken once per check or window,
    not per step.
    """
    if not is_distributed(group):
        return True
    v = values.detach().double().reshape(-1)
    both = _all_reduce(torch.cat([v, -v]), group, dist.ReduceOp.MAX)
    return bool(torch.equal(both[: v.shape[0]], -both[v.shape[0] :]))


def all_gather_rows(
    rows: Tensor,
    group: ProcessGroup | None = None,
    *,
    failed: bool = False,
    message: str = "another rank failed before this collective; every rank raises",
) -> Tensor:
    """Every rank's ``rows`` ``[n_r, W]`` concatenated in rank order: ``[sum_r n_r, W]``.

    The ranks may hold different numbers of rows (an uneven last shard, a filtered split); the
    width ``W`` must agree, except on a rank with no rows, which takes the others' width (so a
    rank that saw no sample need not know it). Two all-gathers: each rank's ``(n_r, W, failed)``,
    then the rows padded to the largest ``n_r`` (the padding is dropped). Without a process
    group it returns ``rows.detach()`` itself.

    A rank whose input failed calls it with ``failed=True`` (``rows``: any 2-D tensor on the
    collective's device) and raises its own error after it returns; every other rank raises
    ``RuntimeError(message)`` here, after the first gather, so no rank waits in the second.

    Raises:
        RuntimeError: another rank passed ``failed=True`` (``message``), or the transport
            failed (a dead peer).
        ValueError: ``rows`` is not 2-D, or ranks with rows have different widths (on every
            rank).
    """
    if rows.dim() != 2:
        raise ValueError(f"all_gather_rows needs rows [n, W], got shape {tuple(rows.shape)}")
    if not is_distributed(group):
        return rows.detach()
    meta = torch.tensor([rows.shape[0], rows.shape[1], int(failed)], device=rows.device)
    sizes = torch.stack(_all_gather(meta, group)).tolist()
    if any(f for _, _, f in sizes):
        if failed:
            return rows.detach()
        raise RuntimeError(message)
    widths = sorted({w for n, w, _ in sizes if n})
    if len(widths) > 1:
        raise ValueError(
            f"all_gather_rows: the ranks' rows have different widths {widths} (this rank: "
            f"shape {tuple(rows.shape)})"
        )
    longest = max(n for n, _, _ in sizes)
    padded = rows.new_zeros((longest, widths[0] if widths else rows.shape[1]))
    if not longest:
        return padded
    padded[: rows.shape[0]] = rows.detach()
    parts = _all_gather(padded, group)
    return torch.cat([part[:n] for part, (n, _, _) in zip(parts, sizes, strict=True)])


MASK64 = (1 << 64) - 1


def stream_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for draw ``stream`` of step ``step`` (splitmix64 finaliser, host ints)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + stream * 0xABC98388FB8FAC03) & (
        MASK64
    )
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


@contextmanager
def gathering_together(device: torch.device, group: ProcessGroup | None) -> Iterator[None]:
    """``with gathering_together(device, group): <collect this rank's rows>``.

    If the block raises under DDP, this rank joins the other ranks' next
    :func:`all_gather_rows` with ``failed=True`` before the exception propagates, so every rank
    raises in the same call instead of waiting (the gather counterpart of
    ``RunningSums.failing_together``).
    """
    try:
        yield
    except Exception:
        if is_distributed(group):
            all_gather_rows(torch.empty(0, 1, device=device), group, failed=True)
        raise
