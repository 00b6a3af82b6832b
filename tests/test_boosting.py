"""SustainedBoostingLoss: loss formula, stop-gradient, assignment rule, growing heads, state, DDP.

Every expected value is computed here from the spec's formulas, reading the module's parameters
directly; nothing is compared with the module's own output computed another way.
"""

from __future__ import annotations

import importlib.util
import io
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import (
    BoostingRecord,
    StepRecord,
    SustainedBoostingLoss,
    assign_head,
    boosting_residual_loss,
    confidence_scores,
)
from imbalance_losses.methods.boosting import _choose_modality
from tests.ddp import run_distributed

WIDTHS = {"audio": 5, "visual": 7}

# Several tests grow heads with no optimiser at all; the binding reminder is tested elsewhere.
pytestmark = pytest.mark.filterwarnings(
    "ignore:SustainedBoostingLoss switched on a head:RuntimeWarning"
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: a second intra-op thread only adds contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _feats(batch: int, widths: dict[str, int] = WIDTHS, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in widths.items()}


def _head(boost: SustainedBoostingLoss, i: int, j: int, x: Tensor) -> Tensor:
    """z_mj = W2 relu(x W_mj^T + b_mj) + b2, from the module's parameters."""
    w, b = boost.head_weight[i][j], boost.head_bias[i][j]
    z: Tensor = boost.output_layer(torch.relu(x @ w.T + b))
    return z


def _ce_soft(z: Tensor, t: Tensor) -> Tensor:
    """Per-sample cross-entropy against a (possibly unnormalised) soft target."""
    return -(t * torch.log_softmax(z, dim=-1)).sum(-1)


def _expected_loss(
    boost: SustainedBoostingLoss, x: dict[str, Tensor], y: Tensor, *, stopgrad: bool = True
) -> Tensor:
    """The spec's L = sum_m [CE(Z_m) + CE(prev) + CE(z_n, y - lam y⊙p)] (official soft form)."""
    total = torch.zeros((), dtype=torch.float64)
    onehot = F.one_hot(y, boost.num_classes).to(x[boost.modalities[0]].dtype)
    for i, m in enumerate(boost.modalities):
        n = boost.num_heads[m]
        zs = [_head(boost, i, j, x[m]) for j in range(n)]
        ensemble = sum(zs[1:], zs[0])
        term = _ce_soft(ensemble, onehot).mean()
        if n > 1:
            prev = sum(zs[1:-1], zs[0])
            p = torch.softmax(prev, -1)
            if stopgrad:
                p = p.detach()
            term = term + _ce_soft(prev, onehot).mean()
            term = term + _ce_soft(zs[-1], onehot - boost.lam * onehot * p).mean()
        total = total + term
    return total


# --------------------------------------------------------------------------------- the loss
@given(
    batch=st.integers(1, 9),
    classes=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_one_head_is_plain_cross_entropy(batch: int, classes: int, seed: int) -> None:
    boost = SustainedBoostingLoss(classes, WIDTHS, hidden=6, seed=seed, check_every="manual")
    x = _feats(batch, seed=seed)
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    expected = sum(F.cross_entropy(_head(boost, i, 0, x[m]), y) for i, m in enumerate(WIDTHS))
    torch.testing.assert_close(boost(x, y), expected)


@given(
    logits=st.lists(st.floats(-8, 8), min_size=4, max_size=4),
    prev=st.lists(st.floats(-8, 8), min_size=4, max_size=4),
    label=st.integers(0, 3),
    lam=st.floats(0, 1),
)
def test_residual_identity_and_weight_bounds(
    logits: list[float], prev: list[float], label: int, lam: float
) -> None:
    z = torch.tensor(logits, dtype=torch.float64)
    p = torch.softmax(torch.tensor(prev, dtype=torch.float64), -1)
    y = F.one_hot(torch.tensor(label), 4).double()
    lhs = _ce_soft(z, y - lam * y * p)
    weight = 1 - lam * p[label]
    rhs = weight * F.cross_entropy(z[None], torch.tensor([label]))[()]
    torch.testing.assert_close(lhs, rhs)
    assert 1 - lam - 1e-12 <= float(weight) <= 1 + 1e-12


@pytest.mark.parametrize("heads", [(1, 1), (2, 1), (3, 2), (1, 3)])
def test_loss_equals_formula_for_several_heads(heads: tuple[int, int]) -> None:
    boost = SustainedBoostingLoss(
        4, WIDTHS, hidden=6, lam=0.3, seed=1, check_every="manual"
    ).double()
    for m, n in zip(WIDTHS, heads, strict=True):
        for _ in range(n - 1):
            boost.add_head(m)
    assert boost.num_heads == dict(zip(WIDTHS, heads, strict=True))
    x = {m: v.double() for m, v in _feats(10).items()}
    y = torch.arange(10) % 4
    torch.testing.assert_close(boost(x, y), _expected_loss(boost, x, y))
    # one-hot soft targets give the same loss as class indices
    torch.testing.assert_close(boost(x, F.one_hot(y, 4).double()), _expected_loss(boost, x, y))
    # head_logits and predict: the heads in order, prediction = sum_m alpha_m sum_j z_mj
    hl = boost.head_logits(x)
    for i, m in enumerate(WIDTHS):
        assert len(hl[m]) == boost.num_heads[m]
        for j, z in enumerate(hl[m]):
            torch.testing.assert_close(z, _head(boost, i, j, x[m]))
    fused = sum(0.5 * sum(hl[m][1:], hl[m][0]) for m in WIDTHS)
    torch.testing.assert_close(boost.predict(x), fused)


def test_stop_gradient_residual_sends_nothing_to_earlier_heads() -> None:
    boost = SustainedBoostingLoss(
        3, WIDTHS, hidden=6, lam=0.8, seed=2, check_every="manual"
    ).double()
    boost.add_head("audio")
    boost.add_head("audio")  # 3 heads: the residual is on head 2, earlier heads are 0 and 1
    x = {m: v.double() for m, v in _feats(12).items()}
    y = torch.arange(12) % 3
    weights = list(boost.head_weight[0])  # one parameter per head, active or not

    def grads(loss: Tensor) -> Tensor:
        gs = torch.autograd.grad(loss, weights, allow_unused=True)
        return torch.stack(
            [torch.zeros_like(w) if g is None else g for g, w in zip(gs, weights, strict=True)]
        )

    g_module = grads(boost(x, y))
    g_detached = grads(_expected_loss(boost, x, y))
    g_attached = grads(_expected_loss(boost, x, y, stopgrad=False))
    torch.testing.assert_close(g_module, g_detached)
    # the test can fail: without the stop-gradient the earlier heads' gradients differ
    assert not torch.allclose(g_module[:2], g_attached[:2], atol=1e-6)
    # the module's own residual term alone (its loss minus the eps_all + eps_pre terms) sends
    # no gradient to the earlier heads' first layers, but does reach the newest head
    onehot = F.one_hot(y, 3).double()
    zs = [_head(boost, 0, j, x["audio"]) for j in range(3)]
    others = _ce_soft(zs[0] + zs[1] + zs[2], onehot).mean() + _ce_soft(zs[0] + zs[1], onehot).mean()
    others = others + F.cross_entropy(_head(boost, 1, 0, x["visual"]), y)
    g_res = grads(boost(x, y) - others)
    assert g_res[:2].abs().max() < 1e-12
    assert g_res[2].abs().max() > 1e-4
    assert torch.equal(g_module[3:], torch.zeros_like(g_module[3:]))  # inactive heads


# --------------------------------------------------------------------------------- the rule
def _choose(scores: list[float], *, sigma: float, tau: float) -> tuple[int | None, list[float]]:
    choice, ratios = _choose_modality(
        torch.tensor(scores, dtype=torch.float64), sigma=sigma, tau=tau
    )
    return choice, ratios.tolist()


def _rule2(s1: float, s2: float, sigma: float, tau: float) -> int | None:
    r = s1 / s2
    return 1 if r > sigma + tau else 0 if r < sigma - tau else None


scores_st = st.floats(0.01, 1.0)


@given(s1=scores_st, s2=scores_st, sigma=st.floats(0.5, 2.0), tau=st.floats(0, 0.3))
def test_two_modality_rule(s1: float, s2: float, sigma: float, tau: float) -> None:
    choice, ratios = _choose([s1, s2], sigma=sigma, tau=tau)
    assert choice == _rule2(s1, s2, sigma, tau)
    assert ratios == pytest.approx([s1 / s2, s2 / s1])
    if sigma - tau <= s1 / s2 <= sigma + tau:  # dead zone
        assert choice is None


@given(s1=scores_st, s2=scores_st, tau=st.floats(0, 0.3))
def test_swapping_scores_swaps_the_modality(s1: float, s2: float, tau: float) -> None:
    a, _ = _choose([s1, s2], sigma=1.0, tau=tau)
    b, _ = _choose([s2, s1], sigma=1.0, tau=tau)
    r = s1 / s2
    outside = not (1 / (1 + tau) <= r <= 1 + tau) and not (1 - tau <= r <= 1 / (1 - tau))
    if outside:  # both r and 1/r outside the additive dead zone
        assert a is not None and b == 1 - a
    if a is not None and b is not None:
        assert b == 1 - a


def test_additive_dead_zone_is_not_symmetric_under_swapping() -> None:
    # r = 1.01005 is above 1 + tau, but 1/r = 0.990050 is not below 1 - tau: a band of width
    # about tau^2 where only one order of the same two scores gives a head (spec rule, kept)
    assert _choose([1.01005, 1.0], sigma=1.0, tau=0.01)[0] == 1
    assert _choose([1.0, 1.01005], sigma=1.0, tau=0.01)[0] is None


@given(
    scores=st.lists(scores_st, min_size=3, max_size=5),
    sigma=st.floats(0.5, 1.5),
    tau=st.floats(0, 0.3),
)
def test_many_modality_rule(scores: list[float], sigma: float, tau: float) -> None:
    choice, ratios = _choose(scores, sigma=sigma, tau=tau)
    m = len(scores)
    expected = [s / ((sum(scores) - s) / (m - 1)) for s in scores]
    assert ratios == pytest.approx(expected)
    smallest = min(expected)
    if smallest < sigma - tau - 1e-9:
        assert choice is not None and expected[choice] == pytest.approx(smallest)
    elif smallest > sigma - tau + 1e-9:
        assert choice is None
    # permuting the modalities permutes the choice (on a unique minimum)
    if expected.count(min(expected)) == 1 and choice is not None:
        rev, _ = _choose(scores[::-1], sigma=sigma, tau=tau)
        assert rev == m - 1 - choice


def test_zero_scores_do_not_give_nan() -> None:
    assert _choose([0.5, 0.0], sigma=1.0, tau=0.01)[0] == 1
    assert _choose([0.0, 0.0], sigma=1.0, tau=0.01)[0] is None
    assert _choose([0.0, 0.0, 0.0], sigma=1.0, tau=0.01)[0] is None


def _div(a: float, b: float) -> float:
    return (1.0 if a == 0 else math.inf) if b == 0 else a / b


@given(
    rounds=st.lists(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), max_size=12),
    max_heads=st.integers(1, 4),
    tau=st.floats(0.0, 0.2),
)
def test_check_over_score_sequences(rounds: list[list[float]], max_heads: int, tau: float) -> None:
    """Through the module: heads only at checks, +<= 1 per check, never down, cap, M > 2 rule."""
    names = ("rgb", "depth", "flow")
    boost = SustainedBoostingLoss(
        3, dict.fromkeys(names, 2), hidden=2, max_heads=max_heads, tau=tau, check_every="manual"
    )
    counts = [1, 1, 1]
    for raw in rounds:
        scores = torch.tensor(raw).tolist()  # fp32 values, as the module pools them
        boost._pool.add(torch.tensor(scores) * 4, 4)  # four samples with these mean scores
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = boost.check()
        ratios = [_div(s, (sum(scores) - s) / 2) for s in scores]
        low = min(range(3), key=lambda i: ratios[i])
        want = low if ratios[low] < 1.0 - tau else None
        if want is not None and counts[want] < max_heads:
            counts[want] += 1
            assert record.added_to == names[want] and record.capped is None and not caught
        elif want is not None:
            assert record.added_to is None and record.capped == names[want]
            assert any("max_heads" in str(w.message) for w in caught)
        else:
            assert record.added_to is None and record.capped is None
        assert list(boost.num_heads.values()) == counts == record.num_heads.tolist()
        assert int(record.head_added.sum()) == (record.added_to is not None)
        torch.testing.assert_close(record.scores, torch.tensor(scores))
    assert all(1 <= c <= max_heads for c in counts)


@given(seed=st.integers(0, 2**16), lam=st.floats(0, 1))
def test_soft_targets_follow_the_soft_formula(seed: int, lam: float) -> None:
    g = torch.Generator().manual_seed(seed)
    boost = SustainedBoostingLoss(
        4, WIDTHS, hidden=5, lam=lam, seed=seed, check_every="manual"
    ).double()
    boost.add_head("visual")
    x = {m: torch.randn(6, d, generator=g, dtype=torch.float64) for m, d in WIDTHS.items()}
    t = torch.softmax(2 * torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    a = _ce_soft(_head(boost, 0, 0, x["audio"]), t).mean()
    z0, z1 = _head(boost, 1, 0, x["visual"]), _head(boost, 1, 1, x["visual"])
    p = torch.softmax(z0, -1).detach()
    v = _ce_soft(z0 + z1, t).mean() + _ce_soft(z0, t).mean()
    v = v + _ce_soft(z1, t * (1 - lam * p)).mean()
    torch.testing.assert_close(boost(x, t), a + v)


def _weak_audio_data(batch: int = 24) -> tuple[dict[str, Tensor], Tensor]:
    """Audio is pure zeros (useless), visual is one-hot of the label (easy): audio is weak."""
    y = torch.arange(batch) % 3
    visual = F.one_hot(y, 3).float().repeat(1, 2) * 3 + 0.1 * torch.randn(batch, 6)
    return {"audio": torch.zeros(batch, 4), "visual": visual}, y


def test_heads_only_at_checks_never_decrease_and_cap_holds() -> None:
    x, y = _weak_audio_data()
    boost = SustainedBoostingLoss(
        3, {"audio": 4, "visual": 6}, hidden=8, check_every=3, max_heads=3
    )
    opt = torch.optim.SGD(boost.parameters(), lr=0.5)
    boost.attach_optimizer(opt)
    history = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(16):
            loss = boost(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            history.append(tuple(boost.num_heads.values()))
    # checks run at the start of forwards 3, 6, 9, 12, 15 (0-based): counts change only there
    for k in range(1, len(history)):
        before, after = history[k - 1], history[k]
        assert all(a >= b for a, b in zip(after, before, strict=True))
        assert sum(after) - sum(before) <= 1
        if k % 3 != 0:
            assert after == before
    assert history[-1] == (3, 1)  # the weak modality grew to the cap, the strong one did not
    assert max(max(h) for h in history) <= 3
    assert any("max_heads=3" in str(w.message) and "'audio'" in str(w.message) for w in caught)
    assert boost.last is not None and boost.last.capped == "audio" and boost.last.added_to is None


def test_check_pools_scores_since_last_check() -> None:
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=8, seed=4, check_every="manual")
    opt = torch.optim.SGD(boost.parameters(), lr=0.3)
    batches = [(_feats(6, seed=s), torch.randint(0, 3, (6,))) for s in range(3)]
    expected_sums = torch.zeros(2)
    for x, y in batches:
        with torch.no_grad():  # s_m from the heads as they are before this step's update
            for i, m in enumerate(WIDTHS):
                p = torch.softmax(_head(boost, i, 0, x[m]), -1)
                expected_sums[i] += p[torch.arange(6), y].sum()
        boost(x, y).backward()
        opt.step()
        opt.zero_grad()
    record = boost.check()
    assert isinstance(record, BoostingRecord) and isinstance(record, StepRecord)
    s = expected_sums / 18
    torch.testing.assert_close(record.scores, s)
    torch.testing.assert_close(record.ratios, torch.stack([s[0] / s[1], s[1] / s[0]]))
    assert float(record.samples) == 18
    r = float(s[0] / s[1])
    expected = "visual" if r > 1.01 else "audio" if r < 0.99 else None
    assert record.added_to == expected
    assert record.num_heads.tolist() == list(boost.num_heads.values())
    assert record.head_added.tolist() == [int(m == expected) for m in WIDTHS]
    assert set(record.to_dict()) >= {"scores/audio", "ratios/visual", "num_heads/audio"}
    with pytest.raises(RuntimeError, match="at least one training-mode forward"):
        boost.check()  # the pool was reset
    boost.eval()
    boost(*batches[0])  # eval mode pools nothing
    with pytest.raises(RuntimeError, match="at least one training-mode forward"):
        boost.check()


def test_micro_batches_pool_like_one_batch() -> None:
    x, y = _feats(12, seed=9), torch.arange(12) % 3
    whole = SustainedBoostingLoss(3, WIDTHS, hidden=8, seed=5, check_every="manual")
    split = SustainedBoostingLoss(3, WIDTHS, hidden=8, seed=5, check_every="manual")
    whole(x, y)
    for half in (slice(0, 5), slice(5, 12)):  # unequal micro-batches of one optimiser step
        split({m: v[half] for m, v in x.items()}, y[half])
    a, b = whole.check(), split.check()
    torch.testing.assert_close(a.scores, b.scores)
    assert a.added_to == b.added_to and float(a.samples) == float(b.samples) == 12


# --------------------------------------------------------------------------------- growing heads
@pytest.mark.parametrize("make_opt", ["sgd", "adamw"])
def test_added_head_trains_under_the_existing_optimiser(make_opt: str) -> None:
    x, y = _weak_audio_data()
    boost = SustainedBoostingLoss(
        3, {"audio": 4, "visual": 6}, hidden=8, max_heads=4, check_every="manual"
    )
    x["audio"] = torch.randn(24, 4)  # give audio something so its heads get gradients
    params = list(boost.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
        if make_opt == "sgd"
        else torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    )
    ws, bs = boost.head_weight[0], boost.head_bias[0]
    for _ in range(3):
        boost(x, y).backward()
        assert all(torch.equal(w.grad, torch.zeros_like(w)) for w in ws[1:])  # inactive: 0 grad
        opt.step()
        opt.zero_grad(set_to_none=False)
        assert all(torch.equal(w, torch.zeros_like(w)) for w in ws[1:])  # ... and stay zero
    boost.add_head("audio")  # the optimiser was built before; it is not rebuilt
    new = ws[1].detach().clone()
    assert new.abs().sum() > 0  # Xavier-normal draw
    std = math.sqrt(2 / (4 + 8))
    assert 0.4 * std < float(new.std()) < 1.8 * std
    assert torch.equal(bs[1], torch.zeros(8))
    boost(x, y).backward()
    assert ws[1].grad.abs().sum() > 0 and bs[1].grad.abs().sum() > 0
    assert all(torch.equal(w.grad, torch.zeros_like(w)) for w in ws[2:])
    opt.step()
    assert not torch.equal(ws[1].detach(), new)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in ws[2:])


def test_add_head_errors() -> None:
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=4, max_heads=2, check_every="manual")
    assert boost.add_head("visual") == 2
    with pytest.raises(RuntimeError, match=r"'visual' already has max_heads=2"):
        boost.add_head("visual")
    with pytest.raises(KeyError, match="unknown modality 'depth'"):
        boost.add_head("depth")


