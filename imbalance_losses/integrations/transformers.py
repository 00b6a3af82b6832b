"""Hugging Face ``Trainer`` glue: attach the modulators, keep every module's state in checkpoints.

The ``Trainer`` owns the loop, so two things move out of the user's hands:

* **the step.** :class:`ModulatorCallback` attaches each module that acts between backward and
  the optimiser step (:class:`~imbalance_losses.ModalityGradientModulator`; ARL and AGM built
  with ``encoders=``) to the ``Trainer``'s optimiser at ``on_train_begin``
  (:meth:`~imbalance_losses.core.attachment.OptimizerAttachable.attach`), and detaches it at
  ``on_train_end``. Its ``step()`` then runs inside the real ``optimizer.step()``: once per
  accumulated step, after the ``Trainer``'s gradient clipping and AMP unscaling, never on a step
  the scaler skips (``on_pre_optimizer_step`` would also run on those);
* **the state.** A custom ``nn.Module`` model is saved with ``safetensors``, which refuses a
  submodule's non-tensor state, so the library's modules live beside the model, not in it. The
  callback writes every module's ``state_dict()`` into each checkpoint folder
  (``imbalance_losses.pt``) and restores it when ``trainer.train(resume_from_checkpoint=...)``
  resumes, so the next coefficients (and OGM-GE's noise) are those of the uninterrupted run.

What each module observes per (micro-)batch still comes from your code, in a ``compute_loss``
override (see ``docs/transformers.md`` for the complete recipes, ARL and boosting included).

:class:`MonitorCallback` does the same for an :class:`~imbalance_losses.ImbalanceMonitor`
(``monitor.update(feats, labels)`` in ``compute_loss`` is then the one line left): the encoders'
gradients once per optimiser step, the monitor's values in every training log record, its sums
in every checkpoint folder (``imbalance_monitor.pt``).

Nothing here is imported by ``import imbalance_losses``; this module imports ``transformers``
(``pip install "imbalance-losses[transformers]"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ..core.attachment import OptimizerAttachable
from ..diagnosis.monitor import ImbalanceMonitor

__all__ = ["MONITOR_STATE_FILE", "STATE_FILE", "ModulatorCallback", "MonitorCallback"]

STATE_FILE = "imbalance_losses.pt"
"""The file each checkpoint folder gets: ``{"global_step": int, "modules": [{type, state}]}``."""

MONITOR_STATE_FILE = "imbalance_monitor.pt"
""":class:`MonitorCallback`'s file in each checkpoint folder (the same layout as ``STATE_FILE``)."""


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """``<output_dir>/checkpoint-<global step>``, the folder the ``Trainer`` saves a step to."""
    return os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")


