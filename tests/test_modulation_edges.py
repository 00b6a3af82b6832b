"""ModalityGradientModulator at its edges (issue 15): shared trunks, a second step() without a
backward, scores that underflow, hyper-parameter and logit validation, empty batches,
ignore_index, a failing DDP rank, and the GE noise against a reconstruction from the seed."""

# Tests read optional gradients / records directly and call torch methods whose stubs are untyped.
# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,operator,attr-defined"

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses.methods.modulation import ModalityGradientModulator
from tests.ddp import run_distributed


def _probs_logits(p: list[float]) -> Tensor:
    """Two-class logits whose softmax gives probability ``p_b`` to class 0."""
    pt = torch.tensor(p, dtype=torch.float64)
    return torch.stack([pt.log(), (1 - pt).log()], dim=1).float()


def _k_paper(rho: float, alpha: float) -> float:
    return 1 - math.tanh(alpha * max(rho - 1, 0.0))


def _k_code(rho: float, alpha: float) -> float:
    return 1 - math.tanh(alpha * rho) if rho > 1 else 1.0


def _pair() -> tuple[nn.Parameter, nn.Parameter]:
    return nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(3, 4))


# ---------------------------------------------------------------------------- 1. shared trunk


class Trunked(nn.Module):
    """One backbone, modality-specific stems, a linear head on the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 6)
        self.stem_a = nn.Linear(4, 6)
        self.stem_v = nn.Linear(5, 6)
        self.audio = nn.Sequential(self.stem_a, nn.ReLU(), self.trunk)
        self.visual = nn.Sequential(self.stem_v, nn.ReLU(), self.trunk)
        self.head = nn.Linear(12, 2)


def _trunked_step(shared: str) -> tuple[Trunked, dict[str, Tensor], Tensor]:
    torch.manual_seed(0)
    net = Trunked()
    g = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    mod = ModalityGradientModulator(
        {"audio": net.audio, "visual": net.visual},
        1.0,
        method="ogm",
        parameters="all",
        shared=shared,
    )
    logits = {"audio": _probs_logits([0.9, 0.8]), "visual": _probs_logits([0.3, 0.2])}
    k = mod.step(logits, torch.zeros(2, dtype=torch.long))
    return net, before, k


def test_shared_trunk_is_refused_by_default_with_a_way_out() -> None:
    net = Trunked()
    with pytest.raises(ValueError, match=r"'audio'.*'visual'.*shared='exclude'.*shared='<"):
        ModalityGradientModulator({"audio": net.audio, "visual": net.visual}, 0.8)


def test_shared_trunk_excluded_keeps_its_gradient() -> None:
    net, before, k = _trunked_step("exclude")
    ka = _k_paper(1.7 / 0.5, 1.0)
    torch.testing.assert_close(k, torch.tensor([ka, 1.0]))
    for name, p in net.named_parameters():
        if name.startswith("stem_a."):
            torch.testing.assert_close(p.grad, before[name] * ka)
        else:  # trunk (shared, excluded), visual stem (k = 1), head
            torch.testing.assert_close(p.grad, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("owner", ["audio", "visual"])
def test_shared_trunk_assigned_takes_its_owners_coefficient(owner: str) -> None:
    net, before, _ = _trunked_step(owner)
    ka = _k_paper(1.7 / 0.5, 1.0)
    for name, p in net.named_parameters():
        scaled = name.startswith("stem_a.") or (owner == "audio" and name.startswith("trunk."))
        want = before[name] * ka if scaled else before[name]
        torch.testing.assert_close(p.grad, want)


# ---------------------------------------------------------------------------- 2. step twice


def _two_logits() -> tuple[dict[str, Tensor], Tensor]:
    return (
        {"a": _probs_logits([0.9, 0.8]), "v": _probs_logits([0.3, 0.2])},
        torch.zeros(2, dtype=torch.long),
    )


@pytest.mark.parametrize("method", ["ogm", "ogm_ge"])
def test_second_step_without_backward_raises_and_changes_nothing(method: str) -> None:
    a, v = _pair()
    g0 = torch.randn(3, 4)
    a.grad, v.grad = g0.clone(), g0.clone()
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 1.0, method=method)
    logits, y = _two_logits()
    mod.step(logits, y)
    after, record = a.grad.clone(), mod.last
    with pytest.raises(RuntimeError, match=r"again.*no backward\(\).*k\^2"):
        mod.step(logits, y)
    assert torch.equal(a.grad, after) and mod.last is record and mod.step_count == 1
    if method == "ogm":
        torch.testing.assert_close(a.grad, g0 * _k_paper(1.7 / 0.5, 1.0))  # k once, not k^2
    # a new backward's gradients (accumulated into, or zeroed then written) are modulated again
    a.grad.add_(g0)
    v.grad.add_(g0)
    mod.step(logits, y)
    assert mod.step_count == 2
    a.grad, v.grad = None, g0.clone()  # set_to_none, and only v written since
    mod.step(logits, y)
    assert mod.step_count == 3


def test_real_backward_between_steps_is_accepted() -> None:
    torch.manual_seed(0)
    enc = {"a": nn.Linear(3, 2), "v": nn.Linear(3, 2)}
    mod = ModalityGradientModulator(enc, 0.5, method="ogm", parameters="all")
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 0, 1])
    for zero in ("none", "zeros", "accumulate"):
        if zero == "none":
            for e in enc.values():
                e.zero_grad(set_to_none=True)
        elif zero == "zeros":
            for e in enc.values():
                e.zero_grad(set_to_none=False)
        za, zv = enc["a"](x), enc["v"](x)
        F.cross_entropy(za + zv, y).backward()
        mod.step({"a": za.detach(), "v": zv.detach()}, y)
    assert mod.step_count == 3


def test_gradient_left_from_an_earlier_step_is_not_modulated_twice() -> None:
    """Without zero_grad, a parameter the new backward did not reach keeps its already
    modulated gradient: only the rewritten gradients are modulated again."""
    a, v, w = nn.Parameter(torch.zeros(2, 2)), *_pair()
    a.grad, v.grad, w.grad = torch.ones(2, 2), torch.ones(3, 4), torch.ones(3, 4)
    mod = ModalityGradientModulator({"a": [a, v], "v": [w]}, 1.0, method="ogm")
    logits, y = _two_logits()
    k = _k_paper(1.7 / 0.5, 1.0)
    mod.step(logits, y)
    v.grad.add_(1.0)  # only v was reached by the new backward
    mod.step(logits, y)
    torch.testing.assert_close(a.grad, torch.full((2, 2), k))  # once
    torch.testing.assert_close(v.grad, torch.full((3, 4), (k + 1.0) * k))


# ---------------------------------------------------------------------------- 3. underflow


def _underflow_k(alpha: float, coefficient: str) -> Tensor:
    """k with audio's score underflowed to 0, default ``max_ratio`` (100)."""
    a, v = _pair()
    a.grad, v.grad = torch.ones(3, 4), torch.ones(3, 4)
    mod = ModalityGradientModulator(
        {"audio": [a], "visual": [v]}, alpha, method="ogm", coefficient=coefficient
    )
    # audio gives probability exp(-2e4) = 0 (fp32) to the true class: its score underflows
    z = {"audio": torch.tensor([[1e4, -1e4]]), "visual": torch.tensor([[0.0, 1.0]])}
    k = mod.step(z, torch.tensor([1]))
    assert mod.last.scores[0] == 0
    torch.testing.assert_close(v.grad, torch.full((3, 4), float(k[1])))  # applied as reported
    return k


