"""OPM (ModalityPredictionModulator) against formulas written out independently here."""

# Tests read optional records directly and call torch methods whose stubs are untyped.
# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,operator,attr-defined"

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import imbalance_losses.methods.opm as opm_module
from imbalance_losses import unimodal_logits
from imbalance_losses.core.running import Pooled
from imbalance_losses.methods.modulation import ModalityGradientModulator
from imbalance_losses.methods.opm import (
    ModalityPredictionModulator,
    OPMRecord,
    drop_factors,
    drop_probabilities,
    kept_mean,
    rescale_factor,
)
from tests.ddp import run_distributed

# ---------------------------------------------------------------------------- helpers


def logits_with_probabilities(p: list[float]) -> tuple[Tensor, Tensor]:
    """Two-class logits whose softmax gives probability ``p_b`` to the true class 0."""
    pt = torch.tensor(p, dtype=torch.float64)
    z = torch.stack([pt.log(), (1 - pt).log()], dim=1).float()
    return z, torch.zeros(len(p), dtype=torch.long)


def exact_ratios(scores: list[float]) -> list[Fraction]:
    """One-vs-rest ratios ``s_m / mean_{k != m} s_k`` in exact rational arithmetic."""
    fs = [Fraction(s) for s in scores]
    total, m = sum(fs), len(fs)
    return [s / ((total - s) / (m - 1)) for s in fs]


def expected_q(scores: list[float], q_base: float, lam: float) -> list[float]:
    """The paper's / official drop probability on the exact one-vs-rest ratio."""
    out = []
    for rho in exact_ratios(scores):
        out.append(min(q_base * (1 + lam * math.tanh(float(rho - 1))), 1.0) if rho > 1 else 0.0)
    return out


def feats(batch: int, widths: tuple[int, ...] = (3, 2), seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = "avt"
    return {names[i]: torch.randn(batch, d, generator=g) + 1.0 for i, d in enumerate(widths)}


def dominant_logits(batch: int, probs: tuple[float, ...]) -> tuple[dict[str, Tensor], Tensor]:
    """Unimodal logits where every sample gives modality m true-class probability probs[m]."""
    names = "avt"
    out = {}
    y = torch.zeros(batch, dtype=torch.long)
    for i, p in enumerate(probs):
        z, y = logits_with_probabilities([p] * batch)
        out[names[i]] = z
    return out, y


def make(m: int = 2, **kwargs: object) -> ModalityPredictionModulator:
    return ModalityPredictionModulator(list("avt"[:m]), **kwargs)


# ---------------------------------------------------------------------------- the formula


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    m=st.integers(2, 4),
    q_base=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 3.0),
)
def test_drop_probability_matches_formula(
    data: st.DataObject, m: int, q_base: float, lam: float
) -> None:
    """q_m from the module's record equals the formula on the one-vs-rest ratio of the scores."""
    probs = [data.draw(st.lists(st.floats(0.05, 0.95), min_size=3, max_size=3)) for _ in range(m)]
    scores = [math.fsum(p) for p in probs]
    # the module sums fp32 probabilities: stay clear of near-ties, where q jumps at rho = 1; an
    # exact tie stays a tie in fp32 only when the probabilities are the same, in the same order
    # (the same values summed in another order can land just off 1)
    same = len({tuple(p) for p in probs}) == 1
    assume(all((r == 1 and same) or abs(r - 1) > 1e-4 for r in exact_ratios(scores)))
    names = "avt"[:m] if m < 4 else "avtx"
    z = {}
    for name, p in zip(names, probs, strict=True):
        z[name], y = logits_with_probabilities(p)
    opm = ModalityPredictionModulator(list(names), q_base=q_base, lam=lam)
    x = {name: torch.randn(3, 2) for name in names}
    opm(x, y, unimodal_logits=z)
    want = torch.tensor(expected_q(scores, q_base, lam), dtype=torch.float32)
    torch.testing.assert_close(opm.last.drop_probabilities, want, atol=2e-6, rtol=1e-5)
    for i, r in enumerate(exact_ratios(scores)):
        if r <= 1:  # non-dominant: never dropped
            assert float(opm.last.drop_probabilities[i]) == 0.0
    # never every modality: at least one has q = 0
    assert (opm.last.drop_probabilities == 0).any()


