"""PMRLoss: prototypes, prototypical cross-entropy, ratio, coefficients, entropy, state, DDP."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses.methods.pmr import (
    PMRLoss,
    PMRRecord,
    entropy_weights,
    prototype_entropy,
    prototype_logits,
    prototypical_cross_entropy,
    rebalance_coefficients,
)
from tests.ddp import run_distributed

NAMES = ["audio", "visual", "text"]

# ----------------------------------------------------------------------------------------------
# independent reference formulas (Python floats / float64 loops, written from the paper)


def ref_means(x: Tensor, y: Tensor, classes: int) -> tuple[list[list[float] | None], list[int]]:
    out: list[list[float] | None] = []
    counts = []
    for k in range(classes):
        rows = [x[b].double().tolist() for b in range(len(y)) if int(y[b]) == k]
        counts.append(len(rows))
        out.append([sum(col) / len(rows) for col in zip(*rows, strict=True)] if rows else None)
    return out, counts


def ref_probs(x: Tensor, protos: Tensor) -> list[list[float]]:
    """softmax_k(-||x_b - c_k||) for each sample, by hand."""
    out = []
    for b in range(x.shape[0]):
        d = [math.sqrt(sum((float(x[b, j]) - float(c[j])) ** 2 for j in range(x.shape[1])))
             for c in protos]  # fmt: skip
        e = [math.exp(-v) for v in d]
        out.append([v / sum(e) for v in e])
    return out


def ref_step(
    feats: dict[str, Tensor], protos: dict[str, Tensor], y: Tensor, alpha: float, mu: float,
    rule: str = "code",
) -> dict[str, list[float]]:  # fmt: skip
    """Scores, one-vs-rest ratios, coefficients, entropy weights, PCE and entropy per modality."""
    names = list(feats)
    p = {m: ref_probs(feats[m], protos[m]) for m in names}
    n = len(y)
    s = [sum(p[m][b][int(y[b])] for b in range(n)) for m in names]
    mm = len(names)
    rho = [s[i] / (sum(s[k] for k in range(mm) if k != i) / (mm - 1)) for i in range(mm)]
    if rule == "graded":
        beta = [alpha * min(max(1 / r - 1, 0.0), 1.0) for r in rho]
    else:  # the official code: a constant alpha on every slower modality
        beta = [alpha if r < 1 else 0.0 for r in rho]
    eta = [mu * min(max(r - 1, 0.0), 1.0) for r in rho]
    pce = [-sum(math.log(p[m][b][int(y[b])]) for b in range(n)) / n for m in names]
    ent = [sum(-sum(q * math.log(q) for q in p[m][b]) for b in range(n)) / n for m in names]
    return {"scores": [v / n for v in s], "ratios": rho, "coefficients": beta,
            "entropy_weights": eta, "pce": pce, "entropy": ent}  # fmt: skip


def make(
    m: int = 2, classes: int = 3, dim: int = 4, n: int = 24, seed: int = 0, scale: float = 1.0
) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(m, classes, dim, generator=g) * 2
    feats = {
        NAMES[i]: centres[i][y] + scale * (i + 1) * torch.randn(n, dim, generator=g)
        for i in range(m)
    }
    return feats, y


def ready(m: int = 2, classes: int = 3, dim: int = 4, **kw: Any) -> tuple[PMRLoss, dict, Tensor]:
    feats, y = make(m, classes, dim)
    pmr = PMRLoss(classes, {NAMES[i]: dim for i in range(m)}, **kw)
    pmr.update_prototypes([(feats, y)])
    return pmr, feats, y


def close(got: Tensor, want: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=tol, atol=tol)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# prototypes


@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 40), st.integers(1, 5), st.integers())
def test_prototypes_equal_class_means(
    classes: int, dim: int, n: int, chunks: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed % 2**31)
    y = torch.randint(0, classes, (n,), generator=g)
    x = {"audio": torch.randn(n, dim, generator=g), "visual": torch.randn(n, dim + 1, generator=g)}
    pmr = PMRLoss(classes, {"audio": dim, "visual": dim + 1})
    batches = [({m: t[i::chunks] for m, t in x.items()}, y[i::chunks]) for i in range(chunks)]
    if n == 0:
        with pytest.raises(RuntimeError, match="no samples"):
            pmr.update_prototypes(batches)
        return
    present = pmr.update_prototypes(batches)
    for m in x:
        want, counts = ref_means(x[m], y, classes)
        for k in range(classes):
            assert bool(present[k]) == (counts[k] > 0) == bool(pmr.known[k])
            if want[k] is None:
                assert torch.equal(pmr.prototypes[m][k], torch.zeros(x[m].shape[1]))
            else:
                close(pmr.prototypes[m][k], want[k])


def test_momentum_blend_and_absent_class_keeps_its_prototype() -> None:
    feats, y = make(classes=3, n=30)
    pmr = PMRLoss(3, {"audio": 4, "visual": 4}, momentum=0.2)
    pmr.update_prototypes([(feats, y)])
    old = {m: p.clone() for m, p in pmr.prototypes.items()}
    new_feats, _ = make(classes=3, n=30, seed=5)
    keep = y != 2  # class 2 absent from the second sample
    pmr.update_prototypes([({m: t[keep] for m, t in new_feats.items()}, y[keep])])
    for m in feats:
        new, _ = ref_means(new_feats[m][keep], y[keep], 3)
        for k in (0, 1):
            want = [0.8 * a + 0.2 * b for a, b in zip(new[k], old[m][k].tolist(), strict=True)]
            close(pmr.prototypes[m][k], want)
        assert torch.equal(pmr.prototypes[m][2], old[m][2])  # no 0/0, no change
    assert pmr.updates == 2


# ----------------------------------------------------------------------------------------------
# formulas


@given(st.integers(1, 6), st.integers(2, 5), st.integers(1, 4), st.integers())
def test_prototype_logits_and_cross_entropy_match_hand_formula(
    n: int, classes: int, dim: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed % 2**31)
    x, c = torch.randn(n, dim, generator=g), torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    z = prototype_logits(x, c)
    for b in range(n):
        for k in range(classes):
            d = math.sqrt(sum((float(x[b, j]) - float(c[k, j])) ** 2 for j in range(dim)))
            assert float(z[b, k]) == pytest.approx(-d, rel=1e-5, abs=1e-5)
    p = ref_probs(x, c)
    want = -sum(math.log(p[b][int(y[b])]) for b in range(n)) / n
    assert float(prototypical_cross_entropy(z, y)) == pytest.approx(want, rel=1e-5, abs=1e-6)
    ent = sum(-sum(q * math.log(q) for q in p[b]) for b in range(n)) / n
    assert float(prototype_entropy(z)) == pytest.approx(ent, rel=1e-5, abs=1e-6)


@given(st.lists(st.floats(0.01, 50.0), min_size=2, max_size=5), st.floats(0.0, 3.0))
def test_coefficient_formulas(rho: list[float], alpha: float) -> None:
    r = torch.tensor(rho, dtype=torch.float64)
    graded = [alpha * min(max(1 / v - 1, 0), 1) for v in rho]
    close(rebalance_coefficients(r, alpha, "graded"), graded, 1e-9)
    close(rebalance_coefficients(r, alpha, "code"), [alpha if v < 1 else 0.0 for v in rho], 1e-12)
    close(rebalance_coefficients(r, alpha), [alpha if v < 1 else 0.0 for v in rho], 1e-12)
    close(entropy_weights(r, alpha), [alpha * min(max(v - 1, 0), 1) for v in rho], 1e-9)


def test_coefficients_never_nan_at_zero_scores() -> None:
    r = torch.tensor([0.0, float("inf")])
    assert torch.equal(rebalance_coefficients(r, 2.0, "graded"), torch.tensor([2.0, 0.0]))
    assert torch.equal(rebalance_coefficients(r, 2.0, "code"), torch.tensor([2.0, 0.0]))
    assert torch.equal(entropy_weights(r, 1.0), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("rule", ["graded", "code", None])
def test_loss_and_record_match_the_formulas(m: int, rule: str | None) -> None:
    """``None``: the default, which must be the official code's rule."""
    pmr, _, _ = ready(m, alpha=0.7, mu=0.3, **({} if rule is None else {"coefficient": rule}))
    feats, y = make(m, seed=3)
    logits = torch.randn(len(y), 3)
    loss = pmr(logits, y, feats)
    want = ref_step(feats, pmr.prototypes, y, 0.7, 0.3, rule or "code")
    rec = pmr.last
    assert isinstance(rec, PMRRecord) and rec.modalities == tuple(NAMES[:m])
    for field in ("scores", "ratios", "coefficients", "entropy_weights"):
        close(getattr(rec, field), want[field])
        assert getattr(rec, field).dtype == torch.float32
    if m == 2:  # exact two-modality ratio
        assert want["ratios"][0] == pytest.approx(want["scores"][0] / want["scores"][1])
        assert float(rec.ratios[0] * rec.ratios[1]) == pytest.approx(1.0, rel=1e-6)
    total = float(F.cross_entropy(logits.double(), y))
    total += sum(b * p for b, p in zip(want["coefficients"], want["pce"], strict=True))
    total -= sum(e * h for e, h in zip(want["entropy_weights"], want["entropy"], strict=True))
    assert float(loss) == pytest.approx(total, rel=1e-5)


