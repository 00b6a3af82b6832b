"""UMT (``UnimodalTeacherLoss``) and UME (``unimodal_ensemble``), against the formulas by hand.

The references are written from ``L = CE(z, y) + sum_m s_m mean((f_m - f_m^T)^2)`` with the
teachers' features computed by hand from their weights and running statistics (eval mode), and
from ``mean_m z_m`` / ``mean_m softmax(z_m)``; never from the class's own output.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import (
    UMTRecord,
    UnimodalTeacherLoss,
    feature_distillation,
    unimodal_ensemble,
)
from tests.ddp import run_distributed

WIDTHS = {"a": 3, "b": 5, "c": 2}  # input widths; every encoder is 4 wide


def _teacher(width: int) -> nn.Sequential:
    """Linear, BatchNorm (non-trivial running statistics) and dropout: eval mode matters."""
    t = nn.Sequential(nn.Linear(width, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    with torch.no_grad():
        t[1].running_mean.uniform_(-1, 1)
        t[1].running_var.uniform_(0.5, 2)
        t[1].weight.uniform_(0.5, 1.5)
        t[1].bias.uniform_(-0.5, 0.5)
    return t.train()  # left in train mode on purpose: the loss must run it in eval


def _teacher_by_hand(t: nn.Sequential, x: Tensor) -> Tensor:
    """The teacher's eval-mode output from its weights: affine BatchNorm on running statistics."""
    lin, bn = t[0], t[1]
    h = x @ lin.weight.detach().T + lin.bias.detach()
    return (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight.detach() + (
        bn.bias.detach()
    )


class _Model(nn.Module):
    def __init__(self, widths: dict[str, int] = WIDTHS) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Linear(w, 4) for m, w in widths.items()})
        self.head = nn.Linear(4 * len(widths), 3)

    def forward(self, x: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        f = {m: torch.tanh(e(x[m])) for m, e in self.encoders.items()}
        return self.head(torch.cat(list(f.values()), 1)), f


def _data(n: int = 32, seed: int = 3) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, w, generator=g) for m, w in WIDTHS.items()}
    return x, torch.randint(0, 3, (n,), generator=g)


def _teachers(seed: int = 1) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {m: _teacher(w) for m, w in WIDTHS.items()}


def _state(t: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in t.state_dict().items()}


# -- pure functions ------------------------------------------------------------------------


