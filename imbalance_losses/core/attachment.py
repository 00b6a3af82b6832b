"""Running a module's before-step action inside ``optimizer.step()``, in any trainer.

A gradient-side module (:class:`~imbalance_losses.ModalityGradientModulator`, AGM in encoders
mode) acts once per optimiser step, after the last ``backward`` and before the update. Called by
hand that is one line between ``backward`` and ``optimizer.step()``; a trainer (Lightning, the
Hugging Face ``Trainer``, Accelerate) owns that place. :class:`OptimizerAttachable` moves the
action into the optimiser itself with ``torch.optim.Optimizer.register_step_pre_hook``:

* it runs once per call of the real optimiser's ``step()``, so exactly once per real update;
* ``GradScaler.step(opt)`` unscales first and calls ``opt.step()`` only when every gradient is
  finite: the action sees unscaled gradients and never runs on a step the scaler skips. An
  optimiser that handles the scaling itself (``fused=True``) is called on every step with
  ``opt.found_inf``: the action is skipped when it is set (one host read of the flag), and it
  sees the gradients still scaled unless ``scaler.unscale_(opt)`` ran first (the modules'
  actions scale with the gradients, OGM-GE's noise with their std: the update is the same);
* under gradient accumulation the trainer calls ``step()`` once per accumulated batch
  (Accelerate's ``AcceleratedOptimizer`` skips the inner step on non-sync micro-batches);
* gradient clipping, done by every trainer before ``optimizer.step()``, comes before the action;
* ``optimizer.step(closure)`` (Lightning's default, LBFGS): the pre-hook fires before the
  closure has computed any gradient, so the closure is wrapped and the action runs right after
  it returns (after each evaluation, for an optimiser that evaluates it several times);
* a step in which no parameter the module changes holds a gradient (Lightning's
  ``training_step`` returned ``None`` to skip the batch: no backward ran) has nothing to act
  on: the action is skipped, as on a step the scaler skips.

Wrappers holding the real optimiser in ``.optimizer`` (``AcceleratedOptimizer``,
``LightningOptimizer``) are unwrapped, since their own ``step()`` may call the real one
conditionally or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

__all__ = ["OptimizerAttachable", "OptimizerAttachment", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The real ``torch.optim.Optimizer`` behind ``optimizer``.

    Follows ``.optimizer`` while it holds an optimiser (Accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, nested wrappers).

    Raises:
        TypeError: neither ``optimizer`` nor anything it wraps is a ``torch.optim.Optimizer``.

    Example:
        >>> import torch
        >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        >>> class Wrapper:
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(sgd)) is sgd
        True
    """
    current = optimizer
    for _ in range(16):  # wrappers of wrappers, with a bound against a cycle
        inner = getattr(current, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is current:
            break
        current = inner
    if not isinstance(current, torch.optim.Optimizer):
        raise TypeError(
            "attach() needs a torch.optim.Optimizer (or a wrapper holding one in .optimizer), "
            f"got {type(optimizer).__name__}"
        )
    return current


class OptimizerAttachment:
    """What :meth:`OptimizerAttachable.attach` returns: ``remove()`` (or ``with``) detaches.

    Attributes:
        optimizer: the real optimiser the action is attached to (wrappers unwrapped).
    """

    def __init__(
        self, owner: OptimizerAttachable, optimizer: torch.optim.Optimizer, hook: Any
    ) -> None:
        self.optimizer = optimizer
        self._owner = owner
        self._hook = hook

    def remove(self) -> None:
        """Detach: later ``optimizer.step()`` calls no longer run the action (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._owner.__dict__.get("_attachment") is self:
            self._owner.__dict__["_attachment"] = None

    def __enter__(self) -> OptimizerAttachment:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._hook is not None else "removed"
        return f"OptimizerAttachment({type(self.optimizer).__name__}, {state})"


class OptimizerAttachable:
    """Mixin of the modules whose action belongs between ``backward`` and ``optimizer.step()``.

    A subclass implements :meth:`_before_optimizer_step` (the action: its ``step()``) and
    :meth:`_attached_parameters` (``(modality, parameter)`` pairs it changes the gradient of,
    which the optimiser must update), and overrides :attr:`attachable` where only some of its
    modes have a step. The state lives in the instance ``__dict__``, so the mixin
    sits in front of ``nn.Module`` as well as of a plain class.
    """

    def _before_optimizer_step(self) -> None:
        raise NotImplementedError

    def _attached_parameters(self) -> list[tuple[str, Tensor]]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """The state ``copy.deepcopy`` and pickling use, without the attachment.

        A copy (an EMA model, ``torch.save(model)``) is never attached: the optimiser and its hook
        stay with the original, and the copy does not drag the optimiser and its state along.
        """
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state.pop("_attachment", None)
        return state

    @property
    def attachable(self) -> bool:
        """Whether the module has a before-step action in its current mode (default: yes)."""
        return True

    @property
    def attached_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimiser the module is attached to, or ``None``."""
        attachment: OptimizerAttachment | None = self.__dict__.get("_attachment")
        return None if attachment is None else attachment.optimizer

    def attach(self, optimizer: object) -> OptimizerAttachment:
        """Run this module's ``step()`` inside every ``optimizer.step()``, before the update.

        Uses ``optimizer.register_step_pre_hook``: the action runs exactly once per real
        optimiser step, in any training loop or trainer, after gradient clipping and after
        ``GradScaler`` unscaling, and never on a step the scaler skips. Keep feeding it per
        (micro-)batch as before (``observe(...)`` for the gradient modulator, the forward call
        for AGM); only the ``step()`` call moves into the optimiser. With
        ``optimizer.step(closure)`` the action runs right after the closure returns. A step the
        scaler skips, or one in which no parameter this module changes holds a gradient
        (Lightning's ``training_step`` returned ``None``: the batch is skipped), leaves what
        was observed in the pool: the next real step decides from both steps' batches, and
        the step counter counts real updates only.

        Args:
            optimizer: a ``torch.optim.Optimizer`` or a wrapper holding one in ``.optimizer``
                (``AcceleratedOptimizer``, ``LightningOptimizer``); it must update every
                parameter this module changes the gradient of that requires a gradient.

        Returns:
            an :class:`OptimizerAttachment`; ``remove()`` on it (or leaving its ``with``
            block) detaches, as :meth:`detach` does.

        Raises:
            TypeError: not an optimiser.
            RuntimeError: the module has no step in its mode (AGM, ARL without ``encoders=``);
                already attached (to this or another optimiser): :meth:`detach`
                first. Parameters split over several optimisers: call ``step()`` by hand.
            ValueError: a parameter the module changes is not in the optimiser's groups.

        Example:
            >>> import torch
            >>> from imbalance_losses import ModalityGradientModulator, unimodal_logits
            >>> enc = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Linear(3, 4)}
            >>> head = torch.nn.Linear(8, 2)
            >>> params = [p for m in (*enc.values(), head) for p in m.parameters()]
            >>> opt = torch.optim.SGD(params, lr=0.1)
            >>> modulator = ModalityGradientModulator(enc, alpha=0.5, method="ogm")
            >>> handle = modulator.attach(opt)
            >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
            >>> feats = {m: e(x) for m, e in enc.items()}
            >>> logits = head(torch.cat(list(feats.values()), 1))
            >>> torch.nn.functional.cross_entropy(logits, y).backward()
            >>> modulator.observe(unimodal_logits(head, feats), y)
            >>> opt.step()  # runs modulator.step() first
            >>> modulator.step_count
            1
            >>> modulator.detach()
            >>> modulator.attached_optimizer is None
            True
        """
        if not self.attachable:
            raise RuntimeError(
                f"{type(self).__name__} was built without encoders=: it scales the feature "
                "gradients during backward and has no step() to attach; build it with "
                "encoders={...} for one coefficient per optimizer step"
            )
        real = unwrap_optimizer(optimizer)
        current = self.attached_optimizer
        if current is not None:
            where = "this optimizer" if current is real else f"another {type(current).__name__}"
            raise RuntimeError(
                f"{type(self).__name__} is already attached to {where}; call detach() first "
                "(one module acts at one optimizer's step: if its parameters are split over "
                "several optimizers, call its step() yourself before theirs)"
            )
        self._check_parameters(real)

        def act() -> None:
            if not self._without_gradients():
                self._before_optimizer_step()

        def before_step(
            opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if _scaler_skips(opt):
                return None
            # args is (optimizer, *step's positional arguments): step(closure) has it at 1
            positional = len(args) > 1
            closure = args[1] if positional else kwargs.get("closure")
            if closure is None:
                _run(act)
                return None
            wrapped = _closure_then(closure, act)
            if positional:
                return (args[0], wrapped, *args[2:]), kwargs
            return args, {**kwargs, "closure": wrapped}

        attachment = OptimizerAttachment(self, real, real.register_step_pre_hook(before_step))
        self.__dict__["_attachment"] = attachment
        return attachment

    def detach(self) -> None:
        """Undo :meth:`attach` (nothing to do when not attached).

        Example:
            >>> import torch
            >>> from imbalance_losses import ModalityGradientModulator
            >>> enc = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Linear(3, 4)}
            >>> opt = torch.optim.SGD([p for e in enc.values() for p in e.parameters()], lr=0.1)
            >>> modulator = ModalityGradientModulator(enc, alpha=0.5)
            >>> _ = modulator.attach(opt)
            >>> modulator.detach()
            >>> modulator.detach()  # idempotent
            >>> len(opt._optimizer_step_pre_hooks)
            0
        """
        attachment: OptimizerAttachment | None = self.__dict__.get("_attachment")
        if attachment is not None:
            attachment.remove()

    def _without_gradients(self) -> bool:
        """Whether the step has nothing to act on: no parameter this module changes has a gradient.

        True only for a module that changes gradients (:meth:`_attached_parameters` not empty)
        when none of its trainable parameters holds one, as when Lightning's ``training_step``
        returned ``None`` (the batch is skipped, no backward ran). Reads tensor metadata only
        (no host sync).
        """
        trainable = [p for _, p in self._attached_parameters() if p.requires_grad]
        return bool(trainable) and all(p.grad is None for p in trainable)

    def _check_parameters(self, optimizer: torch.optim.Optimizer) -> None:
        updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            (m, p)
            for m, p in self._attached_parameters()
            if p.requires_grad and id(p) not in updated
        ]
        if missing:
            modalities = sorted({m for m, _ in missing})
            shapes = [tuple(p.shape) for _, p in missing[:4]]
            raise ValueError(
                f"{len(missing)} parameter(s) of modalities {modalities} (shapes {shapes}"
                f"{', ...' if len(missing) > 4 else ''}) that {type(self).__name__} modulates "
                f"are not in this {type(optimizer).__name__}'s param_groups: attach it to the "
                "optimizer that updates its encoders"
            )


def _scaler_skips(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``GradScaler.step`` is running a step that the optimiser itself will skip.

    An optimiser that handles AMP scaling itself (``_step_supports_amp_scaling``: fused or
    capturable Adam / AdamW / SGD) is always called by ``GradScaler.step``, with the overflow
    flag in ``optimizer.found_inf``; its kernel then leaves the parameters alone. One host read
    of that flag, as ``GradScaler.step`` makes itself for any other optimiser.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, Tensor) and bool(found_inf)


def _run(act: Callable[[], None]) -> None:
    with torch.no_grad():
        act()


def _closure_then(closure: Callable[[], Any], act: Callable[[], None]) -> Callable[[], Any]:
    """``closure`` followed by the action (the gradients exist only once the closure ran)."""

    def closure_then_act() -> Any:
        loss = closure()
        _run(act)
        return loss

    return closure_then_act
