"""One figure of per-modality values over training (matplotlib, an optional extra).

:func:`plot_history` draws what :meth:`~imbalance_losses.ImbalanceMonitor.compute` returned at
each epoch (or any list of flat ``{key: float}`` dicts, such as records'
:meth:`~imbalance_losses.core.records.StepRecord.to_dict`): one panel per metric, one line per
modality. A key's **modality** is the path component that names one of the modalities; the
**metric** is the key without it and without the monitor's leading ``imbalance/``::

    imbalance/audio/acc               -> metric "acc",              line "audio"
    imbalance/ogm/coefficients/audio  -> metric "ogm/coefficients", line "audio"
    coefficients/audio                -> metric "coefficients",     line "audio"
    imbalance/samples                 -> metric "samples",          one line

Every line label (``"<run>: <modality>"``) keeps one style in every panel, and no two labels
share one: matplotlib's colour cycle, then the same colours dashed, dash-dotted and dotted (40
distinct styles with the default 10 colours). One legend for the whole figure sits outside the
panels, on the right, so it never covers a curve.

matplotlib is imported only when a figure is drawn (``pip install matplotlib``, or the ``plots``
extra from a clone);
no pyplot state is touched (the figure is a bare ``matplotlib.figure.Figure``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from .monitor import PREFIX

__all__ = ["History", "plot_history"]

History = Sequence[Mapping[str, float]]
"""One entry per point (epoch, logging window, step): ``{key: value}``."""

INSTALL = 'pip install matplotlib (or pip install -e ".[plots]" from a clone of this library)'
LINESTYLES = ("-", "--", "-.", ":")
"""The line styles, one per round of the colour cycle."""
EXPECTED = (
    "plot_history takes a list of {key: number} dicts, one per point (e.g. "
    "[monitor.compute() for each epoch]), or a mapping run label -> such a list"
)


def _figure_class() -> Any:
    try:
        return importlib.import_module("matplotlib.figure").Figure
    except ImportError as err:
        raise ImportError(
            f"plot_history needs matplotlib, which is not installed: {INSTALL}"
        ) from err


def _runs(history: object) -> dict[str, Sequence[Mapping[str, object]]]:
    """``{run label: entries}`` from the ``history`` argument, or a ``TypeError`` naming the fix."""
    if isinstance(history, str | bytes) or not isinstance(history, Sequence | Mapping):
        raise TypeError(f"{EXPECTED}; got {type(history).__name__} {history!r:.60}")
    if isinstance(history, Mapping):
        bad = {
            k: v
            for k, v in history.items()
            if isinstance(v, str | bytes) or not isinstance(v, Sequence)
        }
        if bad:
            key, value = next(iter(bad.items()))
            hint = (
                ": it looks like one point (one compute() dict); give a list of them, "
                "plot_history([values], path)"
                if all(_is_number(v) for v in history.values())
                else ""
            )
            raise TypeError(
                f"{EXPECTED}; got a mapping whose value for {key!r} is "
                f"{type(value).__name__} {value!r:.60}{hint}"
            )
        runs = {str(k): v for k, v in history.items()}
    else:
        runs = {"": history}
    for run, entries in runs.items():
        where = "history" if not run else f"history[{run!r}]"
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise TypeError(f"{EXPECTED}; {where}[{i}] is {type(entry).__name__} {entry!r:.60}")
            for key, value in entry.items():
                if not _is_number(value):
                    raise TypeError(
                        f"plot_history: {where}[{i}][{key!r}] is {type(value).__name__} "
                        f"{value!r:.60}; every value must be a number (convert values read "
                        "from a file or a log with float(...))"
                    )
    return runs


def _is_number(value: object) -> bool:
    """Whether ``float(value)`` is meant (numbers, 0-dim tensors, numpy scalars; not text)."""
    if isinstance(value, str | bytes):
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _styles(labels: Sequence[str], colors: Sequence[object]) -> dict[str, dict[str, Any]]:
    """One distinct ``{color, linestyle}`` per label: the colours, then again with each dash."""
    n = max(len(colors), 1)
    return {
        label: {"color": colors[i % n], "linestyle": LINESTYLES[(i // n) % len(LINESTYLES)]}
        for i, label in enumerate(labels)
    }


def _colors() -> list[object]:
    """matplotlib's colour cycle (the user's style, if one is set): names or RGB tuples."""
    mpl = importlib.import_module("matplotlib")
    return list(mpl.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"]))


def _split(key: str, modalities: Sequence[str]) -> tuple[str, str | None]:
    """``(metric, modality or None)`` of one key (see the module docstring)."""
    parts = key.split("/")
    if parts[0] == PREFIX and len(parts) > 1:
        parts = parts[1:]
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in modalities and len(parts) > 1:
            return "/".join(parts[:i] + parts[i + 1 :]), parts[i]
    return "/".join(parts), None


def _infer_modalities(runs: Mapping[str, Sequence[Mapping[str, object]]]) -> list[str]:
    """The ``<m>`` of the monitor's ``imbalance/<m>/acc`` keys, in first-seen order."""
    found: dict[str, None] = {}
    for history in runs.values():
        for entry in history:
            for key in entry:
                parts = key.split("/")
                if len(parts) == 3 and parts[0] == PREFIX and parts[2] == "acc":
                    found[parts[1]] = None
    return list(found)


