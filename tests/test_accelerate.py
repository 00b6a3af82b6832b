"""Accelerate: accelerator.backward + accelerate.accumulate + an attached modulator."""

# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,attr-defined"

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")

from imbalance_losses import ModalityGradientModulator, unimodal_logits  # noqa: E402
from tests.pages import run_page  # noqa: E402


class TwoStream(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Linear(4, 6)
        self.visual = nn.Linear(3, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, a: Tensor, v: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {"audio": torch.relu(self.audio(a)), "visual": torch.relu(self.visual(v))}
        return self.head(torch.cat(list(feats.values()), 1)), feats


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (16,), generator=g)
    a = torch.randn(16, 4, generator=g) + 2.0 * y[:, None]
    v = torch.randn(16, 3, generator=g) + 0.2 * y[:, None]
    return TensorDataset(a, v, y)


def modulator_of(net: TwoStream) -> ModalityGradientModulator:
    return ModalityGradientModulator({"audio": net.audio, "visual": net.visual}, alpha=1.0, seed=2)


def accelerated_run(save: Path | None = None) -> tuple[TwoStream, ModalityGradientModulator]:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = TwoStream()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    modulator = modulator_of(net)
    model, optimizer, loader = accelerator.prepare(net, optimizer, DataLoader(data(), batch_size=4))
    modulator.attach(optimizer)
    accelerator.register_for_checkpointing(modulator)
    samples = []
    for _ in range(2):
        for a, v, y in loader:
            with accelerator.accumulate(model):
                logits, feats = model(a, v)
                accelerator.backward(F.cross_entropy(logits, y))
                modulator.observe(unimodal_logits(net.head, feats), y)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                before = modulator.step_count
                optimizer.step()
                if modulator.step_count != before:
                    samples.append(int(modulator.last.num_samples))
                optimizer.zero_grad()
    assert samples == [8, 8, 8, 8]  # one decision per accumulated step, both micro-batches
    if save is not None:
        accelerator.save_state(str(save))
    modulator.detach()
    return net, modulator


def test_accelerate_accumulate_equals_the_plain_loop_with_an_explicit_step() -> None:
    """The plain-loop semantics written out: micro-batch losses / 2, clip, step(), update."""
    net, modulator = accelerated_run()
    assert modulator.step_count == 4
    plain = TwoStream()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.2)
    reference = modulator_of(plain)
    batches = list(DataLoader(data(), batch_size=4))
    for _ in range(2):
        for first in (0, 2):
            optimizer.zero_grad()
            for a, v, y in batches[first : first + 2]:
                logits, feats = plain(a, v)
                (F.cross_entropy(logits, y) / 2).backward()
                reference.observe(unimodal_logits(plain.head, feats), y)
            nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            reference.step()  # after clipping: the attached order
            optimizer.step()
    torch.testing.assert_close(modulator.last.coefficients, reference.last.coefficients)
    assert bool(reference.last.coefficients.min() < 0.99)  # it did modulate
    for (n, p), q in zip(net.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)


def test_save_state_and_load_state_carry_the_modulator(tmp_path: Path) -> None:
    _, modulator = accelerated_run(tmp_path / "ckpt")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    fresh = modulator_of(TwoStream())
    accelerator.register_for_checkpointing(fresh)
    accelerator.load_state(str(tmp_path / "ckpt"))
    saved, loaded = modulator.state_dict(), fresh.state_dict()
    assert loaded["step"] == saved["step"] == 4
    assert torch.equal(loaded["generator"], saved["generator"])  # the same next noise


def test_docs_page_runs_as_written(tmp_path: Path) -> None:
    ns = run_page("accelerate.md", tmp_path)
    assert ns["modulator"].step_count == 4
    assert int(ns["modulator"].last.num_samples) == 8
    assert ns["modulator"].attached_optimizer is ns["optimizer"].optimizer
    assert (tmp_path / "checkpoint").is_dir()
