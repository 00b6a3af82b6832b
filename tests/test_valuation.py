"""SampleModalityValuation (sample-level modality valuation, CVPR 2024): the Shapley values and
copy counts by hand, the plan, the sampler (shards, order, resume), what the valuation pass
leaves alone, DDP (2 gloo ranks = one process), AMP, the modality-level variant, bad input.
"""

from __future__ import annotations

import copy
import itertools
import math
from fractions import Fraction
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from imbalance_losses import (
    MappingHead,
    MaskedDataset,
    SampleModalityValuation,
    ValuationSampler,
    apply_mask,
    copy_counts,
    modality_level_extra,
    resampling_plan,
    sample_shapley,
)
from tests.ddp import run_distributed
from tests.pages import run_page

# ----------------------------------------------------------------------------------------------
# references written from the definitions (Python, exact fractions)


def ref_shapley(correct: list[bool], m: int) -> list[Fraction]:
    """Average marginal contribution over all M! orders; ``correct[s]`` for subset bits ``s``."""

    def v(members: frozenset[int]) -> Fraction:
        s = sum(1 << j for j in members)
        return Fraction(len(members)) if members and correct[s] else Fraction(0)

    phi = [Fraction(0)] * m
    for order in itertools.permutations(range(m)):
        before: frozenset[int] = frozenset()
        for j in order:
            phi[j] += v(before | {j}) - v(before)
            before = before | {j}
    return [p / math.factorial(m) for p in phi]


def ref_copies(phi: float, bounds: tuple[float, float, float] = (-0.1, 0.4, 1.0)) -> int:
    if phi <= bounds[0]:
        return 3
    if phi <= bounds[1]:
        return 2
    if phi < bounds[2]:
        return 1
    return 0


# (correct with a alone, with v alone, with both) -> (phi_a, phi_v), from
# phi_a = (v({a}) + v({a, v}) - v({v})) / 2 with v({a}) = c_a, v({v}) = c_v, v({a, v}) = 2 c_av
EIGHT_PATTERNS = {
    (0, 0, 0): (0.0, 0.0),
    (1, 0, 0): (0.5, -0.5),
    (0, 1, 0): (-0.5, 0.5),
    (1, 1, 0): (0.0, 0.0),
    (0, 0, 1): (1.0, 1.0),
    (1, 0, 1): (1.5, 0.5),
    (0, 1, 1): (0.5, 1.5),
    (1, 1, 1): (1.0, 1.0),
}


def test_two_modalities_all_eight_patterns_by_hand() -> None:
    patterns = list(EIGHT_PATTERNS)
    # rows: subsets {} {a} {v} {a,v} (bit 0 = a, bit 1 = v); row 0 is ignored (v({}) = 0)
    correct = torch.tensor([[1, ca, cv, cav] for ca, cv, cav in patterns], dtype=torch.bool).T
    phi = sample_shapley(correct)
    assert phi.dtype == torch.float64 and phi.shape == (2, 8)
    expected = torch.tensor([EIGHT_PATTERNS[p] for p in patterns], dtype=torch.float64).T
    assert torch.equal(phi, expected)
    assert torch.equal(phi.sum(0), 2.0 * correct[3])  # efficiency: sum_m phi_m = v(all)
    counts = copy_counts(phi)
    assert counts.tolist() == [[ref_copies(x) for x in row] for row in expected.tolist()]
    # the official two-modality counts: -0.5 -> 3, 0 -> 2, 0.5 -> 1, 1 and 1.5 -> 0
    assert counts[:, 1].tolist() == [1, 3] and counts[:, 3].tolist() == [2, 2]


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 4), data=st.data())
def test_any_m_equals_the_permutation_definition(m: int, data: st.DataObject) -> None:
    correct = data.draw(st.lists(st.booleans(), min_size=2**m, max_size=2**m))
    phi = sample_shapley(torch.tensor(correct)[:, None])[:, 0]
    ref = ref_shapley(correct, m)
    assert phi.tolist() == [float(p) for p in ref]  # exact: M! phi is an integer
    assert sum(ref) == (m if correct[-1] else 0)  # efficiency in exact arithmetic
    assert math.isclose(float(phi.sum()), m * correct[-1], abs_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_three_modalities_symmetry_and_fair_share(data: st.DataObject) -> None:
    correct = torch.tensor(data.draw(st.lists(st.booleans(), min_size=8, max_size=8)))
    phi = sample_shapley(correct)
    swap = [0, 2, 1, 3, 4, 6, 5, 7]  # subsets with modalities 0 and 1 exchanged
    assert torch.equal(sample_shapley(correct[swap]), phi[[1, 0, 2]])
    assert torch.equal(phi * 6, (phi * 6).round())  # multiples of 1/M!
    # right on every non-empty subset: each modality gets exactly its fair share 1
    assert sample_shapley(torch.ones(8, dtype=torch.bool)).tolist() == [1.0, 1.0, 1.0]


@settings(max_examples=200, deadline=None)
@given(st.floats(-3, 3, allow_nan=False, width=32))
def test_copy_counts_against_the_intervals(phi: float) -> None:
    assert copy_counts(torch.tensor([phi], dtype=torch.float64)).item() == ref_copies(phi)
    # a float32 phi is compared with the float32 bounds (so float32(0.4) is the bound 0.4)
    f32 = tuple(float(torch.tensor(b, dtype=torch.float32)) for b in (-0.1, 0.4, 1.0))
    assert copy_counts(torch.tensor([phi])).item() == ref_copies(phi, f32)  # type: ignore[arg-type]


def test_copy_counts_boundaries_are_half_open_without_gaps() -> None:
    values = [-0.5, -0.1, -0.09, 0.0, 0.4, 0.41, 0.99, 1.0, 1.5]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        phi = torch.tensor(values, dtype=dtype)
        assert copy_counts(phi).tolist() == [3, 3, 2, 2, 2, 1, 1, 0, 0], dtype
    assert copy_counts(torch.tensor([0.5]), bounds=(0.0, 0.5, 0.6)).tolist() == [2]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.lists(st.integers(0, 3), min_size=2, max_size=40))
