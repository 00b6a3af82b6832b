"""plot_history edge cases: no metric asked for, and a history of one point (after epoch 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imbalance_losses.diagnosis import plotting
from imbalance_losses.diagnosis.plotting import plot_history

pytest.importorskip("matplotlib")


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    real = plotting._figure_class()
    figures: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        figures.append(real(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(plotting, "_figure_class", lambda: make)
    return figures


def test_empty_metrics_is_a_clear_error(tmp_path: Path) -> None:
    history = [{"imbalance/audio/acc": 0.5, "imbalance/image/acc": 0.7}]
    with pytest.raises(ValueError, match="metrics"):
        plot_history(history, tmp_path / "x.png", metrics=[])
    assert not (tmp_path / "x.png").exists()


def test_a_single_point_is_drawn_visibly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A line through one point draws nothing: such a line gets a marker."""
    figures = _capture(monkeypatch)
    history = [{"imbalance/audio/acc": 0.5, "imbalance/image/acc": 0.7}]
    plot_history(history, tmp_path / "one.png")
    lines = figures[-1].axes[0].get_lines()
    assert len(lines) == 2
    assert all(line.get_marker() not in (None, "None", "", " ") for line in lines)
    plot_history(history * 3, tmp_path / "three.png")  # several points: lines as before
    assert all(line.get_marker() == "None" for line in figures[-1].axes[0].get_lines())
