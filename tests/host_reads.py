"""Counting host reads of tensor values made by the package (the "no host sync" checks)."""

from __future__ import annotations

import traceback

from torch.overrides import TorchFunctionMode


class HostReads(TorchFunctionMode):
    """Records reads of tensor values on the host (``bool(t)``, ``t.item()``, ...) made from the
    package outside the input checks of ``core/validation.py`` (which are asynchronous on
    accelerators). Use as ``with HostReads() as spy: ...; assert spy.reads == []``."""

    NAMES = frozenset({"__bool__", "item", "__float__", "__int__", "__index__", "tolist", "cpu"})

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in self.NAMES:
            files = [f.filename for f in traceback.extract_stack()]
            if not any("core/validation.py" in f for f in files) and any(
                "imbalance_losses" in f for f in files
            ):
                self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))
