"""Per-objective gradients and their geometry, for methods that combine several losses' gradients.

A multi-objective gradient method (MMPareto, and any MGDA / PCGrad-style method after it) needs
each loss's gradient on a set of parameters *separately*, their dot products and norms, and a way
to average them over DDP ranks before it combines them. This module has those pieces:

* :func:`objective_gradients`: one ``torch.autograd.grad`` pass per loss over a parameter list
  (``allow_unused``: a parameter a loss does not reach gets ``None``), nothing written to
  ``.grad``;
* :func:`reached_leaves`: the leaf tensors (parameters) a set of losses reaches, found by walking
  the autograd graph, so a caller can also produce the gradient of the parameters it was not
  told about (a fusion head);
* :func:`norms`: per-tensor norms (one ``torch._foreach_norm``), fp32 accumulation whatever
  the gradient dtype (pass ``dtype=torch.float64`` where squares of fp32 entries must not
  overflow), as a ``[P]`` tensor on the device, no host sync;
* :class:`Runs`, :func:`segment_sum`: per-tensor values ``[P]`` summed per group ``[G]`` (a
  modality), so the flattened value of a group is the sum of its tensors' values:
  ``||flat(a)||^2 = sum_p ||a_p||^2``; :class:`Runs` also expands a group value to its tensors,
  one op each whatever the group sizes;
* :func:`min_norm_weight`: the two-vector min-norm (MGDA) weight in closed form;
* :func:`average_over_ranks_`: every gradient of a list averaged over the ranks of a process
  group, one all-reduce per dtype (gradients flattened into one buffer);
* :func:`agree_over_ranks`: what must agree over the ranks *before* that all-reduce (whether a
  rank's input failed, the parameters the losses reach, which of them any rank reached), so the
  ranks' collectives stay paired and their gradients identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .distributed import (
    ProcessGroup,
    all_reduce_sum,
    is_distributed,
    is_sharded,
    same_on_all_ranks,
    world_size,
)
from .dtypes import wide_dtype
from .running import OTHER_RANK_FAILED

__all__ = [
    "Runs",
    "agree_over_ranks",
    "average_over_ranks_",
    "inverse_sizes",
    "local_shards",
    "min_norm_weight",
    "norms",
    "objective_gradients",
    "reached_leaves",
    "segment_sum",
    "sum_and_square_sum",
]


def objective_gradients(
    losses: Sequence[Tensor],
    params: Sequence[Sequence[Tensor]],
    *,
    retain_graph: bool = False,
) -> list[list[Tensor | None]]:
    """``grads[j][i] = d losses[j] / d params[j][i]``, one backward pass per loss.

    Each loss ``j`` is differentiated with ``torch.autograd.grad`` with respect to its own list
    ``params[j]`` (autograd runs only the part of the graph between the loss and those
    parameters). Nothing is written to ``.grad``. A parameter the loss does not reach gets
    ``None`` (``allow_unused=True``); the caller decides whether that is zero or an error.

    Args:
        losses: scalar losses sharing one graph.
        params: one list of leaf tensors that require grad per loss (may be empty: no pass).
        retain_graph: keep the graph after the last pass (the earlier passes always keep it).

    Returns:
        One list per loss, aligned with ``params[j]``.
    """
    if len(losses) != len(params):
        raise ValueError(f"{len(losses)} losses but {len(params)} parameter lists")
    out: list[list[Tensor | None]] = []
    last = max((j for j, p in enumerate(params) if p), default=-1)
    for j, (loss, inputs) in enumerate(zip(losses, params, strict=True)):
        if not inputs:
            out.append([])
            continue
        grads = torch.autograd.grad(
            loss, list(inputs), retain_graph=retain_graph or j < last, allow_unused=True
        )
        out.append(list(grads))
    return out


def reached_leaves(roots: Sequence[Tensor]) -> list[Tensor]:
    """Every leaf tensor that requires grad and that some root's graph reaches, once each.

    Walks ``grad_fn.next_functions`` from the roots (a Python loop over the graph's nodes, not
    over data: no host sync); a leaf is an ``AccumulateGrad`` node's ``variable``. Order: first
    reached first (deterministic for a given graph).
    """
    # id -> node: holding every visited node keeps its id from being reused by a new Python
    # wrapper (torch < 2.13 hands out a fresh wrapper per ``next_functions`` access, and a freed
    # wrapper's id may come back for another node, which a set of ids alone would skip)
    seen: dict[int, object] = {}
    leaves: list[Tensor] = []
    found: set[int] = set()
    stack = [r.grad_fn for r in reversed(roots) if r.grad_fn is not None]
    for r in roots:  # a root that is itself a leaf parameter
        if r.grad_fn is None and r.requires_grad and id(r) not in found:
            found.add(id(r))
            leaves.append(r)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            if id(variable) not in found:
                found.add(id(variable))
                leaves.append(variable)
            continue
        for child, _ in reversed(node.next_functions):
            if child is not None and id(child) not in seen:
                stack.append(child)
    return leaves


def norms(tensors: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``[P]``: ``||t_p||_2`` of each tensor, accumulated in ``dtype``: one ``torch._foreach_norm``.

    ``dtype`` must not narrow any tensor (use :func:`accumulation_dtype`); fp16 / bf16 gradients
    are accumulated in fp32, so their square sums cannot overflow. No host sync.
    """
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=dtype))


