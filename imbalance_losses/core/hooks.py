"""Scaling the gradient that flows into a tensor, once per backward pass.

:func:`scale_grad` returns a tensor equal to its input (a view, no copy) whose backward
multiplies the incoming gradient by a fixed, detached factor. Because it is a new autograd node,
each returned tensor scales exactly once per backward that reaches it, whatever else uses the
input; no hook table and no removal are needed.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, cast

import torch
from torch import Tensor

__all__ = ["scale_grad", "scaling_hook", "warn_if_frozen", "warn_on_backward"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward ``g -> g * k`` (``k`` a detached 0-dim tensor)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Tensor) -> Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.k.to(device=grad.device, dtype=grad.dtype), None


def scale_grad(x: Tensor, factor: Tensor) -> Tensor:
    """``x`` itself in the forward pass; the gradient flowing back into ``x`` is ``factor * g``.

    ``factor`` is a 0-dim tensor (any device; detached here, cast to the gradient's dtype and
    device in the backward: no host sync). The gradient scaled is whatever reaches the
    returned tensor, so under ``GradScaler`` it is the scaled gradient (scaling commutes).
    """
    return cast(Tensor, _ScaleGrad.apply(x, factor.detach()))  # type: ignore[no-untyped-call]


class _WarnOnBackward:
    """Loss hook: the first backward through it warns once per module (its ``_warned_eval``)."""

    def __init__(self, module: object, message: str) -> None:
        self.module = weakref.ref(module)
        self.message = message

    def __call__(self, grad: Tensor) -> None:
        module = self.module()
        if module is None or module.__dict__.get("_warned_eval", False):
            return
        module.__dict__["_warned_eval"] = True
        level = 2  # point the warning at the first frame outside torch: the backward() call
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            level, frame = level + 1, frame.f_back
        warnings.warn(self.message, RuntimeWarning, stacklevel=level)


def warn_on_backward(loss: Tensor, module: object, message: str) -> None:
    """Warn (``RuntimeWarning``, at the user's ``backward()`` line) if a backward reaches ``loss``.

    For a module that returned ``loss`` from a call that cannot be a training step (eval mode):
    a backward through it means the user trains with the module in the wrong mode. Warns once per
    module (``module._warned_eval``); nothing is registered once it has warned, nor without
    gradients.
    """
    if module.__dict__.get("_warned_eval", False):
        return
    if not (torch.is_grad_enabled() and loss.requires_grad):
        return
    loss.register_hook(_WarnOnBackward(module, message))  # type: ignore[no-untyped-call]


def scaling_hook(factor: Tensor) -> Callable[[Tensor], Tensor]:
    """Gradient hook ``g -> g * s`` with a fixed (detached, 0-dim) factor ``s``."""
    s = factor.detach()
    return lambda grad: grad * s.to(device=grad.device, dtype=grad.dtype)


def warn_if_frozen(
    features: Mapping[str, Tensor], who: str, action: str, *, stacklevel: int = 6
) -> None:
    """Warn when no feature requires grad: a hook has nothing to act on.

    ``stacklevel`` 6 points at the user's call of a module whose ``forward`` calls a helper
    that calls this.
    """
    if not any(x.requires_grad for x in features.values()):
        warnings.warn(
            f"{who}: no feature requires grad (frozen encoders or detached copies), so the "
            f"{action} has no gradient to act on; pass the tensors the model fused",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
