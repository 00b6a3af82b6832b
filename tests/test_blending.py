"""GradientBlending (G-Blending): the paper's formulas, the blended loss, the loader helper, DDP."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses.methods.blending import (
    BlendingRecord,
    GradientBlending,
    blending_weights,
    branch_losses,
    overfitting_to_generalization_ratio,
    window_changes,
)
from tests.ddp import run_distributed

NAMES = ["audio", "visual", "text", "depth"]

# ----------------------------------------------------------------------------------------------
# independent reference formulas (Python floats, from the paper: Eq. 3, Prop. 1, Algorithm 1)


def ref_changes(
    t0: list[float], v0: list[float], t1: list[float], v1: list[float]
) -> tuple[list[float], list[float]]:
    """ΔG = L*_N - L*_{N+n} (L* ~ L^V); ΔO = O_{N+n} - O_N, O = L^V - L^T."""
    dg = [a - b for a, b in zip(v0, v1, strict=True)]
    do = [(v1[k] - t1[k]) - (v0[k] - t0[k]) for k in range(len(t0))]
    return dg, do


def ref_weights(dg: list[float], do: list[float], eps: float = 1e-8) -> list[float]:
    """w_k = (1/Z) ΔG_k / ΔO_k^2 with sum 1; non-positive ΔG -> 0; all 0 -> uniform."""
    s = [max(g, 0.0) / max(o * o, eps) for g, o in zip(dg, do, strict=True)]
    z = sum(s)
    return [x / z for x in s] if z > 0 else [1.0 / len(s)] * len(s)


def ref_ce(z: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy in fp64, written out."""
    return -z.double().log_softmax(-1).gather(1, y[:, None]).squeeze(1)


def linear_split(head: nn.Linear, feats: dict[str, Tensor]) -> dict[str, Tensor]:
    """z_m = x_m W_m^T + b / M."""
    out, off, m = {}, 0, len(feats)
    for name, x in feats.items():
        out[name] = x @ head.weight[:, off : off + x.shape[1]].T + head.bias / m
        off += x.shape[1]
    return out


