"""Hugging Face ``Trainer`` glue: attach the modulators, keep every module's state in checkpoints.

The ``Trainer`` owns the loop, so two things move out of the user's hands:

* **the step.** :class:`ModulatorCallback` attaches each module that acts between backward and
  the optimiser step (:class:`~imbalance_losses.ModalityGradientModulator`; ARL and AGM built
  with ``encoders=``) to the ``Trainer``'s optimiser at ``on_train_begin``
  (:meth:`~imbalance_losses._attachment.OptimizerAttachable.attach`), and detaches it at
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

Nothing here is imported by ``import imbalance_losses``; this module imports ``transformers``
(``pip install "imbalance-losses[transformers]"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .._attachment import OptimizerAttachable

__all__ = ["STATE_FILE", "ModulatorCallback"]

STATE_FILE = "imbalance_losses.pt"
"""The file each checkpoint folder gets: ``{"global_step": int, "modules": [{type, state}]}``."""


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """``<output_dir>/checkpoint-<global step>``, the folder the ``Trainer`` saves a step to."""
    return os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")


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
        if state.global_step > 0 and self._loaded_step != state.global_step:
            folder = _checkpoint_folder(args, state)
            if not os.path.isfile(os.path.join(folder, STATE_FILE)):
                raise FileNotFoundError(
                    f"resuming at global step {state.global_step}, but {folder} has no "
                    f"{STATE_FILE} with the modules' state; for a checkpoint outside "
                    "output_dir call callback.load_checkpoint(<checkpoint folder>) before "
                    "trainer.train(resume_from_checkpoint=<checkpoint folder>)"
                )
            self.load_checkpoint(folder)
        if self._loaded_step is not None and self._loaded_step != state.global_step:
            raise ValueError(
                f"load_checkpoint() read the modules' state of global step {self._loaded_step}, "
                f"but the Trainer starts at global step {state.global_step}: resume from the "
                "same checkpoint"
            )
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
        if not args.should_save:
            return
        folder = _checkpoint_folder(args, state)
        torch.save(
            {
                "global_step": state.global_step,
                "modules": [
                    {"type": type(m).__name__, "state": m.state_dict()} for m in self.modules
                ],
            },
            os.path.join(folder, STATE_FILE),
        )

    # ------------------------------------------------------------------ explicit restore

    def load_checkpoint(self, checkpoint: str | os.PathLike[str]) -> None:
        """Restore the modules from ``<checkpoint>/imbalance_losses.pt`` now.

        ``on_train_begin`` does this itself for checkpoints under ``output_dir``; call it for
        one elsewhere, before ``trainer.train(resume_from_checkpoint=checkpoint)``.

        Raises:
            FileNotFoundError: the folder has no ``imbalance_losses.pt``.
            ValueError: the file holds other modules (number or kinds) than this callback's.
        """
        saved = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=True)
        entries = saved["modules"]
        kinds = [type(m).__name__ for m in self.modules]
        if [e["type"] for e in entries] != kinds:
            raise ValueError(
                f"{os.fspath(checkpoint)} holds the state of {[e['type'] for e in entries]}, "
                f"this callback has {kinds}: pass the same modules in the same order"
            )
        for module, entry in zip(self.modules, entries, strict=True):
            module.load_state_dict(entry["state"])
        self._loaded_step = int(saved["global_step"])
