"""Lightning integration: real ``Trainer.fit`` runs of a tiny two-modality model on CPU.

Every module in a real fit; the modulators' ``step()`` once per optimiser step (pooled over the
micro-batches of ``accumulate_grad_batches``), its coefficient checked against the formula on
the pooled scores and its effect on the gradients Lightning steps with; bf16-mixed; records
logged through the trainer's logger; resume from a Lightning checkpoint equal to an
uninterrupted run; the docs page's code run as written; one 2-process ``strategy="ddp"`` run
(slow) equal to one process on the global batch.
"""

# Tests read optional gradients / records directly.
# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,operator,attr-defined"

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from imbalance_losses import (
    AdaptiveGradientModulator,
    ARLLoss,
    ModalityGradientModulator,
    SustainedBoostingLoss,
    unimodal_logits,
)
from imbalance_losses.integrations.lightning import ModulatorCallback, RecordLogger
from tests.pages import ROOT, run_page

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning"),
]


N, BATCH, C, D_AUDIO, D_VISUAL, HIDDEN = 96, 16, 3, 6, 10, 8
BATCHES = N // BATCH  # training batches per epoch


def dataset(seed: int = 0) -> TensorDataset:
    """Audio is informative (class means far apart), visual weakly so: a real imbalance."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % C
    audio = 2.0 * F.one_hot(y, D_AUDIO).float() + 0.5 * torch.randn(N, D_AUDIO, generator=g)
    visual = 0.4 * F.one_hot(y, D_VISUAL).float() + 1.0 * torch.randn(N, D_VISUAL, generator=g)
    return TensorDataset(audio, visual, y)


def loader(batch_size: int = BATCH) -> DataLoader[tuple[Tensor, ...]]:
    return DataLoader(dataset(), batch_size=batch_size, shuffle=False)


class Net(pl.LightningModule):
    """Two linear encoders and a concatenation linear head, with one method of the package.

    ``method``: ``"plain"``, ``"arl"`` (hook mode), ``"arl_encoders"``, ``"ogm"`` / ``"ogm_ge"``
    (the gradient modulator), ``"agm"`` (encoders mode), ``"agm_hooks"``, ``"boost"``.
    """

    def __init__(
        self,
        method: str,
        *,
        seed: int = 0,
        lr: float = 0.2,
        adam: bool = False,
        own_callback: bool = True,
        attach: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio = nn.Linear(D_AUDIO, HIDDEN)
        self.visual = nn.Linear(D_VISUAL, HIDDEN)
        self.head = nn.Linear(2 * HIDDEN, C)
        self.method, self.lr, self.adam = method, lr, adam
        self.own_callback, self.attach = own_callback and not attach, attach
        encoders = {"audio": self.audio, "visual": self.visual}
        self.stepper: Any = None
        if method == "arl":
            self.arl = ARLLoss(head=self.head, **kw)
        elif method == "arl_encoders":
            self.arl = ARLLoss(head=self.head, encoders=encoders, **kw)
            self.stepper = self.arl
        elif method in ("ogm", "ogm_ge"):
            kw.setdefault("alpha", 0.8)
            self.modulator = ModalityGradientModulator(encoders, method=method, **kw)
            self.stepper = self.modulator
        elif method == "agm":
            self.agm = AdaptiveGradientModulator(self.head, encoders=encoders, **kw)
            self.stepper = self.agm
        elif method == "agm_hooks":
            self.agm = AdaptiveGradientModulator(self.head, **kw)
        elif method == "boost":
            self.boost = SustainedBoostingLoss(
                num_classes=C,
                in_features={"audio": HIDDEN, "visual": HIDDEN},
                check_every="manual",
                hidden=8,
                max_heads=6,
                **kw,
            )
        else:
            assert method == "plain"
        # per training micro-batch: (global step, unimodal logits, target), for the formulas
        self.seen: list[tuple[int, dict[str, Tensor], Tensor]] = []
        self.checks: list[str | None] = []  # boosting: who got a head at each epoch end

    def features(self, xa: Tensor, xv: Tensor) -> dict[str, Tensor]:
        return {"audio": torch.relu(self.audio(xa)), "visual": torch.relu(self.visual(xv))}

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        xa, xv, y = batch
        f = self.features(xa, xv)
        if self.method == "boost":
            return self.boost(f, y)
        if self.method.startswith("agm"):
            f = self.agm(f, y)
        logits = self.head(torch.cat(list(f.values()), dim=1))
        if self.method.startswith("arl"):
            return self.arl(logits, y, features=f)
        if self.method.startswith("ogm"):
            z = unimodal_logits(self.head, f)
            self.modulator.observe(z, y)
            self.seen.append((self.global_step, {k: v.detach().float() for k, v in z.items()}, y))
        return F.cross_entropy(logits, y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        xa, xv, y = batch
        f = self.features(xa, xv)
        if self.method == "boost":
            self.log("val_loss", self.boost(f, y))
            return
        logits = self.head(torch.cat(list(f.values()), dim=1))
        if self.method.startswith("arl"):
            self.log("val_loss", self.arl(logits, y, features=f))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.adam:
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.method == "boost":
            self.boost.attach_optimizer(opt)
        if self.attach:  # the modulator's step() inside opt.step() (after Lightning's closure)
            self.stepper.detach()  # an earlier fit's optimizer
            self.stepper.attach(opt)
        return opt

    def configure_callbacks(self) -> list[Callback]:
        if self.stepper is None or not self.own_callback:
            return []  # (tests that place the callback among probes pass it to the Trainer)
        return [ModulatorCallback(self.stepper)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.attach and not isinstance(self.stepper, nn.Module):  # no callback holds it
            checkpoint["modulator"] = self.stepper.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.attach and not isinstance(self.stepper, nn.Module):
            self.stepper.load_state_dict(checkpoint["modulator"])

    def on_train_epoch_end(self) -> None:
        if self.method == "boost":
            self.checks.append(self.boost.check().added_to)


def trainer(epochs: int, **kw: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kw)
    return pl.Trainer(**options)


def fit(model: Net, epochs: int, **kw: Any) -> pl.Trainer:
    t = trainer(epochs, **kw)
    t.fit(model, loader())
    return t


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def fit_resumed(make: Any, tmp_path: Path, *, total: int, first: int, **kw: Any) -> Any:
    """``first`` epochs with a ModelCheckpoint, then a new model resumed from ``last.ckpt``.

    The new model is built with another seed, so its weights match only if restored.
    """
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(make(seed=0), first, enable_checkpointing=True, callbacks=[ckpt], **kw)
    resumed = make(seed=1)
    t = trainer(total, **kw)
    t.fit(resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    return resumed


class GradientProbe(Callback):
    """Copies the encoders' gradients in ``on_before_optimizer_step`` (placed before / after)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.grads.append(
            {
                f"{name}.{p}": param.grad.detach().clone()
                for name in ("audio", "visual")
                for p, param in getattr(pl_module, name).named_parameters()
            }
        )