def dd(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


losses4 = st.integers(3, 5).flatmap(
    lambda k: st.lists(
        st.lists(st.floats(0.01, 5.0), min_size=k, max_size=k), min_size=4, max_size=4
    )
)

# ----------------------------------------------------------------------------------------------
# formulas


@given(losses4)
def test_window_changes_match_eq3(losses: list[list[float]]) -> None:
    dg, do = window_changes(*(dd(x) for x in losses))
    want_g, want_o = ref_changes(*losses)
    torch.testing.assert_close(dg, dd(want_g), rtol=0, atol=1e-12)
    torch.testing.assert_close(do, dd(want_o), rtol=0, atol=1e-12)


@given(losses4)
def test_weights_match_the_paper_sum_to_one_and_are_non_negative(losses: list[list[float]]) -> None:
    dg, do = ref_changes(*losses)
    w = blending_weights(dd(dg), dd(do))
    torch.testing.assert_close(w, dd(ref_weights(dg, do)), rtol=1e-10, atol=1e-12)
    assert bool((w >= 0).all())
    assert abs(float(w.sum()) - 1.0) < 1e-12


def test_weights_on_hand_values() -> None:
    # ΔG / ΔO^2 = 0.2/0.01 = 20, 0.1/0.04 = 2.5, 0.3/0.09 = 10/3 (ΔO's sign does not matter)
    w = blending_weights(dd([0.2, 0.1, 0.3]), dd([0.1, -0.2, 0.3]))
    z = 20 + 2.5 + 10 / 3
    torch.testing.assert_close(w, dd([20 / z, 2.5 / z, (10 / 3) / z]), rtol=1e-12, atol=0)


@given(st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.floats(1.01, 10.0))
def test_a_branch_that_overfits_more_gets_less_weight(g: float, o: float, more: float) -> None:
    w = blending_weights(dd([g, g, g]), dd([o, o * more, o]))
    assert float(w[1]) < float(w[0]) and float(w[0]) == pytest.approx(float(w[2]))
    w = blending_weights(dd([g, g * more, g]), dd([o, o, o]))  # generalises more: more weight
    assert float(w[1]) > float(w[0])


def test_open_cases_non_positive_generalisation_zero_overfitting_and_all_bad() -> None:
    w = blending_weights(dd([-0.1, 0.0, 0.2]), dd([0.1, 0.1, 0.1]))
    torch.testing.assert_close(w, dd([0.0, 0.0, 1.0]))
    w = blending_weights(dd([0.1, 0.1, 0.1]), dd([0.0, 0.1, 0.1]))  # ΔO = 0: finite, dominant
    assert bool(torch.isfinite(w).all()) and float(w[0]) > 0.999
    fallback = dd([0.5, 0.25, 0.25])
    torch.testing.assert_close(
        blending_weights(dd([-1.0, 0.0, -0.1]), dd([1.0] * 3)), dd([1 / 3] * 3)
    )
    torch.testing.assert_close(
        blending_weights(dd([-1.0, 0.0, -0.1]), dd([1.0] * 3), fallback=fallback), fallback
    )
    with pytest.raises(ValueError, match="eps"):
        blending_weights(dd([0.1, 0.1]), dd([0.1, 0.1]), eps=0.0)
    with pytest.raises(ValueError, match=r"\[K\]"):
        blending_weights(dd([0.1, 0.1]), dd([0.1, 0.1, 0.1]))


def test_ogr_is_the_absolute_ratio_and_inf_without_generalisation() -> None:
    ogr = overfitting_to_generalization_ratio(dd([0.5, -0.25, 0.0, 0.0]), dd([0.1, 0.5, 0.2, 0.0]))
    torch.testing.assert_close(ogr, dd([0.2, 2.0, math.inf, math.inf]))


# ----------------------------------------------------------------------------------------------
# the blended loss


def batch(
    m: int, b: int, c: int, seed: int = 0, dims: tuple[int, ...] = (3, 5, 2, 4)
) -> tuple[nn.Linear, dict[str, Tensor], Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = {NAMES[i]: torch.randn(b, dims[i], generator=g, requires_grad=True) for i in range(m)}
    head = nn.Linear(sum(dims[:m]), c)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(c, generator=g))
    logits = head(torch.cat(list(feats.values()), 1))
    return head, feats, logits, torch.randint(0, c, (b,), generator=g)


@given(st.integers(2, 4), st.integers(1, 9), st.integers(2, 5), st.data())
def test_loss_is_the_weighted_sum_of_branch_cross_entropies(
    m: int, b: int, c: int, data: st.DataObject
) -> None:
    head, feats, logits, y = batch(m, b, c)
    raw = data.draw(st.lists(st.floats(0.0, 3.0), min_size=m + 1, max_size=m + 1))
    raw[-1] += 0.1
    names = [*NAMES[:m], "fused"]
    blend = GradientBlending(head=head, initial_weights=dict(zip(names, raw, strict=True)))
    w = [x / sum(raw) for x in raw]
    zs = {**linear_split(head, feats), "fused": logits}
    per = sum(wk * ref_ce(zs[n], y) for wk, n in zip(w, names, strict=True))
    assert isinstance(per, Tensor)
    torch.testing.assert_close(
        blend(logits, y, features=feats).double(), per.mean(), rtol=1e-5, atol=1e-6
    )
    for reduction, want in (("sum", per.sum()), ("none", per)):
        blend.reduction = reduction
        got = blend(logits, y, features=feats)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_identity_settings_reduce_to_plain_cross_entropy() -> None:
    head, feats, logits, y = batch(2, 8, 4)
    only_fused = GradientBlending(head=head, initial_weights={"audio": 0, "visual": 0, "fused": 3})
    torch.testing.assert_close(only_fused(logits, y, features=feats), F.cross_entropy(logits, y))
    # uniform weights from equal statistics: the plain mean of the branch cross-entropies
    blend = GradientBlending(head=head, modalities=["audio", "visual"])
    blend.update(
        {"audio": 1.0, "visual": 1.0, "fused": 1.0}, {"audio": 2.0, "visual": 2.0, "fused": 2.0}
    )
    rec = blend.update(
        {"audio": 0.5, "visual": 0.5, "fused": 0.5}, {"audio": 1.8, "visual": 1.8, "fused": 1.8}
    )
    assert rec is not None
    torch.testing.assert_close(rec.weights, torch.full((3,), 1 / 3))
    zs = unimodal = linear_split(head, feats)
    want = (
        F.cross_entropy(zs["audio"], y)
        + F.cross_entropy(zs["visual"], y)
        + F.cross_entropy(logits, y)
    ) / 3
    torch.testing.assert_close(blend(logits, y, unimodal_logits=unimodal), want)


def test_gradients_are_the_blend_of_branch_gradients() -> None:
    head, feats, logits, y = batch(2, 6, 3)
    blend = GradientBlending(head=head, initial_weights={"audio": 0.2, "visual": 0.3, "fused": 0.5})
    blend(logits, y, features=feats).backward()
    got = feats["audio"].grad.clone()  # type: ignore[union-attr]
    feats["audio"].grad = None
    head2, feats2, logits2, _ = batch(2, 6, 3)
    zs = linear_split(head2, feats2)
    loss = 0.2 * F.cross_entropy(zs["audio"], y) + 0.5 * F.cross_entropy(logits2, y)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(got, feats2["audio"].grad)


def test_ignore_index_soft_targets_empty_batch_and_amp() -> None:
    head, feats, logits, y = batch(2, 6, 3)
    y = y.clone()
    y[:2] = -100
    blend = GradientBlending(head=head, initial_weights={"audio": 1, "visual": 1, "fused": 2})
    zs = {**linear_split(head, feats), "fused": logits}
    want = sum(
        w * F.cross_entropy(zs[n], y)
        for n, w in (("audio", 0.25), ("visual", 0.25), ("fused", 0.5))
    )
    torch.testing.assert_close(blend(logits, y, features=feats), want)
    soft = torch.softmax(torch.randn(6, 3), 1)
    want = sum(
        w * F.cross_entropy(zs[n], soft)
        for n, w in (("audio", 0.25), ("visual", 0.25), ("fused", 0.5))
    )
    torch.testing.assert_close(blend(logits, soft, features=feats), want)
    # B = 0: a zero loss with (zero) gradients, for every reduction
    for reduction in ("mean", "sum"):
        blend.reduction = reduction
        empty = {m: torch.zeros(0, x.shape[1], requires_grad=True) for m, x in feats.items()}
        loss = blend(head(torch.cat(list(empty.values()), 1)), y[:0], features=empty)
        assert loss.item() == 0.0
        loss.backward()
        assert empty["audio"].grad is not None and empty["audio"].grad.shape == (0, 3)
    blend.reduction = "none"
    assert blend(logits[:0], y[:0], features={m: x[:0] for m, x in feats.items()}).shape == (0,)
    # bf16 logits: the loss is fp32, equal to fp32 on the same (rounded) values
    blend.reduction = "mean"
    half = {m: z.detach().bfloat16() for m, z in zs.items()}
    got = blend(half["fused"], y, unimodal_logits={m: half[m] for m in ("audio", "visual")})
    assert got.dtype == torch.float32
    full = {m: z.float() for m, z in half.items()}
    want = blend(full["fused"], y, unimodal_logits={m: full[m] for m in ("audio", "visual")})
    torch.testing.assert_close(got, want)


def test_every_target_ignored_is_a_zero_loss_with_zero_gradients() -> None:
    """Mean over no counted sample is 0 (not 0 / 0); sum is 0; "none" is 0 per sample."""
    for reduction, ignore in (("mean", -100), ("sum", -100), ("none", -100), ("mean", 255)):
        head, feats, _, y = batch(2, 6, 3)
        blend = GradientBlending(head=head, reduction=reduction, ignore_index=ignore)  # type: ignore[arg-type]
        logits = head(torch.cat(list(feats.values()), 1))
        loss = blend(logits, torch.full_like(y, ignore), features=feats)
        assert torch.equal(loss.detach(), torch.zeros(6 if reduction == "none" else ()))
        loss.sum().backward()
        for t in (*feats.values(), head.weight, head.bias):
            assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


def test_gradient_accumulation_equals_the_full_batch() -> None:
    head, feats, logits, y = batch(2, 8, 3)
    blend = GradientBlending(head=head, initial_weights={"audio": 1, "visual": 2, "fused": 3})
    full = blend(logits, y, features=feats)
    halves = [
        blend(logits[i : i + 4], y[i : i + 4], features={m: x[i : i + 4] for m, x in feats.items()})
        for i in (0, 4)
    ]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full)


