"""AGM: Shapley masking, the coefficient formulas, gradient scaling, state, AMP and DDP.

Every expected value is computed here from the formulas (itertools over subsets, math.exp on
Python floats), never from the module's own output.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses.core.masking import masked_outputs, shapley_values
from imbalance_losses.methods.agm import AdaptiveGradientModulator
from tests.ddp import run_distributed

WIDTHS = {"a": 3, "b": 4, "c": 2, "d": 3}


def _feats(m: int, batch: int, seed: int, grad: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = list(WIDTHS)[:m]
    return {n: torch.randn(batch, WIDTHS[n], generator=g).requires_grad_(grad) for n in names}


def _mlp(m: int, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    width = sum(list(WIDTHS.values())[:m])
    return nn.Sequential(nn.Linear(width, 6), nn.Tanh(), nn.Linear(6, classes))


def _value(head: nn.Module, feats: dict[str, Tensor], keep: set[str]) -> Tensor:
    parts = [x if n in keep else torch.zeros_like(x) for n, x in feats.items()]
    return head(torch.cat(parts, -1)).detach()


def _shapley_by_hand(head: nn.Module, feats: dict[str, Tensor]) -> dict[str, Tensor]:
    names, m = list(feats), len(feats)
    out = {}
    for n in names:
        others = [o for o in names if o != n]
        total = torch.zeros_like(_value(head, feats, set()))
        for k in range(m):
            w = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
            for s in itertools.combinations(others, k):
                total += w * (_value(head, feats, set(s) | {n}) - _value(head, feats, set(s)))
        out[n] = total
    return out


@settings(max_examples=12, deadline=None)
@given(m=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_efficiency_and_hand_loop_through_a_nonlinear_head(m: int, seed: int) -> None:
    head, feats = _mlp(m, seed=seed), _feats(m, 5, seed)
    values = masked_outputs(head, feats)
    assert values.shape == (2**m, 5, 3)
    for s in range(2**m):  # the 2^M masking against a hand loop
        keep = {n for j, n in enumerate(feats) if s >> j & 1}
        torch.testing.assert_close(values[s], _value(head, feats, keep), rtol=1e-5, atol=1e-6)
    phi = shapley_values(values.detach())
    fused, empty = _value(head, feats, set(feats)), _value(head, feats, set())
    torch.testing.assert_close(phi.sum(0), fused - empty, rtol=1e-5, atol=1e-5)  # efficiency
    for i, ref in enumerate(_shapley_by_hand(head, feats).values()):
        torch.testing.assert_close(phi[i], ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(v=st.lists(st.floats(-5, 5), min_size=4, max_size=4))
def test_two_modality_closed_form(v: list[float]) -> None:
    values = torch.tensor(v, dtype=torch.float64)  # [v(), v(a), v(b), v(ab)]
    phi = shapley_values(values)
    assert phi[0].item() == pytest.approx(0.5 * (v[1] - v[0]) + 0.5 * (v[3] - v[2]), abs=1e-12)
    assert phi[1].item() == pytest.approx(0.5 * (v[2] - v[0]) + 0.5 * (v[3] - v[1]), abs=1e-12)


def test_symmetry_and_dummy_axioms_and_linear_head() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    sym = lambda z: torch.tanh(z[:, :3] + z[:, 3:6]) * 2 + z[:, 6:].sum(-1, keepdim=True) * 0  # noqa: E731
    feats = {"a": x, "b": x.clone(), "c": torch.randn(4, 2)}
    phi = shapley_values(masked_outputs(sym, feats))
    torch.testing.assert_close(phi[0], phi[1])  # symmetry
    assert phi[2].abs().max() < 1e-6  # dummy (up to fp32 rounding of the weighted sum)
    lin = nn.Linear(9, 3)
    feats = _feats(3, 6, 1)
    phi = shapley_values(masked_outputs(lin, feats).detach())
    offset = 0
    for i, f in enumerate(feats.values()):  # phi_m = x_m W_m^T exactly
        torch.testing.assert_close(
            phi[i], f @ lin.weight[:, offset : offset + f.shape[1]].T.detach()
        )
        offset += f.shape[1]


def test_masked_outputs_read_every_kind_of_head_in_eval_mode() -> None:
    """Dropout inside a plain dict of per-modality heads (late fusion) is off while the masked
    copies are evaluated, as for a module head, and every module's own mode is restored."""
    torch.manual_seed(0)
    feats = {"a": torch.randn(6, 3), "b": torch.randn(6, 2)}
    heads = {m: nn.Sequential(nn.Linear(x.shape[1], 4), nn.Dropout(0.9)) for m, x in feats.items()}
    heads["b"][1].eval()  # a submodule the user put in eval mode stays so
    with torch.no_grad():
        got = masked_outputs(heads, feats)
        on = {m: heads[m][0](x) for m, x in feats.items()}  # dropout off: the linear layers
        off = {m: heads[m][0](torch.zeros_like(x)) for m, x in feats.items()}
    for s in range(4):  # subset s keeps modality j when bit j is set
        want = sum((on if s >> j & 1 else off)[m] for j, m in enumerate(feats))
        torch.testing.assert_close(got[s], want)
    assert [mod.training for mod in heads["a"].modules()] == [True, True, True]
    assert [mod.training for mod in heads["b"].modules()] == [True, True, False]


