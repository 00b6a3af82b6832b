"""Lightning (``lightning.pytorch``) callbacks for the gradient modulators and the records.

What a ``LightningModule`` needs beyond the plain-loop recipes:

* **Losses** (:class:`~imbalance_losses.ARLLoss` in its default hook mode,
  :class:`~imbalance_losses.SustainedBoostingLoss`, ...) need nothing from this module: make
  them attributes of your ``LightningModule`` and call them in ``training_step``. As submodules
  they follow ``train()`` / ``eval()`` and the device, and their state (statistics, step counts,
  heads) is part of the model's ``state_dict``, so Lightning checkpoints restore it.
* **Gradient modulators** act between the backward pass and the optimiser step, which Lightning
  runs for you. :class:`ModulatorCallback` calls their ``step()`` in the callback hook
  ``on_before_optimizer_step``: Lightning runs it after the closure's ``backward()`` (of the
  last micro-batch under ``accumulate_grad_batches``, so once per optimiser step) and after
  ``GradScaler.unscale_`` (``precision="16-mixed"``), before gradient clipping and
  ``optimizer.step()``: where the plain-loop recipe calls ``step()``.
  Or attach the modulator to the optimiser instead (``modulator.attach(opt)`` in
  ``configure_optimizers``: its ``step()`` then runs inside ``opt.step()``, after Lightning's
  closure and gradient clipping); ``docs/lightning.md`` compares the two.
* **Records**: :class:`RecordLogger` logs each module's ``last`` record through
  ``LightningModule.log_dict`` on the steps the trainer writes logs (``log_every_n_steps``), so
  the one host read of a record happens only then.
* **The monitor**: :class:`MonitorCallback` feeds an
  :class:`~imbalance_losses.ImbalanceMonitor` the encoders' gradients once per optimiser step,
  logs its values at each epoch end, and keeps its unfinished sums in the checkpoints; the
  ``LightningModule`` keeps one line, ``monitor.update(feats, y)`` in ``training_step``.

Nothing here is imported by ``import imbalance_losses``; this module imports ``lightning``
(``pip install "imbalance-losses[lightning]"``). See ``docs/lightning.md`` for a complete
example of each method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.optim import Optimizer

from ..core.attachment import OptimizerAttachable
from ..core.records import StepRecord
from ..diagnosis.monitor import ImbalanceMonitor

__all__ = ["ModulatorCallback", "MonitorCallback", "RecordLogger"]


class Steppable(Protocol):
    """What :class:`ModulatorCallback` drives: a ``step()`` once per optimiser step, and state.

    :class:`~imbalance_losses.ModalityGradientModulator`, and
    :class:`~imbalance_losses.ARLLoss` / :class:`~imbalance_losses.AdaptiveGradientModulator`
    built with ``encoders=``.
    """

    def step(self) -> object:
        """Act on the gradients of the optimiser step about to be taken."""

    def state_dict(self) -> Mapping[str, Any]:
        """The state that resumes the object exactly."""

    def load_state_dict(self, state: Mapping[str, Any], /) -> object:
        """Restore what :meth:`state_dict` returned."""


class HasRecord(Protocol):
    """Anything with a ``last`` diagnostics record (every module of this package)."""

    @property
    def last(self) -> StepRecord | None:
        """The record of the last step, ``None`` before the first."""


class ModulatorCallback(Callback):
    """Calls each modulator's ``step()`` once per optimiser step and checkpoints its state.

    In your ``LightningModule``, ``observe`` each (micro-)batch in ``training_step``; this
    callback calls ``step()`` (no arguments: the scores pooled since the last step) in
    ``on_before_optimizer_step``, once per optimiser step, after every micro-batch's
    ``backward()`` and after AMP unscaling, before gradient clipping and the update::

        def training_step(self, batch, batch_idx):
            ...
            self.modulator.observe(unimodal_logits(self.head, feats), y)
            return loss

        def configure_callbacks(self):
            return [ModulatorCallback(self.modulator)]

    Works for :class:`~imbalance_losses.ModalityGradientModulator` (OGM / OGM-GE) and for
    :class:`~imbalance_losses.ARLLoss` and :class:`~imbalance_losses.AdaptiveGradientModulator`
    built with ``encoders=`` (their ``forward`` pools the statistics, their ``step()`` scales the
    encoders' gradients once per optimiser step: exact under ``accumulate_grad_batches``).

    **State.** A modulator that is not an ``nn.Module`` (``ModalityGradientModulator``) is saved
    in the checkpoint's callback state (:meth:`state_dict`) and restored on
    ``trainer.fit(..., ckpt_path=...)``, so a resumed run takes the same next coefficients (and
    OGM-GE the same noise). An ``nn.Module`` modulator (ARL, AGM) must be an attribute of the
    ``LightningModule``: its state is then in the model's ``state_dict``; fitting raises a
    ``ValueError`` otherwise (its state would be lost silently).

    A batch skipped by returning ``None`` from ``training_step`` runs no backward: the
    modulators skip that optimiser step too (nothing to act on; not counted).

    Use it with one optimiser (automatic optimisation, or one ``opt.step()`` per batch in
    manual optimisation): Lightning calls the hook at every optimiser's step. Under DDP every
    rank runs the hook, as each modulator's ``step()`` requires (it all-reduces the scores).

    Args:
        *modulators: the objects whose ``step()`` is called, in this order.

    Raises:
        TypeError: no modulator, or one without ``step()`` / ``state_dict()`` /
            ``load_state_dict()``.
        ValueError: (at ``fit``) an ``nn.Module`` modulator that the ``LightningModule`` does
            not hold, or a modulator also attached to an optimiser (``attach()``).

    Example:
        >>> from torch import nn
        >>> from imbalance_losses import ModalityGradientModulator
        >>> from imbalance_losses.integrations.lightning import ModulatorCallback
        >>> encoders = {"audio": nn.Linear(4, 3), "visual": nn.Linear(5, 3)}
        >>> callback = ModulatorCallback(ModalityGradientModulator(encoders, alpha=0.5))
        >>> callback.state_key
        "ModulatorCallback{'modulators': ['ModalityGradientModulator']}"
    """

    def __init__(self, *modulators: Steppable) -> None:
        if not modulators:
            raise TypeError("ModulatorCallback needs at least one modulator")
        for mod in modulators:
            missing = [
                name
                for name in ("step", "state_dict", "load_state_dict")
                if not callable(getattr(mod, name, None))
            ]
            if missing:
                raise TypeError(
                    f"ModulatorCallback drives objects with step(), state_dict() and "
                    f"load_state_dict(); {type(mod).__name__} has no {', '.join(missing)}"
                )
        self.modulators: tuple[Steppable, ...] = modulators

    @property
    def state_key(self) -> str:
        """The key of this callback's state in the checkpoint (the modulators' kinds)."""
        return self._generate_state_key(modulators=[type(m).__name__ for m in self.modulators])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse an ``nn.Module`` modulator that the ``LightningModule`` does not hold."""
        held = {id(m) for m in pl_module.modules()}
        for mod in self.modulators:
            if isinstance(mod, nn.Module) and id(mod) not in held:
                raise ValueError(
                    f"{type(mod).__name__} is an nn.Module but not part of the LightningModule "
                    f"{type(pl_module).__name__}: make it an attribute (self.name = ...) so that "
                    "Lightning checkpoints its state with the model and switches it between "
                    "train and eval"
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse a modulator also attached to an optimiser (it would step twice)."""
        for mod in self.modulators:
            if getattr(mod, "attached_optimizer", None) is not None:
                raise ValueError(
                    f"{type(mod).__name__} is attached to an optimizer (attach()) and given to "
                    "ModulatorCallback: its step() would run twice per optimizer step; use one "
                    "of the two"
                )

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        """``step()`` each modulator: the gradients are complete and unscaled here.

        A modulator none of whose parameters holds a gradient is skipped (not stepped, not
        counted): ``training_step`` returned ``None``, Lightning's way to skip a batch, so no
        backward ran and the optimiser step changes nothing; what it observed carries over.
        """
        for mod in self.modulators:
            if isinstance(mod, OptimizerAttachable) and mod._without_gradients():
                continue
            mod.step()

    def state_dict(self) -> dict[str, Any]:
        """The state of each modulator that is not an ``nn.Module`` (by position)."""
        return {
            str(i): dict(mod.state_dict())
            for i, mod in enumerate(self.modulators)
            if not isinstance(mod, nn.Module)
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (Lightning calls it on resume)."""
        for i, mod in enumerate(self.modulators):
            if not isinstance(mod, nn.Module):
                if str(i) not in state_dict:
                    raise KeyError(
                        f"the checkpoint's {self.state_key} state has no entry for modulator "
                        f"{i} ({type(mod).__name__})"
                    )
                mod.load_state_dict(state_dict[str(i)])


class RecordLogger(Callback):
    """Logs each module's ``last.to_dict()`` with ``LightningModule.log_dict``.

    Keys are ``f"{prefix}{name}/{field}"`` (per-modality fields end in ``/<modality>``), e.g.
    ``"imbalance/ogm/coefficients/audio"``. Logged in ``on_train_batch_end`` of a batch that
    took an optimiser step, when ``trainer.global_step`` is a multiple of the trainer's
    ``log_every_n_steps`` (the steps Lightning writes to the logger), with ``on_step=True``,
    ``on_epoch=False``: the record is read on the host only then, never on the other steps.
    A module without a record yet (``last is None``) is skipped.

    No ``sync_dist``: every record holds statistics already pooled over the ranks, so every
    rank logs the same values (the logger writes rank 0's).

    Args:
        modules: ``{name: module}``, each with a ``last`` record (any module of this package).
        prefix: prepended to every key.

    Raises:
        TypeError: ``modules`` is not a mapping, or a module has no ``last`` attribute.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import ARLLoss
        >>> from imbalance_losses.integrations.lightning import RecordLogger
        >>> head = nn.Linear(4, 3)
        >>> arl = ARLLoss(head=head)
        >>> a, v = torch.randn(6, 2, requires_grad=True), torch.randn(6, 2, requires_grad=True)
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> loss = arl(head(torch.cat([a, v], 1)), y, features={"audio": a, "visual": v})
        >>> for key in sorted(RecordLogger({"arl": arl}, prefix="imbalance/").metrics())[:3]:
        ...     print(key)
        imbalance/arl/active
        imbalance/arl/coefficients/audio
        imbalance/arl/coefficients/visual
    """

    def __init__(self, modules: Mapping[str, HasRecord], *, prefix: str = "") -> None:
        if not isinstance(modules, Mapping):
            raise TypeError(
                "RecordLogger takes a mapping {name: module}, e.g. {'arl': model.arl}, got "
                f"{type(modules).__name__}"
            )
        for name, mod in modules.items():
            if not hasattr(mod, "last"):
                raise TypeError(
                    f"RecordLogger: {name!r} ({type(mod).__name__}) has no `last` record"
                )
        self.modules = dict(modules)
        self.prefix = prefix
        self._seen_step: int | None = None

    def metrics(self) -> dict[str, float]:
        """The prefixed ``to_dict()`` of every record present now (reads them on the host)."""
        out: dict[str, float] = {}
        for name, mod in self.modules.items():
            record = mod.last
            if record is not None:
                out.update({f"{self.prefix}{name}/{k}": v for k, v in record.to_dict().items()})
        return out

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Note the step count training starts from (0, or the resumed run's)."""
        self._seen_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log the records if this batch took an optimiser step that the logger writes."""
        step = trainer.global_step
        stepped, self._seen_step = step != self._seen_step, step
        # set by the Trainer at run time (not a declared attribute); 50 is Lightning's default
        every = int(getattr(trainer, "log_every_n_steps", 50))
        if not stepped or every <= 0 or step % every != 0:
            return
        values = self.metrics()
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)


class MonitorCallback(Callback):
    """Logs an :class:`~imbalance_losses.ImbalanceMonitor` at every epoch end; checkpoints it.

    Two lines for the user: the monitor (an attribute of the ``LightningModule``, or a local)
    gets each (micro-)batch in ``training_step``, and this callback does the rest::

        def training_step(self, batch, batch_idx):
            ...
            self.monitor.update(feats, y)      # features (monitor with head=) or unimodal logits
            return loss

        def configure_callbacks(self):
            return [MonitorCallback(self.monitor)]

    * ``on_before_optimizer_step``: :meth:`~imbalance_losses.ImbalanceMonitor.observe_gradients`
      when the monitor was built with ``encoders=``. Lightning runs the hook once per optimiser
      step, after the last micro-batch's ``backward()`` and after AMP unscaling, before gradient
      clipping and the update. Place this callback after a :class:`ModulatorCallback` to see the
      modulated gradients (callbacks run in list order), before it for those the loss asked for.
    * ``on_train_epoch_end``: ``pl_module.log_dict(monitor.compute(), on_step=False,
      on_epoch=True)`` then :meth:`~imbalance_losses.ImbalanceMonitor.reset`, so each epoch's
      values cover that epoch's training batches (and its optimiser steps). Callbacks' hooks run
      before ``ModelCheckpoint`` saves the epoch's checkpoint, so that checkpoint holds the
      reset monitor.
    * **State**: the monitor's sums (a plain object, not an ``nn.Module``) go into the
      checkpoint's callback state (:meth:`state_dict`) and come back on
      ``trainer.fit(..., ckpt_path=...)``: a checkpoint taken in the middle of an epoch resumes
      the epoch's sums (under DDP, every rank's: one all-reduce when the checkpoint is taken).

    No ``sync_dist``: ``compute()`` already pools over the ranks (one all-reduce), and every
    rank runs ``on_train_epoch_end``, as that all-reduce requires; every rank logs the same
    values. Nothing is read on the host outside ``compute()``.

    Args:
        monitor: the monitor to drive.

    Raises:
        TypeError: ``monitor`` is not an :class:`~imbalance_losses.ImbalanceMonitor`.

    Example:
        >>> from imbalance_losses import ImbalanceMonitor
        >>> from imbalance_losses.integrations.lightning import MonitorCallback
        >>> callback = MonitorCallback(ImbalanceMonitor(["audio", "visual"]))
        >>> callback.state_key
        "MonitorCallback{'modalities': ['audio', 'visual']}"
    """

    def __init__(self, monitor: ImbalanceMonitor) -> None:
        if not isinstance(monitor, ImbalanceMonitor):
            raise TypeError(
                "MonitorCallback takes an ImbalanceMonitor, got " + type(monitor).__name__
            )
        self.monitor = monitor

    @property
    def state_key(self) -> str:
        """The key of this callback's state in the checkpoint (the monitor's modalities)."""
        return self._generate_state_key(modalities=list(self.monitor.modalities))

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        """Add this step's encoder gradient norms (a monitor built with ``encoders=`` only)."""
        if self.monitor.has_encoders:  # observe_gradients() raises without encoders=
            self.monitor.observe_gradients()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the epoch's pooled values (every rank joins the all-reduce), then reset."""
        values = self.monitor.compute()
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)
        self.monitor.reset()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state with every rank's sums (``state_dict(all_ranks=True)``).

        Lightning takes the callbacks' state on every rank and writes rank 0's checkpoint,
        which every rank loads on resume: with only rank 0's own sums in it, a resumed DDP run
        would count them once per rank and lose the other ranks'.
        """
        return self.monitor.state_dict(all_ranks=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (Lightning calls it on resume)."""
        self.monitor.load_state_dict(state_dict)
