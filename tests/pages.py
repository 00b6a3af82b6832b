"""Run a documentation page's Python code blocks as written, so the docs cannot rot."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def page_code(page: str) -> str:
    """The ``python`` fenced blocks of ``docs/<page>`` joined in order (one program).

    A block whose first line is ``# not run`` is left out (fragments, diffs).
    """
    text = (ROOT / "docs" / page).read_text()
    blocks = [b for b in _BLOCK.findall(text) if not b.startswith("# not run")]
    if not blocks:
        raise AssertionError(f"docs/{page} has no python block to run")
    return "\n".join(blocks)


def run_page(page: str, workdir: Path) -> dict[str, Any]:
    """Execute the page's code in a fresh namespace with ``workdir`` as the current directory.

    Returns the namespace, so a test can check what the page's code produced.
    """
    code = compile(page_code(page), str(ROOT / "docs" / page), "exec")
    namespace: dict[str, Any] = {"__name__": "__docs_page__"}
    old = Path.cwd()
    os.chdir(workdir)
    try:
        exec(code, namespace)
    finally:
        os.chdir(old)
    return namespace
