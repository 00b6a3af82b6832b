"""ImbalanceMonitor: values against the formulas, pooling, gradients, state, DDP, host reads."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from imbalance_losses.core.unimodal import unimodal_logits
from imbalance_losses.diagnosis.monitor import ImbalanceMonitor
from imbalance_losses.methods.modulation import ModalityGradientModulator
from tests.ddp import run_distributed
from tests.host_reads import HostReads

MODS = ("audio", "image", "text")


def _softmax_row(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _expected(logits: dict[str, list[list[float]]], y: list[int]) -> dict[str, float]:
    """acc, confidence and the one-vs-rest ratio written out in plain Python."""
    out: dict[str, float] = {}
    s = {}
    for m, rows in logits.items():
        correct = sum(
            1 for z, t in zip(rows, y, strict=True) if max(range(len(z)), key=z.__getitem__) == t
        )
        s[m] = sum(_softmax_row(z)[t] for z, t in zip(rows, y, strict=True))
        out[f"imbalance/{m}/acc"] = correct / len(y)
        out[f"imbalance/{m}/confidence"] = s[m] / len(y)
    for m in logits:
        rest = [s[k] for k in logits if k != m]
        out[f"imbalance/{m}/ratio"] = s[m] / (sum(rest) / len(rest))
    out["imbalance/samples"] = float(len(y))
    return out


HAND = {
    "audio": [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.5, 0.0]],
    "image": [[0.0, 4.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.5], [3.0, 0.0, 0.0]],
    "text": [[0.1, 0.0, 0.0], [0.0, 0.0, 0.2], [1.0, 1.5, 0.0], [0.0, 0.0, 0.0]],
}
HAND_Y = [0, 1, 2, 0]


def _tensors(logits: dict[str, list[list[float]]]) -> dict[str, torch.Tensor]:
    return {m: torch.tensor(z) for m, z in logits.items()}


def test_values_match_the_formulas_on_hand_made_logits() -> None:
    monitor = ImbalanceMonitor(MODS)
    monitor.update(_tensors(HAND), torch.tensor(HAND_Y))
    got = monitor.compute()
    want = _expected(HAND, HAND_Y)
    # acc by hand: audio 4/4, image 3/4, text 2/4 (argmax ties go to the first class)
    assert got["imbalance/audio/acc"] == 1.0
    assert got["imbalance/image/acc"] == 0.75
    assert got["imbalance/text/acc"] == 0.5  # rows 1 and 4 ([0, 0, 0] -> class 0) right
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_two_modalities_ratio_is_the_score_quotient_and_the_modulators() -> None:
    z = {
        "a": torch.randn(16, 5, generator=torch.Generator().manual_seed(0)),
        "b": torch.zeros(16, 5),
    }
    y = torch.arange(16) % 5
    monitor = ImbalanceMonitor(["a", "b"])
    monitor.update(z, y)
    got = monitor.compute()
    sa = torch.softmax(z["a"].double(), -1)[torch.arange(16), y].sum().item()
    sb = 16 * 0.2
    assert got["imbalance/a/ratio"] == pytest.approx(sa / sb, rel=1e-6)
    assert got["imbalance/b/ratio"] == pytest.approx(sb / sa, rel=1e-6)
    # the modulator on the same batch decides the same ratios (one implementation)
    mod = ModalityGradientModulator({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, 0.5)
    mod.step(z, y)
    assert mod.last is not None
    assert got["imbalance/a/ratio"] == mod.last.ratios[0].item()
    assert got["imbalance/b/ratio"] == mod.last.ratios[1].item()


def test_ratio_is_capped_like_the_modulators() -> None:
    monitor = ImbalanceMonitor(["a", "b"], max_ratio=10.0)
    monitor.update(
        {"a": torch.tensor([[50.0, -50.0]]), "b": torch.tensor([[-50.0, 50.0]])}, torch.tensor([0])
    )
    got = monitor.compute()
    assert got["imbalance/a/ratio"] == 10.0
    assert got["imbalance/b/ratio"] < 1e-20


def test_ignored_targets_and_soft_targets() -> None:
    monitor = ImbalanceMonitor(["a", "b"], ignore_index=-1)
    z = {"a": torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]), "b": torch.zeros(3, 2)}
    monitor.update(z, torch.tensor([0, -1, 0]))  # the second sample is left out
    got = monitor.compute()
    assert got["imbalance/samples"] == 2.0
    assert got["imbalance/a/acc"] == 0.5
    p = math.exp(3) / (1 + math.exp(3))
    assert got["imbalance/a/confidence"] == pytest.approx((p + 1 - p) / 2, rel=1e-6)
    soft = ImbalanceMonitor(["a", "b"])
    t = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # argmax 0, 1, 0
    soft.update(z, t)
    got = soft.compute()
    assert got["imbalance/a/acc"] == pytest.approx(2 / 3)
    want = (0.8 * p + 0.2 * (1 - p) + 0.3 * (1 - p) + 0.7 * p + 0.6 * (1 - p) + 0.4 * p) / 3
    assert got["imbalance/a/confidence"] == pytest.approx(want, rel=1e-6)


@given(
    cuts=st.lists(st.integers(0, 12), min_size=0, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_pooling_over_micro_batches_equals_one_batch(cuts: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = {m: torch.randn(12, 4, generator=g) * 3 for m in MODS}
    y = torch.randint(0, 4, (12,), generator=g)
    whole = ImbalanceMonitor(MODS)
    whole.update(z, y)
    parts = ImbalanceMonitor(MODS)
    bounds = [0, *sorted(cuts), 12]
    for lo, hi in itertools.pairwise(bounds):  # empty micro-batches included
        parts.update({m: x[lo:hi] for m, x in z.items()}, y[lo:hi])
    a, b = whole.compute(), parts.compute()
    assert set(a) == set(b)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    ratios = [a[f"imbalance/{m}/ratio"] for m in MODS]
    assert all(r > 0 for r in ratios) and all(0 <= a[f"imbalance/{m}/acc"] <= 1 for m in MODS)


def test_features_through_the_head_equal_the_unimodal_logits() -> None:
    torch.manual_seed(0)
    head = nn.Linear(7, 4)
    feats = {"a": torch.randn(9, 3), "b": torch.randn(9, 4)}
    y = torch.arange(9) % 4
    with_head = ImbalanceMonitor(["a", "b"], head=head)
    with_head.update(feats, y)
    plain = ImbalanceMonitor(["a", "b"])
    plain.update(unimodal_logits(head, feats), y)
    assert with_head.compute() == plain.compute()


class Encoders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2, bias=False)


def _set_grads(enc: Encoders, scale_a: float, scale_b: float) -> tuple[float, float]:
    """Gradients with known norms; returns (||g_a||, ||g_b||) over each encoder's parameters."""
    enc.a.weight.grad = torch.full((2, 3), scale_a)
    enc.a.bias.grad = torch.full((2,), 2 * scale_a)
    enc.b.weight.grad = torch.full((2, 4), scale_b)
    return math.sqrt(6 * scale_a**2 + 2 * 4 * scale_a**2), math.sqrt(8 * scale_b**2)


