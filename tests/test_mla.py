"""MLA (AlternatingUnimodalAdaptation): formulas by hand, invariants, one batch by hand, DDP,
bf16 autocast, GradScaler, accumulation, resume and bad input."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import (
    AlternatingUnimodalAdaptation,
    MappingHead,
    fuse_unimodal_logits,
    fusion_weights,
    owm_alpha,
    owm_update,
    project_gradient,
)
from tests.ddp import run_distributed
from tests.pages import run_page

D, C = 4, 3


def _hand_update(p: Tensor, r: Tensor, alpha: float) -> Tensor:
    """OWM written out: k = P r, P - k k^T / (alpha + r.k), then divided by its Frobenius norm."""
    p, r = p.double(), r.double()
    k = (p * r[None, :]).sum(1)
    q = p - k[:, None] * k[None, :] / (alpha + (r * k).sum())
    return q / q.pow(2).sum().sqrt()


def _model(widths: dict[str, int], seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    enc = nn.ModuleDict({m: nn.Linear(w, D) for m, w in widths.items()})
    return nn.ModuleDict({"enc": enc, "head": nn.Linear(D, C)})


def _batch(widths: dict[str, int], n: int, seed: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, w, generator=g) for m, w in widths.items()}
    return x, torch.randint(0, C, (n,), generator=g)


def _feats(model: nn.ModuleDict, x: dict[str, Tensor]) -> dict[str, Tensor]:
    return {m: model["enc"][m](x[m]) for m in x}


W2 = {"a": 3, "v": 5}

# -- formulas ---------------------------------------------------------------------------------


def test_alpha_schedule_is_exact() -> None:
    for b, n in [(0, 10), (3, 10), (9, 10), (0, 1), (7, 8)]:
        assert owm_alpha(b, n) == 0.1 ** (1 + b / n)
    assert owm_alpha(0, 5) == 0.1 and owm_alpha(5, 10) == pytest.approx(0.1**1.5)


def test_owm_update_equals_the_formula_by_hand() -> None:
    torch.manual_seed(0)
    p = torch.eye(D)
    for alpha in (0.1, 0.05, 0.01):
        r = torch.randn(D)
        want = _hand_update(p, r, alpha)
        p = owm_update(p, r, alpha)
        torch.testing.assert_close(p.double(), want, atol=1e-6, rtol=1e-5)
        assert p.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=3 * D, max_size=3 * D),
    st.floats(1e-4, 1.0),
)
def test_projector_stays_symmetric_with_unit_norm(values: list[float], alpha: float) -> None:
    p = torch.eye(D, dtype=torch.float64)
    for r in torch.tensor(values, dtype=torch.float64).reshape(3, D):
        p = owm_update(p, r, alpha)
        torch.testing.assert_close(p, p.T)
        assert torch.linalg.matrix_norm(p).item() == pytest.approx(1.0, abs=1e-9)
        assert torch.linalg.eigvalsh(p).min().item() > -1e-9  # PSD: the denominator >= alpha


def test_projected_gradient_becomes_orthogonal_to_r_as_alpha_goes_to_zero() -> None:
    torch.manual_seed(0)
    r, grad = torch.randn(D, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64)
    norms = []
    for alpha in (1.0, 1e-2, 1e-4, 1e-8):
        p = owm_update(torch.eye(D, dtype=torch.float64), r, alpha)
        g = project_gradient(grad, p)
        torch.testing.assert_close(g, grad @ p.T)
        norms.append((g @ r).norm().item())
    assert norms == sorted(norms, reverse=True) and norms[-1] < 1e-6 * norms[0]


def _entropy_by_hand(z: Tensor) -> Tensor:
    p = z.double().exp() / z.double().exp().sum(-1, keepdim=True)
    return -(p * p.log()).sum(-1)


def test_fusion_weights_by_hand() -> None:
    torch.manual_seed(0)
    z = {"a": torch.randn(5, C), "v": torch.randn(5, C) * 3, "t": torch.randn(5, C)}
    e = torch.stack([_entropy_by_hand(x) for x in z.values()], 1)
    w = torch.exp(e.max(1, keepdim=True).values - e)  # the official form, per sample
    w = w / w.sum(1, keepdim=True)
    torch.testing.assert_close(fusion_weights(z).double(), w, atol=1e-6, rtol=1e-5)
    fused = sum(w[:, i, None] * x.double() for i, x in enumerate(z.values()))
    torch.testing.assert_close(fuse_unimodal_logits(z).double(), fused, atol=1e-5, rtol=1e-5)
    fixed = fuse_unimodal_logits(z, {"a": 0.35, "v": 0.25, "t": 0.4})
    torch.testing.assert_close(fixed, 0.35 * z["a"] + 0.25 * z["v"] + 0.4 * z["t"])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=4 * 2 * C, max_size=4 * 2 * C))
def test_fusion_weights_sum_to_one_favour_low_entropy_and_ignore_batch_mates(
    v: list[float],
) -> None:
    t = torch.tensor(v).reshape(2, 4, C)
    z = {"a": t[0], "v": t[1]}
    w = fusion_weights(z)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    e = torch.stack([_entropy_by_hand(t[0]), _entropy_by_hand(t[1])], 1).float()
    lower = e[:, 0] < e[:, 1] - 1e-4
    assert bool((w[lower, 0] >= w[lower, 1]).all())
    for i in range(4):  # each row alone gives the same weights
        torch.testing.assert_close(
            fusion_weights({m: x[i : i + 1] for m, x in z.items()}), w[i : i + 1]
        )


# -- one batch by hand -------------------------------------------------------------------------


def _hand_batch(
    model: nn.ModuleDict, x: dict[str, Tensor], y: Tensor, lr: float, p: Tensor, step: int,
    n_b: int, project: bool = True,
) -> tuple[nn.ModuleDict, Tensor]:  # fmt: skip
    """Plain SGD: features once, then per modality CE(h(f_m)), grads, OWM (not at step 0), step."""
    model = copy.deepcopy(model)
    feats = _feats(model, x)
    head = model["head"]
    for m, f in feats.items():
        params = [*model["enc"][m].parameters(), head.weight, head.bias]
        loss = F.cross_entropy(f @ head.weight.T + head.bias, y)
        grads = list(torch.autograd.grad(loss, params, retain_graph=True))
        if project and step > 0:
            alpha = 0.1 ** (1 + (step // len(feats)) % n_b / n_b)
            p = _hand_update(p, f.detach().mean(0), alpha).float()
            grads[-2] = grads[-2] @ p.T
        with torch.no_grad():
            for q, g in zip(params, grads, strict=True):
                q -= lr * g
        step += 1
    return model, p


@pytest.mark.parametrize("project", [True, False])
def test_two_batches_equal_the_formulas_by_hand(project: bool) -> None:
    model = _model(W2)
    mla = AlternatingUnimodalAdaptation(
        model["head"], batches_per_epoch=3, projection="owm" if project else "off"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref, p = copy.deepcopy(model), torch.eye(D)
    for b in range(2):
        x, y = _batch(W2, 6, seed=b)
        losses = mla.train_step(_feats(model, x), y, opt)
        ref, p = _hand_batch(ref, x, y, 0.5, p, 2 * b, 3, project)
        assert list(losses) == ["a", "v"]
    for q, want in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(q, want, atol=1e-6, rtol=1e-5)
    if project:
        torch.testing.assert_close(mla.projector, p, atol=1e-6, rtol=1e-5)
        assert mla.last is not None and mla.last.projected and mla.last.step == 3
        assert mla.last.alpha.item() == pytest.approx(0.1 ** (1 + 1 / 3))


def test_m_steps_per_batch_each_moving_only_its_encoder_and_the_head() -> None:
    widths = {"a": 3, "v": 5, "t": 2}
    model = _model(widths)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    stepped: list[int] = []
    opt.register_step_post_hook(lambda *_: stepped.append(1))
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    x, y = _batch(widths, 4)
    mla.train_step(_feats(model, x), y, opt)  # momentum buffers for everything
    assert len(stepped) == 3 and mla.steps == 3
    x, y = _batch(widths, 4, seed=2)
    feats = _feats(model, x)
    for m in widths:
        before = {n: q.detach().clone() for n, q in model.named_parameters()}
        loss = mla.loss(m, feats[m], y)
        loss.backward()
        mla.modality_step(m, opt)
        for n, q in model.named_parameters():
            moved = not torch.equal(q, before[n])
            assert moved == (n.startswith(f"enc.{m}.") or n.startswith("head.")), (m, n)
        assert all(q.grad is None for q in model.parameters())
    assert len(stepped) == 6


def test_lazy_features_equal_features_computed_once() -> None:
    model = _model(W2)
    twin = copy.deepcopy(model)
    outs = []
    for mod, lazy in ((model, False), (twin, True)):
        mla = AlternatingUnimodalAdaptation(mod["head"], batches_per_epoch=2)
        opt = torch.optim.SGD(mod.parameters(), lr=0.3)
        for b in range(2):
            x, y = _batch(W2, 5, seed=b)
            enc: Any = mod["enc"]
            lazy_feats = {m: (lambda m=m, x=x, enc=enc: enc[m](x[m])) for m in x}
            feats = lazy_feats if lazy else _feats(mod, x)
            mla.train_step(feats, y, opt)
        outs.append(mod.state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])


def test_heads_per_modality_and_mapping_head_and_predict() -> None:
    torch.manual_seed(0)
    heads = nn.ModuleDict({"a": nn.Linear(D, C), "v": nn.Linear(D, C)})
    mla = AlternatingUnimodalAdaptation(heads, batches_per_epoch=2)
    f = {"a": torch.randn(4, D, requires_grad=True), "v": torch.randn(4, D, requires_grad=True)}
    opt = torch.optim.SGD([*heads.parameters(), *f.values()], lr=0.1)
    mla.train_step(f, torch.tensor([0, 1, 2, 0]), opt)
    z = {m: heads[m](f[m]) for m in f}
    torch.testing.assert_close(mla.predict(f), fuse_unimodal_logits(z))
    fixed = AlternatingUnimodalAdaptation(heads, projection="off", fusion={"a": 0.55, "v": 0.45})
    torch.testing.assert_close(fixed.predict(f), 0.55 * z["a"] + 0.45 * z["v"])
    proj = nn.Linear(D, C)
    tokens = MappingHead(lambda fs: proj(torch.stack([x.mean(1) for x in fs.values()]).sum(0)))
    mh = AlternatingUnimodalAdaptation(tokens, batches_per_epoch=1, projected_weight=proj.weight)
    t = {"a": torch.randn(2, 7, D), "v": torch.randn(2, 3, D)}
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    mh.train_step(t, torch.tensor([0, 1]), opt)
    assert mh.predict(t).shape == (2, C)


# -- AMP, scaler, accumulation, resume ----------------------------------------------------------


def test_bf16_autocast_is_finite_with_fp32_projector() -> None:
    model = _model(W2)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b in range(3):
        x, y = _batch(W2, 6, seed=b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = mla.train_step(_feats(model, x), y, opt)
            fused = mla.predict(_feats(model, x))
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert mla.projector.dtype == torch.float32 and fused.dtype == torch.float32
    assert torch.isfinite(fused).all() and all(torch.isfinite(q).all() for q in model.parameters())
    assert torch.linalg.matrix_norm(mla.projector).item() == pytest.approx(1.0, abs=1e-5)


def test_grad_scaler_acts_on_unscaled_gradients() -> None:
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = _model(W2)
        mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for b in range(2):
            x, y = _batch(W2, 6, seed=b)
            mla.train_step(_feats(model, x), y, opt, scaler=scaler)
        runs.append(model.state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k])


def test_accumulated_micro_batches_equal_one_batch() -> None:
    model = _model(W2)
    twin = copy.deepcopy(model)
    x, y = _batch(W2, 8)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(2):
        mla.train_step(_feats(model, x), y, opt)
    acc = AlternatingUnimodalAdaptation(twin["head"], batches_per_epoch=2, modalities=["a", "v"])
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    for _ in range(2):
        for m in W2:  # modality outer, micro-batches inner: one optimiser step per modality
            for half in (slice(0, 4), slice(4, 8)):
                (acc.loss(m, twin["enc"][m](x[m][half]), y[half]) / 2).backward()
            acc.modality_step(m, opt)
    torch.testing.assert_close(acc.projector, mla.projector)
    for q, want in zip(twin.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, want)


def test_resume_is_bit_exact() -> None:
    def run(stop: int | None) -> tuple[dict[str, Tensor], Tensor]:
        model = _model(W2)
        mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        for b in range(5):
            if b == stop:
                buf = io.BytesIO()
                torch.save([model.state_dict(), opt.state_dict(), mla.state_dict()], buf)
                buf.seek(0)
                states = torch.load(buf, weights_only=False)
                model = _model(W2, seed=9)
                model.load_state_dict(states[0])
                opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
                opt.load_state_dict(states[1])
                mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=3)
                mla.load_state_dict(states[2])
            x, y = _batch(W2, 6, seed=b)
            mla.train_step(_feats(model, x), y, opt)
        return model.state_dict(), mla.projector

    want, p = run(None)
    got, q = run(2)
    assert torch.equal(p, q) and all(torch.equal(want[k], got[k]) for k in want)


# -- DDP ----------------------------------------------------------------------------------------


def _ddp_body(rank: int, world: int, state: dict[str, Tensor]) -> list[Tensor]:
    model = _model(W2)
    model.load_state_dict(state)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for b in range(3):
        x, y = _batch(W2, 8, seed=b)
        part = slice(rank * 4, rank * 4 + 4)
        mla.train_step(_feats(model, {m: v[part] for m, v in x.items()}), y[part], opt)
    return [q.detach() for q in model.parameters()] + [mla.projector]


def test_two_gloo_ranks_equal_one_process_on_the_global_batch() -> None:
    model = _model(W2)
    state = copy.deepcopy(model.state_dict())
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for b in range(3):
        x, y = _batch(W2, 8, seed=b)
        mla.train_step(_feats(model, x), y, opt)
    want = [q.detach() for q in model.parameters()] + [mla.projector]
    results = run_distributed(_ddp_body, state)
    for got in results:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))


# -- bad input ----------------------------------------------------------------------------------


def test_heads_that_do_not_score_one_modality_alone_are_refused() -> None:
    model = _model(W2)
    concat = nn.Linear(2 * D, C)
    mla = AlternatingUnimodalAdaptation(concat, projection="off")
    f = {"a": torch.randn(2, D), "v": torch.randn(2, D)}
    opt = torch.optim.SGD(concat.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"features\['a'\] has shape \(2, 4\).*in_features=8"):
        mla.train_step(f, torch.tensor([0, 1]), opt)
    with pytest.raises(TypeError, match="absent"):
        AlternatingUnimodalAdaptation(MappingHead(lambda fs: fs["a"], absent="zeros"))
    mlp = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))
    with pytest.raises(TypeError, match="projected_weight="):
        AlternatingUnimodalAdaptation(mlp, batches_per_epoch=2)
    AlternatingUnimodalAdaptation(mlp, projection="off")  # fine without the projection
    with pytest.raises(TypeError, match="scores one modality alone"):
        AlternatingUnimodalAdaptation(3)
    with pytest.raises(TypeError, match="batches_per_epoch"):
        AlternatingUnimodalAdaptation(model["head"])
    with pytest.raises(ValueError, match="projection"):
        AlternatingUnimodalAdaptation(model["head"], projection="add", batches_per_epoch=1)  # type: ignore[arg-type]


def test_bad_input_names_the_modality_and_shapes() -> None:
    model = _model(W2)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"features\['v'\] has shape \(2, 6\).*D = 4"):
        mla.train_step({"a": torch.randn(2, D), "v": torch.randn(2, 6)}, y, opt)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    with pytest.raises(ValueError, match="class indices outside"):
        mla.train_step({"a": torch.randn(2, D), "v": torch.randn(2, D)}, torch.tensor([0, 7]), opt)
    with pytest.raises(ValueError, match=r"at least two|>= 2"):
        mla.train_step({"a": torch.randn(2, D)}, y, opt)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    with pytest.raises(RuntimeError, match="modalities="):
        mla.loss("a", torch.randn(2, D), y)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2, modalities=["a", "v"])
    with pytest.raises(ValueError, match="this step is 'a'"):
        mla.loss("v", torch.randn(2, D), y)
    with pytest.raises(ValueError, match="non-finite"):
        mla.loss("a", torch.full((2, D), math.nan), y)
    with pytest.raises(RuntimeError, match="without a loss"):
        mla.modality_step("a", opt)
    with pytest.raises(ValueError, match="batch"):
        mla.loss("a", torch.randn(3, D), y)


@pytest.mark.parametrize(
    ("fusion", "error", "message"),
    [
        ({"a": -0.5, "v": 1.5}, ValueError, r"fusion\['a'\] must be >= 0"),
        ({"a": 0.5, "v": math.nan}, ValueError, r"fusion\['v'\]"),
        ({"a": "0.5", "v": 0.5}, TypeError, r"fusion\['a'\]"),
        ("mean", ValueError, r"fusion must be 'entropy' or a mapping"),
    ],
)
def test_bad_fusion_is_refused_at_construction(fusion: Any, error: type, message: str) -> None:
    """Hyper-parameters are checked when the object is built, not at the first predict()
    after training."""
    head = _model(W2)["head"]
    with pytest.raises(error, match=message):
        AlternatingUnimodalAdaptation(head, batches_per_epoch=2, fusion=fusion)
    fixed = AlternatingUnimodalAdaptation(head, batches_per_epoch=2, fusion={"a": 0.55, "v": 0.45})
    assert fixed.fusion == {"a": 0.55, "v": 0.45}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda f: f[:3], r"features\['v'\] has shape \(3, 4\)"),  # another batch size
        (lambda f: f.detach().index_fill(1, torch.tensor([1]), math.nan), r"'v'.*non-finite"),
        (lambda f: torch.cat([f, f], 1), r"features\['v'\] has shape \(4, 8\).*D = 4"),
    ],
)
def test_a_bad_later_modality_is_refused_before_any_step(bad: Any, message: str) -> None:
    """A batch whose second modality is bad: a ValueError naming it, raised before the first
    modality's optimiser step, so the batch changes nothing and the next good batch trains (the
    object is not left half-way through a batch, refusing every later batch)."""
    model = _model(W2)
    mla = AlternatingUnimodalAdaptation(model["head"], batches_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(W2, 4)
    feats = _feats(model, x)
    with pytest.raises(ValueError, match=message):
        mla.train_step({"a": feats["a"], "v": bad(feats["v"])}, y, opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert mla.steps == 0 and torch.equal(mla.projector, torch.eye(D))
    mla.train_step(_feats(model, x), y, opt)  # the next batch starts with 'a' again
    assert mla.steps == 2


def test_the_docs_page_runs(tmp_path: Any) -> None:
    ns = run_page("mla.md", tmp_path)
    assert ns["mla"].steps == 8 and ns["pred"].shape == (8,)
    assert set(ns["losses"]) == {"audio", "visual"}
