"""A per-step module built again on the same model object: say that its state restarted.

Built inside the epoch loop, a criterion (or modulator) replaces one that already stepped: its
warm-up and running statistics restart every epoch, silently. :func:`built_on` keeps, per model
object (a fusion head), the latest module built on it (weak both ways: nothing here outlives
either), so that the new module can tell, at its first step, that an earlier one had stepped;
:func:`warn_rebuilt` says so. A resumed module (``load_state_dict``) should forget the count.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import MutableMapping
from typing import Any

from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["built_on", "warn_rebuilt"]

_BUILT_ON: MutableMapping[object, weakref.ref[Any]] = WeakIdKeyDictionary()


def built_on(key: object, module: object) -> int:
    """Register ``module`` as the latest built on ``key``; the earlier one's ``steps`` (or 0).

    0 when ``key`` is ``None``, cannot be weakly referenced (a plain dict of heads), or the
    earlier module is gone.
    """
    if key is None:
        return 0
    try:
        ref = _BUILT_ON.get(key)
        _BUILT_ON[key] = weakref.ref(module)
    except TypeError:
        return 0
    earlier = None if ref is None else ref()
    return 0 if earlier is None else int(earlier.steps)


def warn_rebuilt(who: str, on: str, steps: int, fresh: list[str], *, stacklevel: int) -> None:
    """``RuntimeWarning``: another ``who`` on the same ``on`` had taken ``steps`` steps.

    ``fresh``: what restarts (``"a fresh warm-up of 5 steps"``); nothing is said when it is
    empty (the same results as the earlier module). ``stacklevel`` as for the caller's caller.
    """
    if not fresh:
        return
    warnings.warn(
        f"{who}: another {who} on the same {on} had already taken {steps} training "
        f"steps when this one was built; this one starts from step 0, with "
        f"{' and '.join(fresh)}. Built inside the epoch loop, the re-weighting restarts "
        "every epoch (and never starts when an epoch is shorter than the warm-up): build the "
        "criterion once, before the training loop. For a deliberate fresh start on the same "
        "model, delete the old criterion first; to resume, load its state_dict()",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
