"""compare_remedies with the six methods that own more of the loop (plugins_more): MLA,
ReconBoost, sample-level valuation, re-learning, UMT and MMCosine each give a row from the same
initial weights as plain training, or a skip with the reason, on the tiny task of
test_compare."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from imbalance_losses import ComparisonResult
from imbalance_losses.compare import Context, Hooks, RemedyPlugin, SelectedRun
from tests.test_compare import Model, batches, run

pytestmark = pytest.mark.usefixtures("one_thread")

SIX = ["mla", "reconboost", "valuation", "relearning", "umt", "mmcosine"]


class Late(Model):
    """Late fusion: one linear head per modality, the fused logits their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 3)})

    def head(self) -> Any:
        return self.heads


def loader(n: int = 96, seed: int = 0) -> DataLoader[Any]:
    """The same samples as ``batches(n, seed)``, as a DataLoader over a map-style dataset."""
    parts = batches(n, seed)
    a, b, y = (torch.cat([p[i] for p in parts]) for i in range(3))
    return DataLoader(TensorDataset(a, b, y), batch_size=32)


def same_start(result: ComparisonResult) -> None:
    """Every run of a seed started from the weights plain training started from."""
    seeds = {r.seed for row in result.rows for r in row.runs}
    for seed in seeds:
        assert len({r.init for row in result.rows for r in row.runs if r.seed == seed}) == 1
    assert result.notes == []


def predicts_as_validated(kept: list[SelectedRun], val: list[Any]) -> None:
    """A kept run's logits (the method's own prediction) give the validation accuracy kept."""
    for run_ in kept:
        feats, y = run_.features(val[0])
        with torch.no_grad():
            acc = float((run_.logits(feats).argmax(-1) == y).double().mean())
        assert math.isclose(acc, run_.record.val), run_.method


def test_a_concatenation_head_runs_four_and_says_why_mla_and_reconboost_cannot() -> None:
    val = batches(64, 1, size=64)
    kept: list[SelectedRun] = []
    result = run(train=loader(), val=val, methods=SIX, seeds=(0, 1), epochs=3, trace=True,
                 test=batches(64, 2, size=64), on_run=kept.append)  # fmt: skip
    assert [r.name for r in result.rows] == ["plain", *SIX]
    assert set(result.skipped) == {"mla", "reconboost"}
    assert "reads the concatenation" in result.skipped["mla"]
    assert "scores each modality alone" in result.skipped["reconboost"]
    for name in ("plain", "valuation", "relearning", "umt", "mmcosine"):
        row = result.row(name)
        assert row.status == "ok" and len(row.runs) == 2, (name, row.reason)
        assert all(r.test is not None for r in row.runs)
        assert row.diagnosis is not None and set(row.diagnosis["probe"]) == {"a", "b"}
    same_start(result)
    predicts_as_validated(kept, val)
    # valuation: epochs 0, 1 plain, valued after epoch 1 (warm-up capped to 2), epoch 2 re-sampled
    trace = result.row("valuation").runs[0].trace
    assert [t["plan_size"] for t in trace[:6]] == [96.0] * 6
    assert trace[-1]["plan_size"] > 96 and "mean_phi/a" in trace[-1]
    # re-learning: re-initialised once, after epoch 1 (every epoch at most: 3 epochs)
    relearn = result.row("relearning").runs[0].trace
    assert relearn[0]["reinits"] == 0 and relearn[-1]["reinits"] == 1
    assert "alphas/b" in relearn[-1]
    umt = result.row("umt")
    assert "trained alone for this row (2 extra runs" in umt.note
    assert all(t["active"] == 1 for t in umt.runs[0].trace)
    assert "cosine" in result.to_markdown().lower() or "MMCosine" in result.to_markdown()


def test_late_fusion_runs_mla_reconboost_umt_mmcosine_with_teachers_reused() -> None:
    built = {"n": 0}

    def build() -> Late:
        built["n"] += 1
        return Late()

    val = batches(64, 1, size=64)
    kept: list[SelectedRun] = []
    result = run(build=build, val=val, methods=[*SIX], alone=True, grid=True, epochs=2,
                 trace=True, on_run=kept.append)  # fmt: skip
    assert set(result.skipped) == {"valuation"}
    assert "must be a torch DataLoader" in result.skipped["valuation"]
    for name in ("mla", "reconboost", "relearning", "umt", "mmcosine"):
        assert result.row(name).status == "ok", (name, result.row(name).reason)
    grids = {n: len(result.row(n).grid) for n in ("mla", "reconboost", "relearning", "umt")}
    assert grids == {"mla": 2, "reconboost": 3, "relearning": 3, "umt": 3}
    # the reference model, plain, 2 alone runs, then every grid point: no teacher retrained
    assert built["n"] == 1 + 1 + 2 + 2 + 3 + 3 + 3 + 3
    assert "reused" in result.row("umt").note and set(result.alone) == {"a", "b"}
    same_start(result)
    predicts_as_validated(kept, val)
    mla = result.row("mla").runs[0].trace
    assert len(mla) == 3 * 2 and all("alpha" in t for t in mla)  # M steps a batch, the last kept
    rb = result.row("reconboost").runs[0].trace  # 2 epochs: boost a, then rectify
    assert [t["boosting"] for t in rb] == [1.0] * 3 + [0.0] * 3
    assert all("feature_norms/a" in t for t in result.row("mmcosine").runs[0].trace)


def test_token_features_skip_each_method_that_needs_more_with_the_reason() -> None:
    result = run(tokens=3, methods=SIX)
    skipped = result.skipped
    assert set(skipped) == {"reconboost", "valuation", "relearning", "mmcosine"}
    assert "nn.Module fn" in skipped["reconboost"]
    assert "vector features" in skipped["relearning"]
    assert "DataLoader" in skipped["valuation"]
    assert "TypeError" in skipped["mmcosine"]
    assert result.row("mla").status == "ok" and 'projection="off"' in result.row("mla").note
    assert result.row("umt").status == "ok"
    same_start(result)


def test_a_resumed_umt_row_trains_no_teacher(tmp_path: Path) -> None:
    built = {"n": 0}

    def build() -> Model:
        built["n"] += 1
        return Model()

    path = tmp_path / "umt.json"
    first = run(build=build, methods=["umt"], resume=path, baseline=False)
    assert built["n"] == 1 + 2 + 1  # the reference, the 2 teachers, the row
    built["n"] = 0
    second = run(build=build, methods=["umt"], resume=path, baseline=False)
    assert built["n"] == 1 and second.row("umt").runs == first.row("umt").runs


def test_the_general_hooks_own_the_step_the_batches_and_the_epoch_end() -> None:
    calls: dict[str, list[int]] = {"batches": [], "end": [], "steps": []}

    class Own(Hooks):
        def train_batches(self, epoch: int) -> Any:
            calls["batches"].append(epoch)
            yield from list(super().train_batches(epoch))[:1]  # one batch an epoch

        def train_step(self, features: Any, target: Tensor, optimizer: Any) -> Tensor:
            calls["steps"].append(len(target))
            return super().train_step(features, target, optimizer)

        def epoch_end(self, epoch: int) -> None:
            calls["end"].append(epoch)

    class Mine(RemedyPlugin):
        def setup(self, ctx: Context, config: Any) -> Hooks:
            return Own(ctx)

    result = run(methods=[Mine("own", "own hooks")], epochs=3, baseline=False)
    assert result.row("own").status == "ok"
    assert calls == {"batches": [0, 1, 2], "end": [0, 1], "steps": [32, 32, 32]}