@given(
    ratios=st.lists(st.floats(0.0, 200.0), min_size=2, max_size=5),
    q_base=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 5.0),
)
def test_drop_probabilities_function_properties(
    ratios: list[float], q_base: float, lam: float
) -> None:
    q = drop_probabilities(torch.tensor(ratios, dtype=torch.float64), q_base, lam)
    for r, qi in zip(ratios, q.tolist(), strict=True):
        # the lowest ratio is never dropped (exactly the formula for ratios of real scores)
        want = min(q_base * (1 + lam * math.tanh(r - 1)), 1.0) if r > max(1, min(ratios)) else 0.0
        assert qi == pytest.approx(want, abs=1e-12)
        assert 0.0 <= qi <= 1.0


@pytest.mark.parametrize("m", [2, 3])
def test_tie_drops_nothing(m: int) -> None:
    """Equal scores: q = 0 everywhere (for M = 3 the fp32 ratios round above 1: the guard)."""
    z = {}
    for name in "avt"[:m]:
        z[name], y = logits_with_probabilities([0.5, 0.5, 0.2815017039944568])
    opm = make(m, q_base=1.0, lam=0.0, p_exe=1.0)
    x = feats(3, (3, 2, 4)[:m])
    out = opm(x, y, unimodal_logits=z)
    assert torch.equal(opm.last.drop_probabilities, torch.zeros(m))
    assert float(opm.last.rescale) == 1.0 and bool(out.keep.all())
    for name, t in x.items():
        assert torch.equal(out.features[name], t)


@given(
    probs=st.lists(st.floats(0.01, 0.99), min_size=3, max_size=5),
    widths=st.lists(st.integers(1, 50), min_size=5, max_size=5),
)
def test_some_modality_is_never_dropped_and_rescale_is_finite(
    probs: list[float], widths: list[int]
) -> None:
    m = len(probs)
    names = "abcde"[:m]
    z = {}
    for name, p in zip(names, probs, strict=True):
        z[name], y = logits_with_probabilities([p] * 3)
    opm = ModalityPredictionModulator(list(names), q_base=1.0, lam=1.0, p_exe=1.0)
    out = opm(
        {n: torch.randn(3, d) for n, d in zip(names, widths[:m], strict=True)}, y, unimodal_logits=z
    )
    assert (opm.last.drop_probabilities == 0).any()
    assert torch.isfinite(opm.last.rescale) and bool(out.keep.all())


# ---------------------------------------------------------------------------- the draws


def test_empirical_drop_rate_matches_q_within_5_sigma() -> None:
    """Over many samples the dominant modality is dropped at rate q, the others never."""
    batch, calls = 4000, 10
    z, y = dominant_logits(batch, (0.9, 0.3, 0.4))
    opm = make(3, p_exe=1.0, seed=11)
    x = feats(batch, (3, 2, 4))
    dropped = torch.zeros(3)
    for _ in range(calls):
        out = opm(x, y, unimodal_logits=z)
        for i, name in enumerate(out.features):
            dropped[i] += (out.features[name] == 0).all(1).sum()
        assert bool(opm.last.executed) and bool(out.keep.all())
    scores = [0.9 * batch, 0.3 * batch, 0.4 * batch]
    q = expected_q(scores, 0.5, 0.5)
    assert q[1] == q[2] == 0.0
    n = batch * calls
    rate = float(dropped[0]) / n
    assert abs(rate - q[0]) < 5 * math.sqrt(q[0] * (1 - q[0]) / n), (rate, q[0])
    assert dropped[1] == 0 and dropped[2] == 0


def test_execute_rate_matches_p_exe() -> None:
    p_exe, calls = 0.7, 1200
    z, y = dominant_logits(2, (0.9, 0.2))
    opm = make(p_exe=p_exe, seed=5)
    x = feats(2)
    executed = 0
    for _ in range(calls):
        opm(x, y, unimodal_logits=z)
        executed += int(opm.last.executed)
    rate = executed / calls
    assert abs(rate - p_exe) < 5 * math.sqrt(p_exe * (1 - p_exe) / calls), rate


@pytest.mark.parametrize("p_exe", [0.0, 1.0])
def test_p_exe_bounds(p_exe: float) -> None:
    z, y = dominant_logits(64, (0.9, 0.2))
    opm = make(p_exe=p_exe, q_base=1.0)
    x = feats(64)
    for _ in range(5):
        out = opm(x, y, unimodal_logits=z)
        assert bool(opm.last.executed) == (p_exe == 1.0)
        if p_exe == 0.0:
            assert all(torch.equal(out.features[k], x[k]) for k in x)
        else:  # q = 1 for the dominant: every sample loses it
            assert bool((out.features["a"] == 0).all())


