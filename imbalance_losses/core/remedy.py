"""The training-step lifecycle every per-step method shares, written once: :class:`Remedy`.

A method (AGM, ARL, OGM, ...) is a file of pure formula functions plus a thin subclass of
:class:`Remedy`. The base owns everything that is not the method's own math, in the order one
training step meets it:

1. **mode** (:meth:`Remedy._training_call`): a training step is a call in training mode with
   gradients enabled; a training-mode call under ``torch.no_grad`` warns and acts as
   evaluation (nothing counted, no collective);
2. **repeats** (:meth:`Remedy._repeated`): the same tensors passed again while their step is
   open (a logging call, then the real one) are the same step: the method returns its result
   and adds nothing; micro-batches of an accumulated step are new tensors, so they add. The
   step of a tensor closes when a backward reaches it (hook mode) or at :meth:`Remedy.step`
   (encoders mode);
3. **validation that fails on every rank together** (:meth:`Remedy._validating`): the input
   checks of a call that pools run inside ``RunningSums.failing_together``, so a rank whose
   input is bad joins the all-reduce with a failure flag and every rank raises in the same call;
4. **the same modalities, in the same order, at every step** (:meth:`Remedy._keep_modalities`);
5. **pooling over micro-batches and ranks** (:meth:`Remedy._add`, :meth:`Remedy._decide`): sums
   and a count per call, one all-reduce when the step decides; a step with no row on any rank
   is no step;
6. **warm-up and step counting**: ``active = steps >= warmup_steps``, counted once per decision;
7. **records**: ``last``, the method's :class:`~imbalance_losses.StepRecord`;
8. **the encoders mode** (:meth:`Remedy.step`): one decision per optimiser step, applied to the
   encoders' ``.grad`` (after ``GradScaler.unscale_``, before ``optimizer.step()``), and
   ``attach(optimizer)`` to run it inside every real optimiser step;
9. **state**: ``get_extra_state`` / ``set_extra_state`` carry the common fields (``steps``,
   ``pending``, ``modalities``, ``last``) plus the method's own (:meth:`Remedy._method_state`),
   so ``state_dict()`` resumes bit-exactly.

A subclass supplies :meth:`Remedy._formula` ``(pooled, names, active) -> record`` (its pure
functions do the math) and, when it needs them, :meth:`Remedy._act_on_gradients` (default:
``grad_m *= record.coefficients[m]``, one fused in-place op), :meth:`Remedy._method_state` /
:meth:`Remedy._load_method_state` and :meth:`Remedy._statistics_size`.

What the base does not own, and how it hooks in (``docs/core.md``): per-epoch actions
(prototypes, G-Blending's windows, a re-learning pass) are the method's own public methods,
called at the epoch boundary, pooling through the same ``RunningSums``; a method that owns the
data order provides a sampler; one that takes several optimiser steps per batch or a new
optimiser per stage is driven by its own ``train_step``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import Tensor, nn

from .attachment import OptimizerAttachable
from .distributed import ProcessGroup
from .params import ModalityParameter, modality_parameters, present_gradients, scale_gradients_
from .records import StepRecord
from .repeats import OpenTensors, repeated_call
from .running import Pooled, RunningSums
from .validation import (
    check_modalities,
    check_same_modalities,
    deferred_value_checks,
    int_param,
)

__all__ = ["EncoderSpec", "Remedy"]

R = TypeVar("R", bound=StepRecord)
T = TypeVar("T")

EncoderSpec = nn.Module | Iterable[nn.Parameter]
"""One modality's encoder for the encoders mode: a module or its parameters."""


