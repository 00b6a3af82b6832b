"""compare_remedies: every method that applies, same start per seed, epoch on validation, test
read once, best flagged within the spread, budget, JSON and resume, DDP, bad arguments."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from imbalance_losses import ComparisonResult, MappingHead, compare_remedies
from imbalance_losses.compare import REMEDIES, Hooks, RemedyPlugin, register
from imbalance_losses.compare.result import Row, RunRecord
from tests.ddp import run_distributed

pytestmark = pytest.mark.usefixtures("one_thread")

Batch = tuple[Tensor, Tensor, Tensor]


def batches(n: int, seed: int, size: int = 32, tokens: int = 0) -> list[Batch]:
    """Class ``y`` of 3; ``a`` is strong (large class signal), ``b`` weak."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    a = torch.randn(n, 6, generator=g) + 2.0 * nn.functional.one_hot(y, 6)
    b = torch.randn(n, 4, generator=g) + 0.7 * nn.functional.one_hot(y, 4)
    if tokens:
        a = a[:, None].expand(n, tokens, 6) + 0.1 * torch.randn(n, tokens, 6, generator=g)
        b = b[:, None].expand(n, tokens + 1, 4) + 0.1 * torch.randn(n, tokens + 1, 4, generator=g)
    return [(a[i : i + size], b[i : i + size], y[i : i + size]) for i in range(0, n, size)]


class Counting:
    """A loader that counts its passes."""

    def __init__(self, data: list[Batch]) -> None:
        self.data, self.passes = data, 0

    def __iter__(self) -> Iterator[Batch]:
        self.passes += 1
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Model(nn.Module):
    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(6, 8), "b": nn.Linear(4, 8)})
        self.proj = nn.Linear(8, 3)
        self.linear = nn.Linear(16, 3)
        self.tokens = tokens

    def features(self, batch: Batch) -> dict[str, Tensor]:
        return {m: torch.relu(self.encoders[m](x)) for m, x in zip("ab", batch[:2], strict=True)}

    def head(self) -> Any:
        if self.tokens:  # attention-like fusion over token sequences of different lengths
            return MappingHead(
                lambda f: self.proj(torch.stack([x.mean(1) for x in f.values()]).sum(0))
            )
        return self.linear