def test_default_coefficient_is_the_official_codes_constant_alpha() -> None:
    """Two modalities, audio ahead: the default gives the slow one exactly alpha, the graded
    rule alpha * min(rho_audio - 1, 1) (here below alpha), and 'paper' is graded's old name."""
    assert PMRLoss(3, {"audio": 4, "visual": 4}).coefficient == "code"
    feats, y = make(seed=3)
    default, _, _ = ready(alpha=0.7, mu=0.0)
    graded, _, _ = ready(alpha=0.7, mu=0.0, coefficient="graded")
    for pmr in (default, graded):
        pmr(torch.randn(len(y), 3), y, feats)
    s = default.last.scores.tolist()  # type: ignore[union-attr]
    slow, fast = (0, 1) if s[0] < s[1] else (1, 0)
    rho_fast = s[fast] / s[slow]
    assert 1 < rho_fast < 2  # so the two rules differ on this batch
    want = [0.0, 0.0]
    want[slow] = 0.7
    close(default.last.coefficients, want)  # type: ignore[union-attr]
    want[slow] = 0.7 * (rho_fast - 1)
    close(graded.last.coefficients, want)  # type: ignore[union-attr]
    with pytest.warns(DeprecationWarning, match="coefficient='graded'"):
        old = PMRLoss(3, {"audio": 4, "visual": 4}, coefficient="paper")  # type: ignore[arg-type]
    assert old.coefficient == "graded"
    r = torch.tensor([1.5, 1 / 1.5])
    with pytest.warns(DeprecationWarning, match="rule='graded'"):
        assert torch.equal(rebalance_coefficients(r, 1.0, "paper"), torch.tensor([0.0, 0.5]))