def test_gradient_norms_and_shares_match_the_formulas() -> None:
    enc = Encoders()
    monitor = ImbalanceMonitor(["a", "b"], encoders={"a": enc.a, "b": enc.b})
    monitor.update({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, torch.tensor([0, 1]))
    n1 = _set_grads(enc, 1.0, 0.5)
    monitor.observe_gradients()
    n2 = _set_grads(enc, 0.25, 2.0)
    monitor.observe_gradients()
    _set_grads(enc, float("nan"), 1.0)  # a skipped (non-finite) step is left out
    monitor.observe_gradients()
    enc.a.bias.grad = None  # a parameter without a gradient counts as zero
    enc.a.weight.grad = torch.full((2, 3), 1.0)
    enc.b.weight.grad = torch.zeros(2, 4)
    monitor.observe_gradients()
    n3 = (math.sqrt(6.0), 0.0)
    got = monitor.compute()
    mean_a = (n1[0] + n2[0] + n3[0]) / 3
    mean_b = (n1[1] + n2[1] + n3[1]) / 3
    assert got["imbalance/grad_steps"] == 3.0
    assert got["imbalance/a/grad_norm"] == pytest.approx(mean_a, rel=1e-6)
    assert got["imbalance/b/grad_norm"] == pytest.approx(mean_b, rel=1e-6)
    assert got["imbalance/a/grad_share"] == pytest.approx(mean_a / (mean_a + mean_b), rel=1e-6)
    assert got["imbalance/a/grad_share"] + got["imbalance/b/grad_share"] == pytest.approx(1.0)


def test_without_gradient_steps_there_are_no_gradient_keys_and_zero_gradients_share_zero() -> None:
    enc = Encoders()
    monitor = ImbalanceMonitor(["a", "b"], encoders={"a": enc.a, "b": enc.b})
    monitor.update({"a": torch.zeros(1, 2), "b": torch.zeros(1, 2)}, torch.tensor([0]))
    assert not any("grad" in k for k in monitor.compute())
    for p in enc.parameters():
        p.grad = torch.zeros_like(p)
    monitor.observe_gradients()
    got = monitor.compute()
    assert got["imbalance/a/grad_share"] == 0.0 and got["imbalance/b/grad_share"] == 0.0


def test_tracked_method_record_is_included() -> None:
    enc = Encoders()
    mod = ModalityGradientModulator({"a": enc.a, "b": enc.b}, 0.5)
    monitor = ImbalanceMonitor(["a", "b"])
    monitor.track(mod, "ogm")
    z = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])}
    y = torch.tensor([0])
    monitor.update(z, y)
    assert not any(k.startswith("imbalance/ogm/") for k in monitor.compute())  # no step yet
    _set_grads(enc, 1.0, 1.0)
    mod.step(z, y)
    got = monitor.compute()
    assert mod.last is not None
    for key, value in mod.last.to_dict().items():
        assert got[f"imbalance/ogm/{key}"] == value
    assert "imbalance/ogm/coefficients/a" in got
    with pytest.raises(ValueError, match="name must be new"):
        monitor.track(mod, "ogm")
    with pytest.raises(ValueError, match="modalities"):
        monitor.track(mod, "a")
    with pytest.raises(TypeError, match="last"):
        monitor.track(object())  # type: ignore[arg-type]


