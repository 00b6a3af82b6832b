"""Input validation shared by every module.

Every check raises a ``ValueError`` (or ``TypeError`` for a wrong kind of object) whose message
names the modality and the expected and actual shapes, so a user never has to debug a silent NaN.

Checks on tensor *values* (finite logits, target range) need the value on the host. On CPU that
costs nothing. On an accelerator it would be a host sync in the hot path, so there the check is
queued with :func:`torch._assert_async` instead: the error still surfaces, at the next
synchronisation point, without stalling the step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "check_finite",
    "check_logits",
    "check_modalities",
    "check_same_modalities",
    "check_target",
    "check_unimodal_logits",
]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _assert_on_device(condition: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` when ``condition`` (a bool scalar tensor) is false.

    On CPU the check is immediate. On an accelerator it is asynchronous (no host sync); the
    failure is reported by the device runtime at its next synchronisation.
    """
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message)
    else:  # pragma: no cover - exercised only on accelerators
        torch._assert_async(condition, message)


def check_modalities(
    features: Mapping[str, Tensor], *, what: str = "features", min_ndim: int = 1
) -> int:
    """Validate a modality mapping and return its common batch size.

    Requires a mapping of at least two modalities, each a tensor with at least ``min_ndim``
    dimensions, all with the same batch size (dimension 0).
    """
    if not isinstance(features, Mapping):
        raise TypeError(
            f"{what} must be a mapping modality name -> Tensor (e.g. "
            f"{{'audio': a, 'visual': v}}), got {type(features).__name__}"
        )
    if len(features) < 2:
        raise ValueError(
            f"{what} needs at least two modalities, got {len(features)}: {list(features)}"
        )
    batch: int | None = None
    first = ""
    for name, tensor in features.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what}[{name!r}] must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() < min_ndim:
            raise ValueError(
                f"{what}[{name!r}] must have at least {min_ndim} dimension(s) "
                f"(batch first), got shape {_shape(tensor)}"
            )
        if batch is None:
            batch, first = tensor.shape[0], name
        elif tensor.shape[0] != batch:
            raise ValueError(
                f"batch size mismatch in {what}: {what}[{name!r}] has shape "
                f"{_shape(tensor)} (batch {tensor.shape[0]}) but {what}[{first!r}] has "
                f"batch {batch}"
            )
    assert batch is not None
    return batch


def check_same_modalities(
    expected: Mapping[str, object] | tuple[str, ...] | list[str],
    actual: Mapping[str, object],
    *,
    expected_what: str,
    actual_what: str,
) -> None:
    """Require ``actual`` to have exactly the modalities of ``expected``, in the same order."""
    want = list(expected)
    got = list(actual)
    if want == got:
        return
    missing = [m for m in want if m not in got]
    extra = [m for m in got if m not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(
            f"{actual_what} modalities {got} do not match {expected_what} modalities {want}: "
            + ", ".join(parts)
        )
    raise ValueError(
        f"{actual_what} modalities {got} are in a different order from {expected_what} "
        f"modalities {want}; the mapping order is the concatenation order, keep it the same"
    )


def check_logits(logits: Tensor, *, name: str, batch: int | None = None) -> None:
    """Require 2-D ``[B, C]`` logits with the given batch size and finite values."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape [B, C], got shape {_shape(logits)}")
    if batch is not None and logits.shape[0] != batch:
        raise ValueError(
            f"{name} has batch {logits.shape[0]} (shape {_shape(logits)}) but the batch "
            f"size is {batch}"
        )
    check_finite(logits, name=name)


def check_finite(tensor: Tensor, *, name: str) -> None:
    """Require every value of ``tensor`` to be finite (no NaN, no +-inf)."""
    _assert_on_device(
        torch.isfinite(tensor.detach()).all(),
        f"{name} contains non-finite values (NaN or inf), shape {_shape(tensor)}",
    )


def check_unimodal_logits(
    logits: Mapping[str, Tensor], *, batch: int | None = None, what: str = "unimodal_logits"
) -> tuple[int, int]:
    """Validate per-modality logits ``{m: [B, C]}``: finite, one shape for every modality.

    Returns ``(B, C)``. ``batch``, when given, is the batch size they must have.
    """
    size = check_modalities(logits, what=what, min_ndim=2)
    if batch is not None and size != batch:
        first, z = next(iter(logits.items()))
        raise ValueError(
            f"{what}[{first!r}] has batch {size} (shape {_shape(z)}) but the batch size is {batch}"
        )
    first = next(iter(logits))
    shape = _shape(logits[first])
    for name, z in logits.items():
        check_logits(z, name=f"{what}[{name!r}]", batch=size)
        if _shape(z) != shape:
            raise ValueError(
                f"{what}[{name!r}] has shape {_shape(z)} but {what}[{first!r}] has shape "
                f"{shape}; every modality must give logits over the same classes"
            )
    return shape[0], shape[1]


def check_target(target: Tensor, *, batch: int, num_classes: int, name: str = "target") -> None:
    """Validate single-label or soft targets against ``batch`` and ``num_classes``.

    * class indices: integer ``[B]`` with every value in ``[0, num_classes)``;
    * soft targets: floating ``[B, C]``, finite, non-negative, each row summing to 1.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.dim() == 1:
            raise ValueError(
                f"{name} of shape {_shape(target)} is {target.dtype}: class indices must be an "
                f"integer tensor (e.g. {name}.long()); soft targets must have shape [B, C] = "
                f"{(batch, num_classes)}"
            )
        if _shape(target) != (batch, num_classes):
            raise ValueError(
                f"soft {name} must have shape [B, C] = {(batch, num_classes)}, got {_shape(target)}"
            )
        t = target.detach().float()
        ok = torch.isfinite(t).all() & (t >= 0).all()
        ok = ok & torch.isclose(t.sum(1), torch.ones((), device=t.device), atol=1e-3).all()
        _assert_on_device(
            ok,
            f"soft {name} of shape {_shape(target)} must be finite, non-negative and sum to "
            "1 over classes",
        )
        return
    if target.dtype == torch.bool or target.dim() != 1:
        raise ValueError(
            f"{name} must be class indices of shape [B] = [{batch}] (integer dtype) or soft "
            f"targets of shape [B, C]; got dtype {target.dtype}, shape {_shape(target)}"
        )
    if target.shape[0] != batch:
        raise ValueError(f"{name} has shape {_shape(target)} but the logits' batch size is {batch}")
    if target.numel():
        _assert_on_device(
            ((target >= 0) & (target < num_classes)).all(),
            f"{name} has class indices outside [0, {num_classes}) for logits with "
            f"{num_classes} classes",
        )
