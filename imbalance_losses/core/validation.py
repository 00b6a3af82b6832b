"""Input validation shared by every module.

Every check raises a ``ValueError`` (or ``TypeError`` for a wrong kind of object) whose message
names the modality and the expected and actual shapes, so a user never has to debug a silent NaN.

Checks on tensor *values* (finite logits, target range) need the value on the host. On CPU that
costs nothing. On an accelerator it would be a host sync in the hot path, so there the check is
queued with :func:`torch._assert_async` instead: the error still surfaces, at the next
synchronisation point, without stalling the step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from .dtypes import wide_dtype

__all__ = [
    "autocast_enabled",
    "autocast_off",
    "check_features",
    "check_finite",
    "check_logits",
    "check_modalities",
    "check_same_layout",
    "check_same_modalities",
    "check_scored_logits",
    "check_state_keys",
    "check_target",
    "check_unimodal_logits",
    "choice_or_weights",
    "choice_param",
    "criterion_reduction",
    "deferred_value_checks",
    "feature_widths",
    "int_param",
    "modality_names",
    "modality_weights",
    "optional_int_param",
    "real_param",
    "reduction_param",
]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``a`` and ``b`` are one device (``cuda`` without an index matches any ``cuda:i``)."""
    return a == b or (a.type == b.type and (a.index is None or b.index is None))


