"""Per-modality encoder parameters and in-place gradient scaling, shared by ARL and OGM.

Both methods act on "the parameters of modality m's encoder". The user names them as a mapping
modality -> ``nn.Module`` or iterable of parameters; :func:`modality_parameters` flattens that to
one ``(modality index, name, parameter)`` triple per distinct parameter (parameters shared
between modalities are refused, excluded or assigned to one modality, as the caller says), and
:func:`scale_gradients_` multiplies their gradients by a per-modality factor (one fused op per
modality). :func:`select_parameters` keeps the ones a method acts on (weights only, all, or a
predicate), and :class:`GradientMarks` tells whether an in-place action already changed a
gradient that nothing has written since (so a second ``step()`` with no backward in between
cannot act twice).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "GradientMarks",
    "ModalityParameter",
    "ParameterSelection",
    "SharedPolicy",
    "check_head_not_listed",
    "modality_parameters",
    "present_gradients",
    "scale_gradients_",
    "select_parameters",
]

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


SharedPolicy = str
"""What :func:`modality_parameters` does with a parameter reachable from several modalities:
``"error"``, ``"exclude"``, or the name of the modality that owns it."""

_SHARED_KEYWORDS = ("error", "exclude")


def modality_parameters(
    modules: Mapping[str, object] | nn.ModuleDict,
    *,
    what: str = "modules",
    shared: SharedPolicy = "error",
    hint: str | None = None,
) -> list[ModalityParameter]:
    """Every distinct parameter of every modality, in mapping order.

    A parameter listed twice within one modality appears once (so it is never scaled twice).
    A parameter listed under two or more modalities (a *shared* parameter: one backbone with
    modality-specific stems, say) is handled by ``shared``:

    * ``"error"`` (default): a ``ValueError`` naming the parameter and both modalities, since
      each encoder must reach the loss only through its own modality's features;
    * ``"exclude"``: left out of every modality (it is not returned at all);
    * a modality name: it belongs to that modality only, under the name it has there; that
      modality must list it (a parameter shared by ``"a"`` and ``"b"`` cannot be given to
      ``"c"``).

    Order: modality by modality in mapping order, each modality's parameters in the order its
    module or iterable yields them (an assigned shared parameter at its place in the owner's
    list).

    Args:
        modules: mapping modality -> ``nn.Module`` or iterable of parameters (leaf tensors), or
            an ``nn.ModuleDict``.
        what: the argument's name in messages (``modules[...]``, ``encoders[...]``).
        shared: ``"error"``, ``"exclude"`` or a modality name (see above). The keywords win over
            a modality of the same name, which is refused as ambiguous.
        hint: appended to the shared-parameter error (what the caller's user can pass).

    Raises:
        ValueError: fewer than two modalities, a modality without parameters (after excluding
            or assigning shared ones), a shared parameter with ``shared="error"``, an unknown or
            ambiguous ``shared``, or a shared parameter the named modality does not list.
        TypeError: ``modules`` not a mapping (a dict or ``nn.ModuleDict``), a value that is
            neither a module nor an iterable of leaf tensors, or a ``shared`` that is not a
            string.
    """
    if isinstance(modules, nn.ModuleDict):
        modules = dict(modules.items())
    if not isinstance(modules, Mapping):
        raise TypeError(
            f"{what} must be a mapping of at least two modalities -> nn.Module or parameters "
            f"(a dict or nn.ModuleDict such as {{'audio': model.audio_net, 'visual': "
            f"model.visual_net}}), got {type(modules).__name__}"
        )
    if len(modules) < 2:
        raise ValueError(
            f"{what} must be a mapping of at least two modalities -> nn.Module or parameters, "
            f"got {len(modules)}: {list(modules)}"
        )
    if not isinstance(shared, str):
        raise TypeError(f"shared must be 'error', 'exclude' or a modality name, got {shared!r}")
    if shared in _SHARED_KEYWORDS and shared in modules:
        raise ValueError(
            f"shared={shared!r} is ambiguous: {what} has a modality named {shared!r}; rename it"
        )
    if shared not in _SHARED_KEYWORDS and shared not in modules:
        raise ValueError(
            f"shared must be 'error', 'exclude' or one of the modalities {list(modules)}, got "
            f"{shared!r}"
        )
    # every modality's distinct parameters, and every modality each parameter appears under
    listed: list[list[tuple[str, Tensor]]] = []
    owners: dict[int, list[str]] = {}
    for modality, source in modules.items():
        named = _named(modality, source, what)
        if not named:
            raise ValueError(f"{what}[{modality!r}] has no parameters")
        seen: set[int] = set()
        mine: list[tuple[str, Tensor]] = []
        for name, p in named:
            if id(p) in seen:
                continue
            seen.add(id(p))
            mine.append((name, p))
            owners.setdefault(id(p), []).append(modality)
        listed.append(mine)
    out: list[ModalityParameter] = []
    for m, (modality, mine) in enumerate(zip(modules, listed, strict=True)):
        kept = 0
        for name, p in mine:
            where = owners[id(p)]
            if len(where) > 1:
                if shared == "error":
                    first, second = where[0], where[1]
                    raise ValueError(
                        f"parameter {name or '<unnamed>'} of shape {tuple(p.shape)} belongs to "
                        f"both {what}[{first!r}] and {what}[{second!r}]; each parameter must "
                        "belong to one modality only" + (f" ({hint})" if hint else "")
                    )
                if shared == "exclude" or shared not in where:
                    if shared != "exclude":
                        raise ValueError(
                            f"parameter {name or '<unnamed>'} of shape {tuple(p.shape)} is "
                            f"shared by {' and '.join(f'{what}[{w!r}]' for w in where)} but "
                            f"{what}[{shared!r}] (shared={shared!r}) does not list it; "
                            "assign it to one of the modalities that share it, or pass "
                            "shared='exclude'"
                        )
                    continue
                if modality != shared:
                    continue
            out.append((m, name, p))
            kept += 1
        if not kept:
            raise ValueError(
                f"{what}[{modality!r}] has no parameters of its own: all "
                f"{len(mine)} are shared with other modalities and shared={shared!r} "
                "leaves none to it"
            )
    return out


def check_head_not_listed(
    params: Iterable[ModalityParameter],
    head: object,
    names: tuple[str, ...],
    *,
    who: str,
    action: str,
    what: str = "encoders",
) -> None:
    """Refuse ``params`` (from :func:`modality_parameters`) that hold a fusion head's parameters.

    ``head`` is a module, a mapping of per-modality head modules (sum fusion), or any callable
    (nothing to check). ``names[m]`` names modality ``m``; ``who`` / ``action`` complete the
    message (``"ARL"``, ``"re-weight"``).

    Raises:
        ValueError: a head parameter is listed, naming its shape and the modality listing it.
    """
    heads = list(head.values()) if isinstance(head, Mapping) else [head]
    listed = {id(p): names[m] for m, _, p in params}
    shared: list[tuple[int, ...]] = []
    where: list[str] = []
    for module in heads:
        if not isinstance(module, nn.Module):
            continue
        for p in module.parameters():
            if id(p) in listed:
                shared.append(tuple(p.shape))
                if listed[id(p)] not in where:
                    where.append(listed[id(p)])
    if shared:
        raise ValueError(
            f"the fusion head's parameters {shared} are listed in {what} "
            f"({', '.join(f'{what}[{n!r}]' for n in where)}); {who} must not {action} the "
            "shared head"
        )


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
    sync) cast to its gradients' device and dtype. One ``torch._foreach_mul_`` per modality (and
    device and dtype), each with one 0-dim factor for its whole list: PyTorch's fused path on
    CUDA (one launch per list), where a list of per-tensor factors would fall back to one kernel
    per gradient tensor.
    """
    if not grads:
        return
    per_modality = factors.detach().unbind()
    groups: dict[tuple[int, torch.device, torch.dtype], list[Tensor]] = {}
    for g, m in zip(grads, index, strict=True):
        groups.setdefault((m, g.device, g.dtype), []).append(g)
    for (m, device, dtype), group in groups.items():
        torch._foreach_mul_(group, per_modality[m].to(device=device, dtype=dtype))


ParameterSelection = Literal["weights", "all"] | Callable[[str, Tensor], bool]
"""``"weights"`` (every parameter with ``dim >= 2``), ``"all"``, or ``(name, param) -> bool``."""


def _is_selected(selection: ParameterSelection, name: str, param: Tensor) -> bool:
    if selection == "weights":
        return param.dim() >= 2
    if selection == "all":
        return True
    assert callable(selection)
    return bool(selection(name, param))


def select_parameters(
    params: list[ModalityParameter], selection: ParameterSelection, modalities: Iterable[str]
) -> list[ModalityParameter]:
    """The entries of ``params`` that ``selection`` keeps, in order.

    ``selection``: ``"weights"`` (every parameter with ``dim >= 2``: conv and linear weights, not
    biases nor normalisation parameters), ``"all"``, or a predicate ``(name, param) -> bool``
    (``name`` as in :func:`modality_parameters`, ``""`` for a bare parameter).

    Raises:
        ValueError: a modality (of ``modalities``, in mapping order) left with no parameter.

    Example:
        >>> from torch import nn
        >>> from imbalance_losses.core.params import modality_parameters, select_parameters
        >>> enc = {"audio": nn.Linear(2, 3), "visual": nn.Linear(4, 3)}
        >>> chosen = select_parameters(modality_parameters(enc), "weights", enc)
        >>> [(m, name) for m, name, _ in chosen]
        [(0, 'weight'), (1, 'weight')]
    """
    chosen = [(m, name, p) for m, name, p in params if _is_selected(selection, name, p)]
    for m, modality in enumerate(modalities):
        if not any(i == m for i, _, _ in chosen):
            total = sum(1 for i, _, _ in params if i == m)
            raise ValueError(
                f"no parameter of modality {modality!r} is selected by parameters="
                f"{selection!r} ({total} parameter(s) in total); pass parameters='all' "
                "or a predicate that selects its encoder's parameters"
            )
    return chosen


class GradientMarks:
    """Which parameters' ``.grad`` an in-place action left, and whether they changed since.

    :meth:`mark` after acting keeps, per parameter, a weak reference to its gradient tensor and
    that tensor's version counter; :meth:`unchanged` is true while ``p.grad`` is still that very
    tensor and nothing wrote to it (no backward accumulated into it, no ``zero_grad``, no in-place
    op): acting on it again would act twice on one backward's gradient.

    Example:
        >>> import torch
        >>> from imbalance_losses.core.params import GradientMarks
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> p.grad = torch.ones(2)
        >>> marks = GradientMarks()
        >>> marks.mark([(p, p.grad)])
        >>> marks.unchanged(p)
        True
        >>> _ = p.grad.add_(1.0)                     # a new backward accumulated into it
        >>> marks.unchanged(p)
        False
    """

    def __init__(self) -> None:
        self._marks: dict[int, tuple[weakref.ref[Tensor], int]] = {}

    def __getstate__(self) -> dict[str, object]:
        """Pickling / deepcopy: no marks (weak references do not pickle, and the copy's
        parameters and gradients are other tensors: none of them was acted on)."""
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]

    def unchanged(self, p: Tensor) -> bool:
        """Whether ``p.grad`` is the very tensor last marked, not written since."""
        seen, grad = self._marks.get(id(p)), p.grad
        return (
            seen is not None and grad is not None and seen[0]() is grad and seen[1] == grad._version
        )

    def fresh(self, params: list[Tensor]) -> list[int]:
        """Positions of the parameters that have a gradient not :meth:`unchanged` since marked."""
        return [i for i, p in enumerate(params) if p.grad is not None and not self.unchanged(p)]

    def mark(self, acted: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Remember ``(parameter, its gradient)`` pairs just acted on (others keep their marks)."""
        self._marks.update((id(p), (weakref.ref(g), g._version)) for p, g in acted)
