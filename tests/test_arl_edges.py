"""ARLLoss edges (issue 15): empty batches, reduction, reuse, numerical edges, input checks,
ignore_index, and a failing DDP rank. Reference values are written here from the formulas."""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import unimodal_logits
from imbalance_losses.methods.arl import ARLLoss, arl_coefficients, inverse_variance_weights
from tests.ddp import run_distributed
from tests.test_arl import (
    TwoTower,
    batch_data,
    grad_of,
    leaf,
    linear_split,
    make_setup,
    ref_coefficients,
    ref_entropy,
    ref_size,
)


def ref_nll(z: Tensor, y: Tensor) -> Tensor:
    """Per-sample -log softmax(z)[y] in float64; 0 where y is ignored (negative)."""
    logp = z.double().log_softmax(-1)
    picked = -logp.gather(1, y.clamp_min(0)[:, None])[:, 0]
    return torch.where(y >= 0, picked, torch.zeros_like(picked))


def state(crit: ARLLoss) -> dict[str, Any]:
    return copy.deepcopy(crit.state_dict()["_extra_state"])


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return repr(a) == repr(b)


def empty_like(feats: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v[:0].clone().requires_grad_() for k, v in feats.items()}


# ----------------------------------------------------------------------------------------------
# 1. empty batches


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_empty_batch_is_a_zero_loss_and_no_step(reduction: str, momentum: float | None) -> None:
    head, feats, y = make_setup(m=2)
    crit = ARLLoss(head=head, reduction=reduction, momentum=momentum)  # type: ignore[arg-type]
    x = leaf(feats)
    crit(head(torch.cat(list(x.values()), 1)), y, x).sum().backward()
    before, last = state(crit), crit.last
    head.zero_grad()
    e = empty_like(feats)
    z = head(torch.cat(list(e.values()), 1))
    loss = crit(z, y[:0], e)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.equal(loss.detach(), torch.zeros_like(loss)) and loss.requires_grad
    loss.sum().backward()
    for p in head.parameters():  # connected to the graph: zero gradients, not None
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    assert crit.steps == 1 and crit.last is last and same_state(state(crit), before)


def test_empty_batch_with_a_user_criterion_and_precomputed_logits() -> None:
    """nn.CrossEntropyLoss() gives NaN (0 / 0) on B = 0; ARLLoss does not call it there."""
    crit = ARLLoss(nn.CrossEntropyLoss())
    z = torch.zeros(0, 3, requires_grad=True)
    zs = {"a": torch.zeros(0, 3, requires_grad=True), "b": torch.zeros(0, 3)}
    f = {"a": torch.zeros(0, 2, requires_grad=True), "b": torch.zeros(0, 2)}
    loss = crit(z, torch.zeros(0, dtype=torch.long), f, unimodal_logits=zs)
    assert loss.shape == () and float(loss.detach()) == 0.0
    loss.backward()
    assert z.grad is not None and crit.steps == 0 and crit.last is None


