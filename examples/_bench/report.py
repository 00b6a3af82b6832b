"""Markdown table, header and plots of the benchmark (matplotlib optional)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from data import Task

from imbalance_losses.diagnosis.plotting import plot_history
from imbalance_losses.diagnosis.report import ImbalanceReport

__all__ = [
    "NOTES",
    "Row",
    "RunResult",
    "diagnosis_text",
    "grid_text",
    "header",
    "per_seed_text",
    "plots",
    "tables",
    "with_alone",
]


@dataclass
class RunResult:
    """One training run (one method, optimiser, seed and hyper-parameter setting)."""

    task: str
    method: str  # "uni:<modality>" or a key of benchmark.METHODS
    optimizer: str
    seed: int
    config: dict[str, float]
    val_curve: list[float]
    best_epoch: int  # 1-based
    best_val: float
    best_val_loss: float
    test_acc: float
    probe: dict[str, float]
    head: dict[str, float]
    seconds: float
    trace: list[dict[str, float]]
    test_probs: torch.Tensor | None = None  # uni-modal rows: for the ensemble
    diverged: int | None = None  # epoch at which the loss / features became non-finite
    diagnosis: ImbalanceReport | None = None  # imbalance_report of the kept model (not diverged)


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _mean(values: Iterable[float]) -> float:
    """Mean over the finite values (runs that diverged in their first epoch have none)."""
    kept = _finite(values)
    return statistics.fmean(kept) if kept else float("nan")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    kept = _finite(values)
    if not kept:
        return float("nan"), float("nan")
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return statistics.fmean(kept), std


@dataclass(frozen=True)
class Row:
    """One line of a task's table (all accuracies in percent, means over seeds)."""

    task: str
    method: str
    optimizer: str
    available: bool
    reason: str = ""
    test: tuple[float, float] = (0.0, 0.0)
    val: float = 0.0
    probe: Mapping[str, float] | None = None
    head: Mapping[str, float] | None = None
    epoch: float | None = None
    seconds: float = 0.0
    setting: str = "-"
    seeds: int = 0
    diverged: tuple[int, ...] = ()  # epochs at which runs diverged (one entry per such seed)

    @staticmethod
    def of(task: Task, method: str, optimizer: str, runs: Sequence[RunResult], setting: str) -> Row:
        mods = list(runs[0].probe)
        return Row(
            task=task.name,
            method=method,
            optimizer=optimizer,
            available=True,
            test=_mean_std([100 * r.test_acc for r in runs]),
            val=_mean(100 * r.best_val for r in runs),
            probe={m: _mean(100 * r.probe[m] for r in runs) for m in mods},
            head={m: _mean(100 * r.head[m] for r in runs) for m in runs[0].head},
            epoch=_mean(r.best_epoch if r.best_epoch > 0 else float("nan") for r in runs),
            seconds=statistics.fmean(r.seconds for r in runs),
            setting=setting,
            seeds=len(runs),
            diverged=tuple(r.diverged for r in runs if r.diverged is not None),
        )

    @staticmethod
    def missing(task: Task, method: str, optimizer: str, reason: str) -> Row:
        """A row with no run: the method does not apply (``reason``, printed in its place)."""
        return Row(
            task=task.name,
            method=method,
            optimizer=optimizer,
            available=False,
            reason=reason,
        )

    @staticmethod
    def ensemble(task: Task, optimizer: str, a: Sequence[RunResult], b: Sequence[RunResult]) -> Row:
        """Mean of the two uni-modal models' softmax, seed by seed (each at its own val epoch)."""
        y = task.test.y
        accs = []
        for ra, rb in zip(a, b, strict=True):
            if ra.test_probs is None or rb.test_probs is None:  # a uni-modal run diverged
                accs.append(float("nan"))
                continue
            probs = (ra.test_probs + rb.test_probs) / 2
            accs.append(100 * float((probs.argmax(-1) == y).float().mean()))
        mods = list(a[0].probe) + list(b[0].probe)
        runs = {mods[0]: a, mods[1]: b}
        return Row(
            task=task.name,
            method="uni-modal ensemble",
            optimizer=optimizer,
            available=True,
            test=_mean_std(accs),
            val=float("nan"),
            probe={m: _mean(100 * r.probe[m] for r in rs) for m, rs in runs.items()},
            head={m: _mean(100 * r.test_acc for r in rs) for m, rs in runs.items()},
            epoch=None,
            seconds=statistics.fmean(ra.seconds + rb.seconds for ra, rb in zip(a, b, strict=True)),
            setting="-",
            seeds=len(accs),
        )


