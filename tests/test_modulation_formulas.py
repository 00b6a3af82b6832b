"""OGM's pure formulas and the shared scorer, each against a hand-written reference."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import imbalance_losses
from imbalance_losses import ge_noise_stds, ogm_coefficients
from imbalance_losses.core.scoring import ModalityScorer, capped_ratio


def _k(rho: float, alpha: float, rule: str) -> float:
    if rule == "paper":
        return 1.0 - math.tanh(alpha * max(rho - 1.0, 0.0))
    return 1.0 - math.tanh(alpha * rho) if rho > 1.0 else 1.0


def test_formulas_are_exported_from_the_package_root() -> None:
    assert {"ogm_coefficients", "ge_noise_stds"} <= set(imbalance_losses.__all__)


@given(
    rho=st.lists(st.floats(0.0, 20.0), min_size=2, max_size=6),
    alpha=st.floats(0.0, 4.0),
    rule=st.sampled_from(["paper", "code"]),
)
def test_coefficients_match_one_minus_tanh(rho: list[float], alpha: float, rule: str) -> None:
    k = ogm_coefficients(torch.tensor(rho, dtype=torch.float64), alpha, rule)
    assert k.dtype == torch.float64
    for got, r in zip(k.tolist(), rho, strict=True):
        assert math.isclose(got, _k(r, alpha, rule), rel_tol=1e-12, abs_tol=1e-15)


def test_coefficients_default_rule_is_the_paper_and_hand_values() -> None:
    rho = torch.tensor([1.96, 0.51, 1.0])
    want = [1 - math.tanh(0.96), 1.0, 1.0]
    torch.testing.assert_close(ogm_coefficients(rho, 1.0), torch.tensor(want))
    code = [1 - math.tanh(1.96), 1.0, 1.0]  # rho = 1 exactly: not damped in the code rule
    torch.testing.assert_close(ogm_coefficients(rho, 1.0, "code"), torch.tensor(code))


def test_coefficients_keep_precision_where_tanh_rounds_to_one() -> None:
    """fp32: ``1 - tanh(20)`` rounds to 0; ``2 sigmoid(-40)`` keeps ``~8.5e-18``."""
    k = ogm_coefficients(torch.tensor([21.0, 1.0]), 1.0)
    assert math.isclose(float(k[0]), 2.0 / (1.0 + math.exp(40.0)), rel_tol=1e-5)


def test_coefficients_refuse_an_unknown_rule() -> None:
    with pytest.raises(ValueError, match="rule"):
        ogm_coefficients(torch.ones(2), 1.0, "tpami")


def test_coefficients_alpha_zero_with_an_infinite_ratio_is_one() -> None:
    rho = torch.tensor([math.inf, 0.0])
    for rule in ("paper", "code"):
        assert torch.equal(ogm_coefficients(rho, 0.0, rule), torch.ones(2))
        assert torch.equal(ogm_coefficients(rho, 0.5, rule), torch.tensor([0.0, 1.0]))


def _stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    shift=st.floats(-5.0, 5.0),
)
def test_noise_stds_are_the_unbiased_standard_deviations(
    sizes: list[int], seed: int, shift: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64) + shift for n in sizes]
    got = ge_noise_stds(grads)
    assert got.dtype == torch.float32 and got.shape == (len(sizes),)
    for value, g in zip(got.tolist(), grads, strict=True):
        assert math.isclose(value, _stdev(g.tolist()), rel_tol=1e-6, abs_tol=1e-12)


def test_noise_stds_hand_values_shapes_and_dtypes() -> None:
    grads = [
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),  # stdev(1, 2, 3, 4) = sqrt(5 / 3)
        torch.tensor([5.0]),  # one value: no spread
        torch.zeros(3, 2),  # exactly 0
        torch.tensor([1.0, 3.0], dtype=torch.bfloat16),  # accumulated in fp32
        torch.arange(6.0).view(2, 3).t(),  # non-contiguous: stdev(0..5) = sqrt(3.5)
    ]
    got = ge_noise_stds(grads)
    want = torch.tensor([math.sqrt(5 / 3), 0.0, 0.0, math.sqrt(2.0), math.sqrt(3.5)])
    torch.testing.assert_close(got, want)
    assert got[2] == 0 and got[1] == 0


def test_noise_stds_of_a_non_finite_gradient_are_not_finite() -> None:
    got = ge_noise_stds([torch.tensor([1.0, math.inf]), torch.tensor([1.0, math.nan])])
    assert not torch.isfinite(got).any()


def test_noise_stds_with_given_inverse_counts() -> None:
    """``(1 / n, 1 / (n - 1))`` passed in (a caller's cache) give the same stds."""
    grads = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, -0.5])]
    counts = (
        torch.tensor([1 / 3, 1 / 2], dtype=torch.float64),
        torch.tensor([1 / 2, 1.0], dtype=torch.float64),
    )
    want = torch.tensor([_stdev([1.0, 2.0, 4.0]), _stdev([0.5, -0.5])])
    torch.testing.assert_close(ge_noise_stds(grads, counts), want)


@pytest.mark.parametrize("ignore_index", [None, -100])
def test_scorer_sums_true_class_probabilities_and_caps_the_ratio(ignore_index: int | None) -> None:
    scorer = ModalityScorer(
        ("a", "b", "c"),
        max_ratio=5.0,
        ignore_index=ignore_index,
        process_group=None,
        owner="the test's",
    )
    z = {
        "a": torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
        "b": torch.tensor([[0.0, 0.0], [0.0, 0.0]]),
        "c": torch.tensor([[-30.0, 30.0], [30.0, -30.0]]),  # ~0 on the true classes
    }
    y = torch.tensor([0, 1])
    scorer.observe(z, y)
    scorer.observe(z, y)  # a second micro-batch: the sums add
    found = scorer.decide(torch.device("cpu"), missing="nothing observed")
    assert found is not None
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731  softmax of two logits
    s = [2 * (sig(2.0) + sig(1.0)), 2 * (0.5 + 0.5), 2 * 2 * sig(-60.0)]
    torch.testing.assert_close(found.scores, torch.tensor(s))
    assert int(found.num_samples) == 4
    rest = [(sum(s) - v) / 2 for v in s]
    want = [min(v / r, 5.0) for v, r in zip(s, rest, strict=True)]
    torch.testing.assert_close(found.ratios, torch.tensor(want))
    torch.testing.assert_close(capped_ratio(found.scores, 5.0), found.ratios, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="nothing observed"):
        scorer.decide(torch.device("cpu"), missing="nothing observed")


def test_scorer_leaves_ignored_targets_out_and_keeps_its_pending_state() -> None:
    scorer = ModalityScorer(
        ("a", "b"), max_ratio=100.0, ignore_index=-100, process_group=None, owner="the test's"
    )
    z = {"a": torch.tensor([[1.0, 0.0], [5.0, 0.0]]), "b": torch.zeros(2, 2)}
    scorer.observe(z, torch.tensor([0, -100]))
    other = ModalityScorer(
        ("a", "b"), max_ratio=100.0, ignore_index=-100, process_group=None, owner="the test's"
    )
    other.load_state_dict(scorer.state_dict())
    found = other.decide(torch.device("cpu"), missing="nothing observed")
    assert found is not None and int(found.num_samples) == 1
    p = 1.0 / (1.0 + math.exp(-1.0))
    torch.testing.assert_close(found.scores, torch.tensor([p, 0.5]))