def test_empty_micro_batches_in_encoders_mode() -> None:
    model = TwoTower()
    arl = ARLLoss(head=model.head, encoders=dict(model.enc.items()))
    ref = ARLLoss(head=model.head, encoders=dict(model.enc.items()))
    inputs, y = batch_data(6)
    # an empty step alone: step() is a no-op (no count, no scaling, no record)
    z, f = model({k: v[:0] for k, v in inputs.items()})
    arl(z, y[:0], f).backward()
    model.zero_grad()
    z, f = model(inputs)
    F.cross_entropy(z, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    assert arl.step() is None and arl.steps == 0 and arl.last is None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    # an empty micro-batch beside real ones changes nothing
    for crit, parts in ((arl, [inputs, None, inputs]), (ref, [inputs, inputs])):
        for part in parts:
            if part is None:
                z, f = model({k: v[:0] for k, v in inputs.items()})
                crit(z, y[:0], f)
            else:
                z, f = model(part)
                crit(z, y, f)
    a, b = arl.step(), ref.step()
    assert a is not None and b is not None and arl.steps == 1
    assert torch.equal(a.coefficients, b.coefficients) and torch.equal(a.variances, b.variances)
    with pytest.raises(RuntimeError, match="without a training-mode forward"):
        arl.step()  # nothing at all since the last step (not even an empty batch)


# ----------------------------------------------------------------------------------------------
# 2. reduction


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 4),
    st.floats(0.0, 3.0),
    st.sampled_from(["mean", "sum", "none"]),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.integers(0, 2**16),
)
def test_reduction_matches_the_formula(
    m: int, gamma: float, reduction: str, ignored: list[bool], seed: int
) -> None:
    """l_b = nll(z)_b + gamma sum_m nll(z_m)_b (0 for ignored b); mean = sum_b l_b / #counted."""
    head, feats, y = make_setup(m=m, seed=seed)
    y = torch.where(torch.tensor(ignored), -100, y)
    z = head(torch.cat(list(feats.values()), 1))
    crit = ARLLoss(head=head, gamma=gamma, reduction=reduction)  # type: ignore[arg-type]
    loss = crit(z, y, feats)
    zs = linear_split(head, feats)
    per = ref_nll(z, y) + gamma * sum(ref_nll(v, y) for v in zs.values())
    counted = sum(not i for i in ignored)
    want = {"none": per, "sum": per.sum(), "mean": per.sum() / max(counted, 1)}[reduction]
    torch.testing.assert_close(loss, want)
    assert torch.isfinite(loss).all()  # every sample ignored: mean is 0, not 0 / 0


def test_reduction_and_the_criterion() -> None:
    head, feats, y = make_setup(m=2)
    z = head(torch.cat(list(feats.values()), 1))
    crit = ARLLoss(nn.CrossEntropyLoss(reduction="sum"), head=head)
    assert crit.reduction == "sum"
    agree = ARLLoss(nn.CrossEntropyLoss(reduction="sum"), reduction="sum", head=head)
    torch.testing.assert_close(crit(z, y, feats), agree(z, y, feats))
    assert ARLLoss().reduction == "mean" and ARLLoss(reduction="none").reduction == "none"
    with pytest.raises(ValueError, match=r"reduction='none' conflicts.*reduction='sum'"):
        ARLLoss(nn.CrossEntropyLoss(reduction="sum"), reduction="none")
    with pytest.raises(ValueError, match="no reduction attribute"):
        ARLLoss(lambda a, b: F.cross_entropy(a, b), reduction="mean")
    assert ARLLoss(lambda a, b: F.cross_entropy(a, b)).reduction is None
    with pytest.raises(ValueError, match="reduction must be"):
        ARLLoss(reduction="avg")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# 3. reuse: the same tensors twice, no_grad in training mode


def test_same_features_twice_scale_once_and_count_one_step() -> None:
    head, feats, y = make_setup(m=2)
    plain_crit = ARLLoss(head=head).eval()
    xp = leaf(feats)
    plain_crit(head(torch.cat(list(xp.values()), 1)), y, xp).backward()
    crit = ARLLoss(head=head)
    x = leaf(feats)
    z = head(torch.cat(list(x.values()), 1))
    logged = crit(z, y, x).detach()  # a logging call
    loss = crit(z, y, x)  # the real one
    torch.testing.assert_close(loss.detach(), logged)
    assert crit.steps == 1 and crit.last is not None
    beta = crit.last.coefficients
    loss.backward()
    for i, k in enumerate(x):
        torch.testing.assert_close(grad_of(x[k]), (1 + beta[i]) * grad_of(xp[k]))
    # after backward, the same leaf tensors start a new step, scaled once again
    for k in x:
        x[k].grad = None
    crit(head(torch.cat(list(x.values()), 1)), y, x).backward()
    assert crit.steps == 2
    beta2 = crit.last.coefficients
    for i, k in enumerate(x):
        torch.testing.assert_close(grad_of(x[k]), (1 + beta2[i]) * grad_of(xp[k]))


