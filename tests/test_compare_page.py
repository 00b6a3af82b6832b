"""docs/compare.md runs as written: every row of its toy comparison, and a best verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pages import run_page

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_page_runs(tmp_path: Path) -> None:
    ns = run_page("compare.md", tmp_path)
    result = ns["result"]
    assert [r.name for r in result.rows] == ["plain", "arl", "pmr", "mmpareto"]
    assert all(r.status == "ok" and len(r.runs) == 3 for r in result.rows)
    assert str(result.best)
