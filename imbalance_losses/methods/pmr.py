"""PMR: Prototypical Modal Rebalance (Fan, Xu, Wang, Wang, Guo; CVPR 2023, arXiv 2211.07089).

Each modality ``m`` gets a non-parametric classifier: the class prototypes ``c_{m,k}`` (mean
feature of class ``k``, recomputed on the user's schedule, e.g. each epoch, and blended with
momentum ``mu_p``). Per training step (statistics fp32, detached, pooled over ranks)::

    z_{m,bk} = -||x_{m,b} - c_{m,k}||_2                      prototype logits
    L_p,m    = -mean_b log softmax(z_{m,b})[y_b]             prototypical cross-entropy
    s_m      = sum_b softmax(z_{m,b})[y_b]                    prototype true-class score
    rho_m    = s_m / mean_{k != m} s_k                        (= s_a / s_v for two modalities)
    beta_m   = alpha * [rho_m < 1]                            slow modalities (official code)
             (coefficient="graded": alpha * clip(1 / rho_m - 1, 0, 1))
    eta_m    = mu * clip(rho_m - 1, 0, 1)                     dominant ones, early epochs only
    E_m      = mean_b( -sum_k p_{m,bk} log p_{m,bk} )         prototype entropy
    L = criterion(z, y) + sum_m beta_m L_p,m - sum_m eta_m E_m

See ``docs/pmr.md`` for the source of each default, the official code's differences, the
schedule, DDP, accumulation and AMP.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.distributed import ProcessGroup
from ..core.prototypes import Prototypes
from ..core.records import StepRecord
from ..core.remedy import Remedy
from ..core.running import Pooled, RunningSums, sample_mean
from ..core.stats import counted, one_vs_rest_ratio
from ..core.validation import check_logits, int_param, real_param

__all__ = [
    "PMRLoss",
    "PMRRecord",
    "entropy_weights",
    "prototype_entropy",
    "prototype_logits",
    "prototypical_cross_entropy",
    "rebalance_coefficients",
]

Criterion = Callable[[Tensor, Tensor], Tensor]
Coefficient = Literal["code", "graded"]
_BY = "PMRLoss's prototypes (move it with pmr.to(device))"


def _coefficient_rule(value: object, name: str) -> Coefficient:
    """``"code"`` or ``"graded"``; ``"paper"`` (the 0.1.0 name of ``"graded"``) with a warning."""
    if value == "paper":
        warnings.warn(
            f"{name}='paper' is deprecated: use {name}='graded' (the same rule, renamed because "
            "it is not confirmed from the paper's text); the default is now 'code', the official "
            "code's constant alpha",
            DeprecationWarning,
            stacklevel=3,
        )
        return "graded"
    if value not in ("code", "graded"):
        raise ValueError(f"{name} must be 'code' or 'graded', got {value!r}")
    return value


def prototype_logits(features: Tensor, prototypes: Tensor, known: Tensor | None = None) -> Tensor:
    """``z_bk = -||x_b - c_k||_2`` ``[B, C]`` (fp32, one ``torch.cdist``); ``-inf`` where not known.

    Args:
        features: ``[B, D]`` (any float dtype; promoted to fp32, gradient kept).
        prototypes: ``[C, D]`` class prototypes (no gradient flows into them).
        known: optional ``[C]`` bool; classes without a prototype get ``-inf`` (probability 0).

    Example:
        >>> import torch
        >>> from imbalance_losses import prototype_logits
        >>> prototypes = torch.tensor([[0.0, 0.0], [3.0, 4.0]])       # one per class
        >>> prototype_logits(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), prototypes)
        tensor([[-0., -5.],
                [-3., -4.]])
    """
    dist = torch.cdist(
        features.float(), prototypes.detach().float(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    return -dist if known is None else (-dist).masked_fill(~known, float("-inf"))


def prototypical_cross_entropy(
    logits: Tensor, target: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``L_p = -(1/n) sum_b log softmax(z_b)[y_b]`` over the ``n`` samples in ``mask`` (0 if none).

    Args:
        logits: ``[B, C]`` prototype logits.
        target: ``[B]`` class indices.
        mask: ``[B]`` bool, the samples that count (default: all).

    Example:
        >>> import torch
        >>> from imbalance_losses import prototypical_cross_entropy
        >>> logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        >>> prototypical_cross_entropy(logits, torch.tensor([0, 0])).round(decimals=4)
        tensor(0.4100)
        >>> prototypical_cross_entropy(logits, torch.tensor([0, 0]), torch.tensor([True, False]))
        tensor(0.6931)
    """
    index = target.long() if mask is None else torch.where(mask, target, 0).long()
    return _masked_mean(
        -torch.log_softmax(logits.float(), -1).gather(1, index[:, None])[:, 0], mask
    )