def test_repeat_during_warmup_counts_one_step_and_a_mix_is_refused() -> None:
    head, feats, y = make_setup(m=2)
    crit = ARLLoss(head=head, warmup_steps=3)
    x = leaf(feats)
    z = head(torch.cat(list(x.values()), 1))
    crit(z, y, x)
    crit(z, y, x)
    assert crit.steps == 1
    other = {"audio": x["audio"], "visual": feats["visual"].clone().requires_grad_()}
    with pytest.raises(ValueError, match=r"\['audio'\] were already passed.*\['visual'\] are new"):
        crit(head(torch.cat(list(other.values()), 1)), y, other)
    assert crit.steps == 1


def test_encoders_mode_repeat_adds_the_statistics_once() -> None:
    model = TwoTower()
    arl = ARLLoss(head=model.head, encoders=dict(model.enc.items()))
    ref = ARLLoss(head=model.head, encoders=dict(model.enc.items()))
    (x1, y1), (x2, y2) = batch_data(4, 1), batch_data(6, 2)
    for crit, repeat in ((arl, True), (ref, False)):
        z1, f1 = model(x1)
        z2, f2 = model(x2)
        crit(z1, y1, f1)
        if repeat:
            crit(z1, y1, f1)  # logging call on the same tensors: not a second micro-batch
        crit(z2, y2, f2)
    a, b = arl.step(), ref.step()
    assert a is not None and b is not None
    assert torch.equal(a.variances, b.variances) and torch.equal(a.coefficients, b.coefficients)
    z1, f1 = model(x1)
    arl(z1, y1, f1)
    with pytest.raises(ValueError, match=r"\['audio'\] were already passed.*since the last step"):
        arl(z1, y1, {"audio": f1["audio"], "visual": f1["visual"].clone()})


def test_training_forward_without_grad_acts_as_eval_with_a_warning() -> None:
    head, feats, y = make_setup(m=2)
    for encoders in (None, {"audio": nn.Linear(2, 3), "visual": nn.Linear(2, 3)}):
        crit = ARLLoss(head=head, momentum=0.5, encoders=encoders)
        crit(head(torch.cat(list(feats.values()), 1)), y, feats)
        if encoders is not None:
            crit.step()
        before, last = state(crit), crit.last
        want = ARLLoss(head=head).eval()(head(torch.cat(list(feats.values()), 1)), y, feats)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx(), pytest.warns(RuntimeWarning, match="gradients are disabled") as caught:
                loss = crit(head(torch.cat(list(feats.values()), 1)), y, feats)
            assert caught[0].filename == __file__
            torch.testing.assert_close(loss, want.detach())
            assert crit.steps == 1 and crit.last is last and same_state(state(crit), before)


def test_a_loss_with_live_hooks_can_be_copied_and_pickled() -> None:
    head, feats, y = make_setup(m=2)
    crit = ARLLoss(head=head)
    x = leaf(feats)
    crit(head(torch.cat(list(x.values()), 1)), y, x)
    clone = copy.deepcopy(crit)
    assert clone.steps == 1 and pickle.loads(pickle.dumps(crit)).steps == 1


