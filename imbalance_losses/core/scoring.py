"""Per-modality confidence scores and their capped one-vs-rest ratio: one measurement, pooled.

Several methods decide from the same discrepancy: OGM scales the dominant encoders' gradients
(:class:`~imbalance_losses.ModalityGradientModulator`), OPM drops their features
(:class:`~imbalance_losses.ModalityPredictionModulator`), the monitor reports it. Each holds one
:class:`ModalityScorer`, so their scores and ratios on the same input are the same values bit
for bit::

    s_m = sum_b softmax(z_m)[b, y_b]                 (fp32, detached; soft targets:
                                                      sum_b sum_c softmax(z_m)_bc t_bc)
    rho_m = min(s_m / mean_{k != m} s_k, R)          (0 / 0 = 1; :func:`capped_ratio`)

with ``z_m`` modality ``m``'s unimodal logits, pooled over micro-batches and ranks as sums plus a
sample count (:class:`~imbalance_losses.core.running.RunningSums`, one all-reduce per decision).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .distributed import ProcessGroup
from .running import RunningSums
from .stats import count_of, counted, one_vs_rest_ratio, true_class_scores
from .validation import check_scored_logits, deferred_value_checks

__all__ = ["Discrepancy", "ModalityScorer", "capped_ratio"]


def capped_ratio(scores: Tensor, max_ratio: float) -> Tensor:
    """Discrepancy ratios ``[M]`` of the scores ``[M]``, capped at ``max_ratio``.

    ``rho_m = min(s_m / mean_{k != m} s_k, R)``, ``R = max_ratio > 1``, with ``0 / 0 = 1``
    (:func:`~imbalance_losses.core.stats.one_vs_rest_ratio`). Without the cap a score that
    underflows to 0 (every true-class probability below ``1e-45`` in fp32) makes the other
    ratios infinite, and then ``k = 1 - tanh(alpha * inf) = 0`` for every ``alpha > 0``, however
    small, while ``alpha = 0`` gives ``k = 1``: a jump, and a silent full stop of those encoders.
    With the cap ``k`` is a continuous function of ``alpha`` with ``k -> 1`` as ``alpha -> 0``,
    and ``k >= 1 - tanh(alpha (R - 1))`` (paper form), ``k >= 1 - tanh(alpha R)`` (code form).

    Example:
        >>> import torch
        >>> from imbalance_losses.core.scoring import capped_ratio
        >>> capped_ratio(torch.tensor([3.0, 1.0, 0.0]), max_ratio=100.0)   # 3 / mean(1, 0), ...
        tensor([6.0000, 0.6667, 0.0000])
        >>> capped_ratio(torch.tensor([2.0, 0.0]), max_ratio=100.0)        # 2 / 0 capped
        tensor([100.,   0.])
    """
    return one_vs_rest_ratio(scores).clamp(max=max_ratio)


def _capped_ratio_of_sums(scores: Tensor, max_ratio: float) -> Tensor:
    """:func:`capped_ratio` of finite, non-negative scores (sums of probabilities), in fewer
    ops: there ``s_m / rest_m`` is NaN only for ``0 / 0``, which is 1."""
    m = scores.shape[-1]
    if m == 2:
        rest = scores.flip(-1)
    else:
        rest = (scores.sum(-1, keepdim=True) - scores) / (m - 1)
    return (scores / rest).clamp(max=max_ratio).nan_to_num(nan=1.0)


class Discrepancy(NamedTuple):
    """One step's pooled scores and ratios (what :meth:`ModalityScorer.decide` returns)."""

    scores: Tensor
    """``[M]`` fp32, ``s_m = sum_b softmax(z_m)[b, y_b]`` over every micro-batch and rank."""
    num_samples: Tensor
    """0-dim, the number of samples counted (``ignore_index`` targets left out)."""
    ratios: Tensor
    """``[M]`` fp32, ``rho_m = min(s_m / mean_{k != m} s_k, max_ratio)`` (:func:`capped_ratio`)."""