def test_compute_does_not_reset_and_reset_forgets() -> None:
    monitor = ImbalanceMonitor(["a", "b"])
    with pytest.raises(RuntimeError, match="nothing observed"):
        monitor.compute()
    z = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])}
    monitor.update(z, torch.tensor([0]))
    first = monitor.compute()
    assert monitor.compute() == first
    monitor.update(z, torch.tensor([1]))
    assert monitor.compute()["imbalance/samples"] == 2.0
    monitor.reset()
    with pytest.raises(RuntimeError, match="nothing observed"):
        monitor.compute()


def test_state_round_trip_resumes_mid_epoch() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [
        ({m: torch.randn(5, 3, generator=g) for m in MODS}, torch.randint(0, 3, (5,), generator=g))
        for _ in range(4)
    ]
    enc = {m: nn.Linear(2, 2) for m in MODS}
    straight = ImbalanceMonitor(MODS, encoders=enc)
    for z, y in batches:
        straight.update(z, y)
        for i, p in enumerate(p for e in enc.values() for p in e.parameters()):
            p.grad = torch.full_like(p, float(i + 1))
        straight.observe_gradients()
    first = ImbalanceMonitor(MODS, encoders=enc)
    for z, y in batches[:2]:
        first.update(z, y)
        first.observe_gradients()
    state = first.state_dict()
    first.update(*batches[2])  # the saved state is a copy
    resumed = ImbalanceMonitor(MODS, encoders=enc)
    resumed.load_state_dict(state)
    for z, y in batches[2:]:
        resumed.update(z, y)
        resumed.observe_gradients()
    assert resumed.compute() == pytest.approx(straight.compute(), rel=1e-6)
    with pytest.raises(ValueError, match="modalities"):
        ImbalanceMonitor(["x", "y"]).load_state_dict(state)
    with pytest.raises(KeyError, match="pool"):
        ImbalanceMonitor(MODS).load_state_dict({"modalities": list(MODS)})


