"""The Hugging Face Trainer integration, with real ``Trainer.train()`` fits on a tiny model.

Each fit is a custom ``nn.Module`` on a 16-sample ``torch`` dataset, CPU, no hub access.
"""

# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,attr-defined,override"

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from imbalance_losses import (  # noqa: E402
    AdaptiveGradientModulator,
    ModalityGradientModulator,
    unimodal_logits,
)
from imbalance_losses.integrations.transformers import (  # noqa: E402
    STATE_FILE,
    ModulatorCallback,
)
from tests.pages import run_page  # noqa: E402

LR = 0.2
BATCH, ACCUMULATE = 4, 2


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Linear(4, 6)
        self.visual = nn.Linear(3, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {"audio": torch.relu(self.audio(audio)), "visual": torch.relu(self.visual(visual))}
        return self.head(torch.cat(list(feats.values()), 1)), feats


class Pairs(torch.utils.data.Dataset):
    """16 samples; audio carries the label strongly, visual weakly."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.a = torch.randn(n, 4, generator=g) + 2.0 * self.y[:, None].float()
        self.v = torch.randn(n, 3, generator=g) + 0.2 * self.y[:, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"audio": self.a[i], "visual": self.v[i], "labels": self.y[i]}


class ObservingTrainer(Trainer):
    """The documented recipe: observe each micro-batch in compute_loss."""

    def __init__(self, *args: Any, modulator: ModalityGradientModulator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modulator = modulator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, feats = model(inputs["audio"], inputs["visual"])
        loss = F.cross_entropy(logits, inputs["labels"])
        if model.training:
            head = self.accelerator.unwrap_model(model).head
            self.modulator.observe(unimodal_logits(head, feats), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


def arguments(out: Path, **kwargs: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUMULATE,
        "max_steps": 4,
        "learning_rate": LR,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "remove_unused_columns": False,  # the labels are not an argument of forward()
    }
    settings.update(kwargs)
    return TrainingArguments(**settings)


def ogm(net: TinyNet, method: str = "ogm") -> ModalityGradientModulator:
    return ModalityGradientModulator(
        {"audio": net.audio, "visual": net.visual}, alpha=1.0, method=method, seed=5
    )


class StepWatcher(TrainerCallback):
    """Gradients after clipping (``on_pre_optimizer_step``) and the update that follows."""

    def __init__(self, net: TinyNet, modulator: ModalityGradientModulator) -> None:
        self.net, self.modulator = net, modulator
        self.steps: list[dict[str, Any]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append(
            {
                "count": self.modulator.step_count,
                "grads": {n: p.grad.clone() for n, p in self.net.named_parameters()},
                "before": {n: p.detach().clone() for n, p in self.net.named_parameters()},
            }
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = self.steps[-1]
        step["after_count"] = self.modulator.step_count
        step["k"] = self.modulator.last.coefficients.clone()
        step["samples"] = int(self.modulator.last.num_samples)
        step["delta"] = {n: step["before"][n] - p.detach() for n, p in self.net.named_parameters()}


def test_trainer_steps_the_attached_modulator_once_per_accumulated_step(tmp_path: Path) -> None:
    net = TinyNet()
    modulator = ogm(net)
    watcher = StepWatcher(net, modulator)
    trainer = ObservingTrainer(
        model=net,
        args=arguments(tmp_path),
        train_dataset=Pairs(),
        callbacks=[ModulatorCallback(modulator), watcher],
        modulator=modulator,
    )
    trainer.train()
    assert trainer.state.global_step == 4 and len(watcher.steps) == 4
    assert modulator.step_count == 4 and modulator.attached_optimizer is None  # detached
    damped = False
    for i, step in enumerate(watcher.steps):
        # one decision per optimizer step, from both micro-batches, inside optimizer.step()
        assert (step["count"], step["after_count"], step["samples"]) == (i, i + 1, 8)
        k = step["k"]
        damped |= bool(k.min() < 0.99)
        for n, g in step["grads"].items():  # SGD: delta = lr * k_m * clipped gradient
            factor = k[0] if n == "audio.weight" else k[1] if n == "visual.weight" else 1.0
            torch.testing.assert_close(step["delta"][n], LR * factor * g)
    assert damped  # the check has teeth: some step did modulate


def _fit(out: Path, resume: str | None, callbacks: list[Any]) -> tuple[TinyNet, Any]:
    net = TinyNet()
    modulator = ogm(net, method="ogm_ge")
    trainer = ObservingTrainer(
        model=net,
        args=arguments(out, save_strategy="steps", save_steps=2),
        train_dataset=Pairs(),
        callbacks=[cb(net, modulator) for cb in callbacks],
        modulator=modulator,
    )
    trainer.train(resume_from_checkpoint=resume)
    return net, modulator


def test_checkpoint_resume_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    def callback(net: TinyNet, modulator: ModalityGradientModulator) -> ModulatorCallback:
        return ModulatorCallback(modulator)

    full, full_mod = _fit(tmp_path / "a", None, [callback])
    assert full_mod.step_count == 4
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert saved["global_step"] == 2 and saved["modules"][0]["state"]["step"] == 2
    # resume from step 2 (its own output_dir, found by global step); OGM-GE draws noise from
    # the modulator's generator, so the run matches only if that state came back
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    resumed, resumed_mod = _fit(tmp_path / "b", str(tmp_path / "b" / "checkpoint-2"), [callback])
    assert resumed_mod.step_count == 4
    torch.testing.assert_close(resumed_mod.last.coefficients, full_mod.last.coefficients)
    for (n, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)

    # the same resume with a fresh modulator state (attached by hand, nothing restored) differs
    class AttachOnly(TrainerCallback):
        def __init__(self, net: TinyNet, modulator: ModalityGradientModulator) -> None:
            self.modulator = modulator

        def on_train_begin(self, args, state, control, **kwargs):
            self.modulator.attach(kwargs["optimizer"])

    shutil.rmtree(tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    fresh, _ = _fit(tmp_path / "b", str(tmp_path / "b" / "checkpoint-2"), [AttachOnly])
    assert not torch.equal(fresh.audio.weight, full.audio.weight)


def test_resume_elsewhere_needs_load_checkpoint(tmp_path: Path) -> None:
    net = TinyNet()
    modulator = ogm(net, method="ogm_ge")
    args = arguments(tmp_path / "a", save_strategy="steps", save_steps=2, max_steps=2)
    trainer = ObservingTrainer(
        model=net,
        args=args,
        train_dataset=Pairs(),
        callbacks=[ModulatorCallback(modulator)],
        modulator=modulator,
    )
    trainer.train()
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", moved)
    state = modulator.state_dict()

    def fit(net: TinyNet, mod: ModalityGradientModulator, callback: ModulatorCallback) -> None:
        t = ObservingTrainer(
            model=net,
            args=arguments(tmp_path / "c", max_steps=3),
            train_dataset=Pairs(),
            callbacks=[callback],
            modulator=mod,
        )
        t.train(resume_from_checkpoint=str(moved))

    net = TinyNet()
    other = ogm(net, method="ogm_ge")
    with pytest.raises(FileNotFoundError, match=r"resuming at global step 2.*load_checkpoint"):
        fit(net, other, ModulatorCallback(other))
    net = TinyNet()
    other = ogm(net, method="ogm_ge")
    callback = ModulatorCallback(other)
    callback.load_checkpoint(moved)
    assert other.step_count == 2
    assert torch.equal(other.state_dict()["generator"], state["generator"])
    fit(net, other, callback)
    assert other.step_count == 3
    with pytest.raises(ValueError, match=r"holds the state of \['ModalityGradientModulator'\]"):
        ModulatorCallback(other, other).load_checkpoint(moved)


def test_callback_refuses_bad_modules() -> None:
    with pytest.raises(TypeError, match="at least one module"):
        ModulatorCallback()
    with pytest.raises(TypeError, match="object has no state_dict, load_state_dict"):
        ModulatorCallback(object())
    net = TinyNet()
    agm = AdaptiveGradientModulator(net.head)
    assert ModulatorCallback(agm).attached_modules == []  # hook mode: checkpointed only
    net.agm = agm  # inside the model: the Trainer's safetensors save would refuse it
    callback = ModulatorCallback(agm)
    with pytest.raises(ValueError, match="submodule of the Trainer's model"):
        callback.on_train_begin(
            arguments(Path("unused")), transformers.TrainerState(), None, model=net
        )


def test_docs_page_runs_as_written(tmp_path: Path) -> None:
    ns = run_page("transformers.md", tmp_path)
    assert ns["modulator"].step_count == ns["trainer"].state.global_step == 4
    assert ns["resumed"].step_count == 4
    assert int(ns["modulator"].last.num_samples) == 8  # both micro-batches of the last step
    assert ns["arl"].steps == 4 and ns["boost_trainer"].state.global_step == 4
    assert len(ns["check"].records) == 2  # at global steps 2 and 4
    assert (tmp_path / "boost_run" / "checkpoint-4" / STATE_FILE).is_file()


def test_importing_the_package_imports_no_trainer_framework() -> None:
    code = (
        "import sys, imbalance_losses, imbalance_losses.integrations\n"
        "bad = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import imbalance_losses.integrations.transformers\n"
        "assert 'transformers' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.filterwarnings("ignore:SustainedBoostingLoss switched on a head")
def test_every_kind_of_module_round_trips_through_the_checkpoint_file(tmp_path: Path) -> None:
    """The file is read with ``weights_only=True``: every module's state must pass it."""
    from imbalance_losses import ARLLoss, SustainedBoostingLoss

    def build() -> tuple[Any, ...]:
        net = TinyNet()
        encoders = {"audio": net.audio, "visual": net.visual}
        return (
            net,
            ogm(net, method="ogm_ge"),
            ARLLoss(head=net.head, encoders=encoders),
            AdaptiveGradientModulator(net.head),
            SustainedBoostingLoss(
                num_classes=3, in_features={"audio": 6, "visual": 6}, check_every=1, hidden=4
            ),
        )

    net, *modules = build()
    data = Pairs()
    for i in range(2):  # give every module some state
        logits, feats = net(data.a[4 * i : 4 * i + 4], data.v[4 * i : 4 * i + 4])
        y = data.y[4 * i : 4 * i + 4]
        ogm_, arl, agm, boost = modules
        loss = arl(logits, y, feats) + boost(feats, y)
        agm(feats, y)
        loss.backward()
        ogm_.observe(unimodal_logits(net.head, feats), y)
        ogm_.step()
        arl.step()
    args = arguments(tmp_path)
    state = transformers.TrainerState(global_step=7)
    (tmp_path / "checkpoint-7").mkdir()
    ModulatorCallback(*modules).on_save(args, state, None)
    _, *fresh = build()
    callback = ModulatorCallback(*fresh)
    callback.load_checkpoint(tmp_path / "checkpoint-7")
    for old, new in zip(modules, fresh, strict=True):
        a, b = old.state_dict(), new.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], Tensor):
                assert torch.equal(a[key], b[key]), (type(old).__name__, key)
    assert fresh[0].step_count == 2 and fresh[1].steps == 2 and fresh[2].steps == 2
    assert fresh[3].num_heads == modules[3].num_heads


def test_resume_maps_the_saved_state_to_the_trainers_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank reads the file rank 0 wrote: on resume the state is loaded onto this rank's
    device (``args.device``), and ``load_checkpoint`` passes ``map_location`` through."""
    import imbalance_losses.integrations.transformers as integration

    _fit(tmp_path / "run", None, [lambda net, modulator: ModulatorCallback(modulator)])
    seen: list[object] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("map_location", "<not given>"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(integration.torch, "load", spy)
    folder = sorted((tmp_path / "run").glob("checkpoint-*"))[0]
    callback = ModulatorCallback(ogm(TinyNet()))
    callback.load_checkpoint(folder, map_location="cpu")
    assert seen == ["cpu"]
    seen.clear()
    args = arguments(tmp_path / "run")
    from transformers import TrainerState

    state = TrainerState()
    state.global_step = int(folder.name.split("-")[1])
    integration._resume(args, state, integration.STATE_FILE, callback.modules, None)
    assert seen == [args.device]
