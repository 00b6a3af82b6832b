"""Per-sample statistics every method is built from, always in fp32 on detached tensors.

fp16 / bf16 logits are promoted to fp32 before any softmax, so a statistic is finite and
accurate whatever precision the forward pass ran in (``torch.autocast`` included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .dtypes import wide_dtype

Reduction = Literal["mean", "sum", "none"]
"""A loss's ``reduction``, as in ``torch.nn`` losses."""
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum", "none")

__all__ = [
    "REDUCTIONS",
    "Reduction",
    "as_fp32",
    "at_least_fp32",
    "count_of",
    "counted",
    "ema_update",
    "entropy_and_size_sums",
    "entropy_sum",
    "one_vs_rest_ratio",
    "reduce_loss",
    "stacked_cross_entropy",
    "true_class_probability",
    "true_class_scores",
]


def as_fp32(tensor: Tensor) -> Tensor:
    """``tensor`` detached and promoted to (at least) fp32; fp64 stays fp64."""
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16) or not tensor.is_floating_point():
        return tensor.float()
    return tensor


def counted(target: Tensor, ignore_index: int | None) -> Tensor | None:
    """Bool mask ``[B]`` of the samples a statistic counts, or ``None`` when all of them count.

    Class-index targets equal to ``ignore_index`` are left out (the criterion skips them too);
    soft targets and ``ignore_index=None`` count every sample. The number of counted samples is
    ``mask.sum()``, a tensor (no host sync).
    """
    if ignore_index is None or target.is_floating_point():
        return None
    return target != ignore_index


def true_class_probability(
    logits: Tensor, target: Tensor, ignore_index: int | None = None
) -> Tensor:
    """Probability each sample assigns to its true class, ``[B]`` in fp32.

    ``p_b = softmax(z_b)[y_b]`` for class indices (one ``gather``, no loop), and
    ``p_b = sum_c softmax(z_b)_c t_bc`` for soft targets ``t`` of shape ``[B, C]``. A sample
    whose target equals ``ignore_index`` gives ``p_b = 0`` (it is left out of every sum; divide
    by the count of :func:`counted`).
    """
    probs = torch.softmax(as_fp32(logits), dim=-1)
    if target.is_floating_point():
        return (probs * as_fp32(target)).sum(-1)
    mask = counted(target, ignore_index)
    index = target.long() if mask is None else torch.where(mask, target, 0).long()
    p = probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return p if mask is None else p * mask


