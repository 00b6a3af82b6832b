"""The adapters of the methods that own more of the training loop than a loss or a step hook.

Each is a :class:`~imbalance_losses.compare.RemedyPlugin` registered in
:data:`~imbalance_losses.compare.REMEDIES` after the first eight, and plugs the method in as its
docs page does, through the general hooks of :class:`~imbalance_losses.compare.Hooks`:

* ``mla`` (:class:`~imbalance_losses.AlternatingUnimodalAdaptation`): :meth:`Hooks.train_step`
  is ``mla.train_step`` (one optimiser step per modality, the run's optimiser), evaluation is
  ``mla.predict`` (entropy-weighted unimodal predictions). Needs a head that scores one
  modality alone (a mapping of heads, or a ``MappingHead`` with ``absent="omit"``).
* ``reconboost`` (:class:`~imbalance_losses.ReconBoost`): :meth:`Hooks.train_step` steps
  ``rb.optimizer`` (a new one per phase, built by the comparison's ``optimizer``),
  :meth:`Hooks.epoch_end` is ``rb.epoch_end()``, evaluation the ensemble
  ``beta * sum_m g_m``. Needs per-modality heads or a ``MappingHead`` over a module.
* ``valuation`` (:class:`~imbalance_losses.SampleModalityValuation`): owns the data order:
  :meth:`Hooks.train_batches` reads the training set through ``valuation.sampler`` and
  ``apply_mask``; :meth:`Hooks.epoch_end` is the valuation pass. Needs ``train`` to be a
  ``DataLoader`` over a map-style dataset.
* ``relearning`` (:class:`~imbalance_losses.ModalityRelearning`): :meth:`Hooks.epoch_end` is
  ``relearn.epoch_end(epoch, train, val, ...)``; the snapshot is the run's seeded initial
  weights. Needs vector features and a trainable encoder per modality.
* ``umt`` (:class:`~imbalance_losses.UnimodalTeacherLoss`): the loss with each encoder pulled
  towards the same encoder trained alone (``needs_teachers``: the runs of ``alone=True``, or
  trained for the row).
* ``mmcosine`` (:class:`~imbalance_losses.MMCosineHead`): the model's linear head wrapped; the
  cosine logits are the logits for training and evaluation. Needs an ``nn.Linear`` over the
  concatenation or a mapping of ``nn.Linear`` heads.

Schedules counted in epochs are capped to fit the run (as the first eight adapters' warm-ups):
a re-initialisation, a valuation or a rectification that would come after the last epoch
changes nothing a row measures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ..core.masking import masked_outputs
from ..core.unimodal import Head, MappingHead, unimodal_logits
from ..methods.mla import AlternatingUnimodalAdaptation
from ..methods.mmcosine import MMCosineHead
from ..methods.reconboost import ReconBoost, ensemble_logits
from ..methods.relearning import ModalityRelearning
from ..methods.umt import UnimodalTeacherLoss
from ..methods.valuation import SampleModalityValuation, apply_mask
from .plugins import Config, Context, Features, Hooks, RemedyPlugin, register

__all__: list[str] = []

_ERRORS = (TypeError, ValueError, RuntimeError)


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------------------- MLA
class _MLA(RemedyPlugin):
    def applies(self, ctx: Context) -> str | None:
        base = super().applies(ctx)
        if base is not None:
            return base
        head = ctx.head
        if not isinstance(head, Mapping | nn.ModuleDict | MappingHead):
            return (
                "MLA scores each modality alone through the model's head, and this head "
                f"({type(head).__name__}) reads the concatenation of the features; it needs a "
                "mapping of per-modality heads (one module under every key: a shared head) or a "
                'MappingHead(fn, absent="omit")'
            )
        try:
            mla = AlternatingUnimodalAdaptation(head, projection="off")
            with torch.no_grad():
                mla.unimodal_logits(ctx.sample[0])
        except _ERRORS as err:
            return f"the head does not score one modality alone: {_reason(err)}"
        return None

    def note(self, ctx: Context) -> str | None:
        scores_alone = isinstance(ctx.head, Mapping | nn.ModuleDict | MappingHead)
        if scores_alone and _owm(ctx.head, ctx.steps_per_epoch) is not None:
            return (
                "no [C, D] linear weight known for the OWM projection (or several widths): "
                'plain alternation, projection="off" (the released code\'s behaviour)'
            )
        return None

    def setup(self, ctx: Context, config: Config) -> Hooks:
        owm = bool(config.get("owm", 1.0)) and _owm(ctx.head, ctx.steps_per_epoch) is None
        mla = AlternatingUnimodalAdaptation(
            ctx.head,
            **self.kwargs(
                projection="owm" if owm else "off",
                batches_per_epoch=ctx.steps_per_epoch if owm else None,
            ),
        ).to(ctx.device)
        return _MLAHooks(ctx, mla)


def _owm(head: Head, steps: int) -> str | None:
    """``None`` when MLA's OWM projection applies to ``head``, else why not."""
    try:
        AlternatingUnimodalAdaptation(head, projection="owm", batches_per_epoch=max(1, steps))
    except (TypeError, ValueError) as err:
        return _reason(err)
    return None