class RecordProbe(Callback):
    """Keeps the module's record after each optimiser step (runs after ModulatorCallback)."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute
        self.records: list[Any] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.records.append(getattr(pl_module, self.attribute).last)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def optimiser_steps(epochs: int, accumulate: int) -> int:
    """Lightning steps after every ``accumulate`` batches and on the last batch of an epoch."""
    return epochs * math.ceil(BATCHES / accumulate)


# ---------------------------------------------------------------------------- modulators


def ogm_k(scores: list[float], alpha: float) -> list[float]:
    """OGM's paper coefficient ``k_m = 1 - tanh(alpha relu(rho_m - 1))``, two modalities."""
    rho = [scores[0] / scores[1], scores[1] / scores[0]]
    return [1 - math.tanh(alpha * max(r - 1, 0.0)) for r in rho]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_modulator_once_per_optimizer_step_on_pooled_scores(precision: str) -> None:
    """accumulate_grad_batches=2: one step() per optimiser step, k from both micro-batches.

    The scores are recomputed here from the unimodal logits seen in training_step:
    ``s_m = sum_b softmax(z_m)[b, y_b]`` over the micro-batches of the step, then OGM's ``k``;
    the encoders' weight gradients Lightning steps with are ``k_m`` times those of the
    backward passes, their biases untouched.
    """
    alpha, epochs = 0.8, 2
    model = Net("ogm", alpha=alpha, own_callback=False)
    before, after, records = GradientProbe(), GradientProbe(), RecordProbe("modulator")
    t = trainer(
        epochs,
        accumulate_grad_batches=2,
        precision=precision,
        callbacks=[before, ModulatorCallback(model.modulator), after, records],
    )
    t.fit(model, loader())
    steps = optimiser_steps(epochs, 2)
    assert t.global_step == steps
    assert model.modulator.step_count == steps
    assert len(before.grads) == len(records.records) == steps

    by_step: dict[int, list[tuple[dict[str, Tensor], Tensor]]] = {}
    for step, z, y in model.seen:
        by_step.setdefault(step, []).append((z, y))
    assert sorted(by_step) == list(range(steps))
    for step in range(steps):
        micro = by_step[step]
        assert len(micro) == 2  # 6 batches an epoch: 3 steps of 2 micro-batches
        scores = [
            sum(
                float(torch.softmax(z[m].double(), -1).gather(1, y[:, None]).sum())
                for z, y in micro
            )
            for m in ("audio", "visual")
        ]
        record = records.records[step]
        assert record.step == step
        assert record.num_samples.item() == sum(len(y) for _, y in micro)
        torch.testing.assert_close(
            record.scores.double(), torch.tensor(scores, dtype=torch.float64), rtol=1e-5, atol=0
        )
        k = ogm_k(scores, alpha)
        torch.testing.assert_close(
            record.coefficients.double(), torch.tensor(k, dtype=torch.float64), rtol=1e-5, atol=0
        )
        g0, g1 = before.grads[step], after.grads[step]
        for key in g0:
            factor = k[0] if key.startswith("audio") else k[1]
            if key.endswith("weight"):
                torch.testing.assert_close(g1[key], g0[key] * factor, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(g1[key], g0[key]), key
    # the imbalance is real: audio dominates and is damped on most steps
    damped = [float(r.coefficients[0]) < 1 for r in records.records]
    assert sum(damped) > steps // 2


@pytest.mark.parametrize("method", ["arl_encoders", "agm"])
def test_encoders_mode_steps_through_the_callback(method: str) -> None:
    """ARL / AGM with encoders=: one step() per optimiser step via ModulatorCallback, bf16 and
    accumulation; every encoder gradient is multiplied by its modality's factor."""
    epochs = 2
    attribute = "arl" if method.startswith("arl") else "agm"
    model = Net(method, own_callback=False)
    before, after, records = GradientProbe(), GradientProbe(), RecordProbe(attribute)
    t = trainer(
        epochs,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        callbacks=[before, ModulatorCallback(model.stepper), after, records],
    )
    t.fit(model, loader())
    steps = optimiser_steps(epochs, 2)
    assert t.global_step == steps
    assert getattr(model, attribute).steps == steps
    assert len(records.records) == steps
    active = 0
    for g0, g1, record in zip(before.grads, after.grads, records.records, strict=True):
        if method == "agm":
            factors = record.coefficients if record.active else torch.ones(2)
        else:
            factors = 1 + record.coefficients if record.active else torch.ones(2)
        active += record.active
        for key in g0:
            f = factors[0] if key.startswith("audio") else factors[1]
            torch.testing.assert_close(g1[key], g0[key] * f, rtol=1e-5, atol=1e-7)
    assert active == steps
    assert not torch.allclose(records.records[-1].coefficients, torch.ones(2))


def steps_taken(stepper: Any) -> int:
    return int(stepper.step_count if hasattr(stepper, "step_count") else stepper.steps)


@pytest.mark.parametrize("method", ["ogm", "arl_encoders", "agm"])
def test_attach_in_configure_optimizers_equals_the_callback(method: str) -> None:
    """The optimizer-hook path (attach in configure_optimizers): Lightning's optimizer.step(closure)
    runs the modulator after the closure's backward, once per optimiser step; without gradient
    clipping the run equals the callback path; a second fit of the same model re-attaches."""
    runs = {}
    for attach in (False, True):
        model = Net(method, attach=attach)
        t = fit(model, 2, accumulate_grad_batches=2, precision="bf16-mixed")
        assert steps_taken(model.stepper) == t.global_step == optimiser_steps(2, 2)
        runs[attach] = model
    assert_same_weights(runs[False], runs[True])
    model = runs[True]
    t = fit(model, 1)  # a new Trainer and optimizer for the same model
    assert steps_taken(model.stepper) == optimiser_steps(2, 2) + BATCHES
    assert model.stepper.attached_optimizer is t.optimizers[0]


class SkippingNet(Net):
    """``training_step`` returns ``None`` on batch 2 of each epoch: Lightning's documented way
    to skip a batch (no backward runs, the optimiser step has no gradient to apply)."""

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor | None:  # type: ignore[override]
        if batch_idx == SKIPPED:
            return None
        return super().training_step(batch, batch_idx)


SKIPPED = 2


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")
@pytest.mark.parametrize("attach", [False, True])
@pytest.mark.parametrize("method", ["ogm", "arl_encoders", "agm"])
def test_a_batch_skipped_by_returning_none_is_no_modulator_step(method: str, attach: bool) -> None:
    """A skipped batch gives the modulator nothing to act on: the fit goes on (it raised
    "nothing observed" from the callback or the attached step), the step is not counted, and
    the run equals one on the data without that batch."""
    epochs = 2
    model = SkippingNet(method, attach=attach)
    t = fit(model, epochs)
    assert t.global_step == epochs * BATCHES  # Lightning still counts the skipped step
    assert steps_taken(model.stepper) == epochs * (BATCHES - 1)
    kept = [i for i in range(N) if i // BATCH != SKIPPED]
    reference = Net(method, attach=attach)
    trainer(epochs).fit(
        reference, DataLoader(torch.utils.data.Subset(dataset(), kept), batch_size=BATCH)
    )
    assert steps_taken(reference.stepper) == steps_taken(model.stepper)
    assert_same_weights(model, reference)


def test_nn_module_modulator_must_belong_to_the_model() -> None:
    model = Net("plain")
    outside = ARLLoss(head=model.head, encoders={"audio": model.audio, "visual": model.visual})
    t = trainer(1, callbacks=[ModulatorCallback(outside)])
    with pytest.raises(ValueError, match="not part of the LightningModule"):
        t.fit(model, loader())


def test_attached_modulator_refused_by_the_callback() -> None:
    model = Net("ogm", attach=True)
    t = trainer(1, callbacks=[ModulatorCallback(model.modulator)])
    with pytest.raises(ValueError, match="would run twice"):
        t.fit(model, loader())


def test_modulator_callback_refuses_non_modulators() -> None:
    with pytest.raises(TypeError, match="at least one"):
        ModulatorCallback()
    with pytest.raises(TypeError, match="has no step"):
        ModulatorCallback(nn.Linear(2, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("attach", [False, True])
def test_ogm_ge_resume_equals_uninterrupted_run(tmp_path: Path, attach: bool) -> None:
    """The modulator's step count and GE noise generator travel in the checkpoint: in the
    callback's state, or (attach path) through the LightningModule's checkpoint hooks."""

    def make(seed: int) -> Net:
        return Net("ogm_ge", seed=seed, attach=attach)

    whole = make(0)
    fit(whole, 4, accumulate_grad_batches=2)
    resumed = fit_resumed(make, tmp_path, total=4, first=2, accumulate_grad_batches=2)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    if attach:
        state = ckpt["modulator"]
    else:
        key = "ModulatorCallback{'modulators': ['ModalityGradientModulator']}"
        state = ckpt["callbacks"][key]["0"]
    assert state["step"] == optimiser_steps(2, 2)
    assert_same_weights(whole, resumed)
    assert resumed.modulator.step_count == whole.modulator.step_count == optimiser_steps(4, 2)
    assert torch.equal(resumed.modulator.last.coefficients, whole.modulator.last.coefficients)


def test_arl_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """ARLLoss is a submodule: its step count and EMA are in the model's state_dict.

    warm-up 15 steps (2 epochs are 12) and an EMA: a resume that lost them differs.
    """

    def make(seed: int) -> Net:
        return Net("arl", seed=seed, warmup_steps=15, momentum=0.9)

    whole = make(0)
    fit(whole, 4)
    resumed = fit_resumed(make, tmp_path, total=4, first=2)
    assert_same_weights(whole, resumed)
    assert resumed.arl.steps == whole.arl.steps == 4 * BATCHES
    assert torch.equal(resumed.arl.last.coefficients, whole.arl.last.coefficients)
    # the control: the same resume with a fresh ARL state in the checkpoint differs
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    ckpt["state_dict"]["arl._extra_state"] = make(0).arl.get_extra_state()
    torch.save(ckpt, tmp_path / "no_arl.ckpt")
    lost = make(1)
    t = trainer(4)
    t.fit(lost, loader(), ckpt_path=str(tmp_path / "no_arl.ckpt"))
    assert lost.arl.steps == 2 * BATCHES  # counted from 0 again
    assert not torch.equal(weights(lost)["audio.weight"], weights(whole)["audio.weight"])


def test_boosting_fit_check_at_epoch_end_and_resume(tmp_path: Path) -> None:
    """check() at each epoch end adds heads to the weak modality; an added head starts with a
    fresh Adam state (attach_optimizer in configure_optimizers, again after a resume); a resume
    from a checkpoint taken after a head was added equals the uninterrupted run."""

    def make(seed: int) -> Net:
        return Net("boost", seed=seed, adam=True, lr=0.01)

    whole = make(0)
    t = fit(whole, 4)
    assert whole.checks[:3] == ["visual"] * 3  # the weak modality, at the end of epochs 1-3
    opt = t.optimizers[0]
    # Adam's step count of each visual head: every step for the first, the steps of the epochs
    # after the check that switched it on for the others (no state yet: switched on at the end)
    added = [0] + [epoch + 1 for epoch, who in enumerate(whole.checks) if who == "visual"]
    assert whole.boost.num_heads == {"audio": 1, "visual": len(added)}
    for j, epoch in enumerate(added):
        for p in (whole.boost.head_weight[1][j], whole.boost.head_bias[1][j]):
            steps = (4 - epoch) * BATCHES
            assert int(opt.state[p]["step"]) == steps if steps else p not in opt.state

    resumed = fit_resumed(make, tmp_path, total=4, first=2)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["state_dict"]["boost.head_counts"].tolist()[1] >= 2  # heads before the ckpt
    assert resumed.boost.num_heads == whole.boost.num_heads
    assert_same_weights(whole, resumed)
    assert torch.equal(resumed.boost.last.scores, whole.boost.last.scores)


def test_fits_in_bf16_with_accumulation_for_every_module() -> None:
    """Each module runs a real bf16-mixed fit with accumulate_grad_batches=2 and learns."""
    for method in ("arl", "boost", "ogm_ge", "agm_hooks"):
        model = Net(method, adam=method == "boost", lr=0.01 if method == "boost" else 0.2)
        t = fit(model, 2, precision="bf16-mixed", accumulate_grad_batches=2)
        assert t.global_step == optimiser_steps(2, 2), method
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), (method, name)
        module = {"arl": "arl", "boost": "boost", "ogm_ge": "modulator", "agm_hooks": "agm"}
        assert getattr(model, module[method]).last is not None, method


@pytest.mark.parametrize("method", ["arl", "boost"])
def test_validation_leaves_the_training_state_alone(method: str) -> None:
    """Lightning puts the model in eval mode for validation (sanity check included): the loss
    modules compute the loss there and count no step, pool no sample."""
    model = Net(method, adam=method == "boost", lr=0.01)
    t = trainer(2, num_sanity_val_steps=2)
    t.fit(model, loader(), val_dataloaders=loader())
    assert "val_loss" in t.callback_metrics
    if method == "arl":
        assert model.arl.steps == 2 * BATCHES
    else:  # each epoch-end check pooled the epoch's training samples only
        assert int(model.boost.last.samples) == N


# ---------------------------------------------------------------------------- logging


def test_record_logger_writes_records_on_the_logged_steps(tmp_path: Path) -> None:
    """The CSV logger gets each module's record, read at the steps Lightning logs."""
    model = Net("ogm", alpha=0.8, own_callback=False)
    records = RecordProbe("modulator")
    logger = RecordLogger({"ogm": model.modulator}, prefix="imbalance/")
    t = trainer(
        2,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=2,
        callbacks=[ModulatorCallback(model.modulator), records, logger],
    )
    t.fit(model, loader())
    files = list(tmp_path.rglob("metrics.csv"))
    assert len(files) == 1
    rows = read_csv(files[0])
    key = "imbalance/ogm/coefficients/audio"
    logged = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    # optimiser steps 2, 4, ..., 12 (global_step after the step); the logger's step is one less
    assert [s for s, _ in logged] == [s - 1 for s in range(2, 2 * BATCHES + 1, 2)]
    for step, value in logged:
        assert value == pytest.approx(float(records.records[step].coefficients[0]), rel=1e-6)
    assert {f"imbalance/ogm/{f}/visual" for f in ("scores", "ratios")} <= set(rows[0])


# ---------------------------------------------------------------------------- docs


def test_docs_page_runs_as_written(tmp_path: Path) -> None:
    """The page's code, as written: every example fits; the values it leaves behind are checked
    here against what the page says."""
    ns = run_page("lightning.md", tmp_path)
    epochs_ogm, batches = 3, len(ns["train"])
    assert ns["ogm_model"].modulator.step_count == epochs_ogm * batches
    assert ns["resumed"].criterion.steps == 3 * batches
    assert torch.equal(
        ns["resumed"].criterion.last.coefficients, ns["arl_model"].criterion.last.coefficients
    )
    assert ns["boost_model"].boost.num_heads["visual"] > ns["boost_model"].boost.num_heads["audio"]
    assert ns["accumulated"].criterion.steps == 2 * math.ceil(batches / 2)
    assert ns["attached"].modulator.step_count == 2 * math.ceil(batches / 2)
    rows = read_csv(next(tmp_path.rglob("metrics.csv")))
    assert [r["step"] for r in rows if r.get("imbalance/ogm/coefficients/audio")] == [
        str(s - 1) for s in range(2, epochs_ogm * batches + 1, 2)
    ]


# ---------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler
from tests.test_lightning import Net, dataset, BATCH

method, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = Net(method)
# each rank half a batch: rank r takes every 2nd sample (no shuffling: Lightning's own sampler
# would shuffle), so the global batches are those of the one-process run; Lightning launches
# rank 1 by running this script again with LOCAL_RANK=1
rank = int(os.environ.get("LOCAL_RANK", 0))
sampler = DistributedSampler(dataset(), num_replicas=world, rank=rank, shuffle=False)
trainer = pl.Trainer(
    accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=2,
    logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
)
trainer.fit(model, DataLoader(dataset(), batch_size=BATCH // world, sampler=sampler))
state = {{"weights": model.state_dict(), "last": vars((model.stepper or model.arl).last)}}
torch.save(state, f"{{out}}.{{trainer.global_rank}}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ogm_ge", "arl"])
def test_ddp_two_processes_equal_one_process(method: str, tmp_path: Path) -> None:
    """strategy="ddp", 2 CPU processes (gloo, launched by Lightning) = 1 process, same batch."""
    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    for world in (2, 1):
        subprocess.run(
            [sys.executable, str(script), method, str(world), str(tmp_path / f"w{world}")],
            check=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
    print(f"ddp {method}: {time.perf_counter() - start:.1f} s for both runs")
    one = torch.load(tmp_path / "w1.0", weights_only=False)
    ranks = [torch.load(tmp_path / f"w2.{r}", weights_only=False) for r in (0, 1)]
    for key, value in one["weights"].items():
        if isinstance(value, Tensor) and value.is_floating_point():
            assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key
            torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        ranks[0]["last"]["coefficients"], one["last"]["coefficients"], rtol=1e-4, atol=1e-6
    )


def test_lightning_is_not_imported_by_the_package() -> None:
    code = "import sys, imbalance_losses; print(any('lightning' in m for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"
