"""The monitor reads the head without changing training: no BatchNorm statistics, no RNG draw.

A head with BatchNorm or dropout in training mode would, if called as it is, update the running
statistics with the masked (one-modality) inputs and draw dropout masks from the global RNG, so
training with the monitor would differ from training without it.
"""

from __future__ import annotations

import torch
from torch import nn

from imbalance_losses.diagnosis.monitor import ImbalanceMonitor


def _head() -> nn.Sequential:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    with torch.no_grad():  # running statistics that differ from a batch's
        head[1].running_mean.uniform_(-1.0, 1.0)
        head[1].running_var.uniform_(0.5, 2.0)
    return head


def test_update_leaves_batchnorm_statistics_rng_and_modes_alone() -> None:
    head = _head().train()
    head[1].eval()  # a frozen BatchNorm the user keeps in eval: it must stay so
    buffers = {k: v.clone() for k, v in head.state_dict().items()}
    monitor = ImbalanceMonitor(["a", "b"], head=head)
    g = torch.Generator().manual_seed(1)
    feats = {"a": torch.randn(16, 4, generator=g) + 3.0, "b": torch.randn(16, 4, generator=g)}
    rng = torch.get_rng_state()
    monitor.update(feats, torch.arange(16) % 2)
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    for k, v in head.state_dict().items():  # no running statistic updated
        assert torch.equal(v, buffers[k]), k
    assert [m.training for m in head.modules()] == [True, True, False, True, True]


def test_head_is_read_in_eval_mode() -> None:
    """The accuracy is that of the eval-mode head on each modality alone (others zeroed)."""
    head = _head().train()
    monitor = ImbalanceMonitor(["a", "b"], head=head)
    g = torch.Generator().manual_seed(2)
    feats = {"a": torch.randn(32, 4, generator=g) + 3.0, "b": torch.randn(32, 4, generator=g)}
    y = torch.randint(0, 2, (32,), generator=g)
    monitor.update(feats, y)
    expected = head.eval()
    with torch.no_grad():
        za = expected(torch.cat([feats["a"], torch.zeros(32, 4)], 1))
        zb = expected(torch.cat([torch.zeros(32, 4), feats["b"]], 1))
    values = monitor.compute()
    assert values["imbalance/a/acc"] == float((za.argmax(1) == y).double().mean())
    assert values["imbalance/b/acc"] == float((zb.argmax(1) == y).double().mean())
