"""docs/core.md's "Adding a method": the walk-through method, run from the page as written.

The method (``ConfidenceEqualiser``, ``k_m = (mean_k s_k / s_m) ** gamma``) contains no
collective, no repeat logic and no state code; these tests show that the base
(:class:`imbalance_losses.core.remedy.Remedy`) gives it the formula applied exactly, two gloo
ranks equal to one process, gradient accumulation equal to one batch, warm-up, eval mode, repeats,
clear errors that fail every rank together, and a bit-exact resume.
"""

from __future__ import annotations

import copy
import io
import re
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.ddp import run_distributed
from tests.pages import page_code


@cache
def _page() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__docs_core__"}
    exec(compile(page_code("core.md"), "docs/core.md", "exec", dont_inherit=True), namespace)
    return namespace


def _equaliser(*args: Any, **kwargs: Any) -> Any:
    return _page()["ConfidenceEqualiser"](*args, **kwargs)


def _by_hand(head: nn.Linear, xa: Tensor, xb: Tensor, y: Tensor, gamma: float) -> Tensor:
    """``k_m`` from the formula: the Linear split ``z_m = x_m W_m^T + b / 2``, softmax, mean."""
    w, b = head.weight.detach(), head.bias.detach()
    za = xa @ w[:, : xa.shape[1]].T + b / 2
    zb = xb @ w[:, xa.shape[1] :].T + b / 2
    s = torch.stack([torch.softmax(z, -1)[torch.arange(len(y)), y].mean() for z in (za, zb)])
    return (s.mean() / s) ** gamma


def test_one_step_applies_the_formula_to_the_feature_gradients() -> None:
    torch.manual_seed(0)
    head = nn.Linear(7, 3)
    xa, xb, y = torch.randn(8, 3), torch.randn(8, 4), torch.randint(0, 3, (8,))
    eq = _equaliser(head, gamma=2.0)
    a, b = xa.clone().requires_grad_(), xb.clone().requires_grad_()
    out = eq({"a": a, "b": b}, y)
    F.cross_entropy(head(torch.cat([out["a"], out["b"]], 1)), y).backward()
    k = _by_hand(head, xa, xb, y, 2.0)
    torch.testing.assert_close(eq.last.coefficients, k)
    a0, b0 = xa.clone().requires_grad_(), xb.clone().requires_grad_()
    F.cross_entropy(head(torch.cat([a0, b0], 1)), y).backward()
    torch.testing.assert_close(a.grad, k[0] * a0.grad)
    torch.testing.assert_close(b.grad, k[1] * b0.grad)
    assert eq.steps == 1 and list(eq.parameters()) == []


def test_warmup_eval_no_grad_and_repeat() -> None:
    torch.manual_seed(0)
    head = nn.Linear(7, 3)
    eq = _equaliser(head, warmup_steps=1)
    f = {"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 4, requires_grad=True)}
    y = torch.tensor([0, 1, 2, 0])
    assert eq(f, y)["a"] is f["a"] and eq.last.active is False  # warm-up: no scaling
    eq(f, y)  # the same tensors again before their backward: the same step
    assert eq.steps == 1
    f2 = {n: x.detach().clone().requires_grad_() for n, x in f.items()}
    assert eq(f2, y)["a"] is not f2["a"] and eq.last.active and eq.steps == 2
    with pytest.raises(ValueError, match="already passed"):
        eq({"a": f2["a"], "b": f["b"].detach().clone().requires_grad_()}, y)
    eq.eval()
    assert eq(f, y)["a"] is f["a"] and eq.steps == 2
    eq.train()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="gradients disabled"):
        eq({n: x.detach() for n, x in f.items()}, y)
    assert eq.steps == 2


def test_bad_input_names_the_modality() -> None:
    eq = _equaliser(nn.Linear(7, 3))
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="'b'"):
        eq({"a": torch.randn(2, 3), "b": torch.full((2, 4), float("nan"))}, y)
    with pytest.raises(ValueError, match="batch"):
        eq({"a": torch.randn(2, 3), "b": torch.randn(3, 4)}, y)
    eq({"a": torch.randn(2, 3), "b": torch.randn(2, 4)}, y)
    with pytest.raises(ValueError, match="earlier steps"):
        eq({"b": torch.randn(2, 4), "a": torch.randn(2, 3)}, y)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(5, 3), "b": nn.Linear(6, 4)})
        self.head = nn.Linear(7, 3)

    def forward(self, xa: Tensor, xb: Tensor) -> dict[str, Tensor]:
        return {"a": torch.tanh(self.encoders["a"](xa)), "b": torch.tanh(self.encoders["b"](xb))}


def _train(
    model: _Model, eq: Any, opt: torch.optim.Optimizer, data: Any, steps: range, micro: int
) -> list[Tensor]:
    """Encoders mode: ``micro`` micro-batches per optimiser step, ``eq.step()`` before it."""
    xa, xb, y = data
    ks = []
    for step in steps:
        opt.zero_grad()
        for i in range(micro):
            rows = slice((step * micro + i) * 4, (step * micro + i + 1) * 4)
            f = eq(model(xa[rows], xb[rows]), y[rows])
            loss = F.cross_entropy(model.head(torch.cat(list(f.values()), 1)), y[rows])
            (loss / micro).backward()
        ks.append(eq.step().coefficients)
        opt.step()
    return ks


def _data(n: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(n, 5, generator=g),
        torch.randn(n, 6, generator=g),
        torch.randint(0, 3, (n,), generator=g),
    )