@pytest.mark.parametrize("coefficient", ["paper", "code"])
def test_underflowed_score_keeps_k_continuous_in_alpha(coefficient: str) -> None:
    """alpha = 1e-30 must give k ~ 1 (as alpha = 0 does), not a full stop of the encoder."""
    k_of = _k_paper if coefficient == "paper" else _k_code
    for alpha in (0.0, 1e-30, 1e-12, 1e-6, 1e-3, 0.01, 0.1):
        k = _underflow_k(alpha, coefficient)
        want = k_of(100.0, alpha)  # rho capped at max_ratio = 100
        assert float(k[0]) == 1.0
        assert math.isclose(float(k[1]), want, rel_tol=1e-5), (alpha, float(k[1]), want)
        assert float(k[1]) > 0.0
    assert float(_underflow_k(1e-30, coefficient)[1]) == 1.0
    a, v = _pair()
    mod = ModalityGradientModulator({"audio": [a], "visual": [v]}, 0.5, max_ratio=7.0)
    mod.step(
        {"audio": torch.tensor([[1e4, -1e4]]), "visual": torch.tensor([[0.0, 1.0]])},
        torch.tensor([1]),
    )
    assert mod.last.ratios.tolist() == [0.0, 7.0]


@settings(deadline=None)
@given(
    scores=st.lists(st.one_of(st.just(0.0), st.floats(1e-30, 50.0)), min_size=2, max_size=5),
    alpha=st.floats(0.0, 5.0),
    delta=st.floats(0.0, 1e-3),
    max_ratio=st.floats(1.5, 1e4),
    coefficient=st.sampled_from(["paper", "code"]),
)
def test_k_is_bounded_below_and_lipschitz_in_alpha(
    scores: list[float], alpha: float, delta: float, max_ratio: float, coefficient: str
) -> None:
    """For any scores (zeros included): ``k >= 1 - tanh(alpha (R - 1))`` (code: ``alpha R``),
    and ``|k(alpha + d) - k(alpha)| <= R d`` (``|dk/dalpha| = (1 - tanh^2) x / alpha <= R``)."""
    from imbalance_losses.methods.modulation import capped_ratio
    from imbalance_losses.methods.modulation import ogm_coefficients as _coefficients

    s = torch.tensor(scores, dtype=torch.float64)
    rho = capped_ratio(s, max_ratio)
    k0 = _coefficients(rho, alpha, coefficient)
    k1 = _coefficients(rho, alpha + delta, coefficient)
    bound = 1 - math.tanh(alpha * ((max_ratio - 1) if coefficient == "paper" else max_ratio))
    assert torch.isfinite(k0).all() and (k0 <= 1).all()
    assert (k0 >= bound - 1e-12).all()
    assert ((k0 - k1).abs() <= max_ratio * delta + 1e-12).all()
    # the ratio against a float64 formula, capped
    total, m = sum(scores), len(scores)
    for i, si in enumerate(scores):
        rest = (total - si) / (m - 1)
        want = 1.0 if si == 0 and rest == 0 else (math.inf if rest == 0 else si / rest)
        assert math.isclose(float(rho[i]), min(want, max_ratio), rel_tol=1e-9)


