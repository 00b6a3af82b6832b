"""ARL: Asymmetric Representation Learning (Wei, Luo, Luo; ICCV 2025, arXiv 2507.10203).

Balanced learning is not optimal. For a late-fusion predictor ``f = sum_m a_m f_m`` whose
unimodal predictions carry independent, unbiased noise of variance ``sigma_m^2``, the mean
squared error ``sum_m a_m^2 sigma_m^2`` (with ``sum_m a_m = 1``) is smallest at::

    a_m = (1 / sigma_m^2) / sum_k (1 / sigma_k^2)                   (inverse-variance weights)

ARL estimates each modality's prediction variance from the model's shared fusion head (no new
parameters), re-weights each modality's optimisation so that its current dependence moves
towards that inverse-variance target, and adds the unimodal losses as the bias terms. Each
training step (all statistics in fp32 on detached tensors, pooled over ranks under DDP):

1. ``V_m = mean_b( -sum_c p_mbc log p_mbc )``, ``p_m = softmax(z_m)``  (variance proxy)
2. ``h_m = max(V_m / sum_k V_k, floor)``                                (floor = 0.6 / M)
3. ``w_m = (1 / h_m) / sum_k (1 / h_k)``                                (target dependence)
4. ``c_m = sum_c mean_b |z_mbc|``, ``ĉ_m = c_m / sum_k c_k``            (current dependence)
5. ``s_m = w_m * prod_{k != m} ĉ_k``                                    (score)
6. ``beta = softmax(T * s)``                                            (coefficient)
7. the gradient flowing into modality m's features is multiplied by ``1 + beta_m``
8. ``L = criterion(z, y) + gamma * sum_m criterion(z_m, y)``

See ``docs/arl.md`` for the semantics under gradient accumulation, AMP and DDP.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._distributed import ProcessGroup
from ._params import ModalityParameter, modality_parameters, present_gradients, scale_gradients_
from ._running import RunningSums, sample_mean
from ._stats import as_fp32, entropy_sum
from ._validation import (
    check_logits,
    check_modalities,
    check_same_modalities,
    check_target,
    check_unimodal_logits,
)
from .diagnostics import StepRecord
from .unimodal import Head, unimodal_logits

__all__ = [
    "ARLCoefficients",
    "ARLLoss",
    "ARLRecord",
    "arl_coefficients",
    "inverse_variance_weights",
]

Criterion = Callable[[Tensor, Tensor], Tensor]
EncoderSpec = nn.Module | Iterable[nn.Parameter]


def inverse_variance_weights(variances: Tensor) -> Tensor:
    """MSE-optimal late-fusion weights for independent, unbiased noise: ``a_m ∝ 1 / sigma_m^2``.

    Minimising ``E[(sum_m a_m f_m - y)^2] = sum_m a_m^2 sigma_m^2`` subject to ``sum_m a_m = 1``
    (Lagrange: ``2 a_m sigma_m^2 = lambda``) gives::

        a_m = (1 / sigma_m^2) / sum_k (1 / sigma_k^2)

    so that ``a_1 / a_2 = sigma_2^2 / sigma_1^2``.

    Args:
        variances: ``[..., M]`` positive variances (the last dimension indexes modalities).

    Returns:
        Weights of the same shape, summing to 1 over the last dimension.

    Raises:
        ValueError: fewer than two modalities, or a variance that is not positive and finite.
    """
    if variances.dim() < 1 or variances.shape[-1] < 2:
        raise ValueError(
            f"variances must have shape [..., M] with M >= 2, got {tuple(variances.shape)}"
        )
    v = variances.detach()
    if v.device.type == "cpu" and not bool((torch.isfinite(v) & (v > 0)).all()):
        raise ValueError(f"variances must be positive and finite, got {variances.tolist()}")
    inv = 1.0 / variances
    return inv / inv.sum(-1, keepdim=True)


class ARLCoefficients(NamedTuple):
    """What :func:`arl_coefficients` computes, each ``[M]`` in modality order."""

    target_dependence: Tensor
    """``w_m = (1/h_m) / sum_k (1/h_k)``, ``h_m = max(V_m / sum_k V_k, floor)``."""
    dependence: Tensor
    """``ĉ_m = c_m / sum_k c_k``, the normalised current dependence."""
    scores: Tensor
    """``s_m = w_m * prod_{k != m} ĉ_k``."""
    coefficients: Tensor
    """``beta = softmax(T * s)``; the gradient into modality m is scaled by ``1 + beta_m``."""


def _normalise(values: Tensor) -> Tensor:
    """``v / sum(v)``, or uniform ``1 / M`` when the sum is zero (never ``0 / 0``)."""
    total = values.sum()
    uniform = torch.full_like(values, 1.0 / values.shape[0])
    return torch.where(total > 0, values / torch.where(total > 0, total, 1.0), uniform)


def _leave_one_out_product(values: Tensor) -> Tensor:
    """``prod_{k != m} v_k`` for each m, without dividing (exact when some ``v_k`` is 0)."""
    m = values.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=values.device)
    return torch.where(eye, torch.ones_like(values).expand(m, m), values.expand(m, m)).prod(1)


def arl_coefficients(
    variances: Tensor, dependence: Tensor, temperature: float, floor: float
) -> ARLCoefficients:
    """ARL's target dependence, scores and coefficients (spec steps 2-6), detached.

    Args:
        variances: ``[M]`` variance estimates ``V_m >= 0`` (mean predictive entropy).
        dependence: ``[M]`` current dependence ``c_m >= 0`` (mean L1 size of the unimodal
            logits); normalised here, so an already normalised ``ĉ`` is accepted too.
        temperature: ``T >= 0``; ``T = 0`` gives uniform coefficients.
        floor: ``0 < floor <= 1 / M``, lower bound on the normalised variance ``h_m``.

    Returns:
        :class:`ARLCoefficients` ``(w, ĉ, s, beta)``, each ``[M]``::

            h_m = max(V_m / sum_k V_k, floor)     w_m = (1/h_m) / sum_k (1/h_k)
            ĉ_m = c_m / sum_k c_k                 s_m = w_m * prod_{k != m} ĉ_k
            beta = softmax(T * s)

        Unclamped (every ``V_m / sum V >= floor``) this gives exactly ``w_1 / w_2 = V_2 / V_1``.
        If every ``V_m`` is 0 (or every ``c_m``), the normalised vector is uniform.
    """
    if variances.dim() != 1 or variances.shape[0] < 2:
        raise ValueError(f"variances must have shape [M] with M >= 2, got {tuple(variances.shape)}")
    if dependence.shape != variances.shape:
        raise ValueError(
            f"dependence has shape {tuple(dependence.shape)} but variances have shape "
            f"{tuple(variances.shape)}; both are one value per modality"
        )
    m = variances.shape[0]
    if not 0.0 < floor <= 1.0 / m:
        raise ValueError(f"floor must be in (0, 1/M] = (0, {1.0 / m:.4g}] for M = {m}, got {floor}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    v = variances.detach()
    c = dependence.detach()
    h = _normalise(v).clamp_min(floor)  # step 2
    inv = 1.0 / h
    target = inv / inv.sum()  # step 3
    current = _normalise(c)  # step 4
    scores = target * _leave_one_out_product(current)  # step 5
    beta = torch.softmax(temperature * scores, dim=0)  # step 6
    return ARLCoefficients(target, current, scores, beta)


@dataclass(frozen=True)
class ARLRecord(StepRecord):
    """What :class:`ARLLoss` decided on its last training step (each tensor ``[M]``)."""

    variances: Tensor
    """``V_m``: mean predictive entropy of the unimodal logits (EMA if ``momentum`` is set)."""
    target_dependence: Tensor
    """``w_m``: the inverse-variance target share of modality m."""
    dependence: Tensor
    """``ĉ_m``: the current share (normalised mean L1 size of the unimodal logits)."""
    scores: Tensor
    """``s_m = w_m * prod_{k != m} ĉ_k``."""
    coefficients: Tensor
    """``beta_m = softmax(T s)_m``; re-weighting factor ``1 + beta_m`` when ``active``."""
    active: bool
    """Whether the re-weighting was applied on this step (training mode, after warm-up)."""


class ARLLoss(nn.Module):
    """Asymmetric Representation Learning loss (ICCV 2025): drop-in for the criterion.

    Usage (three lines in the user's loop)::

        criterion = ARLLoss(nn.CrossEntropyLoss(), head=model.fusion_head)
        loss = criterion(fused_logits, target, features={"audio": a, "visual": v})
        loss.backward()

    The returned loss is ``criterion(z, y) + gamma * sum_m criterion(z_m, y)`` with ``z_m`` the
    unimodal logits from the shared head (:func:`~imbalance_losses.unimodal_logits`) or passed as
    ``unimodal_logits=``. In training mode, after ``warmup_steps`` steps, the gradient flowing
    into each modality's features is multiplied by ``1 + beta_m`` (see :func:`arl_coefficients`).

    Two ways to apply the re-weighting:

    * **hooks (default)**: a gradient hook on each tensor of ``features`` (the very tensors your
      model fused) scales the gradient of *every* loss term reaching that modality's encoder,
      the fused loss included, by ``1 + beta_m`` computed from *this* forward call. The shared
      head is not touched. Each training-mode ``forward`` is one step.
    * **encoders** (exact gradient accumulation): pass ``encoders={"audio": model.audio_net,
      ...}`` and call :meth:`step` after the last ``backward`` of an optimiser step (before
      ``optimizer.step()``). ``forward`` then only accumulates statistics; :meth:`step` pools
      them over the micro-batches (and ranks), computes one ``beta`` and multiplies each
      encoder's ``.grad`` by ``1 + beta_m`` once. Since encoder m reaches the loss only through
      ``x_m``, this equals the hook on one batch made of all the micro-batches.

    Args:
        criterion: base loss ``(logits, target) -> Tensor``; default ``nn.CrossEntropyLoss()``.
            Its reduction is kept: with ``reduction="none"`` ARL returns the per-sample sum
            ``criterion(z, y)_b + gamma * sum_m criterion(z_m, y)_b`` (shape ``[B]``).
        head: the model's fusion head, used to compute unimodal logits from ``features`` (not
            registered as a submodule: ARLLoss owns no parameters and no copy of the head).
        gamma: weight of the unimodal (bias) loss terms, ``>= 0``.
        temperature: ``T >= 0`` of the coefficient softmax.
        warmup_steps: number of steps (training-mode forwards; :meth:`step` calls with
            ``encoders``) before the re-weighting starts.
        floor: lower bound of the normalised variance, in ``(0, 1/M]``; default ``0.6 / M``
            (the official 0.3 for two modalities).
        momentum: optional EMA momentum in ``[0, 1)`` on ``V`` and ``c``:
            ``ema = momentum * ema + (1 - momentum) * batch`` (the first step takes the batch).
        encoders: optional ``{modality: module or parameters}`` for the :meth:`step` mode.
        process_group: group to pool statistics over under ``torch.distributed`` (default: the
            world).
    """

    def __init__(
        self,
        criterion: Criterion | None = None,
        *,
        head: Head | None = None,
        gamma: float = 1.0,
        temperature: float = 8.0,
        warmup_steps: int = 0,
        floor: float | None = None,
        momentum: float | None = None,
        encoders: Mapping[str, EncoderSpec] | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if floor is not None and not 0.0 < floor <= 0.5:
            raise ValueError(f"floor must be in (0, 1/M] (at most 0.5), got {floor}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.criterion: Criterion = nn.CrossEntropyLoss() if criterion is None else criterion
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.warmup_steps = warmup_steps
        self.floor = floor
        self.momentum = momentum
        self.process_group = process_group
        # Not registered as submodules: the user's model owns them (no parameters here).
        self.__dict__["_head"] = head
        self._encoder_params = [] if encoders is None else self._check_encoders(encoders, head)
        self.__dict__["_encoders"] = None
        if encoders is not None:  # modules as given; parameter iterables (maybe one-shot) as lists
            self.__dict__["_encoders"] = {
                m: e
                if isinstance(e, nn.Module)
                else [p for i, _, p in self._encoder_params if i == k]
                for k, (m, e) in enumerate(encoders.items())
            }
        self._steps = 0
        self._ema: Tensor | None = None  # [2M]: cat(V, c)
        self._pending = RunningSums()  # encoders mode: sums over the micro-batches
        self._modalities: tuple[str, ...] | None = None
        self.last: ARLRecord | None = None

    # -- construction helpers -------------------------------------------------------------

    @staticmethod
    def _check_encoders(
        encoders: Mapping[str, EncoderSpec], head: Head | None
    ) -> list[ModalityParameter]:
        params = modality_parameters(encoders, what="encoders")
        if isinstance(head, nn.Module):
            listed = {id(p) for _, _, p in params}
            shared = [tuple(p.shape) for p in head.parameters() if id(p) in listed]
            if shared:
                raise ValueError(
                    f"the fusion head's parameters {shared} are listed in encoders; ARL must not "
                    "re-weight the shared head"
                )
        return params

    @property
    def head(self) -> Head | None:
        """The fusion head used to compute unimodal logits (``None`` if not given)."""
        head: Head | None = self.__dict__["_head"]
        return head

    @property
    def encoders(self) -> dict[str, EncoderSpec] | None:
        """The encoders re-weighted by :meth:`step` (``None`` in hook mode)."""
        enc: dict[str, EncoderSpec] | None = self.__dict__["_encoders"]
        return enc

    @property
    def steps(self) -> int:
        """Training steps taken so far (training-mode forwards, or :meth:`step` calls)."""
        return self._steps

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        features: Mapping[str, Tensor] | None = None,
        *,
        unimodal_logits: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``criterion(z, y) + gamma * sum_m criterion(z_m, y)``, re-weighting in training mode.

        Args:
            logits: fused logits ``z`` ``[B, C]`` (any float dtype).
            target: class indices ``[B]`` (or soft targets ``[B, C]`` if the criterion takes
                them).
            features: ``{modality: x_m}`` ``[B, D_m]``, the tensors the model fused, in
                concatenation order. Needed to compute unimodal logits with ``head`` and, in
                hook mode, to apply the re-weighting.
            unimodal_logits: precomputed ``{modality: z_m}`` ``[B, C]``; used instead of
                ``head`` when given.

        Returns:
            The loss, of the shape the criterion returns.

        Raises:
            ValueError: fewer than two modalities, mismatched modality keys or batch sizes,
                targets out of range, non-finite logits, no way to get unimodal logits, or (hook
                mode, training) no ``features`` to re-weight.
        """
        zs = self._unimodal(logits, target, features, unimodal_logits)
        names = tuple(zs)
        if self.encoders is not None:
            check_same_modalities(
                self.encoders, zs, expected_what="encoders", actual_what="unimodal logits"
            )
        self._floor(len(names))  # fail before any state changes
        if self.training and self.encoders is None and features is None:
            raise ValueError(
                "ARLLoss needs features= (the tensors the model fused) to re-weight their "
                "gradients in training mode, or encoders= with step(); only unimodal_logits "
                "were given"
            )
        if self._modalities is not None and self._modalities != names:
            raise ValueError(
                f"modalities {list(names)} differ from those of earlier steps "
                f"{list(self._modalities)}; keep the same modalities in the same order"
            )

        loss = self.criterion(logits, target)
        for z in zs.values():
            loss = loss + self.gamma * self.criterion(z, target)

        if not self.training:
            return loss  # evaluation: loss only, no statistics, no collectives, no state change
        self._modalities = names
        sums = self._batch_sums(zs)
        self._pending.add(sums, logits.shape[0])
        if self.encoders is not None:
            return loss  # encoders mode: step() decides once per optimiser step

        active = self._steps >= self.warmup_steps
        if active and features is not None and not any(x.requires_grad for x in features.values()):
            warnings.warn(
                "ARLLoss: no feature requires grad (frozen encoders or detached copies), so the "
                "re-weighting has no gradient to act on; pass the tensors the model fused",
                RuntimeWarning,
                stacklevel=4,
            )
        record = self._decide(names, active)
        if active:
            assert features is not None
            scale = 1.0 + record.coefficients
            for i, x in enumerate(features.values()):
                if x.requires_grad:
                    x.register_hook(_Scale(scale[i]))  # type: ignore[no-untyped-call]
        return loss

    def _unimodal(
        self,
        logits: Tensor,
        target: Tensor,
        features: Mapping[str, Tensor] | None,
        given: Mapping[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        check_logits(logits, name="logits")
        batch, classes = logits.shape
        if features is not None and check_modalities(features, what="features") != batch:
            first, x = next(iter(features.items()))
            raise ValueError(
                f"features[{first!r}] has batch {x.shape[0]} (shape {tuple(x.shape)}) but "
                f"the logits have batch {batch} (shape {tuple(logits.shape)})"
            )
        if given is not None:
            check_modalities(given, what="unimodal_logits")
            if features is not None:
                check_same_modalities(
                    features, given, expected_what="features", actual_what="unimodal_logits"
                )
            zs = dict(given)
        elif self.head is not None:
            if features is None:
                raise ValueError("ARLLoss was given a head but no features= to apply it to")
            zs = unimodal_logits(self.head, features)
        else:
            raise ValueError(
                "ARLLoss needs unimodal logits: construct it with head=model.fusion_head and "
                "pass features=, or pass unimodal_logits="
            )
        _, uni_classes = check_unimodal_logits(zs, batch=batch)
        if uni_classes != classes:
            raise ValueError(
                f"unimodal logits have {uni_classes} classes (shapes "
                f"{[tuple(z.shape) for z in zs.values()]}) but the fused logits have shape "
                f"{tuple(logits.shape)}; the class counts must match"
            )
        check_target(target, batch=batch, num_classes=classes)
        return zs

    @staticmethod
    def _batch_sums(zs: Mapping[str, Tensor]) -> Tensor:
        """``[2M]``: per-modality sums over the batch of the entropy and of ``sum_c |z_bc|``."""
        entropy = torch.stack([entropy_sum(z) for z in zs.values()])
        size = torch.stack([as_fp32(z).abs().sum() for z in zs.values()])
        return torch.cat([entropy, size])

    def _decide(self, names: tuple[str, ...], active: bool) -> ARLRecord:
        """Pool the pending sums (one all-reduce), update the EMA, compute beta, count a step."""
        # [2M] = cat(V, c), global means; a rank without samples joins with zeros (DDP)
        sums, count = self._pending.pooled_or_join(
            2 * len(names),
            self._encoder_params[0][2].device if self._encoder_params else torch.device("cpu"),
            self.process_group,
            message="step() called without a training-mode forward since the last step",
        )
        stats = sample_mean(sums, count)
        self._pending.reset()
        if self.momentum is not None and self._ema is not None:
            stats = torch.lerp(stats, self._ema.to(stats), self.momentum)
        if self.momentum is not None:
            self._ema = stats
        m = len(names)
        coef = arl_coefficients(stats[:m], stats[m:], self.temperature, self._floor(m))
        self._steps += 1
        self.last = ARLRecord(
            modalities=names,
            variances=stats[:m],
            target_dependence=coef.target_dependence,
            dependence=coef.dependence,
            scores=coef.scores,
            coefficients=coef.coefficients,
            active=active,
        )
        return self.last

    def _floor(self, m: int) -> float:
        """The floor for ``m`` modalities: ``0.6 / m`` by default; must be in ``(0, 1/m]``."""
        floor = 0.6 / m if self.floor is None else self.floor
        if floor > 1.0 / m:
            raise ValueError(
                f"floor must be in (0, 1/M] = (0, {1.0 / m:.4g}] for M = {m}, got {floor}"
            )
        return floor

    # -- encoders mode ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> ARLRecord:
        """Encoders mode: one coefficient per optimiser step, applied to the encoders' grads.

        Call after the last ``backward()`` of the step (after ``GradScaler.unscale_`` when you
        use one, before gradient clipping and ``optimizer.step()``). Pools the statistics of
        every training-mode ``forward`` since the previous call (one all-reduce under DDP),
        computes ``beta`` and, after warm-up, multiplies each encoder's ``.grad`` by
        ``1 + beta_m`` in place. Returns (and stores as ``last``) the record.
        """
        if self.encoders is None:
            raise RuntimeError(
                "step() is for the encoders mode: construct ARLLoss(..., encoders={...}); "
                "in the default mode the re-weighting is applied by gradient hooks"
            )
        names = self._modalities or tuple(self.encoders)
        active = self._steps >= self.warmup_steps
        record = self._decide(names, active)
        if active:
            grads, index = present_gradients(self._encoder_params)
            scale_gradients_(grads, index, 1.0 + record.coefficients)
        return record

    # -- state ------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Step count, EMA statistics and pending (accumulated) sums: part of ``state_dict()``."""
        return {
            "steps": self._steps,
            "ema": None if self._ema is None else self._ema.clone(),
            "pending": self._pending.state_dict(),
            "modalities": self._modalities,
            "last": None if self.last is None else dataclasses.asdict(self.last),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        self._steps = int(state["steps"])
        self._ema = state["ema"]
        self._pending.load_state_dict(dict(state["pending"]))
        self._modalities = None if state["modalities"] is None else tuple(state["modalities"])
        last = state["last"]
        self.last = (
            None if last is None else ARLRecord(**{**last, "modalities": tuple(last["modalities"])})
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, temperature={self.temperature}, warmup_steps="
            f"{self.warmup_steps}, floor={self.floor}, momentum={self.momentum}, "
            f"mode={'encoders' if self.encoders is not None else 'hooks'}"
        )


class _Scale:
    """Gradient hook ``g -> g * s`` with a fixed (detached, 0-dim) factor ``s = 1 + beta_m``."""

    def __init__(self, factor: Tensor) -> None:
        self.factor = factor.detach()

    def __call__(self, grad: Tensor) -> Tensor:
        return grad * self.factor.to(device=grad.device, dtype=grad.dtype)
