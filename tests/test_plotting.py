"""plot_history: valid image files, the right lines in the right panels, a clear error."""

from __future__ import annotations

import importlib
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from imbalance_losses.diagnosis import plotting
from imbalance_losses.diagnosis.monitor import ImbalanceMonitor
from imbalance_losses.diagnosis.plotting import _split, plot_history

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (which must come first)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return width, height


def _history(epochs: int = 4) -> list[dict[str, float]]:
    """A real monitor's compute() over a few synthetic epochs."""
    g = torch.Generator().manual_seed(0)
    monitor = ImbalanceMonitor(["audio", "image"])
    out = []
    for epoch in range(epochs):
        y = torch.randint(0, 3, (32,), generator=g)
        sharp = torch.nn.functional.one_hot(y, 3).float() * (1 + epoch)
        monitor.update({"audio": torch.randn(32, 3, generator=g), "image": sharp}, y)
        out.append(monitor.compute())
        monitor.reset()
    return out


def test_monitor_history_is_written_as_a_valid_png(tmp_path: Path) -> None:
    path = plot_history(_history(), tmp_path / "sub" / "curves.png", title="t")
    assert path == tmp_path / "sub" / "curves.png"
    width, height = _png_size(path)
    assert width > 300 and height > 200


def test_split_finds_the_modality_and_the_metric() -> None:
    mods = ["audio", "image"]
    assert _split("imbalance/audio/acc", mods) == ("acc", "audio")
    assert _split("imbalance/ogm/coefficients/image", mods) == ("ogm/coefficients", "image")
    assert _split("coefficients/audio", mods) == ("coefficients", "audio")
    assert _split("imbalance/samples", mods) == ("samples", None)
    assert _split("val % (sgd)", mods) == ("val % (sgd)", None)


class _Recorder:
    """Wraps matplotlib's Figure and keeps the instance, to read back what was drawn."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.figures: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fig = self.real(*args, **kwargs)
        self.figures.append(fig)
        return fig


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    recorder = _Recorder(plotting._figure_class())
    monkeypatch.setattr(plotting, "_figure_class", lambda: recorder)
    return recorder.figures


def _lines(fig: Any) -> dict[str, dict[str, list[float]]]:
    """panel title -> line label -> y values, for the visible panels."""
    return {
        ax.get_title(): {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        for ax in fig.axes
        if ax.get_visible()
    }


def test_panels_are_metrics_and_lines_are_modalities(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    figures = _drawn(monkeypatch)
    history = _history(3)
    history[1]["imbalance/ogm/coefficients/audio"] = 0.5  # appears from the second point on
    history[2]["imbalance/ogm/coefficients/audio"] = 0.25
    plot_history(history, tmp_path / "a.png")
    panels = _lines(figures[-1])
    # default: every per-modality metric, in first-seen order; no "samples" panel
    assert list(panels) == ["acc", "confidence", "ratio", "ogm/coefficients"]
    assert panels["acc"]["audio"] == [h["imbalance/audio/acc"] for h in history]
    assert panels["ratio"]["image"] == [h["imbalance/image/ratio"] for h in history]
    coeff = panels["ogm/coefficients"]["audio"]
    assert math.isnan(coeff[0]) and coeff[1:] == [0.5, 0.25]
    plot_history(history, tmp_path / "b.png", metrics=["ratio", "samples"])
    panels = _lines(figures[-1])
    assert list(panels) == ["ratio", "samples"]
    assert panels["samples"] == {"samples": [32.0, 32.0, 32.0]}


def test_several_runs_are_overlaid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    figures = _drawn(monkeypatch)
    runs = {
        "sgd": [{"coefficients/audio": 0.9}, {"coefficients/audio": 0.8}],
        "adam": [{"coefficients/audio": 1.0}],
    }
    plot_history(runs, tmp_path / "c.png", modalities=["audio", "image"], xlabel="step")
    panels = _lines(figures[-1])
    assert panels == {"coefficients": {"sgd: audio": [0.9, 0.8], "adam: audio": [1.0]}}
    assert figures[-1].axes[0].get_xlabel() == "step"
    _png_size(tmp_path / "c.png")


def test_bad_calls_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_history([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="modalities="):
        plot_history([{"coefficients/audio": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\['grad_share'\]"):
        plot_history(_history(2), tmp_path / "x.png", metrics=["grad_share"])
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.import_module

    def no_matplotlib(name: str, *a: Any) -> Any:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_matplotlib)
    with pytest.raises(
        ImportError, match=r'pip install matplotlib \(or pip install -e "\.\[plots\]" from a clone'
    ):
        plot_history(_history(2), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------- issue 19: distinct styles, legend outside, y labels


def test_every_line_has_its_own_style_and_keeps_it_in_every_panel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    figures = _drawn(monkeypatch)
    runs = {
        f"run {i}": [{"sgd": float(i), "adam": float(i) + 0.5}, {"sgd": i + 1.0, "adam": i + 1.5}]
        for i in range(12)  # more lines than matplotlib's 10 colours
    }
    runs["run 3"] = [{"adam": 3.5}, {"adam": 4.5}]  # no "sgd" line: the styles do not shift
    plot_history(runs, tmp_path / "many.png", modalities=[])
    fig = figures[-1]
    styles = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            style = (str(line.get_color()), line.get_linestyle())
            assert styles.setdefault(line.get_label(), style) == style  # same in every panel
    assert len(styles) == 12 and len(set(styles.values())) == 12  # no two lines alike
    # one legend for the figure, right of every panel, none inside an axes
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(runs)
    fig.canvas.draw()  # a renderer, for the extents (the Agg canvas savefig used)
    right = max(ax.get_window_extent().x1 for ax in fig.axes if ax.get_visible())
    assert legend.get_window_extent().x0 >= right
    width, _ = _png_size(tmp_path / "many.png")
    assert width >= legend.get_window_extent().x1 - 1  # the saved image takes the legend in


def test_y_labels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    figures = _drawn(monkeypatch)
    history = _history(2)
    plot_history(history, tmp_path / "a.png", metrics=["acc", "ratio"])
    assert [ax.get_ylabel() for ax in figures[-1].axes] == ["acc", "ratio"]  # default: metric
    plot_history(history, tmp_path / "b.png", metrics=["acc", "ratio"], ylabel="value")
    assert [ax.get_ylabel() for ax in figures[-1].axes] == ["value", "value"]
    plot_history(history, tmp_path / "c.png", metrics=["acc", "ratio"], ylabel={"acc": "acc %"})
    assert [ax.get_ylabel() for ax in figures[-1].axes] == ["acc %", "ratio"]