def test_bad_input_names_the_modality_and_shapes() -> None:
    monitor = ImbalanceMonitor(["audio", "image"])
    with pytest.raises(ValueError, match="missing \\['image'\\]"):
        monitor.update(
            {"audio": torch.zeros(2, 3), "video": torch.zeros(2, 3)}, torch.tensor([0, 1])
        )
    with pytest.raises(ValueError, match="image"):
        monitor.update(
            {"audio": torch.zeros(2, 3), "image": torch.zeros(2, 4)}, torch.tensor([0, 1])
        )
    with pytest.raises(ValueError, match="non-finite"):
        monitor.update(
            {"audio": torch.zeros(2, 3), "image": torch.full((2, 3), math.nan)},
            torch.tensor([0, 1]),
        )
    with pytest.raises(ValueError, match="target"):
        monitor.update(
            {"audio": torch.zeros(2, 3), "image": torch.zeros(2, 3)}, torch.tensor([0, 5])
        )
    with pytest.raises(RuntimeError, match="encoders"):
        monitor.observe_gradients()
    with pytest.raises(ValueError, match="two distinct"):
        ImbalanceMonitor(["a", "a"])
    with pytest.raises(TypeError, match="sequence"):
        ImbalanceMonitor("ab")
    with pytest.raises(ValueError, match="encoders"):
        ImbalanceMonitor(["a", "b"], encoders={"b": nn.Linear(1, 1), "a": nn.Linear(1, 1)})


def test_update_and_observe_gradients_make_no_host_reads() -> None:
    enc = Encoders()
    head = nn.Linear(5, 2)
    monitor = ImbalanceMonitor(
        ["a", "b"], head=head, encoders={"a": enc.a, "b": enc.b}, ignore_index=-1
    )
    feats = {"a": torch.randn(4, 2), "b": torch.randn(4, 3)}
    _set_grads(enc, 1.0, 2.0)
    with HostReads() as spy:
        monitor.update(feats, torch.tensor([0, 1, -1, 1]))
        monitor.update(feats, torch.tensor([[0.5, 0.5]] * 4))
        monitor.observe_gradients()
        monitor.observe_gradients()
    assert spy.reads == []
    with HostReads() as spy:  # the spy does see the read compute() makes
        monitor.compute()
    assert "tolist" in spy.reads


# ----------------------------------------------------------------------------- DDP


def _ddp_body(
    rank: int, size: int, z: dict[str, torch.Tensor], y: torch.Tensor, grads: torch.Tensor
) -> dict[str, float]:
    enc = Encoders()
    monitor = ImbalanceMonitor(["a", "b"], encoders={"a": enc.a, "b": enc.b})
    lo, hi = (0, 7) if rank == 0 else (7, 10)  # uneven shares
    for start in range(lo, hi, 3):  # micro-batches
        end = min(start + 3, hi)
        monitor.update({m: x[start:end] for m, x in z.items()}, y[start:end])
    if rank == 1:
        monitor.update({m: x[:0] for m, x in z.items()}, y[:0])  # an empty micro-batch
    for scale_a, scale_b in grads[rank].tolist():
        _set_grads(enc, scale_a, scale_b)
        monitor.observe_gradients()
    # a rank that saw nothing at all since reset() joins the all-reduce with zeros
    only_rank0 = ImbalanceMonitor(["a", "b"])
    if rank == 0:
        only_rank0.update(z, y)
    values = monitor.compute()
    values.update({f"only_rank0/{k}": v for k, v in only_rank0.compute().items()})
    return values


def test_two_ranks_pool_to_what_one_process_computes() -> None:
    g = torch.Generator().manual_seed(0)
    z = {"a": torch.randn(10, 4, generator=g) * 2, "b": torch.randn(10, 4, generator=g)}
    y = torch.randint(0, 4, (10,), generator=g)
    grads = torch.tensor([[[1.0, 0.5], [0.2, 0.3]], [[3.0, 1.0], [0.5, 0.5]]])
    r0, r1 = run_distributed(_ddp_body, z, y, grads)
    assert r0 == r1
    enc = Encoders()
    one = ImbalanceMonitor(["a", "b"], encoders={"a": enc.a, "b": enc.b})
    one.update(z, y)
    for scale_a, scale_b in grads.reshape(-1, 2).tolist():
        _set_grads(enc, scale_a, scale_b)
        one.observe_gradients()
    want = one.compute()
    # each rank observed its own 2 optimiser steps: T counts steps, not steps x ranks (issue 19)
    want["imbalance/grad_steps"] = float(grads.shape[1])
    plain = ImbalanceMonitor(["a", "b"])
    plain.update(z, y)
    want.update({f"only_rank0/{k}": v for k, v in plain.compute().items()})
    assert set(r0) == set(want)
    for key in want:
        assert r0[key] == pytest.approx(want[key], rel=1e-6), key