def _run(opm: ModalityPredictionModulator, calls: range) -> list[Tensor]:
    outs = []
    for t in calls:
        probs = (0.9, 0.3) if t % 2 == 0 else (0.2, 0.8)
        z, y = dominant_logits(16, probs)
        out = opm(feats(16, seed=t), y, unimodal_logits=z)
        outs.append(torch.cat([*out.features.values(), out.keep[:, None].float()], 1))
    return outs


def test_reproducible_from_seed_and_resumed_bit_for_bit() -> None:
    first = _run(make(seed=3), range(10))
    again = _run(make(seed=3), range(10))
    other = _run(make(seed=4), range(10))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # save after 5 calls, resume in a fresh module (another seed given: the state wins)
    opm = make(seed=3)
    _run(opm, range(5))
    state = opm.state_dict()
    resumed = make(seed=99)
    resumed.load_state_dict(state)
    assert resumed.step_count == 5
    assert all(
        torch.equal(a, b) for a, b in zip(first[5:], _run(resumed, range(5, 10)), strict=True)
    )


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _run(make(), range(3))
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------- the rescale


@given(
    q=st.lists(st.floats(0.0, 0.99), min_size=2, max_size=4),
    widths=st.lists(st.integers(1, 600), min_size=4, max_size=4),
)
def test_rescale_factor_formula(q: list[float], widths: list[int]) -> None:
    d = widths[: len(q)]
    theta = sum(di * qi for di, qi in zip(d, q, strict=True)) / sum(d)
    got = rescale_factor(torch.tensor(q, dtype=torch.float64), torch.tensor(d))
    assert float(got) == pytest.approx(1 / (1 - theta), rel=1e-12)
    assert float(got) >= 1.0


@given(
    data=st.data(),
    m=st.integers(2, 4),
    batch=st.integers(0, 6),
    execute=st.booleans(),
)
def test_drop_factors_formula(data: st.DataObject, m: int, batch: int, execute: bool) -> None:
    """delta = [u < q] and execute; f = (1 - delta) / (1 - theta) executed, else 1."""
    q = data.draw(st.lists(st.floats(0.0, 0.99), min_size=m, max_size=m))
    d = data.draw(st.lists(st.integers(1, 600), min_size=m, max_size=m))
    u = [data.draw(st.lists(st.floats(0.0, 0.999), min_size=m, max_size=m)) for _ in range(batch)]
    factors, dropped, scale = drop_factors(
        torch.tensor(q, dtype=torch.float64),
        torch.tensor(d),
        torch.tensor(u, dtype=torch.float64).reshape(batch, m),
        torch.tensor(execute),
    )
    theta = sum(di * qi for di, qi in zip(d, q, strict=True)) / sum(d)
    want_scale = 1 / (1 - theta) if execute else 1.0
    assert float(scale) == pytest.approx(want_scale, rel=1e-12)
    assert factors.shape == dropped.shape == (batch, m) and dropped.dtype == torch.bool
    for b in range(batch):
        for j in range(m):
            gone = execute and u[b][j] < q[j]
            assert bool(dropped[b, j]) == gone
            assert float(factors[b, j]) == pytest.approx(0.0 if gone else want_scale, rel=1e-6)


def test_kept_features_are_rescaled_and_dropped_ones_zeroed_values_and_gradients() -> None:
    """Kept features are x / (1 - theta), theta from the per-sample widths (3-D features too)."""
    batch = 200
    z, y = dominant_logits(batch, (0.3, 0.9))
    g = torch.Generator().manual_seed(1)
    a = torch.randn(batch, 3, generator=g).requires_grad_()
    v = torch.randn(batch, 2, 5, generator=g).requires_grad_()  # d_v = 10
    opm = make(p_exe=1.0, seed=2)
    out = opm({"a": a, "v": v}, y, unimodal_logits=z)
    scores = [0.3 * batch, 0.9 * batch]
    q = expected_q(scores, 0.5, 0.5)
    theta = (3 * q[0] + 10 * q[1]) / 13
    scale = 1 / (1 - theta)
    assert float(opm.last.rescale) == pytest.approx(scale, rel=1e-6)
    drop_v = (out.features["v"] == 0).flatten(1).all(1)
    assert 0 < int(drop_v.sum()) < batch
    torch.testing.assert_close(out.features["a"], a * scale)  # q_a = 0: rescaled only
    want_v = torch.where(drop_v[:, None, None], torch.zeros_like(v), v * scale)
    torch.testing.assert_close(out.features["v"], want_v)
    torch.testing.assert_close(opm.last.dropped, torch.tensor([0.0, drop_v.float().mean()]))
    # backward: the same factor (and zero for a dropped sample)
    (out.features["a"].sum() + out.features["v"].sum()).backward()
    torch.testing.assert_close(a.grad, torch.full_like(a, scale))
    want_gv = torch.where(drop_v[:, None, None], 0.0, scale) * torch.ones_like(v)
    torch.testing.assert_close(v.grad, want_gv)


