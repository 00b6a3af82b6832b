"""AGM: Adaptive Gradient Modulation (Li, Li, Hu, Lei, Li, Zhou; ICCV 2023, arXiv 2308.07686).

Each training step (statistics fp32, detached, pooled over micro-batches and DDP ranks):

1. ``v(S) = head(x_S)`` for every subset ``S`` of the ``M`` modalities (the others zeroed; one
   head call on ``2^M`` stacked copies, :mod:`..core.masking`), and the mono-modal response
   ``phi_m = Shapley_m(v) + v(empty) / M``, so that ``sum_m phi_m = head(x)``;
2. ``s_m = mean_b -log max(softmax(phi_m)_b[y_b], 1e-8)``           (mono-modal cross-entropy)
3. ``r_m = exp(mean_{k != m} s_k - s_m)``                          (discrepancy ratio)
4. ``rbar_m = exp(mean_{k != m} S_k - S_m)`` from the running means ``S`` of ``s`` *before*
   this step (``S = 0`` at the start: ``rbar = 1``), then ``S <- beta S + (1 - beta) s`` with
   ``beta = t / (t + 1)`` at step ``t`` (the cumulative mean) or a fixed ``momentum``;
5. ``k_m = exp(alpha * min(rbar_m - r_m, cap))``                   (modulation coefficient)
6. the gradient flowing into modality m's features is multiplied by ``k_m``.

Behind its running level (``r_m < rbar_m``): ``k_m > 1``; ahead: ``k_m < 1``. See docs/agm.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.distributed import ProcessGroup
from ..core.hooks import scale_grad
from ..core.masking import masked_outputs, shapley_values
from ..core.params import check_head_not_listed
from ..core.records import StepRecord
from ..core.remedy import EncoderSpec, Remedy
from ..core.running import Pooled
from ..core.stats import as_fp32, count_of, counted
from ..core.unimodal import Head
from ..core.validation import (
    check_features,
    check_finite,
    check_target,
    int_param,
    real_param,
)

__all__ = [
    "AGMRecord",
    "AdaptiveGradientModulator",
    "agm_coefficients",
    "discrepancy_ratios",
    "mono_modal_cross_entropy",
    "mono_modal_responses",
]

_FLOOR = math.log(1e-8)  # the official probability floor: s_b <= -log(1e-8) = 18.42


def mono_modal_responses(values: Tensor) -> Tensor:
    """``phi_m = sum_S w(|S|) (v(S + {m}) - v(S)) + v(empty) / M`` from ``values`` ``[2^M, ...]``.

    ``w(k) = k! (M - k - 1)! / M!``; ``values[s]`` is the head's output with the modalities
    of subset ``s`` kept (:func:`~imbalance_losses.core.masking.masked_outputs`). The exact Shapley
    values sum to ``v(all) - v(empty)``; sharing ``v(empty)`` equally makes the responses sum
    to the fused output ``v(all)``. Returns ``[M, ...]`` in the dtype of ``values``.

    Example:
        >>> import torch
        >>> from imbalance_losses import mono_modal_responses
        >>> values = torch.tensor([0.0, 1.0, 2.0, 4.0])   # v(empty), v({1}), v({2}), v({1, 2})
        >>> phi = mono_modal_responses(values)
        >>> phi, phi.sum()                                # Shapley values; they add up to v(all)
        (tensor([1.5000, 2.5000]), tensor(4.))
    """
    m = values.shape[0].bit_length() - 1
    return shapley_values(values) + values[0] / m


def mono_modal_cross_entropy(
    responses: Tensor, target: Tensor, ignore_index: int | None = None
) -> Tensor:
    """Per-sample ``-log max(softmax(phi_m)_b[y_b], 1e-8)``, ``[M, B]`` fp32.

    ``responses`` ``[M, B, C]``; ``target`` class indices ``[B]`` (entries equal to
    ``ignore_index`` give 0) or soft targets ``[B, C]`` (``-sum_c t_bc log max(p_bc, 1e-8)``).

    Example:
        >>> import torch
        >>> from imbalance_losses import mono_modal_cross_entropy
        >>> responses = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])     # [M=2, B=1, C=2]
        >>> mono_modal_cross_entropy(responses, torch.tensor([0])).round(decimals=4)
        tensor([[0.1269],
                [0.6931]])
    """
    logp = torch.log_softmax(as_fp32(responses), dim=-1).clamp_min(_FLOOR)
    if target.is_floating_point():
        return -(logp * as_fp32(target)).sum(-1)
    mask = counted(target, ignore_index)
    index = target.long() if mask is None else torch.where(mask, target, 0).long()
    ce = -logp.gather(-1, index.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return ce if mask is None else ce * mask


def discrepancy_ratios(scores: Tensor) -> Tensor:
    """``r_m = exp(mean_{k != m} s_k - s_m)`` for scores ``[M]`` (M = 2: ``exp(s_2 - s_1)``).

    Example:
        >>> import torch
        >>> from imbalance_losses import discrepancy_ratios
        >>> discrepancy_ratios(torch.tensor([1.0, 0.0])).round(decimals=4)   # exp(s_2 - s_1), ...
        tensor([0.3679, 2.7183])
    """
    m = scores.shape[-1]
    rest = (scores.sum(-1, keepdim=True) - scores) / (m - 1) if m > 2 else scores.flip(-1)
    return torch.exp(rest - scores)


def agm_coefficients(ratios: Tensor, running_ratios: Tensor, alpha: float, cap: float) -> Tensor:
    r"""``k_m = exp(alpha * min(rbar_m - r_m, cap))`` (``cap`` bounds the exponent).

    $$k_m = \exp\big(\alpha \min(\bar r_m - r_m,\ \mathrm{cap})\big)$$

    Example:
        >>> import torch
        >>> from imbalance_losses import agm_coefficients
        >>> ratios, running = torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0])
        >>> agm_coefficients(ratios, running, alpha=1.0, cap=10.0).round(decimals=4)
        tensor([1.6487, 0.3679])
    """
    return torch.exp(alpha * (running_ratios - ratios).clamp_max(cap))


@dataclass(frozen=True)
class AGMRecord(StepRecord):
    """What :class:`AdaptiveGradientModulator` decided on its last step (tensors ``[M]``).

    Positional order: modalities, scores, ratios, running_ratios, running_scores,
    coefficients, active.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import AdaptiveGradientModulator
        >>> _ = torch.manual_seed(0)
        >>> agm = AdaptiveGradientModulator(nn.Linear(4, 2))
        >>> _ = agm({"audio": torch.randn(8, 2), "visual": torch.randn(8, 2)}, torch.arange(8) % 2)
        >>> rec = agm.last
        >>> rec.active, tuple(rec.coefficients.shape), sorted(rec.to_dict())[:3]
        (True, (2,), ['active', 'coefficients/audio', 'coefficients/visual'])
    """

    scores: Tensor
    """``s_m``: mean mono-modal cross-entropy of the Shapley responses on this step."""
    ratios: Tensor
    """``r_m = exp(mean_{k != m} s_k - s_m)``."""
    running_ratios: Tensor
    """``rbar_m``, from the running means before this step (the reference ``r_m`` is held to)."""
    running_scores: Tensor
    """``S_m`` after this step's update."""
    coefficients: Tensor
    """``k_m = exp(alpha * min(rbar_m - r_m, cap))`` (applied when ``active``)."""
    active: bool
    """Whether the modulation was applied (training mode, after warm-up)."""


