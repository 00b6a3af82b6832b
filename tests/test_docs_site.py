"""The documentation site's contract: every public name is in the API reference with an example.

``mkdocs build --strict`` (in ``.ci/run``) renders the reference from ``docs/api/*.md``; these
tests keep its inputs complete without needing mkdocs: a name added to ``__all__`` without a
reference entry, a reference entry for a name that no longer exists, a public class or function
without a runnable example, or a link out of ``docs/`` (which ``--strict`` refuses) fails here.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import re
from pathlib import Path

import pytest

import imbalance_losses

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", flags=re.M)
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")

# Each method's main entry point shows its formula as math ($$...$$) in the API reference.
MAIN = [
    "ARLLoss",
    "ModalityGradientModulator",
    "SustainedBoostingLoss",
    "PMRLoss",
    "GradientBlending",
    "MMPareto",
    "AdaptiveGradientModulator",
    "ModalityPredictionModulator",
    "UnimodalTeacherLoss",
    "ModalityRelearning",
    "MMCosineHead",
    "AlternatingUnimodalAdaptation",
    "ReconBoost",
    "SampleModalityValuation",
    "MappingHead",
    "unimodal_logits",
]


def _directives() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for target in _DIRECTIVE.findall(page.read_text()):
            found[target] = page
    return found


def _resolve(path: str) -> object:
    """The object a ``::: a.b.c`` directive names (module, then attributes)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def test_every_public_name_is_in_the_api_reference() -> None:
    documented = _directives()
    missing = [
        name for name in imbalance_losses.__all__ if f"imbalance_losses.{name}" not in documented
    ]
    assert not missing, f"add `::: imbalance_losses.<name>` to a docs/api page for {missing}"


def test_every_reference_entry_names_an_existing_object() -> None:
    for target, page in _directives().items():
        assert target.startswith("imbalance_losses"), (page.name, target)
        try:
            _resolve(target)
        except (ImportError, AttributeError) as err:
            pytest.fail(f"{page.relative_to(ROOT)}: `::: {target}` names nothing ({err})")


# Every public name but the ``Head`` type alias (test_head_alias_example runs its example).
CALLABLES = [
    n
    for n in imbalance_losses.__all__
    if inspect.isclass(getattr(imbalance_losses, n))
    or inspect.isfunction(getattr(imbalance_losses, n))
]


def test_only_the_head_alias_is_neither_class_nor_function() -> None:
    assert set(imbalance_losses.__all__) - set(CALLABLES) <= {"Head"}


@pytest.mark.parametrize("name", CALLABLES)
def test_every_public_class_and_function_has_an_example(name: str) -> None:
    obj = getattr(imbalance_losses, name)
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and "Example:" in doc and ">>> " in doc, f"{name} has no `Example:` with >>>"
    # the doctest run collects it: the example belongs to the object's own module
    tests = doctest.DocTestFinder().find(obj, name, globs={})
    assert any(t.examples for t in tests if t.docstring == doc), name


def _head_docstring() -> str:
    tree = ast.parse((ROOT / "imbalance_losses" / "core" / "unimodal.py").read_text())
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "Head" for t in node.targets
        ):
            doc = tree.body[i + 1]
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            return str(doc.value.value)
    raise AssertionError("no `Head = ...` in imbalance_losses/core/unimodal.py")


def test_head_alias_example() -> None:
    """``Head`` is a type alias: doctest cannot see its docstring, so it is run here."""
    doc = _head_docstring()
    test = doctest.DocTestParser().get_doctest(doc, {}, "Head", "unimodal.py", 0)
    assert test.examples, "the Head alias has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0 and runner.tries == len(test.examples)


def test_doctests_are_part_of_the_default_run() -> None:
    import tomllib  # Python >= 3.11, as CI runs

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in config["addopts"].split()
    assert "imbalance_losses" in config["testpaths"]


@pytest.mark.parametrize("name", MAIN)
def test_main_formula_renders_as_math(name: str) -> None:
    doc = getattr(imbalance_losses, name).__doc__
    assert doc.count("$$") >= 2, f"{name}'s docstring has no $$...$$ formula"


def test_docs_links_stay_inside_docs() -> None:
    """mkdocs --strict refuses relative links out of docs/ (README, examples, CHANGELOG)."""
    bad = []
    for page in sorted(DOCS.rglob("*.md")):
        for href in _LINK.findall(page.read_text()):
            if "://" in href or href.startswith("mailto:"):
                continue
            target = (page.parent / href).resolve()
            if DOCS.resolve() not in target.parents or not target.exists():
                bad.append(f"{page.relative_to(ROOT)}: {href}")
    assert not bad, bad


# `imbalance_losses.core.stats.entropy_and_size_sums`, `core.running.RunningSums`, ...
_DOTTED = re.compile(
    r"`((?:imbalance_losses\.)?(?:core|methods|diagnosis|integrations|compare)\.[\w.]+)"
)


def test_dotted_names_in_the_guides_exist() -> None:
    """A guide's `core.x.y` / `imbalance_losses.x.y` names an existing module or object.

    Pages point at the code that computes a formula; a rename in the code (ARL's statistics
    moved from ``methods.arl._batch_sums`` to ``core.stats.entropy_and_size_sums``) left the
    page naming nothing.
    """
    bad = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for ref in sorted(set(_DOTTED.findall(page.read_text()))):
            path = ref if ref.startswith("imbalance_losses.") else f"imbalance_losses.{ref}"
            try:
                _resolve(path.rstrip("."))
            except (ImportError, AttributeError):
                bad.append(f"{page.relative_to(ROOT)}: `{ref}`")
    assert not bad, bad
