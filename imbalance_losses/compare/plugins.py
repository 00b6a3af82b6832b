"""One small adapter per method: how :func:`compare_remedies` plugs it into a training loop.

Every adapter is a :class:`RemedyPlugin`: a short name, a label, the method's documented
defaults, an optional small grid, :meth:`RemedyPlugin.applies` (``None``, or the reason it does
not apply to this model) and :meth:`RemedyPlugin.setup`, which builds the method's objects for
one run and returns its :class:`Hooks`. The training loop only ever calls the hooks::

    hooks = remedy.setup(context, config)
    optimizer = make_optimizer(hooks.parameters())
    hooks.attach(optimizer)
    for epoch in range(epochs):
        hooks.epoch_start(epoch)                       # PMR's prototypes, G-Blending's windows
        for features, target in hooks.train_batches(epoch):   # valuation: its own data order
            hooks.train_step(features, target, optimizer)     # MLA, ReconBoost: the whole step
            # the default train_step:
            #   loss = hooks.loss(features, target)
            #   optimizer.zero_grad()
            #   hooks.backward(loss, features, target)   # MMPareto's own backward
            #   hooks.before_step(features, target)      # OGM-GE's modulation
            #   optimizer.step()
        logits = hooks.predict(head, features, hooks.kept)   # validation: boosting's predict
        hooks.epoch_end(epoch)     # after validation, not after the last epoch: re-learning

The defaults of :class:`Hooks` are plain joint training (cross-entropy of the fused logits), so
a new method overrides only what it changes; :func:`register` adds it to :data:`REMEDIES`.
The adapters of the methods that own more of the loop (MLA, ReconBoost, sample-level valuation,
re-learning, UMT, MMCosine) are in :mod:`.plugins_more`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.unimodal import Head, MappingHead, _splits_exactly, unimodal_logits
from ..methods.agm import AdaptiveGradientModulator
from ..methods.arl import ARLLoss
from ..methods.blending import GradientBlending
from ..methods.boosting import SustainedBoostingLoss
from ..methods.mmpareto import MMPareto
from ..methods.modulation import ModalityGradientModulator
from ..methods.opm import ModalityPredictionModulator, kept_mean
from ..methods.pmr import PMRLoss

__all__ = ["REMEDIES", "Config", "Context", "Hooks", "RemedyPlugin", "fused_logits", "register"]

Config = dict[str, float]
Features = dict[str, Tensor]


def fused_logits(head: Head, features: Mapping[str, Tensor]) -> Tensor:
    """The fused logits by the head's kind: a :class:`MappingHead` on the mapping, a mapping of
    heads summed (late fusion), any other head on the concatenation (mapping order)."""
    if isinstance(head, MappingHead):
        return head(features)
    if isinstance(head, Mapping | nn.ModuleDict):
        return torch.stack([head[m](x) for m, x in features.items()]).sum(0)
    return head(torch.cat(list(features.values()), dim=-1))


@dataclass
class Context:
    """What a method needs to know about one run (and, for :meth:`RemedyPlugin.applies`, the model).

    Attributes:
        model: the freshly built model of this run.
        head: ``head(model)``: the fusion head.
        encoders: ``encoders(model)``: modality -> encoder module.
        sample: ``(features, target)`` of the first training batch (for the checks).
        num_classes: the head's output width.
        steps_per_epoch: optimiser steps per epoch (``len(train)``).
        epochs: epochs per run.
        seed: this run's seed.
        train: the training loader; val: the validation loader (never the test loader).
        features: ``batch -> (features, target)`` with this run's model, on its device.
        train_eval: the training split as read for evaluation (no shuffling, no augmentation;
            PMR's prototypes, G-Blending's training losses, the diagnosis' probes); ``None``:
            the training loader.
        optimizer: the comparison's ``optimizer(params)`` (for a method that builds its own
            optimisers: ReconBoost's one per phase); ``None``: not known.
        teachers: ``{modality: batch -> feature}``, the encoders trained alone, frozen (eval
            mode, no grad): set for a method with ``needs_teachers`` (UMT); else ``None``.
    """

    model: nn.Module
    head: Head
    encoders: dict[str, nn.Module]
    sample: tuple[Features, Tensor]
    num_classes: int
    steps_per_epoch: int
    epochs: int
    seed: int
    train: Iterable[Any]
    val: Iterable[Any]
    features: Callable[[Any], tuple[Features, Tensor]]
    train_eval: Iterable[Any] | None = None
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    teachers: Mapping[str, Callable[[Any], Tensor]] | None = None

    @property
    def train_split(self) -> Iterable[Any]:
        """The training split for evaluation passes: ``train_eval``, else the training loader."""
        return self.train if self.train_eval is None else self.train_eval

    @property
    def modalities(self) -> list[str]:
        return list(self.sample[0])

    @property
    def widths(self) -> dict[str, int]:
        return {m: int(x.shape[-1]) for m, x in self.sample[0].items()}

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def device(self) -> torch.device:
        return next(iter(self.sample[0].values())).device

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return fused_logits(self.head, features)

    def batches(self, loader: Iterable[Any]) -> list[tuple[Features, Tensor]]:
        """``(features, target)`` of every batch of ``loader``, eval mode, no grad."""
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = [self.features(batch) for batch in loader]
        self.model.train(training)
        return out


class Hooks:
    """One run of a method inside the loop; the defaults are plain joint training.

    ``kept`` is the method's object that :meth:`predict` needs beyond the model (sustained
    boosting's heads); it is copied with the model at the epoch chosen on validation.
    """

    kept: nn.Module | None = None

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the model's parameters (and the method's own, if any)."""
        return list(self.ctx.model.parameters())

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the run's optimiser."""

    def epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (0-based)."""

    def train_batches(self, epoch: int) -> Iterator[tuple[Features, Tensor]]:
        """The epoch's training batches as ``(features, target)`` (default: ``forward`` of each
        batch of the training loader). A method that owns the data order (sample-level
        valuation) or needs more of each batch (UMT's teachers) replaces it."""
        for batch in self.ctx.train:
            yield self.ctx.features(batch)

    def train_step(
        self, features: Features, target: Tensor, optimizer: torch.optim.Optimizer
    ) -> Tensor:
        """One training step on a batch; returns its loss (checked for divergence once per
        epoch). The default is :meth:`loss`, ``zero_grad``, :meth:`backward`,
        :meth:`before_step`, ``optimizer.step()``; a method that owns the whole step (MLA's
        step per modality, ReconBoost's optimiser per phase) replaces it."""
        loss = self.loss(features, target)
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss, features, target)
        self.before_step(features, target)
        optimizer.step()
        return loss

    def loss(self, features: Features, target: Tensor) -> Tensor:
        return F.cross_entropy(self.ctx.fuse(features), target)

    def backward(self, loss: Tensor, features: Features, target: Tensor) -> None:
        loss.backward()  # type: ignore[no-untyped-call]

    def before_step(self, features: Features, target: Tensor) -> None:
        """Called between the backward pass and ``optimizer.step()``."""

    def epoch_end(self, epoch: int) -> None:
        """Called after each training epoch's validation (and the copy of the best state), not
        after the last epoch (no training follows it): ReconBoost's schedule, the valuation
        pass, re-learning's re-initialisation."""

    def train(self, mode: bool) -> None:
        if self.kept is not None:
            self.kept.train(mode)

    def predict(self, head: Head, features: Features, kept: nn.Module | None) -> Tensor:
        """The fused logits of a (copied) model: ``head`` and ``kept`` are that copy's."""
        return fused_logits(head, features)

    def diagnosis_head(self, head: Head) -> Head | None:
        """The head whose unimodal logits the diagnosis scores (``None``: probes only)."""
        return head

    def record(self) -> Any:
        """What ``trace=True`` keeps of this step (after ``optimizer.step()``): a mapping
        ``{field: float}``, an object with ``to_dict()`` (the method's ``last`` record), or
        ``None`` (nothing). Read on the host once per epoch."""
        return None