def test_three_modalities_end_to_end() -> None:
    widths = {"rgb": 4, "depth": 3, "flow": 5}
    x = _feats(9, widths)
    x["flow"] = torch.zeros(9, 5)  # useless modality: the weakest
    y = torch.arange(9) % 3
    boost = SustainedBoostingLoss(
        3, widths, hidden=6, check_every=2, fusion_weights=[0.2, 0.3, 0.5]
    )
    opt = torch.optim.SGD(boost.parameters(), lr=0.5)
    for _ in range(5):
        boost(x, y).backward()
        opt.step()
        opt.zero_grad()
    assert boost.last is not None and boost.last.scores.shape == (3,)
    counts = boost.num_heads
    assert counts["rgb"] == 1 and counts["depth"] == 1 and counts["flow"] >= 2
    hl = boost.head_logits(x)
    fused = sum(a * sum(hl[m]) for a, m in zip([0.2, 0.3, 0.5], widths, strict=True))
    torch.testing.assert_close(boost.predict(x), fused)


def test_user_output_layer_is_shared_by_every_head() -> None:
    out = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=6, output_layer=out, check_every="manual")
    boost.add_head("audio")
    assert boost.output_layer is out
    x, y = _feats(5), torch.arange(5) % 3
    z = boost.head_logits(x)
    torch.testing.assert_close(
        z["audio"][1], out(torch.relu(x["audio"] @ boost.head_weight[0][1].T))
    )
    grads = torch.autograd.grad(boost(x, y), list(out.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------------- state
def _train(boost: SustainedBoostingLoss, opt: torch.optim.Optimizer, steps: range) -> None:
    boost.attach_optimizer(opt)
    for k in steps:
        x = _feats(8, seed=100 + k)
        x["audio"] = x["audio"] * 0.01  # weak audio: heads get added
        y = torch.arange(8) % 3
        boost(x, y).backward()
        opt.step()
        opt.zero_grad()


def test_checkpoint_round_trip_into_fresh_module() -> None:
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=8, check_every=2)
    opt = torch.optim.SGD(boost.parameters(), lr=0.2, momentum=0.9)
    _train(boost, opt, range(9))
    assert sum(boost.num_heads.values()) > 2
    fresh = SustainedBoostingLoss(3, WIDTHS, hidden=8, check_every=2, seed=123)
    assert fresh.num_heads != boost.num_heads
    buffer = io.BytesIO()
    torch.save(boost.state_dict(), buffer)  # through a file, loadable with weights_only=True
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.num_heads == boost.num_heads
    x = _feats(5, seed=77)
    assert torch.equal(fresh.predict(x), boost.predict(x))
    # loading through a parent module (a submodule's post-hook) works the same
    parent, parent2 = (
        nn.ModuleDict({"boost": boost}),
        nn.ModuleDict({"boost": SustainedBoostingLoss(3, WIDTHS, hidden=8, check_every=2)}),
    )
    parent2.load_state_dict(parent.state_dict())
    assert parent2["boost"].num_heads == boost.num_heads


def test_resumed_run_continues_bit_for_bit() -> None:
    def make() -> tuple[SustainedBoostingLoss, torch.optim.Optimizer]:
        b = SustainedBoostingLoss(3, WIDTHS, hidden=8, check_every=3, max_heads=4)
        return b, torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.9)

    ref, ref_opt = make()
    _train(ref, ref_opt, range(14))
    first, first_opt = make()
    _train(first, first_opt, range(7))  # stops between checks with scores pooled
    ckpt = {"boost": first.state_dict(), "opt": first_opt.state_dict()}
    resumed, resumed_opt = make()
    resumed.load_state_dict(ckpt["boost"])
    resumed_opt.load_state_dict(ckpt["opt"])
    _train(resumed, resumed_opt, range(7, 14))
    assert resumed.num_heads == ref.num_heads
    for a, b in zip(resumed.state_dict().values(), ref.state_dict().values(), strict=True):
        if isinstance(a, Tensor):
            assert torch.equal(a, b)
    assert ref.last is not None and resumed.last is not None
    assert torch.equal(ref.last.scores, resumed.last.scores)