def forward(model: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
    assert isinstance(model, Model)
    return model.features(batch), batch[2]


def run(**kwargs: Any) -> ComparisonResult:
    tokens = kwargs.pop("tokens", 0)
    args: dict[str, Any] = {
        "train": batches(96, 0, tokens=tokens),
        "val": batches(64, 1, size=64, tokens=tokens),
        "epochs": 1,
        "seeds": (0,),
        "progress": False,
        "optimizer": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    }
    args.update(kwargs)
    build = args.pop("build", lambda: Model(tokens=bool(tokens)))
    return compare_remedies(
        build,
        forward,
        lambda m: m.head(),
        lambda m: m.encoders,
        args.pop("train"),
        args.pop("val"),
        **args,
    )


def test_every_method_that_applies_gives_a_row_from_the_same_weights() -> None:
    test = Counting(batches(64, 2, size=64))
    result = run(test=test, seeds=(0, 1))
    assert [r.name for r in result.rows] == list(REMEDIES)
    # a concatenation head scores no modality alone; a list of batches is no map-style dataset
    assert set(result.skipped) == {"mla", "reconboost", "valuation"}
    for row in result.rows:
        if row.name in result.skipped:
            continue
        assert row.status == "ok" and len(row.runs) == 2
        assert all(r.test is not None and 1 <= r.epoch <= 1 for r in row.runs)
        assert row.diagnosis is not None and set(row.diagnosis["probe"]) == {"a", "b"}
    for seed in (0, 1):  # the same initial weights for a seed, whatever the method
        assert len({r.init for row in result.rows for r in row.runs if r.seed == seed}) == 1
    assert result.rows[0].runs[0].init != result.rows[0].runs[1].init
    assert test.passes == (len(REMEDIES) - 3) * 2  # once per method and seed
    assert result.notes == []
    assert "joint + OGM-GE" in result.to_markdown()


def test_token_features_skip_pmr_and_boosting_with_the_reason() -> None:
    result = run(tokens=3)  # and those that need more (tests/test_compare_more.py)
    assert set(result.skipped) == {"pmr", "boost", "reconboost", "valuation", "relearning",
                                   "mmcosine"}  # fmt: skip
    for name in ("pmr", "boost"):
        assert "vector features" in result.skipped[name]
        assert (
            "No result" in result.to_markdown() and result.row(name).label in result.to_markdown()
        )
    assert all(r.status == "ok" for r in result.rows if r.name not in result.skipped)


def test_one_modality_runs_plain_only_and_says_why() -> None:
    class One(Model):
        def features(self, batch: Batch) -> dict[str, Tensor]:
            return {"a": torch.relu(self.encoders["a"](batch[0]))}

        def head(self) -> Any:
            return self.proj

    result = run(build=One)
    assert result.rows[0].status == "ok"
    assert all("at least 2 modalities" in why for why in result.skipped.values())
    assert len(result.skipped) == len(REMEDIES) - 1


def test_a_non_linear_head_is_noted_as_approximate() -> None:
    class Mlp(Model):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

        def head(self) -> Any:
            return self.mlp

    result = run(build=Mlp, methods=["arl"])
    assert "approximate" in result.row("arl").note and result.row("arl").status == "ok"


def test_grid_and_epoch_are_chosen_on_validation_only() -> None:
    """The same comparison with test labels permuted: test disagrees, nothing chosen changes."""
    test = batches(64, 2, size=64)
    scrambled = [(a, b, (y + 1) % 3) for a, b, y in test]
    counted = Counting(test)
    kwargs: dict[str, Any] = {"methods": ["ogm_ge", "agm"], "grid": True, "epochs": 3}
    one, two = run(test=counted, **kwargs), run(test=scrambled, **kwargs)
    for r1, r2 in zip(one.rows, two.rows, strict=True):
        assert r1.config == r2.config and r1.grid == r2.grid
        assert [r.epoch for r in r1.runs] == [r.epoch for r in r2.runs]
        assert r1.runs[0].test != r2.runs[0].test  # the test sets do disagree
        curve = r1.runs[0].curve
        assert r1.runs[0].val == max(curve) == curve[r1.runs[0].epoch - 1]
    assert one.best.name == two.best.name
    assert len(one.row("ogm_ge").grid) == 3 and counted.passes == 3  # grid points never read it


def test_best_is_flagged_not_distinguishable_within_the_seed_spread() -> None:
    def row(name: str, vals: list[float]) -> Row:
        runs = [
            RunRecord(name, {}, s, val=v, epoch=1, seconds_per_epoch=1.0)
            for s, v in enumerate(vals)
        ]
        return Row(name, name, runs=runs)

    close = ComparisonResult([row("plain", [0.50, 0.60, 0.55]), row("arl", [0.58, 0.57, 0.59])])
    assert close.best.name == "arl" and not close.best.distinguishable
    assert "not distinguishable" in str(close.best)
    clear = ComparisonResult([row("plain", [0.50, 0.51, 0.52]), row("arl", [0.60, 0.61, 0.62])])
    assert clear.best.distinguishable and "above the seed spread" in str(clear.best)
    single = ComparisonResult([row("plain", [0.5]), row("arl", [0.9])])
    assert not single.best.distinguishable and "one seed" in str(single.best)
    plain = ComparisonResult([row("plain", [0.6]), row("arl", [0.5])])
    assert plain.best.name == "plain" and "plain joint training is best" in str(plain.best)


def test_a_tiny_budget_skips_what_does_not_fit_and_says_so() -> None:
    result = run(methods=["ogm_ge"], seeds=(0, 1), max_minutes=1e-9)
    plain, ogm = result.rows
    assert plain.status == "partial" and len(plain.runs) == 1 and "budget" in plain.reason
    assert ogm.status == "skipped" and "budget" in ogm.reason
    assert "budget" in result.to_markdown()


def test_json_round_trip_and_resume_skips_finished_runs(tmp_path: Path) -> None:
    path = tmp_path / "cmp.json"
    built = {"n": 0}

    def build() -> Model:
        built["n"] += 1
        return Model()

    first = run(build=build, methods=["ogm_ge"], seeds=(0, 1), resume=path)
    assert path.exists() and built["n"] == 1 + 4  # the reference model, then 2 rows x 2 seeds
    loaded = ComparisonResult.load(path)
    assert loaded.to_markdown() == first.to_markdown()
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads(json.dumps(first.to_dict()))
    first.save(tmp_path / "copy.json")
    assert (
        ComparisonResult.load(tmp_path / "copy.json").rows[1].runs[1].val
        == first.rows[1].runs[1].val
    )
    built["n"] = 0
    second = run(build=build, methods=["ogm_ge", "arl"], seeds=(0, 1), resume=path)
    assert built["n"] == 1 + 2  # only ARL's two seeds are trained
    assert second.row("ogm_ge").runs == first.row("ogm_ge").runs
    with pytest.raises(ValueError, match="other settings"):
        run(methods=["ogm_ge"], seeds=(0, 1), epochs=2, resume=path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a saved comparison"):
        ComparisonResult.load(tmp_path / "bad.json")


def test_resume_runs_a_row_again_when_its_variant_or_grid_changed(tmp_path: Path) -> None:
    """A resumed row is reused only for the same method options and the same settings tried:
    the same name with other ``options`` (or another grid) is another method."""
    import dataclasses

    from imbalance_losses.compare import REMEDIES

    path = tmp_path / "cmp.json"
    built = {"n": 0}

    def build() -> Model:
        built["n"] += 1
        return Model()

    plain_ogm = REMEDIES["ogm_ge"]
    run(build=build, methods=[plain_ogm], resume=path)
    built["n"] = 0
    run(build=build, methods=[plain_ogm], resume=path)
    assert built["n"] == 1  # the reference model only: every run reused
    other = dataclasses.replace(plain_ogm, options={"alpha": 0.1})
    built["n"] = 0
    again = run(build=build, methods=[other], resume=path)
    assert built["n"] == 1 + 1  # the variant is trained, not read from the file
    assert again.row("ogm_ge").done
    narrower = dataclasses.replace(other, grid=other.grid[:1])
    built["n"] = 0
    run(build=build, methods=[narrower], grid=True, resume=tmp_path / "grid.json")
    wider = dataclasses.replace(other, grid=other.grid[:2])
    built["n"] = 0
    run(build=build, methods=[wider], grid=True, resume=tmp_path / "grid.json")
    assert built["n"] == 1 + 2  # another grid: its settings are tried


def test_alone_gives_the_reference_of_the_deficit() -> None:
    result = run(methods=["ogm_ge"], alone=True)
    assert set(result.alone) == {"a", "b"} and all(
        0 <= a["probe"] <= 1 for a in result.alone.values()
    )
    report = result.rows[0].report
    assert report is not None and set(report.probe) == {"a", "b"}
    assert "trained alone" in result.to_markdown()


def test_ignored_targets_count_in_no_accuracy_and_no_diagnosis() -> None:
    """Targets -100 (cross-entropy's ignore_index) are trained around, scored around, and left
    out of the diagnosis' probes and head accuracies, with the default diagnosis and alone=True."""

    def ignoring(data: list[Batch]) -> list[Batch]:
        out = []
        for a, b, y in data:
            y = y.clone()
            y[::4] = -100
            out.append((a, b, y))
        return out

    train, val = ignoring(batches(96, 0)), ignoring(batches(64, 1, size=64))
    result = run(train=train, val=val, methods=["arl"], alone=True)
    counted = sum(int((y != -100).sum()) for _, _, y in val)
    for row in result.rows:
        assert row.status == "ok", row.reason
        report = row.report
        assert report is not None
        assert report.num_evaluated == counted
        assert report.num_fit == sum(int((y != -100).sum()) for _, _, y in train)
    assert all(0 <= a["probe"] <= 1 for a in result.alone.values())


def test_a_new_method_plugs_in_with_one_adapter_and_failures_are_rows() -> None:
    class Halved(Hooks):
        def loss(self, features: dict[str, Tensor], target: Tensor) -> Tensor:
            return 0.5 * super().loss(features, target)

    class Half(RemedyPlugin):
        def setup(self, ctx: Any, config: Any) -> Hooks:
            return Halved(ctx)

    class Broken(RemedyPlugin):
        def setup(self, ctx: Any, config: Any) -> Hooks:
            raise RuntimeError("no such thing")

    register(Half("half", "joint, half the loss"))
    register(Broken("broken", "broken method"))
    try:
        result = run(methods=["half", "broken"])
    finally:
        del REMEDIES["half"], REMEDIES["broken"]
    assert result.row("half").status == "ok"
    assert (
        result.row("broken").status == "failed" and "no such thing" in result.row("broken").reason
    )


def test_plot_writes_a_file_and_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    result = run(methods=["ogm_ge"])
    result.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
    real = importlib.import_module

    def missing(name: str, *args: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        result.plot(tmp_path / "r2.png")


def test_bad_arguments_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown methods"):
        run(methods=["ogm"])
    with pytest.raises(TypeError, match="list of names"):
        run(methods="arl")
    with pytest.raises(ValueError, match="epochs"):
        run(epochs=0)
    with pytest.raises(ValueError, match="seeds"):
        run(seeds=())
    with pytest.raises(ValueError, match="distinct"):
        run(seeds=(1, 1))
    with pytest.raises(ValueError, match="max_minutes"):
        run(max_minutes=0)
    with pytest.raises(TypeError, match="build must be a callable returning a fresh model"):
        compare_remedies(Model(), forward, lambda m: m.head(), lambda m: m.encoders, [], [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="train must be a loader"):
        run(train={"a": 1})
    with pytest.raises(ValueError, match="no batch"):
        run(train=[])
    # a generator or an iterator is read once: the second pass names the loader and the fix
    with pytest.raises(ValueError, match=r"train gave no batch when read again.*DataLoader"):
        run(train=(b for b in batches(96, 0)))
    with pytest.raises(ValueError, match="generator or an iterator already read"):
        run(val=iter(batches(64, 1)), epochs=2)
    with pytest.raises(TypeError, match="forward"):
        compare_remedies(
            Model,
            lambda m, b: b,
            lambda m: m.head(),
            lambda m: m.encoders,
            batches(32, 0),
            batches(32, 1),
        )


def _ddp_body(rank: int, world_size: int) -> Any:
    train = batches(96, 0, size=24)[rank::world_size]  # each rank its shard (2 batches)
    full = run(train=train, methods=["ogm_ge", "mmpareto"], test=batches(32, 2), progress=rank == 0)
    tiny = run(train=train, methods=["ogm_ge"], seeds=(0, 1), max_minutes=1e-9)
    vals = [r.val for row in full.rows for r in row.runs]
    return {
        "rank": rank,
        "full": full.to_dict(),
        "vals": vals,
        "tiny": [r.status for r in tiny.rows],
    }


def test_ddp_two_ranks_finish_and_agree() -> None:
    out = run_distributed(_ddp_body)
    assert [o["rank"] for o in out] == [0, 1]
    assert out[0]["vals"] == out[1]["vals"]  # validation accuracy summed over ranks
    result = ComparisonResult.from_dict(out[0]["full"])
    assert [r.status for r in result.rows] == ["ok", "ok", "ok"]
    assert out[0]["tiny"] == out[1]["tiny"] == ["partial", "skipped"]
    assert not math.isnan(result.rows[0].test_mean)


def test_variants_ablation_trace_and_on_run_express_a_callers_protocol() -> None:
    """What examples/benchmark.py sets: a variant with options, an ablation on another row's
    chosen setting, the training split for evaluation passes, traces, and each kept run."""
    import dataclasses

    from imbalance_losses.compare import SelectedRun

    train, val = batches(96, 0), batches(64, 1, size=64)
    whole = [tuple(torch.cat([b[i] for b in train]) for i in range(3))]
    no_reweight = dataclasses.replace(
        REMEDIES["arl"], name="arl_nr", label="ARL, no re-weighting",
        options={"warmup_steps": 10**6}, same_as="arl",
    )  # fmt: skip
    pmr_seen: list[int] = []

    class SpyPMR(RemedyPlugin):
        def setup(self, ctx: Any, config: Any) -> Hooks:
            hooks = REMEDIES["pmr"].setup(ctx, config)
            real = hooks.epoch_start

            def epoch_start(epoch: int) -> None:
                pmr_seen.append(len(list(ctx.train_split)))
                real(epoch)

            hooks.epoch_start = epoch_start  # type: ignore[method-assign]
            return hooks

    kept: list[SelectedRun] = []
    result = run(
        train=train,
        val=val,
        train_eval=whole,
        methods=[no_reweight, "arl", SpyPMR("pmr", "joint + PMR", {"alpha": 1.0})],
        grid=True,
        seeds=(0, 1),
        baseline=False,
        diagnosis=False,
        trace=True,
        on_run=kept.append,
    )
    assert [r.name for r in result.rows] == ["arl", "pmr", "arl_nr"]
    arl, nr = result.row("arl"), result.row("arl_nr")
    assert len(arl.grid) == 4 and nr.grid[0]["config"] == arl.config and len(nr.grid) == 1
    assert pmr_seen == [1, 1]  # one epoch per seed, prototypes from the one whole batch
    assert all(r.diagnosis is None for r in result.rows)
    steps = len(train)
    for row in result.rows:  # every step of every run left its record
        assert all(len(r.trace) == steps for r in row.runs), row.name
    assert all("coefficients/a" in step for step in arl.runs[0].trace)
    assert [(k.method, k.seed) for k in kept] == [
        (m, s) for m in ("arl", "pmr", "arl_nr") for s in (0, 1)
    ]
    run0 = kept[0]
    feats, y = run0.features(val[0])
    acc = float((run0.logits(feats).argmax(-1) == y).double().mean())
    assert math.isclose(acc, run0.record.val)  # the model of the chosen epoch


def test_on_run_scores_the_kept_model_as_the_protocol_does_and_leaves_it_unchanged() -> None:
    """run.features / run.logits on the test split give the row's test accuracy for a model
    with dropout and BatchNorm (eval mode), and change none of the kept model's state."""

    class Noisy(Model):
        def __init__(self) -> None:
            super().__init__()
            self.encoders = nn.ModuleDict(
                {
                    "a": nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)),
                    "b": nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5)),
                }
            )

    test = batches(64, 2, size=32)
    seen: list[tuple[float, float, bool]] = []

    def on_run(selected: Any) -> None:
        before = {k: v.clone() for k, v in selected.model.state_dict().items()}
        correct = count = 0
        for batch in test:
            feats, y = selected.features(batch)
            correct += int((selected.logits(feats).argmax(-1) == y).sum())
            count += len(y)
        after = selected.model.state_dict()
        unchanged = all(torch.equal(v, after[k]) for k, v in before.items())
        seen.append((correct / count, selected.record.test, unchanged))

    run(build=Noisy, methods=["boost"], test=test, epochs=2, on_run=on_run)
    assert len(seen) == 2
    for acc, tested, unchanged in seen:
        assert acc == tested and unchanged


def test_the_callers_global_rng_continues_where_it_was() -> None:
    """The runs seed torch's global generator; after the call the caller's draws go on as if
    it had not run (a search that draws its settings from torch does not repeat them)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(methods=["ogm_ge"], alone=True, test=batches(64, 2, size=64))
    assert torch.equal(torch.rand(3), expected)
