"""Per-branch mean losses over a data loader, pooled over DDP ranks.

G-Blending needs each branch's train and validation loss at the end of every window; a diagnosis
report needs the same numbers. :func:`branch_losses` runs the user's forward over a
loader in eval mode under ``torch.no_grad()``, adds each batch's per-branch loss *sums* and
sample count to a :class:`~imbalance_losses.core.running.RunningSums`, and pools them over the ranks
in one all-reduce, so that every rank gets the mean over the global set of samples:

    L_k = sum_{ranks} sum_{batches} sum_b l_kb  /  sum_{ranks} sum_{batches} n_counted
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .branches import FUSED, branch_logits, branch_names, per_sample_cross_entropy
from .distributed import ProcessGroup, same_on_all_ranks
from .running import RunningSums
from .stats import counted
from .unimodal import Head, eval_mode
from .validation import check_same_modalities

__all__ = ["BranchOutputs", "branch_losses", "check_same_on_ranks"]

BranchOutputs = tuple[Tensor, Tensor, Mapping[str, Tensor]]
"""What the forward function returns per batch: ``(fused_logits, target, features)`` (or the
unimodal logits instead of the features when no head is given)."""


def _device(model: nn.Module | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def branch_losses(
    forward: Callable[[Any], BranchOutputs],
    loader: Iterable[Any],
    modalities: Sequence[str],
    *,
    head: Head | None = None,
    model: nn.Module | None = None,
    fused: str = FUSED,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    device: torch.device | str | None = None,
    process_group: ProcessGroup | None = None,
) -> dict[str, Tensor]:
    """Mean cross-entropy of every branch over ``loader``: ``{modality: L_m, ..., fused: L}``.

    Args:
        forward: ``forward(batch) -> (fused_logits [B, C], target [B], features)`` where
            ``features`` is ``{modality: x_m}`` when ``head`` is given, else the precomputed
            unimodal logits ``{modality: z_m}``.
        loader: any iterable of batches (a ``DataLoader``). Under DDP each rank iterates its own
            shard; a sampler that pads shards with repeated samples counts those twice.
        modalities: the modality names, in mapping order (they name the branches).
        head: the fusion head for :func:`~imbalance_losses.unimodal_logits`.
        model: module(s) put in eval mode while evaluating (their flags are restored after).
        fused: the fused branch's name.
        ignore_index: as in ``nn.CrossEntropyLoss``; ignored samples are neither summed nor
            counted.
        label_smoothing: as in ``nn.CrossEntropyLoss``.
        device: where a rank that gets no batch places its zeros (default: the model's device).
        process_group: the ranks to pool over (default: the world; none without DDP).

    Returns:
        0-dim fp32 tensors on the logits' device, identical on every rank: the global mean.

    Raises:
        ValueError: no counted sample on any rank, or a batch whose outputs fail the checks of
            the loss (the message names the branch and the shapes). Under DDP every rank
            raises in the same call (a failing rank joins the pooling with a failure flag).
        RuntimeError: the loader yielded no batch (on every rank).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import branch_losses
        >>> head = nn.Linear(4, 3)
        >>> feats = {"audio": torch.randn(5, 2), "visual": torch.randn(5, 2)}
        >>> batches = [(feats, torch.arange(5) % 3)]
        >>> def forward(batch):
        ...     feats, target = batch
        ...     return head(torch.cat(list(feats.values()), 1)), target, feats
        >>> losses = branch_losses(forward, batches, ["audio", "visual"], head=head)
        >>> list(losses)
        ['audio', 'visual', 'fused']
    """
    names = branch_names(modalities, fused)
    size = len(names)
    zeros_on = _device(model, device)
    pool = RunningSums()
    with eval_mode(model), torch.no_grad(), pool.failing_together(size, zeros_on, process_group):
        for batch in loader:
            outputs = forward(batch)
            if not isinstance(outputs, tuple) or len(outputs) != 3:
                raise TypeError(
                    "forward(batch) must return (fused_logits, target, features) (features: the "
                    "unimodal logits when no head is given), got "
                    f"{type(outputs).__name__}"
                )
            logits, target, third = outputs
            features, given = (third, None) if head is not None else (None, third)
            branches = branch_logits(
                logits, target, features, given, head=head, ignore_index=ignore_index,
                fused=fused, who="branch_losses",
            )  # fmt: skip
            check_same_modalities(
                list(names[:-1]),
                {m: z for m, z in branches.items() if m != fused},
                expected_what="the given",
                actual_what="the batch's",
            )
            losses = per_sample_cross_entropy(
                branches, target, ignore_index=ignore_index, label_smoothing=label_smoothing
            )
            mask = counted(target, ignore_index)
            rows = logits.shape[0]
            pool.add(losses.sum(1), rows if mask is None else mask.sum(), rows=rows)
    pooled = pool.pool(
        size, zeros_on, process_group, missing="branch_losses: the loader yielded no batch"
    )
    if pooled.empty or float(pooled.samples) == 0:
        raise ValueError(
            "branch_losses: no counted sample on any rank (empty batches, or every "
            "target equal to ignore_index); the mean loss is undefined"
        )
    mean = pooled.mean()
    return {name: mean[i] for i, name in enumerate(names)}


def check_same_on_ranks(
    values: Tensor,
    group: ProcessGroup | None,
    *,
    message: str,
    error: type[Exception] = ValueError,
) -> None:
    """Under DDP, raise ``error(message)`` on every rank unless all ranks hold ``values``.

    Exact (:func:`~imbalance_losses.core.distributed.same_on_all_ranks`: one all-reduce of the
    maximum of ``[v, -v]``); every rank decides from the same result, so all raise or none does.
    A no-op without DDP.
    """
    if not same_on_all_ranks(values, group):
        raise error(message)