def test_all_dropped_samples_are_excluded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's q never drops every modality; a q that does marks those samples in keep."""
    monkeypatch.setattr(
        opm_module, "drop_probabilities", lambda r, qb, lam: torch.full_like(r, 0.6)
    )
    batch = 400
    z, y = dominant_logits(batch, (0.9, 0.3))
    opm = make(p_exe=1.0, seed=4)
    out = opm(feats(batch), y, unimodal_logits=z)
    gone = torch.stack([(x == 0).all(1) for x in out.features.values()], 1).all(1)
    assert 0 < int(gone.sum()) < batch
    assert torch.equal(out.keep, ~gone)
    assert int(opm.last.removed) == int(gone.sum())
    losses = torch.arange(batch, dtype=torch.float32)
    want = losses[~gone].mean()
    torch.testing.assert_close(kept_mean(losses, out.keep), want)


@given(keep=st.lists(st.booleans(), min_size=0, max_size=20))
def test_kept_mean_formula(keep: list[bool]) -> None:
    losses = torch.arange(len(keep), dtype=torch.float64) + 1.0
    mask = torch.tensor(keep, dtype=torch.bool)
    kept = [float(l_) for l_, k in zip(losses, keep, strict=True) if k]
    want = sum(kept) / len(kept) if kept else 0.0
    assert float(kept_mean(losses, mask)) == pytest.approx(want)


# ---------------------------------------------------------------------------- modes and sharing


def test_eval_mode_and_no_grad_are_identity() -> None:
    z, y = dominant_logits(8, (0.9, 0.2))
    x = feats(8)
    opm = make(q_base=1.0, p_exe=1.0).eval()
    out = opm(x, y, unimodal_logits=z)
    assert all(out.features[k] is x[k] for k in x) and bool(out.keep.all())
    assert opm.step_count == 0 and opm.last is None
    opm.train()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="gradients are disabled"):
        out = opm(x, y, unimodal_logits=z)
    assert all(out.features[k] is x[k] for k in x) and opm.step_count == 0
    out = opm(x, y, unimodal_logits=z)  # training: the dominant modality is gone
    assert opm.step_count == 1 and bool((out.features["a"] == 0).all())


def test_warmup_counts_calls_and_records_scores() -> None:
    z, y = dominant_logits(8, (0.9, 0.2))
    x = feats(8)
    opm = make(q_base=1.0, p_exe=1.0, warmup_steps=3)
    for t in range(4):
        out = opm(x, y, unimodal_logits=z)
        assert opm.last.step == t and opm.last.active == (t >= 3)
        assert float(opm.last.drop_probabilities[0]) == 1.0
        assert bool(opm.last.executed) == (t >= 3)
        assert all(out.features[k] is x[k] for k in x) == (t < 3)


def test_scores_and_ratios_are_the_gradient_modulators() -> None:
    """One measurement: the same logits and target give bit-identical scores and ratios."""
    head = nn.Linear(9, 4)
    g = torch.Generator().manual_seed(0)
    x = {
        "a": torch.randn(10, 3, generator=g) * 3,
        "v": torch.randn(10, 2, generator=g),
        "t": torch.randn(10, 4, generator=g),
    }
    y = torch.randint(0, 4, (10,), generator=g)
    y[2] = -100  # ignored by both
    opm = ModalityPredictionModulator(list(x), head=head)
    opm(x, y)
    params = {k: [nn.Parameter(torch.ones(2, 2))] for k in x}
    for ps in params.values():
        ps[0].grad = torch.ones(2, 2)
    mod = ModalityGradientModulator(params, alpha=1.0, method="ogm")
    mod.step(unimodal_logits(head, x), y)
    assert torch.equal(opm.last.scores, mod.last.scores)
    assert torch.equal(opm.last.ratios, mod.last.ratios)
    assert torch.equal(opm.last.num_samples, mod.last.num_samples)
    # and they are the formula's
    s = [
        torch.softmax(z.double(), 1)[torch.arange(10), y.clamp_min(0)]
        for z in unimodal_logits(head, x).values()
    ]
    s = [float((p * (y != -100)).sum().detach()) for p in s]
    torch.testing.assert_close(opm.last.scores.double(), torch.tensor(s, dtype=torch.float64))