@dataclass(frozen=True)
class RemedyPlugin:
    """A method as :func:`compare_remedies` runs it (subclass and :func:`register` to add one).

    Attributes:
        name: the short key (``methods=[...]``, rows).
        label: the row's label.
        defaults: the documented defaults (the run without ``grid=True``).
        grid: the small grid tried with ``grid=True`` on the first seed, chosen on validation.
        uses_head: whether the method reads unimodal logits off the model's head.
        vectors_only: whether the method needs features ``[B, D]`` (no token axis).
        uses_encoders: whether the method acts on the encoders' parameters.
        options: keyword arguments of the method's class that override the adapter's own
            (fixed choices that are not grid values), e.g. ``{"rescale": "paper"}`` for
            MMPareto or ``{"warmup_steps": 100}`` for ARL / OPM.
        same_as: an ablation of another row: no grid, it runs with the setting chosen for the
            row of that name (which must run before it).
        needs_teachers: the method needs each modality's encoder trained alone (UMT):
            :func:`compare_remedies` reuses those of ``alone=True``, or trains them for the row
            (one run per modality, first seed; the row's note says so) and passes them as
            :attr:`Context.teachers`.

    A variant is ``dataclasses.replace(REMEDIES["mmpareto"], name="mmpareto_paper",
    options={"rescale": "paper"})``, passed in ``methods=[...]`` (or :func:`register`-ed).
    """

    name: str = "plain"
    label: str = "joint (plain)"
    defaults: Config = field(default_factory=dict)
    grid: tuple[Config, ...] = ()
    uses_head: bool = True
    vectors_only: bool = False
    uses_encoders: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    same_as: str | None = None
    needs_teachers: bool = False

    def kwargs(self, **adapter: Any) -> dict[str, Any]:
        """The adapter's keyword arguments for the method's class, overridden by ``options``."""
        return {**adapter, **self.options}

    def applies(self, ctx: Context) -> str | None:
        """``None`` when the method applies to this model, else the reason it does not."""
        if self.name == "plain":
            return None
        if len(ctx.modalities) < 2:
            return f"needs at least 2 modalities; the features have {ctx.modalities}"
        if self.vectors_only:
            for m, x in ctx.sample[0].items():
                if x.dim() != 2:
                    return (
                        f"needs vector features [B, D]; {m!r} has shape {tuple(x.shape)} "
                        "(tokens: pool them in forward to use this method)"
                    )
        if self.uses_encoders:
            for m in ctx.modalities:
                encoder = ctx.encoders.get(m)
                if encoder is None or not any(p.requires_grad for p in encoder.parameters()):
                    return f"needs a trainable encoder per modality; {m!r} has none"
        if self.uses_head:
            try:
                with torch.no_grad():
                    unimodal_logits(ctx.head, ctx.sample[0])
            except (TypeError, ValueError, RuntimeError) as err:
                return f"the head gives no unimodal logits: {err}"
        return None

    def note(self, ctx: Context) -> str | None:
        """A caveat shown with the row (``None``: none)."""
        head = ctx.head
        if self.uses_head and not (
            _splits_exactly(head) or isinstance(head, MappingHead | Mapping | nn.ModuleDict)
        ):
            return "unimodal logits by zero-padding the other modalities (approximate)"
        return None

    def configs(self, grid: bool) -> list[Config]:
        """The settings to try: the grid, or the documented defaults alone."""
        return [dict(c) for c in self.grid] if grid and self.grid else [dict(self.defaults)]

    def setup(self, ctx: Context, config: Config) -> Hooks:
        """The method's objects for one run (built once, before the loop)."""
        return Hooks(ctx)


