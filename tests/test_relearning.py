"""ModalityRelearning (Diagnosing & Re-learning, ECCV 2024): formulas by hand, invariants, the
schedule, what changes and what does not, DDP (2 gloo ranks = one process), AMP, resume, bad input.
"""

from __future__ import annotations

import copy
import io
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import (
    ModalityRelearning,
    RelearnRecord,
    cluster_purity,
    kmeans,
    learning_state_alphas,
    minmax_scale,
    purity_score,
    soft_reinitialise_,
)
from imbalance_losses.core.distributed import all_gather_rows
from tests.ddp import run_distributed
from tests.pages import run_page

# ----------------------------------------------------------------------------------------------
# references written from the formulas (Python floats and loops)


def ref_minmax(x: list[list[float]]) -> list[list[float]]:
    cols = list(zip(*x, strict=True))
    lo, hi = [min(c) for c in cols], [max(c) for c in cols]
    return [
        [2 * (v - a) / (b - a) - 1 if b > a else -1.0 for v, a, b in zip(row, lo, hi, strict=True)]
        for row in x
    ]


def ref_purity(clusters: list[int], labels: list[int]) -> float:
    by_cluster: dict[int, Counter[int]] = {}
    for c, y in zip(clusters, labels, strict=True):
        by_cluster.setdefault(c, Counter())[y] += 1
    return sum(max(cnt.values()) for cnt in by_cluster.values()) / len(labels)