# ----------------------------------------------------------------------------------------------
# 4. numerical edges: hyper-parameters


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
        ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
        ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ({"gamma": float("inf")}, ValueError, "gamma must be finite"),
        ({"gamma": float("nan")}, ValueError, "gamma must be finite"),
        ({"gamma": "1"}, TypeError, "gamma must be a real number"),
        ({"floor": float("nan")}, ValueError, "floor must be finite"),
        ({"floor": 0.0}, ValueError, "floor must be > 0"),
        ({"floor": 0.6}, ValueError, "floor must be <= 0.5"),
        ({"momentum": float("nan")}, ValueError, "momentum must be finite"),
        ({"momentum": 1.0}, ValueError, "momentum must be < 1"),
        ({"momentum": True}, TypeError, "momentum must be a real number"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps must be an integer"),
        ({"warmup_steps": True}, TypeError, "warmup_steps must be an integer"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps must be an integer >= 0"),
    ],
)
def test_hyper_parameters_are_validated(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ARLLoss(**kwargs)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((float("inf"), 0.3), ValueError, "temperature must be finite"),
        ((float("nan"), 0.3), ValueError, "temperature must be finite"),
        ((8.0, float("nan")), ValueError, "floor .* must be finite"),
        ((8.0, 0.4), ValueError, r"floor \(for M = 3 modalities\) must be <= 0.333"),
        (("8", 0.3), TypeError, "temperature must be a real number"),
    ],
)
def test_coefficient_function_parameters_are_validated(
    args: tuple[Any, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        arl_coefficients(torch.ones(3), torch.ones(3), *args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_coefficient_function_statistics_are_validated(bad: float) -> None:
    bad_v = torch.tensor([1.0, bad])
    for v, c, name in ((bad_v, torch.ones(2), "variances"), (torch.ones(2), bad_v, "dependence")):
        with pytest.raises(ValueError, match=name):
            arl_coefficients(v, c, 8.0, 0.3)
    with pytest.raises(ValueError, match="positive and finite"):
        inverse_variance_weights(torch.tensor([1.0, bad]))
    with pytest.raises(TypeError, match="must be a Tensor"):
        inverse_variance_weights([1.0, 2.0])  # type: ignore[arg-type]


@given(
    st.lists(st.floats(0.01, 3.0), min_size=2, max_size=4),
    st.floats(0.0, 1.7e308),
)
def test_any_finite_temperature_gives_finite_coefficients(v: list[float], t: float) -> None:
    """beta = softmax(T s) for every finite T: finite, summing to 1, and for huge T all the
    weight on the largest scores (the limit of the softmax)."""
    m = len(v)
    c = list(reversed(v))
    out = arl_coefficients(torch.tensor(v), torch.tensor(c), t, 0.6 / m)
    beta = out.coefficients
    assert torch.isfinite(beta).all() and abs(float(beta.sum()) - 1) < 1e-5
    ref = ref_coefficients(v, c, 0.0, 0.6 / m)[2]  # scores do not depend on T
    top = [i for i in range(m) if ref[i] >= max(ref) - 1e-6]
    if t > 1e12:
        assert float(beta[top].sum()) > 1 - 1e-5


def test_loss_with_a_huge_temperature_is_finite() -> None:
    head, feats, y = make_setup(m=2, dtype=torch.float32)
    crit = ARLLoss(head=head, temperature=1e300)
    x = leaf(feats)
    crit(head(torch.cat(list(x.values()), 1)), y, x).backward()
    assert crit.last is not None and torch.isfinite(crit.last.coefficients).all()
    assert all(torch.isfinite(grad_of(v)).all() for v in x.values())


# ----------------------------------------------------------------------------------------------
# 5. dtype and device of the features against the head


def test_feature_dtype_errors_name_the_modality() -> None:
    head = nn.Linear(5, 3)
    good = {"audio": torch.randn(4, 2), "visual": torch.randn(4, 3)}
    for dtype in (torch.float64, torch.float16):
        bad = {**good, "visual": good["visual"].to(dtype)}
        with pytest.raises(TypeError, match=rf"features\['visual'\] of shape \(4, 3\) are {dtype}"
                           r".*nn.Linear head are torch.float32.*torch.autocast"):  # fmt: skip
            unimodal_logits(head, bad)
    ints = {**good, "audio": torch.ones(4, 2, dtype=torch.long)}
    heads = nn.ModuleDict({"audio": nn.Linear(2, 3), "visual": nn.Linear(3, 3)})
    mlp = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    for h in (head, heads, mlp, lambda t: t[:, :3]):
        with pytest.raises(
            TypeError, match=r"features\['audio'\] of shape \(4, 2\) are torch.int64"
        ):
            unimodal_logits(h, ints)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"features\['visual'\].*heads\['visual'\] are torch.float32"
    ):
        unimodal_logits(heads, {**good, "visual": good["visual"].double()})
    with pytest.raises(TypeError, match=r"Sequential\) are torch.float32"):
        unimodal_logits(mlp, {k: v.double() for k, v in good.items()})
    # a plain callable has no dtype: only the floating-point check
    out = unimodal_logits(lambda t: t[:, :3], {k: v.double() for k, v in good.items()})
    assert out["audio"].dtype == torch.float64
    # under autocast the dtypes may differ (autocast casts inside the matmul)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unimodal_logits(head, {k: v.bfloat16() for k, v in good.items()})
    assert out["audio"].dtype == torch.bfloat16


def test_feature_device_errors_name_both_devices() -> None:
    head = nn.Linear(5, 3, device="meta")
    feats = {"audio": torch.randn(4, 2), "visual": torch.randn(4, 3)}
    with pytest.raises(ValueError, match=r"features\['audio'\] of shape \(4, 2\) are on cpu.*meta"):
        unimodal_logits(head, feats)
    heads = {"audio": nn.Linear(2, 3), "visual": nn.Linear(3, 3, device="meta")}
    with pytest.raises(ValueError, match=r"features\['visual'\].*heads\['visual'\] are on meta"):
        unimodal_logits(heads, feats)


def test_arl_refuses_float64_and_integer_features_with_an_fp32_head() -> None:
    head = nn.Linear(5, 3)
    z = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    for feats, match in (
        ({"a": torch.randn(4, 2).double(), "v": torch.randn(4, 3)}, r"\['a'\].*float64"),
        ({"a": torch.randn(4, 2), "v": torch.ones(4, 3, dtype=torch.int32)}, r"\['v'\].*int32"),
    ):
        crit = ARLLoss(head=head)
        with pytest.raises(TypeError, match=match):
            crit(z, y, feats)
        assert crit.steps == 0
    zs = {"a": torch.randn(4, 3), "v": torch.randn(4, 3)}
    with pytest.raises(TypeError, match=r"features\['v'\].*torch.int64"):
        ARLLoss()(z, y, {"a": torch.randn(4, 2), "v": torch.ones(4, 3).long()}, unimodal_logits=zs)


# ----------------------------------------------------------------------------------------------
# 6. ignore_index


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=6, max_size=6), st.integers(0, 2**16))
def test_ignored_targets_are_accepted_and_left_out_of_the_statistics(
    ignored: list[bool], seed: int
) -> None:
    head, feats, y = make_setup(m=3, seed=seed)
    keep = [i for i, ig in enumerate(ignored) if not ig]
    for criterion, ignore in ((None, -100), (nn.CrossEntropyLoss(ignore_index=255), 255)):
        y_ign = torch.where(torch.tensor(ignored), ignore, y)
        crit = ARLLoss(criterion, head=head)
        x = leaf(feats)
        loss = crit(head(torch.cat(list(x.values()), 1)), y_ign, x)
        assert crit.last is not None and crit.steps == 1
        if not keep:
            continue  # every sample ignored: V = c = 0 (uniform coefficients), nothing to scale
        torch.testing.assert_close(loss.isfinite(), torch.tensor(True))
        zs = {k: v[keep] for k, v in linear_split(head, feats).items()}
        v = [ref_entropy(z) for z in zs.values()]
        c = [ref_size(z) for z in zs.values()]
        torch.testing.assert_close(crit.last.variances, torch.tensor(v, dtype=torch.float32))
        torch.testing.assert_close(
            crit.last.coefficients, torch.tensor(ref_coefficients(v, c, 8.0, 0.2)[3])
        )