def test_identity_settings_reduce_to_plain_cross_entropy() -> None:
    feats, y = make(seed=4)
    logits = torch.randn(len(y), 3)
    ce = F.cross_entropy(logits, y)
    pmr, _, _ = ready(alpha=0.0, mu=0.0)
    assert torch.equal(pmr(logits, y, feats), ce)
    pmr, _, _ = ready(modulation=(2, 5))  # before the window: no statistics, no step
    assert torch.equal(pmr(logits, y, feats), ce) and pmr.steps == 0 and pmr.last is None
    pmr.set_epoch(6)
    assert torch.equal(pmr(logits, y, feats), ce) and pmr.steps == 0
    pmr.set_epoch(3)
    pmr.eval()
    assert torch.equal(pmr(logits, y, feats), ce) and pmr.steps == 0
    # before any prototypes, outside the window is fine; inside it is a clear error
    fresh = PMRLoss(3, {"audio": 4, "visual": 4}, modulation=(1, None))
    assert torch.equal(fresh(logits, y, feats), ce)
    fresh.set_epoch(1)
    with pytest.raises(RuntimeError, match="no prototypes yet"):
        fresh(logits, y, feats)


def test_training_mode_without_gradients_warns_and_acts_as_eval() -> None:
    """The base's mode decision (Remedy): no statistics, no step, no collective under no_grad."""
    pmr, feats, y = ready()
    logits = torch.randn(len(y), 3)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="PMRLoss: gradients disabled"):
        loss = pmr(logits, y, feats)
    assert torch.equal(loss, F.cross_entropy(logits, y)) and pmr.steps == 0 and pmr.last is None
    pmr(logits, y, feats)
    assert pmr.steps == 1 and set(pmr.state_dict()["_extra_state"]) == {"epoch", "steps", "last"}


