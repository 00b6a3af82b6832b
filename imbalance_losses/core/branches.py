"""Prediction branches: each modality's unimodal logits plus the fused logits, validated.

Methods that weigh or evaluate *branch* losses (G-Blending, a diagnosis report) all need the
same two things: the ordered mapping ``{modality: z_m, ..., "fused": z}`` (unimodal logits from
the model's own head or given by the user, checked against the fused logits and the target), and
each branch's per-sample cross-entropy in fp32 whatever precision the forward pass ran in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .dtypes import wide_dtype
from .stats import stacked_cross_entropy
from .unimodal import Head, unimodal_logits
from .validation import (
    _assert_on_device,
    check_features,
    check_logits,
    check_modalities,
    check_same_modalities,
    check_target,
    check_unimodal_logits,
    deferred_value_checks,
    real_param,
)

__all__ = [
    "FUSED",
    "branch_logits",
    "branch_names",
    "branch_vector",
    "fused_and_unimodal_ce",
    "fused_and_unimodal_loss",
    "per_sample_cross_entropy",
    "unimodal_branches",
]

FUSED = "fused"
"""Default name of the fused-logits branch."""


def branch_names(modalities: object, fused: str = FUSED) -> tuple[str, ...]:
    """``(*modalities, fused)``: at least two distinct modality names, none equal to ``fused``."""
    if isinstance(modalities, str) or not hasattr(modalities, "__iter__"):
        raise TypeError(
            f"modalities must be a sequence of modality names, got {type(modalities).__name__}"
        )
    names = tuple(modalities)
    if len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise ValueError(f"modalities needs at least two modality names (str), got {list(names)}")
    if len(set(names)) != len(names) or fused in names:
        raise ValueError(
            f"modality names {list(names)} must be distinct and differ from the fused branch's "
            f"name {fused!r}"
        )
    return (*names, fused)


def unimodal_branches(
    logits: Tensor,
    target: Tensor,
    features: Mapping[str, Tensor] | None = None,
    given: Mapping[str, Tensor] | None = None,
    *,
    head: Head | None = None,
    ignore_index: int | None = None,
    who: str = "this method",
) -> dict[str, Tensor]:
    """``{modality: z_m}`` in mapping order, checked against the fused logits and the target.

    The unimodal logits are ``given`` when passed (the features, if passed too, must then be
    floating point and have the same modalities), else ``unimodal_logits(head, features)``.

    Raises:
        ValueError: fewer than two modalities, batch sizes or class counts that differ between
            the fused logits, the unimodal logits, the features and the target; targets out of
            range; non-finite logits; no way to get unimodal logits. The message names the
            modality and the shapes.
        TypeError: non-tensor or non-floating logits or features, a features object that is
            not a mapping.
    """
    with deferred_value_checks():  # the value checks: one combined fast check at the end
        return _unimodal_branches(
            logits, target, features, given, head=head, ignore_index=ignore_index, who=who
        )


def _unimodal_branches(
    logits: Tensor,
    target: Tensor,
    features: Mapping[str, Tensor] | None,
    given: Mapping[str, Tensor] | None,
    *,
    head: Head | None,
    ignore_index: int | None,
    who: str,
) -> dict[str, Tensor]:
    check_logits(logits, name="logits")
    batch, classes = logits.shape
    if features is not None and check_modalities(features, what="features") != batch:
        first, x = next(iter(features.items()))
        raise ValueError(
            f"features[{first!r}] has batch {x.shape[0]} (shape {tuple(x.shape)}) but the "
            f"logits have batch {batch} (shape {tuple(logits.shape)})"
        )
    if given is not None:
        check_modalities(given, what="unimodal_logits")
        if features is not None:
            check_same_modalities(
                features, given, expected_what="features", actual_what="unimodal_logits"
            )
            check_features(features, by=who)
        zs = dict(given)
    elif head is not None:
        if features is None:
            raise ValueError(f"{who} was given a head but no features= to apply it to")
        zs = unimodal_logits(head, features)
    else:
        raise ValueError(
            f"{who} needs unimodal logits: give it head=model.fusion_head and pass features=, "
            "or pass unimodal_logits="
        )
    _, uni_classes = check_unimodal_logits(zs, batch=batch)
    if uni_classes != classes:
        raise ValueError(
            f"unimodal logits have {uni_classes} classes (shapes "
            f"{[tuple(z.shape) for z in zs.values()]}) but the fused logits have shape "
            f"{tuple(logits.shape)}; the class counts must match"
        )
    check_target(target, batch=batch, num_classes=classes, ignore_index=ignore_index)
    return zs


def branch_logits(
    logits: Tensor,
    target: Tensor,
    features: Mapping[str, Tensor] | None = None,
    given: Mapping[str, Tensor] | None = None,
    *,
    head: Head | None = None,
    ignore_index: int | None = None,
    fused: str = FUSED,
    who: str = "this method",
) -> dict[str, Tensor]:
    """``{modality: z_m, ..., fused: z}``: :func:`unimodal_branches` plus the fused branch.

    Raises:
        ValueError: as :func:`unimodal_branches`, and a modality named like the fused branch.
        TypeError: as :func:`unimodal_branches`.
    """
    zs = unimodal_branches(
        logits, target, features, given, head=head, ignore_index=ignore_index, who=who
    )
    if fused in zs:
        raise ValueError(
            f"a modality is named {fused!r}, the name of the fused branch; rename the modality "
            "or pass another fused= name"
        )
    return {**zs, fused: logits}


def per_sample_cross_entropy(
    branches: Mapping[str, Tensor],
    target: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of every branch on every sample, ``[K, B]``, differentiable.

    ``l_kb = -log softmax(z_k,b)[y_b]`` (or ``-sum_c t_bc log softmax(z_k,b)_c`` for soft
    targets), as ``F.cross_entropy(..., reduction="none")`` computes it, after promoting
    fp16/bf16 logits to fp32 (fp64 stays fp64). A sample whose target is ``ignore_index`` gives
    0. Gradients flow to the logits.
    """
    zs = list(branches.values())
    dtypes = {z.dtype for z in zs}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float32, torch.float64):
        dtype = next(iter(dtypes))  # the common case: no promotion to compute
    else:
        dtype = functools.reduce(torch.promote_types, dtypes)
        dtype = torch.promote_types(dtype, torch.float32)
    shapes = {z.shape for z in zs}
    if len(shapes) == 1 and len(zs) > 1 and zs[0].dim() == 2:
        # every branch at once: one log-softmax and one NLL over the [K * B, C] stack, row by
        # row the same values as one F.cross_entropy per branch
        k, (b, c) = len(zs), zs[0].shape
        stacked = torch.stack([z.to(dtype) for z in zs]).reshape(k * b, c)
        # k copies of the target, one after the other (torch.cat: the cheapest single op here)
        tgt = torch.cat([target.to(dtype) if target.is_floating_point() else target] * k)
        return F.cross_entropy(
            stacked, tgt, reduction="none", ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        ).reshape(k, b)  # fmt: skip
    return torch.stack(
        [
            F.cross_entropy(
                z.to(dtype),
                target if not target.is_floating_point() else target.to(dtype),
                reduction="none",
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
            )
            for z in zs
        ]
    )


