"""attach(optimizer): the before-step action inside optimizer.step(), in any loop or trainer.

Every expectation is written out here: the OGM coefficient from its formula on scores computed
by hand, the clip factor from ``clip_grad_norm_``'s documented formula, the update of plain SGD.
"""

# Tests read optional gradients / records directly; torch stubs are partly untyped.
# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,operator,attr-defined"

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalance_losses import (
    AdaptiveGradientModulator,
    ARLLoss,
    ModalityGradientModulator,
    unimodal_logits,
)
from imbalance_losses.core.attachment import OptimizerAttachable, unwrap_optimizer
from tests.pages import run_page

ALPHA = 0.7


class Net(nn.Module):
    """Two encoders, a concatenation head; audio carries the label, so it dominates."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio = nn.Linear(4, 5)
        self.visual = nn.Linear(3, 5)
        self.head = nn.Linear(10, 3)

    def forward(self, xa: Tensor, xv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {"audio": self.audio(xa), "visual": self.visual(xv)}
        return self.head(torch.cat(list(feats.values()), 1)), feats


def batches(n: int, batch: int = 6, seed: int = 1) -> list[tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (batch,), generator=g)
        xa = torch.randn(batch, 4, generator=g) + 2.0 * y[:, None].float()
        xv = torch.randn(batch, 3, generator=g) + 0.1 * y[:, None].float()
        out.append((xa, xv, y))
    return out


def ogm(model: Net, **kwargs: object) -> ModalityGradientModulator:
    return ModalityGradientModulator(
        {"audio": model.audio, "visual": model.visual}, alpha=ALPHA, method="ogm", **kwargs
    )


def k_by_hand(model: Net, data: list[tuple[Tensor, Tensor, Tensor]]) -> list[float]:
    """``k_m = 1 - tanh(alpha relu(rho_m - 1))``, ``rho`` = s_a / s_v, scores pooled over data."""
    s = [0.0, 0.0]
    with torch.no_grad():
        for xa, xv, y in data:
            w, b = model.head.weight.double(), model.head.bias.double()
            za = model.audio(xa).double() @ w[:, :5].T + b / 2
            zv = model.visual(xv).double() @ w[:, 5:].T + b / 2
            for m, z in enumerate((za, zv)):
                s[m] += float(torch.softmax(z, 1)[torch.arange(len(y)), y].sum())
    rho = [s[0] / s[1], s[1] / s[0]]
    return [1 - math.tanh(ALPHA * max(r - 1, 0.0)) for r in rho]


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def scale_of(name: str, k: list[float]) -> float:
    """Which coefficient OGM's default ``parameters="weights"`` applies to parameter ``name``."""
    if name == "audio.weight":
        return k[0]
    if name == "visual.weight":
        return k[1]
    return 1.0


def backward(model: Net, xa: Tensor, xv: Tensor, y: Tensor, scale: float = 1.0) -> dict:
    logits, feats = model(xa, xv)
    (scale * F.cross_entropy(logits, y)).backward()
    return feats


# ---------------------------------------------------------------------------- the basic contract


def test_attached_step_is_sgd_on_k_times_the_gradient() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    modulator = ogm(model)
    handle = modulator.attach(opt)
    assert modulator.attached_optimizer is opt and handle.optimizer is opt
    for step, (xa, xv, y) in enumerate(batches(3)):
        opt.zero_grad()
        k = k_by_hand(model, [(xa, xv, y)])
        feats = backward(model, xa, xv, y)
        g, before = grads(model), params(model)
        modulator.observe(unimodal_logits(model.head, feats), y)
        assert modulator.step_count == step  # observing does not step
        opt.step()
        assert modulator.step_count == step + 1
        assert min(k) < 0.99 and max(k) == 1.0  # one modality damped, so the check has teeth
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach(), before[n] - 0.5 * scale_of(n, k) * g[n], rtol=1e-5, atol=1e-6
            )


