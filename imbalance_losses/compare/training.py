"""One training run of :func:`compare_remedies`: seeded build, the loop, the epoch on validation.

A run builds the model under ``torch.manual_seed(seed)`` (the same initial weights for a seed,
whatever the method), seeds the data order the same way, trains ``epochs`` epochs through the
method's :class:`~imbalance_losses.compare.plugins.Hooks`, scores the validation loader after
every epoch and keeps a copy of the state at the best epoch (validation accuracy, ties broken by
the lower validation cross-entropy). The test loader is never read here: :func:`score` reads it
once, for the run the protocol selected. The caller's global RNG state is restored afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.unimodal import Head, eval_mode, unimodal_logits
from ..diagnosis.report import imbalance_report, pooled_tokens
from .plugins import Config, Context, Features, Hooks, RemedyPlugin
from .result import RunRecord

__all__ = ["Outcome", "SelectedRun", "Spec", "diagnose", "score", "train_run"]

_NO_BATCH = object()

IGNORE_INDEX = -100
"""Targets equal to it count in no loss, accuracy or diagnosis (``F.cross_entropy``'s default)."""


@dataclass
class Spec:
    """The user's model and data, as :func:`compare_remedies` was given them."""

    build: Callable[[], nn.Module]
    forward: Callable[[nn.Module, Any], tuple[Mapping[str, Tensor], Tensor]]
    head: Callable[[nn.Module], Head]
    encoders: Callable[[nn.Module], Mapping[str, nn.Module] | nn.ModuleDict]
    train: Iterable[Any]
    val: Iterable[Any]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    epochs: int
    device: torch.device | None = None
    steps: int = 0  # optimiser steps per epoch, counted once
    train_eval: Iterable[Any] | None = None  # the training split read for evaluation passes
    trace: bool = False  # keep each step's record (Hooks.record) in RunRecord.trace
    teachers: dict[str, Callable[[Any], Tensor]] | None = None  # for needs_teachers (UMT)

    @property
    def train_split(self) -> Iterable[Any]:
        return self.train if self.train_eval is None else self.train_eval

    def features(self, model: nn.Module, batch: Any) -> tuple[Features, Tensor]:
        """``forward(model, batch)`` with the batch moved to the model's device."""
        device = self.device or _device_of(model)
        out = self.forward(model, to_device(batch, device))
        if not (
            isinstance(out, tuple | list)
            and len(out) == 2
            and isinstance(out[0], Mapping)
            and isinstance(out[1], Tensor)
        ):
            raise TypeError(
                "forward(model, batch) must return (features, target): a mapping modality -> "
                f"tensor and a target tensor; got {type(out).__name__}"
                + (
                    f" of {[type(v).__name__ for v in out]}"
                    if isinstance(out, tuple | list)
                    else ""
                )
            )
        feats, target = out
        return dict(feats), target

    def build_seeded(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = self.build()
        if not isinstance(model, nn.Module):
            raise TypeError(f"build() must return an nn.Module, got {type(model).__name__}")
        return model if self.device is None else model.to(self.device)

    def context(self, model: nn.Module, seed: int) -> Context:
        """The method's view of one run (the first batch read for shapes and classes, from
        ``train_eval`` when given: reading it draws nothing from the data order's RNG)."""
        first = next(iter(self.train_split), _NO_BATCH)
        if first is _NO_BATCH:  # _count() read a one-pass iterator to its end
            which = "train" if self.train_eval is None else "train_eval"
            raise ValueError(
                f"{which} gave no batch when read again: every epoch and every run reads it "
                "anew, so it must be a loader that can be read more than once (a DataLoader or "
                "a list of batches), not a generator or an iterator"
            )
        sample = self.features(model, first)
        with torch.no_grad():
            from .plugins import fused_logits

            classes = int(fused_logits(self.head(model), sample[0]).shape[-1])
        return Context(
            model=model,
            head=self.head(model),
            encoders=dict(self.encoders(model)),
            sample=sample,
            num_classes=classes,
            steps_per_epoch=self.steps,
            epochs=self.epochs,
            seed=seed,
            train=self.train,
            val=self.val,
            features=lambda batch: self.features(model, batch),
            train_eval=self.train_eval,
            optimizer=self.optimizer,
            teachers=self.teachers,
        )


@dataclass
class Outcome:
    """A finished run: its record, and the live model and method state at the chosen epoch."""

    record: RunRecord
    ctx: Context
    hooks: Hooks
    kept: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectedRun:
    """A run kept in a row, at the epoch chosen on validation: what ``on_run`` receives.

    Attributes:
        method: the row's short name; config: the setting; seed: the seed.
        record: the run's :class:`~imbalance_losses.compare.RunRecord` (test already scored).
        model: the model with the weights of the chosen epoch.
        head: ``head(model)``.
        kept: the method's own module at that epoch, when its predictions need one
            (sustained boosting's heads), else ``None``.
        diagnosis_head: the head whose unimodal logits mean something (``None`` for sustained
            boosting, whose heads replace the model's).
    """

    method: str
    config: Config
    seed: int
    record: RunRecord
    model: nn.Module
    head: Head
    kept: nn.Module | None
    diagnosis_head: Head | None
    _features: Callable[[Any], tuple[Features, Tensor]]
    _predict: Callable[[Features], Tensor]

    def features(self, batch: Any) -> tuple[Features, Tensor]:
        """``forward(model, batch)`` of this run's model (the batch moved to its device), as
        the protocol scores it: the model (and ``kept``) in eval mode, without gradient; each
        module's own mode is restored after (no BatchNorm statistic or dropout draw changes)."""
        with torch.no_grad(), eval_mode(self.model), eval_mode(self.kept):
            return self._features(batch)

    def logits(self, features: Features) -> Tensor:
        """The fused logits as the method predicts them (boosting: its heads' ensemble), in
        eval mode and without gradient, as the validation and test scores are computed."""
        with torch.no_grad(), eval_mode(self.model), eval_mode(self.kept):
            return self._predict(features)

    @classmethod
    def of(cls, outcome: Outcome) -> SelectedRun:
        ctx, hooks, record, kept = outcome.ctx, outcome.hooks, outcome.record, outcome.kept
        return cls(
            method=record.method,
            config=record.config,
            seed=record.seed,
            record=record,
            model=ctx.model,
            head=ctx.head,
            kept=kept,
            diagnosis_head=hooks.diagnosis_head(ctx.head),
            _features=ctx.features,
            _predict=lambda feats: hooks.predict(ctx.head, feats, kept),
        )


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (nested in mappings, lists and tuples) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:  # a mapping type that is not built from a dict
            return moved
    if isinstance(batch, tuple | list):
        items = [to_device(v, device) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameters (equal initial weights give equal hashes)."""
    with torch.no_grad():
        sums = [
            torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()
        ]
        values = torch.stack(sums).cpu().tolist() if sums else []
    return hashlib.sha1(repr(values).encode()).hexdigest()[:16]


def _reduce(values: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and values.device.type != "cuda":
            values = values.cuda()
        dist.all_reduce(values)
    return values


def evaluate(
    spec: Spec, model: nn.Module, hooks: Hooks, kept: nn.Module | None, loader: Iterable[Any]
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over ``loader`` (summed over ranks under DDP)."""
    training = model.training
    model.eval()
    hooks.train(False)
    head = spec.head(model)
    totals = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            feats, target = spec.features(model, batch)
            logits = hooks.predict(head, feats, kept).float()
            counted = target != IGNORE_INDEX
            y = target[counted]
            z = logits[counted]
            totals += torch.stack(
                [
                    (z.argmax(-1) == y).sum().double().cpu(),
                    F.cross_entropy(z, y, reduction="sum").double().cpu(),
                    torch.tensor(float(y.numel()), dtype=torch.float64),
                ]
            )
    model.train(training)
    correct, loss, count = _reduce(totals).tolist()
    if count == 0:
        raise ValueError(
            "the evaluated loader gave no sample (an empty validation or test set, or a "
            "generator or an iterator already read: every epoch and every run reads it anew, "
            "so give a DataLoader or a list of batches)"
        )
    return correct / count, loss / count


def _better(acc: float, loss: float, best: tuple[float, float] | None) -> bool:
    if best is None:
        return True
    loss = loss if math.isfinite(loss) else math.inf
    return (acc, -loss) > (best[0], -best[1])


def forked_rng(spec: Spec) -> AbstractContextManager[None]:
    """``torch.random.fork_rng`` over the CPU generator (and ``device=``'s CUDA one): the global
    RNG state in the block is the caller's, restored after it."""
    devices = [spec.device.index or 0] if spec.device and spec.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def train_run(
    spec: Spec,
    remedy: RemedyPlugin,
    config: Config,
    seed: int,
    on_epoch: Callable[[int, float], None],
) -> Outcome:
    """Train one run and return it at the epoch chosen on validation (test not read)."""
    with forked_rng(spec):
        model = spec.build_seeded(seed)
        init = fingerprint(model)
        ctx = spec.context(model, seed)
        hooks = remedy.setup(ctx, config)
        optimizer = spec.optimizer(hooks.parameters())
        hooks.attach(optimizer)
        torch.manual_seed(seed)  # the same data order for a seed, whatever the method
        return _loop(spec, remedy, config, seed, ctx, hooks, optimizer, init, on_epoch)


def _loop(
    spec: Spec,
    remedy: RemedyPlugin,
    config: Config,
    seed: int,
    ctx: Context,
    hooks: Hooks,
    optimizer: torch.optim.Optimizer,
    init: str,
    on_epoch: Callable[[int, float], None],
) -> Outcome:
    model = ctx.model
    best: tuple[float, float] | None = None
    saved: tuple[dict[str, Tensor], nn.Module | None] | None = None
    curve: list[float] = []
    record = RunRecord(method=remedy.name, config=config, seed=seed, init=init)
    seconds = 0.0
    for epoch in range(spec.epochs):
        start = time.perf_counter()
        records: list[Any] = []
        try:
            last = _epoch(spec, ctx, hooks, optimizer, epoch, records)
        except ValueError as err:  # the library refuses non-finite features or logits
            if "non-finite" not in str(err):
                raise
            record.diverged = epoch + 1
            break
        if last is not None and not bool(torch.isfinite(last.detach()).all()):
            record.diverged = epoch + 1  # the last step's loss, read once per epoch
            break
        # the records are read on the host once per epoch
        record.trace.extend(dict(r) if isinstance(r, Mapping) else r.to_dict() for r in records)
        acc, loss = evaluate(spec, model, hooks, hooks.kept, spec.val)
        seconds += time.perf_counter() - start
        curve.append(acc)
        if _better(acc, loss, best):
            best = (acc, loss)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            saved = (state, copy.deepcopy(hooks.kept))
            record.epoch = epoch + 1
        if epoch + 1 < spec.epochs:  # the method's per-epoch work, counted in its time
            end = time.perf_counter()
            hooks.epoch_end(epoch)
            seconds += time.perf_counter() - end
        on_epoch(epoch, time.perf_counter() - start)
    record.curve = curve
    record.seconds_per_epoch = seconds / max(len(curve), 1)
    kept = None
    if best is not None and saved is not None:
        record.val, record.val_loss = best
        model.load_state_dict(saved[0])
        kept = saved[1]
    return Outcome(record=record, ctx=ctx, hooks=hooks, kept=kept)


def _epoch(
    spec: Spec,
    ctx: Context,
    hooks: Hooks,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    records: list[Any],
) -> Tensor | None:
    """One training epoch; returns its last step's loss (``None``: no batch)."""
    hooks.epoch_start(epoch)
    ctx.model.train()
    hooks.train(True)
    loss: Tensor | None = None
    for feats, target in hooks.train_batches(epoch):
        loss = hooks.train_step(feats, target, optimizer)
        if spec.trace:
            step = hooks.record()
            if step is not None:
                records.append(step)
    return loss


def score(spec: Spec, outcome: Outcome, loader: Iterable[Any]) -> float:
    """The selected run's accuracy on ``loader`` (the test loader: read once, here)."""
    return evaluate(spec, outcome.ctx.model, outcome.hooks, outcome.kept, loader)[0]


def diagnose(
    spec: Spec, outcome: Outcome, modalities: Sequence[str] | None = None
) -> dict[str, Any]:
    """:func:`imbalance_report` of the selected run: probes fitted on the training split's
    features (pooled over tokens), every accuracy on the validation split. Samples whose target
    is ``IGNORE_INDEX`` (-100, what the loop's cross-entropy and :func:`evaluate` leave out) are
    left out of both."""
    ctx = outcome.ctx
    fit = [_pooled(*_counted(f, y), modalities) for f, y in ctx.batches(spec.train_split)]
    held = [_counted(_subset(f, modalities), y) for f, y in ctx.batches(spec.val)]
    head = outcome.hooks.diagnosis_head(ctx.head)
    report = imbalance_report(
        fit,
        held,
        head=head if modalities is None and len(ctx.modalities) > 1 else None,
        num_classes=ctx.num_classes,
    )
    return {
        "modalities": list(report.modalities),
        "probe": report.probe,
        "head": report.head,
        "num_classes": report.num_classes,
        "num_fit": report.num_fit,
        "num_evaluated": report.num_evaluated,
    }


def _counted(feats: Features, y: Tensor) -> tuple[Features, Tensor]:
    """The samples of a batch whose target is not ``IGNORE_INDEX`` (batch first)."""
    keep = y != IGNORE_INDEX
    return {m: x[keep] for m, x in feats.items()}, y[keep]


def _subset(feats: Features, modalities: Sequence[str] | None) -> Features:
    return feats if modalities is None else {m: feats[m] for m in modalities}


def _pooled(
    feats: Features, y: Tensor, modalities: Sequence[str] | None
) -> tuple[Features, Tensor]:
    return {m: pooled_tokens(x).cpu() for m, x in _subset(feats, modalities).items()}, y.cpu()


def alone_remedy(modality: str) -> RemedyPlugin:
    """Training for the encoder of ``modality`` alone: cross-entropy of its unimodal logits."""
    return _Alone(f"alone:{modality}", f"{modality} alone", uses_head=True)


class _Alone(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        return _AloneHooks(ctx, self.name.split(":", 1)[1])


class _AloneHooks(Hooks):
    def __init__(self, ctx: Context, modality: str) -> None:
        super().__init__(ctx)
        self.modality = modality

    def loss(self, features: Features, target: Tensor) -> Tensor:
        return F.cross_entropy(unimodal_logits(self.ctx.head, features)[self.modality], target)

    def predict(self, head: Head, features: Features, kept: nn.Module | None) -> Tensor:
        return unimodal_logits(head, features)[self.modality]