def test_head_and_given_logits_agree_and_the_head_gets_no_gradient() -> None:
    head = nn.Linear(5, 3)
    x = {k: t.requires_grad_() for k, t in feats(6).items()}
    y = torch.randint(0, 3, (6,))
    a, b = make(head=head, seed=1), make(seed=1)
    out_a = a(x, y)
    out_b = b(x, y, unimodal_logits=unimodal_logits(head, x))
    assert all(torch.equal(out_a.features[k], out_b.features[k]) for k in x)
    sum(o.sum() for o in out_a.features.values()).backward()
    assert head.weight.grad is None  # the scores are computed under no_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_features_keep_their_dtype(dtype: torch.dtype) -> None:
    head = nn.Linear(5, 3)
    y = torch.randint(0, 3, (32,))
    opm = make(head=head, p_exe=1.0)
    with torch.autocast("cpu", dtype=dtype):
        x = {k: t.to(dtype) for k, t in feats(32).items()}
        out = opm(x, y)
    assert all(out.features[k].dtype == dtype for k in x)
    assert opm.last.scores.dtype == torch.float32 and torch.isfinite(opm.last.scores).all()


def test_micro_batches_are_separate_calls() -> None:
    """Under gradient accumulation each micro-batch forward is one call with its own q."""
    opm = make(p_exe=1.0)
    for probs in ((0.9, 0.2), (0.2, 0.9)):
        z, y = dominant_logits(4, probs)
        opm(feats(4), y, unimodal_logits=z)
        dominant = 0 if probs[0] > probs[1] else 1
        assert float(opm.last.drop_probabilities[dominant]) > 0
        assert float(opm.last.drop_probabilities[1 - dominant]) == 0
    assert opm.step_count == 2


def test_empty_batch_is_a_no_op() -> None:
    opm = make(p_exe=1.0)
    z, y = dominant_logits(4, (0.9, 0.2))
    opm(feats(4), y, unimodal_logits=z)
    record = opm.last
    empty = {"a": torch.zeros(0, 3), "v": torch.zeros(0, 2)}
    out = opm(
        empty,
        torch.zeros(0, dtype=torch.long),
        unimodal_logits={"a": torch.zeros(0, 2), "v": torch.zeros(0, 2)},
    )
    assert out.keep.shape == (0,) and opm.step_count == 1 and opm.last is record
    assert all(out.features[k] is empty[k] for k in empty)


def test_record_to_dict() -> None:
    z, y = dominant_logits(4, (0.9, 0.2))
    opm = make()
    opm(feats(4), y, unimodal_logits=z)
    assert isinstance(opm.last, OPMRecord)
    d = opm.last.to_dict()
    assert {"scores/a", "drop_probabilities/v", "executed", "rescale", "removed"} <= set(d)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"q_base": 1.5}, ValueError, "q_base"),
        ({"q_base": -0.1}, ValueError, "q_base"),
        ({"lam": -1.0}, ValueError, "lam"),
        ({"p_exe": 2.0}, ValueError, "p_exe"),
        ({"p_exe": float("nan")}, ValueError, "p_exe"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"max_ratio": 1.0}, ValueError, "max_ratio"),
        ({"seed": True}, TypeError, "seed"),
        ({"lam": "1"}, TypeError, "lam"),
    ],
)
def test_constructor_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make(**kwargs)


def test_constructor_rejects_bad_modalities() -> None:
    with pytest.raises(TypeError, match="sequence of modality names"):
        ModalityPredictionModulator("av")
    with pytest.raises(ValueError, match="two distinct"):
        ModalityPredictionModulator(["a"])
    with pytest.raises(ValueError, match="two distinct"):
        ModalityPredictionModulator(["a", "a"])


