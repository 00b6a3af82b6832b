"""Cold review of the merged review round: regressions the round's own changes introduced."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from imbalance_losses import unimodal_logits
from imbalance_losses.core.masking import masked_outputs


def _lazy_heads() -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Lazy modules are a new feature"
        return {"a": nn.LazyLinear(3), "v": nn.LazyLinear(3)}


def test_uninitialised_lazy_per_modality_heads_still_run() -> None:
    # modality_head's up-front width check read a LazyLinear's in_features (0 until its first
    # input) and refused every width: a late-fusion model with lazy heads failed on first use
    feats = {"a": torch.randn(4, 5), "v": torch.randn(4, 6)}
    heads = _lazy_heads()
    z = unimodal_logits(heads, feats)
    assert {m: tuple(x.shape) for m, x in z.items()} == {"a": (4, 3), "v": (4, 3)}
    torch.testing.assert_close(z["v"], heads["v"](feats["v"]))
    assert tuple(masked_outputs(_lazy_heads(), feats).shape) == (4, 4, 3)


def test_average_over_ranks_copies_back_in_one_op_whatever_the_parameter_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MLA's per-step DDP gradient average moved from its own helper (one _foreach_copy_) to
    # core.gradients.average_over_ranks_, which copied back with one copy_ per gradient tensor:
    # a launch per parameter per step. A 2-rank all-reduce stands in (it doubles the sums).
    from torch.utils._python_dispatch import TorchDispatchMode

    from imbalance_losses.core import gradients

    monkeypatch.setattr(gradients, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(gradients, "world_size", lambda group=None: 2)
    monkeypatch.setattr(gradients, "all_reduce_sum", lambda t, group=None: t * 2)

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    def ops(n: int) -> list[str]:
        grads = [torch.randn(3, 2) for _ in range(n)] + [torch.randn(2, dtype=torch.float64)]
        want = [g.clone() for g in grads]
        with Count() as count:
            gradients.average_over_ranks_(grads, None)
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g, w)  # 2 ranks of equal gradients: the mean is each
        return [op for op in count.ops if op not in ("aten.view", "aten.slice", "aten.split")]

    assert len(ops(30)) == len(ops(3)), ops(30)


def test_a_linear_subclass_with_its_own_forward_is_noted_as_approximate() -> None:
    # 7aaef1a evaluates such a head on the zero-padded concatenation (not the exact split), but
    # the compare row's note still treated every nn.Linear as exact and gave no caveat
    from types import SimpleNamespace

    from imbalance_losses.compare.plugins import REMEDIES

    class Cosine(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = torch.nn.functional.normalize(self.weight, dim=1)
            return torch.nn.functional.normalize(x, dim=-1) @ w.T

    arl = REMEDIES["arl"]
    note = arl.note(SimpleNamespace(head=Cosine(6, 3)))  # type: ignore[arg-type]
    assert note is not None and "approximate" in note
    assert arl.note(SimpleNamespace(head=nn.Linear(6, 3))) is None  # type: ignore[arg-type]