def _expected_steps(
    batches: list[tuple[dict[str, Tensor], Tensor]], head: nn.Module, alpha: float, cap: float
) -> list[list[float]]:
    """Coefficients by the formulas, in Python floats (cumulative running mean)."""
    running: list[float] | None = None
    t, out = 0, []
    for feats, y in batches:
        phi = _shapley_by_hand(head, feats)
        empty = _value(head, feats, set()) / len(feats)
        s = [
            sum(
                min(-math.log(max(p, 1e-8)), -math.log(1e-8))
                for p in torch.softmax(phi[n].double() + empty.double(), -1)[
                    range(len(y)), y
                ].tolist()
            )
            / len(y)
            for n in feats
        ]
        m = len(s)
        ref = running or [0.0] * m

        def ratio(vals: list[float], i: int) -> float:
            rest = [v for k, v in enumerate(vals) if k != i]
            return math.exp(sum(rest) / len(rest) - vals[i])

        out.append([math.exp(alpha * min(ratio(ref, i) - ratio(s, i), cap)) for i in range(m)])
        running = [ref[i] * t / (t + 1) + s[i] / (t + 1) for i in range(m)]
        t += 1
    return out


@pytest.mark.parametrize("m", [2, 3])
def test_coefficients_running_mean_and_feature_gradients(m: int) -> None:
    head = _mlp(m, seed=3)
    agm = AdaptiveGradientModulator(head, alpha=0.7, cap=10.0)
    g = torch.Generator().manual_seed(5)
    batches = [(_feats(m, 8, i), torch.randint(0, 3, (8,), generator=g)) for i in range(3)]
    expected = _expected_steps(batches, head, 0.7, 10.0)
    for (feats, y), k in zip(batches, expected, strict=True):
        plain = {n: x.clone().requires_grad_() for n, x in feats.items()}
        F.cross_entropy(head(torch.cat(list(plain.values()), -1)), y).backward()
        head_grad = [p.grad.clone() for p in head.parameters()]
        head.zero_grad()
        leaves = {n: x.clone().requires_grad_() for n, x in feats.items()}
        out = agm(leaves, y)
        F.cross_entropy(head(torch.cat(list(out.values()), -1)), y).backward()
        torch.testing.assert_close(agm.last.coefficients, torch.tensor(k), rtol=1e-4, atol=1e-6)
        for i, n in enumerate(feats):  # gradient into features = k_m * unmodulated one
            torch.testing.assert_close(leaves[n].grad, k[i] * plain[n].grad, rtol=1e-4, atol=1e-7)
        for p, ref in zip(head.parameters(), head_grad, strict=True):  # head unchanged
            torch.testing.assert_close(p.grad, ref)
        head.zero_grad()
    assert agm.steps == 3


