"""examples/overhead.py --quick runs and prints a ratio for every row (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_quick_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "examples" / "overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = module
    spec.loader.exec_module(module)
    module.main(["--quick", "--rounds", "2", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [
        "plain cross-entropy (reference)",
        "ARLLoss",
        "ModalityGradientModulator ogm",
        "ModalityGradientModulator ogm_ge",
        "SustainedBoostingLoss, 1 head",
        "SustainedBoostingLoss, 2 heads",
        "SustainedBoostingLoss, 8 heads",
    ]
    for row in rows:
        line = next(x for x in out.splitlines() if x.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d{3}", cells[2]), line  # the ratio to plain
        # no host read outside the input checks in any module's training step
        assert cells[-1].endswith("/ 0"), line
    assert "Host reads outside the input checks" not in out
    # OGM-GE against its floor, the draw alone: (a), (b) and their ratio are printed
    floor = next(x for x in out.splitlines() if x.startswith("OGM-GE against its floor"))
    assert re.search(r"\(a\) torch\.randn alone \d+\.\d+ ms", floor), floor
    assert re.search(r"\(b\) modulator\.step \d+\.\d+ ms, ratio \(b\)/\(a\) \d+\.\d{3}", floor)


def test_host_time_prints_the_paired_figures(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location("host_time", ROOT / "examples/host_time.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["ogm_ge", "--rounds", "3"])
    finally:
        sys.path.remove(str(ROOT / "examples"))
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| Modality")]
    assert [r.split(" | ")[0] for r in rows] == ["| ModalityGradientModulator ogm_ge"]
    assert re.fullmatch(r"\| .+ \| -?\d+ \| -?\d+\.\d\d \|", rows[0]), rows[0]
