"""SustainedBoostingLoss edge cases (issue 15): the check schedule, empty batches, Adam on heads
added late, ``reduction``, ``ignore_index``, hyper-parameter validation, state, and under DDP an
empty rank and a failing rank (one launch).

Expected values come from formulas written here (cross-entropy from ``log_softmax``, Adam's first
step from its definition), reading the module's parameters directly.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import SustainedBoostingLoss
from tests.ddp import run_distributed

WIDTHS = {"audio": 5, "visual": 7}

# Several tests grow heads with no optimiser at all; the binding reminder is tested below.
pytestmark = pytest.mark.filterwarnings(
    "ignore:SustainedBoostingLoss switched on a head:RuntimeWarning"
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _feats(batch: int, seed: int = 0, widths: dict[str, int] = WIDTHS) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in widths.items()}


def _head(boost: SustainedBoostingLoss, i: int, j: int, x: Tensor) -> Tensor:
    """z_mj = W2 relu(x W_mj^T + b_mj) + b2, from the module's parameters."""
    w, b = boost.head_weight[i][j], boost.head_bias[i][j]
    z: Tensor = boost.output_layer(torch.relu(x @ w.T + b))
    return z


def _ce(z: Tensor, t: Tensor) -> Tensor:
    """Per-sample cross-entropy against a soft (possibly unnormalised) target ``[B, C]``."""
    return -(t * torch.log_softmax(z, dim=-1)).sum(-1)


def _per_sample(boost: SustainedBoostingLoss, x: dict[str, Tensor], t: Tensor) -> Tensor:
    """The spec's l_b = sum_m [CE(Z_m) + CE(prev) + CE(z_n, t - lam t ⊙ p)]_b for soft t."""
    total = torch.zeros(t.shape[0], dtype=t.dtype)
    for i, m in enumerate(boost.modalities):
        zs = [_head(boost, i, j, x[m]) for j in range(boost.num_heads[m])]
        term = _ce(sum(zs[1:], zs[0]), t)
        if len(zs) > 1:
            prev = sum(zs[1:-1], zs[0])
            p = torch.softmax(prev, -1).detach()
            term = term + _ce(prev, t) + _ce(zs[-1], t - boost.lam * t * p)
        total = total + term
    return total


def _boost(**kwargs: Any) -> SustainedBoostingLoss:
    args: dict[str, Any] = {"hidden": 6, "check_every": "manual"} | kwargs
    return SustainedBoostingLoss(3, WIDTHS, **args)


