"""UMT and UME (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao; ICML 2023, arXiv 2305.01233).

Both start from ``M`` uni-modal models, one per modality, each trained alone with plain
cross-entropy (``M`` extra training runs before the multimodal one).

* **UME** (uni-modal ensemble): predict with the mean of the uni-modal models' outputs,
  ``z = (1/M) sum_m z_m`` (``mode="logits"``) or ``p = (1/M) sum_m softmax(z_m)``
  (``mode="probs"``): :func:`unimodal_ensemble`. No joint training at all.
* **UMT** (uni-modal teacher): train the multimodal late-fusion model from its own
  initialisation with the uni-modal models' encoders as frozen teachers::

      L = criterion(z, y) + sum_m s_m MSE(f_m^T, f_m)

  ``f_m`` the student's encoder output for modality ``m``, ``f_m^T`` the teacher's on the same
  input (eval mode, no gradient), MSE averaged over the batch and the feature elements
  (:func:`feature_distillation`), ``s_m = 10`` (BalanceBenchmark's default). The distillation
  reaches the encoders only; the head sees the criterion only.

No official code was found; the loss is BalanceBenchmark's ``UMTTrainer`` with its defects fixed
(teachers in eval mode, shapes checked). See ``docs/umt.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.attachment import OptimizerAttachable, OptimizerAttachment, unwrap_optimizer
from ..core.records import StepRecord
from ..core.validation import (
    check_features,
    check_finite,
    check_logits,
    check_modalities,
    check_same_modalities,
    check_target,
    check_unimodal_logits,
    int_param,
    real_param,
)

__all__ = ["UMTRecord", "UnimodalTeacherLoss", "feature_distillation", "unimodal_ensemble"]

Criterion = Callable[[Tensor, Tensor], Tensor]


def feature_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    r"""$$\mathrm{MSE}(f^T, f) = \frac{1}{n} \sum_i (f_i - f^T_i)^2$$ over all ``n`` elements.

    fp32 whatever the inputs' precision; the teacher is detached (no gradient reaches it); an
    empty batch gives 0 (not NaN). ``nn.MSELoss()`` with its default mean, as the official
    benchmark uses it.

    Args:
        student: ``f`` ``[B, ...]``, the student's feature (gradient kept).
        teacher: ``f^T`` of the same shape.

    Example:
        >>> import torch
        >>> from imbalance_losses import feature_distillation
        >>> feature_distillation(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))
        tensor(2.5000)
    """
    f, t = student.float(), teacher.detach().float()
    if f.numel() == 0:  # shape metadata: no host sync
        return f.sum()
    return F.mse_loss(f, t)


def unimodal_ensemble(
    logits: Mapping[str, Tensor], mode: Literal["logits", "probs"] = "logits"
) -> Tensor:
    r"""UME's prediction from the uni-modal models' logits ``{m: [B, C]}``.

    $$z = \frac{1}{M} \sum_m z_m \;\; \text{(logits)}, \qquad
    p = \frac{1}{M} \sum_m \operatorname{softmax}(z_m) \;\; \text{(probs)}$$

    ``"logits"`` (default) returns the mean logits in their dtype; ``"probs"`` the mean
    probabilities in fp32. Both rank the classes for ``argmax``; which one the paper used is not
    confirmed from its text (``docs/umt.md``).

    Raises:
        ValueError: fewer than two modalities, shapes that differ, non-finite logits, bad mode.

    Example:
        >>> import torch
        >>> from imbalance_losses import unimodal_ensemble
        >>> z = {"audio": torch.tensor([[2.0, 0.0]]), "visual": torch.tensor([[0.0, 4.0]])}
        >>> unimodal_ensemble(z)
        tensor([[1., 2.]])
        >>> unimodal_ensemble(z, mode="probs").sum(-1)
        tensor([1.])
    """
    if mode not in ("logits", "probs"):
        raise ValueError(f'mode must be "logits" or "probs", got {mode!r}')
    check_unimodal_logits(logits, what="logits")
    stacked = torch.stack(list(logits.values()))
    if mode == "probs":
        return torch.softmax(stacked.float(), -1).mean(0)
    return stacked.mean(0)


@dataclass(frozen=True)
class UMTRecord(StepRecord):
    """What :class:`UnimodalTeacherLoss` computed on its last training-mode call.

    Example:
        >>> import torch
        >>> from imbalance_losses import UMTRecord
        >>> rec = UMTRecord(("audio", "visual"), torch.tensor([0.5, 0.25]), True, 3)
        >>> rec.to_dict()
        {'distillation/audio': 0.5, 'distillation/visual': 0.25, 'active': 1.0, 'step': 3.0}
    """

    distillation: Tensor | None
    """``MSE(f_m^T, f_m)`` ``[M]`` on this rank's batch (fp32, detached); ``None`` when off."""
    active: bool
    """The distillation term was part of the loss (inside the window, some ``s_m > 0``)."""
    step: int
    """:attr:`UnimodalTeacherLoss.steps` at the call."""


