"""``integrations.lightning.MonitorCallback`` in real ``Trainer.fit`` runs on CPU.

The CSV logger's per-epoch values equal the monitor's formulas on the unimodal logits and
encoder gradients recorded in the same fit (under ``accumulate_grad_batches=2``: gradients once
per optimiser step); a resume from a mid-epoch checkpoint restores the epoch's sums.
"""

# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,operator,attr-defined"

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from imbalance_losses import ImbalanceMonitor, unimodal_logits
from imbalance_losses.integrations.lightning import MonitorCallback
from tests.monitor_formulas import expected_values
from tests.test_lightning import (
    BATCHES,
    D_AUDIO,
    D_VISUAL,
    HIDDEN,
    C,
    N,
    loader,
    read_csv,
    trainer,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before"),
]

MODALITIES = ("audio", "visual")


class MonitoredNet(pl.LightningModule):
    """Two linear encoders, a concatenation head, a monitor fed in ``training_step``.

    ``seen``: per training micro-batch, (epoch, unimodal logits, target), for the formulas.
    """

    def __init__(self, *, encoders: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio = nn.Linear(D_AUDIO, HIDDEN)
        self.visual = nn.Linear(D_VISUAL, HIDDEN)
        self.head = nn.Linear(2 * HIDDEN, C)
        self.monitor = ImbalanceMonitor(
            MODALITIES,
            head=self.head,
            encoders={"audio": self.audio, "visual": self.visual} if encoders else None,
        )
        self.seen: list[tuple[int, dict[str, Tensor], Tensor]] = []

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        xa, xv, y = batch
        f = {"audio": torch.relu(self.audio(xa)), "visual": torch.relu(self.visual(xv))}
        self.monitor.update(f, y)  # the user's one line
        z = unimodal_logits(self.head, f)
        self.seen.append((self.current_epoch, {m: v.detach() for m, v in z.items()}, y))
        return F.cross_entropy(self.head(torch.cat(list(f.values()), 1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)

    def configure_callbacks(self) -> list[Callback]:
        return [MonitorCallback(self.monitor)]


class GradientCopy(Callback):
    """The encoders' gradients at each optimiser step (what the monitor observes there)."""

    def __init__(self) -> None:
        self.grads: list[tuple[int, dict[str, list[Tensor]]]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.grads.append(
            (
                trainer.current_epoch,
                {
                    m: [p.grad.clone() for p in getattr(pl_module, m).parameters()]
                    for m in MODALITIES
                },
            )
        )


def logged_epochs(root: Path) -> dict[int, dict[str, float]]:
    (path,) = root.rglob("metrics.csv")
    return {
        int(r["epoch"]): {k: float(v) for k, v in r.items() if k.startswith("imbalance/") and v}
        for r in read_csv(path)
        if r.get("imbalance/samples")
    }


def assert_logged(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():  # the CSV holds fp32 values
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_each_epoch_logs_the_monitor_over_that_epoch(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: per epoch 6 micro-batches and 3 gradient observations; each
    epoch's row equals the formulas on that epoch alone (the monitor is reset after logging)."""
    model, grads = MonitoredNet(), GradientCopy()
    fit = trainer(2, logger=CSVLogger(tmp_path), accumulate_grad_batches=2, callbacks=[grads])
    fit.fit(model, loader())
    logged = logged_epochs(tmp_path)
    assert sorted(logged) == [0, 1]
    assert len(grads.grads) == 2 * BATCHES // 2  # once per optimiser step
    for epoch, got in logged.items():
        want = expected_values(
            [(z, y) for e, z, y in model.seen if e == epoch],
            [g for e, g in grads.grads if e == epoch],
        )
        assert want["imbalance/samples"] == N and want["imbalance/grad_steps"] == BATCHES // 2
        assert_logged(got, want)


def test_without_encoders_no_gradients_are_observed(tmp_path: Path) -> None:
    model = MonitoredNet(encoders=False)
    trainer(1, logger=CSVLogger(tmp_path)).fit(model, loader())
    (got,) = logged_epochs(tmp_path).values()
    assert_logged(got, expected_values([(z, y) for _, z, y in model.seen], []))


def test_resume_mid_epoch_restores_the_epoch_sums(tmp_path: Path) -> None:
    """A checkpoint after 3 of epoch 1's 6 batches holds their sums; the resumed run's epoch-1
    row pools them with the batches it runs (a fresh monitor would count 48 samples, not 96)."""
    first, grads = MonitoredNet(), GradientCopy()
    every3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(2, enable_checkpointing=True, callbacks=[every3, grads]).fit(first, loader())
    path = tmp_path / "ckpt" / f"epoch=1-step={BATCHES + 3}.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"]
    assert state[MonitorCallback(first.monitor).state_key]["pool"]  # the sums went in

    resumed, more = MonitoredNet(seed=1), GradientCopy()
    logger = CSVLogger(tmp_path / "resumed")
    trainer(2, logger=logger, callbacks=[more]).fit(resumed, loader(), ckpt_path=str(path))
    # epoch 1 = its first 3 batches (before the checkpoint) + what the resumed run trained on
    before = [(z, y) for e, z, y in first.seen if e == 1][:3]
    want = expected_values(
        before + [(z, y) for _, z, y in resumed.seen],
        [g for e, g in grads.grads if e == 1][:3] + [g for _, g in more.grads],
    )
    (got,) = logged_epochs(tmp_path / "resumed").values()
    assert got["imbalance/samples"] == N and got["imbalance/grad_steps"] == BATCHES
    assert_logged(got, want)


def test_refuses_a_non_monitor() -> None:
    with pytest.raises(TypeError, match="takes an ImbalanceMonitor, got dict"):
        MonitorCallback({})


def _ddp_checkpoint_body(
    rank: int, size: int, z: dict[str, Tensor], y: Tensor
) -> dict[str, dict[str, float]]:
    """What Lightning does with a DDP checkpoint: the callbacks' state is taken on every rank,
    rank 0's is written, and on resume every rank loads that one file."""
    import torch.distributed as dist

    mine = slice(5 * rank, 5 * rank + 5)
    callback = MonitorCallback(ImbalanceMonitor(["audio", "visual"]))
    callback.monitor.update({m: x[mine] for m, x in z.items()}, y[mine])
    written = [callback.state_dict()]
    dist.broadcast_object_list(written, src=0)
    resumed = MonitorCallback(ImbalanceMonitor(["audio", "visual"]))
    resumed.load_state_dict(written[0])
    return {"uninterrupted": callback.monitor.compute(), "resumed": resumed.monitor.compute()}


def test_ddp_resume_pools_every_ranks_sums_once() -> None:
    """Under DDP the epoch's sums before a checkpoint are every rank's, each counted once, after
    the resume (before: rank 0's counted once per rank, the other ranks' lost)."""
    from tests.ddp import run_distributed

    g = torch.Generator().manual_seed(0)
    z = {"audio": torch.randn(10, 3, generator=g) * 2, "visual": torch.randn(10, 3, generator=g)}
    y = torch.randint(0, 3, (10,), generator=g)
    r0, r1 = run_distributed(_ddp_checkpoint_body, z, y)
    assert r0 == r1
    for key, value in r0["uninterrupted"].items():
        assert r0["resumed"][key] == pytest.approx(value, rel=1e-6), key
