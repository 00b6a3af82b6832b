"""``compare_remedies``: every method that applies, on the user's own model and data.

The protocol (the library's benchmark, ``examples/benchmark.py``, for any model):

1. **Same start.** Every run builds its model with ``build()`` under ``torch.manual_seed(seed)``
   and the data order is seeded the same way, so for a seed every method starts from the same
   initial weights (checked: a hash of the weights is kept per run, and a note is added when
   they differ) and sees the same batches. Plain joint training is always the first row.
2. **Settings.** Each method at its documented defaults; with ``grid=True`` a small grid, each
   point trained on the first seed and the one with the best validation accuracy kept for every
   seed (a grid point never sees the test loader).
3. **Epoch on validation.** After every epoch the validation loader is scored; the epoch with
   the best validation accuracy (ties: lower validation cross-entropy) is kept.
4. **Test once.** The test loader, when given, is read once per method and seed, after the
   selection, by the kept model.
5. **Diagnosis.** For the first seed, :func:`~imbalance_losses.imbalance_report` of the kept
   model: a linear probe per encoder (fitted on the training split's features, scored on the
   validation split) and, with ``alone=True``, each encoder trained alone as the reference.
6. **Best.** :attr:`ComparisonResult.best` is the row with the best mean validation accuracy;
   it is "not distinguishable" when its margin over plain training is within the seed spread.

Under ``torch.distributed`` every rank runs the same sequence; validation and test accuracies
are summed over ranks, and every decision that depends on the clock or on a file (budget skips,
resumed runs, failures) is taken on rank 0 and broadcast, so no rank waits on a run another
skipped. Rank 0 prints and saves.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.unimodal import Head
from .plugins import REMEDIES, Config, RemedyPlugin
from .result import ComparisonResult, Row, RunRecord
from .training import (
    Outcome,
    SelectedRun,
    Spec,
    alone_remedy,
    diagnose,
    forked_rng,
    score,
    train_run,
)

__all__ = ["compare_remedies"]


def _sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def compare_remedies(
    build: Callable[[], nn.Module],
    forward: Callable[[nn.Module, Any], tuple[Mapping[str, Tensor], Tensor]],
    head: Callable[[nn.Module], Head],
    encoders: Callable[[nn.Module], Mapping[str, nn.Module] | nn.ModuleDict],
    train: Iterable[Any],
    val: Iterable[Any],
    *,
    test: Iterable[Any] | None = None,
    train_eval: Iterable[Any] | None = None,
    methods: Sequence[str | RemedyPlugin] | None = None,
    epochs: int = 10,
    seeds: Sequence[int] = (0, 1, 2),
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] = _sgd,
    grid: bool = False,
    max_minutes: float | None = None,
    progress: bool | Callable[[str], None] = True,
    alone: bool = False,
    device: torch.device | str | None = None,
    resume: str | Path | None = None,
    baseline: bool = True,
    diagnosis: bool = True,
    trace: bool = False,
    on_run: Callable[[SelectedRun], None] | None = None,
) -> ComparisonResult:
    """Train plain joint training and every method that applies; compare them on validation.

    Args:
        build: a fresh model per call (called under ``torch.manual_seed(seed)``).
        forward: ``forward(model, batch) -> (features, target)``, features an ordered mapping
            modality -> ``[B, D]`` (or tokens ``[B, T, D]``), target ``[B]`` class indices.
            The batch is moved to the model's device first.
        head: ``head(model)``: the fusion head (``nn.Linear`` over the concatenation, a
            mapping of per-modality heads, a :class:`~imbalance_losses.MappingHead`, or any
            callable over the concatenation); the fused logits are ``head`` on the features.
        encoders: ``encoders(model)``: modality -> encoder module (OGM-GE, MMPareto,
            ReconBoost, re-learning).
        train: the training loader (iterated once per epoch; ``len()`` or one pass counts it).
            The sample-level valuation, which owns the data order, needs a ``DataLoader`` over
            a map-style dataset (it re-reads the dataset through its own sampler).
        val: the held-out loader every epoch and every setting is chosen on.
        test: an optional test loader, read once per method and seed, after selection.
        train_eval: the training split as read for evaluation passes (no shuffling, no
            augmentation): PMR's prototypes, G-Blending's training losses, the diagnosis'
            probes and the first batch read for shapes (default: the training loader).
        methods: short names of :data:`~imbalance_losses.compare.REMEDIES` (default: all),
            or :class:`~imbalance_losses.compare.RemedyPlugin` objects (a variant of a method,
            e.g. ``dataclasses.replace(REMEDIES["arl"], options=...)``, or one of your own);
            rows: plain joint training, the named methods in the order of ``REMEDIES``, then
            the other plugins in the order given. Plain joint training is always a row.
        epochs: epochs per run; seeds: the seeds (the spread is over them).
        optimizer: ``optimizer(params)`` (default SGD, lr 0.01, momentum 0.9).
        grid: try each method's small grid on the first seed (chosen on validation).
        max_minutes: a time budget; a run estimated not to fit is skipped, and the row says so.
        progress: a progress bar (tqdm if installed, else a line per run) on stderr; or a
            callable, called with one line per finished run (the caller's own bar).
        alone: also train each modality's encoder alone (its unimodal logits only), the
            reference of the diagnosis' deficits (one run per modality, first seed); UMT's
            teachers are these runs (without ``alone=True`` the UMT row trains them itself).
        device: where the model is moved after ``build()`` (default: where it was built).
        resume: a JSON file: runs already in it are not run again, and the result is written
            there after every run (a new file is started when it does not exist).
        baseline: ``False``: no plain-training row (for a caller that has it from another
            call); the time ratios and ``best``'s margin then have no reference.
        diagnosis: ``False``: no :func:`imbalance_report` per row (e.g. when ``on_run`` makes
            its own).
        trace: keep each optimiser step's record of the method (its coefficients, number of
            heads, blending weights, ...) in :attr:`RunRecord.trace`.
        on_run: called with a :class:`~imbalance_losses.compare.SelectedRun` for every run
            kept in a row (the selected setting on the first seed, then every other seed),
            after selection and the test score: its model at the chosen epoch, to measure
            what the table does not (a run that diverged in its first epoch, or was read from
            ``resume``, has no model and is not passed).

    Returns:
        :class:`ComparisonResult` (the same on every rank under DDP).

    Raises:
        ValueError / TypeError: unknown methods, no seed, ``epochs < 1``, a budget ``<= 0``,
            arguments that are not callables or loaders, a resume file of another comparison.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import compare_remedies
        >>> class Model(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoders = nn.ModuleDict({"audio": nn.Linear(4, 8),
        ...                                        "image": nn.Linear(6, 8)})
        ...         self.head = nn.Linear(16, 3)
        >>> g = torch.Generator().manual_seed(0)
        >>> def split(n):                    # a list of batches stands in for a DataLoader
        ...     y = torch.randint(0, 3, (n,), generator=g)
        ...     image = torch.randn(n, 6, generator=g) + nn.functional.one_hot(y, 6)
        ...     return [({"audio": torch.randn(n, 4, generator=g), "image": image}, y)]
        >>> result = compare_remedies(
        ...     build=Model,
        ...     forward=lambda model, batch: (
        ...         {m: model.encoders[m](x) for m, x in batch[0].items()}, batch[1]),
        ...     head=lambda model: model.head,
        ...     encoders=lambda model: model.encoders,
        ...     train=split(64), val=split(32), test=split(32),
        ...     methods=["arl", "pmr"], epochs=2, seeds=(0, 1), progress=False,
        ... )
        >>> [row.name for row in result.rows], result.row("arl").epochs[0] in (1, 2)
        (['plain', 'arl', 'pmr'], True)
        >>> result.to_markdown().startswith("| method | setting | val acc % | test acc %")
        True
    """
    remedies = _check(
        build, forward, head, encoders, train, val, methods, epochs, seeds, max_minutes
    )
    if not baseline:
        remedies = [r for r in remedies if r.name != "plain"]
    dev = None if device is None else torch.device(device)
    spec = Spec(build, forward, head, encoders, train, val, optimizer, epochs, dev)
    spec.train_eval, spec.trace = train_eval, trace
    spec.steps = _count(train)
    settings = {"epochs": epochs, "seeds": list(seeds), "grid": grid, "alone": alone}
    previous = _resume(resume, settings)
    result = ComparisonResult(settings={**settings, "max_minutes": max_minutes})
    runner = _Runner(spec, list(seeds), grid, test, result, previous, resume, max_minutes)
    runner.diagnosis, runner.on_run = diagnosis, on_run
    runner.progress = _Progress(progress, _rank() == 0, _planned(remedies, grid, seeds))
    try:
        with forked_rng(spec):  # the runs seed the global RNG; the caller's state comes back
            runner.run(remedies, alone)
    finally:
        runner.progress.close()
    runner.save()
    return result


def _check(
    build: object,
    forward: object,
    head: object,
    encoders: object,
    train: object,
    val: object,
    methods: Sequence[str | RemedyPlugin] | None,
    epochs: int,
    seeds: Sequence[int],
    max_minutes: float | None,
) -> list[RemedyPlugin]:
    if isinstance(build, nn.Module):
        raise TypeError(
            "build must be a callable returning a fresh model (build=lambda: MyModel()), not a "
            "model: every run starts from its own seeded build"
        )
    for name, fn in (
        ("build", build),
        ("forward", forward),
        ("head", head),
        ("encoders", encoders),
    ):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable (see compare_remedies), got {fn!r}")
    for name, loader in (("train", train), ("val", val)):
        if not isinstance(loader, Iterable) or isinstance(loader, Mapping | Tensor | str):
            raise TypeError(f"{name} must be a loader (an iterable of batches), got {loader!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(seeds, str | int) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0 (or None: no budget), got {max_minutes!r}")
    if methods is None:
        return list(REMEDIES.values())
    if isinstance(methods, str):
        raise TypeError(f"methods must be a list of names, got the string {methods!r}")
    unknown = [m for m in methods if not isinstance(m, RemedyPlugin) and m not in REMEDIES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(REMEDIES)}")
    given = {m.name if isinstance(m, RemedyPlugin) else m: m for m in methods}
    if len(given) != len(methods):
        raise ValueError(f"methods must have distinct names, got {list(given)}")
    chosen = {n: REMEDIES[n] for n in REMEDIES if n in given or n == "plain"}
    for name, m in given.items():
        if isinstance(m, RemedyPlugin):
            chosen[name] = m  # a variant of a known method takes its place
    names = ["plain"] + [n for n in chosen if n != "plain"]
    return [chosen[n] for n in names]


def _count(train: Iterable[Any]) -> int:
    try:
        n = len(train)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in train)
    if n == 0:
        raise ValueError("the training loader gave no batch")
    return n


def _planned(remedies: list[RemedyPlugin], grid: bool, seeds: Sequence[int]) -> int:
    return sum((1 if r.same_as else len(r.configs(grid))) + len(seeds) - 1 for r in remedies)


def _resume(path: str | Path | None, settings: dict[str, Any]) -> ComparisonResult | None:
    previous = None
    if _rank() == 0 and path is not None and Path(path).exists():
        previous = ComparisonResult.load(path)
    previous = _broadcast(previous)
    assert previous is None or isinstance(previous, ComparisonResult)
    if previous is not None:
        old = {k: previous.settings.get(k) for k in settings}
        if old != settings:
            raise ValueError(
                f"resume={str(path)!r} holds a comparison with other settings ({old}); this one "
                f"is {settings}: use another file"
            )
    return previous


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Progress:
    """tqdm over runs if installed, else one line per run; silent when disabled; a callable
    given as ``progress`` gets each finished run's line instead (and nothing else)."""

    def __init__(self, progress: bool | Callable[[str], None], rank0: bool, total: int) -> None:
        self.call = progress if callable(progress) and rank0 else None
        enabled = bool(progress) and rank0 and self.call is None
        self.enabled, self.total, self.done = enabled, total, 0
        self.bar: Any = None
        if enabled:
            try:
                tqdm = importlib.import_module("tqdm.auto").tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="run", file=sys.stderr)

    def add(self, runs: int) -> None:
        self.total += runs
        if self.bar is not None:
            self.bar.total = self.total

    def say(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else _eprint)(text)

    def step(self, text: str) -> None:
        self.done += 1
        if self.call is not None:
            self.call(text)
        elif self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            _eprint(f"[{self.done}/{self.total}] {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _frozen(spec: Spec, model: nn.Module, modality: str) -> Callable[[Any], Tensor]:
    """``batch -> features[modality]`` of a model trained alone: eval mode, no grad."""
    model.eval()

    def teacher(batch: Any) -> Tensor:
        with torch.no_grad():
            return spec.features(model, batch)[0][modality]

    return teacher


def _rank_key(record: RunRecord) -> tuple[float, float]:
    """Validation accuracy, then lower loss; a run with no finished epoch (NaN) ranks last."""
    if math.isnan(record.val):
        return (-1.0, 0.0)
    loss = record.val_loss if math.isfinite(record.val_loss) else math.inf
    return (record.val, -loss)


def _describe(config: Config) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in config.items())