def prototype_entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``E = (1/n) sum_b -sum_k p_bk log p_bk``, ``p_b = softmax(z_b)`` (``0 log 0 = 0``).

    Example:
        >>> import torch
        >>> from imbalance_losses import prototype_entropy
        >>> prototype_entropy(torch.zeros(4, 2)).round(decimals=4)  # uniform on 2 classes: log 2
        tensor(0.6931)
    """
    log_p = torch.log_softmax(logits.float(), -1)
    return _masked_mean(-(log_p.exp() * log_p.masked_fill(torch.isinf(log_p), 0.0)).sum(-1), mask)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values [B]`` over ``mask`` (all when ``None``); 0 when no sample counts."""
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    return sample_mean(torch.where(keep, values, 0.0).sum(), keep.sum())


def _stacked_terms(
    features: list[Tensor], prototypes: list[Tensor], known: Tensor, index: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(L_p [M], E [M], s [M], n)`` of every modality at once, on the stacked ``[M, B, C]``.

    The values of :func:`prototype_logits`, :func:`prototypical_cross_entropy`,
    :func:`prototype_entropy` (each ``[B]`` term masked and averaged over the ``n`` counted
    samples) and the summed true-class probability ``s_m = sum_b softmax(z_m)[b, y_b]`` over
    ``mask``, computed modality by modality, but in one log-softmax, one ``gather`` per term and
    one sum per term for all modalities. ``index``: the (in-range) class of each sample.
    """
    dist = torch.stack(
        [
            torch.cdist(x.float(), c.detach().float(), compute_mode="donot_use_mm_for_euclid_dist")
            for x, c in zip(features, prototypes, strict=True)
        ]
    )  # [M, B, C]
    z = (-dist).masked_fill(~known, float("-inf"))
    log_p = torch.log_softmax(z, -1)
    drop = ~mask
    at = index.reshape(1, -1, 1).expand(z.shape[0], -1, 1)
    nll = -log_p.gather(2, at).squeeze(2)  # [M, B]
    ent = -(log_p.exp() * log_p.masked_fill(torch.isinf(log_p), 0.0)).sum(-1)
    count = mask.sum()
    denom = count.clamp_min(1.0).to(nll.dtype)
    pce = (nll.masked_fill(drop, 0.0).sum(-1) / denom).float()
    ent = (ent.masked_fill(drop, 0.0).sum(-1) / denom).float()
    p = torch.softmax(z.detach(), -1).gather(2, at).squeeze(2)
    return pce, ent, p.masked_fill(drop, 0.0).sum(-1), count


def rebalance_coefficients(
    ratios: Tensor, alpha: float, rule: Literal["code", "graded", "paper"] = "code"
) -> Tensor:
    r"""Weights ``beta_m`` ``[M]`` of the prototypical losses from the ratios ``rho_m`` ``[M]``.

    $$\beta_m = \alpha\, [\rho_m < 1] \;\; \text{(code, default)}, \qquad
    \beta_m = \alpha \operatorname{clip}\Big(\frac{1}{\rho_m} - 1, 0, 1\Big) \;\;
    \text{(graded)}$$

    ``"code"`` (default; the official repository's rule): ``beta_m = alpha`` where
    ``rho_m < 1``, else 0. ``"graded"``: ``beta_m = alpha * clip(1 / rho_m - 1, 0, 1)``: zero for
    ``rho_m >= 1``, growing with the gap (two modalities: the slow one gets
    ``alpha * min(rho_fast - 1, 1)``); our reading of the paper's abstract, not confirmed from its
    equations. ``"paper"`` is the deprecated name of ``"graded"``.

    Example:
        >>> import torch
        >>> from imbalance_losses import rebalance_coefficients
        >>> rho = torch.tensor([1.5, 1 / 1.5])         # audio leads, visual is the slow modality
        >>> rebalance_coefficients(rho, alpha=1.0)     # official code: constant alpha
        tensor([0., 1.])
        >>> rebalance_coefficients(rho, alpha=1.0, rule="graded")   # grows with the gap
        tensor([0.0000, 0.5000])
    """
    if _coefficient_rule(rule, "rule") == "code":
        return alpha * (ratios < 1).to(ratios)
    return alpha * (1.0 / ratios - 1.0).clamp(0.0, 1.0)


def entropy_weights(ratios: Tensor, mu: float) -> Tensor:
    """``eta_m = mu * clip(rho_m - 1, 0, 1)``: the entropy weight of each dominant modality.

    Two modalities: ``eta_fast = (mu / alpha) beta_slow``; ``eta_m = 0`` for ``rho_m <= 1``.

    Example:
        >>> import torch
        >>> from imbalance_losses import entropy_weights
        >>> entropy_weights(torch.tensor([1.5, 1 / 1.5]), mu=0.1)     # only the dominant modality
        tensor([0.0500, 0.0000])
    """
    return mu * (ratios - 1.0).clamp(0.0, 1.0)


@dataclass(frozen=True)
class PMRRecord(StepRecord):
    """What :class:`PMRLoss` decided on its last training step (each tensor ``[M]``).

    Example:
        >>> import torch
        >>> from imbalance_losses import PMRLoss
        >>> _ = torch.manual_seed(0)
        >>> pmr = PMRLoss(num_classes=2, in_features={"audio": 2, "visual": 2})
        >>> feats = {"audio": torch.randn(4, 2), "visual": torch.randn(4, 2)}
        >>> target = torch.tensor([0, 1, 0, 1])
        >>> _ = pmr.update_prototypes([(feats, target)])
        >>> _ = pmr(torch.zeros(4, 2), target, feats)
        >>> rec = pmr.last
        >>> rec.epoch, tuple(rec.ratios.shape), sorted(rec.to_dict())[:2]
        (0, (2,), ['coefficients/audio', 'coefficients/visual'])
    """

    scores: Tensor
    """Mean prototype true-class probability ``s_m / n`` over the global batch."""
    ratios: Tensor
    """``rho_m = s_m / mean_{k != m} s_k``."""
    coefficients: Tensor
    """``beta_m``, the weight of modality m's prototypical cross-entropy."""
    entropy_weights: Tensor
    """``eta_m``; zero outside the entropy window."""
    prototype_losses: Tensor
    """``L_p,m`` on this rank's batch (detached)."""
    entropies: Tensor
    """``E_m`` on this rank's batch (detached)."""
    epoch: int
    """The epoch set with :meth:`PMRLoss.set_epoch`."""


class PMRLoss(Remedy[PMRRecord]):
    r"""Prototypical Modal Rebalance loss (CVPR 2023): drop-in for the criterion.

    $$\mathcal{L} = \ell(z, y) + \sum_m \beta_m\, \mathcal{L}_{p,m} - \sum_m \eta_m E_m, \qquad
    \mathcal{L}_{p,m} = \mathrm{CE}\big(-\lVert x_m - c_{m,\cdot} \rVert_2,\ y\big)$$

    $$\rho_m = \frac{\sum_b \operatorname{softmax}(-\lVert x_{m,b} - c_{m,\cdot} \rVert)_{y_b}}
    {\operatorname{mean}_{k \ne m} \sum_b \operatorname{softmax}(-\lVert x_{k,b} - c_{k,\cdot}
    \rVert)_{y_b}}, \qquad
    \beta_m = \alpha\, [\rho_m < 1], \qquad
    \eta_m = \mu \operatorname{clip}(\rho_m - 1, 0, 1)$$

    (``coefficient="graded"``: $\beta_m = \alpha \operatorname{clip}(1 / \rho_m - 1, 0, 1)$.)

    Usage::

        pmr = PMRLoss(num_classes=6, in_features={"audio": 512, "visual": 512})
        pmr.update_prototypes((model.features(x), y) for x, y in loader)  # before each epoch
        loss = pmr(fused_logits, target, features={"audio": a, "visual": v})

    Holds the prototypes as buffers (no parameters). In training mode inside the modulation
    window it returns ``criterion(z, y) + sum_m beta_m L_p,m - sum_m eta_m E_m``; otherwise (and
    in eval mode, or with gradients disabled: a warning) ``criterion(z, y)`` with no statistics
    and no collective. A batch whose every target is ``ignore_index`` gives a zero loss whose
    gradients are all zero (no NaN). The training-step lifecycle (mode, failing together under
    DDP, pooling, step count, ``last``, state) is :class:`~imbalance_losses.core.remedy.Remedy`'s;
    the prototypes, a per-epoch action, are this class's own methods (:mod:`..core.prototypes`).

    Args:
        num_classes: ``C``.
        in_features: ``{modality: D_m}`` in concatenation order (M >= 2).
        criterion: a callable loss on the fused logits; default
            ``nn.CrossEntropyLoss(ignore_index=ignore_index)``.
        alpha: ``>= 0``, scale of ``beta``.
        mu: ``>= 0``, scale of the entropy weight ``eta``.
        entropy_epochs: epochs, from the start of the window, with the entropy term.
        momentum: prototype momentum ``mu_p`` in ``[0, 1]`` (official argparse default 0.2;
            the official run scripts pass 0.0).
        coefficient: ``"code"`` (default, the official code: constant ``alpha`` on every
            slower modality) or ``"graded"`` (``alpha clip(1 / rho_m - 1, 0, 1)``); ``"paper"``
            is the deprecated name of ``"graded"``.
        modulation: ``(start, end)`` epochs, inclusive; ``end=None``: no end.
        ignore_index: an integer target left out of every statistic and loss (``None``: none).
        process_group: group to pool statistics over under ``torch.distributed``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import PMRLoss
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(4 + 6, 3)
        >>> pmr = PMRLoss(num_classes=3, in_features={"audio": 4, "visual": 6})
        >>> feats = {"audio": torch.randn(6, 4), "visual": torch.randn(6, 6)}
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> _ = pmr.update_prototypes([(feats, target)])      # e.g. at the start of each epoch
        >>> pmr.set_epoch(0)
        >>> loss = pmr(head(torch.cat(list(feats.values()), 1)), target, feats)
        >>> loss.shape, pmr.last.modalities
        (torch.Size([]), ('audio', 'visual'))
    """

    record_type = PMRRecord
    no_step = "PMRLoss has no step() (it is a loss: it acts in its call); nothing to attach"
    who = "PMRLoss"

    def __init__(
        self,
        num_classes: int,
        in_features: Mapping[str, int],
        criterion: Criterion | None = None,
        *,
        alpha: float = 1.0,
        mu: float = 0.1,
        entropy_epochs: int = 10,
        momentum: float = 0.2,
        coefficient: Literal["code", "graded", "paper"] = "code",
        modulation: tuple[int, int | None] = (0, None),
        ignore_index: int | None = -100,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(process_group=process_group)
        self.num_classes = int_param("num_classes", num_classes, ge=2)
        if not isinstance(in_features, Mapping) or len(in_features) < 2:
            raise ValueError(f"in_features must map >= 2 modalities to widths, got {in_features!r}")
        self.in_features = {
            m: int_param(f"in_features[{m!r}]", d, ge=1) for m, d in in_features.items()
        }
        self.alpha, self.mu = real_param("alpha", alpha, ge=0), real_param("mu", mu, ge=0)
        self.momentum = real_param("momentum", momentum, ge=0, le=1)
        self.entropy_epochs = int_param("entropy_epochs", entropy_epochs, ge=0)
        self.coefficient: Coefficient = _coefficient_rule(coefficient, "coefficient")
        if not isinstance(modulation, tuple | list) or len(modulation) != 2:
            raise TypeError(
                "modulation must be a (start, end) pair of epochs (end=None: no end), got "
                f"{type(modulation).__name__} {modulation!r}"
            )
        start, end = modulation
        self.modulation = (
            int_param("modulation start", start, ge=0),
            None if end is None else int_param("modulation end", end, ge=start),
        )
        self.ignore_index = (
            None if ignore_index is None else int_param("ignore_index", ignore_index)
        )
        if criterion is not None and not callable(criterion):
            raise TypeError(
                "criterion must be a callable loss(logits, target) -> Tensor, e.g. "
                f"nn.CrossEntropyLoss(), got {type(criterion).__name__} {criterion!r}"
            )
        self.criterion: Criterion = (
            nn.CrossEntropyLoss(ignore_index=-100 if ignore_index is None else ignore_index)
            if criterion is None
            else criterion
        )
        self.store = Prototypes(num_classes, self.in_features, self.momentum, self.ignore_index)
        self.epoch = 0
        self._terms: tuple[Tensor, Tensor] | None = None  # this call's detached L_p, E

    @property
    def prototypes(self) -> dict[str, Tensor]:
        """``{modality: [C, D_m]}`` current prototypes (buffers of ``self.store``)."""
        return self.store.as_dict()

    @property
    def known(self) -> Tensor:
        """``[C]`` bool: classes that have a prototype."""
        return self.store.known

    @property
    def updates(self) -> int:
        """Number of prototype computations so far."""
        return self.store.updates

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that the modulation and entropy windows refer to."""
        self.epoch = int_param("epoch", epoch, ge=0)

    def accumulate_prototypes(self, features: Mapping[str, Tensor], target: Tensor) -> None:
        """Add one batch's class sums (no grad); :meth:`compute_prototypes` ends the sample."""
        self.store.add(features, target, _BY)

    def compute_prototypes(self) -> Tensor:
        """Pool the class sums over ranks, blend, return ``present [C]``; every rank must call.

        ``c <- (1 - momentum) c_new + momentum c_old`` for classes in the sample (the first
        computation takes ``c_new``); absent classes keep their prototype.
        """
        self.store.momentum = self.momentum
        return self.store.compute(self.process_group)

    def update_prototypes(self, batches: Iterable[tuple[Mapping[str, Tensor], Tensor]]) -> Tensor:
        """:meth:`accumulate_prototypes` over ``(features, target)`` batches, then compute."""
        self.store.momentum = self.momentum
        return self.store.update(batches, self.process_group)

    def _in_window(self) -> bool:
        """The epoch is inside the modulation window ``(start, end)``."""
        start, end = self.modulation
        return self.epoch >= start and (end is None or self.epoch <= end)

    def forward(self, logits: Tensor, target: Tensor, features: Mapping[str, Tensor]) -> Tensor:
        """The PMR loss (see the class docstring); raises ``ValueError``/``TypeError`` on bad input.

        Raises:
            RuntimeError: inside the modulation window before any :meth:`compute_prototypes`.
        """
        on = self._in_window() and self._training_call()
        batch = self._checked(logits, target, features, on)
        mask = counted(target, self.ignore_index)
        loss = self.criterion(logits, target) if batch else logits.sum() * 0.0
        if batch and mask is not None:  # every target ignored: 0, not the criterion's 0 / 0
            loss = torch.where(mask.any(), loss, 0.0)  # no host sync; zero gradient
        if not on:
            return loss
        # an ignored sample's index only has to be in range (validated targets: the same index
        # as where(mask, target, 0)); every per-sample term of it is masked out
        index = (target if mask is None else target.clamp(0, self.num_classes - 1)).long()
        mask = self.known[index] if mask is None else mask & self.known[index]
        pce, ent, scores, count = _stacked_terms(
            [x for x in features.values()], list(self.prototypes.values()), self.known, index, mask
        )
        self._add(scores, count, batch)
        self._terms = (pce.detach(), ent.detach())
        record = self._decide(tuple(self.in_features), self.known.device)
        if record is None:
            return logits.sum() * 0.0  # no sample on any rank: no step, no record change
        beta, eta = record.coefficients, record.entropy_weights
        return loss + (beta.to(pce) * pce).sum() - (eta.to(ent) * ent).sum()

    def _checked(
        self, logits: Tensor, target: Tensor, features: Mapping[str, Tensor], on: bool
    ) -> int:
        """Validate one call's input (every rank fails together when ``on``); the batch size."""
        with self._validating(len(self.in_features), self.known.device, pools=on):
            check_logits(logits, name="logits")
            if logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have shape {tuple(logits.shape)} but num_classes={self.num_classes}"
                )
            batch = self.store.check(features, target, _BY)
            if batch != logits.shape[0]:
                raise ValueError(f"features have batch {batch}, logits {tuple(logits.shape)}")
            if on and self.updates == 0:
                raise RuntimeError(
                    "PMRLoss has no prototypes yet: call update_prototypes(...) (or "
                    "accumulate_prototypes + compute_prototypes) before training"
                )
        return batch

    def _formula(self, pooled: Pooled, names: tuple[str, ...], active: bool) -> PMRRecord:
        """``rho`` from the pooled scores, then ``beta`` and ``eta`` (entropy window only)."""
        ratios = one_vs_rest_ratio(pooled.sums)
        beta = rebalance_coefficients(ratios, self.alpha, self.coefficient)
        with_entropy = self.epoch < self.modulation[0] + self.entropy_epochs
        eta = entropy_weights(ratios, self.mu) * float(with_entropy)
        assert self._terms is not None
        return PMRRecord(names, pooled.mean(), ratios, beta, eta, *self._terms, self.epoch)

    def _method_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        self.epoch = state["epoch"]

    def get_extra_state(self) -> dict[str, Any]:
        """Epoch, step count and the last record: part of ``state_dict()`` (the 0.1.0 keys).

        The base's ``pending`` and ``modalities`` are left out: every training call pools at
        once (nothing is pending between calls) and the modalities are ``in_features``.
        """
        state = super().get_extra_state()
        return {key: state[key] for key in ("epoch", "steps", "last")}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        super().set_extra_state(
            {"pending": RunningSums().state_dict(), "modalities": None, **state}
        )