# ---------------------------------------------------------------------------- 4. validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start_step": 1.5}, TypeError, "start_step"),
        ({"start_step": True}, TypeError, "start_step"),
        ({"stop_step": 2.5}, TypeError, "stop_step"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"alpha": True}, TypeError, "alpha"),
        ({"alpha": "0.8"}, TypeError, "alpha"),
        ({"alpha": float("inf")}, ValueError, "alpha"),
        ({"max_ratio": 1.0}, ValueError, "max_ratio"),
        ({"max_ratio": float("nan")}, ValueError, "max_ratio"),
        ({"max_ratio": float("inf")}, ValueError, "max_ratio"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"shared": "depth"}, ValueError, "shared"),
    ],
)
def test_every_numeric_hyper_parameter_is_validated(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    a, v = _pair()
    with pytest.raises(error, match=match):
        ModalityGradientModulator({"a": [a], "v": [v]}, **{"alpha": 0.8, **kwargs})


def test_integer_logits_are_refused_naming_the_modality() -> None:
    a, v = _pair()
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 0.8)
    z = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match=r"unimodal_logits\['v'\].*\(4, 3\).*torch.int64"):
        mod.step({"a": z, "v": z.long()}, y)
    with pytest.raises(TypeError, match=r"unimodal_logits\['a'\]"):
        mod.observe({"a": z.int(), "v": z}, y)


# ---------------------------------------------------------------------------- 5. empty batch