def test_entropy_window() -> None:
    pmr, feats, y = ready(mu=0.5, entropy_epochs=2, modulation=(1, None))
    logits = torch.randn(len(y), 3)
    pmr.set_epoch(2)
    pmr(logits, y, feats)
    assert bool((pmr.last.entropy_weights > 0).any())  # type: ignore[union-attr]
    pmr.set_epoch(3)
    pmr(logits, y, feats)
    assert torch.equal(pmr.last.entropy_weights, torch.zeros(2))  # type: ignore[union-attr]
    assert pmr.last.epoch == 3  # type: ignore[union-attr]


@pytest.mark.parametrize("rule", ["graded", "code"])
def test_gradient_flows_only_where_it_should(rule: str) -> None:
    pmr, _, _ = ready(alpha=1.0, mu=0.5, coefficient=rule)
    feats, y = make(seed=7)
    x = {m: t.clone().requires_grad_() for m, t in feats.items()}
    logits = torch.randn(len(y), 3, requires_grad=True)  # independent of the features
    pmr(logits, y, x).backward()
    want = ref_step(feats, pmr.prototypes, y, 1.0, 0.5, rule)
    slow, fast = (0, 1) if want["ratios"][0] < 1 else (1, 0)
    names = list(feats)
    # slow modality: only beta * grad L_p; fast: only -eta * grad E
    xs = feats[names[slow]].clone().requires_grad_()
    ref = prototypical_cross_entropy(prototype_logits(xs, pmr.prototypes[names[slow]]), y)
    (g_slow,) = torch.autograd.grad(want["coefficients"][slow] * ref, xs)
    xf = feats[names[fast]].clone().requires_grad_()
    ref = prototype_entropy(prototype_logits(xf, pmr.prototypes[names[fast]]))
    (g_fast,) = torch.autograd.grad(-want["entropy_weights"][fast] * ref, xf)
    torch.testing.assert_close(x[names[slow]].grad, g_slow, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x[names[fast]].grad, g_fast, rtol=1e-4, atol=1e-6)
    assert want["coefficients"][fast] == 0 and want["entropy_weights"][slow] == 0
    assert all(not p.requires_grad for p in pmr.prototypes.values())
    assert list(pmr.parameters()) == []


def test_ignore_index_and_unknown_classes_are_left_out() -> None:
    feats, y = make(classes=3, n=30)
    pmr = PMRLoss(3, {"audio": 4, "visual": 4})
    pmr.update_prototypes([(feats, y.masked_fill(y == 2, -100))])  # class 2 never seen
    assert pmr.known.tolist() == [True, True, False]
    logits = torch.randn(30, 3)
    y_ign = y.masked_fill(torch.arange(30) < 3, -100)
    loss = pmr(logits, y_ign, feats)
    assert torch.isfinite(loss)
    keep = (y_ign != -100) & (y_ign != 2)
    protos = {m: p[:2] for m, p in pmr.prototypes.items()}
    want = ref_step({m: t[keep] for m, t in feats.items()}, protos, y[keep], 1.0, 0.1)
    close(pmr.last.scores, want["scores"])  # type: ignore[union-attr]
    close(pmr.last.prototype_losses, want["pce"])  # type: ignore[union-attr]


def test_an_ignore_index_beyond_the_classes_is_left_out_too() -> None:
    """E.g. ``CrossEntropyLoss(ignore_index=255)``: 255 must never be used as a class index."""
    feats, y = make(classes=3, n=30)
    pmr = PMRLoss(
        3, {"audio": 4, "visual": 4}, nn.CrossEntropyLoss(ignore_index=255), ignore_index=255
    )
    pmr.update_prototypes([(feats, y)])
    y_ign = y.masked_fill(torch.arange(30) < 4, 255)
    loss = pmr(torch.randn(30, 3), y_ign, feats)
    assert torch.isfinite(loss)
    keep = y_ign != 255
    want = ref_step({m: t[keep] for m, t in feats.items()}, pmr.prototypes, y[keep], 1.0, 0.1)
    close(pmr.last.scores, want["scores"])  # type: ignore[union-attr]


