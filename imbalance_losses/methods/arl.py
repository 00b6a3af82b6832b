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
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from ..core.attachment import OptimizerAttachable
from ..core.branches import unimodal_branches
from ..core.distributed import ProcessGroup
from ..core.hooks import warn_on_backward
from ..core.params import (
    ModalityParameter,
    check_head_not_listed,
    modality_parameters,
    present_gradients,
    scale_gradients_,
)
from ..core.records import StepRecord
from ..core.repeats import repeated_call
from ..core.running import RunningSums
from ..core.stats import REDUCTIONS, Reduction, as_fp32, counted, entropy_sum, reduce_loss
from ..core.unimodal import Head
from ..core.validation import (
    _assert_on_device,
    check_finite,
    check_same_modalities,
    int_param,
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
EncoderSpec = nn.Module | Iterable[nn.Parameter]
_NOTHING_POOLED = "step() called without a training-mode forward since the last step"

# head -> the latest ARLLoss built on it (weak both ways: nothing here outlives its head or loss),
# so that a criterion rebuilt inside the training loop can say that its warm-up restarted.
_BUILT_ON: MutableMapping[object, weakref.ref[ARLLoss]] = WeakIdKeyDictionary()


_EVAL_BACKWARD = (
    "ARLLoss is in eval mode but a backward pass went through its loss: in eval mode it "
    "takes no step and re-weights nothing (the re-weighting silently stops). Forgot "
    "criterion.train() after a validation pass? Unless you registered it on your model "
    "(model.criterion = criterion), model.train() does not reach it: call "
    "criterion.train() too (and run validation under torch.no_grad()). Shown once per "
    "ARLLoss"
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
    """``v / sum(v)``, or uniform ``1 / M`` when the sum is zero (never ``0 / 0``)."""
    total = values.sum()
    uniform = torch.full_like(values, 1.0 / values.shape[0])
    return torch.where(total > 0, values / torch.where(total > 0, total, 1.0), uniform)


def _leave_one_out_product(values: Tensor) -> Tensor:
    """``prod_{k != m} v_k`` for each m, without dividing (exact when some ``v_k`` is 0)."""
    m = values.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=values.device)
    return torch.where(eye, torch.ones_like(values).expand(m, m), values.expand(m, m)).prod(1)


def _coefficients(v: Tensor, c: Tensor, temperature: float, floor: float) -> ARLCoefficients:
    """Spec steps 2-6 on validated, detached ``[M]`` statistics (no checks: the hot path)."""
    h = _normalise(v).clamp_min(floor)  # step 2
    inv = 1.0 / h
    target = inv / inv.sum()  # step 3
    current = _normalise(c)  # step 4
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
    return _coefficients(v, c, temperature, floor)


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


class _Scale:
    """Gradient hook ``g -> g * s`` with a fixed (detached, 0-dim) factor ``s = 1 + beta_m``.

    With ``factor=None`` (warm-up) the gradient is left as it is. ``fired`` records that a
    backward pass reached the tensor, which ends the step the hook belongs to.
    """

    def __init__(self, factor: Tensor | None) -> None:
        self.factor = None if factor is None else factor.detach()
        self.fired = False

    def __call__(self, grad: Tensor) -> Tensor | None:
        self.fired = True
        if self.factor is None:
            return None
        return grad * self.factor.to(device=grad.device, dtype=grad.dtype)


_HookTable = MutableMapping[Tensor, tuple[_Scale, RemovableHandle]]


class ARLLoss(OptimizerAttachable, nn.Module):
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
        super().__init__()
        self.gamma = real_param("gamma", gamma, ge=0.0)
        self.temperature = real_param("temperature", temperature, ge=0.0)
        self.warmup_steps = int_param("warmup_steps", warmup_steps, ge=0)
        self.floor = None if floor is None else real_param("floor", floor, gt=0.0, le=0.5)
        self.momentum = (
            None if momentum is None else real_param("momentum", momentum, ge=0.0, lt=1.0)
        )
        self.reduction: Reduction | None = self._reduction(criterion, reduction)
        self._own_criterion = criterion is None
        self.criterion: Criterion = (
            nn.CrossEntropyLoss(reduction=self.reduction or "mean")
            if criterion is None
            else criterion
        )
        ignore = getattr(self.criterion, "ignore_index", None)
        self.ignore_index: int | None = (
            ignore if isinstance(ignore, int) and not isinstance(ignore, bool) else None
        )
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
        self._ema_seen: Tensor | None = None  # 0-dim bool: the EMA holds a sample
        self._pending = RunningSums()  # sums since the last decision (encoders: micro-batches)
        self._modalities: tuple[str, ...] | None = None
        self.last: ARLRecord | None = None
        self._hooks: _HookTable = WeakIdKeyDictionary()  # feature tensor -> its step's hook
        self._added: MutableMapping[Tensor, bool] = WeakIdKeyDictionary()  # encoders mode
        self._widths: tuple[int, ...] | None = None  # the features' last dims at earlier steps
        self._warned_eval = False
        self._predecessor_steps = self._register_head(head)

    def _register_head(self, head: object) -> int:
        """Steps taken by an earlier, still alive ARLLoss on the same head (0 if none).

        A criterion built inside the epoch loop replaces one that already stepped: its warm-up
        and statistics restart every epoch. Cheap and local: one weak entry per head.
        """
        if head is None:
            return 0
        try:
            ref = _BUILT_ON.get(head)
            _BUILT_ON[head] = weakref.ref(self)
        except TypeError:  # a head that cannot be weakly referenced (a plain dict of heads)
            return 0
        earlier = None if ref is None else ref()
        return 0 if earlier is None else earlier._steps

    # -- construction helpers -------------------------------------------------------------

    @staticmethod
    def _reduction(criterion: Criterion | None, reduction: object) -> Reduction | None:
        """The effective reduction: ``reduction`` checked against the criterion's own."""
        if reduction is not None and reduction not in REDUCTIONS:
            raise ValueError(f'reduction must be "mean", "sum", "none" or None, got {reduction!r}')
        if criterion is None:
            return "mean" if reduction is None else reduction
        own = getattr(criterion, "reduction", None)
        if own not in REDUCTIONS:
            if reduction is not None:
                raise ValueError(
                    f"reduction={reduction!r} was given with a criterion that has no "
                    "reduction attribute (" + type(criterion).__name__ + "); ARLLoss adds the "
                    "criterion's outputs as they are and cannot re-reduce them: reduce inside "
                    "your criterion and leave reduction=None"
                )
            return None
        if reduction is not None and reduction != own:
            raise ValueError(
                f"reduction={reduction!r} conflicts with the criterion's reduction={own!r}; "
                f"set it on the criterion (e.g. nn.CrossEntropyLoss(reduction={reduction!r})) "
                "or leave reduction=None"
            )
        return cast(Reduction, own)

    @staticmethod
    def _check_encoders(
        encoders: Mapping[str, EncoderSpec] | nn.ModuleDict, head: Head | None
    ) -> list[ModalityParameter]:
        params = modality_parameters(encoders, what="encoders")
        check_head_not_listed(params, head, tuple(encoders), who="ARL", action="re-weight")
        return params

    def __getstate__(self) -> dict[str, Any]:
        """Pickling / deepcopy: everything but the live hook table (tied to this graph) and the
        optimiser attachment."""
        state = super().__getstate__()
        state.pop("_hooks", None)
        state.pop("_added", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._hooks = WeakIdKeyDictionary()
        self._added = WeakIdKeyDictionary()
        self.__dict__.setdefault("_widths", None)
        self.__dict__.setdefault("_warned_eval", False)
        self.__dict__.setdefault("_predecessor_steps", 0)

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
        """Training steps taken so far (training-mode forwards, or :meth:`step` calls).

        Steps with no sample on any rank (``B = 0`` everywhere) are not counted.
        """
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
            logits: fused logits ``z`` ``[B, C]`` (floating point).
            target: class indices ``[B]`` (values in ``[0, C)`` or the criterion's
                ``ignore_index``), or soft targets ``[B, C]`` if the criterion takes them.
            features: ``{modality: x_m}`` ``[B, D_m]``, the tensors the model fused, in
                concatenation order, floating point (of the head's dtype, or under
                ``torch.autocast``, on the head's device). Needed to compute unimodal logits
                with ``head`` and, in hook mode, to apply the re-weighting.
            unimodal_logits: precomputed ``{modality: z_m}`` ``[B, C]``; used instead of
                ``head`` when given.

        Returns:
            A scalar for ``"mean"`` / ``"sum"``, ``[B]`` for ``"none"`` (a criterion of your
            own: what it returns). An **empty batch** (``B = 0``) gives a zero loss that is part
            of the graph (zero gradients, so ``backward`` and DDP work) and is no step: the step
            count, the EMA, the pending sums and ``last`` stay as they were. Under DDP in hook
            mode the empty rank still joins the step's all-reduce, and the step counts on every
            rank iff some rank had a sample.

        Raises:
            TypeError: non-floating logits or features, features of another dtype than the
                head outside autocast, a mapping of the wrong type.
            ValueError: fewer than two modalities, mismatched modality keys or batch sizes,
                targets out of range, non-finite logits, features on another device than the
                head, no way to get unimodal logits, (hook mode, training) no ``features`` to
                re-weight, or features of which some, not all, belong to a step whose backward
                has not run. Under DDP in hook mode every rank raises in the same call: the
                failing rank its own error, the others a ``RuntimeError`` saying another rank
                failed (so the ranks' collectives stay paired).
        """
        training = self.training
        if training and not torch.is_grad_enabled():
            warnings.warn(
                "ARLLoss is in training mode but gradients are disabled (torch.no_grad or "
                "inference_mode): nothing can be back-propagated, so this call is evaluated as "
                "in eval mode (the loss only: no step, no statistics); call criterion.eval() "
                "for evaluation",
                RuntimeWarning,
                stacklevel=4,
            )
            training = False
        hooks = self.encoders is None
        try:
            repeat, mixed = training and self._repeat(features, unimodal_logits), None
        except ValueError as err:
            repeat, mixed = False, err
        pools = training and hooks and not repeat  # this call all-reduces (hook mode)
        size = 2 * self._guess_modalities(features, unimodal_logits)
        device = logits.device if isinstance(logits, Tensor) else self._device()
        with self._pending.failing_together(size, device, self.process_group, due=pools):
            if mixed is not None:
                raise mixed
            zs, batch = self._unimodal(logits, target, features, unimodal_logits)
            names = tuple(zs)
            if self.encoders is not None:
                check_same_modalities(
                    self.encoders, zs, expected_what="encoders", actual_what="unimodal logits"
                )
            self._floor(len(names))  # fail before any state changes
            if training and hooks and features is None:
                raise ValueError(
                    "ARLLoss needs features= (the tensors the model fused) to re-weight their "
                    "gradients in training mode, or encoders= with step(); only unimodal_logits "
                    "were given"
                )
            self._check_order(names, features, training)
            mask = counted(target, self.ignore_index)
            loss = self._loss(logits, target, zs, batch, mask)

        if not training:  # evaluation: no statistics, no collective
            warn_on_backward(loss, self, _EVAL_BACKWARD)
            return loss
        if repeat:
            return loss  # a repeated call: the same step, nothing new
        if self._predecessor_steps and not self._steps:
            self._warn_rebuilt()
        self._modalities = names
        if features is not None:
            self._widths = tuple(x.shape[-1] for x in features.values())
        self._pending.add(
            self._batch_sums(zs, mask), batch if mask is None else mask.sum(), rows=batch
        )
        if not hooks:  # encoders mode: step() decides once per optimiser step
            source = features if features is not None else zs
            for x in source.values():
                self._added[x] = True
            return loss

        active = self._steps >= self.warmup_steps
        record = self._decide(names, active, device)
        if record is None:
            return loss  # no sample on any rank: no step
        assert features is not None
        if active and batch > 0 and not any(x.requires_grad for x in features.values()):
            warnings.warn(
                "ARLLoss: no feature requires grad (frozen encoders or detached copies), so the "
                "re-weighting has no gradient to act on; pass the tensors the model fused",
                RuntimeWarning,
                stacklevel=4,
            )
        scale = 1.0 + record.coefficients if active else None
        for i, x in enumerate(features.values()):
            if x.requires_grad:
                self._hook(x, None if scale is None else scale[i])
        return loss

    def _check_order(
        self, names: tuple[str, ...], features: Mapping[str, Tensor] | None, training: bool
    ) -> None:
        """Refuse a mapping whose order (or widths) differ from earlier training steps.

        The mapping order is the concatenation order: the head's weight is split by it. In
        training the modalities must be those of earlier steps in the same order; in evaluation
        too when they are the same modalities (a reordered mapping is split wrongly). With the
        same names in the same order, each modality's width (last dim) must be the one it had:
        a different one means the tensors were put under each other's names.
        """
        earlier = self._modalities
        if earlier is None:
            return
        if earlier != names and (training or sorted(earlier) == sorted(names)):
            raise ValueError(
                f"modalities {list(names)} differ from those of earlier steps "
                f"{list(earlier)}; keep the same modalities in the same order (the mapping order "
                "is the concatenation order)"
            )
        if earlier != names or features is None or self._widths is None:
            return
        widths = tuple(x.shape[-1] for x in features.values())
        if widths != self._widths:
            now = dict(zip(names, widths, strict=True))
            before = dict(zip(names, self._widths, strict=True))
            raise ValueError(
                f"the features' widths {now} differ from those of earlier steps {before}: the "
                "tensors are not under their own names (a mapping built in another order?); "
                "pass {name: that modality's tensor}, in the concatenation order"
            )

    def _warn_rebuilt(self) -> None:
        """First step of an ARLLoss built on a head whose earlier ARLLoss had already stepped."""
        steps, self._predecessor_steps = self._predecessor_steps, 0
        if self.warmup_steps == 0 and self.momentum is None:
            return  # nothing restarts that matters: the same coefficients as the earlier one
        fresh = []
        if self.warmup_steps:
            fresh.append(f"a fresh warm-up of {self.warmup_steps} steps")
        if self.momentum is not None:
            fresh.append("fresh EMA statistics")
        warnings.warn(
            f"ARLLoss: another ARLLoss on the same head had already taken {steps} training "
            f"steps when this one was built; this one starts from step 0, with "
            f"{' and '.join(fresh)}. Built inside the epoch loop, the re-weighting restarts "
            "every epoch (and never starts when an epoch is shorter than the warm-up): build the "
            "criterion once, before the training loop. For a deliberate fresh start on the same "
            "model, delete the old criterion first; to resume, load its state_dict()",
            RuntimeWarning,
            stacklevel=5,
        )

    def _repeat(self, features: object, given: object) -> bool:
        """Whether this call repeats one whose step is still open (same tensors again).

        Hook mode: every feature that requires grad carries this loss's hook and no backward
        pass has reached it yet. Encoders mode: every tensor of ``features`` (of
        ``unimodal_logits`` without features) was added since the last :meth:`step`. A
        ``ValueError`` when only some are (a mix of two calls).
        """
        hooks = self.encoders is None
        source = features if features is not None or hooks else given
        if hooks:
            pending = lambda x: (h := self._hooks.get(x)) is not None and not h[0].fired  # noqa: E731
        else:
            pending = lambda x: x in self._added  # noqa: E731
        what = "whose backward has not run" if hooks else "since the last step()"
        return repeated_call(
            source, pending, grad_only=hooks, who="ARLLoss", what=what, effect="the loss only"
        )

    def _hook(self, x: Tensor, factor: Tensor | None) -> None:
        """Register this step's hook on ``x``, replacing an earlier step's (one hook per tensor)."""
        old = self._hooks.get(x)
        if old is not None:
            old[1].remove()
        hook = _Scale(factor)
        handle: RemovableHandle = x.register_hook(hook)  # type: ignore[no-untyped-call]
        self._hooks[x] = (hook, handle)

    def _guess_modalities(self, features: object, given: object) -> int:
        """M for the failure all-reduce: earlier steps, the encoders, or the mappings."""
        if self._modalities is not None:
            return len(self._modalities)
        if self.encoders is not None:
            return len(self.encoders)
        for mapping in (given, features):
            if isinstance(mapping, Mapping) and len(mapping) >= 2:
                return len(mapping)
        return 2

    def _device(self) -> torch.device:
        """Where statistics live when no tensor says: the encoders' device, else the CPU."""
        return self._encoder_params[0][2].device if self._encoder_params else torch.device("cpu")

    def _unimodal(
        self,
        logits: Tensor,
        target: Tensor,
        features: Mapping[str, Tensor] | None,
        given: Mapping[str, Tensor] | None,
    ) -> tuple[dict[str, Tensor], int]:
        zs = unimodal_branches(
            logits,
            target,
            features,
            given,
            head=self.head,
            ignore_index=self.ignore_index,
            who="ARLLoss",
        )
        return zs, logits.shape[0]

    def _loss(
        self,
        logits: Tensor,
        target: Tensor,
        zs: Mapping[str, Tensor],
        batch: int,
        mask: Tensor | None,
    ) -> Tensor:
        """``l = criterion(z, y) + gamma * sum_m criterion(z_m, y)``, reduced (see ``__init__``)."""
        if self._own_criterion:
            ignore = -100 if self.ignore_index is None else self.ignore_index
            per = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore)
            for z in zs.values():
                per = per + self.gamma * F.cross_entropy(
                    z, target, reduction="none", ignore_index=ignore
                )
            return reduce_loss(per, cast(Reduction, self.reduction), mask)
        if batch == 0:  # zero, attached to the graph: a user criterion may give NaN (0 / 0)
            zero = logits.sum(-1) + sum(z.sum(-1) for z in zs.values())
            zero = zero * 0
            return zero if self.reduction == "none" else zero.sum()
        loss = self.criterion(logits, target)
        for z in zs.values():
            loss = loss + self.gamma * self.criterion(z, target)
        return loss

    @staticmethod
    def _batch_sums(zs: Mapping[str, Tensor], mask: Tensor | None) -> Tensor:
        """``[2M]``: per-modality sums over counted samples of the entropy and ``sum_c |z_bc|``."""
        weight = None if mask is None else mask.float()
        entropy = torch.stack([entropy_sum(z, weight) for z in zs.values()])
        size = [as_fp32(z).abs().sum(-1) for z in zs.values()]
        sizes = torch.stack([s.sum() if weight is None else (s * weight).sum() for s in size])
        return torch.cat([entropy, sizes])

    def _decide(
        self, names: tuple[str, ...], active: bool, device: torch.device
    ) -> ARLRecord | None:
        """Pool the pending sums (one all-reduce), update the EMA, compute beta, count a step.

        ``None`` (and nothing changes) when no rank had a sample since the last decision.
        """
        m = len(names)
        pooled = self._pending.pool(2 * m, device, self.process_group, missing=_NOTHING_POOLED)
        if pooled.empty:
            return None
        stats = pooled.mean()  # [2M] = cat(V, c), global means
        has = pooled.samples > 0  # every sample ignored on every rank: no statistics
        if self.momentum is not None:
            if self._ema is None or self._ema_seen is None:
                self._ema, self._ema_seen = stats, has
            else:
                ema = self._ema.to(stats)
                seen = self._ema_seen.to(stats.device)
                blended = torch.lerp(stats, ema, self.momentum * seen.to(stats.dtype))
                self._ema = torch.where(has, blended, ema)
                self._ema_seen = seen | has
            stats = self._ema
        coef = _coefficients(stats[:m], stats[m:], self.temperature, self._floor(m))
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
    def step(self) -> ARLRecord | None:
        """Encoders mode: one coefficient per optimiser step, applied to the encoders' grads.

        Call after the last ``backward()`` of the step (after ``GradScaler.unscale_`` when you
        use one, before gradient clipping and ``optimizer.step()``), on every rank. Pools the
        statistics of every training-mode ``forward`` since the previous call (one all-reduce
        under DDP), computes ``beta`` and, after warm-up, multiplies each encoder's ``.grad`` by
        ``1 + beta_m`` in place. Returns (and stores as ``last``) the record.

        Returns ``None`` and changes nothing (no step counted, no scaling, ``last`` kept) when
        the forwards since the last call had no sample on any rank (every batch had ``B = 0``).
        A rank without any forward joins the all-reduce with zeros.

        Raises:
            RuntimeError: not in encoders mode, or no training-mode forward since the last call
                (in one process, or on every rank).
        """
        if self.encoders is None:
            raise RuntimeError(
                "step() is for the encoders mode: construct ARLLoss(..., encoders={...}); "
                "in the default mode the re-weighting is applied by gradient hooks"
            )
        names = self._modalities or tuple(self.encoders)
        active = self._steps >= self.warmup_steps
        record = self._decide(names, active, self._device())
        self._added.clear()
        if record is not None and active:
            grads, index = present_gradients(self._encoder_params)
            scale_gradients_(grads, index, 1.0 + record.coefficients)
        return record

    @property
    def attachable(self) -> bool:
        """Encoders mode only: ``attach(optimizer)`` runs :meth:`step` in ``optimizer.step()``."""
        return self.encoders is not None

    def _before_optimizer_step(self) -> None:
        self.step()

    def _attached_parameters(self) -> list[tuple[str, Tensor]]:
        names = tuple(self.encoders or ())
        return [(names[m], p) for m, _, p in self._encoder_params]

    # -- state ------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Step count, EMA statistics and pending (accumulated) sums: part of ``state_dict()``."""
        return {
            "steps": self._steps,
            "ema": None if self._ema is None else self._ema.clone(),
            "ema_seen": None if self._ema_seen is None else self._ema_seen.clone(),
            "pending": self._pending.state_dict(),
            "modalities": self._modalities,
            "widths": self._widths,
            "last": None if self.last is None else dataclasses.asdict(self.last),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        self._steps = int(state["steps"])
        self._ema = state["ema"]
        seen = state.get("ema_seen")  # older states: an EMA always held a sample
        if seen is None and self._ema is not None:
            seen = torch.ones((), dtype=torch.bool, device=self._ema.device)
        self._ema_seen = seen
        self._pending.load_state_dict(dict(state["pending"]))
        self._modalities = None if state["modalities"] is None else tuple(state["modalities"])
        widths = state.get("widths")  # older states: not recorded
        self._widths = None if widths is None else tuple(int(w) for w in widths)
        self._predecessor_steps = 0  # a resumed (or deliberately reset) criterion
        last = state["last"]
        self.last = (
            None if last is None else ARLRecord(**{**last, "modalities": tuple(last["modalities"])})
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, temperature={self.temperature}, warmup_steps="
            f"{self.warmup_steps}, floor={self.floor}, momentum={self.momentum}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"mode={'encoders' if self.encoders is not None else 'hooks'}"
        )
