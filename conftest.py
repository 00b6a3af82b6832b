"""Doctests of modules that need an optional extra run only where that extra is installed.

The default test run (``testpaths`` includes the package, ``--doctest-modules``) collects every
docstring example. An example that draws a figure needs matplotlib (the ``plots`` extra), which
the README's test command does not install: such a module's doctests are skipped, with the
reason, when its package is missing, and run as usual when it is there.
"""

from __future__ import annotations

import importlib.util

import pytest

# module path (from the repository root) -> the optional package its examples need
NEEDS = {"imbalance_losses/diagnosis/plotting.py": "matplotlib"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if type(item).__name__ != "DoctestItem":
            continue
        package = NEEDS.get(item.nodeid.split("::")[0])
        if package is not None and importlib.util.find_spec(package) is None:
            item.add_marker(pytest.mark.skip(reason=f"the example needs {package}"))