def test_ignore_index_comes_from_the_criterion() -> None:
    head, feats, y = make_setup(m=2)
    z = head(torch.cat(list(feats.values()), 1))
    with pytest.raises(ValueError, match=r"outside \[0, 4\) \(or ignore_index=255\)"):
        ARLLoss(nn.CrossEntropyLoss(ignore_index=255), head=head)(z, y.clone().fill_(-100), feats)
    with pytest.raises(ValueError, match=r"outside \[0, 4\) for"):  # no ignore_index attribute
        ARLLoss(lambda a, b: F.cross_entropy(a, b), head=head)(z, y.clone().fill_(-100), feats)
    assert ARLLoss().ignore_index == -100


def test_ignored_samples_leave_the_ema_unchanged() -> None:
    head, f1, y1 = make_setup(m=2, seed=1)
    crit = ARLLoss(head=head, momentum=0.5)
    crit(head(torch.cat(list(f1.values()), 1)), y1, f1)
    assert crit.last is not None
    before = crit.last.variances.clone()
    _, f2, y2 = make_setup(m=2, seed=2)
    crit(head(torch.cat(list(f2.values()), 1)), torch.full_like(y2, -100), f2)
    assert crit.steps == 2 and torch.equal(crit.last.variances, before)


def test_ignored_samples_in_encoders_mode_accumulate_counted_samples_only() -> None:
    model = TwoTower()
    arl = ARLLoss(head=model.head, encoders=dict(model.enc.items()))
    inputs, y = batch_data(8)
    y_ign = y.clone()
    y_ign[5:] = -100
    z, f = model(inputs)
    arl(z, y_ign, f)
    rec = arl.step()
    assert rec is not None
    zs = {k: v[:5] for k, v in unimodal_logits(model.head, f).items()}
    v = [ref_entropy(z) for z in zs.values()]
    torch.testing.assert_close(rec.variances, torch.tensor(v, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# 1 + 7 under DDP: an empty rank, and a rank whose input fails validation


def _one_process_records(data: dict[str, Any]) -> list[Tensor]:
    """The hook-mode run of ``_edge_body`` in one process on the samples that exist."""
    head = nn.Linear(5, 3)
    head.load_state_dict(data["head"])
    crit = ARLLoss(head=head, momentum=0.5)
    out = []
    for a, v, y in data["global"]:
        x = {"a": a.clone().requires_grad_(), "v": v.clone().requires_grad_()}
        crit(head(torch.cat(list(x.values()), 1)), y, x).backward()
        assert crit.last is not None
        out.append(torch.cat([crit.last.coefficients, crit.last.variances, grad_of(x["a"])[0]]))
    return out


def _edge_body(rank: int, world: int, data: dict[str, Any]) -> dict[str, Any]:
    head = nn.Linear(5, 3)
    head.load_state_dict(data["head"])
    crit = ARLLoss(head=head, momentum=0.5)
    out: dict[str, Any] = {"records": [], "errors": [], "steps": []}

    def forward(a: Tensor, v: Tensor, y: Tensor) -> None:
        x = {"a": a.clone().requires_grad_(), "v": v.clone().requires_grad_()}
        loss = crit(head(torch.cat(list(x.values()), 1)), y, x)
        assert torch.isfinite(loss)
        loss.backward()
        assert crit.last is not None
        first = grad_of(x["a"])[0] if a.shape[0] else torch.zeros(2)
        out["records"].append(torch.cat([crit.last.coefficients, crit.last.variances, first]))

    def attempt(fn: Any) -> None:
        try:
            fn()
            out["errors"].append(None)
        except (RuntimeError, TypeError, ValueError) as err:
            out["errors"].append(f"{type(err).__name__}: {err}")

    # step 1: rank 1 fails validation on the very first call (M from the mapping)
    bad_first = {"a": torch.ones(2, 2, dtype=torch.long), "v": torch.randn(2, 3)}
    attempt(lambda: forward(*data["r0"][0]) if rank == 0 else crit(
        torch.randn(2, 3), torch.zeros(2, dtype=torch.long), bad_first))  # fmt: skip
    out["steps"].append(crit.steps)
    # step 2: a real step; rank 1 is empty (B = 0) and still joins
    forward(*data[f"r{rank}"][1])
    # step 3: rank 1 passes NaN logits (M from the earlier steps); both raise, both catch
    nan = torch.full((2, 3), float("nan"))
    ok = {"a": torch.randn(2, 2), "v": torch.randn(2, 3)}
    attempt(lambda: forward(*data["r0"][0]) if rank == 0 else crit(
        nan, torch.zeros(2, dtype=torch.long), ok))  # fmt: skip
    out["steps"].append(crit.steps)
    # step 4: both have samples: still in sync, equal to one process
    forward(*data[f"r{rank}"][2])
    # step 5: both empty: no step anywhere, the record stays that of step 4
    last = crit.last
    a, v, y0 = data["empty"]
    x = {"a": a.clone().requires_grad_(), "v": v.clone().requires_grad_()}
    loss = crit(head(torch.cat(list(x.values()), 1)), y0, x)
    loss.backward()
    out["empty_step"] = (float(loss), crit.last is last)
    out["steps"].append(crit.steps)
    # encoders mode: empty forwards on every rank make step() a no-op on every rank
    model = TwoTower()
    arl = ARLLoss(head=model.head, encoders=dict(model.enc.items()))
    inputs, y = batch_data(4)
    z, f = model({k: v[:0] for k, v in inputs.items()})
    arl(z, y[:0], f).backward()
    out["encoders_empty"] = (arl.step() is None, arl.steps)
    # ... and rank 1 alone empty: the step counts on both ranks, decided by rank 0's samples
    z, f = model({k: v[: 4 * (1 - rank)] for k, v in inputs.items()})
    arl(z, y[: 4 * (1 - rank)], f).backward()
    rec = arl.step()
    out["encoders_one_empty"] = None if rec is None else rec.coefficients
    return out


def test_ddp_empty_rank_and_failing_rank() -> None:
    g = torch.Generator().manual_seed(11)
    head = nn.Linear(5, 3)

    def batch(n: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(n, 2, generator=g), torch.randn(n, 3, generator=g) * 2,
                torch.randint(0, 3, (n,), generator=g))  # fmt: skip

    r0 = [batch(3) for _ in range(3)]
    r1 = [batch(2), batch(0), batch(4)]
    data = {"head": head.state_dict(), "r0": r0, "r1": r1, "empty": batch(0)}
    res = run_distributed(_edge_body, data)
    # one process on the samples that exist: step 2 is rank 0's half; step 4 both halves
    data["global"] = [r0[1], tuple(torch.cat([a, b]) for a, b in zip(r0[2], r1[2], strict=True))]
    want = _one_process_records(data)
    m = 2
    for rank, r in enumerate(res):
        assert r["steps"] == [0, 1, 2]
        e1, e3 = r["errors"]
        if rank == 1:
            assert e1.startswith("TypeError") and "torch.int64" in e1
            assert e3.startswith("ValueError") and "non-finite" in e3
        else:
            for e in (e1, e3):
                assert e.startswith("RuntimeError") and "another rank" in e
        recs = r["records"]
        assert len(recs) == 2  # steps 2 and 4
        torch.testing.assert_close(recs[0][: 2 * m], want[0][: 2 * m])
        torch.testing.assert_close(recs[1][: 2 * m], want[1][: 2 * m])
        assert r["empty_step"] == (0.0, True)
        assert r["encoders_empty"] == (True, 0)
    # step 2: rank 0 holds every sample, so its (local mean) gradient is the one-process one
    torch.testing.assert_close(res[0]["records"][0][2 * m :], want[0][2 * m :])
    assert torch.equal(res[0]["encoders_one_empty"], res[1]["encoders_one_empty"])
    model = TwoTower()
    one = ARLLoss(head=model.head, encoders=dict(model.enc.items()))
    inputs, y = batch_data(4)
    z, f = model(inputs)
    one(z, y, f)
    rec = one.step()
    assert rec is not None
    torch.testing.assert_close(res[0]["encoders_one_empty"], rec.coefficients)


def test_warnings_are_not_raised_for_a_plain_training_step() -> None:
    head, feats, y = make_setup(m=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = leaf(feats)
        ARLLoss(head=head)(head(torch.cat(list(x.values()), 1)), y, x).backward()