@given(st.integers(0, 5), st.integers(1, 4), st.integers(0, 1000))
def test_feature_distillation_is_the_elementwise_mean(b: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, 2, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(b, d, 2, generator=g, dtype=torch.float64).requires_grad_()
    out = feature_distillation(f, t)
    n = b * d * 2
    ref = sum(float(v) ** 2 for v in (f - t).detach().reshape(-1)) / max(n, 1)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    out.backward()
    assert t.grad is None  # the teacher side is detached
    if n:
        torch.testing.assert_close(f.grad, (2 * (f - t) / n).detach(), rtol=1e-5, atol=1e-7)


@given(st.integers(2, 4), st.integers(1, 5), st.integers(2, 5), st.integers(0, 1000))
def test_ensemble_is_the_mean_of_members(m: int, b: int, c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = {f"m{i}": torch.randn(b, c, generator=g) for i in range(m)}
    logits = unimodal_ensemble(z)
    for row in range(b):
        for k in range(c):
            ref = sum(float(z[name][row, k]) for name in z) / m
            assert float(logits[row, k]) == pytest.approx(ref, abs=1e-6)
    probs = unimodal_ensemble(z, mode="probs")
    expect = sum(torch.exp(v) / torch.exp(v).sum(1, keepdim=True) for v in z.values()) / m
    torch.testing.assert_close(probs, expect)
    torch.testing.assert_close(probs.sum(1), torch.ones(b))


def test_ensemble_bad_input() -> None:
    with pytest.raises(ValueError, match="at least two"):
        unimodal_ensemble({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"'b'.*\(2, 4\)"):
        unimodal_ensemble({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="non-finite"):
        unimodal_ensemble({"a": torch.zeros(2, 3), "b": torch.full((2, 3), float("nan"))})
    with pytest.raises(ValueError, match="mode"):
        unimodal_ensemble({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, mode="max")  # type: ignore[arg-type]


def test_ume_members_get_gradients_from_their_own_modality_only() -> None:
    """UME trained in one loop: the sum of the members' losses, disjoint parameters."""
    torch.manual_seed(0)
    x, y = _data(8)
    members = {
        m: nn.Sequential(nn.Linear(w, 4), nn.Tanh(), nn.Linear(4, 3)) for m, w in WIDTHS.items()
    }
    alone = copy.deepcopy(members)
    sum(F.cross_entropy(net(x[m]), y) for m, net in members.items()).backward()  # type: ignore[union-attr]
    for m, net in alone.items():
        F.cross_entropy(net(x[m]), y).backward()
        for p, q in zip(members[m].parameters(), net.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
    with torch.no_grad():
        out = unimodal_ensemble({m: net(x[m]) for m, net in members.items()})
    torch.testing.assert_close(out, sum(net(x[m]) for m, net in members.items()).detach() / 3)


# -- one step by hand ----------------------------------------------------------------------


def test_one_step_is_the_formula_by_hand() -> None:
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    x, y = _data(8)
    scaling = {"a": 10.0, "b": 0.5, "c": 2.0}
    umt = UnimodalTeacherLoss(teachers, scaling=scaling)
    logits, f = model(x)
    loss = umt(logits, y, features=f, inputs=x)
    loss.backward()
    # the reference: CE + sum_m s_m mean((f_m - T_m(x_m))^2), the teachers by hand
    ref_model = copy.deepcopy(model)
    ref_model.zero_grad()
    z, g = ref_model(x)
    ce = -torch.log_softmax(z, 1)[torch.arange(8), y].mean()
    mse = {m: ((g[m] - _teacher_by_hand(teachers[m], x[m])) ** 2).mean() for m in g}
    ref = ce + sum(scaling[m] * mse[m] for m in g)
    ref.backward()  # type: ignore[union-attr]
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(umt.last.distillation, torch.stack([mse[m] for m in g]).detach())
    assert umt.last.active and umt.last.modalities == ("a", "b", "c")
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert "$$" in (UnimodalTeacherLoss.__doc__ or "")


@settings(max_examples=15)
@given(st.floats(0.0, 100.0), st.integers(0, 100))
def test_head_gradient_does_not_depend_on_scaling(s: float, seed: int) -> None:
    torch.manual_seed(seed)
    model, teachers = _Model(), _teachers(seed)
    x, y = _data(6, seed)
    grads = []
    for scale in (0.0, s):
        m = copy.deepcopy(model)
        logits, f = m(x)
        UnimodalTeacherLoss(teachers, scaling=scale)(logits, y, features=f, inputs=x).backward()
        grads.append([p.grad for p in m.head.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        assert torch.equal(g0, g1)


def test_zero_term_and_no_extra_gradient_when_student_equals_teacher() -> None:
    torch.manual_seed(0)
    model = _Model()
    x, y = _data(8)
    logits, f = model(x)
    umt = UnimodalTeacherLoss(None, scaling=10.0)
    same = {m: v.detach().clone() for m, v in f.items()}
    loss = umt(logits, y, features=f, teacher_features=same)
    assert torch.equal(umt.last.distillation, torch.zeros(3))
    loss.backward()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    F.cross_entropy(ref(x)[0], y).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def _train(
    model: _Model, opt: torch.optim.Optimizer, umt: UnimodalTeacherLoss | None, steps: range
) -> list[Tensor]:
    x, y = _data(64)
    losses = []
    for step in steps:
        rows = slice(step * 8 % 64, step * 8 % 64 + 8)
        xb = {m: v[rows] for m, v in x.items()}
        opt.zero_grad()
        logits, f = model(xb)
        loss = (
            F.cross_entropy(logits, y[rows])
            if umt is None
            else umt(logits, y[rows], features=f, inputs=xb)
        )
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("how", ["s=0", "outside the window"])
def test_off_is_bit_identical_to_plain_training(how: str) -> None:
    torch.manual_seed(0)
    model = _Model()
    plain = copy.deepcopy(model)
    kwargs: dict[str, Any] = {"scaling": 0.0} if how == "s=0" else {"start_step": 10}
    umt = UnimodalTeacherLoss(_teachers(), **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    umt.attach(opt)
    opt2 = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for l1, l2 in zip(
        _train(model, opt, umt, range(4)), _train(plain, opt2, None, range(4)), strict=True
    ):
        assert torch.equal(l1, l2)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    assert umt.steps == 4 and umt.last is not None and not umt.last.active


# -- the teachers: frozen, eval, outside the module tree, moved with .to() -------------------


def test_teachers_never_change_and_stay_in_eval() -> None:
    torch.manual_seed(0)
    teachers = _teachers()
    before = {m: _state(t) for m, t in teachers.items()}
    model = _Model()
    model.criterion = UnimodalTeacherLoss(teachers)  # a model that holds the loss
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    assert not any(
        p is q for p in model.parameters() for t in teachers.values() for q in t.parameters()
    )
    assert list(model.criterion.parameters()) == []
    assert all(
        not k.startswith("criterion.") or k == "criterion._extra_state" for k in model.state_dict()
    )
    x, y = _data(16)
    for _ in range(3):
        model.train()  # recurses into the loss: the teachers stay in eval
        teachers["a"].train()  # even a teacher put in train mode directly runs in eval
        opt.zero_grad()
        logits, f = model(x)
        model.criterion(logits, y, features=f, inputs=x).backward()
        opt.step()
        assert all(p.grad is None for t in teachers.values() for p in t.parameters())
    assert all(not mod.training for t in teachers.values() for mod in t.modules())
    for m, t in teachers.items():
        for k, v in t.state_dict().items():
            assert torch.equal(v, before[m][k]), (m, k)  # parameters and buffers
    bad = torch.optim.SGD([*model.parameters(), *teachers["b"].parameters()], lr=0.1)
    with pytest.raises(ValueError, match="teachers\\['b'\\]"):
        UnimodalTeacherLoss(teachers).attach(bad)


def test_teachers_move_with_the_module_and_take_tuple_or_mapping_inputs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: Tensor, mask: Tensor) -> Tensor:
            return self.lin(x) * mask

    teachers: dict[str, nn.Module] = {"a": Two(), "b": nn.Linear(5, 4)}
    umt = UnimodalTeacherLoss(teachers).to(torch.float64)
    assert (
        teachers["a"].lin.weight.dtype == torch.float64
        and teachers["b"].weight.dtype == torch.float64
    )
    xa, mask, xb = (
        torch.randn(2, 3, dtype=torch.float64),
        torch.ones(2, 1, dtype=torch.float64),
        torch.randn(2, 5, dtype=torch.float64),
    )
    out = umt.teacher_features({"a": (xa, mask), "b": xb})
    torch.testing.assert_close(out["a"], teachers["a"].lin(xa).detach())
    out2 = umt.teacher_features({"a": {"x": xa, "mask": mask}, "b": xb})
    assert torch.equal(out["a"], out2["a"]) and not out["a"].requires_grad


# -- window, eval, adapters, bad input -----------------------------------------------------


def test_window_counts_optimiser_steps_and_eval_runs_no_teacher() -> None:
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    calls = []
    teachers["a"].register_forward_hook(lambda *_: calls.append(1))
    umt = UnimodalTeacherLoss(teachers, start_step=2, stop_step=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    umt.attach(opt)
    x, y = _data(64)
    flags = []
    for step in range(6):
        opt.zero_grad()
        for i in range(2):  # two micro-batches per optimiser step
            rows = slice(step * 8 + i * 4, step * 8 + i * 4 + 4)
            xb = {m: v[rows] for m, v in x.items()}
            logits, f = model(xb)
            (umt(logits, y[rows], features=f, inputs=xb) / 2).backward()
            flags.append(umt.last.active)
        opt.step()
    assert flags == [False] * 4 + [True] * 4 + [False] * 4 and umt.steps == 6
    assert len(calls) == 4
    umt.eval()
    logits, f = model(x)
    torch.testing.assert_close(umt(logits, y, features=f, inputs=x), F.cross_entropy(logits, y))
    assert len(calls) == 4 and umt.last.step == 5


def test_adapters_map_the_student_width_to_the_teacher() -> None:
    torch.manual_seed(0)
    model = _Model()
    teachers = {"a": nn.Linear(3, 6), "b": nn.Linear(5, 4), "c": nn.Linear(2, 4)}
    x, y = _data(4)
    logits, f = model(x)
    with pytest.raises(ValueError, match=r"'a'.*\(4, 6\).*\(4, 4\).*adapters"):
        UnimodalTeacherLoss(teachers)(logits, y, features=f, inputs=x)
    adapter = nn.Linear(4, 6)
    umt = UnimodalTeacherLoss(teachers, scaling=1.0, adapters={"a": adapter})
    assert {n for n, _ in umt.named_parameters()} == {"adapters.a.weight", "adapters.a.bias"}
    loss = umt(logits, y, features=f, inputs=x)
    fa = f["a"] @ adapter.weight.T + adapter.bias
    ref = F.cross_entropy(logits, y) + ((fa - teachers["a"](x["a"])) ** 2).mean()
    ref = ref + sum(((f[m] - teachers[m](x[m])) ** 2).mean() for m in "bc")
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert adapter.weight.grad is not None
    with pytest.raises(ValueError, match=r"adapters\['a'\].*not in the optimizer"):
        umt.attach(torch.optim.SGD(model.parameters(), lr=0.1))  # the adapter is not in it


def test_bad_input_names_the_modality_and_shapes() -> None:
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    x, y = _data(4)
    logits, f = model(x)
    umt = UnimodalTeacherLoss(teachers)
    with pytest.raises(ValueError, match="missing \\['c'\\]"):
        umt(logits, y, features={m: f[m] for m in "ab"}, inputs=x)
    with pytest.raises(ValueError, match="exactly one of inputs"):
        umt(logits, y, features=f)
    with pytest.raises(ValueError, match="exactly one of inputs"):
        umt(logits, y, features=f, inputs=x, teacher_features=f)
    with pytest.raises(ValueError, match="batch"):
        umt(logits, y, features={**f, "b": f["b"][:3]}, inputs=x)
    with pytest.raises(ValueError, match="outside"):
        umt(logits, torch.tensor([0, 1, 2, 7]), features=f, inputs=x)
    with pytest.raises(ValueError, match=r"teachers' features\['b'\] contains non-finite"):
        umt(
            logits,
            y,
            features=f,
            teacher_features={
                **{m: v.detach() for m, v in f.items()},
                "b": f["b"].detach() * float("nan"),
            },
        )
    with pytest.raises(ValueError, match=r"features\['c'\] have shape \(4, 2\)"):
        umt(logits, y, features=f, teacher_features={**f, "c": torch.zeros(4, 2)})
    with pytest.raises(TypeError, match=r"teachers\['a'\] returned tuple"):
        UnimodalTeacherLoss(
            {"a": nn.LSTM(3, 4, batch_first=True), "b": teachers["b"], "c": teachers["c"]}
        )(logits, y, features=f, inputs=x)
    with pytest.raises(RuntimeError, match="teacher_features="):
        UnimodalTeacherLoss(None)(logits, y, features=f, inputs=x)
    with pytest.raises(ValueError, match="scaling"):
        UnimodalTeacherLoss(teachers, scaling=-1.0)
    with pytest.raises(ValueError, match="scaling modalities"):
        UnimodalTeacherLoss(teachers, scaling={"a": 1.0, "b": 1.0})(logits, y, features=f, inputs=x)
    with pytest.raises(ValueError, match="adapters \\['d'\\]"):
        UnimodalTeacherLoss(teachers, adapters={"d": nn.Identity()})(
            logits, y, features=f, inputs=x
        )
    with pytest.raises(ValueError, match=">= 2 modalities"):
        UnimodalTeacherLoss({"a": teachers["a"]})
    with pytest.raises(TypeError, match=r"nn\.Module"):
        UnimodalTeacherLoss({"a": teachers["a"], "b": lambda v: v})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="stop_step must be an integer >= 3"):
        UnimodalTeacherLoss(teachers, start_step=3, stop_step=2)
    with pytest.raises(TypeError, match="integer"):
        UnimodalTeacherLoss(teachers, start_step=1.5)  # type: ignore[arg-type]


# -- AMP, accumulation, resume, DDP --------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_gives_a_zero_loss_with_zero_gradients(training: bool) -> None:
    """``B = 0`` (an uneven last shard, a filtered batch): a zero that back-propagates zero
    gradients, not the NaN of the criterion's mean over no sample; ``reduction="none"``: ``[0]``."""
    torch.manual_seed(0)
    model, x = _Model(), {m: v[:0] for m, v in _data(4)[0].items()}
    umt = UnimodalTeacherLoss(_teachers()).train(training)
    logits, feats = model(x)
    loss = umt(logits, torch.zeros(0, dtype=torch.long), features=feats, inputs=x)
    loss.backward()
    assert loss.shape == () and loss.item() == 0.0
    for p in model.parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))
    per = UnimodalTeacherLoss(_teachers(), nn.CrossEntropyLoss(reduction="none"))
    logits, feats = model(x)
    assert per(logits, torch.zeros(0, dtype=torch.long), features=feats, inputs=x).shape == (0,)


def test_bf16_autocast_is_finite_with_fp32_statistics() -> None:
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    x, y = _data(8)
    umt = UnimodalTeacherLoss(teachers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, f = model(x)
        loss = umt(logits, y, features=f, inputs=x)
    assert f["a"].dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert umt.last.distillation.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(umt.last.distillation).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    ref = umt.last.distillation
    _, f32 = model(x)
    for i, m in enumerate(f32):
        full = ((f32[m] - _teacher_by_hand(teachers[m], x[m])) ** 2).mean()
        torch.testing.assert_close(ref[i], full.detach(), rtol=0.05, atol=1e-2)


def test_accumulation_equals_one_batch() -> None:
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    one = copy.deepcopy(model)
    umt = UnimodalTeacherLoss(teachers)
    x, y = _data(8)
    for i in range(2):
        xb = {m: v[i * 4 : i * 4 + 4] for m, v in x.items()}
        logits, f = model(xb)
        (umt(logits, y[i * 4 : i * 4 + 4], features=f, inputs=xb) / 2).backward()
    logits, f = one(x)
    umt(logits, y, features=f, inputs=x).backward()
    for p, q in zip(model.parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_resume_is_bit_exact_across_the_window() -> None:
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    umt = UnimodalTeacherLoss(teachers, start_step=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    umt.attach(opt)
    _train(model, opt, umt, range(3))
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "umt": umt.state_dict(), "opt": opt.state_dict()}, buffer
    )
    straight = _train(model, opt, umt, range(3, 7))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["umt"]) == {"_extra_state"}  # no teacher weights in the checkpoint
    model2 = _Model()
    model2.load_state_dict(saved["model"])
    umt2 = UnimodalTeacherLoss(teachers, start_step=4)
    umt2.load_state_dict(saved["umt"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    umt2.attach(opt2)
    assert umt2.steps == 3 and isinstance(umt2.last, UMTRecord) and not umt2.last.active
    resumed = _train(model2, opt2, umt2, range(3, 7))
    for l1, l2 in zip(straight, resumed, strict=True):
        assert torch.equal(l1, l2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert umt2.steps == 7 and umt2.last.active


def _ddp_body(
    rank: int,
    world: int,
    state: dict[str, Tensor],
    teachers: dict[str, nn.Module],
    empty_rows: int | None = None,
) -> list[Tensor]:
    """One UMT step under DDP: each rank its half of a batch of 16, or (``empty_rows``) rank 0
    all 16 and rank 1 ``empty_rows`` rows whose targets are all ignored (0: an empty shard)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _Model()
    model.load_state_dict(state)
    ddp = DDP(model)
    umt = UnimodalTeacherLoss(teachers)
    x, y = _data(16)
    if empty_rows is None:
        rows = slice(rank * 8, rank * 8 + 8)
        x, y = {m: v[rows] for m, v in x.items()}, y[rows]
    elif rank == 1:
        x, y = {m: v[:empty_rows] for m, v in x.items()}, torch.full((empty_rows,), -100)
    logits, f = ddp(x)
    loss = umt(logits, y, features=f, inputs=x)
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters())]


def test_two_gloo_ranks_equal_one_process_on_the_global_batch() -> None:
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    results = run_distributed(_ddp_body, model.state_dict(), teachers)
    x, y = _data(16)
    logits, f = model(x)
    UnimodalTeacherLoss(teachers)(logits, y, features=f, inputs=x).backward()
    for grads in results:
        for g, p in zip(grads[1:], model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("rows", [0, 4])
def test_a_rank_with_no_counted_sample_adds_zero_not_nan(rows: int) -> None:
    """A DDP rank with an empty batch (or every target ignored) has a zero criterion term, not
    ``CrossEntropyLoss``'s ``0 / 0``: its gradient is the distillation's alone, and DDP's average
    is ``(g_0 + g_1) / 2`` with both finite, not NaN on every rank."""
    torch.manual_seed(0)
    model, teachers = _Model(), _teachers()
    results = run_distributed(_ddp_body, model.state_dict(), teachers, rows)
    x, y = _data(16)
    logits, f = model(x)
    UnimodalTeacherLoss(teachers)(logits, y, features=f, inputs=x).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    part = {m: v[:rows] for m, v in x.items()}
    _, f = model(part)
    mse = sum(10.0 * F.mse_loss(f[m], _teacher_by_hand(teachers[m], part[m])) for m in f)
    if rows:
        mse.backward()
    ignored = [torch.zeros_like(g) if p.grad is None else p.grad
               for g, p in zip(full, model.parameters(), strict=True)]  # fmt: skip
    assert torch.isfinite(results[1][0]) and (rows or float(results[1][0]) == 0.0)
    for r in results:
        for got, g0, g1 in zip(r[1:], full, ignored, strict=True):
            torch.testing.assert_close(got, (g0 + g1) / 2)