def plot_history(
    history: History | Mapping[str, History],
    path: str | PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    xlabel: str = "epoch",
    ylabel: str | Mapping[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw per-modality curves over training in one figure and save it to ``path``.

    Args:
        history: the values at each point, e.g. ``[monitor.compute() for each epoch]``; or a
            mapping run label -> such a list, to overlay several runs (line labels
            ``"<run>: <modality>"``).
        path: the file to write (the format follows its suffix: ``.png``, ``.pdf``, ``.svg``);
            its folder is created.
        metrics: the panels, in order (metric names as in the module docstring, e.g.
            ``["acc", "ratio", "grad_share", "modulator/coefficients"]``). Default: every metric
            with a per-modality line, in first-seen order (every metric if none has).
        modalities: the modality names (default: those of the monitor's ``imbalance/<m>/acc``
            keys; ``[]`` for values that belong to no modality: one line per run).
        xlabel: the x axis (the points are numbered from 1).
        ylabel: the y axis of every panel (a string), or metric -> y label (a panel left out
            gets its metric's name); default: each panel's metric name.
        title: the figure's title.

    Returns:
        the path written.

    Raises:
        ImportError: matplotlib is not installed (the message names the extra to install).
        TypeError: ``history`` is not a list of ``{key: number}`` dicts nor a mapping run ->
            such a list (one ``compute()`` dict on its own, a string), or a value is not a number
            (a string read from a log): the message says what to give.
        ValueError: an empty history, no modality found (pass ``modalities=``), ``metrics=[]``,
            or a metric asked for that no key has.

    Example:
        >>> import tempfile, pathlib
        >>> history = [
        ...     {"imbalance/audio/acc": 0.3, "imbalance/image/acc": 0.8},
        ...     {"imbalance/audio/acc": 0.5, "imbalance/image/acc": 0.9},
        ... ]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = plot_history(history, pathlib.Path(tmp) / "curves.png")
        ...     out.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    runs = _runs(history)
    if not runs or all(len(h) == 0 for h in runs.values()):
        raise ValueError("plot_history: the history is empty (no point to draw)")
    names = list(modalities) if modalities is not None else _infer_modalities(runs)
    if modalities is None and not names:
        raise ValueError(
            "plot_history: no modality found in the keys (the monitor's keys are "
            "'imbalance/<modality>/acc'); pass modalities=[...]"
        )
    # each entry as {(metric, modality): value}; metric -> its lines (run, modality or None)
    parsed = {
        run: [
            {_split(k, names): float(v) for k, v in entry.items()}  # type: ignore[arg-type]
            for entry in entries
        ]
        for run, entries in runs.items()
    }
    series: dict[str, dict[tuple[str, str | None], None]] = {}
    for run, entries_ in parsed.items():
        for point in entries_:
            for metric, modality in point:
                series.setdefault(metric, {})[(run, modality)] = None
    if metrics is None:
        chosen = [m for m, lines in series.items() if any(mod for _, mod in lines)]
        chosen = chosen or list(series)
    else:
        if not metrics:
            raise ValueError("plot_history: metrics=[] asks for no panel; leave it out for all")
        unknown = [m for m in metrics if m not in series]
        if unknown:
            raise ValueError(
                f"plot_history: no key gives the metrics {unknown}; the history has {list(series)}"
            )
        chosen = list(metrics)
    figure = _figure_class()

    def label_of(run: str, modality: str | None, metric: str) -> str:
        return ": ".join(part for part in (run, modality) if part) or metric

    # the legend's (and the styles') order: by run, then by modality, as given
    run_order = {run: i for i, run in enumerate(runs)}
    mod_order: dict[str | None, int] = {mod: i for i, mod in enumerate(names)}
    lines = sorted(
        ((r, mod, m) for m in chosen for r, mod in series[m]),
        key=lambda line: (run_order[line[0]], mod_order.get(line[1], len(names))),
    )
    labels = {label_of(*line): None for line in lines}
    styles = _styles(list(labels), _colors())
    handles: dict[str, Any] = {}
    ncols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = figure(figsize=(4.6 * ncols, 3.3 * nrows + (0.4 if title else 0.0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(chosen) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, chosen, strict=False):
        for run, modality in series[metric]:
            values = [point.get((metric, modality), math.nan) for point in parsed[run]]
            label = label_of(run, modality, metric)
            marker = "o" if len(values) == 1 else None  # a line through one point is invisible
            (line,) = ax.plot(
                range(1, len(values) + 1),
                values,
                label=label,
                lw=1.2,
                marker=marker,
                **styles[label],
            )
            handles.setdefault(label, line)
        ax.xaxis.get_major_locator().set_params(integer=True)  # points are numbered
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if isinstance(ylabel, str):
            ax.set_ylabel(ylabel, fontsize=8)
        else:
            ax.set_ylabel((ylabel or {}).get(metric, metric), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    # one legend for every panel, outside them (right of the figure): it covers no curve
    order = [label for label in labels if label in handles]  # by run, then modality
    fig.legend(
        [handles[label] for label in order],
        order,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=7,
        frameon=False,
        ncol=1 + (len(handles) - 1) // 24,  # `ncol`: every matplotlib version has it
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")  # "tight" takes the legend in
    return out