def test_forward_rejects_bad_input() -> None:
    z, y = dominant_logits(4, (0.9, 0.2))
    opm = make()
    x = feats(4)
    with pytest.raises(ValueError, match="different order"):
        opm({"v": x["v"], "a": x["a"]}, y, unimodal_logits=z)
    with pytest.raises(ValueError, match="missing"):
        opm({"a": x["a"], "t": x["v"]}, y, unimodal_logits=z)
    with pytest.raises(TypeError, match=r"features\['v'\].*int64"):
        opm({"a": x["a"], "v": x["v"].long()}, y, unimodal_logits=z)
    with pytest.raises(ValueError, match="batch size mismatch"):
        opm({"a": x["a"], "v": x["v"][:3]}, y, unimodal_logits=z)
    with pytest.raises(ValueError, match="head="):
        opm(x, y)
    with pytest.raises(ValueError, match="unimodal_logits have batch 3"):
        opm(x, y, unimodal_logits={k: t[:3] for k, t in z.items()})
    with pytest.raises(ValueError, match="class indices outside"):
        opm(x, y + 7, unimodal_logits=z)
    bad = {"a": z["a"], "v": z["v"].clone()}
    bad["v"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opm(x, y, unimodal_logits=bad)
    with pytest.raises(TypeError, match="mapping"):
        opm([x["a"], x["v"]], y, unimodal_logits=z)
    assert opm.step_count == 0 and opm.last is None


def test_state_of_other_modalities_is_refused() -> None:
    state = make().state_dict()
    other = ModalityPredictionModulator(["a", "x"])
    with pytest.raises(ValueError, match="modalities"):
        other.load_state_dict(state)


def test_usage_in_a_loop_trains() -> None:
    """The documented loop runs end to end (kept_mean over the head's CE)."""
    torch.manual_seed(0)
    enc = nn.ModuleDict({"a": nn.Linear(4, 3), "v": nn.Linear(4, 2)})
    head = nn.Linear(5, 3)
    opm = make(head=head, p_exe=1.0)
    optim = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1)
    for _ in range(3):
        xa, xv, y = torch.randn(16, 4), torch.randn(16, 4), torch.randint(0, 3, (16,))
        out = opm({"a": enc["a"](xa), "v": enc["v"](xv)}, y)
        logits = head(torch.cat(list(out.features.values()), 1))
        loss = kept_mean(F.cross_entropy(logits, y, reduction="none"), out.keep)
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert opm.step_count == 3 and torch.isfinite(loss)


# ---------------------------------------------------------------------------- DDP


