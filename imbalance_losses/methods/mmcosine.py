"""MMCosine: modality-wise scaled cosine logits (Xu, Feng, Zhang, Hu; ICASSP 2023, 2303.05338).

The fusion head's linear layer over the concatenated per-modality features
``x = [f_1, ..., f_M]`` is split column-wise into one weight block per modality,
``W = [W_1 | ... | W_M]`` (or is a mapping of per-modality ``nn.Linear`` heads, ``W_m`` each
one's weight). Each modality's feature and each class row of its block are normalised, and
the logits are the scaled sum of the ``M`` cosines, without bias::

    z_{m,c} = s * <f_m, w_{m,c}> / (||f_m|| ||w_{m,c}||)        (unimodal cosine logits)
    z_c     = sum_m z_{m,c}                                       (fused logits, |z_c| <= M s)

Neither a modality's feature norm nor its weight norms can then grow to dominate the fused
prediction: every modality contributes a bounded, scale-free score. The same logits serve
training, evaluation and unimodal diagnosis. See ``docs/mmcosine.md`` for the official code's
differences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.distributed import is_sharded
from ..core.records import StepRecord
from ..core.unimodal import MappingHead
from ..core.validation import (
    autocast_enabled,
    check_features,
    check_finite,
    check_modalities,
    check_same_modalities,
    int_param,
    real_param,
)

__all__ = ["MMCosineHead", "MMCosineRecord", "cosine_logits", "split_weight"]

LinearHead = nn.Linear | Mapping[str, nn.Linear] | nn.ModuleDict
"""What :class:`MMCosineHead` serves: a linear layer over the concatenation, or one per modality."""


def _shapes(tensors: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{m}: {tuple(t.shape)}" for m, t in tensors.items())


def split_weight(weight: Tensor, widths: Mapping[str, int]) -> dict[str, Tensor]:
    """The column blocks ``W = [W_1 | ... | W_M]`` of a ``[C, sum_m D_m]`` weight, as views.

    Args:
        weight: ``[C, D]`` weight of the linear layer over the concatenated features.
        widths: ``{modality: D_m}`` in the concatenation order; ``sum_m D_m`` must be ``D``.

    Example:
        >>> import torch
        >>> from imbalance_losses import split_weight
        >>> w = torch.arange(10.0).reshape(2, 5)
        >>> {m: b.tolist() for m, b in split_weight(w, {"audio": 2, "visual": 3}).items()}
        {'audio': [[0.0, 1.0], [5.0, 6.0]], 'visual': [[2.0, 3.0, 4.0], [7.0, 8.0, 9.0]]}
    """
    total = sum(widths.values())
    if weight.dim() != 2 or weight.shape[1] != total:
        raise ValueError(
            f"the weight of shape {tuple(weight.shape)} cannot be split into the widths "
            f"{dict(widths)} (sum {total}); expected shape [C, {total}]"
        )
    blocks = torch.split(weight, list(widths.values()), dim=1)
    return dict(zip(widths, blocks, strict=True))


def _fp32_matmul_context(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast off for ``device`` (only when it is on: other device types need no context)."""
    if autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_blocks(features: Mapping[str, Tensor], blocks: Mapping[str, Tensor]) -> None:
    missing = [m for m in features if m not in blocks]
    extra = [m for m in blocks if m not in features]
    if missing or extra:
        raise ValueError(
            f"the weight blocks are for modalities {list(blocks)} but the features have "
            f"{list(features)} (no weight block for {missing}, no features for {extra})"
        )
    classes = {m: w.shape[0] for m, w in blocks.items()}
    if len(set(classes.values())) != 1:
        raise ValueError(f"every weight block must have the same number of classes: {classes}")
    lead = {m: tuple(x.shape[:-1]) for m, x in features.items()}
    if len(set(lead.values())) != 1:
        raise ValueError(
            "every modality's features must have the same leading shape [B, ...] to add up "
            f"their logits; got {_shapes(features)}"
        )
    for name, x in features.items():
        w = blocks[name]
        if w.dim() != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"features[{name!r}] of shape {tuple(x.shape)} do not fit the weight block "
                f"of shape {tuple(w.shape)} (expected [B, ..., {w.shape[-1]}])"
            )


