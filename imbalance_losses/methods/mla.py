"""MLA: alternating unimodal adaptation (Zhang, Yang, Latham, Chen; CVPR 2024).

No fused loss is ever trained. Each batch makes ``M`` optimiser steps, one per modality in a
fixed order; step ``m`` scores modality ``m`` alone through a head ``h`` shared by all
modalities and steps on its loss only, so it moves ``phi_m`` and ``h``::

    for m in modalities:   L_m = CE(h(f_m), y);  backward;  grad_W <- grad_W P^T;  step;  zero_grad

The head-gradient modification is an OWM-style projection (orthogonal weight modification):
one ``D x D`` matrix ``P`` (``D`` the head's input width, ``P = I`` at first), shared by the
modalities, updated at every unimodal step but the very first from the mean feature
``r = mean_B f_m``::

    alpha = 0.1 ** (1 + b / N_b),   k = P r,   P <- P - k k^T / (alpha + r^T k),   P <- P / ||P||_F

(``b`` the batch index in the epoch, ``N_b`` batches per epoch), so that ``h``'s update for one
modality interferes little with what it learnt from the others. At test time the unimodal
logits are fused with per-sample weights from their entropies, ``w = softmax_m(-e_m)``, or with
fixed weights. The formulas are the official code's (``docs/mla.md`` lists its differences).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.distributed import ProcessGroup, is_distributed, is_sharded
from ..core.gradients import average_over_ranks_, local_shards
from ..core.records import StepRecord
from ..core.remedy import Remedy
from ..core.running import Pooled
from ..core.unimodal import MappingHead
from ..core.validation import (
    autocast_off,
    check_features,
    check_logits,
    check_modalities,
    check_same_modalities,
    check_target,
    check_unimodal_logits,
    choice_or_weights,
    int_param,
    real_param,
)

__all__ = [
    "AlternatingUnimodalAdaptation",
    "MLARecord",
    "fuse_unimodal_logits",
    "fusion_weights",
    "owm_alpha",
    "owm_update",
    "project_gradient",
]

Criterion = Callable[[Tensor, Tensor], Tensor]
Feature = Tensor | Callable[[], Tensor]
"""One modality's feature for :meth:`AlternatingUnimodalAdaptation.train_step`: a tensor, or a
callable computing it when its modality's step starts (with the parameters of that moment)."""


class Scaler(Protocol):
    """What :meth:`AlternatingUnimodalAdaptation.train_step` uses of ``torch.amp.GradScaler``."""

    def scale(self, outputs: Tensor) -> Tensor: ...
    def unscale_(self, optimizer: Any) -> None: ...
    def step(self, optimizer: Any) -> Any: ...
    def update(self) -> None: ...


def owm_alpha(batch_index: int, batches_per_epoch: int) -> float:
    r"""$$\alpha = 0.1^{\,1 + b / N_b}$$: 0.1 at an epoch's first batch, towards 0.01 at its end.

    Example:
        >>> from imbalance_losses import owm_alpha
        >>> owm_alpha(0, 10), round(owm_alpha(5, 10), 6)
        (0.1, 0.031623)
    """
    b = int_param("batch_index", batch_index, ge=0)
    n = int_param("batches_per_epoch", batches_per_epoch, ge=1)
    return float(0.1 ** (1.0 + b / n))


def owm_update(projector: Tensor, r: Tensor, alpha: float) -> Tensor:
    r"""One OWM update of the ``D x D`` projector by the mean feature ``r`` ``[D]``.

    $$k = P r, \qquad P' = P - \frac{k k^\top}{\alpha + r^\top k}, \qquad
    P \leftarrow \frac{P'}{\lVert P' \rVert_F}$$

    A symmetric positive semi-definite ``P`` stays so (``r^T k >= 0``: the denominator is at
    least ``alpha``). ``P' r = alpha P r / (alpha + r^T P r)``, so a gradient projected by the new
    ``P`` (:func:`project_gradient`) is nearly orthogonal to ``r`` for a small ``alpha``. fp32
    (fp64 stays fp64), autocast off, no gradient.

    Example:
        >>> import torch
        >>> from imbalance_losses import owm_update
        >>> owm_update(torch.eye(2), torch.tensor([1.0, 0.0]), alpha=1.0)  # [[1/2, 0], [0, 1]]
        tensor([[0.4472, 0.0000],
                [0.0000, 0.8944]])
    """
    a = real_param("alpha", alpha, gt=0.0)
    d = projector.shape[-1]
    if projector.shape != (d, d) or r.shape != (d,):
        raise ValueError(
            f"the projector must be [D, D] and r [D]; got {tuple(projector.shape)} and "
            f"{tuple(r.shape)}"
        )
    with torch.no_grad(), autocast_off(projector.device):
        p = projector.detach().float() if projector.dtype != torch.float64 else projector.detach()
        r = r.detach().to(p.dtype)
        k = p @ r
        p = p - torch.outer(k, k) / (a + r @ k)
        norm: Tensor = torch.linalg.matrix_norm(p)
        return p / norm.clamp_min(torch.finfo(p.dtype).tiny)