def test_default_criterion_honours_a_custom_ignore_index() -> None:
    """``ignore_index=-1`` reaches the default criterion: mean over kept samples of -log p_y."""
    feats, y = make(classes=3, n=30)
    pmr = PMRLoss(3, {"audio": 4, "visual": 4}, ignore_index=-1, alpha=0.0, mu=0.0)
    pmr.update_prototypes([(feats, y)])
    logits = torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    y_ign = y.masked_fill(torch.arange(30) % 4 == 0, -1)
    kept = [b for b in range(30) if int(y_ign[b]) != -1]
    want = -sum(math.log(float(torch.softmax(logits[b].double(), 0)[int(y[b])])) for b in kept)
    assert float(pmr(logits, y_ign, feats)) == pytest.approx(want / len(kept), rel=1e-6)


def _all_ignored_zero_gradients(
    pmr: PMRLoss, feats: dict[str, Tensor], n: int, *, modulated: bool = True
) -> float:
    """The loss on a batch whose every target is -100; checks that every gradient is exactly 0.

    Outside the modulation window (and in eval mode) the features are not in the graph at all.
    """
    x = {m: t.clone().requires_grad_() for m, t in feats.items()}
    logits = torch.randn(n, 3, requires_grad=True)
    loss = pmr(logits, torch.full((n,), -100), x)
    assert loss.requires_grad  # part of the graph: backward works, and is "no step"
    loss.backward()
    for t in (logits, *x.values()) if modulated else (logits,):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    return float(loss.detach())


@pytest.mark.parametrize(
    "criterion",
    [
        None,
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(torch.tensor([1, 2, 3.0])),
    ],
)
@pytest.mark.parametrize("rule", ["graded", "code"])
def test_every_target_ignored_is_a_zero_loss_with_zero_gradients(
    criterion: nn.Module | None, rule: str
) -> None:
    """Was NaN (the criterion's 0 / 0). Training (in the window, with the entropy term), eval."""
    pmr, feats, y = ready(alpha=0.7, mu=0.3, coefficient=rule, criterion=criterion)
    assert _all_ignored_zero_gradients(pmr, feats, len(y)) == 0.0
    rec = pmr.last  # no sample counted anywhere: s = 0, rho = 0 / 0 := 1, beta = eta = 0
    assert rec is not None
    assert torch.equal(rec.scores, torch.zeros(2)) and torch.equal(rec.ratios, torch.ones(2))
    assert torch.equal(rec.coefficients, torch.zeros(2))
    assert torch.equal(rec.entropy_weights, torch.zeros(2))
    assert torch.equal(rec.prototype_losses, torch.zeros(2))
    pmr.eval()
    assert _all_ignored_zero_gradients(pmr, feats, len(y), modulated=False) == 0.0
    pmr.train()
    pmr.modulation = (5, None)  # outside the window: the criterion alone, still 0
    assert _all_ignored_zero_gradients(pmr, feats, len(y), modulated=False) == 0.0
    # the next batch with samples is unaffected: the full formula again
    pmr.modulation = (0, None)
    logits = torch.randn(len(y), 3)
    want = ref_step(feats, pmr.prototypes, y, 0.7, 0.3, rule)
    total = float(F.cross_entropy(logits.double(), y)) if criterion is None else None
    loss = pmr(logits, y, feats)
    close(pmr.last.coefficients, want["coefficients"])  # type: ignore[union-attr]
    if total is not None:
        total += sum(b * q for b, q in zip(want["coefficients"], want["pce"], strict=True))
        total -= sum(e * h for e, h in zip(want["entropy_weights"], want["entropy"], strict=True))
        assert float(loss) == pytest.approx(total, rel=1e-5)