def _ddp_body(rank: int, world: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(7)
    steps, per = 6, 8
    z = torch.randn(steps, 2 * per, 2, 3, generator=g) * torch.tensor([3.0, 1.0])[:, None]
    y = torch.randint(0, 3, (steps, 2 * per), generator=g)
    x = torch.randn(steps, 2 * per, 5, generator=g)
    opm = ModalityPredictionModulator(["a", "v"], p_exe=0.5, seed=9)
    mine = slice(rank * per, (rank + 1) * per)
    out: dict[str, object] = {"q": [], "executed": [], "ratios": [], "masks": []}
    for t in range(steps):
        res = opm(
            {"a": x[t, mine, :3], "v": x[t, mine, 3:]},
            y[t, mine],
            unimodal_logits={"a": z[t, mine, 0], "v": z[t, mine, 1]},
        )
        out["q"].append(opm.last.drop_probabilities)
        out["executed"].append(opm.last.executed)
        out["ratios"].append(opm.last.ratios)
        out["masks"].append(torch.cat([(f == 0).all(1) for f in res.features.values()]))
    # a failing rank: both raise in the same call, the next call is paired again
    bad_y = y[0, mine] + (7 if rank == 1 else 0)
    try:
        opm(
            {"a": x[0, mine, :3], "v": x[0, mine, 3:]},
            bad_y,
            unimodal_logits={"a": z[0, mine, 0], "v": z[0, mine, 1]},
        )
        out["fail"] = "ok"
    except (RuntimeError, ValueError) as err:
        out["fail"] = f"{type(err).__name__}: {err}"
    out["count"] = opm.step_count
    return out


def test_ddp_same_q_and_execute_on_both_ranks_equal_to_one_process() -> None:
    r0, r1 = run_distributed(_ddp_body)
    g = torch.Generator().manual_seed(7)
    steps, per = 6, 8
    z = torch.randn(steps, 2 * per, 2, 3, generator=g) * torch.tensor([3.0, 1.0])[:, None]
    y = torch.randint(0, 3, (steps, 2 * per), generator=g)
    x = torch.randn(steps, 2 * per, 5, generator=g)
    one = ModalityPredictionModulator(["a", "v"], p_exe=0.5, seed=9)
    executed = []
    for t in range(steps):
        one(
            {"a": x[t, :, :3], "v": x[t, :, 3:]},
            y[t],
            unimodal_logits={"a": z[t, :, 0], "v": z[t, :, 1]},
        )
        s = [
            float(torch.softmax(z[t, :, i].double(), 1)[torch.arange(2 * per), y[t]].sum())
            for i in range(2)
        ]
        want = torch.tensor(expected_q(s, 0.5, 0.5), dtype=torch.float32)
        for r in (r0, r1):
            torch.testing.assert_close(r["q"][t], want, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(r["q"][t], one.last.drop_probabilities)
            assert bool(r["executed"][t]) == bool(one.last.executed)
        assert torch.equal(r0["q"][t], r1["q"][t]) and torch.equal(r0["ratios"][t], r1["ratios"][t])
        executed.append(bool(one.last.executed))
    assert any(executed) and not all(executed)  # both branches exercised
    # per-sample masks come from per-rank streams: not the same pattern on both ranks
    assert any(not torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"], strict=True))
    assert r1["fail"].startswith("ValueError"), r1["fail"]
    assert r0["fail"].startswith("RuntimeError") and "another rank" in r0["fail"], r0["fail"]
    assert r0["count"] == r1["count"] == steps


# ---------------------------------------------------------------------------- issue 19


def test_kept_mean_selects_out_excluded_samples_exactly() -> None:
    """``sum_{b kept} l_b / max(#kept, 1)``; a NaN / inf loss of an excluded sample is not in it."""
    losses = torch.tensor([1.0, float("nan"), 6.0, float("inf")], requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    out = kept_mean(losses, keep)
    assert out.item() == (1.0 + 6.0) / 2
    out.backward()
    assert losses.grad.tolist() == [0.5, 0.0, 0.5, 0.0]  # no NaN through the excluded ones
    nothing = torch.tensor([float("nan"), 2.0], requires_grad=True)
    zero = kept_mean(nothing, torch.tensor([False, False]))
    assert zero.item() == 0.0
    zero.backward()
    assert nothing.grad.tolist() == [0.0, 0.0]
    half = kept_mean(torch.tensor([1.0, 2.0], dtype=torch.float16), torch.tensor([True, True]))
    assert half.dtype == torch.float16 and half.item() == 1.5


def _grad_leaves(batch: int, seed: int = 0) -> dict[str, Tensor]:
    return {k: t.requires_grad_() for k, t in feats(batch, seed=seed).items()}


def test_repeated_call_is_the_same_step_and_the_same_drop() -> None:
    """The same tensors again before their backward: the first call's masks, no step counted."""
    z, y = dominant_logits(64, (0.9, 0.2))
    opm = make(q_base=0.5, lam=0.5, p_exe=1.0, seed=3)
    x = _grad_leaves(64)
    first = opm(x, y, unimodal_logits=z)
    assert opm.step_count == 1 and bool(first.keep.all())
    again = opm(x, y, unimodal_logits=z)
    assert opm.step_count == 1 and opm.last.step == 0
    for name in x:
        assert torch.equal(again.features[name], first.features[name])
    assert torch.equal(again.keep, first.keep)
    dropped = first.features["a"].abs().sum(1) == 0
    assert 0 < int(dropped.sum()) < 64  # the drop did happen (a real test of "the same")
    # both outputs back-propagate: the gradient is the sum of the two uses, each the mask /
    # (1 - theta) of the one decision
    (first.features["a"].sum() + again.features["a"].sum() + first.features["v"].sum()).backward()
    theta = (3 * float(opm.last.drop_probabilities[0])) / (3 + 2)
    expected = torch.where(dropped, 0.0, 2.0 / (1 - theta))
    torch.testing.assert_close(x["a"].grad, expected[:, None].expand(64, 3))
    # the backward ended the step: the same leaves again are a new step (new masks)
    opm(x, y, unimodal_logits=z)
    assert opm.step_count == 2 and opm.last.step == 1


def test_repeat_does_not_spend_the_warm_up() -> None:
    z, y = dominant_logits(8, (0.9, 0.2))
    opm = make(p_exe=1.0, warmup_steps=2)
    for _ in range(2):  # two steps, each called twice before its backward
        x = _grad_leaves(8)
        for _ in range(2):
            out = opm(x, y, unimodal_logits=z)
            assert out.features["a"] is x["a"]  # warm-up: identity
        sum(f.sum() for f in out.features.values()).backward()
    assert opm.step_count == 2 and not opm.last.active
    x = _grad_leaves(8)
    opm(x, y, unimodal_logits=z)
    assert opm.last.active and opm.step_count == 3


def test_micro_batches_are_not_repeats() -> None:
    """Gradient accumulation: new tensors per micro-batch, each one call (as before)."""
    z, y = dominant_logits(4, (0.9, 0.2))
    opm = make(p_exe=1.0)
    for i in range(3):
        opm(_grad_leaves(4, seed=i), y, unimodal_logits=z)  # no backward in between
    assert opm.step_count == 3
    plain = make(p_exe=1.0)
    x = feats(4)  # features that need no gradient: never tracked, every call counts
    for _ in range(3):
        plain(x, y, unimodal_logits=z)
    assert plain.step_count == 3


def test_repeat_survives_a_deep_copy_as_a_fresh_module() -> None:
    import copy

    z, y = dominant_logits(4, (0.9, 0.2))
    opm = make(p_exe=1.0)
    x = _grad_leaves(4)
    opm(x, y, unimodal_logits=z)
    twin = copy.deepcopy(opm)
    twin(x, y, unimodal_logits=z)  # a copy has no open step: a new call
    assert twin.step_count == 2 and opm.step_count == 1


def test_an_empty_rank_records_no_dropped_fraction_not_nan() -> None:
    # a DDP rank with no sample still completes the executed step's record (issue 22 review)
    opm = ModalityPredictionModulator(["audio", "visual"], p_exe=1.0)
    record = opm._formula(
        Pooled(torch.tensor([4.0, 1.0]), torch.tensor(5.0, dtype=torch.float64), None, False),
        ("audio", "visual"),
        True,
    )
    feats = {"audio": torch.zeros(0, 3), "visual": torch.zeros(0, 2)}
    factors, keep = opm._drop(record, feats, 0, torch.device("cpu"))
    assert factors.shape == (0, 2) and keep.shape == (0,)
    assert opm.last is not None and opm.last.dropped.tolist() == [0.0, 0.0]


def test_drop_factors_are_fp32_whatever_the_dtype_of_q() -> None:
    q = torch.tensor([0.5, 0.0], dtype=torch.float64)
    draws = torch.tensor([[0.2, 0.9], [0.7, 0.1]])
    factors, _, scale = drop_factors(q, torch.tensor([2, 2]), draws, torch.tensor(True))
    assert factors.dtype == torch.float32 and scale.dtype == torch.float64
    torch.testing.assert_close(factors, torch.tensor([[0.0, 4 / 3], [4 / 3, 4 / 3]]))


def test_a_repeat_of_an_earlier_open_call_keeps_that_calls_drop() -> None:
    """Two calls open at once (two micro-batches forwarded before any backward), then the first
    call's tensors again: the first call's drop (its masks, rescale and keep), not the latest
    call's (which, for another batch size, could not even be applied)."""
    z1, y1 = dominant_logits(64, (0.9, 0.2))
    z2, y2 = dominant_logits(48, (0.9, 0.2))
    opm = make(q_base=0.5, lam=0.5, p_exe=1.0, seed=3)
    x1, x2 = _grad_leaves(64, seed=1), _grad_leaves(48, seed=2)
    first = opm(x1, y1, unimodal_logits=z1)
    opm(x2, y2, unimodal_logits=z2)
    again = opm(x1, y1, unimodal_logits=z1)
    assert opm.step_count == 2
    for name in x1:
        assert torch.equal(again.features[name], first.features[name])
    assert torch.equal(again.keep, first.keep)
    dropped = first.features["a"].abs().sum(1) == 0
    assert 0 < int(dropped.sum()) < 64
    again.features["a"].sum().backward()
    q = expected_q([0.9, 0.2], 0.5, 0.5)[0]
    theta = 3 * q / (3 + 2)
    expected = torch.where(dropped, 0.0, 1.0 / (1 - theta))
    torch.testing.assert_close(x1["a"].grad, expected[:, None].expand(64, 3))
    # a mix of two open calls' tensors is neither call's drop: refused
    x3, x4 = _grad_leaves(8, seed=3), _grad_leaves(8, seed=4)
    z3, y3 = dominant_logits(8, (0.9, 0.2))
    opm(x3, y3, unimodal_logits=z3)
    opm(x4, y3, unimodal_logits=z3)
    with pytest.raises(ValueError, match=r"different calls"):
        opm({"a": x3["a"], "v": x4["v"]}, y3, unimodal_logits=z3)
