"""ARL's module-level formula helpers and the core pieces its port added, each alone, against
references written here from the formulas (plain Python / float64), never the class's output."""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from imbalance_losses.core.rebuilt import built_on, warn_rebuilt
from imbalance_losses.core.repeats import OpenTensors
from imbalance_losses.core.stats import ema_update as _ema_update
from imbalance_losses.core.stats import entropy_and_size_sums as _batch_sums
from imbalance_losses.core.validation import check_same_layout, criterion_reduction
from imbalance_losses.methods.arl import _arl_loss, _floor_for


def _check_order(earlier: tuple[str, ...] | None, names: tuple[str, ...], training: bool) -> None:
    check_same_layout(earlier, names, None, None, training=training)


def _check_widths(
    names: tuple[str, ...], before: tuple[int, ...] | None, now: tuple[int, ...] | None
) -> None:
    check_same_layout(names, names, before, now, training=True)


def test_batch_sums_are_entropy_and_l1_sums_over_counted_samples() -> None:
    z = {"a": torch.tensor([[1.0, 0.0], [0.0, 3.0]]), "v": torch.tensor([[-2.0, 2.0], [0.5, 0.5]])}

    def entropy(row: list[float]) -> float:
        e = [math.exp(v) for v in row]
        p = [v / sum(e) for v in e]
        return -sum(q * math.log(q) for q in p)

    rows = {k: t.tolist() for k, t in z.items()}
    want = [sum(entropy(r) for r in rows[k]) for k in z]
    want += [sum(abs(v) for r in rows[k] for v in r) for k in z]
    torch.testing.assert_close(_batch_sums(z, None), torch.tensor(want))
    mask = torch.tensor([False, True])  # the first sample's target is ignored
    want = [entropy(rows[k][1]) for k in z] + [sum(abs(v) for v in rows[k][1]) for k in z]
    torch.testing.assert_close(_batch_sums(z, mask), torch.tensor(want))


def test_ema_update_first_blend_and_ignored_step() -> None:
    yes, no = torch.tensor(True), torch.tensor(False)
    first = torch.tensor([1.0, 2.0])
    ema, seen = _ema_update(None, None, first, yes, 0.25)
    assert torch.equal(ema, first) and bool(seen)
    ema, seen = _ema_update(ema, seen, torch.tensor([5.0, 6.0]), yes, 0.25)
    torch.testing.assert_close(ema, torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 2 + 0.75 * 6]))
    kept, seen = _ema_update(ema, seen, torch.tensor([100.0, 100.0]), no, 0.25)
    assert torch.equal(kept, ema) and bool(seen)
    # an EMA that holds no sample yet (every earlier sample ignored) takes the statistics
    taken, seen = _ema_update(torch.zeros(2), no, torch.tensor([3.0, 4.0]), yes, 0.25)
    assert torch.equal(taken, torch.tensor([3.0, 4.0])) and bool(seen)


def test_arl_loss_adds_gamma_times_the_unimodal_terms() -> None:
    def criterion(z: Tensor, y: Tensor) -> Tensor:
        return (z.sum() - y.sum()) ** 2

    z, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
    zs = {"a": torch.tensor([[0.5, 0.0]]), "v": torch.tensor([[3.0, 0.0]])}
    want = (3 - 1) ** 2 + 0.5 * ((0.5 - 1) ** 2 + (3 - 1) ** 2)
    assert _arl_loss(z, y, zs, 0.5, criterion).item() == pytest.approx(want)


def test_floor_order_and_width_checks() -> None:
    assert _floor_for(None, 2) == pytest.approx(0.3) and _floor_for(0.1, 3) == 0.1
    with pytest.raises(ValueError, match=r"floor must be in \(0, 1/M\]"):
        _floor_for(0.5, 3)
    _check_order(None, ("a", "v"), True)
    _check_order(("a", "v"), ("a", "v", "t"), False)  # evaluation on other modalities: fine
    for training in (True, False):
        with pytest.raises(ValueError, match="concatenation order"):
            _check_order(("a", "v"), ("v", "a"), training)
    with pytest.raises(ValueError, match="differ from those of earlier steps"):
        _check_order(("a", "v"), ("a", "t"), True)
    _check_widths(("a", "v"), (3, 2), (3, 2))
    _check_widths(("a", "v"), None, (2, 3))  # nothing recorded yet
    with pytest.raises(ValueError, match=r"widths \{'a': 2, 'v': 3\} differ.*\{'a': 3, 'v': 2\}"):
        _check_widths(("a", "v"), (3, 2), (2, 3))


def test_criterion_reduction() -> None:
    assert criterion_reduction(None, None, who="X") == "mean"
    assert criterion_reduction(None, "none", who="X") == "none"
    assert criterion_reduction(nn.CrossEntropyLoss(reduction="sum"), None, who="X") == "sum"
    assert criterion_reduction(nn.CrossEntropyLoss(), "mean", who="X") == "mean"
    assert criterion_reduction(lambda z, y: z.sum(), None, who="X") is None
    with pytest.raises(ValueError, match="reduction must be"):
        criterion_reduction(None, "avg", who="X")
    with pytest.raises(ValueError, match=r"no reduction attribute \(function\); X adds"):
        criterion_reduction(lambda z, y: z.sum(), "sum", who="X")
    with pytest.raises(ValueError, match="conflicts with the criterion's reduction='mean'"):
        criterion_reduction(nn.CrossEntropyLoss(), "sum", who="X")


class _Stepper:
    def __init__(self, steps: int) -> None:
        self.steps = steps


def test_built_on_reports_the_earlier_live_module_and_keeps_nothing_alive() -> None:
    key = nn.Linear(2, 2)
    first = _Stepper(3)
    assert built_on(key, first) == 0
    assert built_on(key, _Stepper(0)) == 3  # the second one built on the same key
    assert built_on(None, first) == 0 and built_on({"a": 1}, first) == 0  # not trackable
    other = nn.Linear(2, 2)
    assert built_on(other, _Stepper(1)) == 0
    gc.collect()  # the _Stepper(1) registered on `other` is gone: nothing to report
    assert built_on(other, first) == 0


def test_warn_rebuilt_says_what_restarts_or_nothing() -> None:
    with pytest.warns(RuntimeWarning, match=r"X: another X on the same head had already taken 4"):
        warn_rebuilt("X", "head", 4, ["fresh EMA statistics"], stacklevel=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_rebuilt("X", "head", 4, [], stacklevel=1)


def test_open_tensors_then_acts_on_the_gradient_once_per_open_step() -> None:
    x = torch.ones(3, requires_grad=True)
    opened = OpenTensors()
    opened.add_until_backward(x, lambda g: g * 2)
    assert opened.pending(x)
    (x * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 6.0)) and not opened.pending(x)
    x.grad = None
    opened.add_until_backward(x, lambda g: g * 5)  # reopened: the earlier hook is removed
    (x * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 15.0))
    x.grad = None
    opened.reset()  # closed: no hook left
    (x * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 3.0))