class AdaptiveGradientModulator(Remedy[AGMRecord]):
    r"""AGM: scales each modality's feature gradient by ``k_m`` from Shapley responses.

    $$\phi_m = \operatorname{Shapley}_m(v) + \frac{v(\emptyset)}{M}, \qquad
    s_m = \operatorname{mean}_b \mathrm{CE}(\phi_m, y), \qquad
    r_m = \exp\Big(\operatorname{mean}_{k \ne m} s_k - s_m\Big)$$

    $$\nabla_{x_m} \leftarrow k_m \nabla_{x_m}, \qquad
    k_m = \exp\big(\alpha \min(\bar r_m - r_m,\ \mathrm{cap})\big)$$

    ($v(S)$: the head's output with only the modalities in $S$ kept; $\bar r_m$: the same
    ratio from the running means of $s$ before this step.)

    Usage: ``feats = agm({"audio": a, "visual": v}, target)`` before the head (one step per
    call), then the head on ``feats``, the loss and ``loss.backward()`` as usual.
    The returned tensors equal the inputs; backward through them multiplies the gradient
    by ``k_m`` (once per backward). The head's gradient is unchanged. With ``encoders=``
    (exact gradient accumulation) the call only adds statistics and returns the features as
    they are; :meth:`step` after the last ``backward`` scales each encoder's ``.grad`` once.
    Eval mode (or gradients disabled, with a warning): features returned, nothing recorded.
    In encoders mode ``agm.attach(optimizer)`` runs :meth:`step` inside every real
    ``optimizer.step()`` instead (see :meth:`attach`; mind the order with clipping,
    docs/attaching.md).

    Args:
        head: the fusion head: a callable over the concatenated features (any head; masked
            copies evaluated in one call, module heads in eval mode), or a mapping of
            per-modality heads of a sum-fusion model. Not registered (no parameters here).
        alpha: ``alpha >= 0`` (official runs: 0.1 to 2.5; ``0`` disables the modulation).
        momentum: ``None`` (default): ``S`` is the cumulative mean over every step (official);
            a value in ``[0, 1)``: an EMA ``S <- momentum S + (1 - momentum) s``.
        warmup_steps: steps (with samples) that update ``S`` before the modulation starts.
        cap: upper bound of the exponent ``rbar_m - r_m`` before ``alpha`` (official: 10).
        ignore_index: class index left out of the statistics (default -100, as torch's CE).
        encoders: optional ``{modality: module or parameters}`` for the :meth:`step` mode.
        process_group: statistics are all-reduced over it under DDP (default: the world).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from imbalance_losses import AdaptiveGradientModulator
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(4 + 6, 3)
        >>> agm = AdaptiveGradientModulator(head, alpha=1.0)
        >>> feats = {"audio": torch.randn(6, 4, requires_grad=True),
        ...          "visual": torch.randn(6, 6, requires_grad=True)}
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> modulated = agm(feats, target)          # same values; their gradients are scaled by k_m
        >>> loss = F.cross_entropy(head(torch.cat(list(modulated.values()), 1)), target)
        >>> loss.backward()
        >>> torch.equal(modulated["audio"], feats["audio"]), agm.last.modalities
        (True, ('audio', 'visual'))
    """

    record_type = AGMRecord
    who = "AGM"
    repeat_effect = "the same k, no statistics"

    def __init__(
        self,
        head: Head,
        *,
        alpha: float = 1.0,
        momentum: float | None = None,
        warmup_steps: int = 0,
        cap: float = 10.0,
        ignore_index: int | None = -100,
        encoders: Mapping[str, EncoderSpec] | nn.ModuleDict | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        if not callable(head) and not isinstance(head, Mapping):
            raise TypeError(f"head must be a callable or a mapping of heads, got {type(head)}")
        super().__init__(warmup_steps=warmup_steps, encoders=encoders, process_group=process_group)
        self.alpha = real_param("alpha", alpha, ge=0.0)
        self.momentum = None if momentum is None else real_param("momentum", momentum, ge=0, lt=1)
        self.cap = real_param("cap", cap, gt=0.0)
        self.ignore_index = (
            None if ignore_index is None else int_param("ignore_index", ignore_index)
        )
        self.__dict__["_head"] = head
        check_head_not_listed(
            self._encoder_params,
            head,
            self._encoder_names,
            who="AGM",
            action="scale the gradient of",
        )
        self._running: Tensor | None = None  # [M] S, fp32
        self._seen: Tensor | None = None  # 0-dim: steps whose statistics entered S
        self._warned_fp16 = False  # hook mode: the float16 overflow warning, once

    @property
    def head(self) -> Head:
        """The fusion head the masked copies go through (not a submodule)."""
        return cast(Head, self.__dict__["_head"])

    def forward(self, features: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Add this batch's statistics; hook mode: decide ``k``, return gradient-scaled features.

        Args:
            features: ordered ``{modality: [B, D_m]}``, the tensors the head fuses.
            target: class indices ``[B]`` (or ``ignore_index``) or soft targets ``[B, C]``.

        Raises:
            TypeError / ValueError: bad features, head outputs or targets (naming the modality
                and shapes), non-finite head outputs, modalities that change between steps.
                Under DDP (hook mode) every rank raises in the same call.
        """
        if not self._training_call():
            return dict(features)
        _, checked = self._open_call(
            features,
            lambda batch: self._checked(features, target, batch),
            pools=not self.has_encoders,
        )
        if checked is None:  # an open call's tensors again: its k, no statistics, no step
            kept = self._open.kept(features, who=self.who)
            return self._scaled(features, cast("Tensor | None", kept))
        values, batch = checked
        ce = mono_modal_cross_entropy(
            mono_modal_responses(as_fp32(values)), target, self.ignore_index
        )
        mask = counted(target, self.ignore_index)
        self._add(ce.sum(1), count_of(mask, batch), rows=batch)
        if self.has_encoders:
            return dict(features)
        record = self._decide(tuple(features), values.device)
        k = None if record is None or not record.active else record.coefficients
        self._open.keep(features.values(), k)  # a repeat of this call gets this k
        if k is not None:
            self._warn_fp16(features)
        return self._scaled(features, k)

    def _checked(
        self, features: Mapping[str, Tensor], target: Tensor, batch: int
    ) -> tuple[Tensor, int]:
        """The call's own checks; the head's outputs on every subset ``[2^M, B, C]``."""
        check_features(features, finite=True, by="the fusion head")
        with torch.no_grad():
            values = masked_outputs(self.head, {n: x.detach() for n, x in features.items()})
        if values.dim() != 3:
            raise ValueError(f"the head must return [B, C] logits, got {values.shape[1:]}")
        check_finite(values, name="the head's outputs on the masked features")
        check_target(
            target, batch=batch, num_classes=values.shape[-1], ignore_index=self.ignore_index
        )
        return values, batch

    def _warn_fp16(self, features: Mapping[str, Tensor]) -> None:
        if self._warned_fp16 or not any(
            x.dtype == torch.float16 and x.requires_grad for x in features.values()
        ):
            return
        self._warned_fp16 = True
        warnings.warn(
            "AGM hook mode on float16 features: the gradient is multiplied by k_m (up to "
            f"exp(alpha * cap) = {math.exp(min(self.alpha * self.cap, 700.0)):.3g}) in "
            "float16, where k_m * g can overflow for a finite g and make GradScaler skip "
            "the step; pass encoders= and call agm.step() after scaler.unscale_(optimizer) "
            "(the fp32 .grad is scaled there), see docs/agm.md",
            RuntimeWarning,
            stacklevel=4,
        )

    def _scaled(self, features: Mapping[str, Tensor], k: Tensor | None) -> dict[str, Tensor]:
        """The features with their gradient scaled by ``k`` (``None``: as they are)."""
        if k is None:
            return dict(features)
        return {
            n: scale_grad(x, k[i]) if x.requires_grad else x
            for i, (n, x) in enumerate(features.items())
        }

    def _formula(self, pooled: Pooled, names: tuple[str, ...], active: bool) -> AGMRecord:
        """Steps 3-5 of the module doc from the pooled mean scores; updates ``S``."""
        scores, has = pooled.mean(), pooled.samples > 0
        running = torch.zeros_like(scores) if self._running is None else self._running.to(scores)
        seen = torch.zeros_like(scores[0]) if self._seen is None else self._seen.to(scores)
        ratios, running_ratios = discrepancy_ratios(scores), discrepancy_ratios(running)
        k = agm_coefficients(ratios, running_ratios, self.alpha, self.cap)
        k = torch.where(has, k, torch.ones_like(k))  # every sample ignored: no information
        beta = seen / (seen + 1) if self.momentum is None else (seen > 0) * self.momentum
        self._running = torch.where(has, torch.lerp(scores, running, beta), running)
        self._seen = seen + has
        return AGMRecord(names, scores, ratios, running_ratios, self._running, k, active)

    def _method_state(self) -> dict[str, Any]:
        return {"running": self._running, "seen": self._seen}  # never changed in place

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        self._running, self._seen = state["running"], state["seen"]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, momentum={self.momentum}, warmup_steps={self.warmup_steps}"