def test_prototypes_from_an_all_ignored_batch_are_never_nan() -> None:
    """An all-ignored batch adds nothing; alone it is a clear error and the prototypes stay."""
    feats, y = make(classes=3, n=30)
    ignored = torch.full_like(y, -100)
    pmr = PMRLoss(3, {"audio": 4, "visual": 4})
    pmr.update_prototypes([(feats, y), (make(classes=3, n=30, seed=8)[0], ignored)])
    for m in feats:  # the class means of the first batch only
        want, _ = ref_means(feats[m], y, 3)
        for k in range(3):
            close(pmr.prototypes[m][k], want[k])  # type: ignore[arg-type]
    before = {m: p.clone() for m, p in pmr.prototypes.items()}
    with pytest.raises(RuntimeError, match="no samples"):
        pmr.update_prototypes([(feats, ignored)])
    pmr.accumulate_prototypes(feats, ignored)
    with pytest.raises(RuntimeError, match="no samples"):
        pmr.compute_prototypes()
    for m, p in pmr.prototypes.items():
        assert torch.equal(p, before[m]) and bool(torch.isfinite(p).all())
    assert pmr.updates == 1 and pmr.known.all()
    # the refused sample left nothing pending: the next computation is the plain momentum blend
    new_feats, _ = make(classes=3, n=30, seed=5)
    pmr.update_prototypes([(new_feats, y)])
    for m in feats:
        new, _ = ref_means(new_feats[m], y, 3)
        for k in range(3):
            old = before[m][k].tolist()
            close(
                pmr.prototypes[m][k], [0.8 * a + 0.2 * b for a, b in zip(new[k], old, strict=True)]
            )  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# state, accumulation, AMP, empty batches, bad input


def _run(pmr: PMRLoss, steps: range) -> list[Tensor]:
    out = []
    for i in steps:
        feats, y = make(seed=100 + i)
        out.append(
            pmr(torch.randn(len(y), 3, generator=torch.Generator().manual_seed(i)), y, feats)
        )
        if i % 2:
            pmr.accumulate_prototypes(feats, y)
        if i % 3 == 2:
            pmr.compute_prototypes()
            pmr.set_epoch(pmr.epoch + 1)
    return out


def test_state_dict_round_trip_is_bit_for_bit() -> None:
    a, _, _ = ready(mu=0.2, entropy_epochs=2)
    _run(a, range(4))  # leaves pending class sums (step 3 accumulated, not computed)
    b = PMRLoss(3, {"audio": 4, "visual": 4}, mu=0.2, entropy_epochs=2)
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.steps, b.updates) == (a.epoch, a.steps, a.updates)
    for la, lb in zip(_run(a, range(4, 10)), _run(b, range(4, 10)), strict=True):
        assert torch.equal(la, lb)
    for m in a.prototypes:
        assert torch.equal(a.prototypes[m], b.prototypes[m])
    assert torch.equal(a.known, b.known)
    for f in ("scores", "ratios", "coefficients", "entropy_weights"):
        assert torch.equal(getattr(a.last, f), getattr(b.last, f))


@pytest.mark.parametrize("rule", ["graded", "code"])
def test_accumulation_one_coefficient_per_micro_batch_and_pooled_prototypes(rule: str) -> None:
    pmr, _, _ = ready(coefficient=rule)
    feats, y = make(n=24, seed=9)
    for chunk in range(3):
        part = {m: t[chunk * 8 : (chunk + 1) * 8] for m, t in feats.items()}
        pmr(torch.randn(8, 3), y[chunk * 8 : (chunk + 1) * 8], part)
        want = ref_step(part, pmr.prototypes, y[chunk * 8 : (chunk + 1) * 8], 1.0, 0.1, rule)
        close(pmr.last.coefficients, want["coefficients"])  # type: ignore[union-attr]
        pmr.accumulate_prototypes(part, y[chunk * 8 : (chunk + 1) * 8])
    whole = PMRLoss(3, {"audio": 4, "visual": 4}, momentum=0.0)
    whole.update_prototypes([(feats, y)])
    pmr.momentum = 0.0
    pmr.compute_prototypes()
    for m in feats:
        torch.testing.assert_close(pmr.prototypes[m], whole.prototypes[m])


def test_bf16_features_give_fp32_statistics() -> None:
    pmr, feats, y = ready()
    low = {m: t.bfloat16() for m, t in feats.items()}
    pmr.accumulate_prototypes(low, y)
    pmr.compute_prototypes()
    assert all(p.dtype == torch.float32 for p in pmr.prototypes.values())
    loss = pmr(torch.randn(len(y), 3), y, low)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    rec = pmr.last
    assert rec is not None and rec.scores.dtype == torch.float32
    want = ref_step({m: t.float() for m, t in low.items()}, pmr.prototypes, y, 1.0, 0.1)
    close(rec.ratios, want["ratios"])


