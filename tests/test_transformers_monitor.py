"""``integrations.transformers.MonitorCallback`` in real ``Trainer.train()`` fits on a tiny model.

The values in ``trainer.state.log_history`` (and in the ``logs`` a reporter receives) equal the
monitor's formulas on the unimodal logits and gradients recorded during the same fit; a resume
from a checkpoint between two log events gives the record of the uninterrupted run.
"""

# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,attr-defined,override"

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from imbalance_losses import ImbalanceMonitor, unimodal_logits  # noqa: E402
from imbalance_losses.integrations.transformers import (  # noqa: E402
    MONITOR_STATE_FILE,
    MonitorCallback,
)
from tests.monitor_formulas import expected_values  # noqa: E402
from tests.test_transformers import Pairs, TinyNet, arguments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODALITIES = ("audio", "visual")


class MonitoredTrainer(Trainer):
    """The documented recipe: ``monitor.update(feats, labels)`` in compute_loss (training only).

    Also records, per training micro-batch, the global step, the unimodal logits and the labels.
    """

    def __init__(self, *args: Any, monitor: ImbalanceMonitor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor
        self.seen: list[tuple[int, dict[str, Tensor], Tensor]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, feats = model(inputs["audio"], inputs["visual"])
        loss = F.cross_entropy(logits, inputs["labels"])
        if model.training:
            self.monitor.update(feats, inputs["labels"])
            z = unimodal_logits(self.accelerator.unwrap_model(model).head, feats)
            self.seen.append(
                (self.state.global_step, {m: v.detach() for m, v in z.items()}, inputs["labels"])
            )
        return (loss, {"logits": logits}) if return_outputs else loss


class Probe(TrainerCallback):
    """A stand-in reporter: copies every ``logs`` it gets, and the encoder gradients that the
    optimiser applied at each step (``on_optimizer_step``, before ``zero_grad``)."""

    def __init__(self, net: TinyNet) -> None:
        self.net = net
        self.logs: list[dict[str, float]] = []
        self.grads: list[tuple[int, dict[str, list[Tensor]]]] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(
            (
                state.global_step,  # not yet incremented: the step being taken
                {
                    m: [p.grad.clone() for p in getattr(self.net, m).parameters()]
                    for m in MODALITIES
                },
            )
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def fit(
    out: Path, *, resume: str | None = None, **changes: Any
) -> tuple[MonitoredTrainer, Probe, MonitorCallback]:
    net = TinyNet()
    monitor = ImbalanceMonitor(
        MODALITIES, head=net.head, encoders={"audio": net.audio, "visual": net.visual}
    )
    probe = Probe(net)
    trainer = MonitoredTrainer(
        model=net,
        args=arguments(out, **changes),
        train_dataset=Pairs(),
        callbacks=[probe],
        monitor=monitor,
    )
    callback = MonitorCallback(monitor)
    callback.add_to(trainer)  # ahead of the probe, as of the Trainer's reporters
    trainer.train(resume_from_checkpoint=resume)
    return trainer, probe, callback


def records(trainer: Trainer) -> dict[int, dict[str, float]]:
    """The training log records (those with the Trainer's "loss"), by global step."""
    return {r["step"]: r for r in trainer.state.log_history if "loss" in r}


def test_each_training_record_holds_the_monitor_since_the_previous_one(tmp_path: Path) -> None:
    """logging_steps=2 over 4 optimiser steps of 2 micro-batches: two records, each equal to
    the formulas on its own 4 micro-batches and 2 steps (the monitor is reset after a record)."""
    trainer, probe, _ = fit(tmp_path, logging_strategy="steps", logging_steps=2)
    logged = records(trainer)
    assert sorted(logged) == [2, 4]
    assert len(probe.grads) == 4  # one gradient observation per optimiser step
    for step, record in logged.items():
        window = range(step - 2, step)  # the global steps taken since the previous record
        want = expected_values(
            [(z, y) for s, z, y in trainer.seen if s in window],
            [g for s, g in probe.grads if s in window],
        )
        got = {k: v for k, v in record.items() if k.startswith("imbalance/")}
        assert got.keys() == want.keys()
        assert want["imbalance/samples"] == 2 * 2 * 4  # 2 steps x 2 micro-batches x 4 samples
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
        # the reporter placed after the callback received the same values in `logs`
        (seen,) = [g for g in probe.logs if g.get("loss") == record["loss"]]
        assert {k: seen[k] for k in got} == got
    # evaluation-free run: the end-of-training summary is left alone
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith("imbalance/") for k in summary)


def test_resume_between_records_gives_the_uninterrupted_record(tmp_path: Path) -> None:
    """One record at step 4, checkpoints at 2 and 4: resuming at 2 restores the monitor's sums
    of steps 1-2, so the record covers all 32 samples and equals the uninterrupted run's."""
    changes: dict[str, Any] = {
        "logging_strategy": "steps",
        "logging_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    full, _, _ = fit(tmp_path / "a", **changes)
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / MONITOR_STATE_FILE, weights_only=True)
    assert saved["global_step"] == 2 and saved["modules"][0]["type"] == "ImbalanceMonitor"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    resumed, _, _ = fit(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"), **changes)
    assert [s for s, _, _ in resumed.seen] == [2, 2, 3, 3]  # only steps 3-4 ran again
    want, got = records(full)[4], records(resumed)[4]
    assert got["imbalance/samples"] == want["imbalance/samples"] == 32
    assert got["imbalance/grad_steps"] == 4
    for key in want:
        if key.startswith("imbalance/"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_refuses_a_place_behind_reporters_and_non_monitors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="takes an ImbalanceMonitor"):
        MonitorCallback(object())
    callback = MonitorCallback(ImbalanceMonitor(MODALITIES))
    args = arguments(tmp_path)
    args.report_to = ["tensorboard"]  # as TrainingArguments(report_to=...) leaves it
    with pytest.raises(ValueError, match=r"after the Trainer's reporters.*add_to\(trainer\)"):
        callback.on_train_begin(args, transformers.TrainerState(), None)
    trainer = Trainer(model=TinyNet(), args=arguments(tmp_path), callbacks=[callback])
    callback.add_to(trainer)  # moves it to the front, once
    handler = trainer.callback_handler.callbacks
    assert handler[0] is callback and sum(cb is callback for cb in handler) == 1
    callback.on_train_begin(args, transformers.TrainerState(), None)  # first now: accepted


def _ddp_checkpoint_body(
    rank: int, size: int, z: dict[str, Tensor], y: Tensor, folder: str
) -> dict[str, dict[str, float]]:
    """What the ``Trainer`` does with a DDP checkpoint: ``on_save`` runs on every rank, the main
    process writes the file, and on resume every rank reads that file."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from transformers import TrainerState

    mine = slice(5 * rank, 5 * rank + 5)
    callback = MonitorCallback(ImbalanceMonitor(list(MODALITIES)))
    callback.monitor.update({m: x[mine] for m, x in z.items()}, y[mine])
    args = SimpleNamespace(should_save=rank == 0, output_dir=folder)
    state = TrainerState(global_step=2)
    callback.on_save(args, state, None)
    dist.barrier()
    resumed = MonitorCallback(ImbalanceMonitor(list(MODALITIES)))
    resumed.load_checkpoint(Path(folder) / "checkpoint-2")
    return {"uninterrupted": callback.monitor.compute(), "resumed": resumed.monitor.compute()}


def test_ddp_resume_pools_every_ranks_sums_once(tmp_path: Path) -> None:
    """Under DDP the sums since the last record are every rank's, each counted once, after the
    resume (before: the file held the main process's sums, which every rank then loaded)."""
    from tests.ddp import run_distributed

    (tmp_path / "checkpoint-2").mkdir()
    g = torch.Generator().manual_seed(0)
    z = {m: torch.randn(10, 3, generator=g) * (2 - i) for i, m in enumerate(MODALITIES)}
    y = torch.randint(0, 3, (10,), generator=g)
    r0, r1 = run_distributed(_ddp_checkpoint_body, z, y, str(tmp_path))
    assert r0 == r1
    for key, value in r0["uninterrupted"].items():
        assert r0["resumed"][key] == pytest.approx(value, rel=1e-6), key
