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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from ..core.branches import fused_and_unimodal_ce as _own_loss
from ..core.branches import fused_and_unimodal_loss as _arl_loss
from ..core.branches import unimodal_branches
from ..core.distributed import ProcessGroup
from ..core.hooks import scaling_hook, warn_if_frozen, warn_on_backward
from ..core.params import check_head_not_listed
from ..core.rebuilt import built_on, warn_rebuilt
from ..core.records import StepRecord
from ..core.remedy import EncoderSpec, Remedy
from ..core.running import Pooled
from ..core.stats import (
    Reduction,
    count_of,
    counted,
    ema_update,
    entropy_and_size_sums,
    reduce_loss,
)
from ..core.unimodal import Head
from ..core.validation import (
    _assert_on_device,
    check_finite,
    check_same_layout,
    check_same_modalities,
    criterion_reduction,
    feature_widths,
    real_param,
)

__all__ = [
    "ARLCoefficients",
    "ARLLoss",
    "ARLRecord",
    "arl_coefficients",
    "inverse_variance_weights",
]

Criterion = Callable[[Tensor, Tensor], Tensor]

_EVAL_BACKWARD = (
    "ARLLoss is in eval mode but a backward pass went through its loss: in eval mode it "
    "takes no step and re-weights nothing (the re-weighting silently stops). Forgot "
    "criterion.train() after a validation pass? Unless you registered it on your model "
    "(model.criterion = criterion), model.train() does not reach it: call "
    "criterion.train() too (and run validation under torch.no_grad()). Shown once per "
    "ARLLoss"
)
_NO_GRAD = (
    "ARLLoss is in training mode but gradients are disabled (torch.no_grad or "
    "inference_mode): nothing can be back-propagated, so this call is evaluated as in eval "
    "mode (the loss only: no step, no statistics); call criterion.eval() for evaluation"
)


def inverse_variance_weights(variances: Tensor) -> Tensor:
    r"""MSE-optimal late-fusion weights for independent, unbiased noise: ``a_m ∝ 1 / sigma_m^2``.

    $$a_m = \frac{1 / \sigma_m^2}{\sum_k 1 / \sigma_k^2}$$

    Minimising ``E[(sum_m a_m f_m - y)^2] = sum_m a_m^2 sigma_m^2`` subject to ``sum_m a_m = 1``
    (Lagrange: ``2 a_m sigma_m^2 = lambda``) gives::

        a_m = (1 / sigma_m^2) / sum_k (1 / sigma_k^2)

    so that ``a_1 / a_2 = sigma_2^2 / sigma_1^2``.

    Args:
        variances: ``[..., M]`` positive variances (the last dimension indexes modalities).

    Returns:
        Weights of the same shape, summing to 1 over the last dimension.

    Raises:
        TypeError: ``variances`` is not a tensor.
        ValueError: fewer than two modalities, or a variance that is not positive and finite
            (checked on the device: immediately on CPU, asynchronously on an accelerator).

    Example:
        >>> import torch
        >>> from imbalance_losses import inverse_variance_weights
        >>> inverse_variance_weights(torch.tensor([1.0, 3.0]))  # a_1 / a_2 = sigma_2^2 / sigma_1^2
        tensor([0.7500, 0.2500])
    """
    if not isinstance(variances, Tensor):
        raise TypeError(f"variances must be a Tensor, got {type(variances).__name__}")
    if variances.dim() < 1 or variances.shape[-1] < 2:
        raise ValueError(
            f"variances must have shape [..., M] with M >= 2, got {tuple(variances.shape)}"
        )
    v = variances.detach()
    _assert_on_device(
        (torch.isfinite(v) & (v > 0)).all(),
        f"variances of shape {tuple(variances.shape)} must be positive and finite",
    )
    inv = 1.0 / variances
    return inv / inv.sum(-1, keepdim=True)