def test_accumulation_observes_per_micro_batch_and_acts_once() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    modulator = ogm(model)
    modulator.attach(opt)
    data = batches(4)
    for first in (0, 2):
        micro = data[first : first + 2]
        k = k_by_hand(model, micro)
        opt.zero_grad()
        for xa, xv, y in micro:
            feats = backward(model, xa, xv, y, scale=0.5)
            modulator.observe(unimodal_logits(model.head, feats), y)
        g, before = grads(model), params(model)
        opt.step()
        assert int(modulator.last.num_samples) == 12  # both micro-batches, one decision
        torch.testing.assert_close(modulator.last.coefficients, torch.tensor(k), rtol=1e-5, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] - 0.5 * scale_of(n, k) * g[n])
    assert modulator.step_count == 2


def test_detach_remove_and_context_manager() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modulator = ogm(model)
    modulator.attach(opt)
    modulator.detach()
    modulator.detach()  # nothing left to do
    assert modulator.attached_optimizer is None and not opt._optimizer_step_pre_hooks
    xa, xv, y = batches(1)[0]
    backward(model, xa, xv, y)
    opt.step()  # detached: no step, so no "nothing observed" error either
    assert modulator.step_count == 0
    with modulator.attach(opt) as handle:
        assert modulator.attached_optimizer is opt
    assert modulator.attached_optimizer is None and not opt._optimizer_step_pre_hooks
    handle.remove()  # idempotent
    again = modulator.attach(opt)
    again.remove()
    assert modulator.attached_optimizer is None


def test_attach_errors_are_clear() -> None:
    model, other = Net(), Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modulator = ogm(model)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        modulator.attach(object())
    with pytest.raises(ValueError, match=r"modalities \['audio', 'visual'\].*not in this SGD"):
        modulator.attach(torch.optim.SGD(other.parameters(), lr=0.1))
    head_only = torch.optim.SGD([*model.audio.parameters(), *model.head.parameters()], lr=0.1)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) of modalities \['visual'\].*\(5, 3\)"):
        modulator.attach(head_only)
    assert modulator.attached_optimizer is None  # a refused attach leaves nothing behind
    modulator.attach(opt)
    with pytest.raises(RuntimeError, match="already attached to this optimizer"):
        modulator.attach(opt)
    with pytest.raises(RuntimeError, match="already attached to another SGD"):
        modulator.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(opt._optimizer_step_pre_hooks) == 1
    # frozen parameters need not be in the optimizer (HF builds it from requires_grad ones)
    model.visual.weight.requires_grad_(False)
    trainable = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ogm(model).attach(trainable).remove()
    # AGM without encoders acts in backward: nothing to attach
    agm = AdaptiveGradientModulator(model.head)
    assert not agm.attachable
    with pytest.raises(RuntimeError, match="AdaptiveGradientModulator was built without encoders"):
        agm.attach(opt)
    arl = ARLLoss(head=model.head)
    with pytest.raises(RuntimeError, match="ARLLoss was built without encoders"):
        arl.attach(opt)


def test_forgotten_observe_raises_inside_optimizer_step() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ogm(model).attach(opt)
    xa, xv, y = batches(1)[0]
    backward(model, xa, xv, y)
    with pytest.raises(RuntimeError, match="nothing observed"):
        opt.step()