def test_accumulation_equals_one_batch() -> None:
    data = _data()
    torch.manual_seed(0)
    model = _Model()
    one = copy.deepcopy(model)
    eq = _equaliser(model.head, encoders=model.encoders)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    micro_k = _train(model, eq, opt, data, range(0, 1), micro=2)  # 2 x 4 rows
    xa, xb, y = data
    eq1 = _equaliser(one.head, encoders=one.encoders)
    f = eq1(one(xa[:8], xb[:8]), y[:8])
    F.cross_entropy(one.head(torch.cat(list(f.values()), 1)), y[:8]).backward()
    torch.testing.assert_close(micro_k[0], eq1.step().coefficients)
    torch.testing.assert_close(micro_k[0], _by_hand(one.head, f["a"], f["b"], y[:8], 1.0))
    for p, q in zip(model.parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_resume_mid_accumulation_is_bit_exact() -> None:
    data = _data()
    torch.manual_seed(0)
    model = _Model()
    eq = _equaliser(model.head, encoders=model.encoders)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, eq, opt, data, range(0, 2), micro=2)
    xa, xb, y = data
    eq(model(xa[16:20], xb[16:20]), y[16:20])  # one micro-batch of step 2 pending
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "eq": eq.state_dict(), "opt": opt.state_dict()}, buffer
    )
    rest = {"a": xa[20:24], "b": xb[20:24]}

    def finish(m: _Model, e: Any, o: torch.optim.Optimizer) -> list[Tensor]:
        e(m(rest["a"], rest["b"]), y[20:24])
        k = e.step().coefficients
        o.step()
        return [k, *_train(m, e, o, data, range(3, 5), micro=2), *m.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = _Model()
    model2.load_state_dict(saved["model"])
    eq2 = _equaliser(model2.head, encoders=model2.encoders)
    eq2.load_state_dict(saved["eq"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    # the resumed run needs the same gradient of the pending micro-batch: recompute it
    opt.zero_grad()
    opt2.zero_grad()
    for m in (model, model2):
        f = m(xa[16:20], xb[16:20])
        (F.cross_entropy(m.head(torch.cat(list(f.values()), 1)), y[16:20]) / 2).backward()
    f = model(rest["a"], rest["b"])
    (F.cross_entropy(model.head(torch.cat(list(f.values()), 1)), y[20:24]) / 2).backward()
    f2 = model2(rest["a"], rest["b"])
    (F.cross_entropy(model2.head(torch.cat(list(f2.values()), 1)), y[20:24]) / 2).backward()
    assert eq2.steps == eq.steps == 2
    for x1, x2 in zip(finish(model, eq, opt), finish(model2, eq2, opt2), strict=True):
        assert torch.equal(x1, x2)


def _ddp_body(rank: int, world: int, data: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _Model()
    eq = _equaliser(model.head, encoders=model.encoders)
    xa, xb, y = data
    out: dict[str, Any] = {}
    for step in range(2):  # 2 micro-batches of 4 rows per rank: 16 rows per step in all
        model.zero_grad()
        for i in range(2):
            rows = slice(step * 16 + rank * 8 + i * 4, step * 16 + rank * 8 + i * 4 + 4)
            f = eq(model(xa[rows], xb[rows]), y[rows])
            F.cross_entropy(
                model.head(torch.cat(list(f.values()), 1)), y[rows], reduction="sum"
            ).backward()
        out[f"k{step}"] = eq.step().coefficients
    hook = _equaliser(model.head)
    hook(
        model(xa[rank * 8 : rank * 8 + 8], xb[rank * 8 : rank * 8 + 8]), y[rank * 8 : rank * 8 + 8]
    )
    out["hook_k"] = hook.last.coefficients
    f = model(xa[:4], xb[:4])
    try:
        hook({"a": f["a"], "b": f["b"] * float("nan") if rank == 1 else f["b"]}, y[:4])
    except (RuntimeError, ValueError) as err:
        out["error"] = str(err)
    return out


def test_two_gloo_ranks_equal_one_process_and_fail_together() -> None:
    data = _data()
    results = run_distributed(_ddp_body, data)
    xa, xb, y = data
    torch.manual_seed(0)
    model = _Model()
    eq = _equaliser(model.head, encoders=model.encoders)
    for step in range(2):
        rows = slice(step * 16, step * 16 + 16)
        eq(model(xa[rows], xb[rows]), y[rows])
        k = eq.step().coefficients
        for r in results:
            torch.testing.assert_close(r[f"k{step}"], k)
    hook = _equaliser(model.head)
    hook(model(xa[:16], xb[:16]), y[:16])
    for r in results:
        torch.testing.assert_close(r["hook_k"], hook.last.coefficients)
    assert "'b'" in results[1]["error"] and "non-finite" in results[1]["error"]
    assert "another rank" in results[0]["error"]


def test_methods_that_act_in_their_call_say_so_from_step_and_attach() -> None:
    from imbalance_losses import ModalityPredictionModulator, PMRLoss, SustainedBoostingLoss

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    for method, words in (
        (PMRLoss(3, {"a": 2, "b": 2}), "PMRLoss has no step()"),
        (ModalityPredictionModulator(["a", "b"]), "ModalityPredictionModulator has no step()"),
        (
            SustainedBoostingLoss(num_classes=3, in_features={"a": 2, "b": 2}, check_every=5),
            "attach_optimizer",
        ),
    ):
        with pytest.raises(RuntimeError, match=re.escape(words)):
            method.step()
        with pytest.raises(RuntimeError, match=re.escape(words)):
            method.attach(opt)