def blobs(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` points, class ``n % classes``, around well-separated class centres."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = 10.0 * torch.eye(classes, dim)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


# ----------------------------------------------------------------------------------------------
# formulas


def test_minmax_scale_by_hand() -> None:
    x = [[0.0, 5.0, -1.0], [2.0, 5.0, 3.0], [1.0, 5.0, 1.0]]
    torch.testing.assert_close(minmax_scale(torch.tensor(x)), torch.tensor(ref_minmax(x)))
    assert minmax_scale(torch.tensor(x, dtype=torch.bfloat16)).dtype == torch.float32


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=40))
def test_purity_score_by_hand_and_its_invariants(pairs: list[tuple[int, int]]) -> None:
    clusters, labels = [c for c, _ in pairs], [y for _, y in pairs]
    p = purity_score(torch.tensor(clusters), torch.tensor(labels), 5, 4)
    assert p.dtype == torch.float32
    assert math.isclose(float(p), ref_purity(clusters, labels), rel_tol=1e-6)
    # invariant to renaming the clusters
    renamed = [(3 * c + 2) % 5 for c in clusters]
    assert float(purity_score(torch.tensor(renamed), torch.tensor(labels), 5, 4)) == float(p)
    # never below the majority class's share, never above 1
    assert float(p) >= max(Counter(labels).values()) / len(labels) - 1e-6
    assert float(p) <= 1.0 + 1e-6
    # 1 for pure clusters (each cluster one class; a class may span several clusters)
    pure = [y + 4 * (c % 2) for c, y in pairs]
    assert float(purity_score(torch.tensor(pure), torch.tensor(labels))) == 1.0


def test_kmeans_recovers_separated_blobs_and_is_deterministic() -> None:
    x, y = blobs(60, 4, 5, 0.3, seed=1)
    assignment, centres = kmeans(x, 4, seed=3)
    assert ref_purity(assignment.tolist(), y.tolist()) == 1.0
    for j in range(4):  # each centre is its cluster's mean
        torch.testing.assert_close(centres[j], x[assignment == j].mean(0))
    again = kmeans(x, 4, seed=3)
    assert torch.equal(again[0], assignment) and torch.equal(again[1], centres)


@given(st.integers(0, 2**16), st.integers(2, 5), st.integers(6, 30))
def test_kmeans_ends_at_a_lloyd_fixed_point(seed: int, k: int, n: int) -> None:
    """With ``tol=0`` every point is at its nearest centre (by hand) and every non-empty
    cluster's centre is its points' mean."""
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    assignment, centres = kmeans(x, k, seed=seed, tol=0.0, iters=500)
    rows, cs = x.double().tolist(), centres.double().tolist()
    for i, row in enumerate(rows):
        d = [sum((a - b) ** 2 for a, b in zip(row, c, strict=True)) for c in cs]
        assert d[int(assignment[i])] <= min(d) + 1e-4
    for j in range(k):
        if (assignment == j).any():
            torch.testing.assert_close(centres[j], x[assignment == j].mean(0), atol=1e-5, rtol=0)


def test_cluster_purity_is_scaled_kmeans_then_purity() -> None:
    x, y = blobs(40, 3, 4, 2.0, seed=2)
    x = x * torch.tensor([1.0, 100.0, 0.01, 5.0])  # scaling per dimension matters
    assignment, _ = kmeans(torch.tensor(ref_minmax(x.tolist())), 3, seed=7)
    expected = ref_purity(assignment.tolist(), y.tolist())
    assert math.isclose(float(cluster_purity(x, y, 3, seed=7)), expected, rel_tol=1e-6)
    assert torch.equal(cluster_purity(x, y, 3, seed=7), cluster_purity(x, y, 3, seed=7))


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=5),
       st.floats(0, 10))  # fmt: skip
def test_learning_state_alphas_by_hand(purities: list[tuple[float, float]], lam: float) -> None:
    pt = torch.tensor([a for a, _ in purities])
    pv = torch.tensor([b for _, b in purities])
    got = learning_state_alphas(pt, pv, lam)
    ref = [math.tanh(lam * abs(float(a) - float(b))) for a, b in zip(pt, pv, strict=True)]
    torch.testing.assert_close(got, torch.tensor(ref), atol=1e-6, rtol=1e-6)
    assert bool(((got >= 0) & (got <= 1)).all())


@given(st.floats(0, 1))
def test_soft_reinitialise_by_hand(alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    theta, theta0 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    bias, bias0 = torch.randn(3, generator=g), torch.randn(3, generator=g)
    params = [theta.clone(), bias.clone()]
    soft_reinitialise_(params, [theta0, bias0], alpha)
    for got, p, p0 in zip(params, (theta, bias), (theta0, bias0), strict=True):
        pairs = zip(p.flatten().tolist(), p0.flatten().tolist(), strict=True)
        ref = [alpha * b + (1 - alpha) * a for a, b in pairs]
        torch.testing.assert_close(got.flatten(), torch.tensor(ref), atol=1e-6, rtol=1e-6)


def test_alpha_zero_is_bit_identical_and_alpha_one_restores_theta0() -> None:
    theta, theta0 = torch.randn(50), torch.randn(50)
    p = theta.clone()
    soft_reinitialise_([p], [theta0], 0.0)
    assert torch.equal(p, theta)
    soft_reinitialise_([p], [theta0], torch.tensor(1.0))
    assert torch.equal(p, theta0)
    half = theta.clone().to(torch.bfloat16)  # the parameter's dtype, theta^0 cast to it
    soft_reinitialise_([half], [theta0], 1.0)
    assert torch.equal(half, theta0.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# the class


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleDict({
            "a": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
            "v": nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)),
        })  # fmt: skip
        self.head = nn.Linear(8, 3)

    def features(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: enc(x[m]) for m, enc in self.encoders.items()}

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.head(torch.cat(list(self.features(x).values()), 1))


def data(n: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 3, generator=g), "v": torch.randn(n, 5, generator=g)}, (
        torch.arange(n) % 3
    )


def train_epoch(net: Net, opt: torch.optim.Optimizer, seed: int) -> None:
    net.train()
    for i in range(3):
        x, y = data(12, 100 * seed + i)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


def synthetic_splits() -> tuple[list[Any], list[Any]]:
    """ "a": separable on train, noise on val (a large gap); "v": separable on both (no gap)."""
    xa, y = blobs(30, 3, 4, 0.2, seed=0)
    xv, _ = blobs(30, 3, 6, 0.2, seed=1)
    noise = torch.randn(18, 4, generator=torch.Generator().manual_seed(2))
    va, yv = noise, torch.arange(18) % 3
    vv, _ = blobs(18, 3, 6, 0.2, seed=3)
    train = [({"a": xa[:15], "v": xv[:15]}, y[:15]), ({"a": xa[15:], "v": xv[15:]}, y[15:])]
    return train, [({"a": va, "v": vv}, yv)]


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_epoch_end_moves_only_the_over_fitting_encoder_by_hand() -> None:
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    relearn = ModalityRelearning(net.encoders, 3, lam=3.0, reinit_every=2, head=net.head)
    theta0 = snapshot(net)
    train_epoch(net, opt, 0)
    before, momentum = snapshot(net), copy.deepcopy(opt.state_dict())
    train, val = synthetic_splits()
    rec = relearn.epoch_end(2, train, val)
    assert isinstance(rec, RelearnRecord) and relearn.last is rec and relearn.reinits == 1
    # the diagnosis by hand: the splits' features, the pure functions, math.tanh
    feats = {s: {m: torch.cat([b[0][m] for b in d]) for m in "av"} for s, d in
             (("train", train), ("val", val))}  # fmt: skip
    labels = {"train": torch.cat([b[1] for b in train]), "val": val[0][1]}
    p = {(s, m): float(cluster_purity(feats[s][m], labels[s], 3, 0)) for s in feats for m in "av"}
    alpha = {m: math.tanh(3.0 * abs(p["train", m] - p["val", m])) for m in "av"}
    assert p["train", "a"] == 1.0 and p["val", "a"] < 0.8 and alpha["v"] == 0.0
    torch.testing.assert_close(rec.alphas, torch.tensor([alpha["a"], alpha["v"]]))
    assert (rec.train_samples, rec.val_samples) == (30, 18)
    after = net.state_dict()
    for k, v in after.items():
        if k.startswith("encoders.a.") and "running" not in k and "num_batches" not in k:
            ref = alpha["a"] * theta0[k] + (1 - alpha["a"]) * before[k]
            torch.testing.assert_close(v, ref, atol=1e-6, rtol=1e-6)
            assert not torch.equal(v, before[k])
        else:  # the head, encoder "v" (alpha 0), every BN running statistic: bit-identical
            assert torch.equal(v, before[k]), k
    assert str(opt.state_dict()) == str(momentum)  # the optimiser state is untouched


def test_diagnose_changes_nothing_and_restores_the_modes() -> None:
    net = Net()
    relearn = ModalityRelearning(net.encoders, 3, reinit_every=1)
    train_epoch(net, torch.optim.SGD(net.parameters(), lr=0.1), 0)
    before, modes = snapshot(net), []

    def forward(batch: tuple[dict[str, Tensor], Tensor]) -> Any:
        modes.append(net.training)
        return net.features(batch[0]), batch[1]

    net.train()
    rec = relearn.diagnose([data(12, 1), data(9, 2)], [data(10, 3)], forward=forward, model=net)
    assert modes == [False, False, False] and net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert relearn.reinits == 0 and relearn.last is rec
    assert rec.purity_train.dtype == torch.float32 and bool(torch.isfinite(rec.alphas).all())
    relearn.reinitialise(torch.zeros(2))  # alpha = 0 everywhere: bit-identical
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    relearn.reinitialise(torch.ones(2))  # alpha = 1: theta^0 exactly
    for m in "av":
        for p, p0 in zip(net.encoders[m].parameters(), relearn.initial(m), strict=True):
            assert torch.equal(p, p0)


def test_fixed_seed_gives_identical_alphas() -> None:
    train, val = [data(20, 1)], [data(15, 2)]
    net = Net()
    recs = [
        ModalityRelearning(net.encoders, 3, seed=5).diagnose(
            train, val, forward=lambda b: (net.features(b[0]), b[1]), model=net
        )
        for _ in range(2)
    ]
    assert torch.equal(recs[0].alphas, recs[1].alphas)
    assert torch.equal(recs[0].purity_val, recs[1].purity_val)


class _Refuse:
    """A split that must not be read."""

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("the split was read on an epoch without re-learning")


@given(st.integers(1, 5), st.integers(0, 4), st.integers(1, 25))
def test_schedule_fires_at_multiples_at_most_n_times_never_at_zero(
    every: int, n: int, epochs: int
) -> None:
    relearn = ModalityRelearning({"a": [nn.Parameter(torch.zeros(2))],
                                  "v": [nn.Parameter(torch.zeros(2))]}, 2,
                                 reinit_every=every, max_reinits=n)  # fmt: skip
    split = [({"a": torch.eye(2), "v": torch.eye(2)}, torch.arange(2))]
    fired = []
    for epoch in range(epochs):
        due = relearn.due(epoch)
        rec = relearn.epoch_end(epoch, split if due else _Refuse(), split if due else _Refuse())
        assert (rec is not None) == due
        if due:
            fired.append(epoch)
            assert relearn.epoch_end(epoch, _Refuse(), _Refuse()) is None  # once per epoch
    assert fired == [k * every for k in range(1, n + 1) if k * every < epochs]
    assert relearn.reinits == len(fired)


def test_bf16_autocast_features_give_fp32_statistics() -> None:
    net = Net()
    net.eval()
    x, y = data(24, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = net.features(x)
    assert feats["a"].dtype == torch.bfloat16
    relearn = ModalityRelearning(net.encoders, 3)
    rec = relearn.diagnose([(feats, y)], [(feats, y)])
    exact = relearn.diagnose([({m: f.float() for m, f in feats.items()}, y)], [(feats, y)])
    assert rec.alphas.dtype == torch.float32 and bool(torch.isfinite(rec.alphas).all())
    assert torch.equal(rec.alphas, exact.alphas) and rec.alphas.abs().max() == 0


def _run(net: Net, relearn: ModalityRelearning, opt: torch.optim.Optimizer, epochs: range) -> None:
    for epoch in epochs:
        train_epoch(net, opt, epoch)
        split = [data(15, 7 * epoch)], [data(9, 7 * epoch + 1)]
        relearn.epoch_end(epoch, *split, forward=lambda b: (net.features(b[0]), b[1]), model=net)


def test_resume_is_bit_exact() -> None:
    net = Net(seed=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    relearn = ModalityRelearning(net.encoders, 3, reinit_every=2, max_reinits=2, lam=20.0)
    _run(net, relearn, opt, range(3))
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "re": relearn.state_dict()}, buf)
    _run(net, relearn, opt, range(3, 6))
    # a fresh process: another initialisation, then the checkpoint
    net2 = Net(seed=9)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    relearn2 = ModalityRelearning(net2.encoders, 3, reinit_every=2, max_reinits=2, lam=20.0)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    net2.load_state_dict(state["net"])
    opt2.load_state_dict(state["opt"])
    relearn2.load_state_dict(state["re"])
    assert relearn2.reinits == 1 and relearn2.last is not None
    _run(net2, relearn2, opt2, range(3, 6))
    assert relearn.reinits == relearn2.reinits == 2
    assert relearn.last is not None and relearn2.last is not None
    assert float(relearn.last.alphas.max()) > 0  # the re-initialisations moved something
    assert torch.equal(relearn.last.alphas, relearn2.last.alphas)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net2.state_dict()[k]), k


# ----------------------------------------------------------------------------------------------
# DDP: 2 gloo ranks, uneven shards, equal to one process on the concatenation (rank order)


def _shards() -> list[tuple[list[Any], list[Any]]]:
    train, val = synthetic_splits()
    (f0, y0), (f1, y1) = train
    return [
        (
            [({m: x[:9] for m, x in f0.items()}, y0[:9])],
            [({m: x[:11] for m, x in val[0][0].items()}, val[0][1][:11])],
        ),
        (
            [({m: x[9:] for m, x in f0.items()}, y0[9:]), (f1, y1)],
            [({m: x[11:] for m, x in val[0][0].items()}, val[0][1][11:])],
        ),
    ]


def _ddp_body(rank: int, world: int) -> dict[str, Any]:
    net = Net()
    relearn = ModalityRelearning(net.encoders, 3, reinit_every=1)
    train, val = _shards()[rank]
    rec = relearn.epoch_end(1, train, val)
    out: dict[str, Any] = {"rec": rec, "params": snapshot(net)}
    # a rank with no validation batch at all still joins (and gets the global result)
    out["empty"] = relearn.diagnose(train, [] if rank == 1 else val + _shards()[1][1])
    # a bad batch on rank 1 fails every rank in the same call
    bad = [({m: x.clone().fill_(float("nan")) for m, x in train[0][0].items()}, train[0][1])]
    try:
        relearn.diagnose(bad if rank == 1 else train, val)
    except (RuntimeError, ValueError) as err:
        out["error"] = str(err)
    rows = torch.arange(3 * (rank + 1), dtype=torch.float32).reshape(-1, 3)
    out["rows"] = all_gather_rows(rows)
    return out


def test_two_gloo_ranks_equal_one_process() -> None:
    results = run_distributed(_ddp_body)
    net = Net()
    relearn = ModalityRelearning(net.encoders, 3, reinit_every=1)
    (t0, v0), (t1, v1) = _shards()
    rec = relearn.epoch_end(1, t0 + t1, v0 + v1)
    assert rec is not None
    expected = snapshot(net)
    for r in results:
        for field in ("purity_train", "purity_val", "alphas"):
            assert torch.equal(getattr(r["rec"], field), getattr(rec, field)), field
        assert (r["rec"].train_samples, r["rec"].val_samples) == (30, 18)
        assert all(torch.equal(v, expected[k]) for k, v in r["params"].items())
        assert torch.equal(r["empty"].purity_val, relearn.diagnose(t0 + t1, v0 + v1).purity_val)
        rows = torch.cat([torch.arange(3.0)[None], torch.arange(6.0).reshape(2, 3)])
        assert torch.equal(r["rows"], rows)
    assert "non-finite" in results[1]["error"] and "'a'" in results[1]["error"]
    assert "another rank" in results[0]["error"]


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_refused_with_clear_errors() -> None:
    net = Net()
    relearn = ModalityRelearning(net.encoders, 3)
    x, y = data(9, 0)
    f = net.features(x)
    cases: list[tuple[Any, type[Exception], str]] = [
        ([({"v": f["v"], "a": f["a"]}, y)], ValueError, "different order"),
        ([({"a": f["a"]}, y)], ValueError, "at least two"),
        ([({"a": f["a"][:, None], "v": f["v"]}, y)], ValueError, "features['a']"),
        ([(f, y.float())], TypeError, "class indices"),
        ([(f, y + 5)], ValueError, "outside [0, 3)"),
        ([(f, y[:4])], ValueError, "target"),
        ([(f, y)] * 0, ValueError, "0 samples"),
        ([({"a": f["a"][:2], "v": f["v"][:2]}, y[:2])], ValueError, "fewer than num_classes"),
    ]
    for split, error, text in cases:
        with pytest.raises(error) as info:
            relearn.diagnose(split, [(f, y)])
        assert text in str(info.value), (text, str(info.value))
    with pytest.raises(ValueError, match=r"widths|\[B, 4\]"):
        relearn.diagnose([(f, y), ({"a": torch.randn(9, 5), "v": f["v"]}, y)], [(f, y)])
    with pytest.raises(RuntimeError, match="no diagnosis"):
        relearn.reinitialise()
    with pytest.raises(ValueError, match="\\[M\\] = \\[2\\]"):
        relearn.reinitialise(torch.zeros(3))
    with pytest.raises(ValueError, match="alpha"):
        relearn.reinitialise(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="fusion head"):
        ModalityRelearning({"a": net.encoders["a"], "v": net.head}, 3, head=net.head)
    with pytest.raises(ValueError, match="lam"):
        ModalityRelearning(net.encoders, 3, lam=-1.0)
    with pytest.raises(TypeError, match="reinit_every"):
        ModalityRelearning(net.encoders, 3, reinit_every=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least two"):
        ModalityRelearning({"a": net.encoders["a"]}, 3)
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(torch.randn(2, 3), 3)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((4, 2), float("nan")), 2)
    with pytest.raises(ValueError, match="shape"):
        soft_reinitialise_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="\\[N\\]"):
        purity_score(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_fsdp2_sharded_encoders_are_refused() -> None:
    class DTensor(nn.Parameter):  # stands in for torch.distributed.tensor.DTensor by name
        pass

    encoders = {"a": [DTensor(torch.zeros(2))], "v": [nn.Parameter(torch.zeros(2))]}
    with pytest.raises(NotImplementedError, match="FSDP2"):
        ModalityRelearning(encoders, 2)


def test_the_guide_runs_as_written(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    namespace = run_page("relearning.md", tmp_path)
    assert namespace["relearn"].reinits == 2
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["2", "4"]


def test_three_modalities_each_with_its_own_alpha() -> None:
    encoders = {m: nn.Linear(2, 3) for m in ("x", "y", "z")}
    relearn = ModalityRelearning(encoders, 2, reinit_every=1, lam=5.0)
    g = torch.Generator().manual_seed(0)
    sep, y = blobs(12, 2, 3, 0.1, seed=4)
    noise = torch.randn(12, 3, generator=g)
    train = [({"x": sep, "y": sep, "z": noise}, y)]
    val = [({"x": noise, "y": sep, "z": noise}, y)]
    with torch.no_grad():  # "training" moved every encoder away from theta^0
        for e in encoders.values():
            e.weight.add_(1.0)
    before = {m: [p.clone() for p in e.parameters()] for m, e in encoders.items()}
    rec = relearn.epoch_end(1, train, val)
    assert rec is not None and rec.modalities == ("x", "y", "z")
    pt = [float(cluster_purity(train[0][0][m], y, 2)) for m in "xyz"]
    pv = [float(cluster_purity(val[0][0][m], y, 2)) for m in "xyz"]
    ref = [math.tanh(5.0 * abs(a - b)) for a, b in zip(pt, pv, strict=True)]
    torch.testing.assert_close(rec.alphas, torch.tensor(ref))
    assert ref[0] > 0 and ref[1] == 0 and ref[2] == 0
    assert not torch.equal(encoders["x"].weight, before["x"][0])
    for m in "yz":
        assert all(
            torch.equal(p, q) for p, q in zip(encoders[m].parameters(), before[m], strict=True)
        )
