"""Issue 22's budget: each module's own compute ops per training step (examples/overhead.py).

Counted with a ``TorchDispatchMode`` on the one-Linear-encoder model (views, detaches and bare
allocations not counted): the row's ops minus the plain step's. Deterministic, so a module that
grows past its budget fails here, not in a timed test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVER: dict[str, str] = {}  # modules over budget while issue 22 is open (strict xfail)


def _overhead() -> Any:
    if "overhead" in sys.modules:
        return sys.modules["overhead"]
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "examples" / "overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = module
    spec.loader.exec_module(module)
    return module


def _params() -> list[Any]:
    budgets = _overhead().OP_BUDGETS
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=OVER[name]))
        if name in OVER
        else name
        for name in budgets
    ]


@pytest.fixture(scope="module")
def plain_ops() -> int:
    overhead = _overhead()
    rows = overhead.build_rows(overhead.TINY, only="plain cross-entropy (reference)")
    return sum(overhead.count_ops(next(iter(rows.values()))).values())


@pytest.mark.parametrize("name", _params())
def test_module_stays_within_its_op_budget(name: str, plain_ops: int) -> None:
    overhead = _overhead()
    step = overhead.build_rows(overhead.TINY, only=name)[name]
    ops = overhead.count_ops(step)
    own = sum(ops.values()) - plain_ops
    budget = overhead.OP_BUDGETS[name]
    assert own <= budget, f"{name}: {own} ops of its own per step, budget {budget}: {dict(ops)}"