def test_cap_ema_warmup_eval_and_no_grad() -> None:
    head = nn.Linear(7, 3)
    feats, y = _feats(2, 6, 0), torch.randint(0, 3, (6,))
    agm = AdaptiveGradientModulator(head, alpha=2.0, momentum=0.9, warmup_steps=1)
    x = {n: f.clone().requires_grad_() for n, f in feats.items()}
    assert agm(x, y)["a"] is x["a"]  # warm-up: no modulation
    s1 = agm.last.scores
    torch.testing.assert_close(agm.last.running_scores, s1)  # first step takes the batch
    x = {n: f.clone().requires_grad_() for n, f in feats.items()}  # a new step: new tensors
    agm(x, y)
    torch.testing.assert_close(agm.last.running_scores, 0.9 * s1 + 0.1 * agm.last.scores)
    agm.eval()
    assert agm(x, y)["a"] is x["a"] and agm.steps == 2
    agm.train()
    with pytest.warns(RuntimeWarning), torch.no_grad():
        agm(x, y)
    assert agm.steps == 2
    capped = AdaptiveGradientModulator(head, alpha=1.0, cap=1e-3)
    capped(x, y)
    assert (capped.last.coefficients <= math.exp(1e-3) + 1e-6).all()


@pytest.mark.parametrize("k", [2, 3])
def test_accumulation_with_encoders_equals_one_batch(k: int) -> None:
    torch.manual_seed(0)
    enc = {"a": nn.Linear(5, 3), "b": nn.Linear(4, 4)}
    head = nn.Linear(7, 3)
    xa, xb, y = torch.randn(12, 5), torch.randn(12, 4), torch.randint(0, 3, (12,))

    def run(chunks: int, encoders: bool) -> list[Tensor]:
        e = copy.deepcopy(enc)
        agm = AdaptiveGradientModulator(head, alpha=1.5, encoders=e if encoders else None)
        for a, b, t in zip(xa.chunk(chunks), xb.chunk(chunks), y.chunk(chunks), strict=True):
            f = agm({"a": e["a"](a), "b": e["b"](b)}, t)
            loss = F.cross_entropy(head(torch.cat(list(f.values()), -1)), t, reduction="sum")
            loss.backward()
        if encoders:
            agm.step()
        return [p.grad for m in e.values() for p in m.parameters()]

    for got, ref in zip(run(k, True), run(1, False), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_encoders_must_name_the_features_modalities_in_order() -> None:
    """step() scales the encoders by position: a swapped or renamed mapping would swap k."""
    enc = {"a": nn.Linear(5, 3), "b": nn.Linear(4, 4)}
    head = nn.Linear(7, 3)
    feats = {"a": torch.randn(6, 3), "b": torch.randn(6, 4)}
    y = torch.randint(0, 3, (6,))
    swapped = AdaptiveGradientModulator(head, encoders={"b": enc["b"], "a": enc["a"]})
    with pytest.raises(ValueError, match="different order"):
        swapped(feats, y)
    renamed = AdaptiveGradientModulator(head, encoders={"x": enc["a"], "b": enc["b"]})
    with pytest.raises(ValueError, match=r"missing \['x'\]"):
        renamed(feats, y)


@pytest.mark.filterwarnings("ignore:AGM hook mode on float16:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gives_fp32_statistics(dtype: torch.dtype) -> None:
    head = _mlp(2)
    feats, y = _feats(2, 8, 2, grad=True), torch.randint(0, 3, (8,))
    agm = AdaptiveGradientModulator(head)
    with torch.autocast("cpu", dtype=dtype):
        agm(feats, y)
    assert agm.last.scores.dtype == torch.float32 and torch.isfinite(agm.last.coefficients).all()
    low = nn.Linear(7, 3).to(dtype)
    agm2 = AdaptiveGradientModulator(low)
    out = agm2({n: x.detach().to(dtype).requires_grad_() for n, x in feats.items()}, y)
    assert agm2.last.coefficients.dtype == torch.float32 and out["a"].dtype == dtype


def test_state_round_trip_is_bit_exact() -> None:
    head = _mlp(3)
    batches = [(_feats(3, 6, i), torch.randint(0, 3, (6,))) for i in range(4)]
    a = AdaptiveGradientModulator(head, alpha=0.5)
    for f, y in batches[:2]:
        a(f, y)
    b = AdaptiveGradientModulator(head, alpha=0.5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.steps == 2 and torch.equal(b.last.coefficients, a.last.coefficients)
    for f, y in batches[2:]:
        a(f, y)
        b(f, y)
        assert torch.equal(a.last.coefficients, b.last.coefficients)
        assert torch.equal(a.last.running_scores, b.last.running_scores)


def test_empty_and_ignored_batches() -> None:
    head = nn.Linear(7, 3)
    agm = AdaptiveGradientModulator(head)
    empty = {"a": torch.zeros(0, 3), "b": torch.zeros(0, 4)}
    assert agm(empty, torch.zeros(0, dtype=torch.long))["a"] is empty["a"] and agm.steps == 0
    feats = _feats(2, 4, 0)
    agm(feats, torch.full((4,), -100))
    assert agm.steps == 1 and torch.equal(agm.last.coefficients, torch.ones(2))
    assert torch.equal(agm.last.running_scores, torch.zeros(2))  # nothing entered S


def test_bad_input_raises_clear_errors() -> None:
    head = nn.Linear(7, 3)
    agm = AdaptiveGradientModulator(head)
    feats, y = _feats(2, 4, 0), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="two"):
        agm({"a": feats["a"]}, y)
    with pytest.raises(ValueError, match="width 6"):
        agm({"a": feats["a"], "b": feats["a"]}, y)
    with pytest.raises(ValueError, match="class indices"):
        agm(feats, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="floating point"):
        agm({"a": feats["a"].long(), "b": feats["b"]}, y)
    with pytest.raises(ValueError, match="non-finite"):
        agm({"a": feats["a"] * float("nan"), "b": feats["b"]}, y)
    with pytest.raises(ValueError, match="alpha"):
        AdaptiveGradientModulator(head, alpha=-1.0)
    with pytest.raises(TypeError, match="warmup_steps"):
        AdaptiveGradientModulator(head, warmup_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="encoders"):
        agm.step()
    agm(feats, y)
    with pytest.raises(ValueError, match="differ"):
        agm({"b": feats["b"], "a": feats["a"]}, y)


def _ddp_body(rank: int, world: int, xa: Tensor, xb: Tensor, y: Tensor) -> dict[str, Tensor]:
    torch.manual_seed(0)
    head = nn.Linear(7, 3)
    agm = AdaptiveGradientModulator(head, alpha=1.0)
    out = {}
    for step in range(2):
        rows = slice(rank * 4 + step * 8, rank * 4 + step * 8 + 4)
        a, b = xa[rows].clone().requires_grad_(), xb[rows].clone().requires_grad_()
        f = agm({"a": a, "b": b}, y[rows])
        out[f"k{step}"] = agm.last.coefficients
        F.cross_entropy(head(torch.cat(list(f.values()), -1)), y[rows], reduction="sum").backward()
        out[f"ga{step}"] = a.grad
    empty = {"a": xa[:0], "b": xb[:0]}
    agm(empty if rank == 1 else {"a": xa[:4], "b": xb[:4]}, y[:0] if rank == 1 else y[:4])
    out["k_uneven"] = agm.last.coefficients
    bad = {"a": xa[:4], "b": xb[:4] * float("nan")} if rank == 1 else {"a": xa[:4], "b": xb[:4]}
    try:
        agm(bad, y[:4])
    except (RuntimeError, ValueError) as err:
        out["failed"] = torch.tensor(1.0 if "rank" in str(err) or "non-finite" in str(err) else 0.0)
    return out


def test_ddp_two_processes_equal_one_process_on_the_global_batch() -> None:
    torch.manual_seed(1)
    xa, xb, y = torch.randn(16, 3), torch.randn(16, 4), torch.randint(0, 3, (16,))
    results = run_distributed(_ddp_body, xa, xb, y)
    torch.manual_seed(0)
    head = nn.Linear(7, 3)
    agm = AdaptiveGradientModulator(head, alpha=1.0)
    for step in range(2):
        rows = slice(step * 8, step * 8 + 8)
        a = xa[rows].clone().requires_grad_()
        f = agm({"a": a, "b": xb[rows]}, y[rows])
        F.cross_entropy(head(torch.cat(list(f.values()), -1)), y[rows], reduction="sum").backward()
        for rank, r in enumerate(results):
            torch.testing.assert_close(r[f"k{step}"], agm.last.coefficients)
            torch.testing.assert_close(r[f"ga{step}"], a.grad[rank * 4 : rank * 4 + 4])
    agm({"a": xa[:4], "b": xb[:4]}, y[:4])
    for r in results:
        torch.testing.assert_close(r["k_uneven"], agm.last.coefficients)
        assert r["failed"].item() == 1.0


# ---------------------------------------------------------------------------- issue 19


def test_repeated_call_is_one_step_with_one_k() -> None:
    """The same tensors again before their backward: no second step, the same k_m on both."""
    head = nn.Linear(7, 3)
    feats, y = _feats(2, 6, 0), torch.tensor([0, 1, 2, 0, 1, 2])
    agm = AdaptiveGradientModulator(head, alpha=1.0)
    warm = {n: f.clone().requires_grad_() for n, f in feats.items()}
    out = agm(warm, y)
    sum(o.sum() for o in out.values()).backward()  # step 0 ends; S now holds its scores
    x = {n: (f + 0.5 * torch.randn_like(f)).requires_grad_() for n, f in feats.items()}
    first = agm(x, y)
    record = agm.last
    second = agm(x, y)  # a repeat: the same step
    assert agm.steps == 2 and agm.last is record
    k = [float(c) for c in record.coefficients]
    assert k[0] != 1.0 and k[1] != 1.0
    # gradient into x_m: k_m times the sum of the two uses' gradients (2 g + 3 g)
    (2 * first["a"].sum() + 3 * second["a"].sum() + first["b"].sum()).backward()
    torch.testing.assert_close(x["a"].grad, torch.full_like(x["a"], 5 * k[0]))
    torch.testing.assert_close(x["b"].grad, torch.full_like(x["b"], k[1]))
    agm(x, y)  # the backward reached x: the same leaves are a new step
    assert agm.steps == 3


def test_repeat_in_encoders_mode_adds_no_statistics() -> None:
    """Encoders mode: a call on tensors already added since step() adds nothing; micro-batches
    (new tensors) are pooled as before."""
    torch.manual_seed(0)
    encs = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(4, 4)})
    head = nn.Linear(7, 3)
    feats, y = _feats(2, 8, 1), torch.arange(8) % 3
    ref = AdaptiveGradientModulator(head, encoders=encs)
    agm = AdaptiveGradientModulator(head, encoders=encs)
    x = {n: encs[n](f) for n, f in feats.items()}
    ref(x, y)
    agm(x, y)
    agm(x, y)  # repeat: ignored
    for p in encs.parameters():
        p.grad = torch.ones_like(p)
    a, b = ref.step(), agm.step()
    torch.testing.assert_close(b.scores, a.scores)
    assert agm.steps == ref.steps == 1
    agm(x, y)  # step() closed the step: the same tensors count again
    assert agm.step() is not None and agm.steps == 2
    mixed = {"a": x["a"], "b": encs["b"](feats["b"])}
    agm(x, y)
    with pytest.raises(ValueError, match=r"\['a'\].*\['b'\] are new tensors"):
        agm(mixed, y)