def test_empty_step_is_a_no_op() -> None:
    a, v = _pair()
    a.grad, v.grad = torch.ones(3, 4), torch.ones(3, 4)
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 1.0, method="ogm_ge")
    empty = {"a": torch.zeros(0, 2), "v": torch.zeros(0, 2)}
    y0 = torch.zeros(0, dtype=torch.long)
    k = mod.step(empty, y0)
    assert torch.equal(k, torch.ones(2)) and mod.step_count == 0 and mod.last is None
    assert torch.equal(a.grad, torch.ones(3, 4)) and torch.equal(v.grad, torch.ones(3, 4))
    mod.observe(empty, y0)  # observe with B = 0, then step(): also a no-op
    assert torch.equal(mod.step(), torch.ones(2)) and mod.step_count == 0
    # B = 0 micro-batches add nothing to a non-empty step
    logits, y = _two_logits()
    mod.observe(empty, y0)
    mod.observe(logits, y)
    mod.observe(empty, y0)
    mod.step()
    assert mod.step_count == 1 and float(mod.last.num_samples) == 2
    torch.testing.assert_close(mod.last.scores, torch.tensor([1.7, 0.5]))
    record, grads = mod.last, a.grad.clone()
    a.grad.add_(1.0)
    assert torch.equal(mod.step(empty, y0), torch.ones(2))  # last unchanged after an empty step
    assert mod.last is record and mod.step_count == 1
    assert torch.equal(a.grad, grads + 1.0)
    with pytest.raises(RuntimeError, match="nothing observed"):
        mod.step()


# ---------------------------------------------------------------------------- 6. ignore_index


@given(
    data=st.data(),
    batch=st.integers(1, 8),
    ignore=st.sampled_from([-100, 255, None]),
)
def test_ignored_targets_are_left_out_of_scores_and_count(
    data: st.DataObject, batch: int, ignore: int | None
) -> None:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    za, zv = torch.randn(batch, 4, generator=g) * 2, torch.randn(batch, 4, generator=g)
    y = torch.randint(0, 4, (batch,), generator=g)
    keep = data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
    if ignore is not None:
        y = torch.where(torch.tensor(keep), y, torch.full_like(y, ignore))
    a, v = _pair()
    kwargs = {} if ignore == -100 else {"ignore_index": ignore}
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 0.8, method="ogm", **kwargs)
    mod.step({"a": za, "v": zv}, y)
    rows = [b for b in range(batch) if ignore is None or keep[b]]
    want = [
        sum(math.exp(z[b, y[b]].item()) / z[b].exp().sum().item() for b in rows)
        for z in (za.double(), zv.double())
    ]
    torch.testing.assert_close(mod.last.scores, torch.tensor(want, dtype=torch.float32))
    assert float(mod.last.num_samples) == len(rows)


def test_ignore_index_none_refuses_the_default_marker() -> None:
    a, v = _pair()
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 0.8, ignore_index=None)
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        mod.step({"a": z, "v": z}, torch.tensor([0, -100]))


# ---------------------------------------------------------------------------- 8. GE noise


def test_ge_noise_is_the_seeded_draw_times_the_unbiased_std() -> None:
    """g_new = k_m g + std(g) z_p, z the seed's generator's one draw split in parameter order."""
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (1, 1), (4, 3, 2), (6, 1)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32]  # mixed dtypes
    params = [nn.Parameter(torch.zeros(s, dtype=d)) for s, d in zip(shapes, dtypes, strict=True)]
    grads = [
        (torch.randn(s, generator=g) * (i + 1) + i).to(d)
        for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))
    ]
    grads[3] = torch.zeros(6, 1)  # an all-zero gradient: no noise
    grads[0] = grads[0].t().contiguous().t()  # a non-contiguous gradient
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.clone()
    mod = ModalityGradientModulator({"a": params[:2], "v": params[2:]}, 1.0, seed=21)
    logits, y = _two_logits()
    mod.step({"a": logits["a"], "v": logits["v"]}, y)
    k = [_k_paper(1.7 / 0.5, 1.0), 1.0]
    z = torch.randn(sum(math.prod(s) for s in shapes), generator=torch.Generator().manual_seed(21))
    start = 0
    for i, (p, gr) in enumerate(zip(params, grads, strict=True)):
        n = gr.numel()
        x = gr.double().reshape(-1)
        std = 0.0 if n == 1 else math.sqrt(((x - x.mean()) ** 2).sum().item() / (n - 1))
        want = k[0 if i < 2 else 1] * gr.double() + std * z[start : start + n].double().view(
            gr.shape
        )
        assert p.grad.dtype == gr.dtype
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-6)
        start += n
    assert torch.equal(params[3].grad, torch.zeros(6, 1))


