"""Which remedy for my model? :func:`compare_remedies` runs every method that applies.

* :mod:`.plugins`: one adapter per method (:class:`RemedyPlugin`, :class:`Hooks`) and the registry
  :data:`REMEDIES`; :mod:`.plugins_more`: the adapters of the methods that own more of the loop
  (MLA, ReconBoost, sample-level valuation, re-learning, UMT, MMCosine);
* :mod:`.training`: one seeded run, the epoch chosen on validation;
* :mod:`.protocol`: :func:`compare_remedies`, the protocol over methods and seeds;
* :mod:`.result`: :class:`ComparisonResult` (rows, best, JSON, Markdown, plot).
"""

from . import plugins_more as _plugins_more  # noqa: F401  (registers the other six methods)
from .plugins import REMEDIES, Context, Hooks, RemedyPlugin, fused_logits, register
from .protocol import compare_remedies
from .result import Best, ComparisonResult, Row, RunRecord
from .training import SelectedRun

__all__ = [
    "REMEDIES",
    "Best",
    "ComparisonResult",
    "Context",
    "Hooks",
    "RemedyPlugin",
    "Row",
    "RunRecord",
    "SelectedRun",
    "compare_remedies",
    "fused_logits",
    "register",
]
