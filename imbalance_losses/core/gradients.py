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
* :func:`norms`, :func:`dots`: per-tensor norms (one ``torch._foreach_norm``) and dot products
  (one ``torch.dot`` per tensor), fp32 accumulation whatever the gradient dtype, as ``[P]``
  tensors on the device, no host sync;
* :func:`segment_sum`: per-tensor values ``[P]`` summed per group ``[G]`` (a modality), so the
  flattened dot product of a group is the sum of its tensors' dot products:
  ``<flat(a), flat(b)> = sum_p <a_p, b_p>``, ``||flat(a)||^2 = sum_p ||a_p||^2``;
  :func:`segment_max`, :func:`segment_expand`: a group's largest value, a group value per tensor;
* :func:`normalise_`: each tensor divided in place by a power of two near its largest magnitude
  (exact), so that norms and dot products formed afterwards neither overflow nor underflow
  whatever the gradients' scale (a ``GradScaler`` factor, entries near ``1e19``); the caller
  multiplies the scale back where it needs true units;
* :func:`min_norm_weight`: the two-vector min-norm (MGDA) weight in closed form;
* :func:`average_over_ranks_`: every gradient of a list averaged over the ranks of a process
  group, one all-reduce per dtype (gradients flattened into one buffer);
* :func:`agree_over_ranks`: what must agree over the ranks *before* that all-reduce (whether a
  rank's input failed, the parameters the losses reach, which of them any rank reached), so the
  ranks' collectives stay paired and their gradients identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
from .running import OTHER_RANK_FAILED

__all__ = [
    "accumulation_dtype",
    "agree_over_ranks",
    "average_over_ranks_",
    "dots",
    "inverse_sizes",
    "local_shards",
    "max_abs",
    "min_norm_weight",
    "normalise_",
    "norms",
    "objective_gradients",
    "power_of_two_scales",
    "reached_leaves",
    "segment_expand",
    "segment_max",
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


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """fp64 when any tensor is fp64, else fp32: the dtype :func:`norms` and :func:`dots` return."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def norms(tensors: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``[P]``: ``||t_p||_2`` of each tensor, accumulated in ``dtype``: one ``torch._foreach_norm``.

    ``dtype`` must not narrow any tensor (use :func:`accumulation_dtype`); fp16 / bf16 gradients
    are accumulated in fp32, so their square sums cannot overflow. No host sync.
    """
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=dtype))


