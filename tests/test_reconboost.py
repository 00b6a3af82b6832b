"""ReconBoost (ICML 2024): the formulas by hand, the stage schedule, which parameters each phase
moves, the official no-op consolidation, DDP (2 gloo ranks = one process), bf16 autocast,
accumulation, bit-exact resume and bad input.

References are written from ``l = (w1 - w2 q_y) / C * CE(g_m, y)``, ``q = softmax(beta sum_{k != m}
g_k)``, ``F = beta sum_k g_k`` with Python floats, never from the class's own output.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import (
    MappingHead,
    ReconBoost,
    ReconBoostRecord,
    consolidation_loss,
    ensemble_logits,
    reconboost_loss,
    reconboost_weights,
)
from tests.ddp import run_distributed
from tests.pages import run_page

WIDTHS = {"a": 3, "b": 5, "c": 2}
CLASSES = 3

# ----------------------------------------------------------------------------------------------
# references (Python floats)


def ref_softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def ref_boost(g: list[list[float]], rest: list[list[float]], y: list[int], w1: float, w2: float):
    """Per-sample ``(w1 - w2 q_y) / C * (-log p_y)``."""
    out = []
    for gi, ri, yi in zip(g, rest, y, strict=True):
        q, p = ref_softmax(ri), ref_softmax(gi)
        out.append((w1 - w2 * q[yi]) / len(gi) * -math.log(p[yi]))
    return out


def ref_ce(z: list[list[float]], y: list[int]) -> float:
    return sum(-math.log(ref_softmax(zi)[yi]) for zi, yi in zip(z, y, strict=True)) / len(y)


class Net(nn.Module):
    """One tanh-linear encoder per modality, one head shared by all (the official setting)."""

    def __init__(self, widths: dict[str, int] = WIDTHS) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Linear(w, 4) for m, w in widths.items()})
        self.head = nn.Linear(4, CLASSES)

    def features(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: torch.tanh(e(x[m])) for m, e in self.encoders.items()}

    def forward(self, x: dict[str, Tensor], rb: ReconBoost) -> dict[str, Tensor]:
        return rb.learners(self.features(x))  # the learners inside the (DDP) forward


def make(widths: dict[str, int] = WIDTHS, **kw: Any) -> tuple[Net, ReconBoost]:
    net = Net(widths)
    heads = dict.fromkeys(widths, net.head)
    kw = {"boost_epochs": 1, "rectify_epochs": 1, **kw}
    return net, ReconBoost(net.encoders, heads, **kw)


def data(
    n: int, widths: dict[str, int] = WIDTHS, seed: int = 1
) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, w, generator=g) for m, w in widths.items()}
    return x, torch.randint(CLASSES, (n,), generator=g)


def step(net: Net, rb: ReconBoost, x: dict[str, Tensor], y: Tensor) -> Tensor:
    loss = rb(net.features(x), y)
    rb.optimizer.zero_grad()
    loss.backward()
    rb.optimizer.step()
    return loss


def snapshot(net: Net, rb: ReconBoost) -> list[Tensor]:
    return [p.detach().clone() for p in [*net.parameters(), rb.beta]]


# ----------------------------------------------------------------------------------------------
# formulas


def test_weights_by_hand() -> None:
    q = [0.0, 0.2, 0.9, 1.0]
    got = reconboost_weights(torch.tensor(q), w1=4.0, w2=0.5, num_classes=5)
    torch.testing.assert_close(got, torch.tensor([(4.0 - 0.5 * v) / 5 for v in q]))
    assert reconboost_weights(torch.tensor(q, dtype=torch.bfloat16), 5, 1, 2).dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(2, 5),
    st.floats(0.0, 6.0),
    st.floats(0.0, 3.0),
    st.integers(0, 2**31 - 1),
)
def test_boosting_loss_is_reweighted_cross_entropy(
    b: int, c: int, w1: float, w2: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    z, rest = 3 * torch.randn(b, c, generator=g), 3 * torch.randn(b, c, generator=g)
    y = torch.randint(c, (b,), generator=g)
    got = reconboost_loss(z, rest, y, w1=w1, w2=w2)
    want = ref_boost(z.tolist(), rest.tolist(), y.tolist(), w1, w2)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    # the per-sample loss equals (w1 - w2 q_y) / C * CE
    q_y = torch.softmax(rest, -1).gather(1, y[:, None])[:, 0]
    ce = F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(got, (w1 - w2 * q_y) / c * ce, rtol=1e-5, atol=1e-6)
    # one-hot soft targets give the same loss
    soft = F.one_hot(y, c).float()
    torch.testing.assert_close(reconboost_loss(z, rest, soft, w1=w1, w2=w2), got)


def test_boosting_loss_gradient_reaches_the_learner_only() -> None:
    z = torch.randn(4, 3, requires_grad=True)
    rest = torch.randn(4, 3, requires_grad=True)
    reconboost_loss(z, rest, torch.tensor([0, 1, 2, 0])).sum().backward()
    assert z.grad is not None and rest.grad is None


def test_ensemble_logits_by_hand() -> None:
    g = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0, -1.0]]), "c": torch.ones(1, 2)}
    torch.testing.assert_close(ensemble_logits(g, 0.5), torch.tensor([[2.5, 1.0]]))
    torch.testing.assert_close(ensemble_logits(g, 2.0, ["c", "a"]), torch.tensor([[4.0, 6.0]]))
    assert torch.equal(ensemble_logits(g, 2.0, []), torch.zeros(1, 2))
    half = {m: z.bfloat16() for m, z in g.items()}
    assert ensemble_logits(half, torch.tensor(1.0)).dtype == torch.float32
    beta = torch.tensor(0.5, requires_grad=True)
    ensemble_logits(g, beta).sum().backward()
    torch.testing.assert_close(beta.grad, torch.tensor(7.0))  # sum of every logit
    with pytest.raises(ValueError, match=r"members \['d'\]"):
        ensemble_logits(g, 1.0, ["a", "d"])


def test_consolidation_by_hand() -> None:
    own = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # p = (1/4, 3/4)
    other1, other2 = torch.zeros(1, 2, requires_grad=True), torch.tensor([[50.0, 0.0]])
    got = consolidation_loss(own, [other1, other2])
    mse1 = ((0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2) / 2
    mse2 = ((0.25 - 1.0) ** 2 + 0.75**2) / 2
    torch.testing.assert_close(got, torch.tensor((mse1 + mse2) / 2))
    got.backward()
    assert own.grad is not None and other1.grad is None
    with pytest.raises(ValueError, match="at least one other"):
        consolidation_loss(own, [])


# ----------------------------------------------------------------------------------------------
# the class: phases and what they move


def test_boosting_step_by_hand_and_only_phi_m_and_h_get_gradients() -> None:
    torch.manual_seed(0)
    net, rb = make(beta=0.7)
    x, y = data(6)
    feats = net.features(x)
    loss = rb(feats, y)
    g = {m: net.head(f).detach() for m, f in feats.items()}
    rest = (0.7 * (g["b"] + g["c"])).tolist()
    want = sum(ref_boost(g["a"].tolist(), rest, y.tolist(), 5.0, 1.0)) / 6
    torch.testing.assert_close(loss, torch.tensor(want))  # stage 0: no consolidation
    loss.backward()
    assert all(
        p.grad is not None for p in [*net.encoders["a"].parameters(), *net.head.parameters()]
    )
    assert all(p.grad is None for m in "bc" for p in net.encoders[m].parameters())
    assert rb.beta.grad is None
    assert {id(p) for p in rb.parameters_for()} == {
        id(p) for p in [*net.encoders["a"].parameters(), *net.head.parameters()]
    }
    rec = rb.last
    assert isinstance(rec, ReconBoostRecord) and rec.boosting and rec.trained == 0
    q_y = torch.softmax(torch.tensor(rest), -1).gather(1, y[:, None]).mean()
    torch.testing.assert_close(rec.agreement, q_y)


def test_the_others_ensemble_carries_no_gradient() -> None:
    _, rb = make()
    logits = {m: torch.randn(5, CLASSES, requires_grad=True) for m in WIDTHS}
    rb.boosting_loss(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert logits["a"].grad is not None
    assert logits["b"].grad is None and logits["c"].grad is None and rb.beta.grad is None


def test_rectification_by_hand_updates_every_encoder_the_head_and_beta() -> None:
    torch.manual_seed(0)
    net, rb = make(beta=0.8)
    x, y = data(8)
    step(net, rb, x, y)
    rb.epoch_end()
    assert rb.phase == "rectify" and rb.stage == 0
    feats = net.features(x)
    fused = sum(net.head(f).detach() for f in feats.values()) * 0.8
    before = snapshot(net, rb)
    loss = rb(feats, y)
    torch.testing.assert_close(loss, torch.tensor(ref_ce(fused.tolist(), y.tolist())))
    rb.optimizer.zero_grad()
    loss.backward()
    rb.optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, snapshot(net, rb), strict=True))
    assert rb.last is not None and not rb.last.boosting and rb.last.agreement is None


@pytest.mark.parametrize("warm_start", [True, False])
def test_stage_s_trains_modality_s_mod_m_and_the_ensemble_holds_m_learners(
    warm_start: bool,
) -> None:
    torch.manual_seed(0)
    net, rb = make(warm_start=warm_start, boost_epochs=2)
    x, y = data(6)
    names = list(WIDTHS)
    for epoch in range(3 * 7):  # 7 stages of (2 boosting + 1 rectification epochs)
        stage, phase = rb.stage, rb.phase
        assert stage == epoch // 3 and phase == ("boost" if epoch % 3 < 2 else "rectify")
        assert rb.modality == names[stage % 3]
        joined = stage + (phase == "rectify")
        assert rb.members == (tuple(names) if warm_start else tuple(names[:joined]))
        assert len(rb.members) <= 3 and len(set(rb.members)) == len(rb.members)
        before = snapshot(net, rb)
        step(net, rb, x, y)
        moved = [
            m
            for i, m in enumerate(names)
            if not all(
                torch.equal(a, b)
                for a, b in zip(
                    before[2 * i : 2 * i + 2],
                    [p.detach() for p in net.encoders[m].parameters()],
                    strict=True,
                )
            )
        ]
        assert moved == ([rb.modality] if phase == "boost" else list(rb.members))
        assert torch.equal(before[-1], rb.beta.detach()) == (phase == "boost")
        rb.epoch_end()
    assert rb.members == tuple(names)  # every learner once: the ensemble holds M
    feats = net.features(x)
    with torch.no_grad():
        want = rb.beta * sum(net.head(f) for f in feats.values())
        torch.testing.assert_close(rb.predict(feats), want)


def test_warm_start_false_starts_from_a_uniform_ensemble() -> None:
    net, rb = make(warm_start=False)
    x, y = data(5)
    feats = net.features(x)
    loss = rb(feats, y)  # F_{-m} = 0: q = 1/C, weight (w1 - w2 / C) / C
    ce = F.cross_entropy(net.head(feats["a"]), y)
    torch.testing.assert_close(loss, (5.0 - 1.0 / CLASSES) / CLASSES * ce)
    assert torch.equal(rb.predict(feats), torch.zeros(5, CLASSES))  # no learner yet


def test_official_consolidation_leaves_the_parameters_identical_to_off() -> None:
    x, y = data(8)
    runs = {}
    for mode in ("official", "off", "gradient"):
        torch.manual_seed(0)
        net, rb = make(consolidation=mode, alpha=2.0)
        for _ in range(6):  # stages 0-2: consolidation from stage 1
            step(net, rb, x, y)
            if mode != "off" and rb.stage >= 1 and rb.phase == "boost":
                assert rb.last is not None and rb.last.consolidation is not None
            rb.epoch_end()
        runs[mode] = snapshot(net, rb)
    assert all(torch.equal(a, b) for a, b in zip(runs["official"], runs["off"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs["gradient"], runs["off"], strict=True))


def test_official_consolidation_adds_the_detached_term_to_the_loss() -> None:
    torch.manual_seed(0)
    net, rb = make(alpha=0.5)
    x, y = data(6)
    for _ in range(2):
        step(net, rb, x, y)
        rb.epoch_end()
    assert rb.stage == 1 and rb.modality == "b"
    feats = net.features(x)
    g = {m: net.head(f).detach() for m, f in feats.items()}
    boost = sum(ref_boost(g["b"].tolist(), (rb.beta.detach() * (g["a"] + g["c"])).tolist(),
                          y.tolist(), 5.0, 1.0)) / 6  # fmt: skip
    p = {m: torch.softmax(z, -1) for m, z in g.items()}
    ga = (((p["b"] - p["a"]) ** 2).mean() + ((p["b"] - p["c"]) ** 2).mean()) / 2
    torch.testing.assert_close(rb(feats, y), torch.tensor(boost) + 0.5 * ga)


def test_a_new_optimiser_per_phase_from_the_factory() -> None:
    calls: list[tuple[str, int, int]] = []

    def factory(params: list[Tensor], phase: str, stage: int) -> torch.optim.Optimizer:
        calls.append((phase, stage, len(params)))
        return torch.optim.Adam(params, lr=1e-3)

    net, rb = make(optimizer_factory=factory)
    x, y = data(4)
    seen = []
    for _ in range(4):
        step(net, rb, x, y)
        seen.append(rb.optimizer)
        rb.epoch_end()
    assert len({id(o) for o in seen}) == 4
    # boosting: encoder (2) + head (2); rectification: 3 encoders + head + beta
    assert calls == [("boost", 0, 4), ("rectify", 0, 9), ("boost", 1, 4), ("rectify", 1, 9)]


def test_a_mapping_head_and_per_modality_heads() -> None:
    torch.manual_seed(0)
    enc = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)})
    proj = nn.Linear(4, 2)
    head = MappingHead(_Summed(proj))
    rb = ReconBoost(enc, head)
    x = {"a": torch.randn(4, 3), "b": torch.randn(4, 5)}
    feats = {m: e(x[m]) for m, e in enc.items()}
    want = rb.beta * (proj(feats["a"]) + proj(feats["b"]))
    torch.testing.assert_close(rb.predict(feats), want)
    rb(feats, torch.tensor([0, 1, 1, 0])).backward()
    assert proj.weight.grad is not None and enc["b"].weight.grad is None
    heads = {"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)}
    rb2 = ReconBoost(enc, heads)
    assert {id(p) for p in rb2.parameters_for()} == {
        id(p) for p in [*enc["a"].parameters(), *heads["a"].parameters()]
    }


class _Summed(nn.Module):
    """A head over the mapping: the projection of the sum of the given modalities' features."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, f: dict[str, Tensor]) -> Tensor:
        return self.proj(sum(f.values()))  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------