# --------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_under_autocast_is_finite(dtype: torch.dtype) -> None:
    x, y = _feats(16), torch.arange(16) % 3
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=8, check_every="manual")
    boost.add_head("audio")
    ref = boost(x, y)
    low = {m: v.to(dtype) for m, v in x.items()}
    with torch.autocast("cpu", dtype=dtype):
        loss = boost(low, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=5e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in boost.parameters() if p.grad is not None)
    record = boost.check()
    assert torch.isfinite(record.scores).all() and record.scores.dtype == torch.float32


# --------------------------------------------------------------------------------- bad input
def test_bad_input_errors() -> None:
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=4, check_every="manual")
    x, y = _feats(4), torch.arange(4) % 3
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        boost({"audio": x["audio"], "depth": x["visual"]}, y)
    with pytest.raises(ValueError, match="at least two modalities"):
        boost({"audio": x["audio"]}, y)
    with pytest.raises(ValueError, match="different order"):
        boost({"visual": x["visual"], "audio": x["audio"]}, y)
    with pytest.raises(
        ValueError, match=r"features\['visual'\] must have shape \[B, 7\].*\(4, 6\)"
    ):
        boost({"audio": x["audio"], "visual": torch.randn(4, 6)}, y)
    with pytest.raises(ValueError, match=r"batch size mismatch.*'visual'.*\(3, 7\)"):
        boost({"audio": x["audio"], "visual": torch.randn(3, 7)}, y)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        boost(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="target has shape"):
        boost(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"features\['audio'\] contains non-finite"):
        boost({"audio": torch.full((4, 5), float("nan")), "visual": x["visual"]}, y)
    with pytest.raises(ValueError, match="at least two modalities"):
        SustainedBoostingLoss(3, {"audio": 5}, check_every="manual")
    with pytest.raises(ValueError, match=r"in_features\['visual'\].* must be an integer >= 1"):
        SustainedBoostingLoss(3, {"audio": 5, "visual": 0}, check_every="manual")
    with pytest.raises(ValueError, match="lam must be <= 1"):
        SustainedBoostingLoss(3, WIDTHS, lam=1.5, check_every="manual")
    with pytest.raises(ValueError, match="fusion_weights has 3 values"):
        SustainedBoostingLoss(3, WIDTHS, fusion_weights=[1, 2, 3], check_every="manual")
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        SustainedBoostingLoss(3, WIDTHS, fusion_weights={"audio": 1.0}, check_every="manual")
    bad = SustainedBoostingLoss(3, WIDTHS, hidden=4, check_every="manual")
    state = bad.state_dict()
    state["head_counts"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="head counts"):
        bad.load_state_dict(state)