def test_explicit_step_plus_attachment_is_refused_not_applied_twice() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modulator = ogm(model)
    modulator.attach(opt)
    xa, xv, y = batches(1)[0]
    feats = backward(model, xa, xv, y)
    modulator.step(unimodal_logits(model.head, feats), y)
    once = grads(model)
    with pytest.raises(RuntimeError, match="called again on gradients it already modulated"):
        opt.step()  # the attached step refuses: never k^2
    assert all(torch.equal(p.grad, once[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------- closures


def test_closure_step_acts_after_the_closure_computed_the_gradient() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    modulator = ogm(model)
    modulator.attach(opt)
    xa, xv, y = batches(1)[0]
    k = k_by_hand(model, [(xa, xv, y)])
    before, seen = params(model), {}

    def closure() -> Tensor:  # Lightning's shape: forward, backward, observe inside the step
        opt.zero_grad()
        logits, feats = model(xa, xv)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        modulator.observe(unimodal_logits(model.head, feats), y)
        seen.update(grads(model))
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, Tensor) and modulator.step_count == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * scale_of(n, k) * seen[n])
    # the closure passed by keyword goes the same way
    modulator.detach()
    modulator.attach(opt)
    opt.step(closure=closure)
    assert modulator.step_count == 2


def test_lbfgs_acts_after_each_closure_evaluation() -> None:
    model = Net()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    modulator = ogm(model)
    modulator.attach(opt)
    xa, xv, y = batches(1)[0]
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        logits, feats = model(xa, xv)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        modulator.observe(unimodal_logits(model.head, feats), y)
        return loss

    opt.step(closure)
    assert evaluations > 1 and modulator.step_count == evaluations


# ---------------------------------------------------------------------------- order and scaler


class Spy(OptimizerAttachable):
    """Records the gradients it sees when the optimizer runs its action."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: list[dict[str, Tensor]] = []

    def _before_optimizer_step(self) -> None:
        self.seen.append(grads(self.model))

    def _attached_parameters(self) -> list[tuple[str, Tensor]]:
        return [("all", p) for p in self.model.parameters()]


def clip_factor(g: dict[str, Tensor], max_norm: float) -> float:
    """``clip_grad_norm_``'s documented factor ``min(1, max_norm / (total_norm + 1e-6))``."""
    total = math.sqrt(sum(float(t.double().square().sum()) for t in g.values()))
    return min(1.0, max_norm / (total + 1e-6))


def test_grad_scaler_unscales_first_and_skips_the_action_with_the_step() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = Spy(model)
    spy.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    xa, xv, y = batches(1)[0]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(xa, xv)[0], y)).backward()
    scaled = grads(model)
    scaler.step(opt)
    scaler.update()
    assert len(spy.seen) == 1
    for n, g in spy.seen[0].items():  # the action saw the unscaled gradient
        torch.testing.assert_close(g, scaled[n] / 1024.0)
    # an overflow: the scaler skips opt.step(), and with it the action
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(xa, xv)[0], y)).backward()
    model.head.weight.grad[0, 0] = math.inf
    before = params(model)
    scaler.step(opt)
    scaler.update()
    assert len(spy.seen) == 1
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_a_skipped_step_carries_its_batches_over_to_the_next_real_step() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modulator = ogm(model)
    modulator.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    (xa, xv, y), (xa2, xv2, y2) = batches(2)
    k = k_by_hand(model, [(xa, xv, y), (xa2, xv2, y2)])  # both steps' batches, same model
    opt.zero_grad()
    feats = model(xa, xv)[1]
    scaler.scale(F.cross_entropy(model.head(torch.cat(list(feats.values()), 1)), y)).backward()
    modulator.observe(unimodal_logits(model.head, feats), y)
    model.audio.weight.grad[0, 0] = math.nan
    scaler.step(opt)  # skipped: no update, no action, the counter counts real updates
    scaler.update()
    assert modulator.step_count == 0 and modulator.last is None
    opt.zero_grad()
    feats = backward(model, xa2, xv2, y2)
    modulator.observe(unimodal_logits(model.head, feats), y2)
    scaler.step(opt)
    assert modulator.step_count == 1 and int(modulator.last.num_samples) == 12
    torch.testing.assert_close(modulator.last.coefficients, torch.tensor(k), rtol=1e-5, atol=0)