# ------------------------------------------------- issue 19: DDP step count, no countable sample


def _grad_steps_body(
    rank: int, size: int, steps: list[list[tuple[float, float]]]
) -> dict[str, float]:
    enc = Encoders()
    monitor = ImbalanceMonitor(["a", "b"], encoders={"a": enc.a, "b": enc.b})
    monitor.update({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, torch.tensor([0, 1]))
    for scale_a, scale_b in steps[rank]:
        _set_grads(enc, scale_a, scale_b)
        monitor.observe_gradients()
    return monitor.compute()


def test_ddp_grad_steps_are_optimiser_steps_not_steps_times_ranks() -> None:
    """Under DDP every rank holds the same all-reduced gradients at each optimiser step."""
    same = [(1.0, 0.5), (0.25, 2.0), (3.0, 1.0)]
    r0, r1 = run_distributed(_grad_steps_body, [same, same])
    assert r0 == r1
    assert r0["imbalance/grad_steps"] == 3.0  # 3 steps on 2 ranks, not 6
    norms = [_set_grads(Encoders(), a, b) for a, b in same]
    mean_a = sum(n[0] for n in norms) / 3
    mean_b = sum(n[1] for n in norms) / 3
    assert r0["imbalance/a/grad_norm"] == pytest.approx(mean_a, rel=1e-6)
    assert r0["imbalance/b/grad_norm"] == pytest.approx(mean_b, rel=1e-6)
    assert r0["imbalance/a/grad_share"] == pytest.approx(mean_a / (mean_a + mean_b), rel=1e-6)


def test_ddp_a_rank_that_observed_no_gradient_adds_no_step() -> None:
    steps = [(1.0, 0.5), (0.25, 2.0)]
    r0, r1 = run_distributed(_grad_steps_body, [steps, []])
    assert r0 == r1
    assert r0["imbalance/grad_steps"] == 2.0  # not 2 / 2 ranks = 1, nor 2 x 2
    norms = [_set_grads(Encoders(), a, b) for a, b in steps]
    assert r0["imbalance/a/grad_norm"] == pytest.approx((norms[0][0] + norms[1][0]) / 2, rel=1e-6)
    assert r0["imbalance/b/grad_norm"] == pytest.approx((norms[0][1] + norms[1][1]) / 2, rel=1e-6)


def test_a_window_with_no_countable_sample_raises() -> None:
    z = {"a": torch.tensor([[3.0, 0.0], [0.0, 3.0]]), "b": torch.zeros(2, 2)}
    monitor = ImbalanceMonitor(["a", "b"], ignore_index=-1)
    monitor.update(z, torch.tensor([-1, -1]))  # every target ignored
    monitor.update({m: x[:0] for m, x in z.items()}, torch.tensor([], dtype=torch.long))
    with pytest.raises(RuntimeError, match="no countable sample"):
        monitor.compute()
    only_empty = ImbalanceMonitor(["a", "b"])
    only_empty.update({m: x[:0] for m, x in z.items()}, torch.tensor([], dtype=torch.long))
    with pytest.raises(RuntimeError, match="no countable sample"):
        only_empty.compute()
    # compute() does not reset: one counted sample later, the window has values again
    monitor.update(z, torch.tensor([-1, 1]))
    got = monitor.compute()
    assert got["imbalance/samples"] == 1.0
    assert got["imbalance/a/acc"] == 1.0 and got["imbalance/b/acc"] == 0.0


def _no_countable_body(rank: int, size: int, targets: list[list[int]]) -> dict[str, Any]:
    z = {"a": torch.tensor([[3.0, 0.0], [0.0, 3.0]]), "b": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}
    monitor = ImbalanceMonitor(["a", "b"], ignore_index=-1)
    y = torch.tensor(targets[rank], dtype=torch.long)
    monitor.update({m: x[: len(y)] for m, x in z.items()}, y)
    try:
        return {"values": monitor.compute()}
    except RuntimeError as err:
        return {"error": str(err)}


def test_ddp_no_countable_sample_raises_on_every_rank() -> None:
    # rank 0: every target ignored; rank 1: an empty batch (B = 0)
    r0, r1 = run_distributed(_no_countable_body, [[-1, -1], []])
    assert "no countable sample" in r0.get("error", "")
    assert "no countable sample" in r1.get("error", "")
    # one counted sample on rank 1 is enough: both ranks report it, neither raises
    r0, r1 = run_distributed(_no_countable_body, [[-1, -1], [-1, 1]])
    assert r0 == r1 and "values" in r0
    got = r0["values"]
    assert got["imbalance/samples"] == 1.0
    assert got["imbalance/a/acc"] == 1.0 and got["imbalance/b/acc"] == 1.0
    p_a = math.exp(3) / (1 + math.exp(3))  # softmax([0, 3])[1]
    p_b = math.exp(1) / (1 + math.exp(1))  # softmax([0, 1])[1]
    assert got["imbalance/a/confidence"] == pytest.approx(p_a, rel=1e-6)
    assert got["imbalance/a/ratio"] == pytest.approx(p_a / p_b, rel=1e-6)


# ------------------------------------- a checkpoint under DDP: one rank writes, every rank reads


def _checkpoint_body(
    rank: int, size: int, z: dict[str, torch.Tensor], y: torch.Tensor, cut: int
) -> dict[str, dict[str, float]]:
    """Each rank updates its own half of the batches, a checkpoint is taken (the state of every
    rank, as the callbacks take it; rank 0's is the one written), every rank resumes from
    rank 0's and both runs go on with the same later batches."""
    import torch.distributed as dist

    enc = Encoders()
    parts = [slice(0, cut), slice(cut, 10)]  # before and after the checkpoint
    mine = [slice(p.start + 10 * rank, p.stop + 10 * rank) for p in parts]
    monitor = ImbalanceMonitor(["a", "b"], encoders={"a": enc.a, "b": enc.b})
    monitor.update({m: x[mine[0]] for m, x in z.items()}, y[mine[0]])
    _set_grads(enc, 1.0, 0.5)  # the same all-reduced gradients on every rank
    monitor.observe_gradients()
    written = [monitor.state_dict(all_ranks=True)]  # every rank joins; rank 0's is written
    dist.broadcast_object_list(written, src=0)  # every rank reads rank 0's file
    resumed = ImbalanceMonitor(["a", "b"], encoders={"a": enc.a, "b": enc.b})
    resumed.load_state_dict(written[0])
    for mon in (monitor, resumed):
        mon.update({m: x[mine[1]] for m, x in z.items()}, y[mine[1]])
        _set_grads(enc, 2.0, 1.0)
        mon.observe_gradients()
    return {"uninterrupted": monitor.compute(), "resumed": resumed.compute()}


def test_ddp_checkpoint_written_by_one_rank_resumes_every_ranks_sums() -> None:
    """Lightning and the Hugging Face Trainer write rank 0's checkpoint and every rank loads it.
    The monitor's state for a checkpoint (``state_dict(all_ranks=True)``, taken on every rank)
    holds every rank's sums, and loading it on every rank counts them once: the resumed window
    equals the uninterrupted one (before, rank 0's samples were counted once per rank and the
    other ranks' were lost). Loaded in one process, it is the whole window."""
    g = torch.Generator().manual_seed(0)
    z = {"a": torch.randn(20, 4, generator=g) * 2, "b": torch.randn(20, 4, generator=g)}
    y = torch.randint(0, 4, (20,), generator=g)
    y[3] = -100  # an ignored target on rank 0, before the checkpoint
    r0, r1 = run_distributed(_checkpoint_body, z, y, 6)
    assert r0 == r1
    assert r0["resumed"].keys() == r0["uninterrupted"].keys()
    for key, value in r0["uninterrupted"].items():
        assert r0["resumed"][key] == pytest.approx(value, rel=1e-6), key
    assert r0["resumed"]["imbalance/samples"] == 19.0
    assert r0["resumed"]["imbalance/grad_steps"] == 2.0
    single = ImbalanceMonitor(["a", "b"])
    single.update(z, y)
    assert single.state_dict(all_ranks=True)["pool"]["rows"] == 20  # no group: the local state