# --------------------------------------------------------------------------------- DDP
class _Model(nn.Module):
    def __init__(self, check_every: int | str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleDict({"audio": nn.Linear(5, 6), "visual": nn.Linear(7, 6)})
        self.boost = SustainedBoostingLoss(
            3, {"audio": 6, "visual": 6}, hidden=8, check_every=check_every, max_heads=4
        )

    def forward(self, x: dict[str, Tensor], y: Tensor) -> Tensor:
        loss: Tensor = self.boost({m: torch.relu(self.enc[m](v)) for m, v in x.items()}, y)
        return loss


def _ddp_data(steps: int) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
    xs, ys = [], []
    for k in range(steps):
        x = _feats(8, seed=200 + k)
        # rank 0's half: audio useless; rank 1's half: visual weakened. Each rank alone would
        # give the head to a different modality; pooled over both, audio is the weaker one.
        x["audio"][:4] = 0.0
        x["visual"][4:] = x["visual"][4:] * 0.2
        xs.append(x)
        ys.append(torch.arange(8) % 3)
    return xs, ys


def _run(
    model: nn.Module, core: _Model, xs: list[dict[str, Tensor]], ys: list[Tensor], manual: bool
) -> dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    core.boost.attach_optimizer(opt)
    counts = []
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        if manual and k % 2 == 1:
            core.boost.check()
        counts.append(tuple(core.boost.num_heads.values()))
    return {"counts": counts, "params": [p.detach().clone() for p in core.parameters()]}


def _ddp_body(
    rank: int, size: int, xs: list[dict[str, Tensor]], ys: list[Tensor]
) -> dict[Any, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    half = slice(rank * 4, rank * 4 + 4)
    local_x = [{m: v[half] for m, v in x.items()} for x in xs]
    local_y = [y[half] for y in ys]
    out: dict[Any, Any] = {}
    for manual in (False, True):
        core = _Model("manual" if manual else 2)
        out[manual] = _run(DDP(core), core, local_x, local_y, manual)
    # ranks that disagree on the heads are caught at the next check, on every rank
    solo = SustainedBoostingLoss(3, WIDTHS, hidden=4, check_every="manual")
    if rank == 0:
        solo.add_head("audio")
    solo(*[{m: v[half] for m, v in xs[0].items()}, ys[0][half]])
    try:
        solo.check()
        out["desync"] = "no error"
    except RuntimeError as e:
        out["desync"] = str(e)
    return out


def test_ddp_two_ranks_add_the_same_heads_and_match_one_process() -> None:
    xs, ys = _ddp_data(8)
    r0, r1 = run_distributed(_ddp_body, xs, ys)
    for manual in (False, True):
        core = _Model("manual" if manual else 2)
        ref = _run(core, core, xs, ys, manual)
        a, b = r0[manual], r1[manual]
        assert a["counts"] == b["counts"] == ref["counts"]
        assert a["counts"][-1] != (1, 1)  # heads were added during the run
        for pa, pb, pr in zip(a["params"], b["params"], ref["params"], strict=True):
            assert torch.equal(pa, pb)
            torch.testing.assert_close(pa, pr, rtol=1e-4, atol=1e-5)
    assert "differs across ranks" in r0["desync"] and "differs across ranks" in r1["desync"]


# --------------------------------------------------------------------------------- example
def test_example_runs_and_boosts_the_weak_modality(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(__file__).parents[1] / "examples" / "sustained_boosting_example.py"
    spec = importlib.util.spec_from_file_location("sustained_boosting_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["example", "--epochs", "3", "--train", "600"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        example.main()
    out = capsys.readouterr().out
    assert "(1, 4)" in out  # three checks, each gave the weak modality a head
    assert "joint CE" in out and "boosting" in out


def test_low_precision_features_outside_autocast_get_a_clear_error() -> None:
    boost = SustainedBoostingLoss(3, {"audio": 4, "visual": 2}, hidden=8, check_every="manual")
    feats = {"audio": torch.randn(5, 4).half(), "visual": torch.randn(5, 2)}
    with pytest.raises(
        TypeError, match=r"features\['audio'\] of shape \(5, 4\) are torch.float16.*torch.float32"
    ):
        boost(feats, torch.zeros(5, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(boost(feats, torch.zeros(5, dtype=torch.long)))


# ------------------------------------------------------------------ the pure formula functions
LOG2, LOG3, LOG43, LOG32 = math.log(2), math.log(3), math.log(4 / 3), math.log(3 / 2)


def test_residual_loss_one_head_is_cross_entropy_by_hand() -> None:
    z = torch.tensor([[[LOG3, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)  # [B=2, n=1, C=2]
    got = boosting_residual_loss(z, torch.tensor([0, 1]), lam=0.5)
    # softmax([log 3, 0]) = [3/4, 1/4]; softmax([0, 0]) = [1/2, 1/2]
    assert got.tolist() == pytest.approx([LOG43, LOG2], abs=1e-12)


def test_residual_loss_two_heads_by_hand() -> None:
    # sample 0: z1 = [0, 0], z2 = [log 3, 0], y = 0; sample 1: z1 = [0, log 3], z2 = [0, 0],
    # y = 1; sample 2: ignored
    z = torch.tensor(
        [
            [[0.0, 0.0], [LOG3, 0.0]],
            [[0.0, LOG3], [0.0, 0.0]],
            [[5.0, -1.0], [2.0, 3.0]],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    got = boosting_residual_loss(z, torch.tensor([0, 1, -100]), lam=0.5, ignore_index=-100)
    # sample 0: CE(Z=[log3,0], 0) = log 4/3; CE(P=[0,0], 0) = log 2, p = 1/2;
    #           (1 - 0.5 * 1/2) CE(z2, 0) = 0.75 log 4/3
    # sample 1: CE(Z=[0,log3], 1) = log 4/3; CE(P=[0,log3], 1) = log 4/3, p = 3/4;
    #           (1 - 0.5 * 3/4) CE(z2=[0,0], 1) = 0.625 log 2
    expected = [LOG43 + LOG2 + 0.75 * LOG43, 2 * LOG43 + 0.625 * LOG2, 0.0]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    # p is detached: the gradient is that of the formula with p a constant
    got.sum().backward()
    assert z.grad is not None
    zc = z.detach().clone().requires_grad_(True)
    y = torch.tensor([0, 1])
    ce = [
        -torch.log_softmax(zc[b].sum(0), -1)[y[b]]
        - torch.log_softmax(zc[b, 0], -1)[y[b]]
        - w * torch.log_softmax(zc[b, 1], -1)[y[b]]
        for b, w in ((0, 0.75), (1, 0.625))
    ]
    (ce[0] + ce[1]).backward()
    assert zc.grad is not None
    assert torch.allclose(z.grad[:2], zc.grad[:2], atol=1e-12)
    assert torch.equal(z.grad[2], torch.zeros(2, 2, dtype=torch.float64))


def test_residual_loss_three_heads_and_no_ignore_index_by_hand() -> None:
    # z1 = z2 = [0, 0], z3 = [log 2, 0], y = 0: Z = [log 2, 0], P = [0, 0]
    z = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [math.log(2), 0.0]]], dtype=torch.float64)
    got = boosting_residual_loss(z, torch.tensor([0]), lam=0.2, ignore_index=None)
    # CE(Z, 0) = log 3/2; CE(P, 0) = log 2, p = 1/2; (1 - 0.2/2) CE(z3, 0) = 0.9 log 3/2
    assert got.tolist() == pytest.approx([LOG32 + LOG2 + 0.9 * LOG32], abs=1e-12)


def test_residual_loss_soft_target_by_hand() -> None:
    z = torch.tensor([[[0.0, 0.0], [LOG3, 0.0]]], dtype=torch.float64)  # Z = [log 3, 0]
    t = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    got = boosting_residual_loss(z, t, lam=0.5)
    log_q = [math.log(0.75), math.log(0.25)]  # log softmax of Z and of z2
    ce_z = -(0.25 * log_q[0] + 0.75 * log_q[1])
    # P = [0, 0]: CE(P, t) = log 2; residual target t * (1 - 0.5 * [1/2, 1/2]) = 0.75 t
    ce_res = -(0.1875 * log_q[0] + 0.5625 * log_q[1])
    assert got.tolist() == pytest.approx([ce_z + LOG2 + ce_res], abs=1e-12)
    # a one-hot soft target is the class-index loss
    onehot = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    hard = boosting_residual_loss(z, torch.tensor([0]), lam=0.5)
    assert torch.allclose(boosting_residual_loss(z, onehot, lam=0.5), hard, atol=1e-12)


def test_confidence_scores_by_hand() -> None:
    # modality a, one head: softmax([log 3, 0])[0] = 3/4, softmax([0, 0])[1] = 1/2
    a = torch.tensor([[[LOG3, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)
    # modality b, two heads summed: Z_0 = [0, log 3] -> p[0] = 1/4; Z_1 = [log 2, 0] -> p[1] = 1/3
    b = torch.tensor(
        [[[0.0, 0.0], [0.0, LOG3]], [[math.log(2), 0.0], [0.0, 0.0]]], dtype=torch.float64
    )
    got = confidence_scores([a, b], torch.tensor([0, 1]))
    assert got.dtype == torch.float64  # fp64 stays fp64, fp16 / bf16 become fp32
    assert confidence_scores([a.half(), b.bfloat16()], torch.tensor([0, 1])).dtype == torch.float32
    assert got.tolist() == pytest.approx([0.75 + 0.5, 0.25 + 1 / 3], abs=1e-6)
    ignored = confidence_scores([a, b], torch.tensor([0, -1]), ignore_index=-1)
    assert ignored.tolist() == pytest.approx([0.75, 0.25], abs=1e-6)
    soft = confidence_scores([a, b], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    # sample 0 soft: a: (3/4 + 1/4) / 2 = 1/2, b: (1/4 + 3/4) / 2 = 1/2
    assert soft.tolist() == pytest.approx([0.5 + 0.5, 0.5 + 1 / 3], abs=1e-6)


def _assign(scores: list[float], sigma: float = 1.0, tau: float = 0.25) -> int | None:
    return assign_head(torch.tensor(scores, dtype=torch.float64), sigma=sigma, tau=tau)[0]


def test_assign_head_two_modalities_by_hand() -> None:
    # r = s_1 / s_2 against the band [sigma - tau, sigma + tau] = [0.75, 1.25], edges included
    assert _assign([1.5, 1.0]) == 1  # r = 1.5 > 1.25: modality 2 is the weak one
    assert _assign([1.25, 1.0]) is None  # r = 1.25: upper edge, no head
    assert _assign([1.0, 1.0]) is None
    assert _assign([0.75, 1.0]) is None  # r = 0.75: lower edge, no head
    assert _assign([0.5, 1.0]) == 0  # r = 0.5 < 0.75
    assert _assign([1.0, 0.0]) == 1  # r = inf
    assert _assign([0.0, 0.0]) is None  # 0 / 0 is 1
    assert _assign([0.5, 1.0], sigma=0.5, tau=0.0) is None  # r = sigma exactly
    assert _assign([0.5, 1.0], sigma=0.25, tau=0.125) == 1  # r = 0.5 > 0.375
    _, ratios = assign_head(torch.tensor([0.5, 1.0], dtype=torch.float64), sigma=1.0, tau=0.25)
    assert ratios.tolist() == [0.5, 2.0]


def test_assign_head_many_modalities_by_hand() -> None:
    # [1, 2, 3]: r = [1 / 2.5, 2 / 2, 3 / 1.5] = [0.4, 1, 2]
    choice, ratios = assign_head(
        torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), sigma=1.0, tau=0.25
    )
    assert choice == 0 and ratios.tolist() == pytest.approx([0.4, 1.0, 2.0], abs=1e-12)
    assert _assign([2.0, 3.0, 1.0]) == 2  # the weakest, wherever it is
    assert _assign([1.0, 2.0, 3.0], sigma=0.5, tau=0.25) is None  # 0.4 is not < 0.25
    # [3, 4, 4]: r_1 = 3 / 4 = 0.75, exactly the lower edge: no head; inside it with tau = 1/8
    assert _assign([3.0, 4.0, 4.0]) is None
    assert _assign([3.0, 4.0, 4.0], tau=0.125) == 0
    assert _assign([1.0, 1.0, 4.0]) == 0  # tie r = [0.4, 0.4, 4]: the first in mapping order
    assert _assign([2.0, 2.0, 2.0, 2.0], tau=0.0) is None  # all r = 1 = sigma, not < sigma


@given(
    scores=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=5),
    sigma=st.one_of(st.just(1.0), st.floats(0.5, 2.0)),
    tau=st.floats(0.0, 0.3),
)
def test_assign_head_properties(scores: list[float], sigma: float, tau: float) -> None:
    choice, ratios = assign_head(torch.tensor(scores, dtype=torch.float64), sigma=sigma, tau=tau)
    r = ratios.tolist()
    assert len(r) == len(scores)
    # at most one modality: an index or nothing
    assert choice is None or (isinstance(choice, int) and 0 <= choice < len(scores))
    # the chosen one is the (first) argmin of the ratios; for two modalities the rule compares
    # r = s_1 / s_2 with sigma on both sides, which picks the argmin when sigma = 1
    if choice is not None and (len(scores) > 2 or sigma == 1.0):
        assert choice == int(ratios.argmin()) and r[choice] == min(r)
    # nothing is chosen when every ratio is inside the band sigma +- tau
    if all(sigma - tau <= x <= sigma + tau for x in r):
        assert choice is None


def test_module_uses_the_pure_functions_exactly() -> None:
    boost = SustainedBoostingLoss(
        3, WIDTHS, hidden=8, check_every="manual", reduction="none", lam=0.3
    )
    boost.add_head("audio")
    boost.add_head("audio")
    x = _feats(6)
    y = torch.tensor([0, 1, 2, -100, 1, 0])
    heads = [torch.stack(z, 1) for z in boost.head_logits(x).values()]
    expected = sum(
        (boosting_residual_loss(z, y, lam=0.3, ignore_index=-100) for z in heads[1:]),
        boosting_residual_loss(heads[0], y, lam=0.3, ignore_index=-100),
    )
    assert torch.equal(boost(x, y), expected)
    # the check's score: the pooled sums over the 5 counted samples, divided in fp64
    scores = (confidence_scores(heads, y, ignore_index=-100).double() / 5).float()
    assert torch.equal(boost.check().scores, scores)