class ModalityScorer:
    """The discrepancy measurement OGM and OPM share: observe, pool, capped ratio.

    One computation, several actions: :class:`~imbalance_losses.ModalityGradientModulator`
    scales gradients with it, :class:`~imbalance_losses.ModalityPredictionModulator` drops
    features with it. Each holds one scorer and calls the same three methods, so their scores
    and ratios on the same input are the same tensors' values bit for bit.

    * :meth:`observe` adds ``s_m += sum_b softmax(z_m)[b, y_b]`` (fp32, detached, one
      ``gather`` per modality) and the counted samples of one (micro-)batch to a
      :class:`~imbalance_losses.core.running.RunningSums`;
    * :meth:`decide` pools them over the process group (one all-reduce, which also carries the
      empty-step and failure flags), resets the pool and returns :class:`Discrepancy`, or
      ``None`` when no rank had a single row (an empty step: the caller makes it a no-op);
    * :meth:`failing_together` wraps the caller's input checks, so a rank whose input fails
      joins :meth:`decide`'s collective with a failure flag and every rank raises in the same
      call.

    Args:
        modalities: the modality names, in mapping order (at least two).
        max_ratio: cap ``R > 1`` of the ratios (see :func:`capped_ratio`).
        ignore_index: class-index targets equal to it are left out of the scores and the count.
        process_group: the group the scores are all-reduced over (``None``: the world).
        owner: how the messages name the owner's modalities (``"the modulator's"``).

    Example:
        >>> import torch
        >>> from imbalance_losses.core.scoring import ModalityScorer
        >>> scorer = ModalityScorer(("audio", "visual"), max_ratio=100.0, ignore_index=None,
        ...                         process_group=None, owner="the example's")
        >>> z = {"audio": torch.tensor([[4.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}
        >>> scorer.observe(z, torch.tensor([0]))
        >>> found = scorer.decide(torch.device("cpu"), missing="nothing observed")
        >>> found.scores.round(decimals=3), found.ratios.round(decimals=2)
        (tensor([0.9820, 0.5000]), tensor([1.9600, 0.5100]))
    """

    def __init__(
        self,
        modalities: tuple[str, ...],
        *,
        max_ratio: float,
        ignore_index: int | None,
        process_group: ProcessGroup | None,
        owner: str,
    ) -> None:
        self.modalities = modalities
        self.max_ratio = max_ratio
        self.ignore_index = ignore_index
        self.process_group = process_group
        self.owner = owner
        self._pool = RunningSums()

    def observe(self, unimodal_logits: Mapping[str, Tensor], target: Tensor) -> None:
        """Validate one (micro-)batch and add its scores and counted samples to the pool.

        An empty batch (``B = 0``) adds no score but counts as observed (zero rows).

        Raises:
            ValueError: modalities that differ from the owner's, logits that are not ``[B, C]``
                or differ in shape between modalities, batch-size mismatch, targets out of
                range, non-finite logits, a target on another device than the logits.
            TypeError: non-floating-point logits, non-tensor input.
        """
        with deferred_value_checks():
            batch, _ = check_scored_logits(
                unimodal_logits,
                target,
                self.modalities,
                owner=self.owner,
                ignore_index=self.ignore_index,
            )
        scores = true_class_scores(list(unimodal_logits.values()), target, self.ignore_index)
        mask = counted(target, self.ignore_index)
        self._pool.add(scores, count_of(mask, batch), rows=batch)

    def failing_together(self, device: torch.device) -> AbstractContextManager[None]:
        """``with scorer.failing_together(device): <checks>``: a failure joins the collective."""
        return self._pool.failing_together(len(self.modalities), device, self.process_group)

    def decide(self, device: torch.device, *, missing: str) -> Discrepancy | None:
        """Pool what was observed since the last call (one all-reduce) and reset.

        Returns the pooled scores, sample count and capped ratios, or ``None`` when the global
        step had no row on any rank.

        Raises:
            RuntimeError: ``missing`` when nothing was observed (on every rank), or the input
                failed validation on another rank in this same call.
        """
        pooled = self._pool.pool(len(self.modalities), device, self.process_group, missing=missing)
        if pooled.empty:
            return None
        return Discrepancy(
            scores=pooled.sums,
            num_samples=pooled.samples,
            ratios=_capped_ratio_of_sums(pooled.sums, self.max_ratio),
        )

    def state_dict(self) -> dict[str, Any]:
        """The scores observed but not yet decided (local to this rank)."""
        return self._pool.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._pool.load_state_dict(state)