def branch_vector(values: Mapping[str, object], names: tuple[str, ...], *, what: str) -> Tensor:
    """``[K]`` vector of one real scalar per branch, in the order of ``names``.

    Values may be Python reals or one-element tensors (on any device: the vector goes to the
    first non-CPU one). Kept in fp64 (fp32 on devices without fp64), so that differences of
    losses lose nothing.

    Raises:
        TypeError: ``values`` is not a mapping, or a value is not a real scalar.
        ValueError: missing or extra branches, or a non-finite value (the message names it).
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a mapping branch -> value, got {type(values).__name__}")
    if set(values) != set(names) or len(values) != len(names):
        raise ValueError(f"{what} has branches {list(values)}; expected {list(names)}")
    out = []
    for name in names:
        v = values[name]
        if not isinstance(v, Tensor):
            v = torch.tensor(real_param(f"{what}[{name!r}]", v), dtype=torch.float64)
        elif v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(
                f"{what}[{name!r}] must be a real scalar, got {v.dtype} of shape {tuple(v.shape)}"
            )
        out.append(v.detach().reshape(()))
    device = next((v.device for v in out if v.device.type != "cpu"), out[0].device)
    dtype = wide_dtype(device)
    vec = torch.stack([v.to(device=device, dtype=dtype) for v in out])
    _assert_on_device(torch.isfinite(vec).all(), f"{what} must be finite, got {dict(values)}")
    return vec


Criterion = Callable[[Tensor, Tensor], Tensor]
"""A criterion ``l(logits, target)``, as ``nn.CrossEntropyLoss()``."""


def fused_and_unimodal_ce(
    logits: Tensor, target: Tensor, zs: Mapping[str, Tensor], gamma: float, ignore: int
) -> tuple[Tensor, Tensor | None]:
    """``L = CE(z, y) + gamma * sum_m CE(z_m, y)`` per sample (ARL's step 8): ``(l_b, log_probs)``.

    The unimodal terms in one pass on the stacked logits (``log_softmax`` then ``nll_loss``:
    what ``F.cross_entropy`` computes, the same values); ``log_probs`` is their detached
    ``log_softmax`` ``[M, B, C]`` when it is fp32 / fp64 (as ``entropy_and_size_sums`` takes it),
    for the statistics, else ``None``. Soft targets: :func:`fused_and_unimodal_loss`.
    """
    ce = functools.partial(F.cross_entropy, reduction="none", ignore_index=ignore)
    if target.is_floating_point():
        return fused_and_unimodal_loss(logits, target, zs, gamma, ce), None
    loss = ce(logits, target)
    uni, log_p = stacked_cross_entropy(list(zs.values()), target, ignore)
    scaled = uni if gamma == 1.0 else gamma * uni
    for j in range(uni.shape[0]):
        loss = loss + scaled[j]
    return loss, log_p


def fused_and_unimodal_loss(
    logits: Tensor, target: Tensor, zs: Mapping[str, Tensor], gamma: float, criterion: Criterion
) -> Tensor:
    """``L = l(z, y) + gamma * sum_m l(z_m, y)``: the fused loss plus each modality's (ARL).

    ``gamma = 1`` multiplies by nothing (``1.0 * x`` is ``x``, and so is its gradient).
    """
    loss = criterion(logits, target)
    for z in zs.values():
        term = criterion(z, target)
        loss = loss + (term if gamma == 1.0 else gamma * term)
    return loss