def _fp16_agm_step(mode: str) -> tuple[bool, list[Tensor], float, Tensor]:
    """One CPU fp16-autocast step with a GradScaler: one modality right, one wrong, alpha=10
    (``k_b`` about ``exp(9.9)``). Returns (step skipped, encoder grads after unscale_, scale,
    k)."""
    torch.manual_seed(0)
    encs = nn.ModuleDict({"a": nn.Linear(3, 3, bias=False), "b": nn.Linear(3, 3, bias=False)})
    head = nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        for e in encs.values():
            e.weight.copy_(torch.eye(3))
        head.weight.zero_()
        head.weight[:, :3] = 5 * torch.eye(3)  # modality a: the true class, margin 5
        head.weight[:, 3:] = 5 * torch.eye(3)  # modality b: fed the wrong class below
    y = torch.arange(6) % 3
    xa, xb = F.one_hot(y, 3).float(), F.one_hot((y + 1) % 3, 3).float()
    agm = AdaptiveGradientModulator(head, alpha=10.0, encoders=encs if mode == "encoders" else None)
    opt = torch.optim.SGD(encs.parameters(), lr=0.1)
    before = [p.detach().clone() for p in encs.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with torch.autocast("cpu", dtype=torch.float16):
        f = {"a": encs["a"](xa), "b": encs["b"](xb)}
        assert f["a"].dtype == torch.float16
        if mode != "plain":
            f = agm(f, y)
        loss = F.cross_entropy(head(torch.cat(list(f.values()), 1)), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    if mode == "encoders":
        agm.step()  # on the fp32 .grad, after unscale_
    grads = [p.grad.clone() for p in encs.parameters()]
    scaler.step(opt)
    scale = scaler.get_scale()
    scaler.update()
    skipped = all(torch.equal(p, q) for p, q in zip(encs.parameters(), before, strict=True))
    k = agm.last.coefficients if agm.last is not None else torch.ones(2)
    return skipped, grads, scale, k


def test_fp16_hook_mode_overflows_where_encoders_mode_is_exact() -> None:
    """Under fp16, ``k * g`` on the fp16 feature gradient overflows for a finite ``g`` (the
    scaler skips the step); ``encoders=`` scales the fp32 ``.grad`` after ``unscale_``: finite,
    ``k_m`` times the plain step's gradient, and the step is taken."""
    plain_skipped, plain, _, _ = _fp16_agm_step("plain")
    assert not plain_skipped and all(bool(g.isfinite().all()) for g in plain)
    with pytest.warns(RuntimeWarning, match=r"float16.*encoders="):  # said once, up front
        hook_skipped, hook, _, k = _fp16_agm_step("hook")
    assert float(k[1]) > 65504 / 8  # k_b * |g| (scaled by 2^10) is past fp16's max
    assert hook_skipped and not all(bool(g.isfinite().all()) for g in hook)
    enc_skipped, enc, _, k_enc = _fp16_agm_step("encoders")
    assert not enc_skipped
    torch.testing.assert_close(k_enc, k)
    for g, ref, km in zip(enc, plain, k_enc.tolist(), strict=True):
        assert bool(g.isfinite().all())
        torch.testing.assert_close(g, km * ref, rtol=1e-3, atol=0.0)


def test_a_repeat_of_an_earlier_open_call_keeps_that_calls_k() -> None:
    """Hook mode, two calls open at once (two micro-batches forwarded before any backward), then
    the first call's tensors again: a repeat of the *first* call, so its outputs carry the first
    call's ``k_m``, not the latest call's. Expected ``k`` from the formula by hand (linear head:
    ``phi_m = x_m W_m^T + b / 2``; first step ``rbar = 1``, so ``k_m = exp(alpha (1 - r_m))``)."""
    torch.manual_seed(0)
    head = nn.Linear(7, 3)
    alpha = 2.0
    agm = AdaptiveGradientModulator(head, alpha=alpha)
    x1 = {n: f.requires_grad_() for n, f in _feats(2, 6, 1).items()}
    x2 = {n: f.requires_grad_() for n, f in _feats(2, 6, 2).items()}
    y1, y2 = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 1, 0, 0])
    with torch.no_grad():
        w, b = head.weight.double(), head.bias.double()
        phi = [x1["a"].double() @ w[:, :3].T + b / 2, x1["b"].double() @ w[:, 3:].T + b / 2]
        s = [float(-(p.log_softmax(1).gather(1, y1[:, None])).mean()) for p in phi]
    k1 = [
        math.exp(alpha * (1 - math.exp(s[1] - s[0]))),
        math.exp(alpha * (1 - math.exp(s[0] - s[1]))),
    ]
    agm(x1, y1)
    agm(x2, y2)  # the second micro-batch: a new call, another k
    assert agm.steps == 2
    again = agm(x1, y1)  # x1's backward has not run: a repeat of the first call
    assert agm.steps == 2
    (again["a"].sum() + again["b"].sum()).backward()
    torch.testing.assert_close(x1["a"].grad, torch.full_like(x1["a"], k1[0]))
    torch.testing.assert_close(x1["b"].grad, torch.full_like(x1["b"], k1[1]))
    # a mix of the two open calls' tensors is neither call: refused, as any mix
    x3 = {n: f.requires_grad_() for n, f in _feats(2, 6, 3).items()}
    x4 = {n: f.requires_grad_() for n, f in _feats(2, 6, 4).items()}
    agm(x3, y1)
    agm(x4, y2)
    with pytest.raises(ValueError, match=r"different calls"):
        agm({"a": x3["a"], "b": x4["b"]}, y1)
