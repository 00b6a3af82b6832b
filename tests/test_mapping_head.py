"""MappingHead: a fusion head over the modality mapping (attention over token sequences).

Unimodal logits are the head on one modality alone (others omitted, or zeros with
``absent="zeros"``); AGM's subset values are the head on each subset, the empty subset zero
logits. Checked against the head called by hand on each subset.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import AdaptiveGradientModulator, MappingHead, unimodal_logits
from imbalance_losses.core.masking import masked_outputs, shapley_values


class AttentionFusion(nn.Module):
    """Tokens of every present modality (+ a modality embedding), self-attention, mean, linear."""

    def __init__(self, names: tuple[str, ...], dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.names = names
        self.embed = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.1) for m in names})
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True, dropout=0.5)
        self.out = nn.Linear(dim, classes)
        self.calls = 0

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        self.calls += 1
        tokens = torch.cat([x + self.embed[m] for m, x in feats.items()], dim=1)
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.out(mixed.mean(1))


def _tokens(batch: int = 4, lengths: tuple[int, ...] = (10, 3, 6)) -> dict[str, Tensor]:
    names = ("audio", "visual", "text")[: len(lengths)]
    return {m: torch.randn(batch, t, 8) for m, t in zip(names, lengths, strict=True)}


def test_unimodal_logits_run_the_head_on_each_modality_alone() -> None:
    torch.manual_seed(0)
    feats = _tokens()
    fusion = AttentionFusion(tuple(feats)).eval()
    z = unimodal_logits(MappingHead(fusion), feats)
    assert list(z) == list(feats)
    for m, x in feats.items():
        torch.testing.assert_close(z[m], fusion({m: x}))
    zeros = unimodal_logits(MappingHead(fusion, absent="zeros"), feats)
    for m in feats:
        by_hand = fusion({k: v if k == m else torch.zeros_like(v) for k, v in feats.items()})
        torch.testing.assert_close(zeros[m], by_hand)


def test_gradients_flow_to_features_and_head() -> None:
    torch.manual_seed(0)
    feats = {m: x.requires_grad_() for m, x in _tokens(lengths=(5, 2)).items()}
    fusion = AttentionFusion(tuple(feats))
    z = unimodal_logits(MappingHead(fusion), feats)
    z["audio"].sum().backward()
    assert feats["audio"].grad is not None and feats["visual"].grad is None
    assert fusion.out.weight.grad is not None


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 3), st.sampled_from(["omit", "zeros"]), st.integers(0, 2**16))
def test_masked_outputs_are_the_head_on_every_subset(m: int, absent: str, seed: int) -> None:
    torch.manual_seed(seed)
    feats = _tokens(batch=3, lengths=(4, 2, 5)[:m])
    fusion = AttentionFusion(tuple(feats)).train()  # dropout: masked_outputs runs it in eval
    head = MappingHead(fusion, absent=absent)  # type: ignore[arg-type]
    fusion.calls = 0
    values = masked_outputs(head, feats)
    assert fusion.training  # restored
    assert fusion.calls == (1 if absent == "zeros" else 2**m - 1)
    fusion.eval()
    names = list(feats)
    for s in range(2**m):
        keep = [n for j, n in enumerate(names) if s >> j & 1]
        if absent == "omit":
            expected = fusion({n: feats[n] for n in keep}) if keep else torch.zeros(3, 3)
        else:
            expected = fusion(
                {n: x if n in keep else torch.zeros_like(x) for n, x in feats.items()}
            )
        torch.testing.assert_close(values[s], expected, atol=1e-5, rtol=1e-5)
    if absent == "omit":  # v(empty) = 0: the Shapley values add up to the fused logits
        torch.testing.assert_close(shapley_values(values).sum(0), values[-1], atol=1e-5, rtol=1e-5)


def test_agm_over_token_sequences() -> None:
    torch.manual_seed(0)
    feats = {m: x.requires_grad_() for m, x in _tokens(batch=6, lengths=(7, 3)).items()}
    fusion = AttentionFusion(tuple(feats))
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    agm = AdaptiveGradientModulator(MappingHead(fusion), alpha=1.0)
    out = agm(feats, target)
    F.cross_entropy(fusion(out), target).backward()
    assert agm.last is not None and agm.last.coefficients.shape == (2,)
    fusion.eval()
    with torch.no_grad():  # s_m from the Shapley responses of the head on each subset
        v = {s: fusion({n: feats[n] for j, n in enumerate(feats) if s >> j & 1}) for s in (1, 2, 3)}
        phi_a = (v[1] + v[3] - v[2]) / 2  # v(empty) = 0
        phi_v = (v[2] + v[3] - v[1]) / 2
        scores = torch.stack([F.cross_entropy(p, target) for p in (phi_a, phi_v)])
    torch.testing.assert_close(agm.last.scores, scores, atol=1e-5, rtol=1e-5)


def test_bad_heads_and_inputs() -> None:
    with pytest.raises(TypeError, match="callable"):
        MappingHead(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="absent"):
        MappingHead(lambda f: f["a"], absent="pad")  # type: ignore[arg-type]
    fusion = AttentionFusion(("audio", "visual"))
    feats = _tokens(lengths=(3, 2))
    with pytest.raises(TypeError, match="audio"):  # float64 features for a float32 head
        unimodal_logits(MappingHead(fusion), {m: x.double() for m, x in feats.items()})
    with pytest.raises(ValueError, match="batch"):
        unimodal_logits(
            MappingHead(fusion), {"audio": feats["audio"], "visual": feats["visual"][:2]}
        )


def test_subsets_cover_every_combination_once() -> None:
    calls: list[tuple[str, ...]] = []

    def fn(f: dict[str, Tensor]) -> Tensor:
        calls.append(tuple(f))
        return sum(x.sum(1, keepdim=True) for x in f.values()).expand(-1, 2)  # type: ignore[union-attr]

    feats = {"a": torch.ones(2, 1), "b": torch.ones(2, 1) * 2, "c": torch.ones(2, 1) * 4}
    values = masked_outputs(MappingHead(fn), feats)
    expected = [c for r in range(1, 4) for c in itertools.combinations("abc", r)]
    assert sorted(calls) == sorted(expected)
    assert values[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_report_probes_pooled_tokens_and_scores_the_head_batch_by_batch() -> None:
    from imbalance_losses import imbalance_report
    from imbalance_losses.diagnosis.report import linear_probe_accuracy, pooled_tokens

    torch.manual_seed(0)
    fusion = AttentionFusion(("audio", "visual")).eval()
    y = torch.arange(24) % 3
    # batches with different token counts, as a loader of variable-length sequences gives
    batches = [
        (
            {
                "audio": torch.randn(8, t, 8) + y[i * 8 : i * 8 + 8, None, None],
                "visual": torch.randn(8, 2, 8),
            },
            y[i * 8 : i * 8 + 8],
        )
        for i, t in enumerate((5, 9, 3))
    ]
    report = imbalance_report(batches[:2], batches[2:], head=MappingHead(fusion))
    fit = {m: torch.cat([pooled_tokens(f[m]) for f, _ in batches[:2]]) for m in ("audio", "visual")}
    ev = {m: pooled_tokens(batches[2][0][m]) for m in ("audio", "visual")}
    for m in ("audio", "visual"):
        expected = linear_probe_accuracy(fit[m], y[:16], ev[m], y[16:], 3)
        assert report.probe[m] == pytest.approx(expected)
        with torch.no_grad():
            hits = (fusion({m: batches[2][0][m]}).argmax(-1) == y[16:]).float().mean()
        assert report.head[m] == pytest.approx(float(hits))
    assert torch.equal(pooled_tokens(batches[0][0]["audio"]), batches[0][0]["audio"].mean(1))


def test_monitor_reads_a_mapping_head_in_eval_mode() -> None:
    from imbalance_losses import ImbalanceMonitor

    torch.manual_seed(0)
    fusion = AttentionFusion(("audio", "visual")).train()
    monitor = ImbalanceMonitor(["audio", "visual"], head=MappingHead(fusion))
    feats = _tokens(batch=6, lengths=(4, 7))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    monitor.update(feats, y)
    assert fusion.training
    fusion.eval()
    with torch.no_grad():
        hits = {m: float((fusion({m: x}).argmax(-1) == y).float().mean()) for m, x in feats.items()}
    stats = monitor.compute()
    for m in feats:
        assert stats[f"imbalance/{m}/acc"] == pytest.approx(hits[m])


def test_methods_that_need_vectors_say_to_pool_token_features() -> None:
    from imbalance_losses import PMRLoss, SustainedBoostingLoss

    feats = {"a": torch.randn(4, 5, 3), "b": torch.randn(4, 2, 4)}
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(
        ValueError, match=r"features\['a'\] has shape \(4, 5, 3\), a sequence of tokens.*pooled"
    ):
        PMRLoss(3, {"a": 3, "b": 4})(torch.randn(4, 3), y, feats)
    boost = SustainedBoostingLoss(num_classes=3, in_features={"a": 3, "b": 4}, check_every=10)
    with pytest.raises(ValueError, match=r"boosting heads take one vector per sample, \[B, 3\]"):
        boost(feats, y)


def test_attention_page_runs_as_written(tmp_path: Any) -> None:
    from tests.pages import run_page

    ns = run_page("attention.md", tmp_path)
    assert bool(torch.isfinite(ns["loss"])) and ns["out"].presence.shape == (8, 2)
    assert set(ns["z"]) == {"audio", "visual"}
