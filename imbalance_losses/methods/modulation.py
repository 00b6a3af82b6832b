"""On-the-fly gradient modulation: OGM and OGM-GE for any number of modalities.

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022;
Wei et al., "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024.

Each optimiser step, after ``backward()`` and before ``optimizer.step()``:

1. **Score** of modality ``m`` over the step's samples (every micro-batch, every rank)::

       s_m = sum_b softmax(z_m)[b, y_b]

   with ``z_m`` the unimodal logits from the shared head
   (:func:`~imbalance_losses.unimodal_logits`), computed in fp32 on detached tensors (one
   ``gather``), pooled over micro-batches with ``RunningSums`` and over ranks with one all-reduce.
2. **Discrepancy ratio** against the mean of the other modalities::

       rho_m = s_m / mean_{k != m} s_k        (two modalities: s_1 / s_2 and s_2 / s_1)

3. **Coefficient** (:func:`ogm_coefficients`), ``coefficient="paper"`` (the default; the paper's
   Eq. 10, continuous)::

       k_m = 1 - tanh(alpha * relu(rho_m - 1))

   or ``coefficient="code"`` (the official CVPR code since May 2022, discontinuous at 1)::

       k_m = 1 - tanh(alpha * rho_m)   if rho_m > 1   else 1

   For more than two modalities the code form uses the same one-vs-rest ratio: every modality
   whose score exceeds the mean of the others is damped.
4. **Modulation** of every selected parameter ``p`` of modality ``m``: ``g <- g * k_m``.
5. **GE** (``method="ogm_ge"``): ``g <- g * k_m + N(0, std(g)^2)``, ``std`` the unbiased standard
   deviation of the gradient *before* modulation (:func:`ge_noise_stds`), noise from the
   modulator's own generator::

       std(g)^2 = (sum_i g_i^2 - (sum_i g_i)^2 / n) / (n - 1)       (0 when n = 1)

   from one sum and one ``dot(g, g)`` per gradient (no temporary of a gradient's size).

Steps 1-2 are :class:`~imbalance_losses.core.scoring.ModalityScorer`, shared with OPM
(:class:`~imbalance_losses.methods.opm.ModalityPredictionModulator`): one measurement, two actions.
Steps 4-5 happen only inside the window ``start_step <= t < stop_step`` (``t`` counts calls to
:meth:`ModalityGradientModulator.step` that saw at least one sample on some rank); outside it
gradients are untouched. Each gradient is modulated at most once per backward (a second
``step()`` with no backward in between raises), a step with no sample on any rank is a no-op,
and a rank whose input fails validation makes every rank raise in the same call.

The modulator is a plain object, not an ``nn.Module``: it owns no parameter, and its state
(``state_dict()``: step counter, seed, GE generator, pending scores) travels beside the model, in
a trainer's callback state (docs/lightning.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.attachment import OptimizerAttachable
from ..core.distributed import ProcessGroup, all_reduce_sum, stream_seed
from ..core.gradients import inverse_sizes, local_shards, sum_and_square_sum
from ..core.params import (
    GradientMarks,
    ParameterSelection,
    SharedPolicy,
    modality_parameters,
    present_gradients,
    scale_gradients_,
    select_parameters,
)
from ..core.records import StepRecord
from ..core.scoring import Discrepancy, ModalityScorer, capped_ratio
from ..core.validation import check_state_keys, choice_param, int_param, real_param

__all__ = [
    "Discrepancy",
    "ModalityGradientModulator",
    "ModalityScorer",
    "ModulationRecord",
    "capped_ratio",
    "ge_noise_stds",
    "ogm_coefficients",
]

Method = Literal["ogm_ge", "ogm"]
Coefficient = Literal["paper", "code"]

_METHODS = ("ogm_ge", "ogm")
_COEFFICIENTS = ("paper", "code")
_SHARED_HINT = (
    "pass shared='exclude' to leave shared parameters unmodulated, or shared='<modality>' to "
    "modulate them with that modality's coefficient"
)
_STATE_KEYS = ("step", "seed", "generator", "pool")
_NOTHING_OBSERVED = (
    "ModalityGradientModulator.step() called with nothing observed: pass "
    "step(unimodal_logits, target) or call observe(...) on each micro-batch first"
)


# ------------------------------------------------------------------------------ formulas


def ogm_coefficients(ratios: Tensor, alpha: float, rule: str = "paper") -> Tensor:
    r"""Per-modality coefficients ``k_m`` from the ratios ``rho_m`` (same shape, same dtype).

    * ``"paper"``: $k_m = 1 - \tanh\big(\alpha \operatorname{relu}(\rho_m - 1)\big)$;
    * ``"code"``:  $k_m = 1 - \tanh(\alpha \rho_m)$ where $\rho_m > 1$, else $1$.

    ``1 - tanh(x)`` is evaluated as ``2 sigmoid(-2x)``, the same function, which keeps its
    relative precision where ``tanh(x)`` rounds to 1 (``x > 9`` in fp32): ``k`` stays positive
    up to ``x ~ 50`` (``k ~ 1e-43``) and underflows to 0 only beyond that. ``alpha = 0`` with an
    infinite ratio gives ``k = 1`` (the limit ``x = 0``, not ``0 * inf = NaN``). ``ValueError``
    for another ``rule``.

    Example:
        >>> import torch
        >>> from imbalance_losses import ogm_coefficients
        >>> rho = torch.tensor([1.96, 0.51])
        >>> ogm_coefficients(rho, alpha=1.0).round(decimals=4)      # 1 - tanh(0.96), 1
        tensor([0.2557, 1.0000])
        >>> ogm_coefficients(rho, alpha=1.0, rule="code").round(decimals=4)   # 1 - tanh(1.96)
        tensor([0.0389, 1.0000])
    """
    if rule not in _COEFFICIENTS:
        raise ValueError(f"rule must be one of {_COEFFICIENTS}, got {rule!r}")
    if rule == "paper":
        x = torch.nan_to_num(alpha * torch.relu(ratios - 1.0), nan=0.0, posinf=math.inf)
        return 2.0 * torch.sigmoid(-2.0 * x)
    x = torch.nan_to_num(alpha * ratios, nan=0.0, posinf=math.inf)
    damped = 2.0 * torch.sigmoid(-2.0 * x)
    return torch.where(ratios > 1.0, damped, torch.ones_like(ratios))


def _capped_coefficients(ratios: Tensor, alpha: float, rule: str) -> Tensor:
    """:func:`ogm_coefficients` of capped (finite) ratios, the same values in fewer ops: with
    a finite ratio and a finite ``alpha`` the argument is never NaN, so no ``nan_to_num``."""
    if rule == "paper":
        return 2.0 * torch.sigmoid(-2.0 * (alpha * torch.relu(ratios - 1.0)))
    damped = 2.0 * torch.sigmoid(-2.0 * (alpha * ratios))
    return damped.masked_fill(ratios <= 1.0, 1.0)


def ge_noise_stds(
    grads: Sequence[Tensor], inverse_counts: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    r"""Unbiased standard deviation of each of ``P >= 1`` gradients (OGM-GE's noise scale), ``[P]``.

    $$\sigma_p^2 = \frac{\sum_i g_i^2 - (\sum_i g_i)^2 / n_p}{n_p - 1}, \qquad
    \sigma_p = \sqrt{\max(\sigma_p^2, 0)} \quad (\sigma_p = 0 \text{ when } n_p = 1)$$

    The two sums are one reading pass each per gradient with no temporary, in place of a
    ``torch.std`` (Welford) per gradient; the ``[P]`` combination is one small vector
    expression in fp64. The one-pass formula loses relative precision as ``mean^2 / var``
    grows: against fp64, the std's relative error is below ``3e-5`` for ``|mean| <= 10 std`` and
    about ``2e-3`` at ``|mean| = 100 std`` (up to 2.4M elements), immaterial for a noise scale;
    an all-zero gradient gets exactly 0, a non-finite one a non-finite std (so it stays
    non-finite after the noise). ``inverse_counts``: ``(1 / n_p, 1 / (n_p - 1))`` on the result's
    device (default: built on the first gradient's device). Gradients sharded by FSDP2
    (``DTensor``): the two sums of each rank's shards are all-reduced over the mesh's group, so
    ``sigma_p`` is the whole gradient's.

    Example:
        >>> import torch
        >>> from imbalance_losses import ge_noise_stds
        >>> ge_noise_stds([torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0])])
        tensor([1.2910, 0.0000])
    """
    shards, group = local_shards(grads)
    if inverse_counts is None:
        inverse_counts = inverse_sizes([g.numel() for g in grads], shards[0].device)
    inv_n, inv_n1 = inverse_counts
    device, dtype = inv_n.device, inv_n.dtype
    sums = [t for g in shards for t in sum_and_square_sum(g)]  # [s1_0, s2_0, s1_1, ...]
    if all(t.dtype == sums[0].dtype and t.device == device for t in sums):
        both = torch.stack(sums).to(dtype).view(-1, 2)  # one cast for all
    else:  # mixed dtypes or devices: each moved on its own
        both = torch.stack([t.to(device=device, dtype=dtype) for t in sums]).view(-1, 2)
    if group is not None:  # FSDP2 shards: the sums over every shard (one all-reduce)
        both = all_reduce_sum(both, group)
    s1, s2 = both.unbind(1)
    var = torch.addcmul(s2, s1.square(), inv_n, value=-1.0) * inv_n1
    return var.clamp_min(0.0).sqrt().float()  # clamp_min keeps NaN (a non-finite gradient)


# ------------------------------------------------------------------------------ options


def _window(start_step: int, stop_step: int | None) -> tuple[int, int | None]:
    start_step = int_param("start_step", start_step, ge=0)
    if stop_step is not None:
        stop_step = int_param("stop_step", stop_step)
        if stop_step <= start_step:
            raise ValueError(
                f"stop_step ({stop_step}) must be greater than start_step ({start_step}) or None"
            )
    return start_step, stop_step


def _check_choices(method: str, coefficient: str, parameters: object) -> None:
    choice_param("method", method, _METHODS)
    choice_param("coefficient", coefficient, _COEFFICIENTS)
    if not (parameters in ("weights", "all") or callable(parameters)):
        raise ValueError(
            "parameters must be 'weights', 'all' or a predicate (name, param) -> bool, got "
            f"{parameters!r}"
        )


# ------------------------------------------------------------------------------ record


@dataclass(frozen=True)
class ModulationRecord(StepRecord):
    """What :meth:`ModalityGradientModulator.step` decided on its last call.

    Attributes:
        scores: ``[M]`` pooled scores ``s_m = sum_b softmax(z_m)[b, y_b]`` over every
            micro-batch and rank of the step (fp32).
        num_samples: scalar, the number of samples the scores were pooled over (samples whose
            target is ``ignore_index`` are not counted).
        ratios: ``[M]`` discrepancy ratios ``rho_m = min(s_m / mean_{k != m} s_k, max_ratio)``
            (``0 / 0 = 1``).
        coefficients: ``[M]`` the coefficients applied to the gradients: ``k_m`` inside the
            modulation window, ones outside it (gradients untouched).
        active: whether the gradients were modulated on this step (inside the window).
        step: index of the step this record describes (0 for the first call).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import ModalityGradientModulator
        >>> encoders = {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}
        >>> modulator = ModalityGradientModulator(encoders, alpha=1.0, method="ogm")
        >>> for p in [*encoders["audio"].parameters(), *encoders["visual"].parameters()]:
        ...     p.grad = torch.ones_like(p)                # as after loss.backward()
        >>> z = {"audio": torch.tensor([[4.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}
        >>> _ = modulator.step(z, torch.tensor([0]))   # audio is far more confident: it is damped
        >>> rec = modulator.last
        >>> rec.ratios.round(decimals=2), rec.coefficients.round(decimals=2)
        (tensor([1.9600, 0.5100]), tensor([0.2500, 1.0000]))
        >>> encoders["audio"].weight.grad[0, 0].item() == rec.coefficients[0].item()
        True
    """

    scores: Tensor
    num_samples: Tensor
    ratios: Tensor
    coefficients: Tensor
    active: bool
    step: int


# ------------------------------------------------------------------------------ the modulator


class ModalityGradientModulator(OptimizerAttachable):
    r"""OGM / OGM-GE: shrink the dominant modalities' encoder gradients, optionally add noise.

    $$s_m = \sum_b \operatorname{softmax}(z_m)_{b, y_b}, \qquad
    \rho_m = \frac{s_m}{\operatorname{mean}_{k \ne m} s_k}, \qquad
    k_m = 1 - \tanh\big(\alpha \operatorname{relu}(\rho_m - 1)\big)$$

    $$g \leftarrow k_m\, g \;\; \text{(OGM)}, \qquad
    g \leftarrow k_m\, g + \mathcal{N}\big(0, \operatorname{std}(g)^2\big) \;\; \text{(OGM-GE)}$$

    Three lines in an existing training loop::

        encoders = {"audio": model.audio_net, "visual": model.visual_net}
        modulator = ModalityGradientModulator(encoders, alpha=0.8)
        loss.backward()
        modulator.step(unimodal_logits(model.fusion_head, feats), target)  # before optimizer.step()
        optimizer.step()

    Under AMP: ``scaler.scale(loss).backward(); scaler.unscale_(optimizer);
    modulator.step(...); scaler.step(optimizer); scaler.update()``. A non-finite gradient (an
    fp16 overflow) stays non-finite, so the scaler still skips that step.

    Under gradient accumulation call :meth:`observe` on each micro-batch and :meth:`step` with no
    arguments once, before ``optimizer.step()``: one coefficient per optimiser step, from the
    scores pooled over every micro-batch.

    In a trainer (Lightning, the Hugging Face ``Trainer``, Accelerate) or any loop,
    ``modulator.attach(optimizer)`` runs :meth:`step` inside every real ``optimizer.step()``
    (after clipping and unscaling, never on a skipped step): keep :meth:`observe` per
    (micro-)batch and drop the ``step()`` line (see :meth:`attach`, docs/attaching.md).

    Each gradient is modulated at most once per backward: a :meth:`step` whose modulated
    gradients were all left unchanged since the previous step modulated them (no backward, no
    ``zero_grad`` in between) raises ``RuntimeError`` instead of scaling them by ``k^2``.

    **Empty steps and DDP.** A step whose pooled batch is empty on every rank (``B = 0``
    everywhere) is a no-op: the gradients, the step counter and :attr:`last` are left as they
    are and ones are returned. A rank with ``B = 0`` among ranks with samples calls ``step()``
    (no arguments) or ``step(empty_logits, empty_target)`` and applies the coefficients the
    others decided. If the input fails validation on one rank, that rank joins the step's
    all-reduce with a failure flag before raising its error, and every other rank raises
    ``RuntimeError`` in the same call (so no rank waits and the ranks' collectives stay
    paired). A step that raises discards the scores observed since the last step, on every
    rank.

    Args:
        modules: ordered mapping modality -> its encoder (an ``nn.Module``) or an iterable of its
            parameters; at least two modalities; same names and order as the unimodal logits.
        alpha: modulation strength ``alpha >= 0`` (0.8 for CREMA-D and 0.1 for VGGSound in the
            papers; it is per dataset). ``alpha = 0`` gives ``k = 1`` (OGM then changes nothing;
            OGM-GE still adds its noise).
        method: ``"ogm_ge"`` (default: modulation plus Gaussian noise) or ``"ogm"`` (modulation
            only).
        coefficient: ``"paper"`` (default, continuous: ``1 - tanh(alpha * relu(rho - 1))``, the
            paper's Eq. 10, so a tiny change of the scores never makes a jump in the step size)
            or ``"code"`` (the official code: ``1 - tanh(alpha * rho)`` where ``rho > 1``, else
            1; for more than two modalities, with the same one-vs-rest ``rho``).
        parameters: which parameters of each modality to modulate: ``"weights"`` (default,
            every parameter with ``dim >= 2``: conv and linear weights, not biases nor
            normalisation parameters), ``"all"``, or a predicate ``(name, param) -> bool``
            (``name`` is the name inside the module, ``""`` for a bare parameter).
        shared: what to do with a parameter that two or more modalities share (one backbone
            with modality-specific stems): ``"error"`` (default, a ``ValueError`` naming it and
            the modalities), ``"exclude"`` (never modulated), or a modality name (modulated
            with that modality's coefficient; that modality must list it).
        start_step: first step (0-based count of counted :meth:`step` calls) that modulates.
        stop_step: first step that no longer modulates (``None``: never stops).
        max_ratio: cap ``R > 1`` on the ratios ``rho_m`` (default 100): keeps ``k`` continuous
            in ``alpha`` and at least ``1 - tanh(alpha (R - 1))`` when a score underflows to 0.
        ignore_index: class-index targets equal to it are left out of the scores and the
            sample count (default ``-100``, as ``nn.CrossEntropyLoss``; ``None``: none).
        seed: seed of the modulator's own GE noise generator (the same on every rank).
        process_group: the group the scores are all-reduced over (default: the whole world;
            ignored when not distributed).

    Raises:
        ValueError: fewer than two modalities, a parameter shared between modalities with
            ``shared="error"``, a modality with no selected parameter, ``alpha`` negative or not
            finite, ``max_ratio <= 1``, an unknown ``method`` / ``coefficient`` / ``parameters``
            / ``shared``, or a window with ``start_step < 0`` or ``stop_step <= start_step``.
        TypeError: ``modules`` not a mapping, a modality given something other than a module
            or parameters (leaf tensors), or a numeric argument of the wrong type (``alpha`` not
            real, ``start_step=1.5``, a bool...).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from imbalance_losses import ModalityGradientModulator, unimodal_logits
        >>> _ = torch.manual_seed(0)
        >>> encoders = nn.ModuleDict({"audio": nn.Linear(5, 4), "visual": nn.Linear(7, 4)})
        >>> head = nn.Linear(8, 3)
        >>> modulator = ModalityGradientModulator(dict(encoders.items()), alpha=0.8, method="ogm")
        >>> x = {"audio": torch.randn(6, 5), "visual": torch.randn(6, 7)}
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> feats = {m: encoders[m](x[m]) for m in x}
        >>> loss = F.cross_entropy(head(torch.cat(list(feats.values()), 1)), target)
        >>> loss.backward()
        >>> k = modulator.step(unimodal_logits(head, feats), target)   # then optimizer.step()
        >>> tuple(k.shape), bool(((k > 0) & (k <= 1)).all()), bool((k == 1).any())
        ((2,), True, True)
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module | Iterable[Tensor]] | nn.ModuleDict,
        alpha: float,
        *,
        method: Method = "ogm_ge",
        coefficient: Coefficient = "paper",
        parameters: ParameterSelection = "weights",
        shared: SharedPolicy = "error",
        start_step: int = 0,
        stop_step: int | None = None,
        max_ratio: float = 100.0,
        ignore_index: int | None = -100,
        seed: int = 0,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.alpha = real_param("alpha", alpha, ge=0.0)
        self.max_ratio = real_param("max_ratio", max_ratio, gt=1.0)
        self.start_step, self.stop_step = _window(start_step, stop_step)
        self.ignore_index = (
            None if ignore_index is None else int_param("ignore_index", ignore_index)
        )
        self.seed = int_param("seed", seed)
        _check_choices(method, coefficient, parameters)
        every = modality_parameters(modules, shared=shared, hint=_SHARED_HINT)
        self._params = select_parameters(every, parameters, modules)
        self.modalities: tuple[str, ...] = tuple(modules)
        self.method: Method = method
        self.coefficient: Coefficient = coefficient
        self.shared = shared
        self.process_group = process_group
        self._scorer = ModalityScorer(
            self.modalities,
            max_ratio=self.max_ratio,
            ignore_index=self.ignore_index,
            process_group=process_group,
            owner="the modulator's",
        )
        self._restart(0, None)

    def _restart(self, step: int, generator_state: Tensor | None) -> None:
        """The run-time state at step ``step`` (a new modulator, a loaded state)."""
        self._step = step
        self._generator: torch.Generator | None = None  # made on first use, on the grads' device
        self._pending_generator_state = generator_state  # set into it then
        self._modulated = GradientMarks()  # the gradients the last modulation left
        self._modulated_step = -1
        # (present parameter positions, device) -> (modality index [P], 1/n [P], 1/(n-1) [P])
        self._layout: tuple[tuple[tuple[int, ...], torch.device], tuple[Tensor, ...]] | None = None
        self.last: ModulationRecord | None = None

    @property
    def step_count(self) -> int:
        """Number of counted :meth:`step` calls so far (the index of the next step).

        A step whose pooled batch was empty on every rank is not counted.
        """
        return self._step

    @property
    def modulated_parameters(self) -> list[tuple[str, Tensor]]:
        """``(modality, parameter)`` for every modulated parameter, in modality order."""
        return [(self.modalities[m], p) for m, _, p in self._params]

    def is_active(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) lies in ``[start_step, stop_step)``."""
        t = self._step if step is None else step
        return t >= self.start_step and (self.stop_step is None or t < self.stop_step)

    def observe(self, unimodal_logits: Mapping[str, Tensor], target: Tensor) -> None:
        """Add one (micro-)batch to the scores of the next :meth:`step`.

        ``s_m += sum_b softmax(z_m)[b, y_b]`` in fp32 on detached logits (one ``gather`` per
        modality, no loop over the batch); soft targets ``[B, C]`` use
        ``sum_c softmax(z_b)_c t_bc``. Samples whose target equals ``ignore_index`` add nothing
        to the scores nor to the sample count. An empty batch (``B = 0``) adds nothing.

        Args:
            unimodal_logits: mapping modality -> floating-point logits ``[B, C]``, the
                modulator's modalities in the same order (e.g. from
                :func:`~imbalance_losses.unimodal_logits`).
            target: class indices ``[B]`` (``ignore_index`` allowed) or soft targets ``[B, C]``.

        Raises:
            ValueError: modalities that differ from the modulator's, logits that are not
                ``[B, C]`` or differ in shape between modalities, batch-size mismatch, targets
                out of range, non-finite logits, a target on another device than the logits.
            TypeError: logits that are not floating point (integer logits), non-tensor input.
        """
        self._scorer.observe(unimodal_logits, target)

    def step(
        self, unimodal_logits: Mapping[str, Tensor] | None = None, target: Tensor | None = None
    ) -> Tensor:
        """Modulate the gradients for this optimiser step; return the coefficients ``[M]``.

        Observes ``(unimodal_logits, target)`` if given, pools the scores over micro-batches and
        ranks (one all-reduce), computes ``rho`` and ``k``, then, inside the window, rescales the
        selected gradients in place (``g <- g * k_m``), for OGM-GE plus ``N(0, std(g)^2)``
        noise per parameter. Parameters without a gradient are skipped, and so is a gradient
        left unchanged since the previous step modulated it. Empty steps and DDP: see the class.

        Returns:
            the coefficients applied (fp32, ``[M]``, mapping order): ``k_m`` inside the window,
            ones outside it or on an empty step. The full decision is in :attr:`last`.

        Raises:
            ValueError / TypeError: only one of ``unimodal_logits`` / ``target``, or bad input
                (see :meth:`observe`).
            RuntimeError: nothing observed since the last step (on every rank); the gradients
                already modulated and not recomputed since (no ``backward()`` in between); the
                input failed validation on another rank.
        """
        device = self._params[0][2].device
        with self._scorer.failing_together(device):
            if (unimodal_logits is None) != (target is None):
                raise ValueError("pass both unimodal_logits and target, or neither")
            if self.is_active():
                self._check_not_modulated_twice()
            if unimodal_logits is not None and target is not None:
                self.observe(unimodal_logits, target)
        found = self._scorer.decide(device, missing=_NOTHING_OBSERVED)  # one all-reduce
        if found is None:  # no sample on any rank: nothing to decide, nothing counted
            return torch.ones(len(self.modalities), device=device)
        return self._apply(found)

    def _apply(self, found: Discrepancy) -> Tensor:
        """Coefficients from the pooled ratios, the modulation (inside the window), the record."""
        k = _capped_coefficients(found.ratios, self.alpha, self.coefficient)
        active = self.is_active()
        if active:
            self._modulate(k)
        else:
            k = torch.ones_like(k)
        self.last = ModulationRecord(
            self.modalities, found.scores, found.num_samples, found.ratios, k, active, self._step
        )
        self._step += 1
        return k

    # -- each gradient once per backward -----------------------------------------------------

    def _check_not_modulated_twice(self) -> None:
        present = [p for _, _, p in self._params if p.grad is not None]
        if present and all(self._modulated.unchanged(p) for p in present):
            raise RuntimeError(
                "ModalityGradientModulator.step() called again on gradients it already "
                f"modulated (at step {self._modulated_step}) with no backward() in between: "
                "modulating them again would scale them by k^2 (and add the GE noise twice). "
                "Call step() once per optimiser step, after loss.backward() and before "
                "optimizer.step(); under gradient accumulation call observe(...) per "
                "micro-batch and step() once"
            )

    def _modulate(self, k: Tensor) -> None:
        """``g <- g * k_m`` (+ GE noise) on every present gradient not already modulated."""
        todo = self._modulated.fresh([p for _, _, p in self._params])  # positions
        grads, index = present_gradients(self._params[i] for i in todo)
        if not grads:
            warnings.warn(
                "ModalityGradientModulator.step(): no modulated parameter has a gradient, so "
                "nothing was modulated; call step() after loss.backward() and before "
                "optimizer.zero_grad()",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        if self.method == "ogm":
            scale_gradients_(grads, index, k)  # g <- g * k_m
        else:
            self._modulate_ge(grads, tuple(todo), index, k)
        # entries of skipped (unchanged) gradients stay: they are still modulated values
        self._modulated_step = self._step
        self._modulated.mark((self._params[i][2], g) for i, g in zip(todo, grads, strict=True))

    # -- GE ----------------------------------------------------------------------------------

    def _modulate_ge(
        self, grads: list[Tensor], positions: tuple[int, ...], index: list[int], k: Tensor
    ) -> None:
        """GE: ``g <- g * k_m + std(g) * z``, ``z ~ N(0, 1)`` from the modulator's generator.

        ``std`` (:func:`ge_noise_stds`) is taken before modulation. One draw of ``sum_p n_p``
        normals fills one fp32 buffer, split in parameter order into views (no copy); then two
        fused updates: ``_foreach_mul_`` by ``k_m`` and ``_foreach_addcmul_`` of ``z * std``.
        """
        shards, group = local_shards(grads)
        gen = self._get_generator(shards[0].device)
        device = gen.device
        modality, inv_n, inv_n1 = self._layout_for(grads, positions, index, device)
        stds = ge_noise_stds(grads, (inv_n, inv_n1))
        factors = k.detach().to(device=device, dtype=torch.float32)[modality]
        if group is not None:  # FSDP2: each rank draws for its own shards, from its own stream
            rank = dist.get_rank(group)
            gen = torch.Generator(device=device).manual_seed(
                stream_seed(self.seed, self._step, rank)
            )
            grads = shards
        numels = [g.numel() for g in grads]
        noise = torch.randn(sum(numels), generator=gen, device=device, dtype=torch.float32)
        noises = [
            z.view(g.shape) if g.device == device else z.view(g.shape).to(g.device)
            for z, g in zip(torch.split(noise, numels), grads, strict=True)
        ]
        if all(g.device == device for g in grads):
            scale, spread = list(factors.unbind()), list(stds.unbind())
        else:
            scale = [f.to(g.device) for f, g in zip(factors.unbind(), grads, strict=True)]
            spread = [s.to(g.device) for s, g in zip(stds.unbind(), grads, strict=True)]
        torch._foreach_mul_(grads, scale)
        torch._foreach_addcmul_(grads, noises, spread)

    def _layout_for(
        self,
        grads: list[Tensor],
        positions: tuple[int, ...],
        index: list[int],
        device: torch.device,
    ) -> tuple[Tensor, ...]:
        """Modality index, ``1/n`` and ``1/(n-1)`` per gradient, on ``device``: built once per
        set of present gradients (no host-to-device copy on later steps with the same set)."""
        key = (positions, device)
        if self._layout is None or self._layout[0] != key:
            modality = torch.tensor(index, dtype=torch.long, device=device)
            counts = inverse_sizes([g.numel() for g in grads], device)
            self._layout = (key, (modality, *counts))
        return self._layout[1]

    def _get_generator(self, device: torch.device) -> torch.Generator:
        """The GE generator, created on first use on the device of the gradients."""
        if self._generator is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if self._pending_generator_state is not None:
                try:
                    gen.set_state(self._pending_generator_state)
                except RuntimeError as err:
                    raise RuntimeError(
                        "the GE generator state loaded with load_state_dict() does not fit a "
                        f"generator on {device} (saved from another device type?)"
                    ) from err
                self._pending_generator_state = None
            self._generator = gen
        return self._generator

    # -- attachment and state ----------------------------------------------------------------

    def _before_optimizer_step(self) -> None:
        self.step()

    def _attached_parameters(self) -> list[tuple[str, Tensor]]:
        return self.modulated_parameters

    def state_dict(self) -> dict[str, Any]:
        """Step counter, GE generator state, and the scores observed but not yet stepped."""
        gen = self._generator
        return {
            "step": self._step,
            "seed": self.seed,
            "generator": self._pending_generator_state if gen is None else gen.get_state(),
            "pool": self._scorer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: the run continues exactly (same noise)."""
        check_state_keys(state, _STATE_KEYS, who="ModalityGradientModulator")
        gen_state = state["generator"]
        self._restart(int(state["step"]), None if gen_state is None else gen_state.clone())
        self.seed = int(state["seed"])
        self._scorer.load_state_dict(dict(state["pool"]))

    def __repr__(self) -> str:
        window = f"[{self.start_step}, {'inf' if self.stop_step is None else self.stop_step})"
        return (
            f"ModalityGradientModulator(modalities={list(self.modalities)}, alpha={self.alpha}, "
            f"method={self.method!r}, coefficient={self.coefficient!r}, window={window}, "
            f"parameters={len(self._params)})"
        )