def test_plan_originals_then_copies_that_keep_one_modality(m: int, flat: list[int]) -> None:
    n = len(flat) // m
    if n == 0:
        return
    counts = torch.tensor(flat[: n * m]).reshape(m, n)
    index, bits = resampling_plan(counts)
    assert index.numel() == n + int(counts.sum())
    assert index[:n].tolist() == list(range(n)) and bits[:n].eq(2**m - 1).all()  # none masked
    seen: dict[tuple[int, int], int] = {}
    for i, b in zip(index[n:].tolist(), bits[n:].tolist(), strict=True):
        kept = [j for j in range(m) if b >> j & 1]
        assert len(kept) == 1  # every other modality dropped
        seen[(kept[0], i)] = seen.get((kept[0], i), 0) + 1
    assert seen == {(j, i): c for (j, i), c in _nonzero(counts)}


def _nonzero(counts: Tensor) -> list[tuple[tuple[int, int], int]]:
    return [((j, i), int(c)) for j, row in enumerate(counts) for i, c in enumerate(row) if c]


def test_modality_level_extra_by_hand() -> None:
    # gaps 1 - 0.25 = 0.75 and 1 - 1.5 = -0.5: K = floor(96 * 0.5 * 2/3 * 1.25) = 40, keep 0
    assert modality_level_extra(torch.tensor([0.25, 1.5]), 96, alpha=0.5) == (40, 0)
    assert modality_level_extra(torch.tensor([0.25, 1.5]), 97, alpha=0.5) == (40, 0)  # 40.4
    assert modality_level_extra(torch.tensor([1.0, 1.0, 1.0]), 90) == (0, 0)
    assert modality_level_extra(torch.tensor([1.0, 0.25, 1.5]), 30) == (25, 1)


def test_apply_mask_zeroes_dropped_rows_and_their_gradient() -> None:
    a = torch.randn(3, 2, requires_grad=True)
    v = torch.full((3, 4, 2), float("nan"))  # NaN in a dropped row must not leak
    keep = torch.tensor([[True, False], [False, False], [True, False]])
    out = apply_mask({"a": a, "v": v}, keep)
    assert torch.equal(out["v"], torch.zeros(3, 4, 2))
    assert torch.equal(out["a"][1], torch.zeros(2)) and torch.equal(out["a"][0], a[0])
    out["a"].sum().backward()
    assert a.grad is not None and a.grad[:, 0].tolist() == [1.0, 0.0, 1.0]


# ----------------------------------------------------------------------------------------------
# the valuation pass


def _linear_case() -> tuple[nn.Linear, dict[str, Tensor], Tensor]:
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))  # class 0 from modality a, class 1 from modality v
    a = torch.tensor([2.0, 2.0, -1.0, 0.5, 1.0, -3.0])
    v = torch.tensor([1.0, 3.0, 1.0, -2.0, 1.0, -1.0])
    return head, {"a": a[:, None], "v": v[:, None]}, torch.tensor([0, 1, 0, 0, 1, 1])


