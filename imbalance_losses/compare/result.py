"""What :func:`compare_remedies` returns: rows, the best on validation, JSON, Markdown, a plot.

Accuracies are fractions in ``[0, 1]`` (shown in % by :meth:`ComparisonResult.to_markdown`);
spreads are the sample standard deviation over seeds (``ddof = 1``; ``nan`` with one seed).
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..diagnosis.report import ImbalanceReport

__all__ = ["Best", "ComparisonResult", "Row", "RunRecord"]

INSTALL = 'pip install matplotlib (or pip install -e ".[plots]" from a clone of this library)'
PLAIN = "plain"


@dataclass
class RunRecord:
    """One run (a method, a setting, a seed) at the epoch chosen on validation.

    Attributes:
        method: the method's short name; config: its setting; seed: the seed.
        init: a hash of the initial weights (equal for every method of a seed).
        epoch: the chosen epoch (1-based; 0 when no epoch finished).
        val: validation accuracy at that epoch; val_loss: validation cross-entropy.
        test: test accuracy of that epoch's model (``None``: no test loader, or a grid point
            that was not selected, which never sees the test loader).
        curve: validation accuracy after every epoch.
        seconds_per_epoch: wall time per epoch (training, the method's per-epoch work and the
            validation pass).
        diverged: the epoch the run stopped at on non-finite values (``None``: it did not).
        trace: with ``trace=True``, the method's record after every optimiser step (e.g.
            its per-modality coefficients), flattened to ``{field: value}``.
    """

    method: str
    config: dict[str, float]
    seed: int
    init: str = ""
    epoch: int = 0
    val: float = math.nan
    val_loss: float = math.nan
    test: float | None = None
    curve: list[float] = field(default_factory=list)
    seconds_per_epoch: float = math.nan
    diverged: int | None = None
    trace: list[dict[str, float]] = field(default_factory=list)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass
class Row:
    """One method: ``status`` is ``"ok"``, ``"partial"`` (some seeds skipped for the budget),
    ``"skipped"`` (not applicable, or no run fitted the budget) or ``"failed"``; ``reason``
    says why. ``diagnosis`` is :func:`imbalance_report` of the first seed's selected run.
    ``options``: the method's ``options`` (JSON) its runs were made with; a resumed row is reused
    only for the same options and the same settings tried."""

    name: str
    label: str
    status: str = "ok"
    reason: str = ""
    note: str = ""
    config: dict[str, float] = field(default_factory=dict)
    grid: list[dict[str, Any]] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    diagnosis: dict[str, Any] | None = None
    options: str = "{}"

    @property
    def val(self) -> list[float]:
        return [r.val for r in self.runs]

    @property
    def test(self) -> list[float]:
        return [r.test for r in self.runs if r.test is not None]

    @property
    def val_mean(self) -> float:
        return _mean(self.val)

    @property
    def val_std(self) -> float:
        return _spread(self.val)

    @property
    def test_mean(self) -> float:
        return _mean(self.test)

    @property
    def test_std(self) -> float:
        return _spread(self.test)

    @property
    def epochs(self) -> list[int]:
        """The chosen epoch of each seed."""
        return [r.epoch for r in self.runs]

    @property
    def seconds_per_epoch(self) -> float:
        return _mean([r.seconds_per_epoch for r in self.runs])

    @property
    def report(self) -> ImbalanceReport | None:
        """The diagnosis as an :class:`~imbalance_losses.ImbalanceReport`."""
        if self.diagnosis is None:
            return None
        d = dict(self.diagnosis)
        return ImbalanceReport(modalities=tuple(d.pop("modalities")), **d)

    @property
    def done(self) -> bool:
        return self.status in ("ok", "partial")


@dataclass(frozen=True)
class Best:
    """The best row on validation, its margin over plain training and whether it is
    distinguishable from plain training (margin above the larger seed spread of the two)."""

    name: str
    label: str
    margin: float
    spread: float
    distinguishable: bool

    def __str__(self) -> str:
        if self.name == PLAIN:
            return "plain joint training is best on validation: no method improved on it"
        pts = f"{100 * self.margin:+.1f} points over plain training on validation"
        if self.distinguishable:
            return f"{self.label}: {pts}, above the seed spread ({100 * self.spread:.1f})"
        spread = (
            "one seed: no spread"
            if math.isnan(self.spread)
            else (f"seed spread {100 * self.spread:.1f} points")
        )
        return f"{self.label}: {pts}, not distinguishable from plain training ({spread})"


@dataclass
class ComparisonResult:
    """The comparison: one :class:`Row` per method (plain training first), the settings, notes.

    ``alone`` holds, with ``alone=True``, each modality's encoder trained alone: its validation
    accuracy and its probe (the reference of every row's deficit).

    Example:
        >>> from imbalance_losses import ComparisonResult
        >>> from imbalance_losses.compare import Row, RunRecord
        >>> def row(name, vals):
        ...     runs = [RunRecord(name, {}, seed, val=v) for seed, v in enumerate(vals)]
        ...     return Row(name, name, runs=runs)
        >>> plain, arl = row("plain", [0.80, 0.84, 0.82]), row("arl", [0.85, 0.81, 0.84])
        >>> result = ComparisonResult([plain, arl])
        >>> result.best.name, result.best.distinguishable     # +1.3 points, spread 2.1
        ('arl', False)
        >>> ComparisonResult.from_dict(result.to_dict()).best == result.best  # save() / load()
        True
    """

    rows: list[Row] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    alone: dict[str, dict[str, float]] = field(default_factory=dict)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    @property
    def skipped(self) -> dict[str, str]:
        """Method -> the reason it has no result (not applicable, budget, failure)."""
        return {r.name: r.reason for r in self.rows if not r.done}

    @property
    def best(self) -> Best:
        """The row with the best mean validation accuracy (never the test split)."""
        done = [r for r in self.rows if r.done and not math.isnan(r.val_mean)]
        if not done:
            raise ValueError("no method finished a run: there is no best")
        best = max(done, key=lambda r: (r.val_mean, r.name == PLAIN))
        plain = next((r for r in done if r.name == PLAIN), None)
        if plain is None or best is plain:
            return Best(best.name, best.label, 0.0, math.nan, False)
        spreads = [s for s in (best.val_std, plain.val_std) if not math.isnan(s)]
        spread = max(spreads) if len(spreads) == 2 else math.nan
        margin = best.val_mean - plain.val_mean
        return Best(
            best.name, best.label, margin, spread, not math.isnan(spread) and margin > spread
        )

    # ------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the result as JSON (``ComparisonResult.load`` reads it back)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonResult:
        rows = []
        for r in data.get("rows", []):
            r = dict(r)
            r["runs"] = [RunRecord(**run) for run in r.get("runs", [])]
            rows.append(Row(**r))
        return cls(
            rows=rows,
            settings=dict(data.get("settings", {})),
            notes=list(data.get("notes", [])),
            alone=dict(data.get("alone", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> ComparisonResult:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a saved comparison (JSON): {err}") from err
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError(f"{path} is not a saved comparison: no 'rows'")
        return cls.from_dict(data)

    # ------------------------------------------------------------------------- text
    def to_markdown(self) -> str:
        """The table, the skipped methods with their reasons, the best and the notes."""
        plain = next((r for r in self.rows if r.name == PLAIN and r.done), None)
        head = [
            "method", "setting", "val acc %", "test acc %", "epoch", "time / epoch", "seeds",
            "probe acc % per modality", "diagnosis",
        ]  # fmt: skip
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for row in (r for r in self.rows if r.done):
            lines.append("| " + " | ".join(_cells(row, plain, self.alone)) + " |")
        out = "\n".join(lines)
        skipped = [r for r in self.rows if not r.done]
        if skipped:
            out += "\n\nNo result:\n\n" + "\n".join(
                f"- **{r.label}** ({r.status}): {r.reason}" for r in skipped
            )
        partial = [r for r in self.rows if r.status == "partial"]
        out += "".join(f"\n\n{r.label}: {r.reason}" for r in partial)
        if any(r.done for r in self.rows):
            out += f"\n\n**Best on validation**: {self.best}."
        out += (
            "\n\nAccuracies: mean ± standard deviation over seeds, at the epoch chosen on "
            "validation. A difference smaller than the seed spread is not evidence."
        )
        if self.alone:
            out += "\n\nEncoders trained alone (the reference of the diagnosis): " + ", ".join(
                f"{m} probe {_pct(a['probe'])} %" for m, a in self.alone.items()
            )
        if self.notes:
            out += "\n\n" + "\n".join(f"- {n}" for n in self.notes)
        return out

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, path: str | Path) -> None:
        """A bar chart of validation (and test) accuracy, mean ± spread per method (PNG, ...)."""
        try:
            figure = importlib.import_module("matplotlib.figure").Figure
            importlib.import_module("matplotlib.backends.backend_agg")
        except ImportError as err:
            raise ImportError(f"ComparisonResult.plot needs matplotlib: {INSTALL}") from err
        rows = [r for r in self.rows if r.done]
        fig = figure(figsize=(7, 0.5 * len(rows) + 1.5))
        ax = fig.add_subplot()
        ys = list(range(len(rows)))
        for offset, what in ((-0.2, "val"), (0.2, "test")):
            means = [getattr(r, f"{what}_mean") for r in rows]
            errs = [0.0 if math.isnan(s) else s for s in (getattr(r, f"{what}_std") for r in rows)]
            if not all(math.isnan(m) for m in means):
                pos = [y + offset for y in ys]
                ax.barh(
                    pos, [100 * m for m in means], 0.4, xerr=[100 * e for e in errs], label=what
                )
        ax.set_yticks(ys, [r.label for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("accuracy % (mean ± spread over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(str(path))


def _pct(value: float, spread: float = math.nan) -> str:
    if math.isnan(value):
        return "—"
    return f"{100 * value:.1f}" + ("" if math.isnan(spread) else f" ± {100 * spread:.1f}")


def _cells(row: Row, plain: Row | None, alone: dict[str, dict[str, float]]) -> list[str]:
    setting = ", ".join(f"{k}={v:g}" for k, v in row.config.items()) or "-"
    ratio = math.nan if plain is None else row.seconds_per_epoch / plain.seconds_per_epoch
    time = f"{row.seconds_per_epoch:.2g} s" + ("" if math.isnan(ratio) else f" (×{ratio:.1f})")
    probes, verdict = "—", ""
    report = row.report
    if report is not None:
        probes = " / ".join(f"{m} {_pct(report.probe[m])}" for m in report.modalities)
        if alone:
            report = ImbalanceReport(
                modalities=report.modalities,
                probe=report.probe,
                head=report.head,
                alone={m: a["probe"] for m, a in alone.items() if m in report.probe},
                num_classes=report.num_classes,
                num_fit=report.num_fit,
                num_evaluated=report.num_evaluated,
            )
            under = report.under_trained
            verdict = "under-trained: " + ", ".join(under) if under else "none under-trained"
        elif len(report.modalities) > 1:
            verdict = f"weakest: {report.weakest}"
    if row.note:
        verdict = f"{verdict}; {row.note}" if verdict else row.note
    epochs = "/".join(str(e) for e in row.epochs)
    return [
        row.label, setting, _pct(row.val_mean, row.val_std), _pct(row.test_mean, row.test_std),
        epochs, time, str(len(row.runs)), probes, verdict,
    ]  # fmt: skip