# --------------------------------------------------------------------------------- 1. schedule
def test_the_check_schedule_must_be_chosen() -> None:
    with pytest.raises(TypeError, match="check_every"):
        SustainedBoostingLoss(3, WIDTHS)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r'"manual".*first_check=steps_per_epoch'):
        SustainedBoostingLoss(3, WIDTHS, check_every=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_every must be an integer"):
        SustainedBoostingLoss(3, WIDTHS, check_every=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="check_every must be an integer >= 1"):
        SustainedBoostingLoss(3, WIDTHS, check_every=0)
    with pytest.raises(ValueError, match="first_check needs an automatic schedule"):
        SustainedBoostingLoss(3, WIDTHS, check_every="manual", first_check=3)


def test_paper_schedule_first_check_then_every() -> None:
    """first_check=2, check_every=3: checks at the start of forwards 2, 5, 8 (0-based)."""
    boost = _boost(check_every=3, first_check=2, max_heads=8)
    x, y = _feats(6), torch.arange(6) % 3
    checks = []
    for k in range(10):
        before = boost.last
        boost(x, y)
        if boost.last is not before:
            checks.append(k)
    assert checks == [2, 5, 8]


# --------------------------------------------------------------------------------- 2. empty batch
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_empty_batch_is_zero_loss_zero_grad_and_not_a_step(reduction: str, soft: bool) -> None:
    boost = _boost(check_every=1, reduction=reduction)
    boost.add_head("audio")
    x, y = _feats(5), torch.tensor([0, 1, 2, 0, 1])
    empty = {m: v[:0] for m, v in x.items()}
    target = torch.zeros(0, 3) if soft else y[:0]
    boost(x, y)  # one real step: 5 samples pooled
    loss = boost(empty, target)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.equal(loss.sum(), torch.zeros(()))  # 0, not NaN
    loss.sum().backward()
    params = list(boost.parameters())
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    assert boost.last is None  # the empty forward did not count as a step
    boost(x, y)  # so this forward runs the check over the first batch only
    assert boost.last is not None and float(boost.last.samples) == 5


def test_explicit_check_without_samples_says_so() -> None:
    boost = _boost()
    empty = {m: v[:0] for m, v in _feats(3).items()}
    boost(empty, torch.zeros(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="at least one training-mode forward with samples"):
        boost.check()
    boost(_feats(3), torch.full((3,), -100))  # every target ignored: no sample either
    with pytest.raises(RuntimeError, match="at least one training-mode forward with samples"):
        boost.check()


# --------------------------------------------------------------------------------- 3. Adam
def _adam_first_update(w: Tensor, g: Tensor, lr: float, wd: float, decoupled: bool) -> Tensor:
    """A fresh Adam(W)'s first step: m_hat = g', v_hat = g'^2, w -= lr g' / (|g'| + eps)."""
    eps = 1e-8
    if decoupled:
        return w * (1 - lr * wd) - lr * g / (g.abs() + eps)
    g = g + wd * w
    return w - lr * g / (g.abs() + eps)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_added_head_takes_the_first_step_of_a_fresh_adam(kind: str) -> None:
    lr, wd = 1e-2, 1e-2
    x, y = _feats(12, seed=3), torch.arange(12) % 3

    def make() -> tuple[SustainedBoostingLoss, torch.optim.Optimizer]:
        boost = _boost(seed=7)
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return boost, cls(boost.parameters(), lr=lr, weight_decay=wd)

    updates = {}
    for bind in (True, False):
        boost, opt = make()
        if bind:
            boost.attach_optimizer(opt)
        for _ in range(6):  # the inactive heads go through 6 Adam steps with zero gradients
            boost(x, y).backward()
            opt.step()
            opt.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            boost.add_head("audio")
        assert any("attach_optimizer" in str(w.message) for w in caught) != bind
        w, b = boost.head_weight[0][1], boost.head_bias[0][1]
        before = (w.detach().clone(), b.detach().clone())
        boost(x, y).backward()
        grads = (w.grad.clone(), b.grad.clone())
        opt.step()
        updates[bind] = (w.detach().clone(), b.detach().clone())
        expected = [
            _adam_first_update(p0, g, lr, wd, kind == "adamw")
            for p0, g in zip(before, grads, strict=True)
        ]
        if bind:
            for got, want in zip(updates[bind], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            # and a fresh torch optimiser on a copy of the head, given the same gradient
            copies = [p.clone().requires_grad_() for p in before]
            fresh = type(opt)(copies, lr=lr, weight_decay=wd)
            for c, g in zip(copies, grads, strict=True):
                c.grad = g
            fresh.step()
            for got, c in zip(updates[bind], copies, strict=True):
                torch.testing.assert_close(got, c.detach(), rtol=0, atol=0)
        else:  # the test can fail: without a binding Adam's step counter is already 7
            step = (updates[bind][0] - before[0]).abs().max()
            fresh_step = (expected[0] - before[0]).abs().max()
            assert abs(float(step / fresh_step) - 1) > 0.2


def test_attach_optimizer_refuses_an_optimizer_without_the_heads() -> None:
    boost = _boost()
    with pytest.raises(ValueError, match="head parameters"):
        boost.attach_optimizer(torch.optim.SGD(boost.output_layer.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="Optimizer"):
        boost.attach_optimizer(list(boost.parameters()))  # type: ignore[arg-type]


# the weak modality reaches max_heads late in the 14 steps: the cap's warning is expected here
@pytest.mark.filterwarnings("ignore:SustainedBoostingLoss. modality .* already has max_heads")
def test_adam_resume_with_binding_is_bit_for_bit() -> None:
    def make() -> tuple[SustainedBoostingLoss, torch.optim.Optimizer]:
        b = _boost(check_every=3, max_heads=4, hidden=8)
        opt = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=1e-2)
        b.attach_optimizer(opt)
        return b, opt

    def train(b: SustainedBoostingLoss, opt: torch.optim.Optimizer, steps: range) -> None:
        for k in steps:
            x = _feats(8, seed=100 + k)
            x["audio"] = x["audio"] * 0.01  # weak audio: heads get added
            b(x, torch.arange(8) % 3).backward()
            opt.step()
            opt.zero_grad()

    ref, ref_opt = make()
    train(ref, ref_opt, range(14))
    first, first_opt = make()
    train(first, first_opt, range(7))
    buffer = io.BytesIO()
    torch.save({"boost": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = make()
    resumed.load_state_dict(ckpt["boost"])
    resumed_opt.load_state_dict(ckpt["opt"])
    assert resumed.last is not None and first.last is not None  # 8. the record is restored
    assert torch.equal(resumed.last.scores, first.last.scores)
    assert resumed.last.added_to == first.last.added_to
    train(resumed, resumed_opt, range(7, 14))
    assert resumed.num_heads == ref.num_heads and sum(ref.num_heads.values()) > 3
    for (name, a), b in zip(resumed.state_dict().items(), ref.state_dict().values(), strict=True):
        if isinstance(a, Tensor):
            assert torch.equal(a, b), name


def test_load_state_dict_restores_the_last_record() -> None:
    boost = _boost()
    boost(_feats(6), torch.arange(6) % 3)
    record = boost.check()
    fresh = _boost(seed=3)
    fresh.load_state_dict(boost.state_dict())
    assert fresh.last is not None
    assert torch.equal(fresh.last.scores, record.scores)
    assert torch.equal(fresh.last.ratios, record.ratios)
    assert fresh.last.added_to == record.added_to and fresh.last.modalities == record.modalities


def test_checkpoint_of_the_stacked_layout_loads() -> None:
    """Checkpoints from before the per-head parameters (one stacked tensor per modality)."""
    boost = _boost(max_heads=3)
    boost.add_head("visual")
    old = {}
    for key, value in boost.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("head_weight", "head_bias"):
            stacked = f"{parts[0]}.{parts[1]}"
            if stacked not in old:
                old[stacked] = torch.stack(list(getattr(boost, parts[0])[int(parts[1])]))
        else:
            old[key] = value
    fresh = _boost(max_heads=3, seed=9)
    fresh.load_state_dict(old)
    x = _feats(4)
    assert fresh.num_heads == boost.num_heads
    assert torch.equal(fresh.predict(x), boost.predict(x))


def test_inactive_heads_are_in_the_graph_with_zero_gradient() -> None:
    boost = _boost(max_heads=3)
    boost(_feats(4), torch.arange(4) % 3).backward()
    for i in range(2):
        for j in range(3):
            g = boost.head_weight[i][j].grad
            assert g is not None
            assert (g.abs().sum() > 0) == (j == 0)


# --------------------------------------------------------------------------------- 4. reduction
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), lam=st.floats(0, 1), soft=st.booleans())
def test_reductions_follow_the_per_sample_formula(seed: int, lam: float, soft: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(6, d, generator=g, dtype=torch.float64) for m, d in WIDTHS.items()}
    y = torch.randint(0, 3, (6,), generator=g)
    t = torch.softmax(2 * torch.randn(6, 3, generator=g, dtype=torch.float64), -1)
    target = t if soft else y
    onehot = t if soft else F.one_hot(y, 3).double()
    out = {}
    for reduction in ("mean", "sum", "none"):
        boost = _boost(lam=lam, seed=seed, reduction=reduction).double()
        boost.add_head("visual")
        boost.add_head("visual")
        out[reduction] = boost(x, target)
        expected = _per_sample(boost, x, onehot)
    torch.testing.assert_close(out["none"], expected)
    torch.testing.assert_close(out["sum"], expected.sum())
    torch.testing.assert_close(out["mean"], expected.mean())


def test_reduction_is_validated() -> None:
    with pytest.raises(ValueError, match="reduction must be"):
        _boost(reduction="avg")


# --------------------------------------------------------------------------------- 6. ignore
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_leaves_samples_out_of_loss_and_scores(reduction: str) -> None:
    x = {m: v.double() for m, v in _feats(8, seed=5).items()}
    y = torch.tensor([0, 1, -100, 2, 1, -100, 0, 2])
    keep = y != -100
    boost = _boost(reduction=reduction, lam=0.7).double()
    boost.add_head("audio")
    boost.add_head("audio")
    loss = boost(x, y)
    sub = {m: v[keep] for m, v in x.items()}
    per = _per_sample(boost, sub, F.one_hot(y[keep], 3).double())
    if reduction == "none":
        torch.testing.assert_close(loss[keep], per)
        assert torch.equal(loss[~keep], torch.zeros(2, dtype=torch.float64))
    else:
        torch.testing.assert_close(loss, per.sum() if reduction == "sum" else per.mean())
    # the ignored samples' features get no gradient through the loss
    xs = {m: v.clone().requires_grad_() for m, v in x.items()}
    boost(xs, y).sum().backward()
    for v in xs.values():
        assert v.grad is not None and torch.equal(v.grad[~keep], torch.zeros_like(v.grad[~keep]))
    expected = []
    for i, m in enumerate(WIDTHS):
        z = sum(_head(boost, i, j, sub[m]) for j in range(boost.num_heads[m]))
        expected.append(torch.softmax(z, -1)[torch.arange(6), y[keep]].mean())
    record = boost.check()
    assert float(record.samples) == 2 * 6  # two forwards, six counted samples each
    torch.testing.assert_close(record.scores, torch.stack(expected).float())


def test_ignore_index_none_refuses_negative_targets_and_all_ignored_mean_is_zero() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        _boost(ignore_index=None)(_feats(2), torch.tensor([0, -100]))
    boost = _boost(ignore_index=-3)
    loss = boost(_feats(2), torch.tensor([-3, -3]))
    assert torch.equal(loss, torch.zeros(()))  # F.cross_entropy would give 0/0 = NaN


# --------------------------------------------------------------------------------- 5. validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fusion_weights": [math.nan, 1.0]}, ValueError, r"fusion_weights\[0\] must be finite"),
        ({"fusion_weights": {"audio": 1.0, "visual": math.inf}}, ValueError, "must be finite"),
        ({"fusion_weights": [-0.5, 1.0]}, ValueError, r"fusion_weights\[0\] must be >= 0"),
        ({"fusion_weights": [0.0, 0.0]}, ValueError, "must not all be zero"),
        ({"fusion_weights": ["a", 1.0]}, TypeError, "must be a real number"),
        ({"hidden": 4.5}, TypeError, "hidden must be an integer"),
        ({"hidden": 0}, ValueError, "hidden must be an integer >= 1"),
        ({"max_heads": 2.5}, TypeError, "max_heads must be an integer"),
        ({"max_heads": True}, TypeError, "max_heads must be an integer"),
        ({"check_every": 2.5}, TypeError, "check_every must be an integer"),
        ({"check_every": 2, "first_check": 0.5}, TypeError, "first_check must be an integer"),
        ({"lam": math.nan}, ValueError, "lam must be finite"),
        ({"lam": 1.5}, ValueError, "lam must be <= 1"),
        ({"sigma": math.inf}, ValueError, "sigma must be finite"),
        ({"sigma": 0.0}, ValueError, "sigma must be > 0"),
        ({"tau": math.nan}, ValueError, "tau must be finite"),
        ({"tau": -0.1}, ValueError, "tau must be >= 0"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an integer"),
    ],
)
def test_hyper_parameters_are_validated(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _boost(**kwargs)


def test_num_classes_and_widths_are_validated() -> None:
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        SustainedBoostingLoss(3.0, WIDTHS, check_every="manual")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"in_features\['audio'\].* must be an integer"):
        SustainedBoostingLoss(3, {"audio": 4.5, "visual": 2}, check_every="manual")  # type: ignore[dict-item]


def test_feature_dtype_and_device_errors_name_the_modality() -> None:
    boost = _boost()
    x, y = _feats(3), torch.arange(3) % 3
    with pytest.raises(TypeError, match=r"features\['visual'\] of shape \(3, 7\) are torch.int64"):
        boost({"audio": x["audio"], "visual": x["visual"].long()}, y)
    with pytest.raises(TypeError, match=r"features\['audio'\].*float64.*torch.autocast"):
        boost({"audio": x["audio"].double(), "visual": x["visual"]}, y)
    with pytest.raises(ValueError, match=r"features\['audio'\].*are on meta"):
        boost({"audio": x["audio"].to("meta"), "visual": x["visual"]}, y)


# --------------------------------------------------------------------------------- DDP: 2 and 7
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleDict({"audio": nn.Linear(5, 6), "visual": nn.Linear(7, 6)})
        self.boost = SustainedBoostingLoss(
            3, {"audio": 6, "visual": 6}, hidden=8, check_every=2, max_heads=4, reduction="sum"
        )

    def forward(self, x: dict[str, Tensor], y: Tensor) -> Tensor:
        loss: Tensor = self.boost({m: torch.relu(self.enc[m](v)) for m, v in x.items()}, y)
        return loss


def _ddp_batches(rank: int | None) -> list[tuple[dict[str, Tensor], Tensor]]:
    """8 steps; rank 1's share is empty on steps 1, 2 and 5; rank None: the global batch."""
    out = []
    for k in range(8):
        x = _feats(8, seed=300 + k)
        x["audio"][:4] = 0.0  # audio is the weak modality
        y = torch.arange(8) % 3
        rows = [range(0, 4), range(4, 4 if k in (1, 2, 5) else 8)]
        idx = list(rows[rank]) if rank is not None else [*rows[0], *rows[1]]
        out.append(({m: v[idx] for m, v in x.items()}, y[idx]))
    return out


def _ddp_train(core: _Net, net: nn.Module, rank: int | None) -> dict[str, Any]:
    """SGD with the binding; the global reference halves its loss (DDP averages 2 ranks)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    core.boost.attach_optimizer(opt)
    counts, records = [], []
    for x, y in _ddp_batches(rank):
        loss = net(x, y) * (0.5 if rank is None else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        counts.append(tuple(core.boost.num_heads.values()))
        last = core.boost.last
        records.append(None if last is None else (last.scores.clone(), float(last.samples)))
    params = [p.detach().clone() for p in core.parameters()]
    return {"counts": counts, "records": records, "params": params}


def _ddp_edges(rank: int, size: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    # 2. one empty rank of two, equal to one process on the global batch
    core = _Net()
    out["train"] = _ddp_train(core, DDP(core), rank)

    # 2. a whole window empty on every rank: the scheduled check decides nothing, no error
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=4, check_every=2)
    x, y = _feats(4, seed=rank), torch.arange(4) % 3
    empty = {m: v[:0] for m, v in x.items()}
    losses = [boost(empty, y[:0]) for _ in range(2)]
    losses.append(boost(x, y))  # the scheduled check runs here, over the two empty steps
    out["empty_window"] = (boost.last is None, [float(v) for v in losses])
    record = boost.check()  # explicit, over the third forward's samples
    out["after"] = float(record.samples)
    boost(empty, y[:0])
    try:
        boost.check()
        out["explicit_empty"] = "no error"
    except RuntimeError as e:
        out["explicit_empty"] = str(e)

    # 7. bad input on rank 1 in a forward where a check is due: both ranks raise in that call
    boost = SustainedBoostingLoss(3, WIDTHS, hidden=4, check_every=1)
    boost(x, y)
    bad = {"audio": x["audio"], "visual": torch.full((4, 7), math.nan)} if rank == 1 else x
    try:
        boost(bad, y)
        out["failing"] = "no error"
    except (RuntimeError, ValueError) as e:
        out["failing"] = f"{type(e).__name__}: {e}"
    # the ranks stay paired: the window was dropped everywhere, the next check is in step
    boost(x, y)
    out["resynced"] = float(boost(x, y).detach()) > 0 and boost.last is not None
    out["resynced_samples"] = None if boost.last is None else float(boost.last.samples)
    return out


def test_ddp_empty_rank_and_failing_rank() -> None:
    r0, r1 = run_distributed(_ddp_edges)
    ref_core = _Net()
    ref = _ddp_train(ref_core, ref_core, None)
    a, b = r0["train"], r1["train"]
    assert a["counts"] == b["counts"] == ref["counts"]
    assert a["counts"][-1] != (1, 1)  # heads were added during the run
    for ra, rb, rr in zip(a["records"], b["records"], ref["records"], strict=True):
        assert (ra is None) == (rb is None) == (rr is None)
        if rr is not None:
            assert ra[1] == rb[1] == rr[1]
            torch.testing.assert_close(ra[0], rr[0])
    for pa, pb, pr in zip(a["params"], b["params"], ref["params"], strict=True):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(pa, pr, rtol=1e-4, atol=1e-5)
    for r in (r0, r1):
        assert r["empty_window"] == (True, [0.0, 0.0, r["empty_window"][1][2]])
        assert r["after"] == 8.0  # 4 samples on each rank
        assert "at least one training-mode forward with samples" in r["explicit_empty"]
        assert r["resynced"] and r["resynced_samples"] == 8.0
    assert r1["failing"].startswith("ValueError: features['visual'] contains non-finite")
    assert r0["failing"].startswith("RuntimeError: input validation failed on another rank")


# --------------------------------------------------------------------------------- 8. the base
# SustainedBoostingLoss on core.remedy.Remedy: the mode, repeat and no-step rules every method
# shares.
def test_training_mode_under_no_grad_warns_and_acts_as_evaluation() -> None:
    boost, x, y = _boost(), _feats(4), torch.arange(4) % 3
    boost(x, y)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="gradients disabled"):
        loss = boost(x, y)
    torch.testing.assert_close(loss, boost.eval()(x, y))  # the same loss, nothing pooled
    assert boost.steps == boost._since_check == 1
    assert float(boost.train().check().samples) == 4


def test_a_call_mixing_open_and_new_tensors_raises_and_counts_nothing() -> None:
    boost, y = _boost(), torch.arange(4) % 3
    x = {m: v.requires_grad_() for m, v in _feats(4).items()}
    boost(x, y)
    mixed = {"audio": x["audio"], "visual": _feats(4, seed=1)["visual"].requires_grad_()}
    with pytest.raises(ValueError, match=r"features \['audio'\] were already passed.*\['visual'\]"):
        boost(mixed, y)
    assert boost.steps == 1
    boost(x, y).backward()  # the repeat: the same step
    assert boost.steps == 1
    boost(x, y)  # after its backward the same tensors are a new step
    assert boost.steps == 2


def test_step_and_attach_point_to_attach_optimizer() -> None:
    boost = _boost()
    opt = torch.optim.SGD(boost.parameters(), lr=0.1)
    for call in (boost.step, lambda: boost.attach(opt)):
        with pytest.raises(RuntimeError, match=r"no step\(\).*attach_optimizer\(opt\)"):
            call()
    assert boost.attached_optimizer is None
