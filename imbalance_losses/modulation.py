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

3. **Coefficient**, ``coefficient="paper"`` (the default; the paper's Eq. 10, continuous)::

       k_m = 1 - tanh(alpha * relu(rho_m - 1))

   or ``coefficient="code"`` (the official CVPR code since May 2022, discontinuous at 1)::

       k_m = 1 - tanh(alpha * rho_m)   if rho_m > 1   else 1

   For more than two modalities the code form uses the same one-vs-rest ratio: every modality
   whose score exceeds the mean of the others is damped.
4. **Modulation** of every selected parameter ``p`` of modality ``m``: ``g <- g * k_m``.
5. **GE** (``method="ogm_ge"``): ``g <- g * k_m + N(0, std(g)^2)``, ``std`` the unbiased standard
   deviation of the gradient *before* modulation, noise from the modulator's own generator.

Steps 4-5 happen only inside the window ``start_step <= t < stop_step`` (``t`` counts calls to
:meth:`ModalityGradientModulator.step`); outside it gradients are untouched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._distributed import ProcessGroup
from ._params import modality_parameters, present_gradients, scale_gradients_
from ._running import RunningSums
from ._stats import one_vs_rest_ratio, true_class_probability
from ._validation import check_same_modalities, check_target, check_unimodal_logits
from .diagnostics import StepRecord

__all__ = ["ModalityGradientModulator", "ModulationRecord"]

Method = Literal["ogm_ge", "ogm"]
Coefficient = Literal["paper", "code"]
ParameterSelection = Literal["weights", "all"] | Callable[[str, Tensor], bool]
"""``"weights"`` (every parameter with ``dim >= 2``), ``"all"``, or ``(name, param) -> bool``."""

_METHODS = ("ogm_ge", "ogm")
_COEFFICIENTS = ("paper", "code")


@dataclass(frozen=True)
class ModulationRecord(StepRecord):
    """What :meth:`ModalityGradientModulator.step` decided on its last call.

    Attributes:
        scores: ``[M]`` pooled scores ``s_m = sum_b softmax(z_m)[b, y_b]`` over every
            micro-batch and rank of the step (fp32).
        num_samples: scalar, the number of samples the scores were pooled over.
        ratios: ``[M]`` discrepancy ratios ``rho_m = s_m / mean_{k != m} s_k``.
        coefficients: ``[M]`` the coefficients applied to the gradients: ``k_m`` inside the
            modulation window, ones outside it (gradients untouched).
        active: whether the gradients were modulated on this step (inside the window).
        step: index of the step this record describes (0 for the first call).
    """

    scores: Tensor
    num_samples: Tensor
    ratios: Tensor
    coefficients: Tensor
    active: bool
    step: int


def _coefficients(ratios: Tensor, alpha: float, form: str) -> Tensor:
    """Per-modality coefficients ``k_m`` from the ratios ``rho_m`` (same shape, same dtype).

    ``1 - tanh(x)`` is evaluated as ``2 sigmoid(-2x)``, the same function, which keeps its
    relative precision where ``tanh(x)`` rounds to 1 (``x > 9`` in fp32): ``k`` stays positive
    up to ``x ~ 50`` (``k ~ 1e-43``) and underflows to 0 only beyond that.

    * ``"paper"``: ``k = 1 - tanh(alpha * relu(rho - 1))``
    * ``"code"``:  ``k = 1 - tanh(alpha * rho)`` where ``rho > 1``, else ``1``.
    """
    # alpha = 0 with an infinite ratio (another modality scored 0) would give 0 * inf = NaN;
    # the limit is x = 0 (no damping), so NaN is mapped to 0.
    if form == "paper":
        x = torch.nan_to_num(alpha * torch.relu(ratios - 1.0), nan=0.0, posinf=math.inf)
        return 2.0 * torch.sigmoid(-2.0 * x)
    x = torch.nan_to_num(alpha * ratios, nan=0.0, posinf=math.inf)
    damped = 2.0 * torch.sigmoid(-2.0 * x)
    return torch.where(ratios > 1.0, damped, torch.ones_like(ratios))


def _is_selected(selection: ParameterSelection, name: str, param: Tensor) -> bool:
    if selection == "weights":
        return param.dim() >= 2
    if selection == "all":
        return True
    assert callable(selection)
    return bool(selection(name, param))


class ModalityGradientModulator:
    """OGM / OGM-GE: shrink the dominant modalities' encoder gradients, optionally add noise.

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

    Args:
        modules: ordered mapping modality -> its encoder (an ``nn.Module``) or an iterable of its
            parameters; at least two modalities; same names and order as the unimodal logits.
            A parameter may belong to one modality only.
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
        start_step: first step (0-based count of :meth:`step` calls) that modulates.
        stop_step: first step that no longer modulates (``None``: never stops).
        seed: seed of the modulator's own GE noise generator (the same on every rank).
        process_group: the group the scores are all-reduced over (default: the whole world;
            ignored when not distributed).

    Raises:
        ValueError: fewer than two modalities, a parameter in two modalities, a modality with no
            selected parameter, ``alpha`` negative or not finite, an unknown ``method`` /
            ``coefficient`` / ``parameters``, or a window with ``stop_step <= start_step``.
        TypeError: ``modules`` not a mapping, or a modality given something other than a module
            or parameters (leaf tensors).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module | Iterable[Tensor]],
        alpha: float,
        *,
        method: Method = "ogm_ge",
        coefficient: Coefficient = "paper",
        parameters: ParameterSelection = "weights",
        start_step: int = 0,
        stop_step: int | None = None,
        seed: int = 0,
        process_group: ProcessGroup | None = None,
    ) -> None:
        if not isinstance(modules, Mapping):
            raise TypeError(
                "modules must be a mapping modality -> nn.Module or parameters (e.g. "
                f"{{'audio': model.audio_net, 'visual': model.visual_net}}), got "
                f"{type(modules).__name__}"
            )
        if len(modules) < 2:
            raise ValueError(f"modules needs at least two modalities, got {list(modules)}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if coefficient not in _COEFFICIENTS:
            raise ValueError(f"coefficient must be one of {_COEFFICIENTS}, got {coefficient!r}")
        if not (parameters in ("weights", "all") or callable(parameters)):
            raise ValueError(
                "parameters must be 'weights', 'all' or a predicate (name, param) -> bool, got "
                f"{parameters!r}"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if stop_step is not None and stop_step <= start_step:
            raise ValueError(
                f"stop_step ({stop_step}) must be greater than start_step ({start_step}) or None"
            )

        every = modality_parameters(modules)
        chosen = [(m, name, p) for m, name, p in every if _is_selected(parameters, name, p)]
        for m, modality in enumerate(modules):
            if not any(i == m for i, _, _ in chosen):
                total = sum(1 for i, _, _ in every if i == m)
                raise ValueError(
                    f"no parameter of modality {modality!r} is selected by parameters="
                    f"{parameters!r} ({total} parameter(s) in total); pass parameters='all' "
                    "or a predicate that selects its encoder's parameters"
                )

        self.modalities: tuple[str, ...] = tuple(modules)
        self.alpha = float(alpha)
        self.method: Method = method
        self.coefficient: Coefficient = coefficient
        self.start_step = int(start_step)
        self.stop_step = None if stop_step is None else int(stop_step)
        self.seed = int(seed)
        self.process_group = process_group
        self._params = chosen
        self._pool = RunningSums()
        self._step = 0
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self.last: ModulationRecord | None = None

    # ------------------------------------------------------------------ properties

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls so far (the index of the next step)."""
        return self._step

    @property
    def modulated_parameters(self) -> list[tuple[str, Tensor]]:
        """``(modality, parameter)`` for every modulated parameter, in modality order."""
        return [(self.modalities[m], p) for m, _, p in self._params]

    def is_active(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) lies in ``[start_step, stop_step)``."""
        t = self._step if step is None else step
        return t >= self.start_step and (self.stop_step is None or t < self.stop_step)

    # ------------------------------------------------------------------ scores

    def observe(self, unimodal_logits: Mapping[str, Tensor], target: Tensor) -> None:
        """Add one (micro-)batch to the scores of the next :meth:`step`.

        ``s_m += sum_b softmax(z_m)[b, y_b]`` in fp32 on detached logits (one ``gather`` per
        modality, no loop over the batch); soft targets ``[B, C]`` use
        ``sum_c softmax(z_b)_c t_bc``.

        Args:
            unimodal_logits: mapping modality -> logits ``[B, C]``, the modulator's modalities in
                the same order (e.g. from :func:`~imbalance_losses.unimodal_logits`).
            target: class indices ``[B]`` or soft targets ``[B, C]``.

        Raises:
            ValueError: modalities that differ from the modulator's, logits that are not
                ``[B, C]`` or differ in shape between modalities, batch-size mismatch, targets
                out of range, non-finite logits.
        """
        batch, classes = check_unimodal_logits(unimodal_logits)
        check_same_modalities(
            self.modalities,
            unimodal_logits,
            expected_what="the modulator's",
            actual_what="unimodal_logits",
        )
        check_target(target, batch=batch, num_classes=classes)
        scores = torch.stack(
            [true_class_probability(z, target).sum() for z in unimodal_logits.values()]
        )
        self._pool.add(scores, batch)

    # ------------------------------------------------------------------ the step

    def step(
        self,
        unimodal_logits: Mapping[str, Tensor] | None = None,
        target: Tensor | None = None,
    ) -> Tensor:
        """Modulate the gradients for this optimiser step; return the coefficients ``[M]``.

        Observes ``(unimodal_logits, target)`` if given, pools the scores over micro-batches and
        ranks (one all-reduce), computes ``rho`` and ``k``, then, inside the window, rescales the
        selected gradients in place (``g <- g * k_m``) and for OGM-GE adds
        ``N(0, std(g_before)^2)`` noise per parameter. Parameters without a gradient are
        skipped. The pool is reset and the step counter advances in every case.

        Returns:
            the coefficients applied (fp32, ``[M]``, mapping order): ``k_m`` inside the window,
            ones outside it. The full decision is in :attr:`last`.

        Raises:
            ValueError: only one of ``unimodal_logits`` / ``target`` given, or bad input (see
                :meth:`observe`).
            RuntimeError: nothing was observed since the last step.
        """
        if (unimodal_logits is None) != (target is None):
            raise ValueError("pass both unimodal_logits and target, or neither")
        if unimodal_logits is not None and target is not None:
            self.observe(unimodal_logits, target)
        scores, count = self._pool.pooled_or_join(  # one all-reduce
            len(self.modalities),
            self._params[0][2].device,
            self.process_group,
            message="ModalityGradientModulator.step() called with nothing observed: pass "
            "step(unimodal_logits, target) or call observe(...) on each micro-batch first",
        )
        ratios = one_vs_rest_ratio(scores)
        k = _coefficients(ratios, self.alpha, self.coefficient)
        active = self.is_active()
        if active:
            self._modulate(k)
        else:
            k = torch.ones_like(k)
        self.last = ModulationRecord(
            modalities=self.modalities,
            scores=scores,
            num_samples=count,
            ratios=ratios,
            coefficients=k,
            active=active,
            step=self._step,
        )
        self._pool.reset()
        self._step += 1
        return k

    def _modulate(self, k: Tensor) -> None:
        grads, index = present_gradients(self._params)  # parameters without a grad are skipped
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
            return
        # GE: g <- g * k_m + std(g) * z, z ~ N(0, 1) from the modulator's generator, std the
        # unbiased standard deviation of g before modulation (0 for a one-element parameter:
        # one value has no spread). A non-finite g gives a NaN std, so the gradient stays
        # non-finite (never replaced by finite noise) and a GradScaler skips the step.
        stds = [
            torch.std(g.float()).to(g.dtype) if g.numel() > 1 else g.new_zeros(()) for g in grads
        ]
        numels = [g.numel() for g in grads]
        gen = self._get_generator(grads[0].device)
        noise = torch.randn(sum(numels), generator=gen, device=gen.device, dtype=torch.float32)
        noises = [
            z.view(g.shape).to(device=g.device, dtype=g.dtype)
            for z, g in zip(torch.split(noise, numels), grads, strict=True)
        ]
        scale_gradients_(grads, index, k)
        torch._foreach_addcmul_(grads, noises, stds)

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

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Step counter, GE generator state, and the scores observed but not yet stepped."""
        if self._generator is not None:
            gen_state: Tensor | None = self._generator.get_state()
        else:
            gen_state = self._pending_generator_state
        return {
            "step": self._step,
            "seed": self.seed,
            "generator": gen_state,
            "pool": self._pool.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: the run continues exactly (same noise)."""
        missing = [key for key in ("step", "seed", "generator", "pool") if key not in state]
        if missing:
            raise KeyError(f"ModalityGradientModulator state is missing {missing}")
        self._step = int(state["step"])
        self.seed = int(state["seed"])
        gen_state = state["generator"]
        self._pending_generator_state = None if gen_state is None else gen_state.clone()
        self._generator = None
        self._pool.load_state_dict(dict(state["pool"]))
        self.last = None

    def __repr__(self) -> str:
        window = f"[{self.start_step}, {'inf' if self.stop_step is None else self.stop_step})"
        return (
            f"ModalityGradientModulator(modalities={list(self.modalities)}, alpha={self.alpha}, "
            f"method={self.method!r}, coefficient={self.coefficient!r}, window={window}, "
            f"parameters={len(self._params)})"
        )
