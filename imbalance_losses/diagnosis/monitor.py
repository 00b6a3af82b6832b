"""Is my model imbalanced, and is the remedy working? Per-modality curves for any training loop.

:class:`ImbalanceMonitor` has no parameters and changes nothing in training. Fed each step with
what the loop already has (the features and the fusion head, or the unimodal logits, and the
target; optionally the encoders' gradients), it keeps per-modality **sums** on the device and
pools them over micro-batches and DDP ranks in :meth:`ImbalanceMonitor.compute`, with the same
machinery (:class:`~imbalance_losses.core.running.RunningSums`, one all-reduce) the methods use for
their own statistics. Per modality ``m``, over the ``N`` counted samples since the last
:meth:`~ImbalanceMonitor.reset` (every micro-batch, every rank), with ``z_m`` the unimodal logits
through the shared head (:func:`~imbalance_losses.unimodal_logits`)::

    acc_m        = (1/N) sum_b [argmax_c z_m[b, c] = y_b]
    confidence_m = (1/N) sum_b softmax(z_m)[b, y_b]                      (s_m / N)
    ratio_m      = min(s_m / mean_{k != m} s_k, max_ratio)               (OGM's rho_m)

``s_m = sum_b softmax(z_m)[b, y_b]`` is OGM's score and ``ratio_m`` is computed by the very
function the modulator uses
(:func:`~imbalance_losses.methods.modulation.capped_ratio`): above 1, the
modality is more confident on the true class than the others on average (it dominates). Over the
``T`` optimiser steps whose gradients were observed (:meth:`~ImbalanceMonitor.observe_gradients`,
steps with a non-finite gradient left out)::

    grad_norm_m  = (1/T) sum_t ||g_m^t||_2          (g_m^t: every gradient of encoder m, flattened)
    grad_share_m = grad_norm_m / sum_k grad_norm_k  (0 when every norm is 0)

Soft targets ``[B, C]`` count ``y_b = argmax_c t_bc`` for the accuracy and
``sum_c softmax(z_m)_bc t_bc`` for the confidence; class indices equal to ``ignore_index`` are
left out of every sum and of ``N``. A window with ``N = 0`` (every target ``ignore_index``, or
only empty batches) has no accuracy, confidence or ratio: :meth:`~ImbalanceMonitor.compute`
raises, as it does for a window with no :meth:`~ImbalanceMonitor.update` at all.

Under DDP every rank observes the same optimiser steps (each holds the all-reduced gradients),
so ``T`` is the number of optimiser steps, not steps x ranks: the pooled count of observed steps
is divided by the number of ranks that observed any (a rank that observed no gradient adds
neither norms nor steps), and ``grad_norm_m`` is the mean over every observed step of every rank
(the same as one rank's when the ranks' gradients agree).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.distributed import ProcessGroup, is_distributed
from ..core.gradients import norms, segment_sum
from ..core.params import modality_parameters
from ..core.records import StepRecord
from ..core.running import RunningSums
from ..core.scoring import capped_ratio
from ..core.stats import as_fp32, counted, true_class_probability
from ..core.unimodal import Head, eval_mode, unimodal_logits
from ..core.validation import (
    check_same_modalities,
    check_scored_logits,
    check_state_keys,
    int_param,
    real_param,
)

__all__ = ["PREFIX", "ImbalanceMonitor"]

PREFIX = "imbalance"
"""The first component of every key :meth:`ImbalanceMonitor.compute` returns."""


class _HasRecord(Protocol):
    @property
    def last(self) -> StepRecord | None: ...


class ImbalanceMonitor:
    """Per-modality accuracy, confidence, imbalance ratio and gradient share, ready to log.

    Two lines in an existing loop (features ``feats`` from the encoders, ``model.head`` the
    fusion head)::

        monitor = ImbalanceMonitor(["audio", "visual"], head=model.head, encoders=model.encoders)
        ...
        monitor.update(feats, y)               # each (micro-)batch; no host read
        loss.backward()
        monitor.observe_gradients()            # after backward (and any remedy), before step()
        optimizer.step()
        ...
        self.log_dict(monitor.compute())       # each epoch (or every N steps); then reset()
        monitor.reset()

    :meth:`compute` returns a flat ``dict[str, float]`` named like the common loggers expect
    (TensorBoard / W&B group by the ``/`` path): ``imbalance/<modality>/acc``,
    ``.../confidence``, ``.../ratio``, ``.../grad_norm``, ``.../grad_share``,
    ``imbalance/samples``, and for every method given to :meth:`track` its ``last`` record
    (``imbalance/<name>/<field>/<modality>``). The formulas are in the module docstring.

    Args:
        modalities: the modality names, in the order the model concatenates them (at least two).
        head: the fusion head. When given, :meth:`update` takes the per-modality **features**
            and reads the unimodal logits off this head (:func:`~imbalance_losses.unimodal_logits`,
            under ``no_grad``, its modules in eval mode: no BatchNorm statistic or dropout draw
            changes training); when ``None``, :meth:`update` takes the **unimodal logits**.
        encoders: mapping (or ``nn.ModuleDict``) modality -> encoder (``nn.Module`` or iterable
            of parameters), in the order of ``modalities``, whose gradient norms
            :meth:`observe_gradients` reads.
        ignore_index: class-index targets equal to it are left out (``None``: none).
        max_ratio: the cap of ``ratio_m`` (the modulator's default, 100).
        process_group: the group :meth:`compute` pools over (``None``: the world).

    Raises:
        ValueError: fewer than two modalities, repeated names, encoders whose modalities differ
            from ``modalities``, ``max_ratio <= 1``.

    Example:
        >>> import torch
        >>> monitor = ImbalanceMonitor(["audio", "image"])
        >>> logits = {"audio": torch.tensor([[2.0, 0.0], [2.0, 0.0]]),
        ...           "image": torch.tensor([[0.0, 2.0], [2.0, 0.0]])}
        >>> monitor.update(logits, torch.tensor([1, 0]))
        >>> values = monitor.compute()
        >>> values["imbalance/audio/acc"], values["imbalance/image/acc"]
        (0.5, 1.0)
        >>> round(values["imbalance/image/ratio"], 3)   # 2 sigmoid(2) / (sigmoid(-2) + sigmoid(2))
        1.762
    """

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        head: Head | None = None,
        encoders: Mapping[str, nn.Module | Iterable[Tensor]] | nn.ModuleDict | None = None,
        ignore_index: int | None = -100,
        max_ratio: float = 100.0,
        process_group: ProcessGroup | None = None,
    ) -> None:
        if isinstance(modalities, str) or not isinstance(modalities, Sequence):
            raise TypeError(
                "modalities must be a sequence of names such as ['audio', 'visual'], got "
                f"{type(modalities).__name__}"
            )
        names = tuple(modalities)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"modalities must be at least two distinct names, got {list(names)}")
        self.modalities = names
        self.head = head
        self.ignore_index = (
            None if ignore_index is None else int_param("ignore_index", ignore_index)
        )
        self.max_ratio = real_param("max_ratio", max_ratio, gt=1.0)
        self.process_group = process_group
        self._params: list[tuple[int, str, Tensor]] = []
        if encoders is not None:
            if isinstance(encoders, nn.ModuleDict):
                encoders = dict(encoders.items())
            if not isinstance(encoders, Mapping):
                raise TypeError(
                    "encoders must be a mapping modality -> nn.Module or parameters (a dict or "
                    f"nn.ModuleDict), got {type(encoders).__name__}"
                )
            check_same_modalities(
                names, encoders, expected_what="the monitor's", actual_what="encoders"
            )
            self._params = modality_parameters(encoders, what="encoders")
        self._tracked: dict[str, _HasRecord] = {}
        self._pool = RunningSums()  # [correct_1..M, s_1..M] and the counted samples
        self._grad_sums: Tensor | None = None  # [M] sum over steps of ||g_m||
        self._grad_steps: Tensor | None = None  # 0-dim, the steps with finite gradients
        self._device: torch.device | None = self._params[0][2].device if self._params else None

    @property
    def has_encoders(self) -> bool:
        """Whether the monitor was built with ``encoders=`` (so :meth:`observe_gradients` works)."""
        return bool(self._params)

    # ------------------------------------------------------------------ feeding

    def update(self, inputs: Mapping[str, Tensor], target: Tensor) -> None:
        """Add one (micro-)batch: per modality, correct predictions and true-class confidence.

        No host read: the sums stay on the device until :meth:`compute`.

        Args:
            inputs: mapping modality -> features ``[B, ..., D_m]`` when the monitor has a
                ``head`` (the logits are read off it under ``no_grad``, in eval mode), else
                modality -> unimodal logits ``[B, C]``; the monitor's modalities, in its order.
            target: class indices ``[B]`` (``ignore_index`` allowed) or soft targets ``[B, C]``.

        Raises:
            ValueError: modalities that differ from the monitor's, logits that are not
                ``[B, C]`` or differ in shape between modalities, batch-size mismatch, targets
                out of range, non-finite logits, a target on another device than the logits
                (messages name the modality and the shapes or devices).
            TypeError: non-tensor input, non-floating-point logits or features.
        """
        if self.head is not None:
            check_same_modalities(
                self.modalities, inputs, expected_what="the monitor's", actual_what="features"
            )
            with torch.no_grad(), eval_mode(self.head):
                logits = unimodal_logits(self.head, inputs)
        else:
            logits = dict(inputs)
        batch, _ = check_scored_logits(
            logits, target, self.modalities, owner="the monitor's", ignore_index=self.ignore_index
        )
        mask = counted(target, self.ignore_index)
        labels = target.detach().argmax(-1) if target.is_floating_point() else target.detach()
        zs = list(logits.values())
        hits = torch.stack([z.detach().argmax(-1) == labels for z in zs])  # [M, B]
        if mask is not None:
            hits = hits & mask
        confidence = torch.stack(
            [true_class_probability(z, target, self.ignore_index).sum() for z in zs]
        )
        sums = torch.cat([hits.sum(1).to(confidence.dtype), confidence])
        self._pool.add(sums, batch if mask is None else mask.sum(), rows=batch)
        self._device = sums.device

    def observe_gradients(self) -> None:
        """Add this step's gradient norm of every encoder (no host read).

        Call once per optimiser step, after ``loss.backward()`` (and, under gradient
        accumulation, after the last micro-batch's) and before ``optimizer.step()`` /
        ``zero_grad()``. Call it after any remedy that rewrites gradients (OGM's ``step()``,
        MMPareto's ``backward``) to see what the optimiser applies, or before it to see what the
        loss asked for. Under AMP call it after ``scaler.unscale_(optimizer)``; a step whose
        gradients are not finite (a skipped AMP step) is left out. Parameters without a gradient
        count as zero.

        Raises:
            RuntimeError: the monitor was built without ``encoders``.
        """
        if not self._params:
            raise RuntimeError(
                "ImbalanceMonitor.observe_gradients() needs the encoders: pass "
                "ImbalanceMonitor(modalities, encoders={'audio': model.audio_net, ...})"
            )
        present = [(m, p.grad) for m, _, p in self._params if p.grad is not None]
        if not present:
            return
        grads = [g for _, g in present]
        counts = [sum(1 for m, _ in present if m == i) for i in range(len(self.modalities))]
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        per_tensor = norms(grads, dtype=dtype)
        per_modality = segment_sum(per_tensor.square(), counts).sqrt()
        finite = torch.isfinite(per_modality).all()
        step = torch.where(finite, per_modality, torch.zeros_like(per_modality))
        if self._grad_sums is None or self._grad_steps is None:
            self._grad_sums = torch.zeros_like(step)
            self._grad_steps = torch.zeros((), dtype=step.dtype, device=step.device)
        self._grad_sums = self._grad_sums.to(step.device) + step
        self._grad_steps = self._grad_steps.to(step.device) + finite.to(step.dtype)
        self._device = self._device or step.device

    def track(self, method: _HasRecord, name: str | None = None) -> None:
        """Include ``method.last`` (a step record) in :meth:`compute`.

        Its fields appear as ``imbalance/<name>/<field>/<modality>`` (per-modality vectors) and
        ``imbalance/<name>/<field>`` (scalars), read from the **last** step's record (the record
        is already pooled over ranks by the method). ``name`` defaults to the class name in
        lower case.

        Raises:
            TypeError: ``method`` has no ``last`` attribute.
            ValueError: ``name`` is already tracked, or collides with a modality.
        """
        if not hasattr(method, "last"):
            raise TypeError(
                f"track() needs a method with a `last` record, got {type(method).__name__}"
            )
        key = type(method).__name__.lower() if name is None else str(name)
        if key in self._tracked or key in self.modalities or "/" in key or not key:
            raise ValueError(
                f"track(name={key!r}): the name must be new, must not contain '/' and must not "
                f"be one of the modalities {list(self.modalities)}"
            )
        self._tracked[key] = method

    # ------------------------------------------------------------------ reading

    def _pooled(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(correct [M], confidence sums [M], samples, gradients)``, pooled over the ranks.

        ``gradients`` is ``[M + 2]``: the gradient-norm sums, the observed steps and the number
        of ranks that observed at least one step (each summed over the ranks).
        """
        m = len(self.modalities)
        device = self._device or torch.device("cpu")
        if self._grad_sums is None or self._grad_steps is None:
            grads = torch.zeros(m + 2, device=device)
        else:
            steps = self._grad_steps.reshape(1)
            grads = torch.cat([self._grad_sums, steps, (steps > 0).to(steps.dtype)])
        saved = self._pool.state_dict()  # compute() reads; it does not reset
        try:
            pooled = self._pool.pool(
                2 * m,
                device,
                self.process_group,
                missing="ImbalanceMonitor.compute() called with nothing observed since reset(): "
                "call update(inputs, target) on at least one batch first",
                extra=grads,
            )
        finally:
            self._pool.load_state_dict(saved)
        assert pooled.extra is not None
        return pooled.sums[:m], pooled.sums[m:], pooled.samples, pooled.extra

    def compute(self) -> dict[str, float]:
        """The pooled values since the last :meth:`reset`, as ``{"imbalance/...": float}``.

        One all-reduce under DDP (call it on every rank), then one host read. It does not reset.

        Raises:
            RuntimeError: nothing was passed to :meth:`update` since the last reset (on any
                rank), or no sample was counted (every target ``ignore_index`` or every batch
                empty, on every rank): the decision is taken on the pooled count, so under DDP
                every rank raises in the same call.
        """
        m = len(self.modalities)
        correct, confidence, samples, grads = self._pooled()
        n = samples.clamp_min(1.0)
        acc = correct.double() / n
        conf = confidence.double() / n
        ratio = capped_ratio(confidence, self.max_ratio)
        rows = [acc, conf, ratio.double()]
        steps, ranks = grads[m].double(), grads[m + 1].double()
        grad_norm = grads[:m].double() / steps.clamp_min(1.0)  # over every rank's steps
        total = grad_norm.sum()
        share = torch.where(total > 0, grad_norm / total.clamp_min(1e-300), 0.0)
        per_rank = (steps / ranks.clamp_min(1.0)).reshape(1)  # optimiser steps, not x ranks
        host = torch.cat([*rows, grad_norm, share, samples.reshape(1).double(), per_rank])
        values = host.cpu().tolist()
        if values[-2] == 0:  # pooled: every rank reads the same count and raises alike
            why = "every batch was empty"
            if self.ignore_index is not None:
                why = f"every target was ignore_index={self.ignore_index} or every batch was empty"
            raise RuntimeError(
                "ImbalanceMonitor.compute(): the window since reset() had no countable sample "
                f"({why}, on every rank), so accuracy, confidence and ratio are undefined; call "
                "update(inputs, target) on at least one batch with a counted target first"
            )
        out: dict[str, float] = {}
        names = ("acc", "confidence", "ratio", "grad_norm", "grad_share")
        observed_grads = values[-1] > 0
        for i, what in enumerate(names):
            if what.startswith("grad") and not observed_grads:
                continue
            for j, modality in enumerate(self.modalities):
                out[f"{PREFIX}/{modality}/{what}"] = float(values[i * m + j])
        out[f"{PREFIX}/samples"] = float(values[-2])
        if observed_grads:
            out[f"{PREFIX}/grad_steps"] = float(values[-1])
        for key, method in self._tracked.items():
            record = method.last
            if record is None:
                continue
            for field, value in record.to_dict().items():
                out[f"{PREFIX}/{key}/{field}"] = value
        return out

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything observed (call at the start of each epoch or logging window)."""
        self._pool.reset()
        self._grad_sums = self._grad_steps = None

    def state_dict(self, *, all_ranks: bool = False) -> dict[str, Any]:
        """Copies of the not yet computed sums: a checkpoint resumes mid-epoch exactly.

        Args:
            all_ranks: under DDP, the state of **every** rank's :meth:`update` sums, for a
                checkpoint that one rank writes and every rank reads (Lightning, the Hugging
                Face ``Trainer``): one all-reduce, so call it on every rank of the monitor's
                process group. :meth:`load_state_dict` of it keeps those sums on the group's
                first rank only, so that :meth:`compute` counts them once. (The gradient sums
                are every rank's own: the ranks observe the same all-reduced gradients.)
                Without a process group it is the local state. ``False`` (default): this
                rank's sums only, with no collective (a checkpoint per rank, or one process).
        """
        pooled = all_ranks and is_distributed(self.process_group)
        device = self._device or torch.device("cpu")
        pool = (
            self._pool.all_ranks_state(2 * len(self.modalities), device, self.process_group)
            if pooled
            else self._pool.state_dict()
        )
        state: dict[str, Any] = {
            "modalities": list(self.modalities),
            "pool": pool,
            "grad_sums": None if self._grad_sums is None else self._grad_sums.clone(),
            "grad_steps": None if self._grad_steps is None else self._grad_steps.clone(),
        }
        if pooled:  # marked only then: a local state keeps the saved format of 0.1.0
            state["all_ranks"] = True
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        A state of every rank's sums (``state_dict(all_ranks=True)``) loaded under DDP keeps
        them on the group's first rank (the others start empty); in one process, all of them.

        Raises:
            KeyError: a key is missing.
            ValueError: the state was saved for other modalities.
        """
        check_state_keys(
            state, ("modalities", "pool", "grad_sums", "grad_steps"), who="ImbalanceMonitor"
        )
        if list(state["modalities"]) != list(self.modalities):
            raise ValueError(
                f"the state is for modalities {list(state['modalities'])}, this monitor has "
                f"{list(self.modalities)}"
            )
        pool = dict(state["pool"])
        if state.get("all_ranks", False) and is_distributed(self.process_group):
            if dist.get_rank(self.process_group) != 0:  # every rank's sums, counted once
                pool = {"sums": None, "count": None, "rows": 0}
        self._pool.load_state_dict(pool)
        sums, steps = state["grad_sums"], state["grad_steps"]
        self._grad_sums = None if sums is None else as_fp32(sums).clone()
        self._grad_steps = None if steps is None else as_fp32(steps).clone()

    def __repr__(self) -> str:
        return (
            f"ImbalanceMonitor(modalities={list(self.modalities)}, "
            f"head={'yes' if self.head is not None else 'no'}, encoders={bool(self._params)}, "
            f"tracked={list(self._tracked)})"
        )