class ARLCoefficients(NamedTuple):
    """What :func:`arl_coefficients` computes, each ``[M]`` in modality order.

    Example:
        >>> import torch
        >>> from imbalance_losses import arl_coefficients
        >>> same = torch.tensor([1.0, 1.0])
        >>> w, c, s, beta = arl_coefficients(same, same, temperature=8.0, floor=0.3)
        >>> beta                                     # equal variances and shares: no preference
        tensor([0.5000, 0.5000])
    """

    target_dependence: Tensor
    """``w_m = (1/h_m) / sum_k (1/h_k)``, ``h_m = max(V_m / sum_k V_k, floor)``."""
    dependence: Tensor
    """``ĉ_m = c_m / sum_k c_k``, the normalised current dependence."""
    scores: Tensor
    """``s_m = w_m * prod_{k != m} ĉ_k``."""
    coefficients: Tensor
    """``beta = softmax(T * s)``; the gradient into modality m is scaled by ``1 + beta_m``."""


def _normalise(values: Tensor) -> Tensor:
    """``v / sum(v)`` along the last dimension, or uniform ``1 / M`` where the sum is zero
    (never ``0 / 0``); ``[..., M]``, each row on its own (ARL's ``V`` and ``c`` in one pass)."""
    total = values.sum(-1, keepdim=True)
    empty = total <= 0  # = not (total > 0): the values are finite and >= 0
    ratio = values / total.masked_fill(empty, 1.0)
    return ratio.masked_fill(empty, 1.0 / values.shape[-1])


def _leave_one_out_product(values: Tensor) -> Tensor:
    """``prod_{k != m} v_k`` for each m, without dividing (exact when some ``v_k`` is 0)."""
    m = values.shape[0]
    if m == 2:  # the product of the one other value is that value
        return values.flip(0)
    eye = torch.eye(m, dtype=torch.bool, device=values.device)
    return torch.where(eye, torch.ones_like(values).expand(m, m), values.expand(m, m)).prod(1)


def _coefficients(vc: Tensor, temperature: float, floor: float) -> ARLCoefficients:
    """Spec steps 2-6 on validated, detached statistics ``[2, M]``, the rows ``V`` and ``c``
    (no checks: the hot path)."""
    shares = _normalise(vc)  # both rows in one pass
    h = shares[0].clamp_min(floor)  # step 2
    inv = h.reciprocal()  # = 1.0 / h
    target = inv / inv.sum()  # step 3
    current = shares[1]  # step 4
    scores = target * _leave_one_out_product(current)  # step 5
    # step 6, softmax(T s) written as softmax(T (s - max s)): the same value, and T (s - max s)
    # lies in [-inf, 0], so no finite temperature gives inf - inf = NaN; T is capped at the
    # dtype's largest value (fp32: 3.4e38) so that 0 * T is 0, not 0 * inf (the softmax is
    # already one-hot on the largest scores there)
    t = min(temperature, torch.finfo(scores.dtype).max)
    beta = torch.softmax(t * (scores - scores.max()), dim=0)
    return ARLCoefficients(target, current, scores, beta)