def _save_states(
    args: TrainingArguments,
    state: TrainerState,
    file: str,
    modules: tuple[Stateful, ...],
    states: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Write every module's state (``states``, default their ``state_dict()``) into ``file``."""
    if not args.should_save:
        return
    if states is None:
        states = [m.state_dict() for m in modules]
    torch.save(
        {
            "global_step": state.global_step,
            "modules": [
                {"type": type(m).__name__, "state": s} for m, s in zip(modules, states, strict=True)
            ],
        },
        os.path.join(_checkpoint_folder(args, state), file),
    )


def _load_states(
    checkpoint: str | os.PathLike[str],
    file: str,
    modules: tuple[Stateful, ...],
    map_location: str | torch.device | None = None,
) -> int:
    """Restore ``modules`` from ``<checkpoint>/<file>``; the global step it was saved at.

    ``map_location`` as in ``torch.load``: on resume, the ``Trainer``'s device (every rank
    reads the file rank 0 wrote, so without it each rank's state would land on rank 0's GPU).
    """
    saved = torch.load(os.path.join(checkpoint, file), map_location=map_location, weights_only=True)
    entries = saved["modules"]
    kinds = [type(m).__name__ for m in modules]
    if [e["type"] for e in entries] != kinds:
        raise ValueError(
            f"{os.fspath(checkpoint)} holds the state of {[e['type'] for e in entries]}, "
            f"this callback has {kinds}: pass the same modules in the same order"
        )
    for module, entry in zip(modules, entries, strict=True):
        module.load_state_dict(entry["state"])
    return int(saved["global_step"])


def _resume(
    args: TrainingArguments,
    state: TrainerState,
    file: str,
    modules: tuple[Stateful, ...],
    loaded_step: int | None,
) -> None:
    """At ``on_train_begin``: restore a resumed run's state unless ``load_checkpoint`` did."""
    if state.global_step > 0 and loaded_step != state.global_step:
        folder = _checkpoint_folder(args, state)
        if not os.path.isfile(os.path.join(folder, file)):
            raise FileNotFoundError(
                f"resuming at global step {state.global_step}, but {folder} has no "
                f"{file} with the modules' state; for a checkpoint outside "
                "output_dir call callback.load_checkpoint(<checkpoint folder>) before "
                "trainer.train(resume_from_checkpoint=<checkpoint folder>)"
            )
        loaded_step = _load_states(folder, file, modules, args.device)
    if loaded_step is not None and loaded_step != state.global_step:
        raise ValueError(
            f"load_checkpoint() read the modules' state of global step {loaded_step}, "
            f"but the Trainer starts at global step {state.global_step}: resume from the "
            "same checkpoint"
        )


class Stateful(Protocol):
    """What the callback checkpoints: every module of this package."""

    def state_dict(self) -> Mapping[str, Any]:
        """The state that resumes the object exactly."""

    def load_state_dict(self, state: Mapping[str, Any], /) -> object:
        """Restore what :meth:`state_dict` returned."""


class ModulatorCallback(TrainerCallback):
    """Attach the gradient-side modules to the ``Trainer``'s optimiser; checkpoint every module.

    ``observe`` each (micro-)batch in your ``compute_loss``; the callback does the rest::

        modulator = ModalityGradientModulator({"audio": net.audio, "visual": net.visual}, 0.8)
        trainer = MyTrainer(model=net, args=args, train_dataset=data,
                            callbacks=[ModulatorCallback(modulator)])
        trainer.train()                              # or train(resume_from_checkpoint=True)

    Modules with a step in their mode (``attachable``: the gradient modulator; ARL and AGM with
    ``encoders=``) are attached at ``on_train_begin`` and detached at ``on_train_end``. Every
    module given (losses too: ARL, AGM, boosting kept beside the model) is saved into each
    checkpoint folder at ``on_save`` and restored at ``on_train_begin`` of a resumed run, from
    ``<output_dir>/checkpoint-<global step>/`` (where ``resume_from_checkpoint=True`` and the
    paths under ``output_dir`` point); for a checkpoint elsewhere call :meth:`load_checkpoint`
    before ``train()``. Under DDP every rank's optimiser runs the step (each all-reduces); the
    main process writes the file.

    Args:
        *modules: the modules, each with ``state_dict()`` / ``load_state_dict()``; their order
            is their place in the checkpoint (keep it when resuming).

    Raises:
        TypeError: no module, or one without ``state_dict`` / ``load_state_dict``.

    Example:
        >>> from torch import nn
        >>> from imbalance_losses import ModalityGradientModulator
        >>> from imbalance_losses.integrations.transformers import ModulatorCallback
        >>> encoders = {"audio": nn.Linear(4, 3), "visual": nn.Linear(5, 3)}
        >>> callback = ModulatorCallback(ModalityGradientModulator(encoders, alpha=0.5))
        >>> [type(m).__name__ for m in callback.attached_modules]
        ['ModalityGradientModulator']
    """

    def __init__(self, *modules: Stateful) -> None:
        if not modules:
            raise TypeError("ModulatorCallback needs at least one module")
        for module in modules:
            missing = [
                name
                for name in ("state_dict", "load_state_dict")
                if not callable(getattr(module, name, None))
            ]
            if missing:
                raise TypeError(
                    "ModulatorCallback checkpoints objects with state_dict() and "
                    f"load_state_dict(); {type(module).__name__} has no {', '.join(missing)}"
                )
        self.modules: tuple[Stateful, ...] = modules
        self._loaded_step: int | None = None

    @property
    def attached_modules(self) -> list[OptimizerAttachable]:
        """The modules attached to the optimiser during training (those with a step)."""
        return [m for m in self.modules if isinstance(m, OptimizerAttachable) and m.attachable]

    # ------------------------------------------------------------------ events

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Restore the modules of a resumed run, then attach to the ``Trainer``'s optimiser."""
        model = kwargs.get("model")
        if isinstance(model, nn.Module):
            inside = {id(m) for m in model.modules()}
            for module in self.modules:
                if id(module) in inside:
                    raise ValueError(
                        f"{type(module).__name__} is a submodule of the Trainer's model: the "
                        "Trainer saves a custom model's state_dict with safetensors, which "
                        "refuses its non-tensor state. Keep it beside the model (an attribute "
                        "of your Trainer subclass or a local); this callback checkpoints it"
                    )
        _resume(args, state, STATE_FILE, self.modules, self._loaded_step)
        self._loaded_step = None
        optimizer = kwargs.get("optimizer")
        for attachable in self.attached_modules:
            attachable.detach()  # a run that raised may have left it attached
            attachable.attach(optimizer)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Detach from the optimiser."""
        for attachable in self.attached_modules:
            attachable.detach()

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write every module's state into the checkpoint folder just saved."""
        _save_states(args, state, STATE_FILE, self.modules)

    # ------------------------------------------------------------------ explicit restore

    def load_checkpoint(
        self,
        checkpoint: str | os.PathLike[str],
        map_location: str | torch.device | None = None,
    ) -> None:
        """Restore the modules from ``<checkpoint>/imbalance_losses.pt`` now.

        ``on_train_begin`` does this itself for checkpoints under ``output_dir``; call it for
        one elsewhere, before ``trainer.train(resume_from_checkpoint=checkpoint)``.
        ``map_location`` as in ``torch.load`` (e.g. ``training_args.device``, or ``"cpu"`` for a
        state saved on a GPU); ``None`` keeps each tensor on the device it was saved from.

        Raises:
            FileNotFoundError: the folder has no ``imbalance_losses.pt``.
            ValueError: the file holds other modules (number or kinds) than this callback's.
        """
        self._loaded_step = _load_states(checkpoint, STATE_FILE, self.modules, map_location)


class MonitorCallback(TrainerCallback):
    """Feed an :class:`~imbalance_losses.ImbalanceMonitor` the gradients, log it, checkpoint it.

    ``monitor.update(feats, labels)`` on each training (micro-)batch in your ``compute_loss``
    stays yours (the ``Trainer`` does not hand the features to callbacks); add the callback
    with :meth:`add_to`, ahead of the ``Trainer``'s reporters::

        monitor = ImbalanceMonitor(["audio", "visual"], head=net.head,
                                   encoders={"audio": net.audio, "visual": net.visual})
        trainer = MyTrainer(model=net, args=args, train_dataset=data, monitor=monitor)
        MonitorCallback(monitor).add_to(trainer)
        trainer.train()

    * ``on_optimizer_step``:
      :meth:`~imbalance_losses.ImbalanceMonitor.observe_gradients` when the monitor was built
      with ``encoders=``. The ``Trainer`` fires it once per optimiser step (after the last
      micro-batch of ``gradient_accumulation_steps``), right after ``optimizer.step()`` and
      before ``zero_grad()``: the gradients the optimiser applied, clipped (``max_grad_norm``),
      unscaled under fp16, after any attached remedy (:class:`ModulatorCallback`). A step the
      fp16 scaler skips has non-finite gradients, which the monitor leaves out.
      (``on_pre_optimizer_step`` would see fp16 gradients still scaled when nothing clips.)
    * ``on_log``: at each **training** log event (``logging_strategy`` /
      ``logging_steps``; the records with the ``Trainer``'s ``"loss"``, not evaluation or the
      end-of-training summary) the monitor's
      :meth:`~imbalance_losses.ImbalanceMonitor.compute` is added to ``logs`` (what the
      reporters, TensorBoard, W&B, ..., write) and to that event's record in
      ``trainer.state.log_history``, then the monitor is reset: each record covers the
      batches and optimiser steps since the previous one, like the ``Trainer``'s ``"loss"``.
      Every rank logs (and joins ``compute()``'s all-reduce).
    * ``on_save`` / ``on_train_begin``: the monitor's sums go into each checkpoint folder
      (``imbalance_monitor.pt``) and come back when ``trainer.train(resume_from_checkpoint=...)``
      resumes, so the first record after a resume covers the same batches as without the
      interruption (under DDP, every rank's: one all-reduce at each save). For a checkpoint
      outside ``output_dir`` call :meth:`load_checkpoint` first.

    **Order.** The ``Trainer`` runs its callbacks in list order: its own flow callback, the
    reporters of ``report_to``, then those passed as ``callbacks=[...]``. A callback there would
    add its values after the reporters wrote theirs, so :meth:`add_to` puts this one first. Given
    in ``callbacks=[...]`` instead, it still fills ``log_history`` when ``report_to="none"``, and
    raises at ``on_train_begin`` when reporters are configured (they would miss the values).

    Args:
        monitor: the monitor to drive.

    Raises:
        TypeError: ``monitor`` is not an :class:`~imbalance_losses.ImbalanceMonitor`.

    Example:
        >>> import torch
        >>> from imbalance_losses import ImbalanceMonitor
        >>> from imbalance_losses.integrations.transformers import MonitorCallback
        >>> from transformers import TrainerState, TrainingArguments
        >>> callback = MonitorCallback(ImbalanceMonitor(["audio", "visual"]))
        >>> callback.monitor.update({"audio": torch.tensor([[2.0, 0.0]]),
        ...                          "visual": torch.tensor([[0.0, 2.0]])}, torch.tensor([0]))
        >>> logs = {"loss": 0.7}
        >>> args = TrainingArguments("unused", report_to="none")
        >>> callback.on_log(args, TrainerState(), None, logs=logs)
        >>> logs["imbalance/audio/acc"], logs["imbalance/visual/acc"], logs["imbalance/samples"]
        (1.0, 0.0, 1.0)
    """

    def __init__(self, monitor: ImbalanceMonitor) -> None:
        if not isinstance(monitor, ImbalanceMonitor):
            raise TypeError(
                "MonitorCallback takes an ImbalanceMonitor, got " + type(monitor).__name__
            )
        self.monitor = monitor
        self._first = False  # placed ahead of the reporters by add_to()
        self._loaded_step: int | None = None

    def add_to(self, trainer: Trainer) -> None:
        """Add this callback to ``trainer`` ahead of every other one (its reporters included).

        Moves it to the front if the trainer already has it.
        """
        callbacks: list[TrainerCallback] = trainer.callback_handler.callbacks
        callbacks[:] = [self, *(cb for cb in callbacks if cb is not self)]
        self._first = True

    # ------------------------------------------------------------------ events

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Refuse a place behind the reporters; restore the monitor of a resumed run."""
        if args.report_to and not self._first:
            raise ValueError(
                f"MonitorCallback runs after the Trainer's reporters {list(args.report_to)}, "
                "which would log without the monitor's values: add it with "
                "MonitorCallback(monitor).add_to(trainer) instead of callbacks=[...]"
            )
        _resume(args, state, MONITOR_STATE_FILE, (self.monitor,), self._loaded_step)
        self._loaded_step = None

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Add this step's encoder gradient norms (a monitor built with ``encoders=`` only)."""
        if self.monitor.has_encoders:  # observe_gradients() raises without encoders=
            self.monitor.observe_gradients()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the values since the last training record to this one, then reset."""
        if logs is None or "loss" not in logs:
            return  # an evaluation or the end-of-training summary
        values = self.monitor.compute()
        self.monitor.reset()
        logs.update(values)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)  # the Trainer copied `logs` there before on_log

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write the monitor's sums into the checkpoint folder just saved.

        Every rank's sums (``state_dict(all_ranks=True)``, one all-reduce: every rank runs
        ``on_save``): the main process writes the file that every rank reads on resume.
        """
        states = [self.monitor.state_dict(all_ranks=True)]  # on every rank, before should_save
        _save_states(args, state, MONITOR_STATE_FILE, (self.monitor,), states)

    def load_checkpoint(
        self,
        checkpoint: str | os.PathLike[str],
        map_location: str | torch.device | None = None,
    ) -> None:
        """Restore the monitor from ``<checkpoint>/imbalance_monitor.pt`` now.

        ``on_train_begin`` does this itself for checkpoints under ``output_dir``; call it for
        one elsewhere, before ``trainer.train(resume_from_checkpoint=checkpoint)``.
        ``map_location`` as in ``torch.load`` (e.g. ``training_args.device``, or ``"cpu"`` for a
        state saved on a GPU); ``None`` keeps each tensor on the device it was saved from.

        Raises:
            FileNotFoundError: the folder has no ``imbalance_monitor.pt``.
            ValueError: the file holds another module's state, or another modalities'.
        """
        self._loaded_step = _load_states(
            checkpoint, MONITOR_STATE_FILE, (self.monitor,), map_location
        )