def true_class_scores(
    logits: Sequence[Tensor],
    target: Tensor,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``[M]`` fp32: ``s_m = sum_b`` :func:`true_class_probability` ``(z_m, y, ignore_index)_b``.

    The same values as one :func:`true_class_probability` and sum per modality, computed on the
    stacked logits ``[M, B, C]`` in one pass (one softmax, one ``gather``, one sum). The
    logits must share one shape ``[B, C]``. ``mask``: :func:`counted` ``(target,
    ignore_index)`` when the caller has it already.
    """
    probs = torch.softmax(as_fp32(torch.stack([z.detach() for z in logits])), dim=-1)
    if target.is_floating_point():
        return (probs * as_fp32(target)).sum(-1).sum(-1)
    mask = counted(target, ignore_index) if mask is None else mask
    # an ignored sample's index only has to be in range: its probability is multiplied by 0
    index = target if mask is None else target.clamp(0, probs.shape[-1] - 1)
    index = index.long().reshape(1, -1, 1).expand(probs.shape[0], -1, 1)
    p = probs.gather(-1, index).squeeze(-1)
    return (p if mask is None else p * mask).sum(-1)


def count_of(mask: Tensor | None, batch: int) -> int | Tensor:
    """The number of counted samples: ``batch`` without a mask, else ``mask.sum()`` as a 0-dim
    tensor in the dtype :class:`~imbalance_losses.core.running.RunningSums` keeps counts in
    (fp64; fp32 on MPS), so adding it needs no cast."""
    if mask is None:
        return batch
    return mask.sum(dtype=wide_dtype(mask.device))


def entropy_sum(logits: Tensor, weight: Tensor | None = None) -> Tensor:
    """Sum over the batch of the predictive entropy ``-sum_c p_bc log p_bc`` (fp32 scalar).

    With ``weight`` ``[B]`` (e.g. the 0/1 mask of :func:`counted`): ``sum_b w_b H_b``.
    Returned as a *sum* so that it can be pooled across micro-batches and ranks before dividing
    by the pooled count; ``log_softmax`` keeps it finite for saturated logits.
    """
    log_p = torch.log_softmax(as_fp32(logits), dim=-1)
    per_sample = -(log_p.exp() * log_p).sum(-1)
    return per_sample.sum() if weight is None else (per_sample * weight).sum()


def one_vs_rest_ratio(scores: Tensor) -> Tensor:
    """Discrepancy ratio of each modality against the mean of the others.

    ``rho_m = s_m / mean_{k != m} s_k = (M - 1) s_m / (sum_k s_k - s_m)`` for scores ``[M]``
    (``M >= 2``); for two modalities ``rho = [s_1 / s_2, s_2 / s_1]``. A zero denominator (every
    other score zero) gives ``inf`` for a positive ``s_m``, never NaN from ``0 / 0`` (that ratio
    is defined as 1: two equally useless modalities are balanced).
    """
    m = scores.shape[-1]
    if m == 2:  # exactly [s_1 / s_2, s_2 / s_1], no rounding from the sum
        rest = scores.flip(-1)
    else:
        rest = (scores.sum(-1, keepdim=True) - scores) / (m - 1)
    ratio = scores / rest
    return torch.where((scores == 0) & (rest == 0), torch.ones_like(ratio), ratio)


def reduce_loss(
    per_sample: Tensor,
    reduction: Reduction,
    mask: Tensor | None = None,
    *,
    count: Tensor | int | None = None,
) -> Tensor:
    """Reduce a per-sample loss ``l`` ``[B]`` as ``torch.nn`` losses do.

    ``"none"``: ``l``; ``"sum"``: ``sum_b l_b``; ``"mean"``: ``sum_b l_b / n`` with ``n`` the
    number of counted samples (``mask.sum()``, all ``B`` when ``mask`` is ``None``), and 0, not
    ``0 / 0``, when ``n = 0``. Samples left out by ``mask`` must already be 0 in ``l`` (as
    ``F.cross_entropy(..., reduction="none", ignore_index=...)`` gives). ``count``: ``n``
    when the caller has it already (:func:`count_of`). No host sync.
    """
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    if count is None:
        count = per_sample.shape[0] if mask is None else mask.sum()
    if isinstance(count, Tensor):
        return total / count.clamp_min(1).to(total.dtype)
    return total / max(count, 1)


def ema_update(
    ema: Tensor | None, seen: Tensor | None, stats: Tensor, has: Tensor, momentum: float
) -> tuple[Tensor, Tensor]:
    """``(ema', seen')`` with ``ema' = momentum * ema + (1 - momentum) * stats``.

    The first statistics are taken as they are (``ema`` is ``None``, or ``seen`` false: the
    EMA holds no sample yet); a step whose samples were all ignored (``has`` false, 0-dim)
    leaves the EMA unchanged. ``seen' = seen | has``. No host read.
    """
    if ema is None or seen is None:
        return stats, has
    ema, seen = ema.to(stats), seen.to(stats.device)
    blended = torch.lerp(stats, ema, momentum * seen.to(stats.dtype))
    return torch.where(has, blended, ema), seen | has


def entropy_and_size_sums(
    zs: Mapping[str, Tensor], mask: Tensor | None, log_probs: Tensor | None = None
) -> Tensor:
    """``[2M]`` fp32, detached: per modality the summed predictive entropy and logit L1 size.

    ``cat(sum_b -sum_c p_mbc log p_mbc, sum_b sum_c |z_mbc|)`` with ``p_m = softmax(z_m)``,
    over the counted samples (``mask``; ``None``: all). All modalities in one pass over the
    stacked logits ``[M, B, C]``; ``log_probs``: their ``log_softmax`` in fp32 (or fp64) when
    already computed (a loss's), detached. ARL's ``V_m`` and ``c_m`` are these divided by the
    pooled count.
    """
    z = as_fp32(torch.stack([z.detach() for z in zs.values()]))
    log_p = torch.log_softmax(z, dim=-1) if log_probs is None else log_probs
    m = z.shape[0]
    per_sample = torch.empty(2 * m, z.shape[1], dtype=z.dtype, device=z.device)  # [2M, B]
    torch.sum(log_p.exp() * log_p, -1, out=per_sample[:m]).neg_()  # entropy, as entropy_sum
    torch.sum(z.abs(), -1, out=per_sample[m:])
    return (per_sample if mask is None else per_sample * mask).sum(-1)


def stacked_cross_entropy(
    logits: Sequence[Tensor], target: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor | None]:
    """Per-sample cross-entropy of ``M`` logits ``[B, C]`` against one target: ``[M, B]``.

    One ``log_softmax`` and one ``nll_loss`` on the stack (what ``F.cross_entropy`` computes
    for each, the same values), and the detached ``log_softmax`` ``[M, B, C]`` when it is in
    fp32 / fp64 (for statistics that reuse it), else ``None``. fp16 / bf16 logits are promoted
    to fp32 first, as ``F.cross_entropy`` is under ``torch.autocast`` (on the CPU too, where
    autocast leaves a bare ``log_softmax`` in fp16 / bf16).
    """
    stacked = torch.stack(list(logits))
    if stacked.dtype in (torch.float16, torch.bfloat16):
        stacked = stacked.float()
    log_p = torch.log_softmax(stacked, dim=-1)
    m, batch, classes = log_p.shape
    nll = F.nll_loss(
        log_p.reshape(m * batch, classes),
        torch.cat([target] * m),  # target.repeat(m), one cheaper op
        reduction="none",
        ignore_index=ignore_index,
    ).view(m, batch)
    return nll, log_p.detach() if log_p.dtype in (torch.float32, torch.float64) else None


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, torch.float32)`` for a floating ``dtype``, without a call."""
    return dtype if dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32