def dots(a: Sequence[Tensor], b: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``[P]``: ``<a_p, b_p>`` (flattened) of each pair in ``dtype``, one ``torch.dot`` per pair.

    Pairs not already in ``dtype`` are cast to it first (fp16 / bf16 products would overflow).
    No temporary of a gradient's size when the gradients are in ``dtype``; no host sync.
    """
    out = [
        torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))
        for x, y in zip(a, b, strict=True)
    ]
    return torch.stack(out)


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


def segment_max(values: Tensor, counts: Sequence[int]) -> Tensor:
    """``[G]``: the largest value of each run of ``values`` ``[P]`` (NaN propagates), no sync."""
    counts = list(counts)
    if len(set(counts)) == 1:  # runs of one length: one row max each, one op
        return values.reshape(len(counts), counts[0]).amax(1)
    return torch.stack([run.max() for run in torch.split(values, counts)])


def segment_expand(values: Tensor, counts: Sequence[int]) -> Tensor:
    """``[P]``: each group's value ``values[g]`` ``[G]`` repeated ``counts[g]`` times (no copy to
    the device of an index: the inverse of a segment reduction's layout)."""
    return torch.cat([v.expand(c) for v, c in zip(values.unbind(), counts, strict=True)])


def max_abs(tensors: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``[P]``: ``max |t_p|`` of each tensor (NaN if it holds a NaN), one ``torch._foreach_norm``
    of order inf: exact in any dtype (no square is formed); 0 for an empty tensor."""
    return torch.stack(torch._foreach_norm(list(tensors), math.inf, dtype=dtype))


def power_of_two_scales(values: Tensor) -> Tensor:
    """``[P]``: for each ``m > 0`` the power of two ``2^e <= m < 2^(e+1)`` (its exponent bits).

    ``values`` is fp32 or fp64. Clamped to ``[tiny, 1 / tiny]`` of its dtype (``2^-126 ..
    2^126`` in fp32) so that the scale and its reciprocal are normal numbers; 1 where ``m`` is
    0 or not finite. Read off the bits, not through ``log2`` / ``exp2`` (whose rounding is not
    guaranteed on every device): multiplying by it or by its reciprocal is exact (barring
    underflow to subnormals). No host sync.
    """
    if values.dtype == torch.float64:
        bits, mask = torch.int64, 0x7FF0000000000000
    elif values.dtype == torch.float32:
        bits, mask = torch.int32, 0x7F800000
    else:
        raise TypeError(f"power_of_two_scales needs fp32 or fp64 values, got {values.dtype}")
    tiny = torch.finfo(values.dtype).tiny
    scale = (values.contiguous().view(bits) & mask).view(values.dtype).clamp(tiny, 1.0 / tiny)
    usable = torch.isfinite(values) & (values > 0)
    return torch.where(usable, scale, torch.ones_like(scale))


def _needs_scaling(dtype: torch.dtype, accumulate: torch.dtype) -> bool:
    """Whether squares of ``dtype`` values can leave ``accumulate``'s range (fp16 in fp32 cannot:
    ``65504^2`` and ``(6e-8)^2`` are fine, and dividing fp16 by a power of two would lose the
    bits of its small entries to subnormals)."""
    info, acc = torch.finfo(dtype), torch.finfo(accumulate)
    return info.max > math.sqrt(acc.max) or info.smallest_normal < math.sqrt(acc.smallest_normal)


def normalise_(tensors: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Divide each tensor in place by :func:`power_of_two_scales` of its largest magnitude.

    Afterwards each tensor's largest entry is in ``[1, 2)`` (below 4 when the scale is
    clamped), so :func:`norms` and :func:`dots` of the normalised tensors, accumulated in
    ``dtype`` (:func:`accumulation_dtype`), neither overflow nor underflow for any finite
    gradient. The division is exact (a power of two) except for entries that become
    subnormal, i.e. below ``2^-126`` (fp32, bf16) of the tensor's own largest entry. A tensor
    whose dtype's squares fit in ``dtype`` anyway (fp16 in fp32), a zero tensor and a non-finite
    one (its NaN / inf stays) keep scale 1 and are not touched.

    Returns:
        ``(scales, max_abs)``, both ``[P]`` in ``dtype``: the true tensor is ``scales[p]`` times
        the normalised one; ``max_abs`` is :func:`max_abs` before the division (0: a zero
        tensor, non-finite: a NaN / inf entry).
    """
    ts = list(tensors)
    if not ts:
        empty = torch.zeros(0, dtype=dtype)
        return empty, empty
    largest = max_abs(ts, dtype)
    scales = power_of_two_scales(largest)
    keep = [not _needs_scaling(t.dtype, dtype) for t in ts]
    if any(keep):
        one = torch.ones((), dtype=dtype, device=scales.device)
        scales = torch.stack([one if k else s for k, s in zip(keep, scales.unbind(), strict=True)])
    todo = [(t, r) for t, r, k in zip(ts, scales.reciprocal().unbind(), keep, strict=True) if not k]
    if todo:
        torch._foreach_mul_([t for t, _ in todo], [r.to(t.dtype) for t, r in todo])
    return scales, largest


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
    collective per dtype; the buffer is a copy of their total size). Without a process group it
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
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(total[offset : offset + n].view_as(g))
            offset += n


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
    dtype = torch.float32 if device.type == "mps" else torch.float64
    inv_n = torch.tensor([1.0 / n if n > 0 else 0.0 for n in numels], dtype=dtype).to(device)
    inv_n1 = torch.tensor([1.0 / (n - 1) if n > 1 else 0.0 for n in numels], dtype=dtype)
    return inv_n, inv_n1.to(device)