class Runs:
    """Consecutive runs of a list of tensors (one run per group, e.g. one modality's parameters).

    Reductions of per-tensor values ``[..., P]`` to per-run values ``[..., G]`` and the inverse
    expansion, one op each whatever the run lengths (``torch.segment_reduce`` /
    ``index_select``; on MPS, which lacks ``segment_reduce``, a zero fill and an ``index_add_``),
    no host sync. The run lengths and the tensor -> run index are copied to a device once, at
    the first use there, and kept (not pickled).

    Example:
        >>> import torch
        >>> from imbalance_losses.core.gradients import Runs
        >>> runs = Runs([1, 3])
        >>> runs.sum(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([1., 9.])
        >>> runs.expand(torch.tensor([10.0, 20.0]))
        tensor([10., 20., 20., 20.])
    """

    def __init__(self, counts: Sequence[int]) -> None:
        self.counts = tuple(int(c) for c in counts)
        if not self.counts or min(self.counts) < 1:
            raise ValueError(f"every run needs at least one tensor, got lengths {self.counts}")
        self._lengths: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
        self._index: dict[torch.device, Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickling / deepcopy: the lengths only (the device copies are rebuilt on first use)."""
        return {"counts": self.counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["counts"])  # type: ignore[misc]

    def _reduce(self, values: Tensor, how: str) -> Tensor:
        if values.device.type == "mps":  # no segment_reduce there
            return self._index_reduce(values, how)
        key = (values.device, tuple(values.shape[:-1]))
        if key not in self._lengths:
            lengths = torch.tensor(self.counts).expand(*key[1], -1).contiguous()
            self._lengths[key] = lengths.to(values.device)
        return torch.segment_reduce(
            values, how, lengths=self._lengths[key], axis=values.dim() - 1, unsafe=True
        )

    def _index_reduce(self, values: Tensor, how: str) -> Tensor:
        """:meth:`sum` / :meth:`mean` as a zero fill and an ``index_add_`` (MPS)."""
        out = values.new_zeros(*values.shape[:-1], len(self.counts))
        out.index_add_(-1, self._index_on(values.device), values)
        return out if how == "sum" else out / torch.tensor(self.counts, device=out.device)

    def _index_on(self, device: torch.device) -> Tensor:
        if device not in self._index:
            index = torch.repeat_interleave(torch.arange(len(self.counts)),
                                            torch.tensor(self.counts))  # fmt: skip
            self._index[device] = index.to(device)
        return self._index[device]

    def sum(self, values: Tensor) -> Tensor:
        """``[..., G]``: the sum of each run of ``values`` ``[..., P]`` (NaN stays in its run)."""
        return self._reduce(values, "sum")

    def mean(self, values: Tensor) -> Tensor:
        """``[..., G]``: the mean of each run of ``values`` ``[..., P]``."""
        return self._reduce(values, "mean")

    def expand(self, values: Tensor) -> Tensor:
        """``[..., P]``: each run's value of ``values`` ``[..., G]`` repeated over its tensors."""
        return values.index_select(-1, self._index_on(values.device))


def segment_sum(values: Tensor, counts: Sequence[int]) -> Tensor:
    """``[G]``: sums of consecutive runs of ``values`` ``[P]`` of lengths ``counts`` (host ints).

    With the tensors of each group (modality) stored one group after the other, this is the
    group's flattened value: ``<flat(a), flat(b)>_g = sum_{p in g} <a_p, b_p>``. No index tensor
    (no host-to-device copy), no host sync.
    """
    counts = list(counts)
    if len(set(counts)) == 1:  # runs of one length: one row sum each, one op
        return values.reshape(len(counts), counts[0]).sum(1)
    return torch.stack([run.sum() for run in torch.split(values, counts)])


def min_norm_weight(aa: Tensor, ab: Tensor, bb: Tensor) -> Tensor:
    """The weight ``k`` on ``a`` of the minimum-norm point of the segment ``[b, a]``.

    ::

        k* = argmin_{k in [0, 1]} ||k a + (1 - k) b||^2
           = clip( (<b, b> - <a, b>) / ||a - b||^2, 0, 1 ),   ||a - b||^2 = <a,a> + <b,b> - 2<a,b>

    (the two-objective MGDA / Frank-Wolfe solution, exact in closed form). Elementwise over
    tensors of Gram entries ``aa = <a, a>``, ``ab = <a, b>``, ``bb = <b, b>``. When ``a = b``
    (a zero denominator) every ``k`` is a minimiser and ``k = 1/2`` is returned. Non-finite
    entries give a NaN weight (propagated, never hidden).
    """
    den = aa + bb - 2.0 * ab
    num = bb - ab
    safe = torch.where(den > 0, den, torch.ones_like(den))
    k = torch.where(den > 0, num / safe, torch.full_like(den, 0.5))
    k = torch.where(torch.isnan(den), den, k)  # a non-finite Gram stays non-finite
    return torch.minimum(torch.maximum(k, torch.zeros_like(k)), torch.ones_like(k))


def average_over_ranks_(grads: list[Tensor], group: ProcessGroup | None = None) -> None:
    """Replace each gradient by its mean over the ranks of ``group``, in place.

    Gradients of one dtype are flattened into one buffer and all-reduced together (one
    collective per dtype; the buffer is a copy of their total size), then copied back in one
    ``torch._foreach_copy_``. Without a process group it
    does nothing.
    """
    if not grads or not is_distributed(group):
        return
    size = world_size(group)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        total = all_reduce_sum(flat, group)
        total.div_(size)
        parts = torch.split(total, [g.numel() for g in same])
        torch._foreach_copy_(same, [p.view_as(g) for p, g in zip(parts, same, strict=True)])


def agree_over_ranks(
    reached: Sequence[bool],
    extra: Sequence[Tensor],
    device: torch.device,
    group: ProcessGroup | None = None,
    *,
    failed: bool = False,
) -> list[bool]:
    """Make the ranks agree before they all-reduce gradients; return ``reached`` OR-ed over ranks.

    Call it on every rank, in every call that would all-reduce gradients, *before* that
    all-reduce, also from a rank whose input failed validation (``failed=True``; it then re-raises
    its own error). Two small collectives (none without a process group):

    1. ``all_reduce_sum([failed, *reached])``: if any rank failed, every other rank raises
       ``RuntimeError(OTHER_RANK_FAILED)`` here, in the same call, so no rank waits in (or pairs
       its next step with) a gradient all-reduce the failing rank never joins;
    2. ``same_on_all_ranks([len(extra), sum_i numel_i, sum_i (i + 1) numel_i])`` over the
       ``extra`` tensors (the parameters a graph walk found, which differ from rank to rank when
       the ranks' losses reach different modules): a mismatch raises ``ValueError`` on every rank,
       instead of an all-reduce of buffers of different sizes (gloo aborts, NCCL hangs).

    Args:
        reached: one flag per tensor of a list every rank holds in the same order (the encoder
            parameters): whether this rank's losses reached it.
        extra: the tensors of a list each rank found by itself, to be checked for agreement.
        device: where the collectives run (the gradients' device).
        group: the process group (default: the whole world).
        failed: this rank's input failed validation.

    Returns:
        ``reached`` OR-ed over the ranks (a tensor any rank reached gets the averaged gradient on
        every rank). Without a process group, ``list(reached)`` (no host read); under DDP one
        host read of the ``1 + len(reached)`` pooled flags and one of the agreement.

    Raises:
        RuntimeError: ``OTHER_RANK_FAILED``, on every rank but a failing one.
        ValueError: the ranks' ``extra`` lists differ (on every rank).
    """
    if not is_distributed(group):
        return list(reached)
    flags = torch.tensor([float(failed), *map(float, reached)], device=device)
    pooled = all_reduce_sum(flags, group).tolist()
    if failed:
        return list(reached)
    if pooled[0] > 0:
        raise RuntimeError(OTHER_RANK_FAILED)
    sizes = [t.numel() for t in extra]
    mine = [len(sizes), sum(sizes), sum((i + 1) * n for i, n in enumerate(sizes))]
    if not same_on_all_ranks(torch.tensor(mine, dtype=torch.float64, device=device), group):
        raise ValueError(
            f"the losses reach different parameters outside the modules on different ranks "
            f"(this rank: {mine[0]} tensors, {mine[1]} values): every rank must compute its "
            "losses through the same model parts in the same step"
        )
    return [v > 0 for v in pooled[1:]]


# ---------------------------------------------- moments of gradients (OGM-GE), over shards


def sum_and_square_sum(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_i g_i, sum_i g_i^2)`` of one gradient, 0-dim, with no temporary of its size.

    fp32 / fp64 gradients: ``sum`` (cascade summation) and a BLAS ``dot(g, g)``, both in the
    gradient's dtype; fp16 / bf16 gradients: accumulated in fp32 (``sum(dtype=)``,
    ``vector_norm(dtype=)``). A non-contiguous gradient is flattened with a copy.
    """
    if g.dtype in (torch.float32, torch.float64):
        flat = g.reshape(-1)
        return flat.sum(), torch.dot(flat, flat)
    return g.sum(dtype=torch.float32), torch.linalg.vector_norm(g, dtype=torch.float32).square()


def local_shards(grads: Sequence[Tensor]) -> tuple[list[Tensor], ProcessGroup | None]:
    """Each gradient's local tensor, and the group its shards span (``None``: not sharded)."""
    if not grads or not is_sharded(grads[0]):
        return list(grads), None
    group = grads[0].device_mesh.get_group()  # type: ignore[attr-defined]
    return [g.to_local() for g in grads], group  # type: ignore[attr-defined]


def inverse_sizes(numels: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(1 / n_p, 1 / (n_p - 1))`` ``[P]`` on ``device`` (0 where ``n_p <= 1``), in fp64
    (fp32 where the device has no fp64)."""
    dtype = wide_dtype(device)
    inv_n = torch.tensor([1.0 / n if n > 0 else 0.0 for n in numels], dtype=dtype).to(device)
    inv_n1 = torch.tensor([1.0 / (n - 1) if n > 1 else 0.0 for n in numels], dtype=dtype)
    return inv_n, inv_n1.to(device)
