"""Per-modality encoder parameters and in-place gradient scaling, shared by ARL and OGM.

Both methods act on "the parameters of modality m's encoder". The user names them as a mapping
modality -> ``nn.Module`` or iterable of parameters; :func:`modality_parameters` flattens that to
one ``(modality index, name, parameter)`` triple per distinct parameter, and
:func:`scale_gradients_` multiplies their gradients by a per-modality factor in one fused op.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["ModalityParameter", "modality_parameters", "present_gradients", "scale_gradients_"]

ModalityParameter = tuple[int, str, Tensor]
"""``(modality index in mapping order, parameter name or "", parameter)``."""


def _named(modality: str, source: object, what: str) -> list[tuple[str, Tensor]]:
    if isinstance(source, nn.Module):
        return list(source.named_parameters())
    if isinstance(source, Tensor):  # a single parameter (iterating it would give its rows)
        items: list[object] = [source]
    elif isinstance(source, Iterable):
        items = list(source)
    else:
        raise TypeError(
            f"{what}[{modality!r}] must be an nn.Module or an iterable of parameters, got "
            f"{type(source).__name__}"
        )
    out: list[tuple[str, Tensor]] = []
    for i, p in enumerate(items):
        if not isinstance(p, Tensor) or not p.is_leaf:
            raise TypeError(
                f"{what}[{modality!r}] item {i} must be a parameter (a leaf tensor), got "
                f"{type(p).__name__}"
                + ("" if not isinstance(p, Tensor) else f" of shape {tuple(p.shape)}")
            )
        out.append(("", p))
    return out


def modality_parameters(
    modules: Mapping[str, object], *, what: str = "modules"
) -> list[ModalityParameter]:
    """Every distinct parameter of every modality, in mapping order.

    A parameter listed twice within one modality appears once (so it is never scaled twice);
    a parameter listed under two modalities is an error naming both, since each encoder must
    reach the loss only through its own modality's features.

    Raises:
        ValueError: fewer than two modalities, a modality without parameters, or a parameter
            shared between modalities.
        TypeError: a value that is neither a module nor an iterable of leaf tensors.
    """
    if not isinstance(modules, Mapping) or len(modules) < 2:
        raise ValueError(
            f"{what} must be a mapping of at least two modalities -> nn.Module or parameters, "
            f"got {type(modules).__name__}"
            + (f" with {len(modules)} modality" if isinstance(modules, Mapping) else "")
        )
    owner: dict[int, str] = {}
    out: list[ModalityParameter] = []
    for m, (modality, source) in enumerate(modules.items()):
        named = _named(modality, source, what)
        if not named:
            raise ValueError(f"{what}[{modality!r}] has no parameters")
        for name, p in named:
            other = owner.get(id(p))
            if other == modality:
                continue
            if other is not None:
                raise ValueError(
                    f"parameter {name or '<unnamed>'} of shape {tuple(p.shape)} belongs to both "
                    f"{what}[{other!r}] and {what}[{modality!r}]; each parameter must belong to "
                    "one modality only"
                )
            owner[id(p)] = modality
            out.append((m, name, p))
    return out


def present_gradients(params: Iterable[ModalityParameter]) -> tuple[list[Tensor], list[int]]:
    """The ``.grad`` of every parameter that has one, with its modality index.

    Parameters without a gradient (frozen, or unused this step) are skipped.
    """
    grads: list[Tensor] = []
    index: list[int] = []
    for m, _, p in params:
        if p.grad is not None:
            grads.append(p.grad)
            index.append(m)
    return grads, index


def scale_gradients_(grads: list[Tensor], index: list[int], factors: Tensor) -> None:
    """``g <- g * factors[m]`` in place for every gradient ``g`` of modality ``m``.

    ``factors`` is a ``[M]`` tensor on any device; each factor is used as a 0-dim tensor (no host
    sync) cast to its gradient's device and dtype, and all gradients are scaled in one
    ``torch._foreach_mul_``.
    """
    if not grads:
        return
    per_modality = factors.detach().unbind()
    scale = [
        per_modality[m].to(device=g.device, dtype=g.dtype)
        for g, m in zip(grads, index, strict=True)
    ]
    torch._foreach_mul_(grads, scale)