def test_weights_and_losses_keyed_by_name_in_another_order_than_the_features() -> None:
    """``initial_weights`` / ``update`` losses are keyed by branch name: their mapping order is
    not the features' order (``modalities`` is learnt from the first call). Each weight must
    reach its own branch, and the window's start losses theirs."""
    head, feats, logits, y = batch(2, 6, 3)  # features in the order audio, visual
    blend = GradientBlending(head=head, initial_weights={"visual": 0.6, "fused": 0.3, "audio": 0.1})
    zs = {**linear_split(head, feats), "fused": logits}
    want = sum(w * ref_ce(zs[n], y) for n, w in (("audio", 0.1), ("visual", 0.6), ("fused", 0.3)))
    assert isinstance(want, Tensor)
    got = blend(logits, y, features=feats)
    torch.testing.assert_close(got.double(), want.mean(), rtol=1e-5, atol=1e-6)
    assert {k: round(float(v), 6) for k, v in blend.weights.items()} == {
        "audio": 0.1, "visual": 0.6, "fused": 0.3,
    }  # fmt: skip
    # the window's start recorded from visual-first losses before any forward
    late = GradientBlending(head=head)
    t0, v0 = WINDOWS[0]
    named = ["visual", "audio", "fused"]
    order = [1, 0, 2]  # WINDOWS lists audio, visual, fused
    late.update({n: t0[i] for n, i in zip(named, order, strict=True)},
                {n: v0[i] for n, i in zip(named, order, strict=True)})  # fmt: skip
    late(logits, y, features=feats)  # the first forward: audio, visual
    rec = late.update(losses(WINDOWS[1][0]), losses(WINDOWS[1][1]))
    assert rec is not None and rec.modalities == ("audio", "visual", "fused")
    dg, do = ref_changes(WINDOWS[0][0], WINDOWS[0][1], WINDOWS[1][0], WINDOWS[1][1])
    torch.testing.assert_close(rec.delta_g, dd(dg))
    torch.testing.assert_close(rec.weights, torch.tensor(ref_weights(dg, do), dtype=torch.float32))
    # once a forward fixed the order, another order is still refused
    with pytest.raises(ValueError, match="different order"):
        late(logits, y, features={"visual": feats["visual"], "audio": feats["audio"]})