def cosine_logits(
    features: Mapping[str, Tensor], weight_blocks: Mapping[str, Tensor], scaling: float
) -> dict[str, Tensor]:
    r"""Scaled cosine logits of each modality, ``{m: [B, ..., C]}`` in the order of ``features``.

    $$z_{m,c} = s\,\frac{\langle f_m, w_{m,c}\rangle}{\lVert f_m\rVert\,\lVert w_{m,c}\rVert},
    \qquad z_c = \sum_m z_{m,c}, \qquad |z_c| \le M s$$

    ``w_{m,c}`` is row ``c`` of modality ``m``'s weight block ``[C, D_m]``. Norms use
    ``max(||v||, 1e-12)`` (``F.normalize``), so a zero feature or class row gives cosine 0.
    Computed in fp32 (fp64 stays fp64) with autocast off, whatever the inputs' precision;
    gradients flow to the features and the weight blocks. Sum the values for the fused logits.

    Args:
        features: ``{modality: [B, ..., D_m]}``, one leading shape for every modality.
        weight_blocks: ``{modality: [C, D_m]}`` (:func:`split_weight` of a concatenation head).
        scaling: ``s > 0``.

    Example:
        >>> import torch
        >>> from imbalance_losses import cosine_logits
        >>> feats = {"audio": torch.tensor([[3.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0, 2.0]])}
        >>> blocks = {"audio": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),   # 2 classes
        ...           "visual": torch.tensor([[0.0, 0.0, 5.0], [0.0, 1.0, 0.0]])}
        >>> z = cosine_logits(feats, blocks, scaling=10.0)
        >>> z["audio"].round(decimals=4), z["visual"]                    # 10 cos, per class
        (tensor([[10.0000,  7.0711]]), tensor([[10.,  0.]]))
    """
    s = real_param("scaling", scaling, gt=0.0)
    _check_blocks(features, weight_blocks)
    return _scaled_cosines(features, weight_blocks, s)[0]


_EPS = 1e-12  # F.normalize's floor on a norm (the official code's normalisation)


def _scaled_cosines(
    features: Mapping[str, Tensor], blocks: Mapping[str, Tensor], s: float
) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
    """``{m: z_m}``, and the detached norms ``||f_m||`` ``[B, ..., 1]`` and ``||w_{m,c}||``
    ``[C, 1]`` of each modality (``F.normalize``'s arithmetic, the norms kept for the record)."""
    out: dict[str, Tensor] = {}
    f_norms: list[Tensor] = []
    w_norms: list[Tensor] = []
    for name, x in features.items():
        w = blocks[name]
        dtype = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        with _fp32_matmul_context(x.device):
            x, w = x.to(dtype), w.to(dtype)
            nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            nw = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
            out[name] = s * F.linear(x / nx.clamp_min(_EPS), w / nw.clamp_min(_EPS))
        f_norms.append(nx.detach())
        w_norms.append(nw.detach())
    return out, f_norms, w_norms


@dataclass(frozen=True)
class MMCosineRecord(StepRecord):
    """The norms :class:`MMCosineHead`'s last forward divided out (tensors ``[M]``, fp32).

    ``feature_norms[m]`` is the mean of ``||f_m||`` over the rows of the (local) batch,
    ``weight_norms[m]`` the mean of ``||w_{m,c}||`` over the classes: the scales a plain linear
    head would let one modality grow to dominate the fused logits. Detached; no host sync
    until :meth:`~StepRecord.to_dict`. Under DDP each rank records its own batch (nothing is
    decided from these, so nothing is all-reduced).

    Example:
        >>> import torch
        >>> from imbalance_losses import MMCosineRecord
        >>> r = MMCosineRecord(("audio", "visual"), torch.tensor([4.0, 1.0]), torch.ones(2))
        >>> r.to_dict()["feature_norms/audio"]
        4.0
    """

    feature_norms: Tensor
    weight_norms: Tensor


