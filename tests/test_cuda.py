"""On a CUDA machine: no module makes a host sync in its training step (skipped elsewhere).

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call (``.item()``,
``bool(t)``, a blocking host-to-device copy such as ``torch.tensor(x, device="cuda")``) into an
error, which catches what the CPU-side TorchFunctionMode checks cannot see.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from imbalance_losses import (
    ARLLoss,
    ModalityGradientModulator,
    SustainedBoostingLoss,
    unimodal_logits,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _second_step_must_not_sync(step: Callable[[], None]) -> None:
    step()  # warm-up: lazy initialisation may sync once
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _data() -> tuple[dict[str, torch.Tensor], torch.Tensor, nn.ModuleDict, nn.Linear]:
    torch.manual_seed(0)
    enc = nn.ModuleDict({"audio": nn.Linear(6, 8), "visual": nn.Linear(4, 8)}).cuda()
    head = nn.Linear(16, 3).cuda()
    x = {"audio": torch.randn(5, 6, device="cuda"), "visual": torch.randn(5, 4, device="cuda")}
    return x, torch.randint(3, (5,), device="cuda"), enc, head


def test_arl_step_has_no_sync() -> None:
    x, y, enc, head = _data()
    arl = ARLLoss(head=head)

    def step() -> None:
        feats = {m: enc[m](v) for m, v in x.items()}
        arl(head(torch.cat(list(feats.values()), 1)), y, feats).backward()

    _second_step_must_not_sync(step)


def test_modulator_step_has_no_sync() -> None:
    x, y, enc, head = _data()
    mod = ModalityGradientModulator(dict(enc.items()), alpha=0.8)

    def step() -> None:
        feats = {m: enc[m](v) for m, v in x.items()}
        nn.functional.cross_entropy(head(torch.cat(list(feats.values()), 1)), y).backward()
        mod.step(unimodal_logits(head, {m: f.detach() for m, f in feats.items()}), y)

    _second_step_must_not_sync(step)


def test_boosting_step_has_no_sync() -> None:
    x, y, enc, _ = _data()
    boost = SustainedBoostingLoss(
        3, {"audio": 8, "visual": 8}, hidden=8, check_every="manual"
    ).cuda()
    boost.add_head("visual")

    def step() -> None:
        boost({m: enc[m](v) for m, v in x.items()}, y).backward()

    _second_step_must_not_sync(step)


def test_scale_gradients_launches_one_kernel_per_modality() -> None:
    """The claim behind ``scale_gradients_``'s grouping (docs/cost.md): with one 0-dim factor per
    list, ``_foreach_mul_`` is one fused launch per modality, not one per gradient tensor."""
    from torch.profiler import ProfilerActivity, profile

    from imbalance_losses.core.params import scale_gradients_

    grads = [torch.randn(s, device="cuda") for s in [(8, 4), (8,), (3, 3), (5,), (7, 2), (2,)]]
    index = [0, 0, 0, 1, 1, 1]
    k = torch.tensor([0.5, 2.0], device="cuda")
    scale_gradients_(grads, index, k)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        scale_gradients_(grads, index, k)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, [e.name for e in kernels]


def test_relearning_takes_a_cpu_target_beside_cuda_features() -> None:
    """``forward`` may return the batch's target where the loader left it (the CPU)."""
    from imbalance_losses import ModalityRelearning

    x, y, enc, _ = _data()
    relearn = ModalityRelearning(enc, num_classes=3)
    batches = [(x, y.cpu())] * 2

    def forward(batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> object:
        feats, target = batch
        return {m: enc[m](v) for m, v in feats.items()}, target

    record = relearn.diagnose(batches, batches, forward=forward)
    assert record.train_samples == record.val_samples == 10
    assert record.alphas.device.type == "cuda" and torch.isfinite(record.alphas).all()


def test_pmr_prototypes_take_a_cpu_target_beside_cuda_features() -> None:
    """``update_prototypes`` batches may carry the target where the loader left it (the CPU)."""
    from imbalance_losses import PMRLoss

    x, y, enc, _ = _data()
    pmr = PMRLoss(3, {"audio": 8, "visual": 8}).cuda()
    with torch.no_grad():
        feats = {m: enc[m](v) for m, v in x.items()}
    pmr.update_prototypes([(feats, y.cpu())])
    want = {m: torch.stack([f[y == c].mean(0) for c in range(3)]) for m, f in feats.items()}
    for m, got in pmr.prototypes.items():
        present = torch.stack([(y == c).any() for c in range(3)])
        torch.testing.assert_close(got[present], want[m][present])