class _Runner:
    """Runs the rows in order, with the budget, the resume file and the agreed decisions."""

    progress: _Progress
    diagnosis: bool = True
    on_run: Callable[[SelectedRun], None] | None = None

    def __init__(
        self,
        spec: Spec,
        seeds: list[int],
        grid: bool,
        test: Iterable[Any] | None,
        result: ComparisonResult,
        previous: ComparisonResult | None,
        path: str | Path | None,
        max_minutes: float | None,
    ) -> None:
        self.spec, self.seeds, self.grid, self.test = spec, seeds, grid, test
        self.result, self.previous, self.path = result, previous, path
        self.budget = None if max_minutes is None else 60.0 * max_minutes
        self.start = time.perf_counter()
        self.per_epoch: dict[str, float] = {}
        self.estimated = False
        self.alone_models: dict[str, nn.Module] = {}  # modality -> trained alone (first seed)

    # ----------------------------------------------------------------- the rows
    def run(self, remedies: list[RemedyPlugin], alone: bool) -> None:
        self.remedies = {r.name: r for r in remedies}
        reference = self.spec.context(self.spec.build_seeded(self.seeds[0]), self.seeds[0])
        for remedy in remedies:
            name = remedy.name
            reason = remedy.applies(reference)
            row = Row(name, remedy.label, note=remedy.note(reference) or "")
            row.options = _options_of(remedy)
            self.result.rows.append(row)
            if reason is not None:
                row.status, row.reason = "skipped", f"does not apply: {reason}"
                continue
            if remedy.same_as is not None and self._config_of(remedy.same_as) is None:
                row.status = "skipped"
                row.reason = f"an ablation of {remedy.same_as!r}, which has no result"
                continue
            if remedy.needs_teachers and not self._teachers(remedy, row, reference.modalities):
                continue
            self._method(remedy, row)
            if name == "plain" and alone:
                self._alone(reference.modalities)
        self._check_inits()

    def _method(self, remedy: RemedyPlugin, row: Row) -> None:
        old = self._previous_row(remedy.name)
        try:
            if old is not None and old.runs:
                row.config, row.grid, row.diagnosis = old.config, old.grid, old.diagnosis
                row.runs.append(old.runs[0])
            elif not self._grid(remedy, row):
                return
            for seed in self.seeds[1:]:
                done = next((r for r in (old.runs if old else []) if r.seed == seed), None)
                if done is None:
                    outcome = self._train(remedy, row.config, seed, row)
                    if outcome is None:
                        return
                    done = self._finish(outcome, row, diagnosis=False)
                row.runs.append(done)
                self.save()
        except Exception as err:
            if remedy.name == "plain":
                raise
            row.status, row.reason = "failed", f"{type(err).__name__}: {err}"

    def _config_of(self, name: str) -> Config | None:
        """The setting chosen for the row ``name`` (``None``: it has no result)."""
        row = next((r for r in self.result.rows if r.name == name and r.done), None)
        return None if row is None or not row.runs else dict(row.config)

    def _configs(self, remedy: RemedyPlugin) -> list[Config]:
        if remedy.same_as is not None:  # an ablation: the setting chosen for that row
            config = self._config_of(remedy.same_as)
            return [] if config is None else [config]
        return remedy.configs(self.grid)

    def _grid(self, remedy: RemedyPlugin, row: Row) -> bool:
        """The settings on the first seed; the selected one is finished (test, diagnosis)."""
        best: Outcome | None = None
        for config in self._configs(remedy):
            outcome = self._train(remedy, config, self.seeds[0], row)
            if outcome is None:
                return False
            r = outcome.record
            row.grid.append({"config": config, "val": r.val, "val_loss": r.val_loss})
            if best is None or _rank_key(r) > _rank_key(best.record):
                best = outcome
        assert best is not None
        row.config = best.record.config
        row.runs.append(self._finish(best, row, diagnosis=True))
        self.save()
        return True

    def _finish(self, outcome: Outcome, row: Row, *, diagnosis: bool) -> RunRecord:
        record = outcome.record
        if record.epoch == 0:  # diverged in its first epoch: nothing to select
            return record
        if self.test is not None:
            record.test = score(self.spec, outcome, self.test)
        if diagnosis and self.diagnosis:
            row.diagnosis = diagnose(self.spec, outcome)
        if self.on_run is not None:
            self.on_run(SelectedRun.of(outcome))
        return record

    def _alone(self, modalities: list[str]) -> None:
        """Each modality's encoder trained alone (first seed): its probe is the reference."""
        self.progress.add(len(modalities))
        previous = self.previous.alone if self.previous is not None else {}
        for m in modalities:
            if m in previous:
                self.result.alone[m] = previous[m]
                continue
            row = Row(f"alone:{m}", f"{m} alone")
            outcome = self._train(alone_remedy(m), {}, self.seeds[0], row)
            if outcome is None:
                self.result.notes.append(f"{m} alone: {row.reason}")
                continue
            probe = diagnose(self.spec, outcome, [m])["probe"][m]
            self.result.alone[m] = {"val": outcome.record.val, "probe": probe}
            self.alone_models[m] = outcome.ctx.model
            self.save()

    def _teachers(self, remedy: RemedyPlugin, row: Row, modalities: list[str]) -> bool:
        """Each modality's encoder trained alone, frozen, for a row that needs teachers (UMT):
        those of ``alone=True``, else trained here (first seed), the cost in the row's note.
        ``False``: the row cannot run (the budget; the row says so)."""
        old = self._previous_row(remedy.name)
        if old is not None and {r.seed for r in old.runs} >= set(self.seeds):
            return True  # every run is in the resume file: nothing to train
        missing = [m for m in modalities if m not in self.alone_models]
        start = time.perf_counter()
        if missing:
            self.progress.add(len(missing))
        for m in missing:
            outcome = self._train(alone_remedy(m), {}, self.seeds[0], row)
            if outcome is None:  # over budget: the row is marked skipped
                return False
            self.alone_models[m] = outcome.ctx.model
        seed = self.seeds[0]
        if missing:
            note = (
                f"teachers: {', '.join(missing)} trained alone for this row ({len(missing)} "
                f"extra runs of {self.spec.epochs} epochs, seed {seed}, "
                f"{time.perf_counter() - start:.2g} s; alone=True would reuse its runs)"
            )
        else:
            note = f"teachers: the encoders trained alone (alone=True, seed {seed}), reused"
        row.note = "; ".join(n for n in (row.note, note) if n)
        self.spec.teachers = {m: _frozen(self.spec, self.alone_models[m], m) for m in modalities}
        return True

    # ----------------------------------------------------------------- one run
    def _train(self, remedy: RemedyPlugin, config: Config, seed: int, row: Row) -> Outcome | None:
        """One run, unless the budget (decided on rank 0) says it does not fit."""
        why = _broadcast(self._over_budget(remedy.name) if _rank() == 0 else None)
        if why is not None:
            ran = len(row.runs)
            row.status = "partial" if ran else "skipped"
            row.reason = f"budget: {why}" + (f"; seeds {self.seeds[ran:]} not run" if ran else "")
            self.progress.say(f"{row.label}: skipped ({row.reason})")
            return None
        outcome = train_run(self.spec, remedy, config, seed, self._epoch_done)
        r = outcome.record
        self.per_epoch.setdefault(remedy.name, r.seconds_per_epoch)
        text = f"{row.label} {_describe(config)} seed {seed}: val {100 * r.val:.1f} %"
        self.progress.step(f"{text} (epoch {r.epoch}, {r.seconds_per_epoch:.2g} s/epoch)")
        return outcome

    def _epoch_done(self, epoch: int, seconds: float) -> None:
        if not self.estimated:
            self.estimated = True
            total = seconds * self.spec.epochs * self.progress.total
            self.progress.say(
                f"first epoch: {seconds:.2g} s; {self.progress.total} runs of "
                f"{self.spec.epochs} epochs: about {total / 60:.1f} min at this pace"
            )

    def _over_budget(self, name: str) -> str | None:
        if self.budget is None or not self.per_epoch:
            return None
        per_epoch = self.per_epoch.get(name, self.per_epoch.get("plain", math.nan))
        needed = per_epoch * self.spec.epochs
        left = self.budget - (time.perf_counter() - self.start)
        if needed <= left:
            return None
        return f"a run needs about {needed / 60:.2g} min, {max(left, 0) / 60:.2g} min left"

    # ----------------------------------------------------------------- bookkeeping
    def _previous_row(self, name: str) -> Row | None:
        if self.previous is None:
            return None
        for row in self.previous.rows:
            if row.name == name and row.done and row.runs:
                remedy = self.remedies.get(name, REMEDIES.get(name))
                if remedy is None or remedy.same_as is not None:
                    return None  # an ablation follows the row it ablates: run again
                tried = [g["config"] for g in row.grid]  # another grid or variant: run again
                if row.options != _options_of(remedy) or tried != remedy.configs(self.grid):
                    return None
                same = row.config if self.grid else remedy.defaults
                return row if row.config == same else None
        return None

    def _check_inits(self) -> None:
        for seed in self.seeds:
            inits = {r.init for row in self.result.rows for r in row.runs if r.seed == seed}
            if len(inits) > 1:
                self.result.notes.append(
                    f"seed {seed}: the methods did not start from the same weights (build() "
                    "draws from a random source other than torch's global generator)"
                )

    def save(self) -> None:
        if self.path is not None and _rank() == 0:
            self.result.save(self.path)


def _options_of(remedy: RemedyPlugin) -> str:
    """The method's ``options`` as JSON, keys sorted (a value JSON cannot hold: its ``repr``)."""
    return json.dumps(dict(remedy.options), sort_keys=True, default=repr)
