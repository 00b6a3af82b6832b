"""Shared validation, fp32 statistics and diagnostics records."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from imbalance_losses import StepRecord
from imbalance_losses.core.stats import as_fp32, entropy_sum, true_class_probability
from imbalance_losses.core.validation import (
    check_logits,
    check_modalities,
    check_same_modalities,
    check_target,
    modality_names,
)


def test_check_modalities_returns_batch() -> None:
    assert check_modalities({"a": torch.zeros(3, 2), "b": torch.zeros(3)}) == 3
    with pytest.raises(TypeError, match=r"features\['b'\] must be a Tensor"):
        check_modalities({"a": torch.zeros(3, 2), "b": [1, 2, 3]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"at least 1 dimension.*shape \(\)"):
        check_modalities({"a": torch.zeros(3, 2), "b": torch.tensor(1.0)})


def test_modality_names() -> None:
    assert modality_names(["a", "b", "c"]) == ("a", "b", "c")
    assert modality_names(("a", "b")) == ("a", "b")
    for bad in ("ab", {"a": 1, "b": 2}, {"a", "b"}, 3):
        with pytest.raises(TypeError, match="sequence of modality names"):
            modality_names(bad)
    with pytest.raises(TypeError, match="must be strings"):
        modality_names(["a", 1])
    for bad_names in (["a"], ["a", "b", "a"], []):
        with pytest.raises(ValueError, match=r"two distinct names, got \["):
            modality_names(bad_names)


def test_check_same_modalities() -> None:
    check_same_modalities(
        ["a", "b"], {"a": 1, "b": 2}, expected_what="features", actual_what="logits"
    )
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        check_same_modalities(["a", "b"], {"a": 1, "c": 2}, expected_what="f", actual_what="l")
    with pytest.raises(ValueError, match="different order"):
        check_same_modalities(["a", "b"], {"b": 1, "a": 2}, expected_what="f", actual_what="l")


def test_check_logits() -> None:
    check_logits(torch.zeros(2, 3), name="logits", batch=2)
    with pytest.raises(ValueError, match=r"shape \[B, C\], got shape \(2,\)"):
        check_logits(torch.zeros(2), name="logits")
    with pytest.raises(ValueError, match=r"batch 3 \(shape \(3, 2\)\) but the batch size is 2"):
        check_logits(torch.zeros(3, 2), name="logits['audio']", batch=2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(2, 3)
        x[1, 2] = bad
        with pytest.raises(ValueError, match=r"logits\['visual'\] contains non-finite"):
            check_logits(x, name="logits['visual']")


@given(st.integers(1, 6), st.integers(1, 6), st.integers(-3, 9))
def test_check_target_range(batch: int, classes: int, value: int) -> None:
    target = torch.zeros(batch, dtype=torch.long)
    target[-1] = value
    if 0 <= value < classes:
        check_target(target, batch=batch, num_classes=classes)
    else:
        with pytest.raises(ValueError, match=rf"outside \[0, {classes}\)"):
            check_target(target, batch=batch, num_classes=classes)


def test_check_target_shapes_and_soft_targets() -> None:
    with pytest.raises(ValueError, match=r"shape \(3,\) but the logits' batch size is 2"):
        check_target(torch.zeros(3, dtype=torch.long), batch=2, num_classes=4)
    with pytest.raises(ValueError, match="class indices of shape"):
        check_target(torch.zeros(2, 1, dtype=torch.long), batch=2, num_classes=4)
    check_target(torch.full((2, 4), 0.25), batch=2, num_classes=4)
    with pytest.raises(ValueError, match="sum to 1"):
        check_target(torch.full((2, 4), 0.5), batch=2, num_classes=4)
    with pytest.raises(ValueError, match=r"soft target must have shape"):
        check_target(torch.full((2, 3), 1 / 3), batch=2, num_classes=4)


@given(
    st.integers(1, 8),
    st.integers(2, 6),
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_statistics_are_fp32_and_match_formulas(
    batch: int, classes: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(batch * 31 + classes)
    logits = (torch.randn(batch, classes, generator=g) * 30).to(dtype)
    target = torch.randint(classes, (batch,), generator=g)
    p = true_class_probability(logits, target)
    assert p.dtype == torch.float32 and torch.isfinite(p).all()
    probs = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(p.double(), probs[torch.arange(batch), target], atol=1e-6, rtol=0)
    soft = torch.nn.functional.one_hot(target, classes).float()
    torch.testing.assert_close(true_class_probability(logits, soft), p)
    h = entropy_sum(logits)
    assert h.dtype == torch.float32 and torch.isfinite(h)
    expected = -(probs * probs.clamp_min(1e-300).log()).sum()
    torch.testing.assert_close(h.double(), expected, atol=1e-4, rtol=1e-4)
    assert as_fp32(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


@dataclass(frozen=True)
class _Record(StepRecord):
    coefficient: torch.Tensor
    step: torch.Tensor
    added: bool


def test_step_record_to_dict() -> None:
    rec = _Record(("audio", "visual"), torch.tensor([0.25, 0.75]), torch.tensor(3), True)
    assert rec.to_dict() == {
        "coefficient/audio": 0.25,
        "coefficient/visual": 0.75,
        "step": 3.0,
        "added": 1.0,
    }


@given(st.lists(st.just(0.0) | st.floats(1e-3, 50.0), min_size=2, max_size=6))
def test_one_vs_rest_ratio_formula(values: list[float]) -> None:
    from imbalance_losses.core.stats import one_vs_rest_ratio

    s = torch.tensor(values, dtype=torch.float64)
    rho = one_vs_rest_ratio(s)
    assert not torch.isnan(rho).any()
    for m, value in enumerate(values):
        others = [v for k, v in enumerate(values) if k != m]
        mean_rest = sum(others) / len(others)
        if value == 0 and mean_rest == 0:
            assert rho[m] == 1
        elif mean_rest == 0:
            assert rho[m] == float("inf")
        else:
            assert rho[m].item() == pytest.approx(value / mean_rest, rel=1e-9)
    if len(values) == 2 and values[0] > 0 and values[1] > 0:  # bit-exact for two modalities
        assert rho[0] == s[0] / s[1]
        assert rho[1] == s[1] / s[0]


def test_running_sums_pool_and_resume() -> None:
    from imbalance_losses.core.running import RunningSums

    acc = RunningSums()
    assert acc.empty
    with pytest.raises(RuntimeError, match="no statistics"):
        acc.mean()
    acc.add(torch.tensor([1.0, 2.0]), 2)
    acc.add(torch.tensor([3.0, 1.0]), torch.tensor(3), rows=3)
    torch.testing.assert_close(acc.mean(), torch.tensor([4.0, 3.0]) / 5)
    resumed = RunningSums()
    resumed.load_state_dict(acc.state_dict())
    torch.testing.assert_close(resumed.pooled()[1], torch.tensor(5.0, dtype=torch.float64))
    # the saved state is a copy: adding to the source changes neither it nor the resumed pool
    saved = acc.state_dict()
    acc.add(torch.tensor([1.0, 1.0]), 1)
    assert saved["count"] == 5 and torch.equal(saved["sums"], torch.tensor([4.0, 3.0]))
    assert resumed.pooled()[1] == 5
    twin = RunningSums()
    twin.load_state_dict(saved)
    twin.add(torch.tensor([1.0, 1.0]), 2)
    assert saved["count"] == 5 and resumed.pooled()[1] == 5
    # the count stays exact past 2**24 samples (fp32 would round 2**24 + 1 down)
    big = RunningSums()
    big.add(torch.zeros(2), 2**24)
    big.add(torch.zeros(2), 1)
    assert big.pooled()[1] == 2**24 + 1
    with pytest.raises(ValueError, match="number of modalities changed"):
        acc.add(torch.tensor([1.0, 2.0, 3.0]), 1)
    acc.reset()
    assert acc.empty


def test_float_class_indices_are_told_to_be_integers() -> None:
    with pytest.raises(ValueError, match=r"target of shape \(4,\) is torch.float32.*\.long\(\)"):
        check_target(torch.zeros(4), batch=4, num_classes=3)


def test_sample_counts_avoid_fp64_where_the_device_has_none() -> None:
    from imbalance_losses.core.dtypes import wide_dtype

    assert wide_dtype(torch.device("cpu")) == torch.float64
    assert wide_dtype(torch.device("mps")) == torch.float32
