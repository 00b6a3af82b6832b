"""Recognising a repeated call: the same tensors again, by identity, while their step is open.

A module that acts once per training step (ARL, AGM, OPM) may be called twice in one step on
the same features, e.g. once for the loss and once more for a second loss or for logging. Such
a repeat must not count a second step. The rule, shared by those modules:

* every tracked tensor of the call is still *open* (passed to this module in a call whose step
  has not ended): a **repeat**, the same step again;
* none is: a **new call** (a new step, or a new micro-batch of an accumulated step: new
  tensors);
* some are and some are not: a ``ValueError`` (a mix of two calls' tensors).

When a step ends depends on the module's mode: in hook mode when a backward pass reaches the
tensor (:meth:`OpenTensors.add_until_backward`; a tensor reused for the next step is new again
after its backward), in encoders mode at the module's ``step()`` (:meth:`OpenTensors.add` and
:meth:`OpenTensors.reset`). Tensors are held weakly: nothing is kept alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from torch import Tensor
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["OpenTensors", "repeated_call"]


def repeated_call(
    source: object,
    pending: Callable[[Tensor], bool],
    *,
    grad_only: bool,
    who: str,
    what: str,
    effect: str,
) -> bool:
    """Whether this call repeats an open one: ``pending(x)`` for every tracked tensor.

    Args:
        source: the call's ``{modality: tensor}`` mapping (anything else: not a repeat).
        pending: whether a tensor was passed in a call whose step is still open.
        grad_only: track only the tensors that require grad (hook mode: a tensor without a
            gradient has no backward to end its step).
        who: the module, for the message (``"ARLLoss"``).
        what: when the step ends, for the message (``"whose backward has not run"``).
        effect: what a repeated call does, for the message (``"the loss only"``).

    Raises:
        ValueError: some tracked tensors are pending and others are not (naming both).
    """
    if not isinstance(source, Mapping):
        return False
    tracked = [
        (name, x)
        for name, x in source.items()
        if isinstance(x, Tensor) and (x.requires_grad or not grad_only)
    ]
    names = [name for name, x in tracked if pending(x)]
    if not names or len(names) == len(tracked):
        return bool(names)
    fresh = [name for name, _ in tracked if name not in names]
    raise ValueError(
        f"features {names} were already passed to this {who} in a training-mode call "
        f"{what}, but features {fresh} are new tensors; pass the same tensors again (a "
        f"repeated call: {effect}, the same step) or all new ones"
    )


class _Reached:
    """Gradient hook that records that a backward pass reached the tensor.

    It changes nothing, unless given ``then``: a gradient hook of the method's own (``g -> g'``
    or ``None``), run behind it, so that one hook per tensor both marks and acts.
    """

    __slots__ = ("fired", "then")

    def __init__(self, then: Callable[[Tensor], Tensor | None] | None = None) -> None:
        self.fired = False
        self.then = then

    def __call__(self, grad: Tensor) -> Tensor | None:
        self.fired = True
        return None if self.then is None else self.then(grad)


class OpenTensors:
    """The tensors of the open step, by identity (weak keys), for :func:`repeated_call`.

    Not part of a pickle or deep copy (a copy starts with no open step).
    """

    def __init__(self) -> None:
        # tensor -> (backward marker, its hook handle), or None (open until reset)
        self._table: MutableMapping[Tensor, tuple[_Reached, RemovableHandle] | None] = (
            WeakIdKeyDictionary()
        )
        # tensor -> a one-element box of the decision of the call that opened it (see keep)
        self._kept: MutableMapping[Tensor, tuple[object]] = WeakIdKeyDictionary()

    def __reduce__(self) -> tuple[Any, ...]:
        return (OpenTensors, ())

    def add_until_backward(
        self, x: Tensor, then: Callable[[Tensor], Tensor | None] | None = None
    ) -> None:
        """Open ``x`` until a backward pass reaches it (``x`` must require grad).

        ``then``: a gradient hook run on ``x``'s gradient in that backward (its result, if not
        ``None``, replaces the gradient); it is removed with the mark when ``x`` is opened
        again or the step is reset. ARL's hook mode scales the gradient this way.
        """
        self._close(x)
        reached = _Reached(then)
        handle: RemovableHandle = x.register_hook(reached)  # type: ignore[no-untyped-call]
        self._table[x] = (reached, handle)

    def add(self, x: Tensor) -> None:
        """Open ``x`` until :meth:`reset`."""
        self._close(x)
        self._table[x] = None

    def _close(self, x: Tensor) -> None:
        """Forget ``x``'s mark (removing its hook) and its kept decision, before reopening it."""
        old = self._table.get(x)
        if old is not None:
            old[1].remove()
        self._kept.pop(x, None)

    def keep(self, tensors: Iterable[Tensor], decision: object) -> None:
        """Keep ``decision`` with each open tensor of one call (for :meth:`kept`)."""
        box = (decision,)  # one box per call: two calls' equal decisions stay distinct
        for x in tensors:
            if x in self._table:
                self._kept[x] = box

    def kept(self, source: Mapping[str, Tensor], *, who: str) -> object:
        """The decision kept (:meth:`keep`) with the open tensors of a repeated call.

        Several calls may be open at once (micro-batches forwarded before any backward); a
        repeat gets the decision of the call that opened *its* tensors, not the latest one.

        Raises:
            ValueError: the open tensors were opened by different calls (a mix of two calls).
        """
        boxes = {
            n: self._kept.get(x)
            for n, x in source.items()
            if isinstance(x, Tensor) and self.pending(x)
        }
        if len({id(b) for b in boxes.values()}) > 1:
            raise ValueError(
                f"features {list(boxes)} were passed to this {who} in different calls whose "
                "steps are still open; pass one call's tensors again (a repeat) or all new ones"
            )
        box = next(iter(boxes.values()), None)
        return None if box is None else box[0]

    def pending(self, x: Tensor) -> bool:
        """Whether ``x`` belongs to the open step."""
        if x not in self._table:
            return False
        entry = self._table[x]
        return entry is None or not entry[0].fired

    def reset(self) -> None:
        """Close the step: every tensor is new again."""
        for entry in list(self._table.values()):
            if entry is not None:
                entry[1].remove()
        self._table.clear()
        self._kept.clear()
