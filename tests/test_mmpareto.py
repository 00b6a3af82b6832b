"""MMPareto: min-norm weights, the combination, the rescale, heads, N modalities, accumulation,
AMP scale equivariance, state, bad input and DDP, against formulas written out here."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses.core.gradients import Runs, min_norm_weight
from imbalance_losses.core.running import OTHER_RANK_FAILED
from imbalance_losses.methods.mmpareto import (
    MMPareto,
    MMParetoRecord,
    pareto_weights,
    rescale_factors,
)
from tests.ddp import run_distributed

NAMES = ["audio", "visual", "text"]

# ----------------------------------------------------------------------------------------------
# a small model and the reference algorithm (plain fp64 vectors, written from the paper/spec)


class Net(nn.Module):
    def __init__(self, m: int = 2, seed: int = 0, own_heads: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        dims = [5, 3, 4][:m]
        self.enc = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 4))
                for n, d in zip(NAMES[:m], dims, strict=True)
            }
        )
        self.head = nn.Linear(4 * m, 3)
        self.uni = nn.ModuleDict({n: nn.Linear(4, 3) for n in NAMES[:m]}) if own_heads else None
        self.double()

    def losses(
        self, x: dict[str, Tensor], y: Tensor, flip: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Fused CE and unimodal CEs; ``flip`` mixes in CE on shifted targets (makes conflicts)."""
        f = {n: self.enc[n](v) for n, v in x.items()}
        fused = F.cross_entropy(self.head(torch.cat(list(f.values()), 1)), y)
        uni = {}
        for i, (n, v) in enumerate(f.items()):
            if self.uni is not None:
                z = self.uni[n](v)
            else:  # the exact split of the concat head: z_m = x_m W_m^T + b / M
                w = self.head.weight[:, 4 * i : 4 * i + 4]
                z = v @ w.T + self.head.bias / len(f)
            uni[n] = (1 - flip) * F.cross_entropy(z, y) + flip * F.cross_entropy(z, (y + 1) % 3)
        return fused, uni