def _assert_on_device(condition: Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` when ``condition`` (a bool scalar tensor) is false.

    On CPU the check is immediate. On an accelerator it is asynchronous (no host sync); the
    failure is reported by the device runtime at its next synchronisation. Inside
    :func:`deferred_value_checks` it joins that block's one combined check instead.
    """
    batch = _DEFERRED.get()
    if batch is not None:
        batch.condition(condition, message, error)
        return
    _raise_unless(condition, message, error)


def _raise_unless(condition: Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """:func:`_assert_on_device` now, never deferred."""
    if condition.device.type == "cpu":
        if not _cpu_value(condition):
            raise error(message)
    else:  # pragma: no cover - exercised only on accelerators
        torch._assert_async(condition, message)


def _cpu_value(t: Tensor) -> Any:
    """The value of a one-element CPU tensor, read with no kernel (``tolist``, not ``item``)."""
    return t.reshape(()).tolist()


class _ValueChecks:
    """The value checks of one :func:`deferred_value_checks` block, in the order they came.

    Each entry keeps what its fast check needs and a ``detail`` callable: the original check,
    run (in order) only when the combined fast check fails, so the first failing check raises
    its own message, exactly as if the checks had run one by one.
    """

    def __init__(self) -> None:
        self.finite: list[Tensor] = []
        self.ranges: list[tuple[Tensor, int, int | None]] = []
        self.conditions: list[Tensor] = []
        self.details: list[Callable[[], None]] = []
        self.messages: list[Callable[[], str]] = []

    def add_finite(self, tensor: Tensor, name: str) -> None:
        t = tensor.detach()
        self.finite.append(t)
        self.details.append(lambda: _check_finite_now(t, name))
        self.messages.append(lambda: _finite_message(t, name))

    def add_range(self, target: Tensor, num_classes: int, ignore: int | None, message: str) -> None:
        self.ranges.append((target, num_classes, ignore))
        self.details.append(
            lambda: _raise_unless(_valid_indices(target, num_classes, ignore).all(), message)
        )
        self.messages.append(lambda: message)

    def condition(self, condition: Tensor, message: str, error: type[Exception]) -> None:
        self.conditions.append(condition)
        self.details.append(lambda: _raise_unless(condition, message, error))
        self.messages.append(lambda: message)

    def run_details(self) -> None:
        """Every check one by one, in order: the first that fails raises its own error."""
        for detail in self.details:
            detail()

    def run(self) -> None:
        """The one combined fast check; the detailed checks only when it fails."""
        if not self.details:
            return
        devices = {t.device for t in (*self.finite, *self.conditions)}
        devices |= {t.device for t, _, _ in self.ranges}
        if all(d.type == "cpu" for d in devices):
            if not self._ok_on_cpu():
                self.run_details()
            return
        self._assert_on_accelerators()  # pragma: no cover - exercised only on accelerators

    def _checksums(self) -> list[Tensor]:
        """One sum per device (and dtype), in ``wide_dtype`` (fp64; fp32 on MPS), of every value
        to be finite: finite only if they all are (a sum that overflows fails the fast check,
        then the detailed checks pass)."""
        by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in self.finite:  # one group per device and dtype (cat does not mix dtypes)
            by_device.setdefault((t.device, t.dtype), []).append(t)
        sums = []
        for (device, _), group in by_device.items():
            dtype = wide_dtype(device)
            flat = group[0] if len(group) == 1 else torch.cat([t.reshape(-1) for t in group])
            sums.append(flat.sum(dtype=dtype))
        return sums

    def _ok_on_cpu(self) -> bool:
        if not all(math.isfinite(_cpu_value(s)) for s in self._checksums()):
            return False
        for target, classes, ignore in self.ranges:
            if target.numel():
                low, high = (_cpu_value(x) for x in torch.aminmax(target))
                if (low < 0 or high >= classes) and not (  # ignore_index in the batch?
                    ignore is not None and _cpu_value(_valid_indices(target, classes, ignore).all())
                ):
                    return False
        return all(_cpu_value(c) for c in self.conditions)

    def _assert_on_accelerators(self) -> None:  # pragma: no cover - accelerators only
        parts: dict[torch.device, list[Tensor]] = {}
        for s in self._checksums():
            parts.setdefault(s.device, []).append((s - s) == 0)
        for target, classes, ignore in self.ranges:
            if not target.numel():
                continue
            if ignore is None:
                low, high = torch.aminmax(target)
                ok = (low >= 0) & (high < classes)
            else:
                ok = _valid_indices(target, classes, ignore).all()
            parts.setdefault(target.device, []).append(ok)
        for c in self.conditions:
            parts.setdefault(c.device, []).append(c.reshape(()))
        text = "; or ".join(message() for message in self.messages)
        for device, oks in parts.items():
            if device.type == "cpu":
                if not all(_cpu_value(ok) for ok in oks):
                    self.run_details()
                continue
            ok = oks[0]
            for other in oks[1:]:
                ok = ok & other
            torch._assert_async(ok, f"input validation failed on the device: {text}")


_DEFERRED: ContextVar[_ValueChecks | None] = ContextVar("_DEFERRED", default=None)


@contextmanager
def deferred_value_checks() -> Iterator[None]:
    """Combine the value checks made inside the block into one fast device check at its end.

    Inside the block :func:`check_finite`, the class-index range check of
    :func:`check_target` and every other on-device condition of this module are recorded
    instead of run. When the block ends they are checked together: one sum per device of every
    value that must be finite (finite only if every value is), one ``aminmax`` per target and
    the recorded conditions; on CPU read with no kernel, on an accelerator folded into one
    asynchronous assertion per device. Only when that fast check fails are the checks run one
    by one, in the order they were made, so the error (type and message) is exactly the one the
    checks made one by one would raise. When the block raises (a shape check, say), the value
    checks recorded before that point run first, so again the first failing check in program
    order wins.

    Nested blocks join the outermost one. Put in the block only checks and pure computations:
    nothing that changes state, since the values are known to be valid only at its end.

    Example:
        >>> import torch
        >>> from imbalance_losses.core.validation import check_finite, deferred_value_checks
        >>> with deferred_value_checks():
        ...     check_finite(torch.ones(3), name="a")
        ...     check_finite(torch.zeros(2, 2), name="b")   # one combined check at the end
    """
    if _DEFERRED.get() is not None:
        yield
        return
    batch = _ValueChecks()
    token = _DEFERRED.set(batch)
    try:
        yield
    except Exception:
        _DEFERRED.reset(token)
        batch.run_details()  # a value check made before the failure raises first
        raise
    except BaseException:  # KeyboardInterrupt and the like: no checks
        _DEFERRED.reset(token)
        raise
    _DEFERRED.reset(token)
    batch.run()


def real_param(
    name: str,
    value: object,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> float:
    """A finite real hyper-parameter in the given bounds, as a ``float``.

    A real number is a ``numbers.Real``: Python's ``int`` and ``float``, and numpy's integer
    and floating scalars (``np.float32(0.5)`` from a sweep), not a tensor.

    Raises:
        TypeError: ``value`` is not a real number (``bool`` counts as not real).
        ValueError: ``value`` is NaN or infinite, or outside the bounds; the message names the
            parameter, its value and the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    failed = (
        (ge is not None and not x >= ge and f">= {ge}")
        or (gt is not None and not x > gt and f"> {gt}")
        or (le is not None and not x <= le and f"<= {le}")
        or (lt is not None and not x < lt and f"< {lt}")
    )
    if failed:
        raise ValueError(f"{name} must be {failed}, got {value!r}")
    return x


def reduction_param(value: object, *, name: str = "reduction") -> str:
    """``value`` if it is ``"mean"``, ``"sum"`` or ``"none"``, else ``ValueError``."""
    if value not in ("mean", "sum", "none"):
        raise ValueError(f'{name} must be "mean", "sum" or "none", got {value!r}')
    return str(value)


def criterion_reduction(criterion: object, reduction: object, *, who: str) -> str | None:
    """The reduction of a loss that adds the outputs of a ``criterion`` (``None``: the default).

    ``reduction`` is ``"mean"``, ``"sum"``, ``"none"`` or ``None``. Without a criterion it is
    the reduction to use (``None``: ``"mean"``). With one, the criterion's own ``reduction``
    attribute decides (``None`` if it has none): a ``reduction`` given as well must agree with
    it, since ``who`` adds the criterion's outputs as they are and cannot re-reduce them.

    Example:
        >>> from torch import nn
        >>> criterion_reduction(nn.CrossEntropyLoss(reduction="sum"), None, who="ARLLoss")
        'sum'
    """
    if reduction is not None and reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be "mean", "sum", "none" or None, got {reduction!r}')
    if criterion is None:
        return "mean" if reduction is None else str(reduction)
    own = getattr(criterion, "reduction", None)
    if own not in ("mean", "sum", "none"):
        if reduction is not None:
            raise ValueError(
                f"reduction={reduction!r} was given with a criterion that has no "
                f"reduction attribute ({type(criterion).__name__}); {who} adds the "
                "criterion's outputs as they are and cannot re-reduce them: reduce inside "
                "your criterion and leave reduction=None"
            )
        return None
    if reduction is not None and reduction != own:
        raise ValueError(
            f"reduction={reduction!r} conflicts with the criterion's reduction={own!r}; "
            f"set it on the criterion (e.g. nn.CrossEntropyLoss(reduction={reduction!r})) "
            "or leave reduction=None"
        )
    return str(own)


def int_param(name: str, value: object, *, ge: int | None = None) -> int:
    """A whole-number hyper-parameter (``>= ge`` when given), as an ``int``.

    Raises:
        TypeError: ``value`` is not a whole number, a ``numbers.Integral`` (Python's ``int``,
            numpy's integer scalars such as ``np.int64(3)``): ``2.5``, ``2.0`` and ``True`` are
            refused, so a count is never silently truncated.
        ValueError: ``value < ge``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    count = int(value)
    if ge is not None and count < ge:
        raise ValueError(f"{name} must be an integer >= {ge}, got {count}")
    return count


def modality_names(modalities: object) -> tuple[str, ...]:
    """A constructor's ``modalities``: a sequence (not a string or a mapping) of at least two
    distinct strings, as a tuple.

    Raises:
        TypeError: not such a sequence, or a name that is not a string.
        ValueError: fewer than two names, or a repeated name.
    """
    if isinstance(modalities, str | Mapping) or not isinstance(modalities, Sequence):
        raise TypeError(
            "modalities must be a sequence of modality names in the features' order (e.g. "
            f"['audio', 'visual']), got {type(modalities).__name__}"
        )
    names = tuple(modalities)
    if not all(isinstance(m, str) for m in names):
        raise TypeError(f"modalities must be strings, got {names!r}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"modalities needs at least two distinct names, got {list(names)}")
    return names


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type``."""
    return bool(torch.is_autocast_enabled(device_type))


def autocast_off(device: torch.device) -> AbstractContextManager[None]:
    """A context with ``torch.autocast`` off for ``device`` (a no-op when it is not on)."""
    if autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def check_features(
    features: Mapping[str, Tensor],
    *,
    widths: Mapping[str, int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    finite: bool = False,
    what: str = "features",
    by: str = "the head",
) -> None:
    """Require floating-point features of the consumer's widths, dtype and device.

    With ``widths`` (``{modality: D_m}``, the consumer's ``in_features``) the mapping must have
    exactly those modalities in that order, each of shape ``[B, D_m]``. Every ``features[m]``
    must be floating point; when ``dtype`` is given it must be that dtype unless
    ``torch.autocast`` is on for its device (autocast casts inside the matmul); when ``device``
    is given it must live there; with ``finite`` every value must be finite (see
    :func:`check_finite`). ``by`` names the consumer in the messages.

    Raises:
        TypeError: integer / bool features, or a dtype other than ``dtype`` outside autocast.
        ValueError: missing, extra or reordered modalities, a shape other than ``[B, D_m]``,
            features on another device than ``device``, non-finite values.
    """
    if widths is not None:
        check_same_modalities(widths, features, expected_what="in_features", actual_what=what)
        for name, x in features.items():
            width = widths[name]
            if x.dim() > 2 and x.shape[-1] == width:  # tokens [B, T, D]: one vector needed
                raise ValueError(
                    f"{what}[{name!r}] has shape {_shape(x)}, a sequence of tokens, but "
                    f"{by.split(' (')[0]} take one vector per sample, [B, {width}]: pass the "
                    "tokens pooled (e.g. their mean over the real tokens), docs/attention.md"
                )
            if x.dim() != 2 or x.shape[1] != width:
                raise ValueError(
                    f"{what}[{name!r}] must have shape [B, {width}] (in_features[{name!r}] = "
                    f"{width}), got shape {_shape(x)}"
                )
    for name, x in features.items():
        if not x.is_floating_point():
            raise TypeError(
                f"{what}[{name!r}] of shape {_shape(x)} are {x.dtype}; features must be "
                f"floating point (e.g. {what}[{name!r}].float())"
            )
        if device is not None and x.device != device:
            same_type = x.device.type == device.type and (
                x.device.index is None or device.index is None
            )
            if not same_type:
                raise ValueError(
                    f"{what}[{name!r}] of shape {_shape(x)} are on {x.device} but the parameters "
                    f"of {by} are on {device}; move the features or the module"
                )
        if dtype is not None and x.dtype != dtype and not autocast_enabled(x.device.type):
            raise TypeError(
                f"{what}[{name!r}] of shape {_shape(x)} are {x.dtype} but the parameters of "
                f"{by} are {dtype}; run the forward under torch.autocast, or cast the features "
                "or the module"
            )
        if finite:
            check_finite(x, name=f"{what}[{name!r}]")


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
    if not logits.is_floating_point():
        raise TypeError(
            f"{name} of shape {_shape(logits)} are {logits.dtype}; logits must be floating point"
        )
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
    batch = _DEFERRED.get()
    if batch is not None:
        batch.add_finite(tensor, name)
        return
    _check_finite_now(tensor, name)


def _finite_message(tensor: Tensor, name: str) -> str:
    return f"{name} contains non-finite values (NaN or inf), shape {_shape(tensor)}"


def _check_finite_now(tensor: Tensor, name: str) -> None:
    _raise_unless(torch.isfinite(tensor.detach()).all(), _finite_message(tensor, name))


def _valid_indices(target: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """``[B]`` bool: each class index is in ``[0, num_classes)`` or equals ``ignore_index``."""
    valid = (target >= 0) & (target < num_classes)
    return valid if ignore_index is None else valid | (target == ignore_index)


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


def check_scored_logits(
    logits: Mapping[str, Tensor],
    target: Tensor,
    modalities: tuple[str, ...],
    *,
    owner: str,
    ignore_index: int | None,
) -> tuple[int, int]:
    """Per-modality logits of exactly ``modalities`` (in order) and their target; ``(B, C)``.

    :func:`check_unimodal_logits`, :func:`check_same_modalities` against the owner's
    modalities, and :func:`check_target` with the logits' batch, classes and device: what every
    consumer of per-modality scores (OGM's and OPM's scorer, the monitor) checks.
    """
    batch, classes = check_unimodal_logits(logits)
    check_same_modalities(modalities, logits, expected_what=owner, actual_what="unimodal_logits")
    first = next(iter(logits))
    check_target(
        target,
        batch=batch,
        num_classes=classes,
        ignore_index=ignore_index,
        device=logits[first].device,
        device_of=f"unimodal_logits[{first!r}]",
    )
    return batch, classes


def check_state_keys(state: Mapping[str, Any], keys: tuple[str, ...], *, who: str) -> None:
    """``KeyError`` naming every key of ``keys`` that ``state`` lacks (``"<who> state is missing
    [...]"``), before a ``load_state_dict`` changes anything."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise KeyError(f"{who} state is missing {missing}")


def check_target(
    target: Tensor,
    *,
    batch: int,
    num_classes: int,
    name: str = "target",
    ignore_index: int | None = None,
    device: torch.device | None = None,
    device_of: str = "the logits",
) -> None:
    """Validate single-label or soft targets against ``batch`` and ``num_classes``.

    * class indices: integer ``[B]`` with every value in ``[0, num_classes)`` or equal to
      ``ignore_index`` (a sample the criterion skips, e.g. ``-100`` for
      ``nn.CrossEntropyLoss``; the methods leave it out of their statistics too);
    * soft targets: floating ``[B, C]``, finite, non-negative, each row summing to 1 (within
      ``max(1e-3, eps)`` of the target's dtype: a distribution rounded to bf16 is one).

    With ``device`` (that of the logits the target is scored against, named ``device_of`` in
    the message) the target must live there: checked first, on the tensors' metadata only (no
    host sync), so a target left on the CPU fails with a clear ``ValueError`` instead of a raw
    "Expected all tensors to be on the same device" from deep inside a ``gather``.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(target).__name__}")
    if device is not None and not _same_device(target.device, device):
        raise ValueError(
            f"{name} of shape {_shape(target)} is on {target.device} but {device_of} are on "
            f"{device}; move the target to the logits' device ({name}.to({str(device)!r}))"
        )
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
        # each entry rounded to nearest moves the row sum by at most eps / 2 (bf16: 1/3 each
        # sums to 1.002): allow the target dtype's eps, and never less than 1e-3
        tol = max(1e-3, torch.finfo(target.dtype).eps)
        ok = ok & torch.isclose(t.sum(1), torch.ones((), device=t.device), atol=tol).all()
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
        ignored = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
        message = (
            f"{name} has class indices outside [0, {num_classes}){ignored} for logits with "
            f"{num_classes} classes"
        )
        batch_checks = _DEFERRED.get()
        if batch_checks is not None:
            batch_checks.add_range(target, num_classes, ignore_index, message)
        else:
            _raise_unless(_valid_indices(target, num_classes, ignore_index).all(), message)


def modality_weights(
    name: str,
    weights: Mapping[str, float] | Sequence[float] | None,
    modalities: tuple[str, ...],
    *,
    expected_what: str,
) -> tuple[float, ...]:
    """Per-modality weights in mapping order: finite, ``>= 0``, not all zero (``1/M`` each if
    ``None``), given as a mapping with exactly ``modalities`` (same order) or a sequence.

    ``expected_what`` names where ``modalities`` come from, for the message.
    """
    m = len(modalities)
    if weights is None:
        return (1.0 / m,) * m
    if isinstance(weights, Mapping):
        check_same_modalities(modalities, weights, expected_what=expected_what, actual_what=name)
        raw = [(f"{name}[{mod!r}]", weights[mod]) for mod in modalities]
    else:
        items = list(weights)
        if len(items) != m:
            raise ValueError(
                f"{name} has {len(items)} values but there are {m} modalities {list(modalities)}"
            )
        raw = [(f"{name}[{i}]", w) for i, w in enumerate(items)]
    values = tuple(real_param(label, w, ge=0.0) for label, w in raw)
    if not any(values):
        raise ValueError(f"{name} must not all be zero, got {list(values)}")
    return values


def feature_widths(features: Mapping[str, Tensor] | None) -> tuple[int, ...] | None:
    """Each feature's width (last dimension), in mapping order (``None`` without features)."""
    return None if features is None else tuple(x.shape[-1] for x in features.values())


def check_same_layout(
    earlier: tuple[str, ...] | None,
    names: tuple[str, ...],
    widths_before: tuple[int, ...] | None,
    widths_now: tuple[int, ...] | None,
    *,
    training: bool,
) -> None:
    """Refuse a mapping laid out otherwise than at earlier training steps.

    The mapping order is the concatenation order: the head's weight is split by it. In
    training the modalities must be those of earlier steps in the same order; in evaluation
    too when they are the same modalities (a reordered mapping is split wrongly). With the same
    names in the same order, each modality's width (last dimension) must be the one it had: a
    different one means the tensors were put under each other's names.
    """
    if earlier is not None and earlier != names and (training or sorted(earlier) == sorted(names)):
        raise ValueError(
            f"modalities {list(names)} differ from those of earlier steps "
            f"{list(earlier)}; keep the same modalities in the same order (the mapping order "
            "is the concatenation order)"
        )
    if earlier == names and widths_before is not None and widths_now is not None:
        if widths_now != widths_before:
            raise ValueError(
                f"the features' widths {dict(zip(names, widths_now, strict=True))} differ from "
                f"those of earlier steps {dict(zip(names, widths_before, strict=True))}: the "
                "tensors are not under their own names (a mapping built in another order?); "
                "pass {name: that modality's tensor}, in the concatenation order"
            )


def choice_param(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming the parameter and its choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def choice_or_weights(name: str, value: object, choice: str) -> str | dict[str, float]:
    """``choice`` itself, or a copy of a mapping ``{key: w}`` of finite reals ``w >= 0``
    (e.g. ``fusion="entropy"`` or ``fusion={"audio": 0.55, "visual": 0.45}``).

    Raises:
        TypeError: a weight that is not a real number.
        ValueError: neither ``choice`` nor a mapping, or a weight NaN, infinite or negative
            (the message names ``name[key]``).
    """
    if isinstance(value, str) and value == choice:
        return choice
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{name} must be {choice!r} or a mapping {{modality: weight >= 0}}, got {value!r}"
        )
    return {k: real_param(f"{name}[{k!r}]", w, ge=0.0) for k, w in value.items()}


def optional_int_param(name: str, value: object) -> int | None:
    """``None``, or :func:`int_param` of ``value`` (an optional whole number: ``ignore_index``)."""
    return None if value is None else int_param(name, value)
