"""Griffe extension for the docs site: the package's reST-flavoured docstrings as Markdown.

The docstrings are written for ``help()`` first: Sphinx roles (``:func:`~imbalance_losses.x```)
and ``::`` literal blocks. mkdocstrings renders Markdown, so before a docstring is parsed this
extension rewrites each role as an inline code span (``~`` keeps the last component, as in
Sphinx), a line ending in ``::`` as one ending in ``:`` and a line of ``::`` alone as nothing
(the indented block after it is already a Markdown code block), and an ``Example:`` section
header as ``Examples:`` (the Google-style section whose ``>>>`` lines griffe renders as code;
under ``Example:`` they would be an admonition of nested block quotes). Nothing else changes;
the source is untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(?m)(\S)::$")
_EXAMPLE = re.compile(r"(?m)^(\s*)Example:\s*$")
_LONE_LITERAL = re.compile(r"(?m)^[ \t]*::[ \t]*$")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    name = target.rsplit(".", 1)[-1] if tilde else target
    return f"`{name}`"


def markdown(text: str) -> str:
    """The docstring text with roles as code spans, ``::`` line ends as ``:``, ``Examples:``."""
    text = _LONE_LITERAL.sub("", _EXAMPLE.sub(r"\1Examples:", text))
    return _LITERAL.sub(r"\1:", _ROLE.sub(_role, text))


class RstRoles(griffe.Extension):
    """Rewrite every docstring once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
