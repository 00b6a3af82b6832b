"""The README's commands and CI stay in step; the public API is importable and typed; the
release metadata (version, supported versions, dependencies, citation) is consistent."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import imbalance_losses

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


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


def test_one_version_everywhere() -> None:
    version = PROJECT["version"]
    assert str(Version(version)) == version  # PEP 440, normalised
    assert imbalance_losses.__version__ == version
    # the installed metadata (a stale editable install would differ: reinstall)
    assert importlib.metadata.version("imbalance-losses") == version
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(version)}$", cff, flags=re.M), "CITATION.cff version"
    assert re.search(r"^cff-version: 1\.2\.0$", cff, flags=re.M)


def test_the_release_is_dated_alike_in_changelog_and_citation() -> None:
    version = re.escape(PROJECT["version"])
    changelog = (ROOT / "CHANGELOG.md").read_text()
    section = re.search(rf"^## \[{version}\] - (\d{{4}}-\d{{2}}-\d{{2}})$", changelog, flags=re.M)
    assert section, f"CHANGELOG.md has no dated section '## [{PROJECT['version']}] - YYYY-MM-DD'"
    cff = (ROOT / "CITATION.cff").read_text()
    released = re.search(r'^date-released: "(\d{4}-\d{2}-\d{2})"$', cff, flags=re.M)
    assert released and released.group(1) == section.group(1)


def _python_classifiers() -> list[str]:
    prefix = "Programming Language :: Python :: "
    return [c.removeprefix(prefix) for c in PROJECT["classifiers"] if c.startswith(prefix + "3.")]


def test_python_versions_declared_alike() -> None:
    """The classifiers name the Python versions CI runs (this interpreter's), all of them allowed
    by requires-python; its floor is the version ruff and mypy check the code against."""
    requires = SpecifierSet(PROJECT["requires-python"])
    named = _python_classifiers()
    assert named and all(Version(v) in requires for v in named), (named, requires)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in named
    floor = re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"])
    assert floor, PROJECT["requires-python"]
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{floor.group(1)}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"3.{floor.group(1)}"


def test_torch_floor_is_the_tested_torch() -> None:
    """The only torch CI installs (the pin in the README's test command) is the declared floor."""
    pins = set(re.findall(r"torch==(\d+\.\d+)\.\d+", " ".join(_readme_commands())))
    assert len(pins) == 1, pins
    (torch,) = [Requirement(d) for d in PROJECT["dependencies"] if d.startswith("torch")]
    assert str(torch.specifier) == f">={pins.pop()}"


def _third_party(names: set[str]) -> set[str]:
    return names - set(sys.stdlib_module_names) - {"__future__", "imbalance_losses"}


def _imports(path: Path, *, module_level: bool = False) -> set[str]:
    """Top-level names imported by ``path``: anywhere, or only as the module is imported
    (module body and its ``try`` blocks; not functions, not ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = list(ast.walk(tree))
    if module_level:
        nodes, todo = [], list(tree.body)
        while todo:
            node = todo.pop()
            nodes.append(node)
            if isinstance(node, ast.Try):
                todo += [*node.body, *node.orelse, *node.finalbody]
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                todo += [*node.body, *node.orelse]
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return _third_party(names)


@functools.cache
def _owners() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(names: set[str]) -> dict[str, set[str]]:
    owners = _owners()
    return {n: {canonicalize_name(d) for d in owners.get(n, [n])} for n in names}


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    """What ``import imbalance_losses`` loads imports only the dependencies (no extra's package
    is loaded); any other module of the package (integrations, lazy imports) only dependencies
    or an extra's packages."""
    deps = {canonicalize_name(Requirement(d).name) for d in PROJECT["dependencies"]}
    extras = {
        canonicalize_name(Requirement(d).name)
        for ds in PROJECT["optional-dependencies"].values()
        for d in ds
    }
    code = "import sys, torch; a = set(sys.modules); import imbalance_losses; print(*sys.modules)"
    code += "; print('|', *set(sys.modules) - a)"  # what the package adds to torch's own imports
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded, added = (set(part.split()) for part in run.stdout.split("|"))
    for name, dists in _distributions(_third_party({m.split(".")[0] for m in added})).items():
        assert not dists & (extras - deps), f"import imbalance_losses loaded {name} ({dists})"
    for path in sorted((ROOT / "imbalance_losses").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        where = f"{path.relative_to(ROOT)} imports"
        for name, dists in _distributions(_imports(path)).items():
            assert dists & (deps | extras), f"{where} {name}, in no dependency nor extra"
        if module in loaded:  # loaded by ``import imbalance_losses``
            for name, dists in _distributions(_imports(path, module_level=True)).items():
                assert dists & deps, f"{where} {name} on import: not a dependency"
