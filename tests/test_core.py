"""The shared core every method builds on: pooling with empty steps and failing ranks, the
hyper-parameter and feature checks, and ``ignore_index`` in the target statistics."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from imbalance_losses.core.running import OTHER_RANK_FAILED, RunningSums
from imbalance_losses.core.stats import counted, true_class_probability
from imbalance_losses.core.validation import (
    check_features,
    check_logits,
    check_target,
    int_param,
    real_param,
)
from tests.ddp import run_distributed

# -- pooling in one process -------------------------------------------------------------------


def test_pool_sums_resets_and_says_when_the_step_was_empty() -> None:
    pool = RunningSums()
    with pytest.raises(RuntimeError, match="nothing observed"):
        pool.pool(2, torch.device("cpu"), missing="nothing observed")
    pool.add(torch.tensor([1.0, 2.0]), 2)
    pool.add(torch.tensor([3.0, 4.0]), torch.tensor(1.0), rows=3)  # 2 of 3 rows ignored
    out = pool.pool(2, torch.device("cpu"), missing="-", extra=torch.tensor([7.0]))
    assert not out.empty and out.samples == 3
    assert torch.equal(out.sums, torch.tensor([4.0, 6.0]))
    torch.testing.assert_close(out.mean(), torch.tensor([4.0, 6.0]) / 3)
    assert out.extra is not None and out.extra.tolist() == [7.0]
    assert pool.empty  # pool() resets
    pool.add(torch.zeros(2), 0)  # an empty batch: observed, but no rows
    out = pool.pool(2, torch.device("cpu"), missing="-")
    assert out.empty and out.samples == 0 and torch.equal(out.mean(), torch.zeros(2))


def test_rows_survive_a_state_round_trip() -> None:
    pool = RunningSums()
    pool.add(torch.tensor([1.0, 1.0]), torch.tensor(0.0), rows=4)  # every row ignored
    resumed = RunningSums()
    resumed.load_state_dict(pool.state_dict())
    out = resumed.pool(2, torch.device("cpu"), missing="-")
    assert not out.empty and out.samples == 0


def test_a_tensor_count_needs_its_rows() -> None:
    with pytest.raises(TypeError, match="rows="):
        RunningSums().add(torch.zeros(2), torch.tensor(2.0))


def test_failing_together_without_a_group_just_reraises() -> None:
    pool = RunningSums()
    pool.add(torch.ones(2), 1)
    with pytest.raises(ValueError, match="bad"), pool.failing_together(2, torch.device("cpu")):
        raise ValueError("bad")
    assert not pool.empty  # one process: what was added before the bad batch stays
    assert pool.pool(2, torch.device("cpu"), missing="-").samples == 1


# -- pooling over two ranks -------------------------------------------------------------------


def _pool_body(rank: int, size: int) -> dict[str, object]:
    cpu = torch.device("cpu")
    pool = RunningSums()
    out: dict[str, object] = {}
    # step 1: only rank 0 has samples; rank 1 added an empty batch
    if rank == 0:
        pool.add(torch.tensor([1.0, 3.0]), 2)
    else:
        pool.add(torch.zeros(2), 0)
    fingerprint = torch.tensor([5.0])
    first = pool.pool(2, cpu, missing="m", extra=fingerprint)
    out["first"] = (first.sums, first.samples, first.empty, first.extra)
    # step 2: every rank empty (one never added anything at all)
    if rank == 0:
        pool.add(torch.zeros(2), 0)
    second = pool.pool(2, cpu, missing="m")
    out["second"] = second.empty
    # step 3: nothing added anywhere -> every rank raises "missing"
    try:
        pool.pool(2, cpu, missing="nothing here")
    except RuntimeError as err:
        out["third"] = str(err)
    # step 4: rank 1's input fails validation; both ranks raise in the same call
    pool.add(torch.ones(2), 1)
    try:
        with pool.failing_together(2, cpu):
            if rank == 1:
                raise ValueError("features['a'] has shape (3, 2)")
        pool.pool(2, cpu, missing="m")
    except (RuntimeError, ValueError) as err:
        out["fourth"] = f"{type(err).__name__}: {err}"
    # step 5: the ranks are still paired: an ordinary step works and sums both ranks
    pool.add(torch.full((2,), float(rank + 1)), 1)
    fifth = pool.pool(2, cpu, missing="m")
    out["fifth"] = (fifth.sums, fifth.samples)
    return out


def test_pool_over_two_ranks_empty_steps_and_a_failing_rank() -> None:
    r0, r1 = run_distributed(_pool_body)
    for r in (r0, r1):
        sums, samples, empty, extra = r["first"]  # type: ignore[misc]
        assert torch.equal(sums, torch.tensor([1.0, 3.0])) and samples == 2 and not empty
        assert extra.tolist() == [10.0]  # summed over the two ranks
        assert r["second"] is True
        assert "nothing here (on every rank)" in str(r["third"])
        assert r["fifth"][1] == 2  # type: ignore[index]
        assert torch.equal(r["fifth"][0], torch.tensor([3.0, 3.0]))  # type: ignore[index]
    assert r1["fourth"] == "ValueError: features['a'] has shape (3, 2)"
    assert r0["fourth"] == f"RuntimeError: {OTHER_RANK_FAILED}"


# -- hyper-parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_real_params_must_be_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="temperature must be finite"):
        real_param("temperature", bad, ge=0)


def test_real_param_bounds_and_types() -> None:
    assert real_param("lam", 1, ge=0, le=1) == 1.0
    with pytest.raises(ValueError, match=r"lam must be <= 1, got 1.5"):
        real_param("lam", 1.5, ge=0, le=1)
    with pytest.raises(ValueError, match=r"tau must be > 0"):
        real_param("tau", 0.0, gt=0)
    with pytest.raises(ValueError, match=r"q must be < 1"):
        real_param("q", 1.0, lt=1)
    for bad in (True, "0.5", None, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="must be a real number"):
            real_param("alpha", bad)


def test_int_param_never_truncates() -> None:
    assert int_param("max_heads", 3, ge=1) == 3
    for bad in (2.5, 2.0, True):
        with pytest.raises(TypeError, match="max_heads must be an integer"):
            int_param("max_heads", bad, ge=1)
    with pytest.raises(ValueError, match=r"max_heads must be an integer >= 1, got 0"):
        int_param("max_heads", 0, ge=1)


# -- features, logits, targets ----------------------------------------------------------------


def test_check_features_names_the_modality_dtype_and_device() -> None:
    good = {"a": torch.zeros(2, 3), "v": torch.zeros(2, 4)}
    check_features(good, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(TypeError, match=r"features\['v'\] of shape \(2, 4\) are torch.int64"):
        check_features({"a": torch.zeros(2, 3), "v": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"features\['a'\].*torch.float64 but.*torch.float32"):
        check_features({**good, "a": good["a"].double()}, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside the matmul
        check_features({**good, "a": good["a"].bfloat16()}, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"features\['a'\].*on cpu but.*on meta"):
        check_features(good, device=torch.device("meta"))


def test_integer_logits_are_refused() -> None:
    with pytest.raises(TypeError, match=r"logits of shape \(2, 3\) are torch.int64"):
        check_logits(torch.zeros(2, 3, dtype=torch.long), name="logits")


def test_ignore_index_targets_are_accepted_and_not_counted() -> None:
    target = torch.tensor([0, -100, 2, 1])
    check_target(target, batch=4, num_classes=3, ignore_index=-100)
    with pytest.raises(ValueError, match=r"outside \[0, 3\) \(or ignore_index=-100\)"):
        check_target(torch.tensor([0, -1]), batch=2, num_classes=3, ignore_index=-100)
    with pytest.raises(ValueError, match=r"outside \[0, 3\) for"):
        check_target(target, batch=4, num_classes=3)
    mask = counted(target, -100)
    assert mask is not None and mask.tolist() == [True, False, True, True]
    assert counted(target, None) is None
    assert counted(torch.full((4, 3), 1 / 3), -100) is None  # soft targets: all count


@given(st.lists(st.integers(-1, 2), min_size=1, max_size=8), st.integers(0, 2**16))
def test_true_class_probability_skips_ignored_samples(labels: list[int], seed: int) -> None:
    logits = torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(seed)) * 3
    target = torch.tensor(labels)
    p = true_class_probability(logits, target, ignore_index=-1)
    probs = torch.softmax(logits, -1)
    for b, y in enumerate(labels):
        expected = 0.0 if y == -1 else float(probs[b, y])
        assert float(p[b]) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def _dies_body(rank: int, size: int, out: str) -> None:
    pool = RunningSums()
    pool.add(torch.ones(2), 1)
    if rank == 1:
        raise ValueError("bad shard on rank 1")  # dies without joining the collective
    try:
        pool.pool(2, torch.device("cpu"), missing="m")
    except RuntimeError as err:
        with open(out, "w") as f:
            f.write(str(err))


def test_a_rank_that_dies_gives_the_others_a_clear_error(tmp_path: object) -> None:
    out = str(tmp_path) + "/rank0.txt"  # type: ignore[operator]
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed"):
        run_distributed(_dies_body, out, timeout=40)
    with open(out) as f:
        message = f.read()
    assert "another rank most likely raised an error or exited" in message


# -- rank consistency with three ranks, and a failing prototype batch -------------------------


def _three_ranks_body(rank: int, size: int) -> dict[str, object]:
    from imbalance_losses import SustainedBoostingLoss
    from imbalance_losses.core.distributed import same_on_all_ranks

    out: dict[str, object] = {
        "same": same_on_all_ranks(torch.tensor([1.5, -2.0, 1e300])),
        # [2, 1, 3]: the sum equals 3 x 2, as a sum test would accept on rank 0
        "differ": same_on_all_ranks(torch.tensor([float(rank in (0, 2)) + rank])),
    }
    boost = SustainedBoostingLoss(3, {"a": 2, "v": 2}, hidden=4, check_every="manual")
    for _ in range(rank):  # head counts 1, 2, 3 on the three ranks
        if boost.num_heads["a"] < 3:
            boost.add_head("a")
    if rank == 0:
        boost.add_head("a")  # counts 2, 2, 3 -> still unequal; 1 + 2 + 3 = 3 x 2 before this
    g = torch.Generator().manual_seed(rank)
    boost(
        {"a": torch.randn(4, 2, generator=g), "v": torch.randn(4, 2, generator=g)},
        torch.tensor([0, 1, 2, 0]),
    )
    try:
        boost.check()
        out["check"] = "passed"
    except RuntimeError as err:
        out["check"] = str(err)
    return out


def test_rank_consistency_is_exact_on_three_ranks() -> None:
    results = run_distributed(_three_ranks_body, world_size=3)
    for r in results:
        assert r["same"] is True and r["differ"] is False
        assert "differs across ranks" in str(r["check"])  # every rank raises, none goes on


def _prototype_failure_body(rank: int, size: int) -> dict[str, object]:
    from imbalance_losses import PMRLoss

    pmr = PMRLoss(3, {"a": 2, "v": 2})
    good = {"a": torch.randn(6, 2), "v": torch.randn(6, 2)}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    bad = {"a": good["a"].clone(), "v": good["v"]}
    bad["a"][0, 0] = float("nan")
    out: dict[str, object] = {}
    try:
        pmr.update_prototypes([(good, y), (bad if rank == 1 else good, y)])
    except (RuntimeError, ValueError) as err:
        out["first"] = f"{type(err).__name__}: {err}"
    present = pmr.update_prototypes([(good, y)])  # the ranks are still paired
    out["second"] = (bool(present.all()), pmr.updates)
    return out


def test_a_bad_prototype_batch_on_one_rank_fails_every_rank_in_the_same_call() -> None:
    r0, r1 = run_distributed(_prototype_failure_body)
    assert str(r1["first"]).startswith("ValueError: features['a'] contains non-finite")
    assert str(r0["first"]).startswith(f"RuntimeError: {OTHER_RANK_FAILED}")
    assert r0["second"] == r1["second"] == (True, 1)


def test_reduce_loss_mean_is_the_sum_over_the_counted_samples_given_or_derived() -> None:
    from imbalance_losses.core.stats import reduce_loss

    per = torch.tensor([1.0, 2.0, 0.0, 5.0])  # the third sample ignored (its loss already 0)
    mask = torch.tensor([True, True, False, True])
    assert float(reduce_loss(per, "mean")) == 8.0 / 4
    assert float(reduce_loss(per, "mean", mask)) == pytest.approx(8 / 3, rel=1e-6)
    assert float(
        reduce_loss(per, "mean", mask, count=torch.tensor(3.0, dtype=torch.float64))
    ) == pytest.approx(8 / 3, rel=1e-6)
    assert float(reduce_loss(per, "mean", count=4)) == 2.0
    assert float(reduce_loss(per[:0], "mean", count=0)) == 0.0  # no sample: 0, never 0 / 0
    empty = torch.zeros(0, dtype=torch.bool)
    assert (
        float(reduce_loss(per[:0], "mean", empty, count=torch.zeros((), dtype=torch.float64)))
        == 0.0
    )
    assert float(reduce_loss(per, "sum", mask, count=3)) == 8.0
    assert torch.equal(reduce_loss(per, "none"), per)
