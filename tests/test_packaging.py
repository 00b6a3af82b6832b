"""The README's commands and CI stay in step; the public API is importable and typed."""

from __future__ import annotations

import re
from pathlib import Path

import imbalance_losses

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [
        line for b in blocks[:2] for line in b.splitlines() if line and not line.startswith("#")
    ]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    demo, tests = _readme_commands()
    assert "benchmark.py --quick" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # the command, then a guard that turns any failure inside the && list into an exit
    assert any(line.startswith(tests + " || {") and "exit 1" in line for line in ci)


def test_public_names_are_exported_and_documented() -> None:
    for name in imbalance_losses.__all__:
        obj = getattr(imbalance_losses, name)
        assert getattr(obj, "__doc__", None), name
    assert (ROOT / "imbalance_losses" / "py.typed").exists()