class MMCosineHead(nn.Module):
    r"""MMCosine's classifier over the model's own linear head: scaled modality-wise cosines.

    $$z_c = \sum_{m=1}^{M} s\,\frac{\langle f_m, w_{m,c}\rangle}
    {\lVert f_m\rVert\,\lVert w_{m,c}\rVert} \qquad (\text{no bias})$$

    Replaces the fusion head's forward, for training **and** evaluation alike (the official
    code evaluates the fused accuracy with the raw linear output instead). It does not copy
    the head: it registers the head's own ``weight`` parameter (for a mapping, the per-modality
    heads themselves, under their modality names), so ``model.fusion_head =
    MMCosineHead(model.fusion_head)`` keeps the model's parameters, its optimizer and its
    ``state_dict`` keys unchanged. The bias is not used: it is kept (same keys) but frozen,
    ``requires_grad=False``, so that optimisers skip it and DDP does not wait for a gradient
    that never comes. Swap the head before wrapping the model in DDP.

    Args:
        head: the model's final ``nn.Linear`` over the concatenated per-modality features, or a
            mapping ``{modality: nn.Linear}`` of per-modality heads (one ``nn.ModuleDict``).
            Any other head (an MLP, :class:`~imbalance_losses.MappingHead`, attention) has no
            per-modality weight blocks and is refused with a ``TypeError``.
        widths: ``{modality: D_m}`` in the concatenation order, for an ``nn.Linear`` head:
            fixes the modalities, their order and widths (checked at every call). ``None``:
            taken from the features at each call (their widths must add up to
            ``in_features``). For a mapping of heads, the heads' ``in_features`` (if given,
            it must equal them).
        scaling: ``s > 0`` (official default 10; BalanceBenchmark uses 15).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import MMCosineHead
        >>> _ = torch.manual_seed(0)
        >>> head = MMCosineHead(nn.Linear(4 + 6, 3), scaling=10.0)  # audio 4 wide, visual 6
        >>> feats = {"audio": torch.randn(5, 4), "visual": torch.randn(5, 6)}
        >>> z = head(feats)                                          # [5, 3], |z| <= 2 * 10
        >>> tuple(z.shape), bool(z.abs().max() <= 20)
        ((5, 3), True)
        >>> parts = head.unimodal_logits(feats)                      # per-modality cosine logits
        >>> torch.allclose(parts["audio"] + parts["visual"], z)
        True
    """

    bias: nn.Parameter | None

    def __init__(
        self,
        head: LinearHead,
        widths: Mapping[str, int] | None = None,
        scaling: float = 10.0,
    ) -> None:
        super().__init__()
        self.scaling = real_param("scaling", scaling, gt=0.0)
        self.widths: dict[str, int] | None = None
        self.heads: tuple[str, ...] = ()  # the modalities of a mapping of heads
        self.last: MMCosineRecord | None = None
        if isinstance(head, nn.Linear):
            self._wrap_linear(head, widths)
        elif isinstance(head, Mapping | nn.ModuleDict):
            self._wrap_mapping(head, widths)
        else:
            raise TypeError(
                "MMCosineHead needs the model's final nn.Linear over the concatenated "
                "per-modality features, or a mapping {modality: nn.Linear} of per-modality "
                "heads: the cosine logits normalise each modality's block of a linear weight. "
                f"Got {type(head).__name__}, which has no per-modality weight blocks (an MLP "
                "head qualifies only through its last nn.Linear, and only if that layer's "
                "input is the concatenation of the modalities' features)"
            )

    def _wrap_linear(self, head: nn.Linear, widths: Mapping[str, int] | None) -> None:
        _not_sharded_yet(head, "the head")
        self.weight = head.weight
        self.bias = head.bias
        if head.bias is not None:
            head.bias.requires_grad_(False)
        if widths is not None:
            self.widths = _widths_param(widths)
            if sum(self.widths.values()) != head.in_features:
                raise ValueError(
                    f"widths {self.widths} add up to {sum(self.widths.values())} but the "
                    f"nn.Linear head has in_features={head.in_features}"
                )

    def _wrap_mapping(
        self, heads: Mapping[str, nn.Linear] | nn.ModuleDict, widths: Mapping[str, int] | None
    ) -> None:
        if len(heads) < 2:
            raise ValueError(f"a mapping of heads needs at least two modalities, got {list(heads)}")
        for name, head in heads.items():
            if not isinstance(head, nn.Linear):
                raise TypeError(
                    f"MMCosineHead needs an nn.Linear head per modality; heads[{name!r}] is "
                    f"{type(head).__name__}"
                )
            _not_sharded_yet(head, f"heads[{name!r}]")
            if name in dir(self):
                raise ValueError(f"modality name {name!r} clashes with an MMCosineHead attribute")
            self.add_module(name, head)
            if head.bias is not None:
                head.bias.requires_grad_(False)
        classes = {m: h.out_features for m, h in heads.items()}
        if len(set(classes.values())) != 1:
            raise ValueError(f"every head must have the same out_features (classes): {classes}")
        own = {m: h.in_features for m, h in heads.items()}
        if widths is not None and _widths_param(widths) != own:
            raise ValueError(f"widths {dict(widths)} differ from the heads' in_features {own}")
        self.heads = tuple(heads)

    def weight_blocks(self, features: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{modality: W_m [C, D_m]}``: views of the head's weight (gradients flow to it).

        For an ``nn.Linear`` head without ``widths``, the widths come from ``features``.
        """
        if is_sharded(next(self.parameters())):  # FSDP2 gathers it for forward() only
            raise NotImplementedError(
                "MMCosineHead: this fully_shard-ed head's weight is sharded outside its forward, "
                "where unimodal_logits(), as_mapping_head() and weight_blocks() read it: call the "
                "head itself for the fused logits, or (diagnostics, under torch.no_grad()) "
                "gather it first with head.unshard() and call head.reshard() afterwards"
            )
        if self.heads:
            linears = {m: self.get_submodule(m) for m in self.heads}
            return {m: h.weight for m, h in linears.items() if isinstance(h, nn.Linear)}
        widths = self.widths
        if widths is None:
            if features is None:
                raise ValueError("MMCosineHead without widths needs the features to split W")
            widths = {m: x.shape[-1] for m, x in features.items()}
        return split_weight(self.weight, widths)

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: z_m}``: each modality's scaled cosine logits ``[B, ..., C]`` (fp32).

        They add up to :meth:`forward`'s fused logits. Records the norms in :attr:`last`.
        """
        return self._logits(features)[0]

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """The fused logits ``z = sum_m z_m`` ``[B, ..., C]`` (fp32; fp64 for fp64 inputs)."""
        return self._logits(features)[1]

    def _logits(self, features: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """The checked ``{m: z_m}`` and their sum; the norms' means go to :attr:`last`."""
        self._check(features)
        blocks = self.weight_blocks(features)
        _check_blocks(features, blocks)
        parts, f_norms, w_norms = _scaled_cosines(features, blocks, self.scaling)
        fused = _summed(parts)
        _check_finite(fused, features, blocks)
        f_mean = torch.stack(f_norms).flatten(1).mean(1).float()
        w_mean = torch.stack(w_norms).flatten(1).mean(1).float()
        self.last = MMCosineRecord(tuple(features), f_mean, w_mean)
        return parts, fused

    def as_mapping_head(self) -> MappingHead:
        """This head as a :class:`~imbalance_losses.MappingHead` over any non-empty subset.

        ``fn(features) = sum_{m in features} z_m``: the cosine logits of the modalities given
        (one alone: its own ``z_m``), for :func:`~imbalance_losses.unimodal_logits`, the
        monitor, :func:`~imbalance_losses.imbalance_report` and subset games. Needs the
        modalities' widths (``widths=`` or per-modality heads). :meth:`forward` itself
        requires every modality.
        """
        if self.widths is None and not self.heads:
            raise ValueError(
                "MMCosineHead.as_mapping_head() needs widths= to place a subset of the "
                "modalities in the nn.Linear weight (MMCosineHead(head, widths={...}))"
            )
        return MappingHead(self._subset_logits)

    def _subset_logits(self, features: Mapping[str, Tensor]) -> Tensor:
        blocks = self.weight_blocks()
        unknown = [m for m in features if m not in blocks]
        if not features or unknown:
            raise ValueError(
                f"MMCosineHead scores a non-empty subset of {list(blocks)}; got {list(features)}"
            )
        check_features(features, device=next(self.parameters()).device, by="MMCosineHead")
        blocks = {m: blocks[m] for m in features}
        _check_blocks(features, blocks)
        fused = _summed(_scaled_cosines(features, blocks, self.scaling)[0])
        _check_finite(fused, features, blocks)
        return fused

    def _check(self, features: Mapping[str, Tensor]) -> None:
        """The mapping, floating features on the head's device, the modalities and widths."""
        check_modalities(features, min_ndim=2)
        check_features(features, device=next(self.parameters()).device, by="MMCosineHead")
        if self.widths is not None:
            check_same_modalities(
                self.widths, features, expected_what="MMCosineHead's widths", actual_what="features"
            )
        elif not self.heads and sum(x.shape[-1] for x in features.values()) != self.weight.shape[1]:
            raise ValueError(
                f"the nn.Linear head expects in_features={self.weight.shape[1]} = the sum of the "
                f"modalities' widths, but the features give "
                f"{sum(x.shape[-1] for x in features.values())} ({_shapes(features)})"
            )

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}, widths={self.widths}, heads={list(self.heads)}"


def _check_finite(
    fused: Tensor, features: Mapping[str, Tensor], blocks: Mapping[str, Tensor]
) -> None:
    """Finite logits (an asynchronous check on accelerators); on the CPU, name the culprit."""
    try:
        check_finite(fused, name="MMCosineHead's logits (from its features and weight)")
    except ValueError as err:
        bad = [f"features[{m!r}] of shape {tuple(x.shape)}" for m, x in features.items()]
        bad = [b for b, x in zip(bad, features.values(), strict=True) if not x.isfinite().all()]
        bad += [f"the weight block of {m!r}" for m, w in blocks.items() if not w.isfinite().all()]
        raise ValueError(
            f"non-finite values (NaN or inf) in {' and '.join(bad) or 'the logits'}: "
            "MMCosineHead's logits would not be finite"
        ) from err


def _not_sharded_yet(head: nn.Linear, what: str) -> None:
    """Refuse a head that ``fully_shard`` sharded before it was wrapped (its forward, which
    gathers the weight, is not the one that runs)."""
    if is_sharded(head.weight):
        raise NotImplementedError(
            f"MMCosineHead: {what} is already FSDP2-sharded (a DTensor weight), and "
            "MMCosineHead computes the logits from the weight outside that head's forward: wrap "
            "the head first, then shard the wrapper (head = MMCosineHead(head); "
            "fully_shard(head))"
        )


def _summed(parts: Mapping[str, Tensor]) -> Tensor:
    """``z_1 + ... + z_M`` in mapping order (the order :meth:`MMCosineHead.forward` adds in)."""
    values = list(parts.values())
    fused = values[0]
    for z in values[1:]:
        fused = fused + z
    return fused


def _widths_param(widths: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(widths, Mapping) or len(widths) < 2:
        raise ValueError(f"widths must map at least two modalities to widths, got {widths!r}")
    return {m: int_param(f"widths[{m!r}]", d, ge=1) for m, d in widths.items()}