def test_empty_batch_is_a_zero_loss_without_state_change() -> None:
    pmr, feats, y = ready()
    pmr(torch.randn(len(y), 3), y, feats)
    before = (pmr.steps, pmr.last)
    empty = {m: torch.zeros(0, 4, requires_grad=True) for m in feats}
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = pmr(logits, torch.zeros(0, dtype=torch.long), empty)
    assert float(loss.detach()) == 0.0 and (pmr.steps, pmr.last) == before
    loss.backward()


def test_bad_input_gives_clear_errors() -> None:
    pmr, feats, y = ready()
    logits = torch.randn(len(y), 3)
    with pytest.raises(
        ValueError, match=r"features\['visual'\] must have shape \[B, 4\].*got shape \(24, 5\)"
    ):
        pmr(logits, y, {"audio": feats["audio"], "visual": torch.randn(24, 5)})
    bad = feats["visual"].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"features\['visual'\] contains non-finite"):
        pmr(logits, y, {"audio": feats["audio"], "visual": bad})
    with pytest.raises(ValueError, match="missing \\['visual'\\]"):
        pmr(logits, y, {"audio": feats["audio"], "text": feats["visual"]})
    with pytest.raises(ValueError, match="batch"):
        pmr(logits[:5], y[:5], feats)
    with pytest.raises(TypeError, match="class-index"):
        pmr(logits, torch.rand(24), feats)
    with pytest.raises(ValueError, match="outside"):
        pmr(logits, y + 5, feats)
    with pytest.raises(ValueError, match="num_classes=3"):
        pmr(torch.randn(24, 4), y, feats)
    with pytest.raises(TypeError, match="floating point"):
        pmr(logits, y, {m: t.long() for m, t in feats.items()})
    with pytest.raises(ValueError, match=">= 2 modalities"):
        PMRLoss(3, {"audio": 4})
    with pytest.raises(ValueError, match="momentum"):
        PMRLoss(3, {"a": 4, "v": 4}, momentum=1.5)
    with pytest.raises(TypeError, match="entropy_epochs"):
        PMRLoss(3, {"a": 4, "v": 4}, entropy_epochs=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coefficient"):
        PMRLoss(3, {"a": 4, "v": 4}, coefficient="other")  # type: ignore[arg-type]
    assert pmr.steps == 0


# ----------------------------------------------------------------------------------------------
# DDP: two gloo processes equal one process on the global batch


def _ddp_body(rank: int, size: int, feats: dict[str, Tensor], y: Tensor) -> dict[str, Any]:
    half = {m: t[rank::size] for m, t in feats.items()}
    pmr = PMRLoss(3, {"audio": 4, "visual": 4}, mu=0.3)
    pmr.update_prototypes([(half, y[rank::size])])
    pmr.update_prototypes(
        [({m: t[: 2 * rank] for m, t in half.items()}, y[rank::size][: 2 * rank])]
    )
    step = {m: t + 0.5 for m, t in half.items()}
    pmr(torch.randn(len(y[rank::size]), 3), y[rank::size], step)
    empty = pmr(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long),
                {m: t[:0] for m, t in half.items()})  # fmt: skip
    return {"protos": pmr.prototypes, "last": pmr.last, "steps": pmr.steps, "empty": empty}


def test_ddp_equals_one_process_on_the_global_batch() -> None:
    feats, y = make(n=24, seed=11)
    r0, r1 = run_distributed(_ddp_body, feats, y)
    one = PMRLoss(3, {"audio": 4, "visual": 4}, mu=0.3)
    one.update_prototypes([(feats, y)])
    one.update_prototypes([({m: t[1::2][:2] for m, t in feats.items()}, y[1::2][:2])])
    one(torch.randn(24, 3), y, {m: t + 0.5 for m, t in feats.items()})
    for r in (r0, r1):
        assert r["steps"] == 1 and float(r["empty"]) == 0.0
        for m in feats:
            torch.testing.assert_close(r["protos"][m], one.prototypes[m])
        for f in ("scores", "ratios", "coefficients", "entropy_weights"):
            torch.testing.assert_close(getattr(r["last"], f), getattr(one.last, f))
    for f in ("ratios", "coefficients", "entropy_weights"):
        assert torch.equal(getattr(r0["last"], f), getattr(r1["last"], f))