def test_attached_ogm_acts_after_clipping_explicit_step_before() -> None:
    """Attached: ``g <- k clip(g)``; the explicit ``step()`` before clipping: ``clip(k g)``."""
    xa, xv, y = batches(1)[0]
    max_norm = 0.05
    results = {}
    for order in ("attached", "explicit"):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        modulator = ogm(model)
        k = k_by_hand(model, [(xa, xv, y)])
        feats = backward(model, xa, xv, y)
        g = grads(model)
        modulator.observe(unimodal_logits(model.head, feats), y)
        if order == "attached":
            modulator.attach(opt)
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            expected = {n: clip_factor(g, max_norm) * scale_of(n, k) * t for n, t in g.items()}
        else:
            modulator.step()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            kg = {n: scale_of(n, k) * t for n, t in g.items()}
            expected = {n: clip_factor(kg, max_norm) * t for n, t in kg.items()}
        before = params(model)
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-5, atol=1e-7)
        results[order] = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    # and the two orders really differ (clipping active): the head's step is larger in the
    # explicit order (the clip factor grows as k shrinks the norm), equal to the clipped one
    # attached
    assert clip_factor(g, max_norm) < 1.0
    assert results["explicit"]["head.weight"].norm() > results["attached"]["head.weight"].norm()


def test_attached_agm_scales_the_clipped_gradient_by_k() -> None:
    xa, xv, y = batches(1)[0]
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agm = AdaptiveGradientModulator(
        model.head, alpha=1.0, encoders={"audio": model.audio, "visual": model.visual}
    )
    agm.attach(opt)
    # step 0 sets the running reference (k = 1); step 1 is the one checked
    for step in range(2):
        opt.zero_grad()
        logits, feats = model(xa + step, xv)
        agm(feats, y)
        F.cross_entropy(logits, y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        clipped, before = grads(model), params(model)
        opt.step()
    k = agm.last.coefficients
    assert agm.steps == 2 and not torch.allclose(k, torch.ones(2))
    for n, p in model.named_parameters():
        factor = float(k[0]) if n.startswith("audio") else float(k[1]) if "visual" in n else 1.0
        torch.testing.assert_close(before[n] - p.detach(), factor * clipped[n])


def test_attached_agm_equals_explicit_step_under_accumulation() -> None:
    data = batches(4)
    out = []
    for attached in (True, False):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        agm = AdaptiveGradientModulator(
            model.head, alpha=1.0, encoders={"audio": model.audio, "visual": model.visual}
        )
        if attached:
            agm.attach(opt)
        for first in (0, 2):
            opt.zero_grad()
            for xa, xv, y in data[first : first + 2]:
                logits, feats = model(xa, xv)
                agm(feats, y)
                (0.5 * F.cross_entropy(logits, y)).backward()
            if not attached:
                agm.step()
            opt.step()
        assert agm.steps == 2
        out.append(params(model))
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], rtol=0, atol=0)


# ---------------------------------------------------------------------------- wrappers, compile


def test_accelerated_optimizer_is_unwrapped_and_acts_on_sync_steps_only() -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    model, wrapped = accelerator.prepare(model, inner)
    assert wrapped is not inner and unwrap_optimizer(wrapped) is inner
    modulator = ogm(model)
    modulator.attach(wrapped)
    assert modulator.attached_optimizer is inner
    for xa, xv, y in batches(4):
        with accelerator.accumulate(model):
            logits, feats = model(xa, xv)
            accelerator.backward(F.cross_entropy(logits, y))
            modulator.observe(unimodal_logits(model.head, feats), y)
            wrapped.step()  # a no-op for the inner optimizer on the first micro-batch
            wrapped.zero_grad()
    assert modulator.step_count == 2 and int(modulator.last.num_samples) == 12


def test_lightning_optimizer_is_unwrapped() -> None:
    pytest.importorskip("lightning")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = LightningOptimizer(inner)
    modulator = ogm(model)
    modulator.attach(wrapped)
    assert modulator.attached_optimizer is inner
    xa, xv, y = batches(1)[0]
    feats = backward(model, xa, xv, y)
    modulator.observe(unimodal_logits(model.head, feats), y)
    inner.step()
    assert modulator.step_count == 1