def test_one_valuation_by_hand() -> None:
    head, feats, y = _linear_case()
    val = SampleModalityValuation(head, ["a", "v"], num_samples=6, warmup=1, shuffle=False)
    rec = val.epoch_end(0, [(feats, y, torch.arange(6))])
    assert rec is not None
    # logits [a, v]; argmax of [0, 0] is class 0. Per sample (c_a, c_v, c_av):
    # 0: a=[2,0]->0 right, v=[0,1]->1 wrong, av=[2,1]->0 right      (1, 0, 1) -> (1.5, 0.5)
    # 1: a->0 wrong, v->1 right, av=[2,3]->1 right                   (0, 1, 1) -> (0.5, 1.5)
    # 2: a=[-1,0]->1 wrong, v->1 wrong, av=[-1,1]->1 wrong            (0, 0, 0) -> (0, 0)
    # 3: a->0 right, v=[0,-2]->0 right, av=[.5,-2]->0 right           (1, 1, 1) -> (1, 1)
    # 4: a->0 wrong, v->1 right, av=[1,1]->0 wrong                    (0, 1, 0) -> (-0.5, 0.5)
    # 5: a=[-3,0]->1 right, v=[0,-1]->0 wrong, av=[-3,-1]->1 right    (1, 0, 1) -> (1.5, 0.5)
    phi_a = [1.5, 0.5, 0.0, 1.0, -0.5, 1.5]
    phi_v = [0.5, 1.5, 0.0, 1.0, 0.5, 0.5]
    counts = [[ref_copies(p) for p in phi_a], [ref_copies(p) for p in phi_v]]
    assert torch.allclose(rec.mean_phi, torch.tensor([sum(phi_a) / 6, sum(phi_v) / 6]))
    assert rec.copies.tolist() == [sum(c) for c in counts]
    assert rec.accuracy.item() == pytest.approx(4 / 6)
    assert rec.plan_size == 6 + sum(map(sum, counts)) == len(val.sampler)
    entries = list(val.sampler)
    assert entries[:6] == [(i, 3) for i in range(6)]  # originals: nothing dropped
    expected = [(i, 1 << j) for i in range(6) for j in range(2) for _ in range(counts[j][i])]
    assert entries[6:] == expected  # copies keep modality j only (bit j)


def test_heads_mapping_head_and_per_modality_heads_are_served() -> None:
    head, feats, y = _linear_case()
    omit = MappingHead(lambda f: sum(head.weight[:, [j]] @ x.T for j, x in enumerate(f.values())).T)
    # an "omit" head drops absent modalities: same argmaxes as zeroing them in this linear head
    per = {"a": lambda x: x @ head.weight[:, :1].T, "v": lambda x: x @ head.weight[:, 1:].T}
    plans = []
    for h in (head, MappingHead(lambda f: head(torch.cat(list(f.values()), 1)), "zeros"), per):
        val = SampleModalityValuation(h, ["a", "v"], 6, warmup=1, shuffle=False)
        val.value([(feats, y, torch.arange(6))])
        plans.append((val.sampler.index.tolist(), val.sampler.bits.tolist()))
    assert plans[0] == plans[1] == plans[2]
    val = SampleModalityValuation(omit, ["a", "v"], 6, warmup=1)
    assert val.value([(feats, y, torch.arange(6))]).copies.sum() > 0


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)),
                "v": nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)),
            }
        )
        self.head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))

    def features(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: enc(x[m]) for m, enc in self.enc.items()}

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.head(torch.cat(list(self.features(x).values()), 1))


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g),
                         torch.randint(3, (n,), generator=g))  # fmt: skip


def _forward(model: _Model) -> Any:
    def forward(batch: Any) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        (a, v, y), index, _ = batch
        return model.features({"a": a, "v": v}), y, index

    return forward


