"""The benchmark's diagnosis section: the joint run's report, with the uni-modal runs' probes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from imbalance_losses.diagnosis.report import ImbalanceReport

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _bench import report


def _run(diagnosis: ImbalanceReport | None) -> report.RunResult:
    base: dict[str, Any] = dict(
        task="t", method="m", optimizer="sgd", seed=0, config={}, val_curve=[0.5],
        best_epoch=1, best_val=0.5, best_val_loss=1.0, test_acc=0.5, probe={}, head={},
        seconds=1.0, trace=[], diagnosis=diagnosis,
    )  # fmt: skip
    return report.RunResult(**base)


def test_the_joint_report_takes_the_unimodal_probes_as_the_encoders_trained_alone() -> None:
    joint = ImbalanceReport(
        modalities=("audio", "image"), probe={"audio": 0.80, "image": 0.97},
        head={"audio": 0.2, "image": 0.9}, num_classes=10, num_fit=1079, num_evaluated=359,
    )  # fmt: skip
    alone = {
        "audio": _run(ImbalanceReport(modalities=("audio",), probe={"audio": 0.95})),
        "image": _run(ImbalanceReport(modalities=("image",), probe={"image": 0.97})),
    }
    combined = report.with_alone(_run(joint), alone)
    assert combined is not None
    assert combined.alone == {"audio": 0.95, "image": 0.97}
    assert combined.probe == joint.probe and combined.head == joint.head
    assert combined.under_trained == ("audio",)
    text = report.diagnosis_text([("AV digits", "sgd", combined)])
    assert "**AV digits, sgd**" in text and "| audio | 20.0 | 80.0 | 95.0 | 15.0 |" in text
    assert report.diagnosis_text([]) == ""
    # a diverged run has no report: no diagnosis
    assert report.with_alone(_run(None), alone) is None
    assert report.with_alone(_run(joint), {"audio": _run(None)}) is None