# ---------------------------------------------------------------------------- 5 + 7. DDP


def _ddp_body(rank: int, world: int) -> dict[str, object]:
    torch.manual_seed(0)
    a, v = _pair()
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 1.0, method="ogm")
    out: dict[str, object] = {}
    g = torch.Generator().manual_seed(5)
    za, zv = torch.randn(6, 3, generator=g) * 3, torch.randn(6, 3, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    empty = {"a": torch.zeros(0, 3), "v": torch.zeros(0, 3)}
    y0 = torch.zeros(0, dtype=torch.long)

    def attempt(logits: dict[str, Tensor], target: Tensor) -> str:
        try:
            mod.step(logits, target)
        except (RuntimeError, ValueError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
        return "ok"

    # 7. bad input on rank 1 only: both raise in the same call, nobody hangs
    bad = {"a": za, "v": zv.clone()}
    if rank == 1:
        bad["v"][0, 0] = float("nan")
    out["nan"] = attempt(bad, y)
    out["int"] = attempt({"a": za, "v": zv.long() if rank == 1 else zv}, y)
    out["target"] = attempt({"a": za, "v": zv}, y if rank == 0 else y + 5)
    out["count_after_failures"] = mod.step_count
    # 5. rank 1 empty among a non-empty rank: same global coefficients, applied on rank 1 too
    a.grad, v.grad = torch.ones(3, 4), torch.ones(3, 4)
    k = mod.step({"a": za, "v": zv}, y) if rank == 0 else mod.step(empty, y0)
    out["k_uneven"] = k
    out["grad_uneven"] = a.grad.clone()
    out["samples_uneven"] = mod.last.num_samples
    # 5. every rank empty: a no-op on both
    record, count = mod.last, mod.step_count
    a.grad.add_(1.0)
    grad = a.grad.clone()
    k_empty = mod.step(empty, y0) if rank == 0 else mod.step()
    out["empty_noop"] = (
        torch.equal(k_empty, torch.ones(2))
        and mod.last is record
        and mod.step_count == count
        and torch.equal(a.grad, grad)
    )
    # the collectives are still paired: a normal step on both ranks
    half = slice(rank * 3, rank * 3 + 3)
    out["k_after"] = mod.step({"a": za[half], "v": zv[half]}, y[half])
    return out


def test_ddp_failing_rank_and_empty_ranks() -> None:
    r0, r1 = run_distributed(_ddp_body)
    for key, err in (("nan", "ValueError"), ("int", "TypeError"), ("target", "ValueError")):
        assert r1[key].startswith(err), r1[key]
        assert r0[key].startswith("RuntimeError") and "another rank" in r0[key], r0[key]
    assert r0["count_after_failures"] == r1["count_after_failures"] == 0
    # one process on rank 0's batch decides for both
    g = torch.Generator().manual_seed(5)
    za, zv = torch.randn(6, 3, generator=g) * 3, torch.randn(6, 3, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    s = [torch.softmax(z.double(), 1)[torch.arange(6), y].sum().item() for z in (za, zv)]
    rho = [s[0] / s[1], s[1] / s[0]]
    want = torch.tensor([_k_paper(r, 1.0) for r in rho])
    for r in (r0, r1):
        torch.testing.assert_close(r["k_uneven"], want)
        torch.testing.assert_close(r["grad_uneven"], torch.full((3, 4), float(want[0])))
        assert float(r["samples_uneven"]) == 6
        assert r["empty_noop"] is True
        torch.testing.assert_close(r["k_after"], want)