def project_gradient(grad: Tensor, projector: Tensor) -> Tensor:
    r"""$$\nabla_W \leftarrow \nabla_W P^\top$$ for a ``[C, D]`` weight gradient (replacing form).

    Example:
        >>> import torch
        >>> from imbalance_losses import project_gradient
        >>> project_gradient(torch.ones(1, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        tensor([[1., 0.]])
    """
    with torch.no_grad(), autocast_off(grad.device):
        return (grad.float() @ projector.float().T).to(grad.dtype)


def fusion_weights(
    unimodal_logits: Mapping[str, Tensor], weights: Mapping[str, float] | None = None
) -> Tensor:
    r"""Per-sample fusion weights ``[B, M]`` (fp32, rows sum to 1 for the entropy weights).

    $$e_{m,i} = -\sum_c p_{m,i,c} \log p_{m,i,c}, \quad p_{m,i} = \operatorname{softmax}(z_{m,i}),
    \qquad w_{m,i} = \frac{\exp(-e_{m,i})}{\sum_j \exp(-e_{j,i})}$$

    Each sample's weights depend on its own logits only; the more confident (lower-entropy)
    modality weighs more. With ``weights`` (``{m: w_m}``, the official 0.55 / 0.45) every row
    is those fixed numbers, as given.

    Example:
        >>> import torch
        >>> from imbalance_losses import fusion_weights
        >>> z = {"a": torch.tensor([[4.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}
        >>> fusion_weights(z)  # "a" is sure, "v" is not
        tensor([[0.6464, 0.3536]])
    """
    batch, _ = check_unimodal_logits(unimodal_logits)
    if weights is not None:
        check_same_modalities(
            weights, unimodal_logits, expected_what="weights", actual_what="logits"
        )
        w = [real_param(f"weights[{m!r}]", x, ge=0.0) for m, x in weights.items()]
        device = next(iter(unimodal_logits.values())).device
        return torch.tensor(w, device=device).expand(batch, len(w))
    logp = torch.stack([F.log_softmax(z.float(), -1) for z in unimodal_logits.values()], 1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.softmax(-entropy, dim=1)


def fuse_unimodal_logits(
    unimodal_logits: Mapping[str, Tensor], weights: Mapping[str, float] | None = None
) -> Tensor:
    r"""$$z_i = \sum_m w_{m,i}\, z_{m,i}$$ with :func:`fusion_weights` (fp32 ``[B, C]``).

    Example:
        >>> import torch
        >>> from imbalance_losses import fuse_unimodal_logits
        >>> z = {"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[0.0, 4.0]])}
        >>> fuse_unimodal_logits(z, weights={"a": 0.55, "v": 0.45})
        tensor([[1.1000, 1.8000]])
    """
    w = fusion_weights(unimodal_logits, weights)
    return (w[..., None] * torch.stack([z.float() for z in unimodal_logits.values()], 1)).sum(1)


@dataclass(frozen=True)
class MLARecord(StepRecord):
    """What the last unimodal step did (``AlternatingUnimodalAdaptation.last``).

    Example:
        >>> import torch
        >>> from imbalance_losses import MLARecord
        >>> MLARecord(("a", "v"), "v", torch.tensor(0.05), True, 3).to_dict()
        {'alpha': 0.05000000074505806, 'projected': 1.0, 'step': 3.0}
    """

    modality: str
    """The modality of this step."""
    alpha: Tensor
    """``alpha`` of the projector update (0 when none ran)."""
    projected: bool
    """``P`` was updated and the head's weight gradient projected (never at the first step)."""
    step: int
    """Unimodal steps before this one (``M`` per batch)."""


class AlternatingUnimodalAdaptation(Remedy[MLARecord]):
    r"""MLA: ``M`` alternating unimodal optimiser steps per batch through a shared head.

    $$\text{step } m:\quad \mathcal{L}_m = \ell(h(f_m), y), \qquad
    \nabla_W \leftarrow \nabla_W P^\top, \qquad \theta \leftarrow \text{optimiser}(\theta)$$

    ``train_step`` replaces ``backward(); step(); zero_grad()``; ``predict`` is the evaluation
    forward. One optimiser over every parameter; ``N_b = len(loader)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import AlternatingUnimodalAdaptation
        >>> _ = torch.manual_seed(0)
        >>> enc = nn.ModuleDict({"a": nn.Linear(3, 4), "v": nn.Linear(5, 4)})
        >>> head = nn.Linear(4, 2)                       # shared by both modalities
        >>> opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1)
        >>> mla = AlternatingUnimodalAdaptation(head, batches_per_epoch=10)
        >>> x, y = {"a": torch.randn(6, 3), "v": torch.randn(6, 5)}, torch.tensor([0, 1] * 3)
        >>> losses = mla.train_step({m: enc[m](x[m]) for m in x}, y, opt)   # 2 optimiser steps
        >>> list(losses), mla.steps, tuple(mla.predict({m: enc[m](x[m]) for m in x}).shape)
        (['a', 'v'], 2, (6, 2))

    Args:
        head: scores one modality alone: a module or callable shared by all modalities
            (``nn.Linear(D, C)``: equal widths ``D``), a mapping of per-modality heads, or a
            :class:`MappingHead` (``absent="omit"``). The model owns it (not registered here).
        criterion: the unimodal loss (default ``nn.CrossEntropyLoss()``).
        projection: ``"owm"`` (default) or ``"off"`` (the released code's plain alternation).
        batches_per_epoch: ``N_b`` of the ``alpha`` schedule (needed with ``"owm"``).
        projected_weight: the ``[C, D]`` weight (or ``{m: weight}``) the projection acts on;
            default: the linear head's weight (or each per-modality ``nn.Linear``'s).
        fusion: test-time fusion: ``"entropy"`` (per-sample) or fixed ``{m: w_m}`` (``w_m >= 0``).
        modalities: the modality order, for :meth:`loss` / :meth:`modality_step` used directly.
        process_group: the ranks ``r`` is pooled over and gradients are averaged over.
        sync_gradients: average each step's gradients over the ranks (default: under DDP).
    """

    record_type = MLARecord
    who = "AlternatingUnimodalAdaptation"
    head: Any
    projector: Tensor
    _weights: dict[str | None, Tensor]
    nothing_pooled = "modality_step() called without a loss() for that step"

    def __init__(
        self,
        head: Any,
        criterion: Criterion | None = None,
        *,
        projection: Literal["owm", "off"] = "owm",
        batches_per_epoch: int | None = None,
        projected_weight: Tensor | Mapping[str, Tensor] | None = None,
        fusion: Literal["entropy"] | Mapping[str, float] = "entropy",
        modalities: Sequence[str] | None = None,
        process_group: ProcessGroup | None = None,
        sync_gradients: bool | None = None,
    ) -> None:
        super().__init__(warmup_steps=1, process_group=process_group)
        self.__dict__["head"] = _check_head(head)
        self.criterion: Criterion = nn.CrossEntropyLoss() if criterion is None else criterion
        if projection not in ("owm", "off"):
            raise ValueError(f'projection must be "owm" or "off", got {projection!r}')
        self.projection = projection
        self.fusion = choice_or_weights("fusion", fusion, "entropy")  # checked now
        names = None if modalities is None else tuple(modalities)
        if isinstance(head, Mapping | nn.ModuleDict) and names not in (None, tuple(head)):
            raise ValueError(f"modalities {list(names or ())} differ from the heads' {list(head)}")
        self._modalities = tuple(head) if isinstance(head, Mapping | nn.ModuleDict) else names
        self.sync_gradients = sync_gradients
        self.__dict__["_weights"] = self._projected(head, projected_weight)
        width = 1
        if projection == "owm":
            self.batches_per_epoch = int_param("batches_per_epoch", batches_per_epoch, ge=1)
            w = next(iter(self._weights.values()))
            width = w.shape[1]
            self.register_buffer("projector", torch.eye(width, device=w.device))
        self._width = width

    def _projected(self, head: Any, given: Any) -> dict[str | None, Tensor]:
        """``{modality or None (shared): weight}`` the projection acts on (``{}`` when off)."""
        if self.projection == "off":
            return {}
        if given is None and isinstance(head, nn.Linear):
            given = head.weight
        elif given is None and isinstance(head, Mapping | nn.ModuleDict):
            if all(isinstance(h, nn.Linear) for h in head.values()):
                given = {m: h.weight for m, h in head.items()}
        if given is None:
            raise TypeError(
                'projection="owm" acts on the weight [C, D] of the head\'s linear layer that '
                f"reads the features; {type(head).__name__} has none known: pass "
                'projected_weight=, or projection="off"'
            )
        weights: dict[str | None, Tensor] = (
            {None: given} if isinstance(given, Tensor) else dict(given.items())
        )
        shapes = {m: tuple(w.shape) for m, w in weights.items()}
        if any(w.dim() != 2 for w in weights.values()) or len({s[1] for s in shapes.values()}) > 1:
            raise ValueError(f"projected weights must be [C, D] with one D, got {shapes}")
        return weights

    # -- training ---------------------------------------------------------------------------

    def train_step(
        self,
        features: Mapping[str, Feature],
        target: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: Scaler | None = None,
        backward: Callable[[Tensor], Any] | None = None,
    ) -> dict[str, Tensor]:
        """One batch: for each modality in order, :meth:`loss`, backward, :meth:`modality_step`.

        ``features[m]`` is ``f_m`` (one forward of every encoder before the call, as the
        official code) or a callable returning it when step ``m`` starts (the encoder runs
        with the parameters updated by the earlier steps; only one graph alive at a time).
        ``backward(loss)`` defaults to ``loss.backward()`` (with ``scaler``: of the scaled loss;
        Lightning: ``backward=self.manual_backward``). Returns the detached losses ``{m: L_m}``.
        """
        if not isinstance(features, Mapping) or len(features) < 2:
            raise ValueError(f"features must map >= 2 modalities to tensors, got {features!r}")
        self._modalities = self._modalities or tuple(features)
        check_same_modalities(
            self._modalities, features, expected_what="earlier steps", actual_what="features"
        )
        tensors = {n: x for n, x in features.items() if isinstance(x, Tensor)}
        if len(tensors) == len(features):  # before any step: a bad batch changes nothing
            with self._validating(self._width, next(iter(tensors.values())).device, pools=True):
                for n, x in tensors.items():
                    self._check_feature(n, x)
                check_modalities(tensors)
                check_features(tensors, finite=True)
        losses = {}
        for m, f in features.items():
            loss = self.loss(m, f() if callable(f) else f, target)
            scaled = loss if scaler is None else scaler.scale(loss)
            (backward or torch.autograd.backward)(scaled)
            self.modality_step(m, optimizer, scaler=scaler)
            losses[m] = loss.detach()
        return losses

    def loss(self, modality: str, feature: Tensor, target: Tensor) -> Tensor:
        """``L_m = criterion(h_m(f_m), y)`` of the open step's modality; adds ``f_m``'s sums.

        Call it once per micro-batch (scale by ``1/k`` for ``k`` micro-batches), backward, then
        :meth:`modality_step` once.
        """
        device = feature.device if isinstance(feature, Tensor) else torch.device("cpu")
        with self._validating(self._width, device, pools=True):
            self._check_turn(modality)
            logits = self._check(modality, feature, target)
        rows = feature.detach().reshape(-1, feature.shape[-1]).float()
        sums = rows.sum(0) if self.projection == "owm" else rows.new_zeros(1)
        self._add(sums, rows.shape[0], rows=feature.shape[0])
        return self.criterion(logits, target)

    def _check_feature(self, modality: str, feature: Tensor) -> None:
        """A floating ``[B, ..., D]`` feature, ``B > 0`` (``D``: the projector's width)."""
        if not isinstance(feature, Tensor) or not feature.is_floating_point() or feature.dim() < 2:
            raise TypeError(f"features[{modality!r}] must be a floating tensor [B, ..., D]")
        shape = tuple(feature.shape)
        if self.projection == "owm" and shape[-1] != self._width:
            raise ValueError(
                f"features[{modality!r}] has shape {shape} but the head reads D = "
                f"{self._width} (projected weight [C, {self._width}]); MLA needs one width"
            )
        if shape[0] == 0:
            raise ValueError(f"features[{modality!r}] has an empty batch, shape {shape}")

    def _check(self, modality: str, feature: Tensor, target: Tensor) -> Tensor:
        self._check_feature(modality, feature)
        logits = self._logits(modality, feature)
        check_logits(logits, name=f"the head's logits for {modality!r}", batch=feature.shape[0])
        if isinstance(target, Tensor) and not target.is_floating_point():
            check_target(
                target, batch=feature.shape[0], num_classes=logits.shape[1],
                ignore_index=getattr(self.criterion, "ignore_index", None),
            )  # fmt: skip
        return logits

    def _check_turn(self, modality: str) -> None:
        if self._modalities is None:
            raise RuntimeError(
                f"{self.who}: the modality order is unknown; pass modalities= (or call train_step)"
            )
        expected = self._modalities[self._steps % len(self._modalities)]
        if modality != expected:
            raise ValueError(
                f"MLA steps the modalities in the order {list(self._modalities)}: this step is "
                f"{expected!r}'s, got {modality!r}"
            )

    def modality_step(
        self, modality: str, optimizer: torch.optim.Optimizer, *, scaler: Scaler | None = None
    ) -> MLARecord:
        """After the step's backward(s): pool ``r``, average gradients over the ranks, unscale,
        update ``P`` and project the head's weight gradient, ``optimizer.step()``, zero_grad."""
        self._check_turn(modality)
        names = self._modalities or ()
        device = self.projector.device if self.projection == "owm" else torch.device("cpu")
        record = self._decide(names, device, self._width)
        assert record is not None  # loss() refuses empty batches
        if self.sync_gradients or (
            self.sync_gradients is None and is_distributed(self.process_group)
        ):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None and not is_sharded(p.grad)]  # fmt: skip
            average_over_ranks_(grads, self.process_group)  # FSDP2's are averaged already
        if scaler is not None:
            scaler.unscale_(optimizer)
        if record.projected:
            weight = self._weights.get(modality, self._weights.get(None))
            if weight is not None and weight.grad is not None:  # FSDP2: this rank's rows
                (grad,), _ = local_shards([weight.grad])  # (P acts on each row alone)
                grad.copy_(project_gradient(grad, self.projector))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return record

    def _formula(self, pooled: Pooled, names: tuple[str, ...], active: bool) -> MLARecord:
        m = names[self._steps % len(names)]
        alpha = torch.zeros(())
        if active and self.projection == "owm":
            a = owm_alpha(
                (self._steps // len(names)) % self.batches_per_epoch, self.batches_per_epoch
            )
            self.projector.copy_(owm_update(self.projector, pooled.mean(), a))
            alpha = torch.tensor(a, device=self.projector.device)
        return MLARecord(names, m, alpha, active and self.projection == "owm", self._steps)

    # -- evaluation -------------------------------------------------------------------------

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: h_m(f_m)}``, each modality scored alone by the head."""
        check_modalities(features)
        return {m: self._logits(m, f) for m, f in features.items()}

    def fuse(self, unimodal_logits: Mapping[str, Tensor]) -> Tensor:
        """:func:`fuse_unimodal_logits` with this object's ``fusion``."""
        fixed = self.fusion if isinstance(self.fusion, dict) else None
        return fuse_unimodal_logits(unimodal_logits, fixed)

    def predict(self, features: Mapping[str, Tensor]) -> Tensor:
        """The evaluation forward: ``fuse(unimodal_logits(features))``, fp32 ``[B, C]``."""
        return self.fuse(self.unimodal_logits(features))

    def _logits(self, modality: str, feature: Tensor) -> Tensor:
        head = self.head
        if isinstance(head, MappingHead):
            return head({modality: feature})
        if isinstance(head, Mapping | nn.ModuleDict):
            if modality not in head:
                raise ValueError(f"no head for modality {modality!r}; heads: {list(head)}")
            return head[modality](feature)  # type: ignore[no-any-return]
        if isinstance(head, nn.Linear) and feature.shape[-1] != head.in_features:
            raise ValueError(
                f"features[{modality!r}] has shape {tuple(feature.shape)} but the shared "
                f"nn.Linear head reads in_features={head.in_features}; MLA scores each modality "
                "alone through one head shared by all (equal widths), not a head over the "
                "concatenation: use nn.Linear(D, C), a mapping of per-modality heads or a "
                "MappingHead"
            )
        return head(feature)  # type: ignore[no-any-return]


def _check_head(head: Any) -> Any:
    """A head that scores one modality alone (see the class doc), else a ``TypeError``."""
    if isinstance(head, MappingHead) and head.absent != "omit":
        raise TypeError('MLA scores each modality alone: use MappingHead(fn, absent="omit")')
    if isinstance(head, Mapping | nn.ModuleDict):
        bad = [m for m, h in head.items() if not callable(h)]
        if len(head) < 2 or bad:
            raise TypeError(f"per-modality heads must be >= 2 callables; not callable: {bad}")
    elif not callable(head):
        raise TypeError(
            "MLA needs a head that scores one modality alone: a module or callable shared by all "
            "modalities, a mapping of per-modality heads, or a MappingHead; got "
            f"{type(head).__name__}"
        )
    return head