def _call(module: nn.Module, x: Any) -> Any:
    """``module(**x)`` for a mapping, ``module(*x)`` for a tuple or list, else ``module(x)``."""
    if isinstance(x, Mapping):
        return module(**x)
    return module(*x) if isinstance(x, tuple | list) else module(x)


class UnimodalTeacherLoss(OptimizerAttachable, nn.Module):
    r"""UMT: the criterion plus the distillation of frozen uni-modal teachers' features.

    $$\mathcal{L} = \ell(z, y) + \sum_m s_m\, \mathrm{MSE}\big(f^T_m, A_m(f_m)\big)$$

    ($A_m$ the identity unless ``adapters`` gives one.) Usage::

        umt = UnimodalTeacherLoss({"audio": audio_teacher, "visual": visual_teacher})
        logits, feats = model(batch)                       # feats: the encoders' outputs
        loss = umt(logits, y, features=feats, inputs={"audio": a, "visual": v})

    **Teachers** are the uni-modal models' *encoders* (each returns the feature its student
    encoder is compared with), trained beforehand. They are held outside the module tree:
    not in ``parameters()`` (an optimiser built from ``umt.parameters()`` or the model never
    sees them) and not in ``state_dict()`` (save them with their own checkpoints); ``.to()``,
    ``.cuda()`` and ``.half()`` on this module move them too. Each forward runs them in eval
    mode under ``torch.no_grad()`` (``train()`` on this module, or a model that holds it, leaves
    them in eval), so their parameters and buffers (BatchNorm statistics) never change. Or pass
    precomputed ``teacher_features=`` (``teachers=None`` is allowed then).

    The term is on in training mode while ``start_step <= steps < stop_step`` (``steps``:
    optimiser steps, counted by :meth:`step` or ``attach(optimizer)``; the default window is
    always on and needs neither). Otherwise, and in eval mode, the loss is
    ``criterion(logits, target)`` and no teacher runs. No collective: the loss is a per-sample
    mean, so DDP's gradient average equals one process on the global batch.

    Args:
        teachers: ``{modality: encoder}`` in the features' order (M >= 2), or ``None``.
        criterion: the loss on the fused logits (default ``nn.CrossEntropyLoss()``).
        scaling: ``s >= 0``, or ``{modality: s_m}``; BalanceBenchmark's default 10.
        adapters: optional ``{modality: module}`` mapping the student's feature to the teacher's
            width (trainable: registered here, so ``umt.parameters()`` must reach the optimiser).
        start_step: first optimiser step with the term.
        stop_step: first step without it again (``None``: never).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import UnimodalTeacherLoss
        >>> _ = torch.manual_seed(0)
        >>> enc = {"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)}
        >>> teachers = {"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)}
        >>> head = nn.Linear(8, 2)
        >>> umt = UnimodalTeacherLoss(teachers, scaling=10.0)
        >>> x, y = {"a": torch.randn(6, 3), "b": torch.randn(6, 5)}, torch.tensor([0, 1] * 3)
        >>> feats = {m: e(x[m]) for m, e in enc.items()}
        >>> loss = umt(head(torch.cat(list(feats.values()), 1)), y, features=feats, inputs=x)
        >>> loss.backward()
        >>> umt.last.active, list(umt.parameters()), "a.weight" in str(umt.state_dict())
        (True, [], False)
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module] | None,
        criterion: Criterion | None = None,
        *,
        scaling: float | Mapping[str, float] = 10.0,
        adapters: Mapping[str, nn.Module] | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["_teachers"] = None if teachers is None else _teacher_dict(teachers)
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion must be a callable loss, got {type(criterion).__name__}")
        self.criterion: Criterion = nn.CrossEntropyLoss() if criterion is None else criterion
        self.scaling = _scaling(scaling)
        self.adapters = nn.ModuleDict(dict(adapters or {}))
        self.start_step = int_param("start_step", start_step, ge=0)
        self.stop_step = (
            None if stop_step is None else int_param("stop_step", stop_step, ge=self.start_step)
        )
        self._steps = 0
        self.last: UMTRecord | None = None
        self.train(self.training)

    @property
    def teachers(self) -> dict[str, nn.Module] | None:
        """The frozen teachers ``{modality: encoder}`` (not submodules of this module)."""
        teachers: dict[str, nn.Module] | None = self.__dict__["_teachers"]
        return teachers

    @property
    def steps(self) -> int:
        """Optimiser steps counted so far (:meth:`step`, or ``attach(optimizer)``)."""
        return self._steps

    @property
    def active(self) -> bool:
        """The distillation term is on at the next training-mode call."""
        window = self.start_step <= self._steps and (
            self.stop_step is None or self._steps < self.stop_step
        )
        scales = self.scaling.values() if isinstance(self.scaling, dict) else [self.scaling]
        return self.training and window and any(s > 0 for s in scales)

    def step(self) -> None:
        """Count one optimiser step (call after ``optimizer.step()``, or ``attach`` once)."""
        self._steps += 1

    def train(self, mode: bool = True) -> UnimodalTeacherLoss:
        """Set this module's mode; the teachers stay in eval mode whatever ``mode`` is."""
        super().train(mode)
        for teacher in (self.teachers or {}).values():
            teacher.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> UnimodalTeacherLoss:
        """``.to()`` / ``.cuda()`` / ``.half()``: the teachers move with this module."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for teacher in (self.teachers or {}).values():
            teacher._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return self

    @torch.no_grad()
    def teacher_features(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """``{m: f_m^T}``: each teacher on its modality's input, in eval mode, without gradient.

        ``inputs[m]`` is a tensor (``teacher(x)``), a tuple (``teacher(*x)``) or a mapping
        (``teacher(**x)``).
        """
        if self.teachers is None:
            raise RuntimeError(
                "built with teachers=None: pass teacher_features= instead of inputs="
            )
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a mapping modality -> input, got {type(inputs)}")
        check_same_modalities(self.teachers, inputs, expected_what="teachers", actual_what="inputs")
        out = {}
        for name, teacher in self.teachers.items():
            teacher.eval()  # also when a model holding it was put in train mode
            feature = _call(teacher, inputs[name])
            if not isinstance(feature, Tensor):
                raise TypeError(
                    f"teachers[{name!r}] returned {type(feature).__name__}; a teacher is the "
                    "uni-modal model's encoder, returning its feature tensor"
                )
            out[name] = feature
        return out

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        *,
        features: Mapping[str, Tensor],
        inputs: Mapping[str, Any] | None = None,
        teacher_features: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """``criterion(logits, target) + sum_m s_m MSE(f_m^T, A_m(f_m))`` (see the class doc).

        Args:
            logits: ``[B, C]`` fused logits.
            target: what the criterion takes (class indices ``[B]`` are checked).
            features: ``{m: f_m}`` the student's encoder outputs ``[B, ...]``, with gradient.
            inputs: ``{m: x_m}`` the teachers' inputs; or
            teacher_features: ``{m: f_m^T}`` precomputed (exactly one of the two when on).

        Raises:
            ValueError: mismatched modalities, batch sizes or shapes (named), non-finite values.
        """
        batch = self._check(logits, target, features)
        loss = self._criterion_loss(logits, target, batch)
        if not self.training:
            return loss
        if not self.active:
            self.last = UMTRecord(tuple(features), None, False, self._steps)
            return loss
        students = {
            n: self.adapters[n](f) if n in self.adapters else f for n, f in features.items()
        }
        taught = self._teacher_side(students, inputs, teacher_features)
        mse = torch.stack([feature_distillation(f, taught[n]) for n, f in students.items()])
        weighted = torch.stack([self._scale(n) * d for n, d in zip(students, mse, strict=True)])
        self.last = UMTRecord(tuple(features), mse.detach(), True, self._steps)
        return loss + weighted.sum().to(loss.dtype)

    def _criterion_loss(self, logits: Tensor, target: Tensor, batch: int) -> Tensor:
        """``criterion(logits, target)``; a scalar of no counted sample (``B = 0``, or every
        target ``ignore_index``) is 0 with zero gradients, not the criterion's ``0 / 0``: a DDP
        rank with an empty shard must not send NaN gradients to the others."""
        loss = self.criterion(logits, target)
        if loss.dim() != 0:
            return loss
        if not batch:
            return logits.sum() * 0.0
        ignore = getattr(self.criterion, "ignore_index", None)
        if ignore is None or not isinstance(target, Tensor) or target.is_floating_point():
            return loss
        return torch.where((target != ignore).any(), loss, 0.0)  # no host sync

    def _check(self, logits: Tensor, target: Tensor, features: Mapping[str, Tensor]) -> int:
        batch = check_modalities(features)
        if self.teachers is not None:
            check_same_modalities(
                self.teachers, features, expected_what="teachers", actual_what="features"
            )
        if isinstance(self.scaling, dict):
            check_same_modalities(
                self.scaling, features, expected_what="scaling", actual_what="features"
            )
        unknown = [m for m in self.adapters if m not in features]
        if unknown:
            raise ValueError(f"adapters {unknown} are not modalities of features {list(features)}")
        check_features(features, finite=True)
        check_logits(logits, name="logits", batch=batch)
        if isinstance(target, Tensor) and not target.is_floating_point():
            ignore = getattr(self.criterion, "ignore_index", None)
            check_target(target, batch=batch, num_classes=logits.shape[1], ignore_index=ignore)
        return batch

    def _teacher_side(
        self,
        students: Mapping[str, Tensor],
        inputs: Mapping[str, Any] | None,
        given: Mapping[str, Tensor] | None,
    ) -> Mapping[str, Tensor]:
        """The teachers' features (run on ``inputs``, or given), checked against ``students``."""
        if (inputs is None) == (given is None):
            raise ValueError(
                "UnimodalTeacherLoss needs exactly one of inputs= (the teachers run on them) "
                "and teacher_features= (precomputed)"
            )
        taught = given if given is not None else self.teacher_features(inputs or {})
        check_same_modalities(students, taught, expected_what="features", actual_what="teachers'")
        for name, t in taught.items():
            want = students[name]
            if t.shape != want.shape or t.device != want.device or not t.is_floating_point():
                via = f" (after adapters[{name!r}])" if name in self.adapters else ""
                raise ValueError(
                    f"teachers' features[{name!r}] have shape {tuple(t.shape)} ({t.dtype}, "
                    f"{t.device}) but the student's features[{name!r}]{via} have shape "
                    f"{tuple(want.shape)} ({want.device}); give adapters={{{name!r}: ...}} "
                    "mapping the student's width to the teacher's"
                )
            check_finite(t, name=f"teachers' features[{name!r}]")
        return taught

    def _scale(self, name: str) -> float:
        return self.scaling[name] if isinstance(self.scaling, dict) else self.scaling

    def attach(self, optimizer: object) -> OptimizerAttachment:
        """``optimizer.step()`` counts :attr:`steps` (see ``OptimizerAttachable.attach``).

        Raises:
            ValueError: the optimiser holds a teacher's parameter (it would be trained), or
                misses an adapter's.
        """
        held = {id(p) for g in unwrap_optimizer(optimizer).param_groups for p in g["params"]}
        for name, teacher in (self.teachers or {}).items():
            if any(id(p) in held for p in teacher.parameters()):
                raise ValueError(f"the optimizer holds parameters of teachers[{name!r}]")
        for name, adapter in self.adapters.items():
            if any(p.requires_grad and id(p) not in held for p in adapter.parameters()):
                raise ValueError(
                    f"the parameters of adapters[{name!r}] are not in the optimizer: add "
                    "umt.parameters() to it"
                )
        return super().attach(optimizer)

    def _before_optimizer_step(self) -> None:
        self.step()

    def _attached_parameters(self) -> list[tuple[str, Tensor]]:
        return []  # checked in attach (adapters); the step changes no gradient

    def get_extra_state(self) -> dict[str, Any]:
        """The step counter and the last record: part of ``state_dict()``."""
        last = None if self.last is None else dataclasses.asdict(self.last)
        return {"steps": self._steps, "last": last}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        self._steps, last = int(state["steps"]), state["last"]
        self.last = (
            None if last is None else UMTRecord(**{**last, "modalities": tuple(last["modalities"])})
        )

    def extra_repr(self) -> str:
        names = list(self.teachers or {})
        return (
            f"teachers={names}, scaling={self.scaling}, start_step={self.start_step}, "
            f"stop_step={self.stop_step}"
        )


def _teacher_dict(teachers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    if not isinstance(teachers, Mapping) or len(teachers) < 2:
        raise ValueError(f"teachers must map >= 2 modalities to encoders, got {teachers!r}")
    for name, teacher in teachers.items():
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teachers[{name!r}] must be an nn.Module, got {type(teacher)}")
    return dict(teachers)


def _scaling(scaling: float | Mapping[str, float]) -> float | dict[str, float]:
    if isinstance(scaling, Mapping):
        return {m: real_param(f"scaling[{m!r}]", s, ge=0) for m, s in scaling.items()}
    return real_param("scaling", scaling, ge=0)
