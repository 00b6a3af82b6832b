"""attach() under GradScaler with an optimiser that handles the scaling itself (fused Adam).

For such an optimiser (``_step_supports_amp_scaling``) ``GradScaler.step`` does not skip
``optimizer.step()`` on an overflow: it hands the optimiser ``found_inf`` and the fused kernel
leaves the parameters alone. The attached action must be skipped with the update, as it is for a
plain optimiser (attach()'s documented contract: never on a step the scaler skips).
"""

# mypy: disable-error-code="no-untyped-call,union-attr"

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imbalance_losses import ModalityGradientModulator, unimodal_logits


def _setup() -> tuple[dict[str, nn.Linear], nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    enc = {"audio": nn.Linear(3, 4), "visual": nn.Linear(3, 4)}
    head = nn.Linear(8, 2)
    params = [p for m in (*enc.values(), head) for p in m.parameters()]
    return enc, head, torch.optim.Adam(params, lr=0.1, fused=True)


def _micro_batch(
    enc: dict[str, nn.Linear],
    head: nn.Linear,
    scaler: torch.amp.GradScaler,
    modulator: ModalityGradientModulator,
) -> None:
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    feats = {m: e(x) for m, e in enc.items()}
    scaler.scale(F.cross_entropy(head(torch.cat(list(feats.values()), 1)), y)).backward()
    modulator.observe(unimodal_logits(head, feats), y)


def test_fused_optimizer_skipped_step_skips_the_action() -> None:
    enc, head, opt = _setup()
    assert getattr(opt, "_step_supports_amp_scaling", False)  # the case under test
    modulator = ModalityGradientModulator(enc, alpha=0.5, method="ogm")
    modulator.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _micro_batch(enc, head, scaler, modulator)
    enc["audio"].weight.grad[0, 0] = math.inf  # an overflow: the step is skipped
    before = enc["audio"].bias.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(enc["audio"].bias.detach(), before)  # the kernel skipped the update
    assert modulator.step_count == 0 and modulator.last is None  # and the action with it
    # the next real step acts once, from both steps' batches (12 samples)
    opt.zero_grad()
    _micro_batch(enc, head, scaler, modulator)
    scaler.step(opt)
    scaler.update()
    assert modulator.step_count == 1 and int(modulator.last.num_samples) == 12


def test_fused_optimizer_real_step_still_acts_after_unscale() -> None:
    enc, head, opt = _setup()
    modulator = ModalityGradientModulator(enc, alpha=0.5, method="ogm")
    modulator.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _micro_batch(enc, head, scaler, modulator)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert modulator.step_count == 1


def test_a_copy_of_an_attached_module_is_not_attached_and_leaves_the_optimizer_behind() -> None:
    """``copy.deepcopy`` (an EMA model) and pickling drop the attachment: the copy does not
    carry the optimiser (nor its state), reports no optimiser, and the original stays attached
    with exactly one hook."""
    import copy
    import io

    from imbalance_losses import ARLLoss, ModalityGradientModulator

    enc = {"a": torch.nn.Linear(3, 4), "b": torch.nn.Linear(3, 4)}
    head = torch.nn.Linear(8, 2)
    params = [p for m in (*enc.values(), head) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    arl = ARLLoss(head=head, encoders=enc)
    mod = ModalityGradientModulator(enc, alpha=0.5)
    opt2 = torch.optim.SGD(params, lr=0.1)
    arl.attach(opt)
    mod.attach(opt2)
    for module, optimizer in ((arl, opt), (mod, opt2)):
        twin = copy.deepcopy(module)
        assert twin.attached_optimizer is None
        assert module.attached_optimizer is optimizer
        assert len(optimizer._optimizer_step_pre_hooks) == 1
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.attached_optimizer is None
        assert module.attached_optimizer is optimizer
