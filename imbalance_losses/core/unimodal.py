"""Unimodal logits from the model's own fusion head: no new parameters.

Every method needs a per-modality prediction ``z_m``. Training a separate classifier per
modality would add parameters and measure something else, so ``z_m`` is read off the fusion head
the model already has:

* **``nn.Linear`` over the concatenation** ``x = cat(x_1, ..., x_M)`` (mapping order). Split the
  weight column-wise, ``W = [W_1 | ... | W_M]`` with ``W_m`` of width ``D_m``, and share the bias
  equally::

      z_m = x_m W_m^T + b / M          so that          sum_m z_m = x W^T + b = head(x)

  exactly (up to floating-point rounding of the summation order). This is the decomposition
  every module uses. It differs from the official OGM-GE / ARL code, which zero-pads the other
  modalities and so gives every ``z_m`` the full bias ``b``, by the per-class constant
  ``b (1 - 1/M)``; with the shared split the unimodal logits add up to the fused logits. An
  ``nn.Linear`` subclass with a ``forward`` of its own (a cosine classifier) computes something
  else from its weight: it is any other callable (below).

* **A mapping of per-modality heads** (sum / late fusion, ``{"audio": head_a, ...}``): ``z_m`` is
  ``heads[m](x_m)``. If the model fuses by ``sum_m heads[m](x_m)``, the identity above holds too.

* **A** :class:`MappingHead` ``(fn)``: a head over the modality mapping itself (attention fusion
  over token sequences of different lengths, ``fn({"audio": [B, 100, 768], "visual": [B, 16,
  768]}) -> [B, C]``). ``z_m = fn({m: x_m})``, the other modalities omitted (attention handles a
  missing sequence without padding), or, with ``absent="zeros"``, replaced by zeros of their
  shape (for an ``fn`` that needs every key). Features may have any shape ``[B, ...]``.

* **Any other callable over the concatenation** (an MLP, a gated or bilinear head, your own
  module): ``z_m = head(cat(0, ..., x_m, ..., 0))``, the other modalities' features replaced by
  zeros. For a non-linear head this is an *approximation* of the modality's contribution (the
  terms do not add up to the fused logits in general); it is what the published code does for
  every head. A head that takes the modalities as separate arguments (FiLM, gated fusion) can be
  wrapped: ``unimodal_logits(lambda x: film(x[:, :512], x[:, 512:]), feats)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .distributed import is_sharded
from .validation import check_features, check_modalities

__all__ = ["Head", "MappingHead", "unimodal_logits"]

Absent = Literal["omit", "zeros"]


class MappingHead:
    r"""A fusion head over the modality mapping: ``fn({modality: [B, ...]}) -> [B, C]`` logits.

    For models that fuse by attention over each modality's token sequence, where features of
    different shapes cannot be concatenated. The unimodal prediction of modality ``m`` is the
    head run on that modality alone:

    $$z_m = f(\{m: x_m\})\ \ (\texttt{absent="omit"}), \qquad
    z_m = f(\{m: x_m,\ k: 0_{\text{shape}(x_k)}\ \forall k \ne m\})\ \ (\texttt{"zeros"})$$

    and a subset ``S`` of modalities (AGM's Shapley game) is ``f`` on the modalities of ``S``.
    ``fn`` may close over what the model needs beyond the features (padding masks of each
    modality's tokens, say). It is called as given: a module ``fn`` is the model's own (not
    registered here; :meth:`parameters` reads its parameters for the dtype and device checks).

    Args:
        fn: the fusion: a callable (or ``nn.Module``) taking ``{modality: tensor}``, returning
            ``[B, C]`` logits. With ``absent="omit"`` it must accept any non-empty subset of
            the modalities; the empty subset is never evaluated (no modality, no evidence: zero
            logits where a method needs it).
        absent: ``"omit"`` (default) or ``"zeros"``, how a modality left out is passed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import MappingHead, unimodal_logits
        >>> proj = nn.Linear(8, 3)
        >>> head = MappingHead(lambda f: proj(torch.stack([x.mean(1) for x in f.values()]).sum(0)))
        >>> feats = {"audio": torch.randn(2, 100, 8), "visual": torch.randn(2, 16, 8)}  # tokens
        >>> tuple(head(feats).shape), tuple(unimodal_logits(head, feats)["visual"].shape)
        ((2, 3), (2, 3))
    """

    def __init__(self, fn: Callable[[dict[str, Tensor]], Tensor], absent: Absent = "omit") -> None:
        if not callable(fn):
            raise TypeError(f"MappingHead needs a callable fn, got {type(fn).__name__}")
        if absent not in ("omit", "zeros"):
            raise ValueError(f"absent must be 'omit' or 'zeros', got {absent!r}")
        self.fn = fn
        self.absent: Absent = absent

    def __call__(self, features: Mapping[str, Tensor]) -> Tensor:
        """``fn(features)``: the fused logits."""
        return self.fn(dict(features))

    def subset(self, features: Mapping[str, Tensor], keep: Collection[str]) -> Tensor:
        """The head on the modalities in ``keep`` only (the others omitted or zeros)."""
        if self.absent == "omit":
            return self.fn({m: x for m, x in features.items() if m in keep})
        return self.fn({m: x if m in keep else torch.zeros_like(x) for m, x in features.items()})

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of ``fn`` when it is a module (nothing otherwise)."""
        return self.fn.parameters() if isinstance(self.fn, nn.Module) else iter(())

    def __repr__(self) -> str:
        return f"MappingHead({self.fn!r}, absent={self.absent!r})"


Head = (
    MappingHead
    | nn.Linear
    | nn.ModuleDict
    | Mapping[str, Callable[[Tensor], Tensor]]
    | Callable[[Tensor], Tensor]
)
"""What :func:`unimodal_logits` accepts as a fusion head.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from imbalance_losses import unimodal_logits
    >>> feats = {"audio": torch.ones(2, 4), "visual": torch.ones(2, 6)}
    >>> heads = {"audio": nn.Linear(4, 3), "visual": nn.Linear(6, 3)}     # sum / late fusion
    >>> tuple(unimodal_logits(heads, feats)["visual"].shape)
    (2, 3)
    >>> mlp = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))  # any callable head
    >>> tuple(unimodal_logits(mlp, feats)["audio"].shape)                # others zeroed
    (2, 3)
"""


def _widths(features: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{m}: {tuple(x.shape)}" for m, x in features.items())


def _check_concat(features: Mapping[str, Tensor]) -> None:
    """All features must be ``[B, ..., D_m]`` with the same leading shape to concatenate."""
    items = list(features.items())
    first_name, first = items[0]
    for name, x in items:
        if x.dim() < 2:
            raise ValueError(
                f"features[{name!r}] must have shape [B, D] (batch, features) to be "
                f"concatenated, got shape {tuple(x.shape)}"
            )
        if x.shape[:-1] != first.shape[:-1]:
            raise ValueError(
                f"features[{name!r}] has shape {tuple(x.shape)} but features[{first_name!r}] "
                f"has shape {tuple(first.shape)}; they can only be concatenated along the last "
                "dimension"
            )


def _splits_exactly(head: object) -> TypeGuard[nn.Linear]:
    """An ``nn.Linear`` that computes ``nn.Linear.forward`` (``x W^T + b``): its weight splits.

    A subclass with a forward of its own (a cosine classifier that normalises ``x`` and ``W``,
    a fake-quantised layer) computes something else from its weight: it is evaluated as any
    other callable head, on the zero-padded concatenation.
    """
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _linear(head: nn.Linear, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    total = sum(x.shape[-1] for x in features.values())
    if total != head.in_features:
        raise ValueError(
            f"the nn.Linear head expects in_features={head.in_features} = the sum of the "
            f"modalities' widths, but the features give {total} ({_widths(features)}); check "
            "that every modality is present, in the concatenation order, with its width"
        )
    if _sharded(head):
        return _linear_by_forward(head, features)
    m = len(features)
    bias = None if head.bias is None else head.bias / m
    out: dict[str, Tensor] = {}
    offset = 0
    for name, x in features.items():
        width = x.shape[-1]
        out[name] = F.linear(x, head.weight[:, offset : offset + width], bias)
        offset += width
    return out


@contextmanager
def eval_mode(head: object) -> Iterator[None]:
    """Every module of ``head`` in eval mode inside the block, each back to its own mode after.

    ``head``: an ``nn.Module`` (a whole model too), a :class:`MappingHead` (its function), a
    mapping modality -> head (each module of it), or anything else (nothing to switch). Reading
    a head or a model for a statistic must not change training: in train mode a BatchNorm would
    update its running statistics with masked or one-modality inputs and a dropout would draw
    from the RNG. Each module's own flag is restored, not ``train()`` called on the root, so a
    submodule the user froze in eval mode stays so.
    """
    root = head.fn if isinstance(head, MappingHead) else head
    roots = list(root.values()) if isinstance(root, Mapping) else [root]
    modules = [m for r in roots if isinstance(r, nn.Module) for m in r.modules()]
    modes = [m.training for m in modules]
    for r in roots:
        if isinstance(r, nn.Module):
            r.eval()  # the module's own train(False), if it overrides train()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def reshard_fsdp(head: object) -> None:
    """Return FSDP2 modules of ``head`` to their sharded state after a call under ``no_grad``.

    A ``fully_shard`` root module keeps its parameters gathered after its forward (they are
    freed by its backward). A head evaluated again after the backward (unimodal logits for a
    statistic, masked copies) would stay gathered, and the next forward would reuse the gathered
    copies of the weights from before ``optimizer.step()``. ``reshard()`` frees them; a later
    backward through that call gathers them again.
    """
    if torch.is_grad_enabled():  # a backward may follow: it frees the gathered parameters
        return
    root = head.fn if isinstance(head, MappingHead) else head
    roots = list(root.values()) if isinstance(root, Mapping) else [root]
    for module in roots:  # a fully_shard module's class is FSDP<its class> (FSDPModule)
        if isinstance(module, nn.Module) and type(module).__name__.startswith("FSDP"):
            module.reshard()  # type: ignore[operator]


def _sharded(head: nn.Module) -> bool:
    """Whether ``head``'s parameters are sharded outside its forward (FSDP2's ``fully_shard``)."""
    weight = getattr(head, "weight", None)
    return weight is not None and is_sharded(weight)


def column_masks(keep: Tensor, widths: Sequence[int]) -> Tensor:
    """``[K, D]`` bool: ``keep [K, M]`` (copy ``k`` keeps modality ``j``) spread over each
    modality's ``widths[j]`` columns of the concatenation."""
    sizes = torch.tensor(list(widths), device=keep.device)
    return keep[:, torch.repeat_interleave(torch.arange(len(widths), device=keep.device), sizes)]


def masked_copies(x: Tensor, columns: Tensor) -> Tensor:
    """``[K, *x.shape]``: copies of the concatenation ``x`` with the columns that
    :func:`column_masks` ``columns [K, D]`` leave out zeroed (one ``where``)."""
    column = columns.reshape(columns.shape[0], *([1] * (x.dim() - 1)), x.shape[-1])
    return torch.where(column, x.unsqueeze(0), x.new_zeros(()))


def _linear_by_forward(head: nn.Linear, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The split of :func:`_linear` through the head's own forward (a sharded head).

    One call on the ``M`` zero-padded copies plus one zero row, ``y_0 = head(0) = b``:
    ``z_m = head([0, .., x_m, .., 0]) - (M - 1) / M * b``, the same ``x_m W_m^T + b / M`` and the
    same gradients, with the parameters gathered by the head's own forward hooks.
    """
    x = torch.cat(list(features.values()), dim=-1)
    m, batch = len(features), x.shape[0]
    alone = torch.eye(m, dtype=torch.bool, device=x.device)  # copy j keeps modality j only
    keep = column_masks(alone, [f.shape[-1] for f in features.values()])
    padded = masked_copies(x, keep).reshape(-1, *x.shape[1:])
    y = head(torch.cat([padded, x.new_zeros(1, *x.shape[1:])]))
    bias = y[-1:] * ((m - 1) / m)
    z = y[:-1].reshape(m, batch, *y.shape[1:]) - bias
    return {name: z[j] for j, name in enumerate(features)}


def _first_parameter(head: object) -> Tensor | None:
    """The first parameter of a module head (``None`` for plain callables and bare modules)."""
    if isinstance(head, nn.Linear):
        return head.weight
    if isinstance(head, nn.Module | MappingHead):
        return next(head.parameters(), None)
    return None


def _check_dtype_device(features: Mapping[str, Tensor], head: object, by: str) -> None:
    """Floating-point features; of the dtype and on the device of the head's first parameter.

    A parameter sharded by FSDP2 (a ``DTensor``) is checked for its device only: under a
    ``MixedPrecisionPolicy`` the forward computes in ``param_dtype`` while the shard keeps its
    own (fp32) dtype.
    """
    p = _first_parameter(head)
    if p is None:
        check_features(features, by=by)
    elif is_sharded(p):
        check_features(features, device=p.device, by=by)
    else:
        check_features(features, dtype=p.dtype, device=p.device, by=by)


def _per_modality(
    heads: Mapping[str, Callable[[Tensor], Tensor]] | nn.ModuleDict, features: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    missing = [m for m in heads if m not in features]
    extra = [m for m in features if m not in heads]
    if missing or extra:
        raise ValueError(
            f"the per-modality heads are for modalities {list(heads)} but the features have "
            f"{list(features)} (missing features for {missing}, no head for {extra})"
        )
    for name, x in features.items():
        _check_dtype_device({name: x}, heads[name], by=f"heads[{name!r}]")
    return {name: modality_head(heads[name], name, x) for name, x in features.items()}


def modality_head(
    head: Callable[[Tensor], Tensor], name: str, x: Tensor, *, of: Tensor | None = None
) -> Tensor:
    """``head(x)``: modality ``name``'s own head (sum / late fusion) on its features.

    A width that does not fit the head raises a ``ValueError`` naming the modality and both
    shapes instead of the head's raw matmul error: checked up front for an ``nn.Linear``
    (``in_features``), else read from the head's own shape error (anything else propagates
    unchanged). ``of``: the modality's features when ``x`` is built from them (masking runs
    the head on ``[x_m; 0]``), for the message.
    """
    shown = tuple((x if of is None else of).shape)
    if (  # a LazyLinear reads its in_features (0 until then) from its first input
        isinstance(head, nn.Linear) and not is_lazy(head.weight) and x.shape[-1] != head.in_features
    ):
        raise ValueError(
            f"heads[{name!r}] is an nn.Linear with in_features={head.in_features} but "
            f"features[{name!r}] have shape {shown} (width {x.shape[-1]}); each modality's "
            "head takes that modality's features"
        )
    try:
        return head(x)
    except RuntimeError as err:
        if isinstance(err, torch.cuda.OutOfMemoryError) or not any(
            word in str(err) for word in ("shape", "size")
        ):
            raise
        raise ValueError(
            f"heads[{name!r}] failed on features[{name!r}] of shape {shown}; check that each "
            f"modality's features have the width its head takes. The head said: {err}"
        ) from err


def _zero_padded(
    head: Callable[[Tensor], Tensor], features: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    zeros = {name: torch.zeros_like(x) for name, x in features.items()}
    out: dict[str, Tensor] = {}
    for name, x in features.items():
        parts = [x if other == name else zeros[other] for other in features]
        try:
            out[name] = head(torch.cat(parts, dim=-1))
        except RuntimeError as err:
            # only shape errors are about the features' widths; anything else (out of memory,
            # dtype or device mismatch, the head's own errors) propagates unchanged
            if isinstance(err, torch.cuda.OutOfMemoryError) or not any(
                word in str(err) for word in ("shape", "size")
            ):
                raise
            total = sum(p.shape[-1] for p in parts)
            raise ValueError(
                f"the fusion head failed on the zero-padded concatenation for modality {name!r} "
                f"(width {total} from {_widths(features)}); check that every modality is "
                f"present, in the concatenation order, with its width. The head said: {err}"
            ) from err
    return out


def _check_outputs(out: Mapping[str, Tensor], batch: int) -> None:
    shapes = {name: tuple(z.shape) for name, z in out.items()}
    first_name, first = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if not shape or shape[0] != batch:
            raise ValueError(
                f"the head returned logits of shape {shape} for modality {name!r}; expected "
                f"batch size {batch} first"
            )
        if shape != first:
            raise ValueError(
                f"the head returned logits of shape {shape} for modality {name!r} but "
                f"{first} for {first_name!r}; every modality must give logits of one shape"
            )


def unimodal_logits(head: Head, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    r"""Per-modality logits from the model's own fusion head, in mapping order.

    $$z_m = x_m W_m^\top + \frac{b}{M}, \qquad \sum_m z_m = x W^\top + b
    \qquad (W = [W_1 \mid \dots \mid W_M],\ x = [x_1, \dots, x_M])$$

    Args:
        head: the fusion head: a :class:`MappingHead` (``z_m`` = the head on modality ``m``
            alone; features of any shape ``[B, ...]``); an ``nn.Linear`` over the concatenation
            of the features (exact split, ``z_m = x_m W_m^T + b/M``,
            ``sum_m z_m == head(cat(x))``; a subclass with a ``forward`` of its own is any
            other callable); a mapping modality -> head for per-modality (sum /
            late) fusion; or any other callable over the concatenation, evaluated with the
            other modalities zeroed (an approximation for
            non-linear heads).
        features: ordered mapping modality -> features ``[B, ..., D_m]``, batch first, in the
            order the model concatenates them. At least two modalities.

    Returns:
        ``{modality: logits}`` in the order of ``features``. Gradients flow to the features and
        to the head's parameters as in the fused forward pass.

    Features must be floating point. For a head with parameters (an ``nn.Linear``: its
    weight; any other module, or each module of a mapping: its first parameter) they must also
    be of the parameters' dtype, unless ``torch.autocast`` is on, and on their device. A plain
    callable is only checked for floating-point features.

    Raises:
        TypeError: integer or bool features, or features of another dtype than the head's
            parameters outside ``torch.autocast`` (the message names the modality, the shape
            and both dtypes); a head of an unsupported kind; a features argument that is not a
            mapping.
        ValueError: fewer than two modalities, batch sizes that differ, widths that do not add
            up to the linear head's ``in_features``, modalities missing from (or extra to) a
            mapping of heads, a modality's features of a width its own head does not take,
            features on another device than the head's parameters, or outputs of inconsistent
            shapes. The message names the modality and the expected and actual shapes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import unimodal_logits
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(4 + 6, 3)             # concatenation head: audio 4 wide, visual 6
        >>> feats = {"audio": torch.randn(2, 4), "visual": torch.randn(2, 6)}
        >>> z = unimodal_logits(head, feats)
        >>> list(z), tuple(z["audio"].shape)
        (['audio', 'visual'], (2, 3))
        >>> fused = head(torch.cat([feats["audio"], feats["visual"]], dim=1))
        >>> torch.allclose(z["audio"] + z["visual"], fused)  # the parts add up to the fused logits
        True
    """
    batch = check_modalities(features)
    if isinstance(head, MappingHead):
        _check_dtype_device(features, head, by="the MappingHead")
        out = {name: head.subset(features, (name,)) for name in features}
    elif _splits_exactly(head):
        _check_concat(features)
        _check_dtype_device(features, head, by="the nn.Linear head")
        out = _linear(head, features)
    elif isinstance(head, Mapping | nn.ModuleDict):
        out = _per_modality(head, features)
    elif callable(head):
        _check_concat(features)
        _check_dtype_device(features, head, by=f"the head ({type(head).__name__})")
        out = _zero_padded(head, features)
    else:
        raise TypeError(
            "head must be an nn.Linear, a mapping modality -> head, or a callable over the "
            f"concatenated features; got {type(head).__name__}"
        )
    reshard_fsdp(head)
    _check_outputs(out, batch)
    return out