def test_valuation_changes_no_weight_or_buffer_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = _Model().train()
    model.enc["v"].eval()  # a mixed state must come back as it was
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    data = _data()
    val = SampleModalityValuation(model.head, ["a", "v"], len(data), warmup=1)
    loader = DataLoader(val.dataset(data), batch_size=5, sampler=val.value_indices())
    rec = val.epoch_end(0, loader, forward=_forward(model), model=model)
    assert rec is not None and rec.samples == 24
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_warmup_reads_nothing_before_epoch_warmup_minus_one() -> None:
    class Refuse:
        def __iter__(self) -> Any:
            raise AssertionError("read before warm-up")

    val = SampleModalityValuation(nn.Linear(2, 2), ["a", "v"], 4, warmup=3)
    assert val.epoch_end(0, Refuse()) is None and val.epoch_end(1, Refuse()) is None
    assert len(val.sampler) == 4 and all(b == 3 for _, b in val.sampler)  # plain epochs


# ----------------------------------------------------------------------------------------------
# the sampler


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(1, 4), st.integers(0, 5), st.booleans())
def test_shards_cover_the_plan_and_share_one_order(
    size: int, replicas: int, epoch: int, drop_last: bool
) -> None:
    index, bits = torch.arange(size) * 7, torch.ones(size, dtype=torch.long)
    samplers = []
    for rank in range(replicas):
        s = ValuationSampler(size * 7, 2, num_replicas=replicas, rank=rank, seed=3,
                             drop_last=drop_last)  # fmt: skip
        s.set_plan(index, bits)
        s.set_epoch(epoch)
        samplers.append(s)
    shards = [list(s) for s in samplers]
    assert len({len(x) for x in shards}) == 1 and all(len(x) == len(samplers[0]) for x in shards)
    merged = [e for group in zip(*shards, strict=True) for e in group]  # interleave by rank
    order = samplers[0].order()
    assert merged == [(int(index[o]), 1) for o in order]
    if size % replicas == 0:  # covered exactly once
        assert sorted(i for i, _ in merged) == index.tolist()
    elif drop_last:
        assert len(set(merged)) == len(merged) == size - size % replicas
    else:  # padded by wrapping around: every entry at least once
        assert {i for i, _ in merged} == set(index.tolist())


def test_order_is_seeded_by_epoch_like_distributed_sampler() -> None:
    s = ValuationSampler(50, 2, seed=1)
    s.set_epoch(4)
    first = list(s)
    assert list(s) == first  # same seed and epoch, same order
    s.set_epoch(5)
    assert list(s) != first and sorted(list(s)) == sorted(first)
    g = torch.Generator().manual_seed(1 + 4)
    assert [i for i, _ in first] == torch.randperm(50, generator=g).tolist()


def test_a_dataloader_with_the_sampler_gives_keep_masks() -> None:
    head, feats, y = _linear_case()
    val = SampleModalityValuation(head, ["a", "v"], 6, warmup=1, seed=0)
    val.value([(feats, y, torch.arange(6))])
    data = TensorDataset(feats["a"], feats["v"], y)
    loader = DataLoader(val.dataset(data), batch_size=4, sampler=val.sampler, num_workers=0)
    seen = []
    for (a, v, _), index, keep in loader:
        assert keep.dtype == torch.bool and keep.shape == (len(index), 2)
        out = apply_mask({"a": a, "v": v}, keep)
        assert torch.equal(out["a"][~keep[:, 0]], torch.zeros_like(out["a"][~keep[:, 0]]))
        seen += list(zip(index.tolist(), (keep[:, 0] * 1 + keep[:, 1] * 2).tolist(), strict=True))
    assert sorted(seen) == sorted(zip(val.sampler.index.tolist(), val.sampler.bits.tolist(),
                                      strict=True))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# training, resume, AMP, modality level


