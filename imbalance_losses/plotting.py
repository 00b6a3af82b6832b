"""One figure of per-modality values over training (matplotlib, an optional extra).

:func:`plot_history` draws what :meth:`~imbalance_losses.ImbalanceMonitor.compute` returned at
each epoch (or any list of flat ``{key: float}`` dicts, such as records'
:meth:`~imbalance_losses.diagnostics.StepRecord.to_dict`): one panel per metric, one line per
modality. A key's **modality** is the path component that names one of the modalities; the
**metric** is the key without it and without the monitor's leading ``imbalance/``::

    imbalance/audio/acc               -> metric "acc",              line "audio"
    imbalance/ogm/coefficients/audio  -> metric "ogm/coefficients", line "audio"
    coefficients/audio                -> metric "coefficients",     line "audio"
    imbalance/samples                 -> metric "samples",          one line

matplotlib is imported only when a figure is drawn (``pip install "imbalance-losses[plots]"``);
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

INSTALL = 'pip install "imbalance-losses[plots]"'


def _figure_class() -> Any:
    try:
        return importlib.import_module("matplotlib.figure").Figure
    except ImportError as err:
        raise ImportError(
            f"plot_history needs matplotlib, which is not installed: {INSTALL}"
        ) from err


def _split(key: str, modalities: Sequence[str]) -> tuple[str, str | None]:
    """``(metric, modality or None)`` of one key (see the module docstring)."""
    parts = key.split("/")
    if parts[0] == PREFIX and len(parts) > 1:
        parts = parts[1:]
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in modalities and len(parts) > 1:
            return "/".join(parts[:i] + parts[i + 1 :]), parts[i]
    return "/".join(parts), None


def _infer_modalities(runs: Mapping[str, History]) -> list[str]:
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
        title: the figure's title.

    Returns:
        the path written.

    Raises:
        ImportError: matplotlib is not installed (the message names the extra to install).
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
    runs: dict[str, History] = {"": history} if not isinstance(history, Mapping) else dict(history)
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
        run: [{_split(k, names): float(v) for k, v in entry.items()} for entry in entries]
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
    ncols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = figure(figsize=(4.6 * ncols, 3.3 * nrows + (0.4 if title else 0.0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(chosen) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, chosen, strict=False):
        for run, modality in series[metric]:
            values = [point.get((metric, modality), math.nan) for point in parsed[run]]
            label = ": ".join(part for part in (run, modality) if part) or metric
            marker = "o" if len(values) == 1 else None  # a line through one point is invisible
            ax.plot(range(1, len(values) + 1), values, label=label, lw=1.0, marker=marker)
        ax.xaxis.get_major_locator().set_params(integer=True)  # points are numbered
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
