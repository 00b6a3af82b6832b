"""docs/official_code.md: every default its flag tables state is the constructor's default.

The page maps each official script's flags to our arguments and gives our default beside each
(`` `gamma` (1.0) ``, `` `method="ogm_ge"` (default) ``, or a note `` default `"paper"` ``).
A default changed in the code and not on the page (PMR's ``coefficient``, once ``"paper"``, now
``"code"``) fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import imbalance_losses

PAGE = Path(__file__).resolve().parents[1] / "docs" / "official_code.md"

_SECTION = re.compile(r"^## (.*)$", flags=re.M)
# `name` (1.0) / `name` (required); an argument name is lower case (not `ClassName` (...))
_PAREN = re.compile(r"`([a-z_]\w*)` \(([^)`]+)\)")
# `name="value"` (default)
_ASSIGN_DEFAULT = re.compile(r"`(\w+)=([^`]+)` \(default\)")
# in the note column: default `name=value` / default `"value"` (for the row's `name=...`)
_NOTE_ASSIGN = re.compile(r"default `(\w+)=([^`]+)`")
_NOTE_VALUE = re.compile(r"default `(\"[^`\"]+\")`")
_ASSIGN = re.compile(r"`(\w+)=")
_MISSING = object()


def _sections() -> list[tuple[list[Any], list[list[str]]]]:
    """Each section's public objects (named after the heading's arrow) and its table rows."""
    text = PAGE.read_text()
    heads = list(_SECTION.finditer(text))
    out = []
    for i, head in enumerate(heads):
        if "→" not in head.group(1):
            continue
        names = re.findall(r"`(\w+)`", head.group(1).split("→", 1)[1])
        objs = [getattr(imbalance_losses, n) for n in names]
        body = text[head.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        rows = [
            [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")
        ]
        out.append((objs, rows[1:]))  # rows[0] is the table's header
    return out


def _default(objs: list[Any], name: str) -> Any:
    for obj in objs:
        params = inspect.signature(obj).parameters
        if name in params:
            p = params[name]
            return _MISSING if p.default is inspect.Parameter.empty else p.default
    raise AssertionError(f"no argument {name!r} in {[o.__name__ for o in objs]}")


def _claims() -> list[tuple[list[Any], str, str, str]]:
    """``(objects, argument, documented default, row)`` for every default the tables state."""
    claims = []
    for objs, rows in _sections():
        for row in rows:
            if len(row) < 3:
                continue
            here, note = row[1], row[2]
            line = " | ".join(row)
            for name, value in _PAREN.findall(here):
                claims.append((objs, name, value, line))
            for name, value in _ASSIGN_DEFAULT.findall(here):
                claims.append((objs, name, value, line))
            for name, value in _NOTE_ASSIGN.findall(note):
                claims.append((objs, name, value, line))
            assigned = _ASSIGN.findall(here)
            for value in _NOTE_VALUE.findall(note):
                assert len(set(assigned)) == 1, line
                claims.append((objs, assigned[0], value, line))
    return claims


def test_the_page_states_defaults() -> None:
    names = {name for _, name, _, _ in _claims()}
    assert {"gamma", "coefficient", "method", "alpha", "mu", "cap", "w1"} <= names, names


def test_documented_defaults_are_the_code_defaults() -> None:
    wrong = []
    for objs, name, value, line in _claims():
        actual = _default(objs, name)
        if value == "required":
            if actual is not _MISSING:
                wrong.append(f"{name}: documented required, default {actual!r}: {line}")
            continue
        try:
            documented = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue  # prose ("uniform", "`0.6 / M`, 0.3 for two"): not a literal claim
        # 1.0 and 1 are the same default; "1" and 1 are not
        same_kind = isinstance(actual, type(documented)) or (
            isinstance(actual, float) and isinstance(documented, int)
        )
        if actual is _MISSING or not same_kind or actual != documented:
            wrong.append(f"{name}: documented {documented!r}, code {actual!r}: {line}")
    assert not wrong, "\n".join(wrong)
