"""docs/diagnosis.md runs as written, and what it shows holds on its toy model."""

from __future__ import annotations

from pathlib import Path

import pytest

from imbalance_losses.diagnosis.report import ImbalanceReport
from tests.pages import run_page

pytest.importorskip("matplotlib")


def test_docs_page_runs_as_written(tmp_path: Path) -> None:
    ns = run_page("diagnosis.md", tmp_path)
    history = ns["history"]
    assert len(history) == 10
    last = history[-1]
    # the strong modality dominates the toy model: higher accuracy, ratio above 1
    assert last["imbalance/audio/acc"] > last["imbalance/visual/acc"]
    assert last["imbalance/audio/ratio"] > 1 > last["imbalance/visual/ratio"]
    shares = last["imbalance/audio/grad_share"] + last["imbalance/visual/grad_share"]
    assert shares == pytest.approx(1.0)
    assert last["imbalance/samples"] == 512 and last["imbalance/grad_steps"] == 8
    assert (tmp_path / "imbalance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = ns["report"]
    assert isinstance(report, ImbalanceReport)
    assert report.weakest == "visual" and report.alone == {}
    assert set(ns["values"]) == {
        f"imbalance/{m}/{k}" for m in ("audio", "visual") for k in ("probe_acc", "head_acc")
    }


def test_docs_images_are_small_pngs() -> None:
    images = sorted((Path(__file__).resolve().parents[1] / "docs" / "img").glob("diagnosis_*"))
    assert [p.name for p in images] == ["diagnosis_joint.png", "diagnosis_joint_vs_arl.png"]
    for p in images:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000