def _epochs(ctx: Context, n: float) -> int:
    """``n`` epochs of steps, at most all but one epoch of the run."""
    return ctx.steps_per_epoch * max(0, min(int(n), ctx.epochs - 1))


class _ARL(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        arl = ARLLoss(
            nn.CrossEntropyLoss(),
            **self.kwargs(
                head=ctx.head,
                gamma=config["gamma"],
                temperature=config["temperature"],
                warmup_steps=_epochs(ctx, config.get("warmup_epochs", 1)),
            ),
        ).to(ctx.device)
        return _LossHooks(ctx, lambda x, y: arl(ctx.fuse(x), y, features=x), arl)


class _LossHooks(Hooks):
    def __init__(
        self, ctx: Context, fn: Callable[[Features, Tensor], Tensor], tracked: Any = None
    ) -> None:
        super().__init__(ctx)
        self.fn = fn
        self.tracked = tracked  # the method's object: its `last` record is the trace

    def loss(self, features: Features, target: Tensor) -> Tensor:
        return self.fn(features, target)

    def record(self) -> Any:
        return getattr(self.tracked, "last", None)


class _OGM(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        modulator = ModalityGradientModulator(
            ctx.encoders,
            **self.kwargs(
                alpha=config["alpha"],
                stop_step=max(1, int(ctx.total_steps * config.get("stop_fraction", 0.5))),
                seed=ctx.seed,
            ),
        )
        return _OGMHooks(ctx, modulator)


class _OGMHooks(Hooks):
    def __init__(self, ctx: Context, modulator: ModalityGradientModulator) -> None:
        super().__init__(ctx)
        self.modulator = modulator

    def before_step(self, features: Features, target: Tensor) -> None:
        self.modulator.step(unimodal_logits(self.ctx.head, features), target)

    def record(self) -> Any:
        return self.modulator.last


class _Boosting(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        boost = SustainedBoostingLoss(
            **self.kwargs(
                num_classes=ctx.num_classes,
                in_features=ctx.widths,
                lam=config["lam"],
                check_every=max(1, ctx.total_steps // 10),  # the official t_N = epochs / 10
                seed=ctx.seed,
            )
        ).to(ctx.device)
        return _BoostHooks(ctx, boost)


class _BoostHooks(Hooks):
    def __init__(self, ctx: Context, boost: SustainedBoostingLoss) -> None:
        super().__init__(ctx)
        self.kept = boost

    def parameters(self) -> list[nn.Parameter]:  # its own heads replace the model's head
        assert self.kept is not None
        own = {id(p) for p in self.kept.parameters()}
        head = {id(p) for p in _head_parameters(self.ctx.head)}
        model = [p for p in self.ctx.model.parameters() if id(p) not in head | own]
        return model + list(self.kept.parameters())

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        assert isinstance(self.kept, SustainedBoostingLoss)
        self.kept.attach_optimizer(optimizer)

    def loss(self, features: Features, target: Tensor) -> Tensor:
        assert self.kept is not None
        return self.kept(features, target)  # type: ignore[no-any-return]

    def predict(self, head: Head, features: Features, kept: nn.Module | None) -> Tensor:
        assert isinstance(kept, SustainedBoostingLoss)
        return kept.predict(features)

    def diagnosis_head(self, head: Head) -> Head | None:
        return None

    def record(self) -> Any:
        assert isinstance(self.kept, SustainedBoostingLoss)
        return {f"num_heads/{m}": float(n) for m, n in self.kept.num_heads.items()}


def _head_parameters(head: Head) -> list[nn.Parameter]:
    if isinstance(head, nn.Module | MappingHead):
        return list(head.parameters())
    if isinstance(head, Mapping):
        return [p for h in head.values() if isinstance(h, nn.Module) for p in h.parameters()]
    return []


class _PMR(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        pmr = PMRLoss(ctx.num_classes, ctx.widths, **self.kwargs(alpha=config["alpha"]))
        return _PMRHooks(ctx, pmr.to(ctx.device))


class _PMRHooks(Hooks):
    def __init__(self, ctx: Context, pmr: PMRLoss) -> None:
        super().__init__(ctx)
        self.pmr = pmr

    def epoch_start(self, epoch: int) -> None:  # class means of the training split
        model = self.ctx.model
        training = model.training
        model.eval()  # eval mode and no grad for the whole update, as docs/pmr.md does it
        with torch.no_grad():
            self.pmr.update_prototypes(self.ctx.batches(self.ctx.train_split))
        model.train(training)
        self.pmr.set_epoch(epoch)

    def loss(self, features: Features, target: Tensor) -> Tensor:
        return self.pmr(self.ctx.fuse(features), target, features)  # type: ignore[no-any-return]

    def record(self) -> Any:
        return self.pmr.last


class _Blending(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        blend = GradientBlending(**self.kwargs(head=ctx.head, modalities=ctx.modalities))
        return _BlendHooks(ctx, blend.to(ctx.device), max(1, int(config["window"])))


class _BlendHooks(Hooks):
    def __init__(self, ctx: Context, blend: GradientBlending, window: int) -> None:
        super().__init__(ctx)
        self.blend = blend
        self.window = window
        self.weights: dict[str, float] = {}

    def _forward(self, batch: Any) -> tuple[Tensor, Tensor, Features]:
        x, y = self.ctx.features(batch)
        return self.ctx.fuse(x), y, x

    def epoch_start(self, epoch: int) -> None:  # a window's start: train and val branch losses
        if epoch % self.window == 0:
            ctx = self.ctx
            self.blend.update(
                *self.blend.evaluate(self._forward, ctx.train_split, ctx.val, model=ctx.model)
            )
            self.weights = {f"weights/{k}": float(w) for k, w in self.blend.weights.items()}

    def loss(self, features: Features, target: Tensor) -> Tensor:
        fused = self.ctx.fuse(features)
        return self.blend(fused, target, features=features)  # type: ignore[no-any-return]

    def record(self) -> Any:  # the weights of this window
        return self.weights


class _MMPareto(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        return _ParetoHooks(ctx, MMPareto(ctx.encoders, **self.kwargs(gamma=config["gamma"])))


class _ParetoHooks(Hooks):
    def __init__(self, ctx: Context, pareto: MMPareto) -> None:
        super().__init__(ctx)
        self.pareto = pareto

    def backward(self, loss: Tensor, features: Features, target: Tensor) -> None:
        z = unimodal_logits(self.ctx.head, features)
        self.pareto.backward(loss, {m: F.cross_entropy(zm, target) for m, zm in z.items()})

    def record(self) -> Any:
        return self.pareto.last


class _AGM(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        agm = AdaptiveGradientModulator(ctx.head, **self.kwargs(alpha=config["alpha"]))
        agm = agm.to(ctx.device)
        return _LossHooks(ctx, lambda x, y: F.cross_entropy(ctx.fuse(agm(x, y)), y), agm)


class _OPM(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        opm = ModalityPredictionModulator(
            ctx.modalities,
            **self.kwargs(
                head=ctx.head,
                q_base=config["q_base"],
                warmup_steps=_epochs(ctx, config.get("warmup_epochs", 2)),
                seed=ctx.seed,
            ),
        ).to(ctx.device)

        def loss(x: Features, y: Tensor) -> Tensor:
            out = opm(x, y)
            per_sample = F.cross_entropy(ctx.fuse(out.features), y, reduction="none")
            return kept_mean(per_sample, out.keep)

        return _LossHooks(ctx, loss, opm)


REMEDIES: dict[str, RemedyPlugin] = {}
"""The methods :func:`compare_remedies` knows, by short name, in row order."""


def register(remedy: RemedyPlugin) -> RemedyPlugin:
    """Add (or replace) a method in :data:`REMEDIES`; returns it."""
    REMEDIES[remedy.name] = remedy
    return remedy


for _remedy in (
    RemedyPlugin(),
    _OGM(
        "ogm_ge",
        "joint + OGM-GE",
        {"alpha": 0.4},
        ({"alpha": 0.1}, {"alpha": 0.4}, {"alpha": 0.8}),
        uses_encoders=True,
    ),
    _ARL(
        "arl",
        "joint + ARL",
        {"gamma": 1.0, "temperature": 8.0},
        tuple({"gamma": g, "temperature": t} for g in (1.0, 4.0) for t in (4.0, 8.0)),
    ),
    _Boosting(
        "boost",
        "sustained boosting",
        {"lam": 0.5},
        ({"lam": 0.2}, {"lam": 0.5}, {"lam": 1.0}),
        uses_head=False,
        vectors_only=True,
    ),
    _PMR(
        "pmr",
        "joint + PMR",
        {"alpha": 1.0},
        tuple({"alpha": a} for a in (0.5, 1.0, 2.0, 4.0)),
        vectors_only=True,
    ),
    _Blending(
        "gblend", "joint + G-Blending", {"window": 2.0}, tuple({"window": w} for w in (2.0, 5.0))
    ),
    _MMPareto(
        "mmpareto",
        "joint + MMPareto",
        {"gamma": 1.5},
        tuple({"gamma": g} for g in (1.0, 1.5, 2.0)),
        uses_encoders=True,
    ),
    _AGM("agm", "joint + AGM", {"alpha": 1.0}, tuple({"alpha": a} for a in (0.1, 0.5, 1.0, 2.5))),
    _OPM("opm", "joint + OPM", {"q_base": 0.5}, tuple({"q_base": q} for q in (0.3, 0.5, 0.7))),
):
    register(_remedy)
