"""G-Blending: Gradient-Blending (Wang, Tran, Feiszli; CVPR 2020, arXiv 1905.12681).

Each modality's unimodal head and the fused head are *branches* ``k = 1..K`` (``K = M + 1``),
trained with the blended loss ``L_blend = sum_k w_k L_k`` (paper Eq. 7). The weights come from
how each branch overfits and generalises over a window of ``n`` epochs (a *super-epoch*), with
train losses ``L^T`` on (a subset of) the training set and validation losses ``L^V`` on a split
held out of the training data (paper Sec. 2.2-2.4, Eq. 3, Prop. 1, Algorithm 1)::

    O_N      = L^V_N - L^T_N                         overfitting at checkpoint N
    ΔO_k     = O_{N+n} - O_N                         change in overfitting over the window
    ΔG_k     = L^V_N - L^V_{N+n}                     generalisation gained over the window
    OGR_k    = |ΔO_k / ΔG_k|
    w_k*     = (1/Z) ΔG_k / ΔO_k^2,   Z such that sum_k w_k* = 1

See ``docs/gradient_blending.md`` for the schedule, what the paper leaves open and what we chose.

Why :class:`GradientBlending` is not on :class:`~imbalance_losses.core.remedy.Remedy`: the base's
lifecycle is that of a decision taken at every training step (a training-mode call adds
statistics, repeats and warm-up are counted in steps, the encoders mode acts on ``.grad``),
while G-Blending decides nothing during a step: between window boundaries its loss is a fixed
weighted sum, the same in training and in evaluation. Its one decision,
:meth:`GradientBlending.update`, runs once per window on losses that :func:`branch_losses` has
already pooled over the ranks, so the base's mode decision, repeat detection, pooling and
encoders mode would go unused, and its ``steps`` / ``pending`` / ``modalities`` state would add
keys that no saved state has. It stays an ``nn.Module`` with its own extra state (branches,
weights, the window's start losses, window count, ``last``): the per-window action the base
leaves to the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.branches import (
    FUSED,
    branch_logits,
    branch_names,
    branch_vector,
    per_sample_cross_entropy,
)
from ..core.distributed import ProcessGroup
from ..core.evaluation import branch_losses, check_same_on_ranks
from ..core.records import StepRecord
from ..core.stats import Reduction, counted, reduce_loss
from ..core.unimodal import Head
from ..core.validation import (
    _assert_on_device,
    check_same_modalities,
    int_param,
    real_param,
    reduction_param,
)

__all__ = [
    "BlendingRecord",
    "GradientBlending",
    "blending_weights",
    "branch_losses",
    "overfitting_to_generalization_ratio",
    "window_changes",
]

_NOT_POOLED = (
    "GradientBlending.update got different losses on different ranks; pass losses pooled over "
    "the ranks (branch_losses and GradientBlending.evaluate do that)"
)


def window_changes(
    train_start: Tensor, val_start: Tensor, train_end: Tensor, val_end: Tensor
) -> tuple[Tensor, Tensor]:
    r"""``(ΔG, ΔO)``, each ``[K]``, between checkpoints ``N`` and ``N + n`` (paper Eq. 3)::

    $$O = L^V - L^T, \qquad \Delta G_k = L^V_{k,N} - L^V_{k,N+n}, \qquad
    \Delta O_k = O_{k,N+n} - O_{k,N}$$

        O = L^V - L^T,   ΔG_k = L^V_k,N - L^V_k,N+n,   ΔO_k = O_k,N+n - O_k,N

    ``ΔG > 0``: the validation loss went down; ``ΔO > 0``: the train/validation gap widened.
    Raises ``ValueError`` for vectors that are not all ``[K]``.

    Example:
        >>> import torch
        >>> from imbalance_losses import window_changes
        >>> t = torch.tensor
        >>> d_g, d_o = window_changes(train_start=t([1.0, 1.0]), val_start=t([1.2, 1.1]),
        ...                           train_end=t([0.4, 0.8]), val_end=t([0.9, 1.0]))
        >>> d_g.round(decimals=2), d_o.round(decimals=2)    # validation gain, overfitting growth
        (tensor([0.3000, 0.1000]), tensor([0.3000, 0.1000]))
    """
    shapes = {tuple(v.shape) for v in (train_start, val_start, train_end, val_end)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected four per-branch vectors of one shape [K], got {shapes}")
    delta_g = val_start - val_end
    delta_o = (val_end - train_end) - (val_start - train_start)
    return delta_g, delta_o


def overfitting_to_generalization_ratio(delta_g: Tensor, delta_o: Tensor) -> Tensor:
    """``OGR_k = |ΔO_k / ΔG_k|`` (paper Eq. 3); ``inf`` where ``ΔG_k = 0`` (never NaN).

    Example:
        >>> import torch
        >>> from imbalance_losses import overfitting_to_generalization_ratio
        >>> overfitting_to_generalization_ratio(torch.tensor([0.2, 0.0]), torch.tensor([0.1, 0.3]))
        tensor([0.5000,    inf])
    """
    ratio = delta_o.abs() / delta_g.abs()
    return torch.where(delta_g == 0, torch.full_like(ratio, float("inf")), ratio)


def blending_weights(
    delta_g: Tensor, delta_o: Tensor, *, eps: float = 1e-8, fallback: Tensor | None = None
) -> Tensor:
    r"""The OGR-optimal blend ``w_k = (1/Z) ΔG_k / ΔO_k^2`` with ``sum_k w_k = 1`` (``[K]``).

    $$w_k = \frac{1}{Z} \frac{\Delta G_k}{\Delta O_k^2}, \qquad \sum_k w_k = 1$$

    Proposition 1: for gradient estimates ``v_k`` with uncorrelated overfitting, the ``w`` that
    minimises ``E[(<∇L^T - ∇L*, sum w_k v_k> / <∇L*, sum w_k v_k>)^2]`` is
    ``w_k ∝ <∇L*, v_k> / σ_k^2``, estimated per window by ``ΔG_k / ΔO_k^2`` (Algorithm 1). The
    objective is scale-invariant; ``Z`` makes the weights sum to 1, the proposition's constraint
    (the printed ``Z = sum_k ΔG_k / (2 ΔO_k^2)`` would make them sum to 2).

    Left open by the paper, our choice: ``ΔG_k <= 0`` (validation loss not down) gives weight
    0, not a negative weight (gradient *ascent* on that branch); ``ΔO_k^2`` is floored at
    ``eps > 0`` (``ΔO_k = 0``: nearly all the weight, the formula's limit); when no branch has
    ``ΔG_k > 0`` the result is ``fallback`` ``[K]`` (default uniform ``1/K``).

    Example:
        >>> import torch
        >>> from imbalance_losses import blending_weights
        >>> delta_g = torch.tensor([0.2, 0.1, 0.3])       # audio, visual, fused: validation gains
        >>> delta_o = torch.tensor([0.1, 0.1, 0.3])       # overfitting growth
        >>> blending_weights(delta_g, delta_o).round(decimals=4)    # w_k ∝ ΔG_k / ΔO_k²
        tensor([0.6000, 0.3000, 0.1000])
    """
    if delta_g.dim() != 1 or delta_g.shape != delta_o.shape:
        raise ValueError(f"ΔG {tuple(delta_g.shape)} and ΔO {tuple(delta_o.shape)}: need [K], [K]")
    eps = real_param("eps", eps, gt=0.0)
    score = delta_g.clamp_min(0) / (delta_o * delta_o).clamp_min(eps)
    total = score.sum()
    uniform = torch.full_like(score, 1.0 / score.shape[0])
    weights = score / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, weights, uniform if fallback is None else fallback.to(weights))


@dataclass(frozen=True)
class BlendingRecord(StepRecord):
    """What :meth:`GradientBlending.update` decided; ``modalities`` names the ``K`` branches.

    Example:
        >>> from imbalance_losses import GradientBlending
        >>> blend = GradientBlending(modalities=["audio", "visual"])
        >>> blend.update({"audio": 1.0, "visual": 1.0, "fused": 1.0},
        ...              {"audio": 1.2, "visual": 1.1, "fused": 1.3}) is None  # window's start
        True
        >>> rec = blend.update({"audio": 0.5, "visual": 0.8, "fused": 0.4},
        ...                    {"audio": 1.0, "visual": 1.0, "fused": 1.0})
        >>> rec.modalities, rec.window
        (('audio', 'visual', 'fused'), 1)
        >>> [round(x, 2) for x in rec.delta_g.tolist()], [round(x, 2) for x in rec.delta_o.tolist()]
        ([0.2, 0.1, 0.3], [0.3, 0.1, 0.3])
    """

    train_losses: Tensor
    """``L^T`` at the window's end."""
    val_losses: Tensor
    """``L^V`` at the window's end."""
    delta_g: Tensor
    """``ΔG_k = L^V_k,N - L^V_k,N+n``."""
    delta_o: Tensor
    """``ΔO_k = O_k,N+n - O_k,N``, ``O = L^V - L^T``."""
    ogr: Tensor
    """``|ΔO_k / ΔG_k|`` (``inf`` where ``ΔG_k = 0``)."""
    weights: Tensor
    """The weights for the next window (previous ones kept when no branch generalised)."""
    window: int
    """Number of completed windows, this one included."""


class GradientBlending(nn.Module):
    r"""G-Blending loss weighter: ``sum_k w_k CE(z_k, y)`` over the unimodal and fused branches.

    $$\mathcal{L} = \sum_{k} w_k\, \mathrm{CE}(z_k, y), \qquad
    w_k = \frac{1}{Z} \frac{\Delta G_k}{\Delta O_k^2}, \qquad
    k \in \{1, \dots, M, \text{fused}\}$$

    ``loss = blend(fused_logits, target, features=feats)`` between updates; at the end of each
    window (``n`` epochs) ``blend.update(*blend.evaluate(forward, train_subset, val, model=m))``
    with ``val`` held out of the training data (docs/gradient_blending.md shows the loop).

    Adds no parameters; between updates the weights are constants, so gradient accumulation,
    AMP (the loss is fp32) and DDP need nothing special. Weights start uniform (``1/K``)
    unless ``initial_weights`` is given.

    Args:
        head: the model's fusion head, for :func:`~imbalance_losses.unimodal_logits`.
        modalities: modality names in mapping order (else learnt from the first call).
        initial_weights: ``{branch: weight >= 0}`` for every branch (normalised to sum 1).
        fused: the fused branch's name.
        eps: floor of ``ΔO_k^2`` (see :func:`blending_weights`).
        reduction: ``"mean"`` (over counted samples), ``"sum"`` or ``"none"`` (``[B]``).
        ignore_index: as in ``nn.CrossEntropyLoss``.
        label_smoothing: as in ``nn.CrossEntropyLoss``.
        process_group: ranks :meth:`evaluate` pools over and :meth:`update` checks.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import GradientBlending
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(4 + 6, 3)
        >>> blend = GradientBlending(head=head, modalities=["audio", "visual"])
        >>> feats = {"audio": torch.randn(6, 4), "visual": torch.randn(6, 6)}
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> logits = head(torch.cat(list(feats.values()), 1))
        >>> loss = blend(logits, target, feats)          # w_fused L + sum_m w_m L_m
        >>> {k: round(float(w), 4) for k, w in blend.weights.items()}   # uniform until update()
        {'audio': 0.3333, 'visual': 0.3333, 'fused': 0.3333}
        >>> start = ({"audio": 1.0, "visual": 1.0, "fused": 1.0},   # train, held-out losses
        ...          {"audio": 1.2, "visual": 1.1, "fused": 1.3})
        >>> end = ({"audio": 0.5, "visual": 0.8, "fused": 0.4},
        ...        {"audio": 1.0, "visual": 1.0, "fused": 1.0})
        >>> _ = blend.update(*start)                       # losses at the window's start ...
        >>> rec = blend.update(*end)                       # ... and at its end: new weights
        >>> {k: round(float(w), 3) for k, w in blend.weights.items()}
        {'audio': 0.143, 'visual': 0.643, 'fused': 0.214}
    """

    head: Head | None
    """The fusion head for :func:`~imbalance_losses.unimodal_logits` (or ``None``)."""

    def __init__(
        self,
        *,
        head: Head | None = None,
        modalities: list[str] | tuple[str, ...] | None = None,
        initial_weights: Mapping[str, float | Tensor] | None = None,
        fused: str = FUSED,
        eps: float = 1e-8,
        reduction: Reduction = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.eps = real_param("eps", eps, gt=0.0)
        self.label_smoothing = real_param("label_smoothing", label_smoothing, ge=0.0, le=1.0)
        self.reduction = cast(Reduction, reduction_param(reduction))
        self.ignore_index = int_param("ignore_index", ignore_index)
        self.fused = fused
        self.process_group = process_group
        self.__dict__["head"] = head  # the user's model owns it: not registered, not copied
        self.branches: tuple[str, ...] | None = None
        """Branch names: the modalities in mapping order, then the fused branch."""
        self._weights: Tensor | None = None
        self._start: tuple[Tensor, Tensor] | None = None  # (L^T, L^V) at the window's start
        self._windows = 0
        self._ordered = False  # the branch order is the features' (not a mapping of weights')
        self.last: BlendingRecord | None = None
        if modalities is not None:
            self._bind(branch_names(modalities, fused))
        if initial_weights is not None:
            self.set_weights(initial_weights)

    @property
    def weights(self) -> dict[str, Tensor]:
        """``{branch: w_k}`` (0-dim tensors) the loss uses now."""
        if self.branches is None or self._weights is None:
            return {}
        return dict(zip(self.branches, self._weights.unbind(), strict=True))

    def _bind(self, names: tuple[str, ...], *, ordered: bool = True) -> tuple[str, ...]:
        """Fix the branches on first use (uniform weights); later, require the same ones.

        Branches bound from a name-keyed mapping (``ordered=False``: weights, losses) take the
        order of the first forward's features; the weights and start losses follow their names.
        """
        if self.branches is None:
            self.branches = branch_names(names[:-1], self.fused)
            self._weights = torch.full((len(names),), 1.0 / len(names))
        elif (
            names != self.branches
            and ordered
            and not self._ordered
            and (sorted(names) == sorted(self.branches))
        ):
            index = [self.branches.index(n) for n in names]
            assert self._weights is not None
            self._weights = self._weights[index]
            if self._start is not None:
                self._start = (self._start[0][index], self._start[1][index])
            self.branches = names
        elif names != self.branches:
            check_same_modalities(
                self.branches,
                dict.fromkeys(names),
                expected_what="GradientBlending's",
                actual_what="the given",
            )
        self._ordered = self._ordered or ordered
        return names

    def _names(self, values: Mapping[str, Any]) -> tuple[str, ...]:  # bind from a mapping
        if self.branches is None and isinstance(values, Mapping):
            names = (*(m for m in values if m != self.fused), self.fused)
            return self._bind(names, ordered=False)
        return self.branches or ()

    def set_weights(self, weights: Mapping[str, float | Tensor]) -> None:
        """Use ``weights`` (every branch, ``>= 0``, normalised to sum 1), e.g. offline ones."""
        w = branch_vector(weights, self._names(weights), what="weights")
        _assert_on_device((w >= 0).all() & (w.sum() > 0), f"weights must be >= 0, not all 0: {w}")
        self._weights = (w / w.sum()).float()

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        features: Mapping[str, Tensor] | None = None,
        *,
        unimodal_logits: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``sum_k w_k CE(z_k, y)``: fused logits ``[B, C]``, target ``[B]`` or ``[B, C]``.

        Unimodal logits from ``head`` and ``features={m: x_m}``, or ``unimodal_logits={m: z_m}``.
        Returns a scalar (``"mean"`` over counted samples, 0 for an empty batch; ``"sum"``) or
        ``[B]`` (``"none"``), in fp32 (fp64 logits: fp64). Bad shapes, classes, targets or
        modalities raise ``ValueError``/``TypeError`` naming the branch and the shapes.
        """
        branches = branch_logits(
            logits, target, features, unimodal_logits, head=self.head,
            ignore_index=self.ignore_index, fused=self.fused, who="GradientBlending",
        )  # fmt: skip
        self._bind(tuple(branches))
        per_sample = per_sample_cross_entropy(
            branches, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
        )
        assert self._weights is not None
        if self._weights.device != per_sample.device:  # once: later steps copy nothing
            self._weights = self._weights.to(per_sample.device)
        loss = (self._weights.to(per_sample.dtype)[:, None] * per_sample).sum(0)
        mask = counted(target, self.ignore_index)
        if self.reduction == "mean" and mask is not None:  # reduce_loss's values, counted in
            return loss.sum() / mask.sum(dtype=loss.dtype).clamp_min(1)  # the loss's dtype
        return reduce_loss(loss, self.reduction, mask)

    def evaluate(self, forward: Any, *loaders: Any, model: Any = None) -> tuple[Any, ...]:
        """:func:`branch_losses` over each loader, with this object's head and settings."""
        if self.branches is None:
            raise RuntimeError("GradientBlending.evaluate needs modalities= (or a first forward)")
        kwargs: dict[str, Any] = {
            "head": self.head, "model": model, "fused": self.fused,
            "ignore_index": self.ignore_index, "label_smoothing": self.label_smoothing,
            "process_group": self.process_group,
        }  # fmt: skip
        return tuple(branch_losses(forward, d, self.branches[:-1], **kwargs) for d in loaders)

    @torch.no_grad()
    def update(
        self, train_losses: Mapping[str, Any], val_losses: Mapping[str, Any]
    ) -> BlendingRecord | None:
        """End of a window: ``{branch: mean loss}`` on (a subset of) the training data and on
        the split held out of it (floats or 0-dim tensors, the same on every rank:
        :func:`branch_losses` pools them). The first call only records the window's start
        (returns ``None``); each later call computes ``ΔG, ΔO`` against the previous call's
        losses, sets the weights of :func:`blending_weights` (the previous ones are the
        fallback) and returns (and stores as ``last``) a :class:`BlendingRecord`.

        Raises ``ValueError`` (missing or extra branches, non-finite values, or under DDP losses
        that differ between ranks: every rank raises), ``TypeError`` for non-real values.
        """
        train = branch_vector(train_losses, self._names(train_losses), what="train_losses")
        val = branch_vector(val_losses, self._names(val_losses), what="val_losses")
        check_same_on_ranks(torch.cat([train, val]), self.process_group, message=_NOT_POOLED)
        start, self._start = self._start, (train, val)
        if start is None or self.branches is None or self._weights is None:
            return None
        delta_g, delta_o = window_changes(*start, train, val)
        weights = blending_weights(delta_g, delta_o, eps=self.eps, fallback=self._weights)
        self._weights = weights.float()
        self._windows += 1
        self.last = BlendingRecord(
            modalities=self.branches, train_losses=train, val_losses=val, delta_g=delta_g,
            delta_o=delta_o, ogr=overfitting_to_generalization_ratio(delta_g, delta_o),
            weights=self._weights, window=self._windows,
        )  # fmt: skip
        return self.last

    def get_extra_state(self) -> dict[str, Any]:
        """Branches (and whether a forward fixed their order), weights, the window's start
        losses, window count and last record."""
        last = None if self.last is None else dataclasses.asdict(self.last)
        start = None if self._start is None else [t.clone() for t in self._start]
        weights = None if self._weights is None else self._weights.clone()
        return {"branches": self.branches, "weights": weights, "start": start, "last": last,
                "windows": self._windows, "ordered": self._ordered}  # fmt: skip

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        self.branches = None if state["branches"] is None else tuple(state["branches"])
        self._weights, self._windows = state["weights"], int(state["windows"])
        self._ordered = bool(state.get("ordered", True))  # states before it: as bound
        self._start = None if state["start"] is None else (state["start"][0], state["start"][1])
        last = state["last"]
        if last is not None:
            last = BlendingRecord(**{**last, "modalities": tuple(last["modalities"])})
        self.last = last