def arl_coefficients(
    variances: Tensor, dependence: Tensor, temperature: float, floor: float
) -> ARLCoefficients:
    r"""ARL's target dependence, scores and coefficients (spec steps 2-6), detached.

    $$h_m = \max\Big(\frac{V_m}{\sum_k V_k}, \mathrm{floor}\Big), \quad
    w_m = \frac{1 / h_m}{\sum_k 1 / h_k}, \quad \hat c_m = \frac{c_m}{\sum_k c_k}, \quad
    s_m = w_m \prod_{k \ne m} \hat c_k, \quad \beta = \operatorname{softmax}(T s)$$

    Args:
        variances: ``[M]`` variance estimates ``V_m >= 0`` (mean predictive entropy), finite.
        dependence: ``[M]`` current dependence ``c_m >= 0`` (mean L1 size of the unimodal
            logits), finite; normalised here, so an already normalised ``ĉ`` is accepted too.
        temperature: finite ``T >= 0``; ``T = 0`` gives uniform coefficients.
        floor: ``0 < floor <= 1 / M``, lower bound on the normalised variance ``h_m``.

    Returns:
        :class:`ARLCoefficients` ``(w, ĉ, s, beta)``, each ``[M]``::

            h_m = max(V_m / sum_k V_k, floor)     w_m = (1/h_m) / sum_k (1/h_k)
            ĉ_m = c_m / sum_k c_k                 s_m = w_m * prod_{k != m} ĉ_k
            beta = softmax(T * s)

        Unclamped (every ``V_m / sum V >= floor``) this gives exactly ``w_1 / w_2 = V_2 / V_1``.
        If every ``V_m`` is 0 (or every ``c_m``), the normalised vector is uniform.

    Raises:
        TypeError: ``temperature`` or ``floor`` not a real number, or a statistic not a tensor.
        ValueError: shapes other than two ``[M]`` vectors with ``M >= 2``, a negative or
            non-finite statistic (checked on the device), a non-finite or negative
            ``temperature``, or ``floor`` outside ``(0, 1/M]``.

    Example:
        >>> import torch
        >>> from imbalance_losses import arl_coefficients
        >>> variances = torch.tensor([0.6, 1.2])     # audio is the less noisy modality
        >>> dependence = torch.tensor([1.0, 1.0])    # the model leans on both equally
        >>> out = arl_coefficients(variances, dependence, temperature=8.0, floor=0.3)
        >>> out.target_dependence.round(decimals=4)  # w_1 / w_2 = V_2 / V_1
        tensor([0.6667, 0.3333])
        >>> out.coefficients.round(decimals=4)       # beta = softmax(T s): audio is pushed harder
        tensor([0.7914, 0.2086])
    """
    for name, t in (("variances", variances), ("dependence", dependence)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if variances.dim() != 1 or variances.shape[0] < 2:
        raise ValueError(f"variances must have shape [M] with M >= 2, got {tuple(variances.shape)}")
    if dependence.shape != variances.shape:
        raise ValueError(
            f"dependence has shape {tuple(dependence.shape)} but variances have shape "
            f"{tuple(variances.shape)}; both are one value per modality"
        )
    m = variances.shape[0]
    temperature = real_param("temperature", temperature, ge=0.0)
    floor = real_param(f"floor (for M = {m} modalities)", floor, gt=0.0, le=1.0 / m)
    v, c = variances.detach(), dependence.detach()
    for name, t in (("variances", v), ("dependence", c)):
        check_finite(t, name=name)
        _assert_on_device((t >= 0).all(), f"{name} must be >= 0, shape {tuple(t.shape)}")
    return _coefficients(torch.stack([v, c]), temperature, floor)


def _floor_for(floor: float | None, m: int) -> float:
    """The floor of ``h_m`` for ``m`` modalities: ``0.6 / m`` by default, in ``(0, 1/m]``."""
    floor = 0.6 / m if floor is None else floor
    if floor > 1.0 / m:
        raise ValueError(f"floor must be in (0, 1/M] = (0, {1.0 / m:.4g}] for M = {m}, got {floor}")
    return floor


@dataclass(frozen=True)
class ARLRecord(StepRecord):
    """What :class:`ARLLoss` decided on its last training step (each tensor ``[M]``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import ARLLoss
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(8, 3)
        >>> criterion = ARLLoss(head=head)
        >>> feats = {"audio": torch.randn(4, 4, requires_grad=True),
        ...          "visual": torch.randn(4, 4, requires_grad=True)}
        >>> logits = head(torch.cat(list(feats.values()), 1))
        >>> loss = criterion(logits, torch.tensor([0, 1, 2, 0]), feats)
        >>> rec = criterion.last
        >>> rec.modalities, rec.active, tuple(rec.coefficients.shape)
        (('audio', 'visual'), True, (2,))
        >>> sorted(rec.to_dict())[:3]              # floats for a logger
        ['active', 'coefficients/audio', 'coefficients/visual']
    """

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


class ARLLoss(Remedy[ARLRecord]):
    r"""Asymmetric Representation Learning loss (ICCV 2025): drop-in for the criterion.


    $$\mathcal{L} = \ell(z, y) + \gamma \sum_m \ell(z_m, y), \qquad
    \nabla_{x_m} \leftarrow (1 + \beta_m)\, \nabla_{x_m}, \qquad
    \beta = \operatorname{softmax}(T s)$$

    $$s_m = w_m \prod_{k \ne m} \hat c_k, \qquad
    w_m \propto \frac{1}{\max(V_m / \sum_k V_k,\ \mathrm{floor})}, \qquad
    \hat c_m = \frac{c_m}{\sum_k c_k}$$

    ($V_m$: mean predictive entropy of $z_m$; $c_m$: mean L1 size of $z_m$.)

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
      head is not touched. Each training-mode ``forward`` is one step; a second training-mode
      call on the same feature tensors before their backward (a logging call, then the real
      one) is the same step: it returns the loss and changes nothing (one factor, one step).
    * **encoders** (exact gradient accumulation): pass ``encoders={"audio": model.audio_net,
      ...}`` and call :meth:`step` after the last ``backward`` of an optimiser step (before
      ``optimizer.step()``). ``forward`` then only accumulates statistics; :meth:`step` pools
      them over the micro-batches (and ranks), computes one ``beta`` and multiplies each
      encoder's ``.grad`` by ``1 + beta_m`` once. Since encoder m reaches the loss only through
      ``x_m``, this equals the hook on one batch made of all the micro-batches. A second call
      on the same feature tensors before :meth:`step` returns the loss and adds nothing.

    A training-mode call with gradients disabled (``torch.no_grad()``, ``inference_mode``) cannot
    be a training step (nothing can be back-propagated): it warns and acts as evaluation.

    Build it **once, before the training loop**. It is not part of your model, so
    ``model.train()`` / ``model.eval()`` do not switch it: a backward pass through an eval-mode
    call (left in eval mode after validation: no step, no re-weighting) warns once. A new
    ``ARLLoss`` on a head whose earlier ``ARLLoss`` (still alive) has stepped warns at its first
    step when it has a warm-up or an EMA to restart (a criterion rebuilt every epoch). The
    mapping must keep the modalities of earlier training steps in the same order, each with its
    own width: a reordered mapping (also in eval mode) or tensors under each other's names
    (other widths) raise a ``ValueError``.

    Calling it, ``criterion(logits, target, features=None, *, unimodal_logits=None)``:

    * ``logits``: fused logits ``z`` ``[B, C]`` (floating point); ``target``: class indices
      ``[B]`` (values in ``[0, C)`` or the criterion's ``ignore_index``), or soft targets
      ``[B, C]`` if the criterion takes them.
    * ``features``: ``{modality: x_m}`` ``[B, D_m]``, the tensors the model fused, in
      concatenation order, floating point (of the head's dtype, or under ``torch.autocast``, on
      the head's device). Needed to compute unimodal logits with ``head`` and, in hook mode, to
      apply the re-weighting. ``unimodal_logits``: precomputed ``{modality: z_m}`` ``[B, C]``;
      used instead of ``head`` when given.
    * Returns a scalar for ``"mean"`` / ``"sum"``, ``[B]`` for ``"none"`` (a criterion of your
      own: what it returns). An **empty batch** (``B = 0``) gives a zero loss that is part of
      the graph (zero gradients, so ``backward`` and DDP work) and is no step: the step count,
      the EMA, the pending sums and ``last`` stay as they were. Under DDP in hook mode the empty
      rank still joins the step's all-reduce, and the step counts on every rank iff some rank
      had a sample.
    * Raises ``TypeError``: non-floating logits or features, features of another dtype than the
      head outside autocast, a mapping of the wrong type; ``ValueError``: fewer than two
      modalities, mismatched modality keys or batch sizes, targets out of range, non-finite
      logits, features on another device than the head, no way to get unimodal logits, (hook
      mode, training) no ``features`` to re-weight, or features of which some, not all, belong
      to a step whose backward has not run. Under DDP in hook mode every rank raises in the
      same call: the failing rank its own error, the others a ``RuntimeError`` saying another
      rank failed (so the ranks' collectives stay paired).

    Args:
        criterion: base loss ``(logits, target) -> Tensor``. Default: cross-entropy with
            ``ignore_index=-100`` and the given ``reduction``, computed per sample and reduced
            here (``"mean"`` divides by the number of samples whose target is not
            ``ignore_index``, and gives 0, not NaN, when there is none). A criterion of your own
            is called as it is, once on the fused and once on each unimodal logits; its
            ``ignore_index`` attribute (if any) is honoured by the target check and the
            statistics.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``: the per-sample
            ``l_b = criterion(z, y)_b + gamma * sum_m criterion(z_m, y)_b``). ``None``
            (default): ``"mean"`` for the default criterion, the criterion's own otherwise.
            With a criterion of your own it must agree with the criterion's ``reduction``
            attribute (ARL adds the criterion's outputs; it cannot re-reduce them), and it is
            refused for a criterion without one.
        head: the model's fusion head, used to compute unimodal logits from ``features`` (not
            registered as a submodule: ARLLoss owns no parameters and no copy of the head).
        gamma: weight of the unimodal (bias) loss terms, finite, ``>= 0``.
        temperature: finite ``T >= 0`` of the coefficient softmax.
        warmup_steps: integer ``>= 0``: number of steps (training-mode forwards; :meth:`step`
            calls with ``encoders``) before the re-weighting starts.
        floor: lower bound of the normalised variance, in ``(0, 1/M]``; default ``0.6 / M``
            (the official 0.3 for two modalities).
        momentum: optional EMA momentum in ``[0, 1)`` on ``V`` and ``c``:
            ``ema = momentum * ema + (1 - momentum) * batch`` (the first step takes the batch).
        encoders: optional ``{modality: module or parameters}`` for the :meth:`step` mode.
        process_group: group to pool statistics over under ``torch.distributed`` (default: the
            world).

    Raises:
        TypeError: a hyper-parameter of the wrong kind (``warmup_steps=2.5``, ``gamma="1"``).
        ValueError: a hyper-parameter that is NaN, infinite or out of range, an unknown
            ``reduction`` or one that conflicts with the criterion's, bad ``encoders``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import ARLLoss
        >>> _ = torch.manual_seed(0)
        >>> audio_net, visual_net, head = nn.Linear(5, 4), nn.Linear(7, 4), nn.Linear(8, 3)
        >>> criterion = ARLLoss(nn.CrossEntropyLoss(), head=head, gamma=1.0, temperature=8.0)
        >>> a, v = audio_net(torch.randn(6, 5)), visual_net(torch.randn(6, 7))
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> logits = head(torch.cat([a, v], dim=1))
        >>> loss = criterion(logits, target, features={"audio": a, "visual": v})
        >>> loss.backward()                 # encoder gradients scaled by 1 + beta_m
        >>> beta = criterion.last.coefficients
        >>> bool(torch.isclose(beta.sum(), torch.tensor(1.0))), criterion.steps
        (True, 1)
    """

    record_type = ARLRecord
    who = "ARLLoss"
    repeat_effect = "the loss only"
    nothing_pooled = "step() called without a training-mode forward since the last step"
    no_grad_warning = _NO_GRAD

    def __init__(
        self,
        criterion: Criterion | None = None,
        *,
        reduction: Reduction | None = None,
        head: Head | None = None,
        gamma: float = 1.0,
        temperature: float = 8.0,
        warmup_steps: int = 0,
        floor: float | None = None,
        momentum: float | None = None,
        encoders: Mapping[str, EncoderSpec] | nn.ModuleDict | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        gamma = real_param("gamma", gamma, ge=0.0)
        temperature = real_param("temperature", temperature, ge=0.0)
        floor = None if floor is None else real_param("floor", floor, gt=0.0, le=0.5)
        momentum = None if momentum is None else real_param("momentum", momentum, ge=0.0, lt=1.0)
        reduction = cast(
            "Reduction | None", criterion_reduction(criterion, reduction, who="ARLLoss")
        )
        super().__init__(warmup_steps=warmup_steps, encoders=encoders, process_group=process_group)
        self.gamma, self.temperature = gamma, temperature
        self.floor, self.momentum = floor, momentum
        self.reduction: Reduction | None = reduction
        self._own_criterion = criterion is None
        self.criterion: Criterion = (
            nn.CrossEntropyLoss(reduction=reduction or "mean") if criterion is None else criterion
        )
        ignore = getattr(self.criterion, "ignore_index", None)
        self.ignore_index = (
            ignore if isinstance(ignore, int) and not isinstance(ignore, bool) else None
        )
        # Not registered as submodules: the user's model owns them (no parameters here).
        self.__dict__["_head"] = head
        check_head_not_listed(
            self._encoder_params, head, self._encoder_names, who="ARL", action="re-weight"
        )
        self._ema: Tensor | None = None  # [2M]: cat(V, c)
        self._ema_seen: Tensor | None = None  # 0-dim bool: the EMA holds a sample
        self._widths: tuple[int, ...] | None = None  # the features' last dims at earlier steps
        self._warned_eval = False
        self._predecessor_steps = built_on(head, self)

    @property
    def head(self) -> Head | None:
        """The fusion head used to compute unimodal logits (``None`` if not given)."""
        return cast("Head | None", self.__dict__["_head"])

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        features: Mapping[str, Tensor] | None = None,
        *,
        unimodal_logits: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``criterion(z, y) + gamma * sum_m criterion(z_m, y)``; in training, one step
        (``features``: the tensors the model fused, in concatenation order; the class doc)."""
        training = self._training_call()
        hooks = not self.has_encoders
        given = features if features is not None or hooks else unimodal_logits
        repeat, mixed = self._classify(given) if training else (False, None)
        size = 2 * self._guess_size(unimodal_logits, features)
        device = logits.device if isinstance(logits, Tensor) else self._device()
        with self._validating(size, device, pools=training and hooks and not repeat):
            if mixed is not None:
                raise mixed
            zs, mask, loss, log_probs = self._checked_loss(
                logits, target, features, unimodal_logits, training
            )
        if not training:  # evaluation: no statistics, no collective
            warn_on_backward(loss, self, _EVAL_BACKWARD)
        if not training or repeat:  # (a repeat: the same step again, nothing new)
            return loss
        if self._predecessor_steps and not self._steps:
            self._warn_rebuilt()
        self._modalities, batch = tuple(zs), logits.shape[0]
        self._widths = feature_widths(features) or self._widths
        self._add(entropy_and_size_sums(zs, mask, log_probs), count_of(mask, batch), rows=batch)
        if not hooks:  # encoders mode: step() decides once per optimiser step
            self._remember((zs if features is None else features).values())
            return loss
        record = self._decide(self._modalities, device, 2 * len(zs))
        if record is not None and features is not None:
            self._hook(features, record, batch)
        return loss

    def _checked_loss(
        self,
        logits: Tensor,
        target: Tensor,
        features: Mapping[str, Tensor] | None,
        given: Mapping[str, Tensor] | None,
        training: bool,
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor, Tensor | None]:
        """One call's checks (inside :meth:`_validating`) and its loss: ``(z_m, mask, loss,
        log-probabilities of z_m or None)``."""
        zs = unimodal_branches(
            logits, target, features, given, head=self.head, ignore_index=self.ignore_index,
            who="ARLLoss",
        )  # fmt: skip
        names, hooks = tuple(zs), not self.has_encoders
        if not hooks:
            check_same_modalities(
                self._encoder_names, zs, expected_what="encoders", actual_what="unimodal logits"
            )
        _floor_for(self.floor, len(names))  # fail before any state changes
        if training and hooks and features is None:
            raise ValueError(
                "ARLLoss needs features= (the tensors the model fused) to re-weight their "
                "gradients in training mode, or encoders= with step(); only unimodal_logits "
                "were given"
            )
        check_same_layout(
            self._modalities, names, self._widths, feature_widths(features), training=training
        )
        mask = counted(target, self.ignore_index)
        if not self._own_criterion:  # as it is; B = 0: a zero in the graph, not its 0 / 0
            if logits.shape[0] == 0:
                zero = (logits.sum(-1) + sum(z.sum(-1) for z in zs.values())) * 0
                return zs, mask, zero if self.reduction == "none" else zero.sum(), None
            return zs, mask, _arl_loss(logits, target, zs, self.gamma, self.criterion), None
        ignore = -100 if self.ignore_index is None else self.ignore_index
        per, log_probs = _own_loss(logits, target, zs, self.gamma, ignore)  # reduced once
        return zs, mask, reduce_loss(per, cast(Reduction, self.reduction), mask), log_probs

    def _hook(self, features: Mapping[str, Tensor], record: ARLRecord, batch: int) -> None:
        """Hook mode: open the step on each feature that requires grad, and after the warm-up
        scale the gradient a backward brings it by ``1 + beta_m`` (one hook per tensor)."""
        if record.active and batch > 0:
            warn_if_frozen(features, "ARLLoss", "re-weighting")
        scale = 1.0 + record.coefficients if record.active else None
        for i, x in enumerate(features.values()):
            if x.requires_grad:
                self._open.add_until_backward(x, None if scale is None else scaling_hook(scale[i]))

    def _warn_rebuilt(self) -> None:
        """First step of an ARLLoss built on a head whose earlier ARLLoss had already stepped."""
        steps, self._predecessor_steps = self._predecessor_steps, 0
        fresh = [f"a fresh warm-up of {self.warmup_steps} steps"] if self.warmup_steps else []
        fresh += [] if self.momentum is None else ["fresh EMA statistics"]
        warn_rebuilt("ARLLoss", "head", steps, fresh, stacklevel=5)

    def _formula(self, pooled: Pooled, names: tuple[str, ...], active: bool) -> ARLRecord:
        """Spec steps 2-6 from the pooled means ``cat(V, c)`` (their EMA with ``momentum``)."""
        stats, m = pooled.mean(), len(names)
        if self.momentum is not None:
            has = pooled.samples > 0  # every sample ignored on every rank: no statistics
            self._ema, self._ema_seen = ema_update(
                self._ema, self._ema_seen, stats, has, self.momentum
            )
            stats = self._ema
        coef = _coefficients(stats.reshape(2, m), self.temperature, _floor_for(self.floor, m))
        return ARLRecord(names, stats[:m], *coef, active=active)

    def _statistics_size(self, m: int) -> int:
        return 2 * m  # cat(V, c)

    def _gradient_factors(self, record: ARLRecord) -> Tensor:
        """Encoders mode (:meth:`step`): ``grad_m *= 1 + beta_m``."""
        return 1.0 + record.coefficients

    def _method_state(self) -> dict[str, Any]:
        return {
            "ema": None if self._ema is None else self._ema.clone(),
            "ema_seen": None if self._ema_seen is None else self._ema_seen.clone(),
            "widths": self._widths,
        }

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        self._ema = state["ema"]
        seen = state.get("ema_seen")  # older states: an EMA always held a sample
        if seen is None and self._ema is not None:
            seen = torch.ones((), dtype=torch.bool, device=self._ema.device)
        self._ema_seen = seen
        widths = state.get("widths")  # older states: not recorded
        self._widths = None if widths is None else tuple(int(w) for w in widths)
        self._predecessor_steps = 0  # a resumed (or deliberately reset) criterion

    def extra_repr(self) -> str:
        keys = "gamma temperature warmup_steps floor momentum reduction ignore_index".split()
        mode = "encoders" if self.has_encoders else "hooks"
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + f", mode={mode}"
