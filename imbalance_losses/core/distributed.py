"""The one place that talks to ``torch.distributed``.

Every statistic that drives a coefficient or a structural decision goes through
:func:`all_reduce_sum` before use, so every rank computes the same value, equal to what one process
would compute on the global batch. Without an initialised process group it is the identity, so
single-process use needs no setup.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ProcessGroup", "all_reduce_sum", "is_distributed", "same_on_all_ranks", "world_size"]

ProcessGroup = dist.ProcessGroup
"""The type of the optional ``process_group`` argument every module accepts."""


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and has more than one member."""
    return dist.is_available() and dist.is_initialized() and world_size(group) > 1


def world_size(group: ProcessGroup | None = None) -> int:
    """Processes in ``group`` (the default group when ``None``); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def _all_reduce(tensor: Tensor, group: ProcessGroup | None, op: dist.ReduceOp.RedOpType) -> Tensor:
    if not is_distributed(group):
        return tensor.detach()
    out = tensor.detach().clone()
    try:
        dist.all_reduce(out, op=op, group=group)
    except RuntimeError as err:  # DistBackendError and gloo's transport errors are RuntimeErrors
        rank = dist.get_rank()
        raise RuntimeError(
            f"imbalance_losses: the all-reduce of {tuple(tensor.shape)} statistics failed on rank "
            f"{rank}; another rank most likely raised an error or exited before reaching the "
            f"same call (look at the other ranks' tracebacks). The backend said: {err}"
        ) from err
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