# ----------------------------------------------------------------------------------------------
# windows, record, state


def losses(values: list[float]) -> dict[str, float]:
    return dict(zip(["audio", "visual", "fused"], values, strict=True))


WINDOWS = [  # (train, val) per checkpoint
    ([2.0, 2.1, 1.9], [2.2, 2.2, 2.1]),
    ([1.2, 1.8, 1.0], [1.9, 2.0, 1.7]),
    ([0.6, 1.5, 0.4], [1.85, 1.9, 1.65]),
]


def test_update_follows_algorithm_1_window_by_window() -> None:
    blend = GradientBlending(modalities=["audio", "visual"])
    assert blend.update(losses(WINDOWS[0][0]), losses(WINDOWS[0][1])) is None
    torch.testing.assert_close(torch.stack(list(blend.weights.values())), torch.full((3,), 1 / 3))
    for i in (1, 2):
        rec = blend.update(losses(WINDOWS[i][0]), losses(WINDOWS[i][1]))
        assert isinstance(rec, BlendingRecord) and rec.window == i
        dg, do = ref_changes(WINDOWS[i - 1][0], WINDOWS[i - 1][1], WINDOWS[i][0], WINDOWS[i][1])
        torch.testing.assert_close(rec.delta_g, dd(dg))
        torch.testing.assert_close(rec.delta_o, dd(do))
        torch.testing.assert_close(
            rec.weights, torch.tensor(ref_weights(dg, do), dtype=torch.float32)
        )
        torch.testing.assert_close(rec.ogr, dd([abs(o / g) for g, o in zip(dg, do, strict=True)]))
        assert blend.last is rec
    assert blend.last is not None
    assert set(blend.last.to_dict()) >= {
        "weights/audio",
        "weights/fused",
        "delta_g/visual",
        "window",
    }


def test_no_generalisation_keeps_the_previous_weights() -> None:
    blend = GradientBlending(initial_weights=losses([0.5, 0.3, 0.2]))
    blend.update(losses([1.0, 1.0, 1.0]), losses([1.0, 1.0, 1.0]))
    rec = blend.update(losses([0.5, 0.5, 0.5]), losses([1.2, 1.1, 1.3]))
    assert rec is not None
    torch.testing.assert_close(rec.weights, torch.tensor([0.5, 0.3, 0.2]))