class Remedy(OptimizerAttachable, nn.Module, Generic[R]):
    """Base of the per-step methods: the training-step lifecycle, once (see the module doc).

    Args:
        warmup_steps: integer ``>= 0``, decisions made before the method acts
            (``active = steps >= warmup_steps``).
        encoders: optional ``{modality: module or parameters}``: the encoders mode, where
            :meth:`step` applies one decision per optimiser step to their ``.grad``.
        process_group: the group statistics pool over under ``torch.distributed``.
    """

    record_type: ClassVar[type[StepRecord]] = StepRecord
    """The method's record class (rebuilt from ``state_dict()``)."""
    who: ClassVar[str] = "Remedy"
    """The method's name in messages."""
    repeat_effect: ClassVar[str] = "no statistics"
    """What a repeated call does, for the message of a mixed call."""
    no_grad_warning: ClassVar[str] = "{who}: gradients disabled in training mode: eval"
    """The warning of a training-mode call with gradients disabled (``{who}``: :attr:`who`)."""
    no_step: ClassVar[str | None] = None
    """A method that acts in its call only: the ``RuntimeError`` of ``step()`` and ``attach()``."""
    nothing_pooled: ClassVar[str] = "step() called without a training-mode call since the last step"
    """The ``RuntimeError`` of a decision with nothing added since the last one."""

    def __init__(
        self,
        *,
        warmup_steps: int = 0,
        encoders: Mapping[str, EncoderSpec] | nn.ModuleDict | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.warmup_steps = int_param("warmup_steps", warmup_steps, ge=0)
        self.process_group = process_group
        self._encoder_params: list[ModalityParameter] = (
            [] if encoders is None else modality_parameters(encoders, what="encoders")
        )
        self._encoder_names: tuple[str, ...] = () if encoders is None else tuple(encoders)
        self.has_encoders = encoders is not None
        given = dict(encoders or {})
        for k, (m, e) in enumerate(given.items()):
            if not isinstance(e, nn.Module):  # parameters (maybe a one-shot iterable): a list
                given[m] = [p for i, _, p in self._encoder_params if i == k]  # type: ignore[misc]
        self.__dict__["_encoders"] = None if encoders is None else given  # the user's: kept
        self._pool = RunningSums()
        self._steps = 0
        self._modalities: tuple[str, ...] | None = None
        self.last: R | None = None
        self._open = OpenTensors()  # the open step's tensors (repeat detection)

    @property
    def encoders(self) -> dict[str, EncoderSpec] | None:
        """The encoders :meth:`step` acts on (``None`` outside the encoders mode)."""
        return cast("dict[str, EncoderSpec] | None", self.__dict__["_encoders"])

    @property
    def steps(self) -> int:
        """Decisions made so far (steps with no sample on any rank are not counted)."""
        return self._steps

    # -- 1. mode ----------------------------------------------------------------------------

    def _training_call(self) -> bool:
        """Training mode with gradients enabled; warns when only the first holds."""
        if self.training and not torch.is_grad_enabled():
            warnings.warn(self.no_grad_warning.format(who=self.who), RuntimeWarning, 5)
        return self.training and torch.is_grad_enabled()

    # -- 2. repeats -------------------------------------------------------------------------

    def _repeated(self, tensors: object) -> bool:
        """Whether every tracked tensor of ``tensors`` belongs to the open step.

        Hook mode tracks the tensors that require grad (their backward closes the step),
        encoders mode every tensor (:meth:`step` closes it). ``ValueError`` for a mix.
        """
        hooks = not self.has_encoders
        return repeated_call(
            tensors,
            self._open.pending,
            grad_only=hooks,
            who=self.who,
            what="whose backward has not run" if hooks else "since the last step()",
            effect=self.repeat_effect,
        )

    def _classify(self, tensors: object) -> tuple[bool, ValueError | None]:
        """``(repeat, error)``: a mixed call's error is raised later, inside :meth:`_validating`."""
        try:
            return self._repeated(tensors), None
        except ValueError as err:
            return False, err

    def _remember(self, tensors: Iterable[Tensor]) -> None:
        """Open the step of these tensors (until their backward, or until :meth:`step`)."""
        for x in tensors:
            if self.has_encoders:
                self._open.add(x)
            elif x.requires_grad:
                self._open.add_until_backward(x)

    # -- 3.-4. validation -------------------------------------------------------------------

    @contextmanager
    def _validating(self, size: int, device: torch.device, *, pools: bool) -> Iterator[None]:
        """Run a call's input checks; ``pools``: this call all-reduces afterwards.

        The value checks made inside are combined into one fast check at the end of the block
        (:func:`~imbalance_losses.core.validation.deferred_value_checks`): put only checks and
        pure computations in it, no change of state.
        """
        with (
            self._pool.failing_together(size, device, self.process_group, due=pools),
            deferred_value_checks(),
        ):
            yield

    def _open_call(
        self, features: Mapping[str, Tensor], check: Callable[[int], T], *, pools: bool
    ) -> tuple[bool, T | None]:
        """Steps 2-4 for one training-mode call: ``(repeat, check's result)``.

        A repeat (the open step's tensors again) is checked for its mapping only and returns
        ``(True, None)``. Otherwise, inside :meth:`_validating` (``pools``: this call
        all-reduces): the mapping (:func:`~imbalance_losses.core.validation.check_modalities`),
        the encoders' names and order in encoders mode, ``check(batch)`` (the method's own
        checks, returning what it computed on the way) and the modalities of earlier steps;
        then the modalities are kept and the tensors open the step.
        """
        repeat, mixed = self._classify(features)
        if repeat:
            check_modalities(features)
            return True, None
        size = len(features) if isinstance(features, Mapping) and len(features) > 1 else 2
        first = next(iter(features.values()), None) if isinstance(features, Mapping) else None
        device = first.device if isinstance(first, Tensor) else torch.device("cpu")
        with self._validating(size, device, pools=pools):
            if mixed is not None:
                raise mixed
            batch = check_modalities(features)
            if self.has_encoders:  # step() acts on the encoders by position: same names, order
                check_same_modalities(
                    self._encoder_names, features, expected_what="encoders", actual_what="features"
                )
            out = check(batch)
            self._keep_modalities(tuple(features))
        self._modalities = tuple(features)
        self._remember(features.values())
        return False, out

    def _keep_modalities(self, names: tuple[str, ...]) -> None:
        """Raise when ``names`` differ from earlier steps' (call inside :meth:`_validating`)."""
        if self._modalities is not None and self._modalities != names:
            raise ValueError(
                f"modalities {list(names)} differ from those of earlier steps "
                f"{list(self._modalities)}; keep the same modalities in the same order"
            )

    # -- 5.-7. pool, decide, count, record --------------------------------------------------

    def _add(self, sums: Tensor, count: int | Tensor, rows: int) -> None:
        """Add one call's per-modality sums and sample count (stays on the device)."""
        self._pool.add(sums, count, rows=rows)

    def _decide(
        self, names: tuple[str, ...], device: torch.device, size: int | None = None
    ) -> R | None:
        """Pool (one all-reduce), run the method's formula, count the step, keep ``last``.

        ``None`` and no change when no rank added a row since the last decision.
        """
        size = len(names) if size is None else size
        pooled = self._pool.pool(size, device, self.process_group, missing=self.nothing_pooled)
        if pooled.empty:
            return None
        record = self._formula(pooled, names, self._steps >= self.warmup_steps)
        self._steps += 1
        self.last = record
        return record

    def _formula(self, pooled: Pooled, names: tuple[str, ...], active: bool) -> R:
        """The method's decision from the pooled sums (its pure functions do the math)."""
        raise NotImplementedError

    # -- 8. the encoders mode ---------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> R | None:
        """Encoders mode: pool every call since the last step, act on each encoder's ``.grad``.

        Call on every rank after the last ``backward`` (after ``GradScaler.unscale_``), before
        ``optimizer.step()``. ``None`` and no change when no rank had a sample.

        Raises:
            RuntimeError: not in encoders mode, or no training-mode call since the last step.
        """
        if self.no_step is not None:
            raise RuntimeError(self.no_step)
        if not self.has_encoders:
            raise RuntimeError(
                f"step() is for the encoders mode ({self.who}(..., encoders={{...}})); "
                f"without encoders {self.who} acts in its call"
            )
        names = self._modalities or self._encoder_names
        record = self._decide(names, self._device(), self._statistics_size(len(names)))
        self._open.reset()
        if record is not None and getattr(record, "active", True):
            self._act_on_gradients(record)
        return record

    def _statistics_size(self, m: int) -> int:
        """How many sums one call adds for ``m`` modalities (default ``m``)."""
        return m

    def _act_on_gradients(self, record: Any) -> None:
        """Default action: ``grad_m *= factor_m`` (:meth:`_gradient_factors`), one fused op."""
        grads, index = present_gradients(self._encoder_params)
        scale_gradients_(grads, index, self._gradient_factors(record))

    def _gradient_factors(self, record: Any) -> Tensor:
        """The factor of each modality's gradient (default ``record.coefficients``)."""
        return record.coefficients  # type: ignore[no-any-return]

    def _guess_size(self, *mappings: object) -> int:
        """``M`` for a failure all-reduce before the input is known to be good: earlier steps,
        the encoders, the first mapping of two or more modalities, else 2."""
        known = self._modalities or self._encoder_names
        sizes = [len(x) for x in mappings if isinstance(x, Mapping) and len(x) >= 2]
        return len(known) if known else next(iter(sizes), 2)

    def _device(self) -> torch.device:
        """Where statistics live when no tensor says: the encoders' device, else the CPU."""
        return self._encoder_params[0][2].device if self._encoder_params else torch.device("cpu")

    @property
    def attachable(self) -> bool:
        """Encoders mode only: without ``encoders=`` the method acts during backward."""
        return self.has_encoders

    def attach(self, optimizer: object) -> Any:
        """As :meth:`OptimizerAttachable.attach`; a method without a step raises ``no_step``."""
        if self.no_step is not None:
            raise RuntimeError(self.no_step)
        return super().attach(optimizer)

    def _before_optimizer_step(self) -> None:
        self.step()

    def _attached_parameters(self) -> list[tuple[str, Tensor]]:
        return [(self._encoder_names[m], p) for m, _, p in self._encoder_params]

    # -- 9. state ---------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Steps, pending sums, modalities, the last record and the method's own state."""
        return {
            "steps": self._steps,
            **self._method_state(),
            "pending": self._pool.state_dict(),
            "modalities": self._modalities,
            "last": None if self.last is None else dataclasses.asdict(self.last),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        self._steps = int(state["steps"])
        self._pool.load_state_dict(dict(state["pending"]))
        mods, last = state["modalities"], state["last"]
        self._modalities = None if mods is None else tuple(mods)
        self.last = (
            None
            if last is None
            else cast(R, self.record_type(**{**last, "modalities": tuple(last["modalities"])}))
        )
        self._load_method_state(state)

    def _method_state(self) -> dict[str, Any]:
        """The method's own entries of ``get_extra_state`` (default: none)."""
        return {}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        """Restore the method's own entries (default: nothing)."""