def _train(epochs: int, stop_at: tuple[int, int] | None = None, state: Any = None) -> Any:
    """Train 24 samples for ``epochs``; stop after batch ``stop_at`` (returns a checkpoint) or
    resume from ``state`` (a checkpoint) and run to the end."""
    torch.manual_seed(0)
    model, data = _Model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = SampleModalityValuation(model.head, ["a", "v"], len(data), warmup=2, seed=7)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        val.load_state_dict(state["val"])
        torch.set_rng_state(state["rng"])
        start = state["epoch"]
    # own generators: a loader's base-seed draw must not consume the global RNG (dropout)
    loader = DataLoader(val.dataset(data), batch_size=5, sampler=val.sampler,
                        generator=torch.Generator())  # fmt: skip
    value_loader = DataLoader(val.dataset(data), batch_size=8, sampler=val.value_indices(),
                              generator=torch.Generator())  # fmt: skip
    for epoch in range(start, epochs):
        val.sampler.set_epoch(epoch)
        for step, ((a, v, y), _, keep) in enumerate(loader):
            model.train()
            feats = apply_mask(model.features({"a": a, "v": v}), keep)
            loss = F.cross_entropy(model.head(torch.cat(list(feats.values()), 1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if stop_at == (epoch, step):
                return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(
                    opt.state_dict()), "val": copy.deepcopy(val.state_dict()),
                    "rng": torch.get_rng_state(), "epoch": epoch}  # fmt: skip
        val.epoch_end(epoch, value_loader, forward=_forward(model), model=model)
    return model.state_dict(), val.last


def test_resume_mid_epoch_is_bit_exact() -> None:
    full, last = _train(3)
    assert last is not None and last.plan_size > 24  # epoch 2 trained on copies
    checkpoint = _train(3, stop_at=(2, 3))  # mid-epoch, in the re-sampled epoch
    resumed, last_resumed = _train(3, state=checkpoint)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert last_resumed.plan_size == last.plan_size
    assert torch.equal(last_resumed.copies, last.copies)


def test_bf16_autocast_gives_fp32_statistics() -> None:
    torch.manual_seed(0)
    model, data = _Model(), _data()
    val = SampleModalityValuation(model.head, ["a", "v"], len(data), warmup=1)
    loader = DataLoader(val.dataset(data), batch_size=8, sampler=val.value_indices())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = val.value(loader, forward=_forward(model), model=model)
    assert rec.mean_phi.dtype == torch.float32 and bool(torch.isfinite(rec.mean_phi).all())
    assert rec.plan_size == 24 + int(rec.copies.sum())


def test_modality_level_variant_keeps_the_weaker_modality() -> None:
    head, feats, y = _linear_case()
    val = SampleModalityValuation(head, ["a", "v"], 6, warmup=1, level="modality", alpha=1.0)
    rec = val.value([(feats, y, torch.arange(6))], epoch=3)
    # mean phi (a, v) = (4/6, 4/6) by hand (test above): equal gaps, no extra sample
    assert rec.copies.tolist() == [0, 0] and rec.plan_size == 6
    # a = 0: alone it always says class 0 (argmax of [0, 0]); v alone and both are always right.
    # y = 0: (c_a, c_v, c_av) = (1, 1, 1) -> (1, 1); y = 1: (0, 1, 1) -> (0.5, 1.5)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    feats = {"a": torch.zeros(6, 1), "v": (2.0 * y - 1)[:, None]}
    rec = val.value([(feats, y, torch.arange(6))], epoch=3)
    assert rec.mean_phi.tolist() == [0.75, 1.25]
    # gaps 0.25 and -0.25: K = floor(6 * 1 * 2/3 * 0.5) = 2 copies keeping a (v dropped)
    assert rec.copies.tolist() == [2, 0] and rec.plan_size == 8
    assert val.sampler.bits[6:].tolist() == [1, 1]
    again = SampleModalityValuation(head, ["a", "v"], 6, warmup=1, level="modality")
    again.value([(feats, y, torch.arange(6))], epoch=3)
    assert torch.equal(again.sampler.index, val.sampler.index)  # seeded by seed + epoch


# ----------------------------------------------------------------------------------------------
# DDP


def _ddp_body(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, data = _Model(), _data(25)  # 25: uneven shards
    val = SampleModalityValuation(model.head, ["a", "v"], len(data), warmup=1, seed=2)
    loader = DataLoader(val.dataset(data), batch_size=4, sampler=val.value_indices())
    rec = val.value(loader, forward=_forward(model), model=model, epoch=1)
    val.sampler.set_epoch(1)
    out: dict[str, Any] = {"index": val.sampler.index, "bits": val.sampler.bits,
                           "copies": rec.copies, "shard": list(val.sampler)}  # fmt: skip
    model.eval()
    bad = [
        (f, y.clamp_max(1) if rank == 0 else y + 5, i) for f, y, i in map(_forward(model), loader)
    ]
    try:
        val.value(bad)
    except (ValueError, RuntimeError) as err:
        out["error"] = type(err).__name__
    return out


def test_two_gloo_ranks_equal_one_process() -> None:
    results = run_distributed(_ddp_body)
    torch.manual_seed(0)
    model, data = _Model(), _data(25)
    val = SampleModalityValuation(model.head, ["a", "v"], len(data), warmup=1, seed=2)
    loader = DataLoader(val.dataset(data), batch_size=4)
    rec = val.value(loader, forward=_forward(model), model=model, epoch=1)
    for r in results:  # every rank builds the single process's plan
        assert torch.equal(r["index"], val.sampler.index) and torch.equal(
            r["bits"], val.sampler.bits
        )
        assert torch.equal(r["copies"], rec.copies)
    assert len(results[0]["shard"]) == len(results[1]["shard"])
    val.sampler.set_epoch(1)
    order = val.sampler.order()
    merged = [
        e for pair in zip(results[0]["shard"], results[1]["shard"], strict=True) for e in pair
    ]
    assert len(merged) == 2 * math.ceil(len(order) / 2)
    plan = list(zip(val.sampler.index.tolist(), val.sampler.bits.tolist(), strict=True))
    pad = len(merged) - len(plan)  # padded by wrapping around
    assert merged == [plan[o] for o in order.tolist()] + [plan[o] for o in order[:pad].tolist()]
    assert results[0]["error"] == "RuntimeError" and results[1]["error"] == "ValueError"


# ----------------------------------------------------------------------------------------------
# bad input and docs


def test_bad_input_is_refused_with_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"2\^M"):
        sample_shapley(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        sample_shapley(torch.full((4, 2), 2))
    with pytest.raises(ValueError, match="NaN"):
        copy_counts(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="increase"):
        copy_counts(torch.zeros(1), bounds=(0.5, 0.4, 1.0))
    with pytest.raises(ValueError, match="non-negative"):
        resampling_plan(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"keep must be bool \[B, M\] = \[3, 2\].*'v': \(3, 1\)"):
        apply_mask(
            {"a": torch.ones(3, 2), "v": torch.ones(3, 1)}, torch.ones(3, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="at least two"):
        SampleModalityValuation(nn.Linear(2, 2), ["a"], 4)
    with pytest.raises(ValueError, match="level"):
        SampleModalityValuation(nn.Linear(2, 2), ["a", "v"], 4, level="batch")  # type: ignore[arg-type]
    head, feats, y = _linear_case()
    val = SampleModalityValuation(head, ["a", "v"], 6)
    with pytest.raises(ValueError, match="has 5 samples, num_samples is 6"):
        val.dataset(TensorDataset(torch.zeros(5)))
    with pytest.raises(ValueError, match=r"missing \['v'\]"):
        val.value([({"a": feats["a"], "w": feats["v"]}, y, torch.arange(6))])
    with pytest.raises(ValueError, match=r"index values must be in \[0, 6\)"):
        val.value([(feats, y, torch.arange(6) + 1)])
    with pytest.raises(ValueError, match="2 of 6 samples were not valued"):
        val.value([(feats, y, torch.tensor([0, 1, 1, 2, 3, 3]))])
    with pytest.raises(TypeError, match="class indices"):
        val.value([(feats, y.float(), torch.arange(6))])
    with pytest.raises(ValueError, match="target"):
        val.value([(feats, y + 2, torch.arange(6))])
    with pytest.raises(ValueError, match=r"\[2\^M, B, C\]|width"):
        val.value([({"a": feats["a"], "v": torch.ones(6, 3)}, y, torch.arange(6))])
    state = ValuationSampler(6, 2, num_replicas=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="same world size"):
        ValuationSampler(6, 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ValuationSampler(6, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="bits"):
        ValuationSampler(6, 2).set_plan(torch.arange(2), torch.tensor([0, 3]))
    assert MaskedDataset(TensorDataset(torch.zeros(2)), 3)[1][2].tolist() == [True] * 3


def test_non_finite_features_or_logits_are_refused_not_valued() -> None:
    """A NaN / inf feature or a head that outputs inf: a clear error naming what is not finite,
    not a plan built from argmax over NaN (which torch reads as the top class)."""
    head, feats, y = _linear_case()
    val = SampleModalityValuation(head, ["a", "v"], 6)
    bad = feats["v"].clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features\['v'\] contains non-finite"):
        val.value([({"a": feats["a"], "v": bad}, y, torch.arange(6))])
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"features\['v'\] contains non-finite"):
        val.value([({"a": feats["a"], "v": bad}, y, torch.arange(6))])
    huge = SampleModalityValuation(lambda x: x.sum(1, keepdim=True).expand(-1, 2) * 1e39,
                                   ["a", "v"], 6)  # fmt: skip
    with pytest.raises(ValueError, match="non-finite"):
        huge.value([(feats, y, torch.arange(6))])
    assert val.last is None and huge.last is None


def test_the_guide_runs_as_written(tmp_path: Any) -> None:
    namespace = run_page("valuation.md", tmp_path)
    assert namespace["valuation"].last is not None