def test_state_round_trip_is_bit_for_bit(tmp_path: Any) -> None:
    head, feats, logits, y = batch(2, 8, 3)
    a = GradientBlending(head=head)
    a(logits, y, features=feats)
    a.update(losses(WINDOWS[0][0]), losses(WINDOWS[0][1]))
    a.update(losses(WINDOWS[1][0]), losses(WINDOWS[1][1]))
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = GradientBlending(head=head)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert b.branches == a.branches and b.last is not None and a.last is not None
    assert torch.equal(b.last.weights, a.last.weights)
    assert torch.equal(b(logits, y, features=feats), a(logits, y, features=feats))
    ra, rb = (x.update(losses(WINDOWS[2][0]), losses(WINDOWS[2][1])) for x in (a, b))
    assert ra is not None and rb is not None and torch.equal(ra.weights, rb.weights)
    assert torch.equal(ra.delta_o, rb.delta_o)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input_gives_clear_errors() -> None:
    head, feats, logits, y = batch(2, 6, 3)
    blend = GradientBlending(head=head)
    with pytest.raises(ValueError, match="at least two modalities"):
        blend(logits, y, features={"audio": feats["audio"]})
    with pytest.raises(ValueError, match=r"features\['visual'\].*batch"):
        blend(logits, y, features={"audio": feats["audio"], "visual": feats["visual"][:4]})
    with pytest.raises(ValueError, match=r"class indices outside \[0, 3\)"):
        blend(logits, y + 5, features=feats)
    with pytest.raises(ValueError, match="classes"):
        blend(logits[:, :2], y.clamp_max(1), features=feats)
    with pytest.raises(ValueError, match="needs unimodal logits"):
        GradientBlending()(logits, y)
    with pytest.raises(ValueError, match="'fused'"):
        GradientBlending()(logits, y, unimodal_logits={"fused": logits, "audio": logits})
    blend(logits, y, features=feats)
    with pytest.raises(ValueError, match="differ"):
        blend(logits, y, features={"visual": feats["visual"], "audio": feats["audio"]})
    with pytest.raises(ValueError, match="expected"):
        blend.update({"audio": 1.0, "visual": 1.0}, {"audio": 1.0, "visual": 1.0})
    with pytest.raises(ValueError, match="finite"):
        blend.update(losses([1.0, math.nan, 1.0]), losses([1.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="real"):
        blend.update(losses([1.0, 1.0, 1.0]), {"audio": "x", "visual": 1.0, "fused": 1.0})
    with pytest.raises(ValueError, match="reduction"):
        GradientBlending(reduction="avg")
    with pytest.raises(ValueError, match="eps"):
        GradientBlending(eps=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        GradientBlending(initial_weights=losses([-1.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------------------------
# loader helper


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleDict({"audio": nn.Linear(3, 4), "visual": nn.Linear(2, 4)})
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {m: self.drop(self.enc[m](x[m])) for m in ("audio", "visual")}
        return self.head(torch.cat(list(feats.values()), 1)), feats


def data(n: int, seed: int = 3) -> list[tuple[dict[str, Tensor], Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = {"audio": torch.randn(n, 3, generator=g), "visual": torch.randn(n, 2, generator=g)}
    y = torch.randint(0, 3, (n,), generator=g)
    return [({m: v[i : i + 4] for m, v in x.items()}, y[i : i + 4]) for i in range(0, n, 4)]


def reference_losses(model: Tiny, batches: list[Any]) -> dict[str, Tensor]:
    """Mean per-branch CE over all samples at once, eval mode, written out."""
    model.eval()
    x = {m: torch.cat([b[0][m] for b in batches]) for m in ("audio", "visual")}
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits, feats = model(x)
        zs = {**linear_split(model.head, feats), "fused": logits}
    model.train()
    return {k: ref_ce(z, y).mean() for k, z in zs.items()}


def test_branch_losses_over_a_loader() -> None:
    model = Tiny().train()
    batches = data(10)  # 4 + 4 + 2: uneven last batch

    def forward(b: Any) -> Any:
        logits, feats = model(b[0])
        return logits, b[1], feats

    got = branch_losses(forward, batches, ["audio", "visual"], head=model.head, model=model)
    assert model.training and model.drop.training  # flags restored
    want = reference_losses(model, batches)
    assert list(got) == ["audio", "visual", "fused"]
    for k in want:
        assert not got[k].requires_grad
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-6)
    blend = GradientBlending(head=model.head, modalities=["audio", "visual"])
    (again,) = blend.evaluate(forward, batches, model=model)
    assert all(torch.equal(again[k], got[k]) for k in got)
    with pytest.raises(RuntimeError, match="no batch"):
        branch_losses(forward, [], ["audio", "visual"], head=model.head)
    with pytest.raises(ValueError, match="modalities"):
        branch_losses(forward, batches, ["audio", "text"], head=model.head, model=model)
    assert model.training


# ----------------------------------------------------------------------------------------------
# DDP: the pooled helper and the weights equal one process on the global data


def _ddp_body(rank: int, world: int) -> dict[str, Any]:
    model = Tiny()
    checkpoints = []
    for step, seed in enumerate((3, 4, 5)):
        with torch.no_grad():  # a different model at each checkpoint
            for p in model.parameters():
                p.mul_(1.0 - 0.1 * step)
        train, val = data(14, seed), data(10, seed + 10)
        shard = [train[i] for i in range(rank, len(train), world)]  # 4 batches vs 3, uneven
        vshard = val[rank::world] if rank == 0 else val[rank::world][:0]  # rank 1: empty shard

        def forward(b: Any) -> Any:
            logits, feats = model(b[0])
            return logits, b[1], feats

        blend_losses = branch_losses(
            forward, shard, ["audio", "visual"], head=model.head, model=model
        )
        val_losses = branch_losses(
            forward, vshard, ["audio", "visual"], head=model.head, model=model
        )
        checkpoints.append((blend_losses, val_losses))
    blend = GradientBlending(head=model.head, modalities=["audio", "visual"])
    records = [blend.update(t, v) for t, v in checkpoints]
    local = {k: v + rank for k, v in checkpoints[0][0].items()}
    try:
        blend.update(local, checkpoints[0][1])
        raised = False
    except ValueError:
        raised = True
    return {"checkpoints": checkpoints, "records": records, "raised": raised}


def test_ddp_pooled_losses_and_weights_equal_one_process() -> None:
    results = run_distributed(_ddp_body)
    model = Tiny()
    blend = GradientBlending(modalities=["audio", "visual"])
    for step, seed in enumerate((3, 4, 5)):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 - 0.1 * step)
        val = data(10, seed + 10)
        want_t = reference_losses(model, data(14, seed))
        want_v = reference_losses(model, val[0::2])  # rank 0's shard only: rank 1's is empty
        for r in results:
            got_t, got_v = r["checkpoints"][step]
            for k in want_t:
                torch.testing.assert_close(got_t[k].double(), want_t[k], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got_v[k].double(), want_v[k], rtol=1e-5, atol=1e-6)
        rec = blend.update(want_t, want_v)
        for r in results:
            got = r["records"][step]
            assert (got is None) == (rec is None)
            if rec is not None:
                torch.testing.assert_close(got.weights, rec.weights, rtol=1e-4, atol=1e-5)
    assert torch.equal(results[0]["records"][2].weights, results[1]["records"][2].weights)
    assert results[0]["raised"] and results[1]["raised"]  # rank-local losses: every rank raises


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_makes_no_host_sync_and_windows_work() -> None:
    torch.manual_seed(0)
    head = nn.Linear(10, 3).cuda()
    enc = nn.ModuleDict({"audio": nn.Linear(6, 4), "visual": nn.Linear(5, 6)}).cuda()
    x = {"audio": torch.randn(7, 6, device="cuda"), "visual": torch.randn(7, 5, device="cuda")}
    y = torch.randint(0, 3, (7,), device="cuda")
    blend = GradientBlending(head=head, initial_weights=losses([0.2, 0.3, 0.5]))
    out: list[Tensor] = []

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            feats = {m: enc[m](v) for m, v in x.items()}
            logits = head(torch.cat(list(feats.values()), 1))
            loss = blend(logits, y, features=feats)  # under autocast, like the forward
        loss.backward()
        out.append(loss.detach())

    step()  # warm-up: the weights move to the device once
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out[-1].dtype == torch.float32 and bool(torch.isfinite(out[-1]))
    batches = [(x, y)]

    def forward(b: Any) -> Any:
        feats = {m: enc[m](v) for m, v in b[0].items()}
        return head(torch.cat(list(feats.values()), 1)), b[1], feats

    t0 = branch_losses(forward, batches, ["audio", "visual"], head=head)
    assert t0["fused"].device.type == "cuda"
    blend.update(t0, t0)
    rec = blend.update({k: v * 0.5 for k, v in t0.items()}, {k: v * 0.9 for k, v in t0.items()})
    assert rec is not None and rec.weights.device.type == "cuda"
    assert abs(float(rec.weights.sum()) - 1.0) < 1e-6
    step()