class _MLAHooks(Hooks):
    def __init__(self, ctx: Context, mla: AlternatingUnimodalAdaptation) -> None:
        super().__init__(ctx)
        self.mla = mla

    def train_step(
        self, features: Features, target: Tensor, optimizer: torch.optim.Optimizer
    ) -> Tensor:  # M optimiser steps, zero_grad included; no fused loss
        losses = self.mla.train_step(features, target, optimizer)
        return torch.stack(list(losses.values())).sum()

    def predict(self, head: Head, features: Features, kept: nn.Module | None) -> Tensor:
        return self.mla.predict(features)

    def record(self) -> Any:
        return self.mla.last


# ----------------------------------------------------------------------------------- ReconBoost
class _ReconBoost(RemedyPlugin):
    def applies(self, ctx: Context) -> str | None:
        base = super().applies(ctx)
        if base is not None:
            return base
        try:
            ReconBoost(ctx.encoders, ctx.head)  # type: ignore[arg-type]
        except _ERRORS as err:
            return _reason(err)
        return None

    def note(self, ctx: Context) -> str | None:
        most = _phase_epochs(ctx)
        if most < max(self.defaults.values(), default=1.0):
            return f"at most {most} epoch(s) per phase, so that every modality is boosted once"
        return None

    def setup(self, ctx: Context, config: Config) -> Hooks:
        make = ctx.optimizer
        if make is None:
            raise RuntimeError("ReconBoost builds an optimiser per phase: Context.optimizer unset")
        most = _phase_epochs(ctx)
        rb = ReconBoost(
            ctx.encoders,
            ctx.head,  # type: ignore[arg-type]
            **self.kwargs(
                boost_epochs=min(int(config["boost_epochs"]), most),
                rectify_epochs=min(int(config["rectify_epochs"]), most),
                optimizer_factory=lambda params, phase, stage: make(params),
            ),
        ).to(ctx.device)
        return _ReconBoostHooks(ctx, rb)


