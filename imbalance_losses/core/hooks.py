"""Scaling the gradient that flows into a tensor, once per backward pass.

:func:`scale_grad` returns a tensor equal to its input (a view, no copy) whose backward
multiplies the incoming gradient by a fixed, detached factor. Because it is a new autograd node,
each returned tensor scales exactly once per backward that reaches it, whatever else uses the
input; no hook table and no removal are needed.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

__all__ = ["scale_grad"]


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