def _attached_eager_and_compiled_agree(steps: int, **compile_options: str) -> None:
    """The same attached-modulator run on the eager and the ``torch.compile``d model (observe
    outside the compiled graph): one step per ``opt.step()``, the same parameters after."""
    data = batches(steps)
    out = []
    for compiled in (False, True):
        model = Net()
        run = torch.compile(model, **compile_options) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        modulator = ogm(model)
        modulator.attach(opt)
        for xa, xv, y in data:
            opt.zero_grad()
            logits, feats = run(xa, xv)
            F.cross_entropy(logits, y).backward()
            modulator.observe(unimodal_logits(model.head, feats), y)
            opt.step()
        assert modulator.step_count == steps
        out.append(params(model))
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_attached_equals_eager() -> None:
    """``torch.compile`` (inductor on CPU) of the model."""
    _attached_eager_and_compiled_agree(3)


def test_compiled_model_attached_equals_eager_aot_eager() -> None:
    """The default run's ``torch.compile`` check: the graph capture without a C++ build."""
    _attached_eager_and_compiled_agree(2, backend="aot_eager")


def test_attached_arl_equals_explicit_step_and_acts_after_clipping() -> None:
    """ARL in encoders mode: attached == explicit ``step()`` without clipping; with clipping the
    attached step scales the clipped encoder gradients by ``1 + beta_m``."""
    data = batches(4)
    out = []
    for attached in (True, False):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        arl = ARLLoss(head=model.head, encoders={"audio": model.audio, "visual": model.visual})
        if attached:
            arl.attach(opt)
        for first in (0, 2):
            opt.zero_grad()
            for xa, xv, y in data[first : first + 2]:
                logits, feats = model(xa, xv)
                (0.5 * arl(logits, y, feats)).backward()
            if not attached:
                arl.step()
            opt.step()
        assert arl.steps == 2
        out.append(params(model))
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], rtol=0, atol=0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    arl = ARLLoss(head=model.head, encoders={"audio": model.audio, "visual": model.visual})
    arl.attach(opt)
    xa, xv, y = data[0]
    logits, feats = model(xa, xv)
    arl(logits, y, feats).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    clipped, before = grads(model), params(model)
    opt.step()
    beta = arl.last.coefficients
    for n, p in model.named_parameters():
        m = 0 if n.startswith("audio") else 1 if n.startswith("visual") else None
        factor = 1.0 if m is None else 1.0 + float(beta[m])
        torch.testing.assert_close(before[n] - p.detach(), factor * clipped[n])


def test_docs_page_runs_as_written(tmp_path: Path) -> None:
    ns = run_page("attaching.md", tmp_path)
    assert ns["modulator"].step_count == 8 and ns["modulator"].attached_optimizer is None
    assert int(ns["modulator"].last.num_samples) == 8


def test_real_lightning_fit_with_closure_and_accumulation() -> None:
    """Lightning's default ``optimizer.step(closure=...)``: the action follows the closure."""
    pl = pytest.importorskip("lightning.pytorch")
    data = batches(8, batch=4)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()
            self.modulator = ogm(self.net)
            self.samples: list[int] = []

        def training_step(self, batch: list[Tensor], index: int) -> Tensor:
            xa, xv, y = batch
            logits, feats = self.net(xa, xv)
            self.modulator.observe(unimodal_logits(self.net.head, feats), y)
            return F.cross_entropy(logits, y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_fit_start(self) -> None:
            self.modulator.attach(self.trainer.optimizers[0])

        def on_train_batch_end(self, *args: object) -> None:
            if self.modulator.last is not None:
                self.samples.append(int(self.modulator.last.num_samples))

    module = Module()
    loader = torch.utils.data.DataLoader(
        [(xa[i], xv[i], y[i]) for xa, xv, y in data for i in range(4)], batch_size=4
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 4 and module.modulator.step_count == 4
    assert set(module.samples) == {8}  # every decision pooled both micro-batches