# accumulation, AMP, resume, DDP


def test_accumulation_of_two_half_batches_equals_the_batch() -> None:
    x, y = data(8)
    for epochs in (0, 1):  # boosting, then rectification
        grads = []
        for parts in (1, 2):
            torch.manual_seed(0)
            net, rb = make()
            for _ in range(epochs):
                rb.epoch_end()
            rb.optimizer.zero_grad()
            for i in range(parts):
                rows = slice(i * 8 // parts, (i + 1) * 8 // parts)
                loss = rb(net.features({m: v[rows] for m, v in x.items()}), y[rows])
                (loss / parts).backward()
            grads.append([p.grad for p in rb.parameters_for()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b)


def test_bf16_autocast_is_finite_with_fp32_statistics() -> None:
    torch.manual_seed(0)
    net, rb = make(consolidation="gradient")
    x, y = data(8)
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = net.features(x)
            loss = rb(feats, y)
            assert rb.learners(feats)["a"].dtype == torch.bfloat16
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
        rec = rb.last
        assert rec is not None and rec.loss.dtype == torch.float32
        rb.optimizer.zero_grad()
        loss.backward()
        rb.optimizer.step()
        rb.epoch_end()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = rb.predict(net.features(x))
    assert pred.dtype == torch.float32 and bool(torch.isfinite(pred).all())
    assert rb.beta.dtype == torch.float32


def _run(net: Net, rb: ReconBoost, epochs: range, steps: int = 2) -> None:
    for epoch in epochs:
        for i in range(steps):
            step(net, rb, *data(6, seed=100 * epoch + i))
        rb.epoch_end()


def test_resume_is_bit_exact() -> None:
    torch.manual_seed(0)
    net, rb = make(boost_epochs=2, rectify_epochs=2)
    start = copy.deepcopy(net.state_dict())
    _run(net, rb, range(9))
    want = snapshot(net, rb)

    torch.manual_seed(0)
    net1, rb1 = make(boost_epochs=2, rectify_epochs=2)
    net1.load_state_dict(start)
    _run(net1, rb1, range(5))  # stops after stage 1's first boosting epoch (momentum kept)
    buf = io.BytesIO()
    torch.save({"net": net1.state_dict(), "rb": rb1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    net2, rb2 = make(boost_epochs=2, rectify_epochs=2)
    net2.load_state_dict(saved["net"])
    rb2.load_state_dict(saved["rb"])
    assert (rb2.stage, rb2.phase) == (rb1.stage, rb1.phase) == (1, "boost")
    assert rb2.last is not None and rb1.last is not None
    assert torch.equal(rb2.last.loss, rb1.last.loss)
    _run(net2, rb2, range(5, 9))
    assert all(torch.equal(a, b) for a, b in zip(want, snapshot(net2, rb2), strict=True))


def _ddp_body(
    rank: int, world: int, state: dict[str, Tensor], empty_rank: bool = False
) -> list[Tensor]:
    """Four epochs (boost, rectify, boost with consolidation, rectify) under DDP: each rank its
    half of a batch of 8, or (``empty_rank``) rank 0 a batch of 4 and rank 1 an empty shard."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net, rb = make()
    net.load_state_dict(state)
    ddp = DDP(net, find_unused_parameters=True)  # boosting leaves the other encoders unused
    for epoch in range(4):
        x, y = data(4 if empty_rank else 8, seed=epoch)
        rows = slice(0, 4 if rank == 0 else 0) if empty_rank else slice(rank * 4, rank * 4 + 4)
        logits = ddp({m: v[rows] for m, v in x.items()}, rb)
        loss = rb.loss(logits, y[rows])
        rb.optimizer.zero_grad()
        loss.backward()
        rb.optimizer.step()
        rb.epoch_end()
    return [loss.detach(), *snapshot(net, rb)]


def test_two_gloo_ranks_equal_one_process_on_the_global_batch() -> None:
    torch.manual_seed(0)
    net, rb = make()
    results = run_distributed(_ddp_body, copy.deepcopy(net.state_dict()))
    for epoch in range(4):
        step(net, rb, *data(8, seed=epoch))
        rb.epoch_end()
    want = snapshot(net, rb)
    assert not torch.equal(want[-1], torch.tensor(1.0))  # beta moved
    for got in results:
        for a, b in zip(got[1:], want, strict=True):
            torch.testing.assert_close(a, b)


def test_a_rank_with_an_empty_batch_adds_a_zero_loss_not_nan() -> None:
    """Every phase's loss on ``B = 0`` is 0 with zero gradients (not a mean's ``0 / 0``), so the
    DDP average is rank 0's gradient / 2: one process stepping on ``loss / 2``."""
    torch.manual_seed(0)
    net, rb = make()
    results = run_distributed(_ddp_body, copy.deepcopy(net.state_dict()), True)
    for epoch in range(4):
        x, y = data(4, seed=epoch)
        loss = rb(net.features(x), y) / 2
        rb.optimizer.zero_grad()
        loss.backward()
        rb.optimizer.step()
        rb.epoch_end()
    assert float(results[1][0]) == 0.0
    for got in results:
        for a, b in zip(got[1:], snapshot(net, rb), strict=True):
            torch.testing.assert_close(a, b)


def test_a_deep_copy_with_the_model_predicts_alike_and_trains_the_copy() -> None:
    torch.manual_seed(0)
    net, rb = make()
    x, y = data(6)
    step(net, rb, x, y)
    net2, rb2 = copy.deepcopy((net, rb))  # one memo: rb2 holds net2's encoders and head
    with torch.no_grad():
        assert torch.equal(rb2.predict(net2.features(x)), rb.predict(net.features(x)))
    before = snapshot(net, rb)
    step(net2, rb2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net, rb), strict=True))
    assert not torch.equal(net2.encoders["a"].weight, net.encoders["a"].weight)


# ----------------------------------------------------------------------------------------------
# heads served, bad input, the docs page


def test_a_head_that_cannot_score_a_modality_alone_is_refused() -> None:
    enc = {"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)}
    with pytest.raises(TypeError, match=r"scores each modality alone.*got Linear"):
        ReconBoost(enc, nn.Linear(8, 2))
    with pytest.raises(TypeError, match=r"scores each modality alone.*got function"):
        ReconBoost(enc, lambda x: x)
    with pytest.raises(TypeError, match=r"head\['b'\] must be an nn.Module"):
        ReconBoost(enc, {"a": nn.Linear(4, 2), "b": lambda x: x})
    with pytest.raises(TypeError, match=r"nn\.Module fn"):
        ReconBoost(enc, MappingHead(lambda f: sum(f.values())))
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        ReconBoost(enc, {"a": nn.Linear(4, 2)})
    with pytest.raises(ValueError, match="fusion head's parameters"):
        ReconBoost(enc, {"a": enc["a"], "b": nn.Linear(4, 2)})


@pytest.mark.parametrize("consolidation", ["official", "gradient"])
def test_an_empty_batch_gives_a_zero_loss_with_zero_gradients(consolidation: str) -> None:
    """``B = 0`` (an uneven last shard, a filtered batch): every phase's loss is a zero that
    back-propagates zero gradients, not the NaN of a mean over no sample."""
    torch.manual_seed(0)
    net, rb = make(consolidation=consolidation)
    x, y = data(6)
    empty_x, empty_y = {m: v[:0] for m, v in x.items()}, y[:0]
    seen = []
    for _ in range(4):  # boost (stage 0), rectify, boost (stage 1: consolidation), rectify
        loss = rb(net.features(empty_x), empty_y)
        rb.optimizer.zero_grad()
        loss.backward()
        seen.append((rb.stage, rb.phase))
        assert loss.shape == () and loss.item() == 0.0, (rb.stage, rb.phase, loss)
        for p in [*net.parameters(), rb.beta]:
            assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), (rb.phase, p)
        step(net, rb, x, y)
        rb.epoch_end()
    assert seen == [(0, "boost"), (0, "rectify"), (1, "boost"), (1, "rectify")]


def test_bad_input() -> None:
    net, rb = make()
    x, y = data(4)
    feats = net.features(x)
    with pytest.raises(ValueError, match="at least two modalities"):
        ReconBoost({"a": nn.Linear(2, 2)}, {"a": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="consolidation"):
        make(consolidation="kl")
    with pytest.raises(ValueError, match="boost_epochs"):
        make(boost_epochs=0)
    with pytest.raises(ValueError, match="w1"):
        make(w1=-1.0)
    with pytest.raises(ValueError, match="missing \\['c'\\]"):
        rb({m: feats[m] for m in "ab"}, y)
    with pytest.raises(ValueError, match="different order"):
        rb({m: feats[m] for m in "cba"}, y)
    with pytest.raises(ValueError, match=r"features\['b'\] has shape \(3, 4\)"):
        rb({**feats, "b": feats["b"][:3]}, y)
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        rb(feats, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="target has shape \\(3,\\)"):
        rb(feats, y[:3])
    logits = {m: torch.randn(4, CLASSES) for m in WIDTHS}
    logits["b"] = torch.full((4, CLASSES), float("nan"))
    with pytest.raises(ValueError, match=r"logits\['b'\] contains non-finite"):
        rb.loss(logits, y)
    with pytest.raises(TypeError, match=r"float64 but the parameters of head\['a'\]"):
        rb({m: f.double() for m, f in feats.items()}, y)
    state = rb.state_dict()
    _, other = make({"a": 3, "b": 5})
    with pytest.raises(ValueError, match="state modalities"):
        other.load_state_dict(state)


def test_the_docs_page_runs(tmp_path: Path) -> None:
    ns = run_page("reconboost.md", tmp_path)
    assert ns["rb"].stage >= 1