def _phase_epochs(ctx: Context) -> int:
    """At most ``E / (2M)`` epochs per phase: every modality boosted and rectified in the run."""
    return max(1, ctx.epochs // (2 * len(ctx.modalities)))


class _Ensemble(nn.Module):
    """What ReconBoost's prediction needs beyond the model: ``beta`` (shared) and the members."""

    def __init__(self, rb: ReconBoost) -> None:
        super().__init__()
        self.beta = rb.beta
        self.members = rb.members


class _ReconBoostHooks(Hooks):
    def __init__(self, ctx: Context, rb: ReconBoost) -> None:
        super().__init__(ctx)
        self.rb = rb
        self.kept = _Ensemble(rb)

    def train_step(
        self, features: Features, target: Tensor, optimizer: torch.optim.Optimizer
    ) -> Tensor:  # the phase's own optimiser; the run's is not used
        opt = self.rb.optimizer
        loss: Tensor = self.rb(features, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        return loss

    def epoch_end(self, epoch: int) -> None:
        self.rb.epoch_end()
        assert isinstance(self.kept, _Ensemble)
        self.kept.members = self.rb.members

    def predict(self, head: Head, features: Features, kept: nn.Module | None) -> Tensor:
        assert isinstance(kept, _Ensemble)
        return ensemble_logits(unimodal_logits(head, features), kept.beta, kept.members)

    def record(self) -> Any:
        return self.rb.last


# ------------------------------------------------------------------------------------ valuation
def _map_style(train: Any) -> str | None:
    """``None`` when ``train`` is a ``DataLoader`` the valuation can re-read by index."""
    if not isinstance(train, DataLoader):
        return f"a {type(train).__name__}"
    data = train.dataset
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        return f"a DataLoader over {type(data).__name__} (not map-style)"
    if train.batch_size is None:
        return "a DataLoader with a batch_sampler (no batch_size)"
    return None


def _last_warmup(ctx: Context) -> int:
    """The longest warm-up that leaves a re-sampled epoch (valued after epoch ``warmup - 1``)."""
    return max(1, ctx.epochs - 1)


class _Collate:
    """The loader's own collate on the samples; the indices and masks stacked."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, int, Tensor]]) -> tuple[Any, Tensor, Tensor]:
        samples = self.collate([s for s, _, _ in items])
        return samples, torch.tensor([n for _, n, _ in items]), torch.stack([k for *_, k in items])


class _Valuation(RemedyPlugin):
    def applies(self, ctx: Context) -> str | None:
        base = super().applies(ctx)
        if base is not None:
            return base
        loader = _map_style(ctx.train)
        if loader is not None:
            return (
                "it owns the data order (a ValuationSampler over the training samples): "
                "train= must be a torch DataLoader over a map-style dataset with a batch_size; "
                f"got {loader}"
            )
        try:
            with torch.no_grad():
                masked_outputs(ctx.head, ctx.sample[0])
        except _ERRORS as err:
            return f"the head cannot score masked modalities: {_reason(err)}"
        return None

    def note(self, ctx: Context) -> str | None:
        if _last_warmup(ctx) < self.defaults["warmup"]:
            return f"warm-up at most {_last_warmup(ctx)} epoch(s), so that an epoch is re-sampled"
        return None

    def setup(self, ctx: Context, config: Config) -> Hooks:
        train = ctx.train
        assert isinstance(train, DataLoader)
        valuation = SampleModalityValuation(
            ctx.head,
            ctx.modalities,
            len(train.dataset),  # type: ignore[arg-type]
            **self.kwargs(warmup=min(int(config["warmup"]), _last_warmup(ctx)), seed=ctx.seed),
        )
        data = valuation.dataset(train.dataset)
        collate, workers, pin = _Collate(train.collate_fn), train.num_workers, train.pin_memory

        def reader(sampler: Any, drop_last: bool) -> DataLoader[Any]:
            return DataLoader(data, train.batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=workers, pin_memory=pin, drop_last=drop_last)  # fmt: skip

        loader = reader(valuation.sampler, train.drop_last)  # the training order: the plan's
        return _ValuationHooks(ctx, valuation, loader, reader(valuation.value_indices(), False))


class _ValuationHooks(Hooks):
    def __init__(
        self,
        ctx: Context,
        valuation: SampleModalityValuation,
        loader: DataLoader[Any],
        value: DataLoader[Any],
    ) -> None:
        super().__init__(ctx)
        self.valuation, self.loader, self.value = valuation, loader, value

    def train_batches(self, epoch: int) -> Iterator[tuple[Features, Tensor]]:
        self.valuation.sampler.set_epoch(epoch)
        for sample, _, keep in self.loader:
            features, target = self.ctx.features(sample)
            yield apply_mask(features, keep), target

    def _value_forward(self, batch: tuple[Any, Tensor, Tensor]) -> tuple[Features, Tensor, Tensor]:
        sample, index, _ = batch
        features, target = self.ctx.features(sample)
        return features, target, index

    def epoch_end(self, epoch: int) -> None:
        self.valuation.epoch_end(
            epoch, self.value, forward=self._value_forward, model=self.ctx.model
        )

    def record(self) -> Any:
        last = self.valuation.last
        plan = {"plan_size": float(len(self.valuation.sampler))}
        return plan if last is None else {**last.to_dict(), **plan}


# ----------------------------------------------------------------------------------- relearning
class _Relearning(RemedyPlugin):
    def applies(self, ctx: Context) -> str | None:
        base = super().applies(ctx)
        if base is not None:
            return base
        try:
            ModalityRelearning(ctx.encoders, ctx.num_classes, head=ctx.head)
        except (*_ERRORS, NotImplementedError) as err:
            return _reason(err)
        return None

    def note(self, ctx: Context) -> str | None:
        if _reinit_cap(ctx) < self.defaults["reinit_every"]:
            return f"re-initialises every {_reinit_cap(ctx)} epoch(s) at most, to fit the run"
        return None

    def setup(self, ctx: Context, config: Config) -> Hooks:
        most = _REINITS
        every = min(int(config["reinit_every"]), _reinit_cap(ctx))
        relearn = ModalityRelearning(
            ctx.encoders,
            ctx.num_classes,
            **self.kwargs(lam=config["lam"], reinit_every=every, max_reinits=most, head=ctx.head),
        ).to(ctx.device)
        return _RelearnHooks(ctx, relearn)


_REINITS = 3  # the official --reinit_num


def _reinit_cap(ctx: Context) -> int:
    """The longest ``E_r`` whose ``N_r`` re-initialisations all come before the last epoch."""
    return max(1, (ctx.epochs - 2) // _REINITS)


class _RelearnHooks(Hooks):
    def __init__(self, ctx: Context, relearn: ModalityRelearning) -> None:
        super().__init__(ctx)
        self.relearn = relearn

    def epoch_end(self, epoch: int) -> None:
        ctx = self.ctx
        self.relearn.epoch_end(epoch, ctx.train_split, ctx.val, forward=ctx.features,
                               model=ctx.model)  # fmt: skip

    def record(self) -> Any:
        last = self.relearn.last
        count = {"reinits": float(self.relearn.reinits)}
        return count if last is None else {**last.to_dict(), **count}


# ------------------------------------------------------------------------------------------ UMT
class _UMT(RemedyPlugin):
    def setup(self, ctx: Context, config: Config) -> Hooks:
        if ctx.teachers is None or set(ctx.teachers) != set(ctx.modalities):
            raise RuntimeError(
                "UMT needs each modality's encoder trained alone (Context.teachers); "
                "compare_remedies sets them for a plugin with needs_teachers=True"
            )
        umt = UnimodalTeacherLoss(None, **self.kwargs(scaling=config["scaling"]))
        return _UMTHooks(ctx, umt.to(ctx.device), ctx.teachers)


class _UMTHooks(Hooks):
    def __init__(
        self,
        ctx: Context,
        umt: UnimodalTeacherLoss,
        teachers: Mapping[str, Callable[[Any], Tensor]],
    ) -> None:
        super().__init__(ctx)
        self.umt, self.teachers = umt, teachers
        self.taught: dict[str, Tensor] = {}

    def train_batches(self, epoch: int) -> Iterator[tuple[Features, Tensor]]:
        for batch in self.ctx.train:  # the teachers' features of the same batch
            self.taught = {m: teacher(batch) for m, teacher in self.teachers.items()}
            yield self.ctx.features(batch)

    def loss(self, features: Features, target: Tensor) -> Tensor:
        fused = self.ctx.fuse(features)
        return self.umt(fused, target, features=features, teacher_features=self.taught)  # type: ignore[no-any-return]

    def train(self, mode: bool) -> None:
        self.umt.train(mode)

    def record(self) -> Any:
        return self.umt.last


# ------------------------------------------------------------------------------------- MMCosine
def _cosine(head: Head, ctx: Context, scaling: float) -> MMCosineHead:
    widths = ctx.widths if isinstance(head, nn.Linear) else None
    return MMCosineHead(head, widths=widths, scaling=scaling)  # type: ignore[arg-type]


class _MMCosine(RemedyPlugin):
    def applies(self, ctx: Context) -> str | None:
        base = super().applies(ctx)
        if base is not None:
            return base
        head = ctx.head
        modules = head.values() if isinstance(head, Mapping | nn.ModuleDict) else [head]
        flags = [(p, p.requires_grad) for h in modules if isinstance(h, nn.Module)
                 for p in h.parameters()]  # fmt: skip
        try:  # the wrap freezes the bias: restored, this is the reference model
            with torch.no_grad():
                _cosine(head, ctx, 10.0)(ctx.sample[0])
        except _ERRORS as err:
            return _reason(err)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return None

    def setup(self, ctx: Context, config: Config) -> Hooks:
        scaling = float(self.kwargs(scaling=config["scaling"])["scaling"])
        return _CosineHooks(ctx, _cosine(ctx.head, ctx, scaling), scaling)


class _CosineHooks(Hooks):
    def __init__(self, ctx: Context, cosine: MMCosineHead, scaling: float) -> None:
        super().__init__(ctx)
        self.cosine, self.scaling = cosine, scaling

    def _of(self, head: Head) -> MMCosineHead:
        return self.cosine if head is self.ctx.head else _cosine(head, self.ctx, self.scaling)

    def loss(self, features: Features, target: Tensor) -> Tensor:
        return F.cross_entropy(self.cosine(features), target)

    def predict(self, head: Head, features: Features, kept: nn.Module | None) -> Tensor:
        logits: Tensor = self._of(head)(features)
        return logits

    def diagnosis_head(self, head: Head) -> Head | None:
        return self._of(head).as_mapping_head()

    def record(self) -> Any:
        return self.cosine.last


for _remedy in (
    _MLA(
        "mla",
        "MLA (alternating unimodal)",
        {"owm": 1.0},
        ({"owm": 1.0}, {"owm": 0.0}),
        uses_head=False,
    ),
    _ReconBoost(
        "reconboost",
        "ReconBoost",
        {"boost_epochs": 4.0, "rectify_epochs": 4.0},
        tuple({"boost_epochs": e, "rectify_epochs": e} for e in (1.0, 2.0, 4.0)),
        uses_head=False,
    ),
    _Valuation(
        "valuation",
        "joint + sample-level valuation",
        {"warmup": 5.0},
        tuple({"warmup": w} for w in (1.0, 3.0, 5.0)),
        uses_head=False,
    ),
    _Relearning(
        "relearning",
        "joint + diagnosing & re-learning",
        {"lam": 3.0, "reinit_every": 20.0},
        tuple({"lam": lam, "reinit_every": 20.0} for lam in (1.0, 3.0, 10.0)),
        uses_head=False,
        vectors_only=True,
        uses_encoders=True,
    ),
    _UMT(
        "umt",
        "joint + UMT (uni-modal teachers)",
        {"scaling": 10.0},
        tuple({"scaling": s} for s in (1.0, 3.0, 10.0)),
        needs_teachers=True,
    ),
    _MMCosine(
        "mmcosine",
        "MMCosine head",
        {"scaling": 10.0},
        tuple({"scaling": s} for s in (5.0, 10.0, 15.0)),
        uses_head=False,
    ),
):
    register(_remedy)