def _num(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _pair(row: Row, m: str) -> str:
    probe = None if row.probe is None else row.probe.get(m)
    head = None if row.head is None else row.head.get(m)
    if probe is None and head is None:
        return "—"
    return f"{_num(probe)} / {_num(head)}"


def _setting(row: Row) -> str:
    if not row.diverged:
        return row.setting
    at = ", ".join(str(e) for e in row.diverged)
    return f"{row.setting}; {len(row.diverged)}/{row.seeds} seeds diverged (epoch {at})"


def _test(row: Row) -> str:
    if not math.isfinite(row.test[0]):
        return "diverged"
    return f"{row.test[0]:.1f} ± {row.test[1]:.1f}"


def tables(tasks: Sequence[Task], rows: Sequence[Row]) -> str:
    out = []
    for task in tasks:
        mods = list(task.kinds)
        out.append(f"### {task.title}\n")
        out.append(
            "| method | optimiser | test acc % (mean ± std) | best val % | "
            + " | ".join(f"{m}: probe / head %" for m in mods)
            + " | epoch | setting | time / run (s) |"
        )
        out.append("|" + " --- |" * (7 + len(mods)))
        for row in (r for r in rows if r.task == task.name):
            if not row.available:
                cells = [row.method, row.optimizer, row.reason] + ["—"] * (4 + len(mods))
            else:
                cells = [
                    row.method,
                    row.optimizer,
                    _test(row),
                    _num(row.val),
                    *(_pair(row, m) for m in mods),
                    _num(row.epoch),
                    _setting(row),
                    f"{row.seconds:.1f}",
                ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def header(
    *,
    command: str,
    date: str,
    machine: str,
    torch_version: str,
    threads: int,
    epochs: int,
    seeds: int,
    batch: int,
    optimizers: Mapping[str, str],
    total_seconds: float,
    tasks: Sequence[Task],
    model: str | None = None,
) -> str:
    lines = [
        "## Benchmark results",
        "",
        f"- command: `{command}`",
        f"- date: {date}",
        f"- machine: {machine}; torch {torch_version}, {threads} threads",
        f"- protocol: {epochs} epochs, batch {batch}, {seeds} seed(s) (0..{seeds - 1}); "
        "epoch chosen on validation; test evaluated once, on that epoch's model",
        "- optimisers: " + "; ".join(f"{k}: {v}" for k, v in optimizers.items()),
        f"- total wall time: {total_seconds:.0f} s",
    ]
    if model is not None:  # a variant of the benchmark's model (--model)
        lines.insert(5, f"- model: {model}")
    for t in tasks:
        lines.append(
            f"- {t.name}: {t.source}; train/val/test = {len(t.train)}/{len(t.val)}/{len(t.test)}"
        )
    return "\n".join(lines) + "\n"


def grid_text(methods: Sequence[Any], grids: Mapping[tuple[str, str, str], Any], grid: bool) -> str:
    lines = [
        "#### Hyper-parameters (chosen on validation accuracy, ties by validation loss, seed 0)",
        "",
    ]
    for m in methods:
        if m.same_as is not None:
            lines.append(f"- {m.label}: no grid, the setting chosen for the {m.same_as} row")
        elif len(m.grid) > 1:
            values = "; ".join(", ".join(f"{k}={v:g}" for k, v in c.items()) for c in m.grid)
            quick = ", ".join(f"{k}={v:g}" for k, v in m.quick.items())
            lines.append(f"- {m.label}: grid {{{values}}} (--quick uses {quick})")
    if not grid:
        lines.append(
            "- no grid search (--quick / --no-grid): each method ran with its --quick value"
        )
    for (task, opt, label), tried in grids.items():
        scores = ", ".join(
            f"{', '.join(f'{k}={v:g}' for k, v in c.items())}: {100 * s:.1f} (loss {loss:.3f})"
            for c, s, loss in tried
        )
        lines.append(f"- {task} / {opt} / {label}: val % {scores}")
    return "\n".join(lines) + "\n"


NOTES = """#### Reading the columns

- **test acc**: accuracy on the test split of the model at the epoch with the best validation
  accuracy, mean ± sample standard deviation over seeds. The test split chooses nothing.
- **probe / head** per modality, after joint training: *probe* = a linear probe (multinomial
  logistic regression, fixed L2, L-BFGS) fitted on that modality's frozen training features and
  scored on test: how much the encoder learned. *head* = test accuracy of that modality's logits
  from the model's own head (`unimodal_logits`, the exact split of the linear fusion head; each
  modality's head ensemble for sustained boosting): what the fused classifier takes from it. For
  the uni-modal rows and the ensemble, head = the uni-modal model's own test accuracy.
- **ablation: ARL loss, no re-weighting**: `ARLLoss` with the ARL row's `gamma` whose warm-up
  never ends, i.e. `CE(z, y) + gamma * sum_m CE(z_m, y)` with no gradient re-weighting (what the
  released ARL code trains, see docs/arl.md). The gap between it and the ARL row is what the
  re-weighting itself adds.
- **time / run**: training wall time of one run (seconds; evaluation each epoch included, grid
  search excluded); for the ensemble, the two uni-modal runs.
"""


def diagnosis_text(
    reports: Sequence[tuple[str, str, ImbalanceReport]],
    note: str = "",
) -> str:
    """Each task's plain joint model diagnosed by ``imbalance_report`` (seed 0).

    The probes of the encoders trained alone are the uni-modal rows' probes (same split, same
    seed), so the deficit is read against them. ``note`` is printed under the heading.
    """
    if not reports:
        return ""
    lines = [
        "#### Diagnosis of plain joint training (`imbalance_report`, seed 0)",
        "",
        "Per modality: the test accuracy of its logits through the shared head, a linear probe "
        "on the jointly trained encoder, the same probe on the encoder trained alone (the "
        "uni-modal row), and the deficit between the two.",
        "",
        *([note, ""] if note else []),
    ]
    for title, opt, diagnosis in reports:
        lines += [f"**{title}, {opt}**", "", str(diagnosis), ""]
    return "\n".join(lines)


def with_alone(joint: RunResult, alone: Mapping[str, RunResult]) -> ImbalanceReport | None:
    """``joint``'s report with the uni-modal runs' probes as the encoders trained alone."""
    if joint.diagnosis is None or any(r.diagnosis is None for r in alone.values()):
        return None
    probes = {m: r.diagnosis.probe[m] for m, r in alone.items() if r.diagnosis is not None}
    return dataclasses.replace(joint.diagnosis, alone=probes)


def per_seed_text(per_seed: Sequence[tuple[str, str, str, Sequence[float]]]) -> str:
    """Every run's test accuracy, seed by seed, so the spread can be read directly."""
    lines = ["#### Test accuracy per seed (%)", ""]
    for task, opt, label, accs in per_seed:
        values = ", ".join(_num(100 * a) for a in accs)
        lines.append(f"- {task} / {opt} / {label}: {values}")
    return "\n".join(lines) + "\n"


def plots(
    directory: Path,
    curves: Mapping[str, Mapping[str, list[float]]],
    traces: Mapping[str, Mapping[str, list[dict[str, float]]]],
    modalities: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Validation accuracy per epoch per method, and each method's diagnostics over training.

    Both figures are drawn by the library's ``plot_history`` (every line its own colour and dash,
    one legend outside the panels): the first with one panel per optimiser and one line per row,
    the second with one panel per method's coefficient field (its y axis named after the field)
    and one line per optimiser and modality. A method whose record says when its modulation
    window ended (OGM-GE's ``stop_step``: ``active`` turns 0 and the coefficients are 1 from
    then on) has that step in its panel's title. Returns a one-line note (where the plots went,
    or why they were skipped).
    """
    written = []
    try:
        for task, by_run in curves.items():
            val: dict[str, list[dict[str, float]]] = {}
            for name, curve in by_run.items():
                label, opt = name.rsplit(" / ", 1)
                _merge(val.setdefault(label, []), [
                    {f"validation accuracy % ({opt}, seed 0)": 100 * v} for v in curve
                ])  # fmt: skip
            written.append(
                plot_history(
                    val,
                    directory / f"benchmark_{task}_val.png",
                    modalities=[],
                    ylabel="validation accuracy %",
                    title=task,
                )
            )
            runs = traces.get(task, {})
            if not runs:
                continue
            per_opt: dict[str, list[dict[str, float]]] = {}
            stops: dict[str, dict[str, int]] = {}  # method -> optimiser -> window end (1-based)
            for name, trace in runs.items():
                label, opt = name.rsplit(" / ", 1)
                stop = _window_end(trace)
                if stop is not None:
                    stops.setdefault(label, {})[opt] = stop
            ylabels: dict[str, str] = {}  # panel (metric) -> its y axis
            for name, trace in runs.items():
                label, opt = name.rsplit(" / ", 1)
                note = _stop_note(stops.get(label))
                renamed: dict[str, str] = {}  # trace key -> plotted key
                for k in _diagnostic_keys(trace):
                    field, _, modality = k.partition("/")
                    panel = f"{label}: {field}{note}"
                    ylabels[panel] = _FIELD_LABELS.get(field, field.replace("_", " "))
                    renamed[k] = f"{panel}/{modality}" if modality else panel
                _merge(per_opt.setdefault(opt, []), [
                    {renamed[k]: step[k] for k in renamed if k in step} for step in trace
                ])  # fmt: skip
            written.append(
                plot_history(
                    per_opt,
                    directory / f"benchmark_{task}_coefficients.png",
                    modalities=list((modalities or {}).get(task, ())),
                    xlabel="optimiser step",
                    ylabel=ylabels,
                    title=f"{task}: each method's coefficients over training (seed 0)",
                )
            )
    except ImportError:
        return "(plots skipped: matplotlib is not installed; `pip install matplotlib`)"
    return "(plots: " + ", ".join(str(p) for p in written) + ")"


_FIELD_LABELS = {
    "coefficient": "coefficient",
    "coefficients": "coefficient",
    "beta": "beta",
    "num_heads": "number of heads",
    "heads": "number of heads",
    "head_counts": "number of heads",
    "weights": "loss weight",
    "k": "coefficient k",
    "drop_probabilities": "drop probability",
    "cosine": "cosine (fused, unimodal gradient)",
}
"""The y-axis label of each diagnostic field's panel."""


def _window_end(trace: Sequence[dict[str, float]]) -> int | None:
    """The point (1-based, as plotted) from which ``active`` stays 0 after having been 1.

    OGM-GE's records say ``active = 0`` from its ``stop_step`` on, where its coefficients are
    1 (no modulation): the jump to 1 in its curve is that step, not a change of the ratio.
    """
    active = [step.get("active") for step in trace]
    if 1.0 not in active or active[-1] != 0.0:
        return None
    end = len(active)
    while end > 0 and active[end - 1] == 0.0:
        end -= 1
    return end + 1


def _stop_note(stops: Mapping[str, int] | None) -> str:
    """`` (window ends at step N: coefficients 1 after)`` for a panel title, or ``""``."""
    if not stops:
        return ""
    at = set(stops.values())
    where = (
        str(next(iter(at)))
        if len(at) == 1
        else ", ".join(f"{opt} {step}" for opt, step in stops.items())
    )
    return f"\n(modulation stops at step {where}: coefficients 1 from there on)"


def _merge(into: list[dict[str, float]], points: Sequence[dict[str, float]]) -> None:
    """Add each point's values to the entry of the same index (entries appended as needed)."""
    for i, point in enumerate(points):
        if i == len(into):
            into.append({})
        into[i].update(point)


_PREFERRED = (
    "coefficient",
    "coefficients",
    "beta",
    "num_heads",
    "heads",
    "head_counts",
    "weights",
    "k",
    "drop_probabilities",  # OPM
    "cosine",  # MMPareto: the fused / unimodal gradient cosine per encoder
)


def _diagnostic_keys(trace: Sequence[dict[str, float]]) -> list[str]:
    """The per-modality coefficient / head-count fields of a trace (else every field)."""
    keys = list(trace[0]) if trace else []
    for field in _PREFERRED:
        chosen = [k for k in keys if k.split("/")[0] == field]
        if chosen:
            return chosen
    return keys