def data(m: int, b: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {
        n: torch.randn(b, d, generator=g, dtype=torch.float64)
        for n, d in zip(NAMES[:m], [5, 3, 4][:m], strict=True)
    }
    return x, torch.randint(0, 3, (b,), generator=g)


def reference(
    net: Net,
    x: dict[str, Tensor],
    y: Tensor,
    flip: float,
    gamma: float,
    mode: str,
    scale: float = 1.0,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Expected gradient of every parameter, and the expected per-modality decisions."""
    fused, uni = net.losses(x, y, flip)
    fused, uni = fused * scale, {k: v * scale for k, v in uni.items()}
    params = dict(net.named_parameters())
    total = fused + sum(uni.values())
    summed = dict(
        zip(
            params,
            torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True),
            strict=True,
        )
    )
    out = {k: g for k, g in summed.items() if not k.startswith("enc.") and g is not None}
    info: dict[str, Any] = {"conflict": [], "k_mm": []}
    for n in uni:
        names = [k for k in params if k.startswith(f"enc.{n}.")]
        ps = [params[k] for k in names]
        ga = torch.autograd.grad(fused, ps, retain_graph=True)
        gb = torch.autograd.grad(uni[n], ps, retain_graph=True)
        a, b = torch.cat([t.reshape(-1) for t in ga]), torch.cat([t.reshape(-1) for t in gb])
        if float(a @ b) > 0:
            k = 0.5
        else:  # brute force over a fine grid, then the exact vertex of the parabola
            aa, ab, bb = float(a @ a), float(a @ b), float(b @ b)
            k = min(max((bb - ab) / (aa + bb - 2 * ab), 0.0), 1.0)
        info["conflict"].append(float(a @ b) <= 0)
        info["k_mm"].append(k)
        ds = [2 * k * u + 2 * (1 - k) * v for u, v in zip(ga, gb, strict=True)]
        if mode == "paper":
            dn = math.sqrt(sum(float(t.pow(2).sum()) for t in ds))
            sn = math.sqrt(sum(float((u + v).pow(2).sum()) for u, v in zip(ga, gb, strict=True)))
            facs = [sn / dn if dn > 0 else 1.0] * len(ds)
        else:
            facs = []
            for u, v, t in zip(ga, gb, ds, strict=True):
                r = float((u + v).norm()) / float(t.norm()) if float(t.norm()) > 0 else 1.0
                facs.append(r if r > 1 else 1.0)
        for name, t, f in zip(names, ds, facs, strict=True):
            out[name] = gamma * f * t
    return out, info


def grads(net: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def run(net: Net, x: dict[str, Tensor], y: Tensor, flip: float, **kw: Any) -> MMParetoRecord:
    mm = MMPareto({n: net.enc[n] for n in x}, **kw)
    fused, uni = net.losses(x, y, flip)
    return mm.backward(fused, uni)


def assert_grads(got: dict[str, Tensor], want: dict[str, Tensor], **tol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k, **tol)


# ----------------------------------------------------------------------------------------------
# the formulas


vec = st.integers(1, 6).flatmap(
    lambda n: st.tuples(*[st.lists(st.floats(-10, 10), min_size=n, max_size=n)] * 2)
)


@settings(max_examples=200, deadline=None)
@given(vec)
def test_min_norm_weight_is_the_brute_force_minimiser(ab: tuple[list[float], list[float]]) -> None:
    a, b = (torch.tensor(v, dtype=torch.float64) for v in ab)
    k = float(min_norm_weight(a @ a, a @ b, b @ b))
    assert 0.0 <= k <= 1.0
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    brute = ((grid[:, None] * a + (1 - grid[:, None]) * b) ** 2).sum(1).min()
    best = float(((k * a + (1 - k) * b) ** 2).sum())
    assert best <= float(brute) + 1e-9 * (1 + float(a @ a + b @ b))


@settings(max_examples=200, deadline=None)
@given(vec)
def test_combined_direction_never_conflicts(ab: tuple[list[float], list[float]]) -> None:
    a, b = (torch.tensor(v, dtype=torch.float64) for v in ab)
    k_mm, k_m, conflict = pareto_weights(a @ a, a @ b, b @ b)
    # a zero gradient (<a, a> = 0 or <b, b> = 0) agrees with anything (issue 19, point 10)
    zero = float(a @ a) == 0 or float(b @ b) == 0
    assert float(k_mm + k_m) == 1.0 and bool(conflict) == (float(a @ b) <= 0 and not zero)
    d = 2 * k_mm * a + 2 * k_m * b
    tol = 1e-9 * float(a @ a + b @ b + 1)
    assert float(d @ a) >= -tol and float(d @ b) >= -tol
    if float(a @ b) > 0 or zero:  # agreement: the plain sum
        torch.testing.assert_close(d, a + b)


def test_non_finite_gram_gives_nan_weights() -> None:
    inf = torch.tensor(math.inf, dtype=torch.float64)
    k_mm, _, _ = pareto_weights(inf, -inf, torch.tensor(1.0, dtype=torch.float64))
    assert math.isnan(float(k_mm))


# ----------------------------------------------------------------------------------------------
# the backward on a model


@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("m,own_heads", [(2, False), (3, False), (3, True)])
def test_gradients_match_the_reference(mode: str, m: int, own_heads: bool) -> None:
    seen = set()
    for seed, flip in [(0, 0.0), (1, 0.9), (2, 1.0), (3, 0.7)]:
        net = Net(m, seed, own_heads)
        x, y = data(m, 12, seed)
        want, info = reference(net, x, y, flip, 1.5, mode)
        rec = run(net, x, y, flip, rescale=mode)
        assert_grads(grads(net), want)
        assert rec.conflict.tolist() == info["conflict"]
        torch.testing.assert_close(
            rec.k_mm.double(), torch.tensor(info["k_mm"], dtype=torch.float64)
        )
        seen.update(info["conflict"])
    assert seen == {True, False}  # both branches were exercised


def test_agreement_is_gamma_times_the_plain_sum_and_heads_get_the_plain_sum() -> None:
    net = Net(2, 0)
    x, y = data(2, 12, 0)
    fused, uni = net.losses(x, y, 0.0)
    total = fused + sum(uni.values())
    plain = dict(
        zip(
            dict(net.named_parameters()),
            torch.autograd.grad(total, list(net.parameters()), retain_graph=True),
            strict=True,
        )
    )
    for mode in ("paper", "code"):
        net.zero_grad(set_to_none=True)
        rec = run(net, x, y, 0.0, rescale=mode, gamma=2.0)
        assert not rec.conflict.any()
        for k, g in grads(net).items():
            torch.testing.assert_close(g, (2.0 if k.startswith("enc.") else 1.0) * plain[k])


def test_per_tensor_rescale_never_shrinks_and_paper_rescale_is_one_factor() -> None:
    net = Net(2, 2)
    x, y = data(2, 12, 2)
    want_code, info = reference(net, x, y, 1.0, 1.0, "code")
    want_paper, _ = reference(net, x, y, 1.0, 1.0, "paper")
    assert any(info["conflict"])
    # paper: every tensor of an encoder scaled by the same factor; code: per-tensor factors >= 1
    rec = run(net, x, y, 1.0, rescale="code", gamma=1.0)
    assert (rec.rescale >= 1).all()
    n = ["audio", "visual"][info["conflict"].index(True)]
    ratios = [
        float(want_paper[k].norm() / want_code[k].norm()) for k in want_code if f"enc.{n}" in k
    ]
    assert max(ratios) - min(ratios) > 1e-6  # the two rules differ on a conflicting step


def test_accumulation_adds_each_micro_batch_combination() -> None:
    net = Net(2, 1)
    (x1, y1), (x2, y2) = data(2, 8, 10), data(2, 8, 11)
    w1, _ = reference(net, x1, y1, 0.8, 1.5, "paper")
    w2, _ = reference(net, x2, y2, 0.8, 1.5, "paper")
    mm = MMPareto(dict(net.enc.items()), rescale="paper")
    for x, y in ((x1, y1), (x2, y2)):
        mm.backward(*net.losses(x, y, 0.8))
    assert_grads(grads(net), {k: w1[k] + w2[k] for k in w1})
    assert mm.steps == 2 and mm.last is not None and mm.last.step == 1


def test_amp_scaled_losses_give_scaled_gradients_and_overflow_stays_non_finite() -> None:
    net = Net(2, 3)
    x, y = data(2, 12, 3)
    want, _ = reference(net, x, y, 0.9, 1.5, "paper")
    mm = MMPareto(dict(net.enc.items()), rescale="paper")
    fused, uni = net.losses(x, y, 0.9)
    s = 2.0**16
    rec = mm.backward(fused * s, {k: v * s for k, v in uni.items()})
    assert_grads(grads(net), {k: s * v for k, v in want.items()})
    torch.testing.assert_close(rec.rescale, run(Net(2, 3), x, y, 0.9, rescale="paper").rescale)
    net.zero_grad(set_to_none=True)
    fused, uni = net.losses(x, y, 0.9)
    mm.backward(fused * math.inf, uni)
    g = grads(net)
    assert not torch.isfinite(g["head.weight"]).all()
    for n in ("audio", "visual"):
        assert not all(torch.isfinite(v).all() for k, v in g.items() if k.startswith(f"enc.{n}"))


def test_frozen_and_unreached_parameters_are_left_alone() -> None:
    net = Net(2, 0, own_heads=True)
    net.enc["audio"][0].bias.requires_grad_(False)
    extra = nn.Linear(2, 2).double()  # in the encoder's list, never used
    x, y = data(2, 8, 0)
    mm = MMPareto(
        {"audio": [*net.enc["audio"].parameters(), extra.weight], "visual": net.enc["visual"]}
    )
    mm.backward(*net.losses(x, y, 0.5))
    assert net.enc["audio"][0].bias.grad is None and extra.weight.grad is None
    assert net.uni is not None and net.uni["audio"].weight.grad is not None


def test_state_round_trip() -> None:
    net = Net(2, 0)
    mm = MMPareto(dict(net.enc.items()), gamma=2.5, rescale="code")
    x, y = data(2, 8, 0)
    mm.backward(*net.losses(x, y, 0.5))
    other = MMPareto(dict(net.enc.items()))
    other.load_state_dict(mm.state_dict())
    assert (
        other.state_dict()
        == mm.state_dict()
        == {"gamma": 2.5, "rescale": "code", "steps": 1, "modalities": ["audio", "visual"]}
    )
    with pytest.raises(ValueError, match="modalities"):
        MMPareto({"a": net.enc["audio"], "b": net.enc["visual"]}).load_state_dict(mm.state_dict())


def test_repr_names_the_settings() -> None:
    """Like ``ModalityGradientModulator``'s: the settings, not ``<... object at 0x...>``."""
    net = Net(2, 0)
    mm = MMPareto(dict(net.enc.items()), gamma=2.5, rescale="paper")
    assert repr(mm) == (
        f"MMPareto(modalities=['audio', 'visual'], gamma=2.5, rescale='paper', "
        f"parameters={len(list(net.enc.parameters()))}, steps=0)"
    )


def test_bad_input_raises_clear_errors() -> None:
    net = Net(2, 0)
    x, y = data(2, 8, 0)
    mm = MMPareto(dict(net.enc.items()))
    fused, uni = net.losses(x, y, 0.0)
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        mm.backward(fused, {"audio": uni["audio"]})
    with pytest.raises(ValueError, match=r"unexpected \['depth'\]"):
        mm.backward(fused, {**uni, "depth": uni["audio"]})
    with pytest.raises(
        ValueError,
        match=r"unimodal_losses\['visual'\] must be a floating-point scalar.*"
        r"\(3,\)",
    ):
        mm.backward(fused, {"audio": uni["audio"], "visual": uni["visual"].expand(3)})
    with pytest.raises(TypeError, match="fused_loss must be a Tensor"):
        mm.backward(1.0, uni)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        mm.backward(fused, [uni["audio"]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unimodal_losses\['audio'\] does not require grad"):
        mm.backward(fused, {"audio": uni["audio"].detach(), "visual": uni["visual"]})
    with pytest.raises(
        ValueError,
        match=r"unimodal_losses\['audio'\] does not reach any parameter of "
        r"modules\['audio'\]",
    ):
        mm.backward(fused, {"audio": uni["visual"] * 2, "visual": uni["visual"]})
    with pytest.raises(ValueError, match="gamma must be > 0"):
        MMPareto(dict(net.enc.items()), gamma=0.0)
    with pytest.raises(ValueError, match="rescale"):
        MMPareto(dict(net.enc.items()), rescale="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least two"):
        MMPareto({"audio": net.enc["audio"]})
    assert all(p.grad is None for p in net.parameters())  # nothing was written


def test_a_sparse_gradient_is_refused_clearly_before_anything_is_written() -> None:
    """``nn.Embedding(sparse=True)`` (a text encoder) gives sparse gradients, which the rule's
    norms and in-place combination cannot take: a ``ValueError`` naming the loss, the modality and
    the shape, not a ``NotImplementedError`` from deep inside torch; ``.grad`` left untouched."""
    torch.manual_seed(0)
    enc = {"text": nn.Embedding(10, 4, sparse=True), "audio": nn.Linear(3, 4)}
    head = nn.Linear(8, 3)
    x, y = {"text": torch.randint(0, 10, (5,)), "audio": torch.randn(5, 3)}, torch.arange(5) % 3
    f = {m: enc[m](v) for m, v in x.items()}
    fused = F.cross_entropy(head(torch.cat(list(f.values()), 1)), y)
    w = head.weight
    uni = {"text": F.cross_entropy(f["text"] @ w[:, :4].T, y),
           "audio": F.cross_entropy(f["audio"] @ w[:, 4:].T, y)}  # fmt: skip
    with pytest.raises(
        ValueError, match=r"fused_loss gives a parameter of modules\['text'\] \(shape \(10, 4\)\)"
    ):
        MMPareto(enc).backward(fused, uni)
    assert all(p.grad is None for e in (*enc.values(), head) for p in e.parameters())


class SumEnc(nn.Module):
    """An encoder whose weight is ``w1 + w2``: autograd hands out one gradient tensor for both."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, d, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(4, d, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.w1 + self.w2).T


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_aliased_gradients_get_the_rule_each_and_their_own_grad(flip: float) -> None:
    torch.manual_seed(0)
    ea, ev, head = SumEnc(5), nn.Linear(3, 4).double(), nn.Linear(8, 3).double()
    g = torch.Generator().manual_seed(1)
    xa, xv = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3).double()
    y = torch.randint(0, 3, (16,), generator=g)

    def losses() -> tuple[Tensor, dict[str, Tensor]]:
        fa, fv = ea(xa), ev(xv)
        fused = F.cross_entropy(head(torch.cat([fa, fv], 1)), y)
        za = fa @ head.weight[:, :4].T + head.bias / 2
        zv = fv @ head.weight[:, 4:].T + head.bias / 2
        la = (1 - flip) * F.cross_entropy(za, y) + flip * F.cross_entropy(za, (y + 1) % 3)
        return fused, {"audio": la, "visual": F.cross_entropy(zv, y)}

    # by hand: both parameters have the gradient u (fused) and v (unimodal) of the sum weight,
    # so the flattened encoder vectors are a = (u, u), b = (v, v)
    wsum = (ea.w1 + ea.w2).detach().requires_grad_(True)
    fa = xa @ wsum.T
    fv = ev(xv).detach()
    fused = F.cross_entropy(head(torch.cat([fa, fv], 1)), y)
    u = torch.autograd.grad(fused, wsum, retain_graph=True)[0]
    za = fa @ head.weight[:, :4].T.detach() + head.bias.detach() / 2
    la = (1 - flip) * F.cross_entropy(za, y) + flip * F.cross_entropy(za, (y + 1) % 3)
    v = torch.autograd.grad(la, wsum)[0]
    aa, ab, bb = 2 * float((u * u).sum()), 2 * float((u * v).sum()), 2 * float((v * v).sum())
    k = 0.5 if ab > 0 else min(max((bb - ab) / (aa + bb - 2 * ab), 0.0), 1.0)
    d = 2 * k * u + 2 * (1 - k) * v
    factor = math.sqrt(2 * float(((u + v) ** 2).sum())) / math.sqrt(2 * float((d * d).sum()))
    want = 1.5 * factor * d
    rec = MMPareto({"audio": ea, "visual": ev}, rescale="paper").backward(*losses())
    assert bool(rec.conflict[0]) == (ab <= 0)
    assert ea.w1.grad is not None and ea.w2.grad is not None
    assert ea.w1.grad is not ea.w2.grad
    assert ea.w1.grad.untyped_storage().data_ptr() != ea.w2.grad.untyped_storage().data_ptr()
    torch.testing.assert_close(ea.w1.grad, want)
    torch.testing.assert_close(ea.w2.grad, want)


def test_a_unimodal_loss_reaching_another_encoder_is_refused() -> None:
    net = Net(2, 0)
    x, y = data(2, 8, 0)
    fused, uni = net.losses(x, y, 0.0)
    cross = uni["visual"] + 0.5 * net.enc["audio"](x["audio"]).square().mean()
    with pytest.raises(
        ValueError,
        match=r"unimodal_losses\['visual'\] also reaches modules\['audio'\].*detach",
    ):
        MMPareto(dict(net.enc.items())).backward(fused, {"audio": uni["audio"], "visual": cross})
    assert all(p.grad is None for p in net.parameters())  # nothing was written


# ----------------------------------------------------------------------------------------------
# DDP: two gloo processes equal one process on the global batch


def _ddp_failures(
    rank: int, world: int, state: dict[str, Tensor], x: dict[str, Tensor], y: Tensor
) -> Any:
    """Steps that must fail on every rank in the same call, and a step reached on one rank only."""
    out: dict[str, Any] = {}
    net = Net(2, 0)
    net.load_state_dict(state)
    xs, ys = {k: v.chunk(world)[rank] for k, v in x.items()}, y.chunk(world)[rank]
    mm = MMPareto(dict(net.enc.items()))
    fused, uni = net.losses(xs, ys, 0.9)
    if rank == 1:  # bad input on rank 1 only: both ranks raise, no gradient all-reduce
        uni = {"audio": uni["audio"].detach(), "visual": uni["visual"]}
    try:
        mm.backward(fused, uni)
        out["bad"] = None
    except (ValueError, RuntimeError) as err:
        out["bad"] = (type(err).__name__, str(err))
    extra = nn.Linear(3, 3).double()  # rank 1's fused loss reaches a head rank 0 does not have
    fused, uni = net.losses(xs, ys, 0.9)
    if rank == 1:
        fused = fused + extra(torch.zeros(1, 3, dtype=torch.float64)).sum() * 0
    try:
        mm.backward(fused, uni)
        out["head"] = None
    except (ValueError, RuntimeError) as err:
        out["head"] = (type(err).__name__, str(err))
    out["grads_after_failures"] = grads(net)
    # a gate parameter of the audio encoder that only rank 1's losses reach this step
    gate = nn.Parameter(torch.full((3,), 0.5, dtype=torch.float64))
    gated = MMPareto({"audio": [*net.enc["audio"].parameters(), gate], "visual": net.enc["visual"]})
    fused, uni = net.losses(xs, ys, 0.9)
    if rank == 1:
        uni = {**uni, "audio": uni["audio"] + gate.square().sum()}
    gated.backward(fused, uni)
    out["gate"] = None if gate.grad is None else gate.grad.clone()
    return out


def _ddp_body(
    rank: int, world: int, state: dict[str, Tensor], x: dict[str, Tensor], y: Tensor
) -> Any:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[Any, Any] = {"failures": _ddp_failures(rank, world, state, x, y)}
    for wrapped in (False, True):  # after the failed calls: the collectives must still pair
        net = Net(2, 0)
        net.load_state_dict(state)
        xs, ys = {k: v.chunk(world)[rank] for k, v in x.items()}, y.chunk(world)[rank]
        mm = MMPareto(dict(net.enc.items()), rescale="paper")
        if wrapped:  # DDP for the broadcast; the step under no_sync so DDP adds no all-reduce
            ddp = DDP(net)
            with ddp.no_sync():
                rec = mm.backward(*ddp.module.losses(xs, ys, 0.9))
        else:
            rec = mm.backward(*net.losses(xs, ys, 0.9))
        out[wrapped] = (grads(net), rec.k_mm, rec.conflict)
    return out


def test_ddp_combined_gradient_equals_one_process_on_the_global_batch() -> None:
    net = Net(2, 0)
    x, y = data(2, 16, 4)
    want, info = reference(net, x, y, 0.9, 1.5, "paper")
    assert any(info["conflict"])
    results = run_distributed(_ddp_body, net.state_dict(), x, y)
    # each rank alone would decide differently: the averaging is what makes them equal
    alone, _ = reference(net, {k: v[:8] for k, v in x.items()}, y[:8], 0.9, 1.5, "paper")
    assert any(not torch.allclose(alone[k], want[k]) for k in want)
    f0, f1 = (r["failures"] for r in results)
    # bad input on rank 1: rank 1 raises its own error, rank 0 that another rank failed
    assert f1["bad"][0] == "ValueError" and "does not require grad" in f1["bad"][1]
    assert f0["bad"] == ("RuntimeError", OTHER_RANK_FAILED)
    # losses reaching different heads: a clear error on every rank, no all-reduce attempted
    for f in (f0, f1):
        assert f["head"][0] == "ValueError" and "different parameters" in f["head"][1]
        assert f["grads_after_failures"] == {}  # nothing written by the failed calls
    # reached by rank 1's losses only: the averaged gradient's result on both ranks alike (the
    # old code left rank 0's .grad None and wrote rank 1's: the replicas diverged)
    assert f0["gate"] is not None and f1["gate"] is not None and f0["gate"].abs().min() > 0
    torch.testing.assert_close(f0["gate"], f1["gate"], rtol=0, atol=0)
    for r in results:
        for wrapped in (False, True):
            g, k_mm, conflict = r[wrapped]
            assert_grads(g, want)
            assert conflict.tolist() == info["conflict"]
            torch.testing.assert_close(
                k_mm.double(), torch.tensor(info["k_mm"], dtype=torch.float64)
            )


# ----------------------------------------------------------------------------------------------
# issue 19: scale invariance, zero gradients, the default rule, repeated calls


def _fp32(seed: int) -> tuple[Net, dict[str, Tensor], Tensor]:
    net = Net(2, seed).float()
    x, y = data(2, 12, seed)
    return net, {k: v.float() for k, v in x.items()}, y


def _fp64_reference(
    net: Net, x: dict[str, Tensor], y: Tensor, flip: float, mode: str, scale: float
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The formula (``reference``) in fp64 on an fp64 copy of ``net``: nothing overflows there."""
    twin = Net(2, 0)
    twin.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    return reference(twin, {k: v.double() for k, v in x.items()}, y, flip, 1.5, mode, scale)


def _cosines(net: Net, x: dict[str, Tensor], y: Tensor, flip: float) -> list[float]:
    """<a, b> / (||a|| ||b||) per encoder, in fp64 from the unscaled fp32 gradients."""
    fused, uni = net.losses(x, y, flip)
    out = []
    for n in uni:
        ps = list(net.enc[n].parameters())
        ga = torch.autograd.grad(fused, ps, retain_graph=True)
        gb = torch.autograd.grad(uni[n], ps, retain_graph=True)
        a = torch.cat([t.reshape(-1).double() for t in ga])
        b = torch.cat([t.reshape(-1).double() for t in gb])
        out.append(float(a @ b / (a.norm() * b.norm())))
    return out


@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("scale", [2.0**24, 2.0**32, 1e19, 2.0**100])
def test_large_loss_scales_change_neither_cosine_nor_decision_and_stay_finite(
    mode: str, scale: float
) -> None:
    # fp32, losses scaled as a GradScaler does (2^24, 2^32) and beyond (gradient entries near
    # 1e19 and 1e30): <a, a> <b, b> and single squares overflow fp32 there
    # sum: losses summed over the batch of 12 (not averaged), times 64 (larger gradients)
    for seed, flip, sum_ in [(3, 0.9, 1.0), (2, 1.0, 1.0), (0, 0.0, 1.0), (3, 0.9, 12.0 * 64)]:
        net, x, y = _fp32(seed)
        cos = _cosines(net, x, y, flip)
        want, info = _fp64_reference(net, x, y, flip, mode, scale * sum_)
        mm = MMPareto(dict(net.enc.items()), rescale=mode)
        fused, uni = net.losses(x, y, flip)
        s = scale * sum_
        rec = mm.backward(fused * s, {k: v * s for k, v in uni.items()})
        torch.testing.assert_close(rec.cosine.double(), torch.tensor(cos, dtype=torch.float64))
        assert rec.conflict.tolist() == info["conflict"]
        torch.testing.assert_close(
            rec.k_mm.double(), torch.tensor(info["k_mm"], dtype=torch.float64), rtol=1e-4, atol=0
        )
        got = grads(net)
        assert all(torch.isfinite(g).all() for g in got.values())
        for k, w in want.items():  # relative to the tensor's size: fp32 against fp64
            torch.testing.assert_close(
                got[k].double(), w, rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=k
            )


def test_a_power_of_two_scale_scales_the_result_exactly_and_keeps_the_record() -> None:
    net, x, y = _fp32(3)
    plain = MMPareto(dict(net.enc.items()), rescale="paper")
    rec1 = plain.backward(*net.losses(x, y, 0.9))
    g1 = grads(net)
    for mode, s in (("paper", 2.0**32), ("paper", 2.0**60), ("code", 2.0**32)):
        net.zero_grad(set_to_none=True)
        if mode == "code":
            MMPareto(dict(net.enc.items()), rescale="code").backward(*net.losses(x, y, 0.9))
            g1 = grads(net)
            net.zero_grad(set_to_none=True)
        mm = MMPareto(dict(net.enc.items()), rescale=mode)
        fused, uni = net.losses(x, y, 0.9)
        rec = mm.backward(fused * s, {k: v * s for k, v in uni.items()})
        # every gradient is s times the unscaled one, exactly: so is the combination
        assert_grads(grads(net), {k: s * v for k, v in g1.items()}, rtol=0, atol=0)
        torch.testing.assert_close(rec.cosine, rec1.cosine, rtol=0, atol=0)
        torch.testing.assert_close(rec.k_mm, rec1.k_mm, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("zeroed", ["unimodal", "fused"])
def test_a_zero_gradient_agrees_and_the_encoder_gets_gamma_times_the_other(
    mode: str, zeroed: str
) -> None:
    # a unimodal loss weighted 0 by a schedule (or a fused loss weighted 0): its gradient on the
    # encoder is exactly zero. The official code's min-norm solver returns 0.001 / 0.999 there,
    # d = 0.002 x (x the other gradient), and its per-tensor rescale ||x_p|| / ||d_p|| = 500
    # restores gamma * x_p; here: agreement, d = a + b = x, factor 1, g = gamma * x
    net = Net(2, 1)
    x, y = data(2, 12, 1)
    fused, uni = net.losses(x, y, 0.9)
    if zeroed == "unimodal":
        uni = {"audio": 0.0 * uni["audio"], "visual": uni["visual"]}
    else:
        fused = 0.0 * fused
    params = dict(net.named_parameters())
    total = fused + sum(uni.values())
    plain = dict(zip(params, torch.autograd.grad(total, list(params.values()),
                                                 retain_graph=True), strict=True))  # fmt: skip
    audio = [k for k in params if k.startswith("enc.audio.")]
    other = fused if zeroed == "unimodal" else uni["audio"]
    gx = torch.autograd.grad(other, [params[k] for k in audio], retain_graph=True)
    visual = [k for k in params if k.startswith("enc.visual.")]
    gv = torch.autograd.grad(uni["visual"], [params[k] for k in visual], retain_graph=True)
    rec = MMPareto(dict(net.enc.items()), rescale=mode, gamma=1.5).backward(fused, uni)
    got = grads(net)
    for k, g in zip(audio, gx, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(got[k], 1.5 * g, msg=k)
    assert not bool(rec.conflict[0]) and float(rec.k_mm[0]) == 0.5 and float(rec.cosine[0]) == 0
    for k in ("head.weight", "head.bias"):
        torch.testing.assert_close(got[k], plain[k])
    if zeroed == "fused":  # the other encoder: gamma times its own unimodal gradient, too
        for k, g in zip(visual, gv, strict=True):
            torch.testing.assert_close(got[k], 1.5 * g, msg=k)


def test_the_default_rescale_is_the_official_codes_per_tensor_rule() -> None:
    net = Net(2, 2)
    x, y = data(2, 12, 2)
    want, info = reference(net, x, y, 1.0, 1.5, "code")
    assert any(info["conflict"])
    mm = MMPareto(dict(net.enc.items()))
    assert mm.rescale == "code" and mm.gamma == 1.5
    mm.backward(*net.losses(x, y, 1.0))
    assert_grads(grads(net), want)


def test_accumulated_micro_batches_are_not_repeats_and_a_repeat_is_refused() -> None:
    net = Net(2, 1)
    (x1, y1), (x2, y2) = data(2, 8, 10), data(2, 8, 11)
    w1, _ = reference(net, x1, y1, 0.8, 1.5, "code")
    w2, _ = reference(net, x2, y2, 0.8, 1.5, "code")
    mm = MMPareto(dict(net.enc.items()))
    fused1, uni1 = net.losses(x1, y1, 0.8)
    mm.backward(fused1, uni1, retain_graph=True)
    once = grads(net)
    # the same tensors again (retained graph): refused before anything is written or counted
    with pytest.raises(ValueError, match=r"fused_loss.*unimodal_losses\['audio'\].*already"):
        mm.backward(fused1, uni1)
    with pytest.raises(ValueError, match=r"unimodal_losses\['visual'\].*already"):
        mm.backward(net.losses(x1, y1, 0.8)[0], {**net.losses(x1, y1, 0.8)[1],
                                                 "visual": uni1["visual"]})  # fmt: skip
    assert_grads(grads(net), once, rtol=0, atol=0)
    assert mm.steps == 1
    mm.backward(*net.losses(x2, y2, 0.8))  # the next micro-batch: new tensors, accumulated
    assert_grads(grads(net), {k: w1[k] + w2[k] for k in w1})
    assert mm.steps == 2


def test_a_copy_keeps_the_settings_and_forgets_the_losses_already_passed() -> None:
    import copy
    import pickle

    net = Net(2, 0)
    x, y = data(2, 8, 0)
    mm = MMPareto(dict(net.enc.items()), gamma=2.0)
    fused, uni = net.losses(x, y, 0.5)
    mm.backward(fused, uni, retain_graph=True)
    for twin in (copy.deepcopy(mm), pickle.loads(pickle.dumps(mm))):
        assert twin.state_dict() == mm.state_dict()
    with pytest.raises(ValueError, match="already passed"):
        mm.backward(fused, uni)


# ----------------------------------------------------------------------------------------------
# issue 22: the statistics of every encoder at once (Runs, fp64 norms, the rescale factor)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4).flatmap(
        lambda counts: st.tuples(
            st.just(counts),
            st.lists(st.floats(-1e6, 1e6), min_size=sum(counts), max_size=sum(counts)),
            st.lists(st.floats(-1e6, 1e6), min_size=len(counts), max_size=len(counts)),
        )
    )
)
def test_runs_sum_mean_and_expand_are_the_per_run_loops(
    case: tuple[list[int], list[float], list[float]],
) -> None:
    counts, values, groups = case
    runs = Runs(counts)
    v = torch.tensor(values, dtype=torch.float64)
    starts = [sum(counts[:g]) for g in range(len(counts))]
    runs_of = [values[s : s + c] for s, c in zip(starts, counts, strict=True)]
    torch.testing.assert_close(runs.sum(v), torch.tensor([math.fsum(r) for r in runs_of],
                                                         dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(
        runs.mean(torch.stack([v, 2 * v]))[1],
        torch.tensor([2 * math.fsum(r) / len(r) for r in runs_of], dtype=torch.float64),
    )
    want = [g for g, c in zip(groups, counts, strict=True) for _ in range(c)]
    assert runs.expand(torch.tensor(groups)).tolist() == torch.tensor(want).tolist()
    both = torch.stack([v, 2 * v])  # the MPS path (index_add_) gives the same sums and means
    for how in ("sum", "mean"):
        torch.testing.assert_close(runs._index_reduce(both, how), runs._reduce(both, how))


def test_runs_keep_a_nan_in_its_own_run_and_refuse_empty_runs() -> None:
    got = Runs([2, 1]).sum(torch.tensor([1.0, math.nan, 3.0]))
    assert math.isnan(float(got[0])) and float(got[1]) == 3.0
    with pytest.raises(ValueError, match="at least one tensor"):
        Runs([2, 0])


def test_rescale_factors_are_the_ratio_with_the_official_floor() -> None:
    summed = torch.tensor([3.0, 1.0, 0.0, 2.0, math.nan], dtype=torch.float64)
    combined = torch.tensor([2.0, 2.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    # ||a + b|| / ||d||: 1.5, 0.5, 0/0 and 2/0 (d = 0: factor 1), NaN (factor 1)
    assert rescale_factors(summed, combined, floor_one=False).tolist() == [1.5, 0.5, 1, 1, 1]
    assert rescale_factors(summed, combined, floor_one=True).tolist() == [1.5, 1, 1, 1, 1]


def _direct(dtype: torch.dtype, a: Tensor, b: Tensor, **kw: Any) -> tuple[Tensor, MMParetoRecord]:
    """MMPareto on one encoder parameter whose fused / unimodal gradients are exactly ``a`` /
    ``b`` (and a second encoder with agreeing gradients), in ``dtype``."""
    wa = nn.Parameter(torch.zeros(a.shape, dtype=dtype))
    wv = nn.Parameter(torch.zeros(3, dtype=dtype))
    ua, ub = a.to(dtype), b.to(dtype)
    fused = (wa * ua).sum().float() + wv.sum().float()
    uni = {"audio": (wa * ub).sum().float(), "visual": wv.sum().float()}
    record = MMPareto({"audio": [wa], "visual": [wv]}, **kw).backward(fused, uni)
    assert wa.grad is not None
    return wa.grad, record


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_keep_the_decision_and_cosine_of_their_values(
    dtype: torch.dtype,
) -> None:
    # a weak unimodal gradient (||b|| = ||a|| / 100) nearly orthogonal to the fused one:
    # <a, b> from ||a + b|| must not lose it to the half type's rounding of a + b
    g = torch.Generator().manual_seed(0)
    flips = 0
    for trial in range(20):
        a = torch.randn(1024, generator=g)
        b = torch.randn(1024, generator=g)
        b = 0.01 * (b - (b @ a) / (a @ a) * a + (0.03 if trial % 2 else -0.03) * a)
        _, rec = _direct(dtype, a, b)
        ah, bh = a.to(dtype).double(), b.to(dtype).double()  # the values MMPareto received
        cos = float(ah @ bh / (ah.norm() * bh.norm()))
        assert abs(float(rec.cosine[0]) - cos) < 1e-4
        flips += bool(rec.conflict[0]) != (float(ah @ bh) <= 0)
    assert flips == 0


def test_small_fp16_gradients_under_agreement_are_exactly_gamma_times_the_sum() -> None:
    # fp16 entries near 3e-7 (subnormal): d = a + b must be formed without halving them
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(4096, generator=g) + 0.5) * 3e-7
    b = (torch.rand(4096, generator=g) + 0.5) * 3e-7
    grad, rec = _direct(torch.float16, a, b)
    want = (a.half() + b.half()) * torch.tensor(1.5, dtype=torch.float16)
    assert not bool(rec.conflict[0]) and float(rec.rescale[0]) == 1.0
    assert torch.equal(grad, want)


class Deep(Net):
    """Encoders with different numbers of parameter tensors (runs of unequal length)."""

    def __init__(self, seed: int) -> None:
        super().__init__(3, seed)
        torch.manual_seed(seed + 100)
        self.enc["audio"] = nn.Sequential(nn.Linear(5, 4, bias=False)).double()
        self.enc["text"] = nn.Sequential(
            nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)
        ).double()


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_encoders_of_different_sizes_match_the_reference(mode: str) -> None:
    seen = set()
    for seed, flip in [(0, 0.0), (1, 0.9), (2, 1.0)]:
        net = Deep(seed)
        x, y = data(3, 12, seed)
        want, info = reference(net, x, y, flip, 1.5, mode)
        rec = run(net, x, y, flip, rescale=mode)
        assert_grads(grads(net), want)
        assert rec.conflict.tolist() == info["conflict"]
        seen.update(info["conflict"])
    assert seen == {True, False}
