"""One definition of the saved-state cases, shared by the writer and the test.

``tests/data/make_saved_states.py`` builds each case, trains it a few steps, saves the method's
``state_dict()``, the inputs of the next step and what the uninterrupted object decided on that
step into ``tests/data/saved_states_0_1_0.pt``. ``tests/test_saved_states.py`` builds the same
case afresh, loads the saved state and replays the saved next step.

Every constructor option is passed explicitly (a default may change; a saved state must still
resume the run it was saved from), and only the package root is imported, so that the cases
outlive a move of the modules into subpackages.

A case's model is a tiny late-fusion classifier: one ``Linear`` encoder per modality and one
``Linear`` fusion head on the concatenated features. Its parameters (and any ``.grad`` pending
from an unfinished gradient accumulation) are saved with the state: they are the user's, not
the method's, and the resumed run gets them from the user's own checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalance_losses import (
    AdaptiveGradientModulator,
    ARLLoss,
    GradientBlending,
    ImbalanceMonitor,
    MMPareto,
    ModalityGradientModulator,
    ModalityPredictionModulator,
    PMRLoss,
    SustainedBoostingLoss,
    unimodal_logits,
)

NUM_CLASSES = 3
BATCH = 6
HIDDEN = 4  # encoder output width
TWO = {"audio": 5, "visual": 7}  # modality -> input width
THREE = {"audio": 5, "visual": 7, "text": 3}


class Tiny(nn.Module):
    """Late fusion: ``head(cat_m encoder_m(x_m))``."""

    def __init__(self, widths: Mapping[str, int], seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoders = nn.ModuleDict({m: nn.Linear(d, HIDDEN) for m, d in widths.items()})
            self.head = nn.Linear(HIDDEN * len(widths), NUM_CLASSES)

    def features(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.encoders[m](x[m]) for m in self.encoders}

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat(list(feats.values()), dim=1))


def make_batch(widths: Mapping[str, int], gen: torch.Generator) -> dict[str, Any]:
    """Inputs ``{"x": {m: [B, d_m]}, "y": [B]}`` drawn from ``gen``."""
    x = {m: torch.randn(BATCH, d, generator=gen) for m, d in widths.items()}
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    return {"x": x, "y": y}


def grads(*modules: nn.Module) -> dict[str, Tensor | None]:
    """``.grad`` of every parameter, by name (cloned; ``None`` where there is none)."""
    out: dict[str, Tensor | None] = {}
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            out[f"{i}.{name}"] = None if p.grad is None else p.grad.detach().clone()
    return out


def zero_grad(*modules: nn.Module) -> None:
    for module in modules:
        module.zero_grad(set_to_none=True)


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """The user's side of a checkpoint: parameters and pending ``.grad``."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
    }


def load_model_snapshot(model: nn.Module, snapshot: Mapping[str, Any]) -> None:
    model.load_state_dict(snapshot["params"])
    for name, p in model.named_parameters():
        g = snapshot["grads"][name]
        p.grad = None if g is None else g.clone()


def as_plain(value: Any) -> Any:
    """Records (dataclasses) to dicts, tuples to lists, tensors detached and cloned."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [as_plain(v) for v in value]
    return value


@dataclasses.dataclass
class Case:
    """A stateful object, the model it works on and its training loop, split at a step."""

    obj: Any
    """The method object whose ``state_dict()`` is saved."""
    model: Tiny
    widths: Mapping[str, int]
    train: Callable[[torch.Generator], None]
    """The steps before the save (leaving any unfinished accumulation pending)."""
    next_inputs: Callable[[torch.Generator], dict[str, Any]]
    """Draws the inputs of the next step."""
    next_step: Callable[[dict[str, Any]], dict[str, Any]]
    """Runs the next step on those inputs; returns what the object decided."""


# ---------------------------------------------------------------------------------------- cases


def arl_hooks() -> Case:
    """Hook mode: EMA statistics, step count past warm-up, ``last``."""
    model = Tiny(TWO, seed=1)
    arl = ARLLoss(
        None,
        reduction="mean",
        head=model.head,
        gamma=0.5,
        temperature=4.0,
        warmup_steps=2,
        floor=0.25,
        momentum=0.7,
        encoders=None,
        process_group=None,
    )

    def one(batch: dict[str, Any]) -> Tensor:
        feats = model.features(batch["x"])
        loss = arl(model.fuse(feats), batch["y"], feats)
        loss.backward()
        return loss

    def train(gen: torch.Generator) -> None:
        for _ in range(3):
            one(make_batch(TWO, gen))
            zero_grad(model)

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        loss = one(inputs)
        return {"loss": loss, "grads": grads(model), "steps": arl.steps, "last": arl.last}

    return Case(arl, model, TWO, train, lambda g: make_batch(TWO, g), next_step)


def arl_encoders() -> Case:
    """Encoders mode, three modalities, saved in the middle of a two-micro-batch step."""
    model = Tiny(THREE, seed=2)
    arl = ARLLoss(
        None,
        reduction="sum",
        head=model.head,
        gamma=1.0,
        temperature=8.0,
        warmup_steps=1,
        floor=0.15,
        momentum=0.5,
        encoders=dict(model.encoders.items()),
        process_group=None,
    )

    def micro(batch: dict[str, Any]) -> Tensor:
        feats = model.features(batch["x"])
        loss = arl(model.fuse(feats), batch["y"], feats)
        loss.backward()
        return loss

    def train(gen: torch.Generator) -> None:
        for _ in range(2):
            micro(make_batch(THREE, gen))
            micro(make_batch(THREE, gen))
            arl.step()
            zero_grad(model)
        micro(make_batch(THREE, gen))  # first micro-batch of step 3: pending sums

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        loss = micro(inputs)
        record = arl.step()
        return {"loss": loss, "record": record, "grads": grads(model), "steps": arl.steps,
                "last": arl.last}  # fmt: skip

    return Case(arl, model, THREE, train, lambda g: make_batch(THREE, g), next_step)


def boosting() -> Case:
    """A head added at the first check, generator advanced, scores pooled towards the next."""
    model = Tiny(TWO, seed=3)
    boost = SustainedBoostingLoss(
        NUM_CLASSES,
        {m: HIDDEN for m in TWO},
        check_every=3,
        first_check=1,
        hidden=8,
        lam=0.4,
        sigma=1.0,
        tau=0.0,
        max_heads=3,
        fusion_weights=[0.6, 0.4],
        reduction="mean",
        ignore_index=-100,
        output_layer=None,
        seed=7,
        process_group=None,
    )
    optimizer = torch.optim.SGD([*model.parameters(), *boost.parameters()], lr=0.1, momentum=0.0)
    boost.attach_optimizer(optimizer)

    def one(batch: dict[str, Any]) -> Tensor:
        feats = model.features(batch["x"])
        loss = boost(feats, batch["y"])
        loss.backward()
        return loss

    def train(gen: torch.Generator) -> None:
        # step 1 pools; step 2 runs the first check (a head is added), then steps 2-4 pool
        for _ in range(4):
            one(make_batch(TWO, gen))
            optimizer.step()
            zero_grad(model, boost)

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        loss = one(inputs)  # the check due at this step runs first
        feats = model.features(inputs["x"])
        return {"loss": loss, "grads": grads(model, boost), "num_heads": boost.num_heads,
                "head_counts": boost.head_counts, "predict": boost.predict(feats),
                "last": boost.last}  # fmt: skip

    return Case(boost, model, TWO, train, lambda g: make_batch(TWO, g), next_step)


def ogm_ge() -> Case:
    """OGM-GE: generator advanced by two noisy steps, one micro-batch observed but not stepped."""
    model = Tiny(THREE, seed=4)
    ogm = ModalityGradientModulator(
        dict(model.encoders.items()),
        0.8,
        method="ogm_ge",
        coefficient="paper",
        parameters="all",
        shared="error",
        start_step=1,
        stop_step=None,
        max_ratio=50.0,
        ignore_index=-100,
        seed=5,
        process_group=None,
    )

    def micro(batch: dict[str, Any]) -> None:
        feats = model.features(batch["x"])
        F.cross_entropy(model.fuse(feats), batch["y"]).backward()
        ogm.observe(unimodal_logits(model.head, feats), batch["y"])

    def train(gen: torch.Generator) -> None:
        for _ in range(3):
            micro(make_batch(THREE, gen))
            micro(make_batch(THREE, gen))
            ogm.step()
            zero_grad(model)
        micro(make_batch(THREE, gen))  # observed, not stepped

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        micro(inputs)
        k = ogm.step()
        return {"k": k, "grads": grads(model), "step_count": ogm.step_count, "last": ogm.last}

    return Case(ogm, model, THREE, train, lambda g: make_batch(THREE, g), next_step)


def pmr() -> Case:
    """Prototypes blended twice (momentum), epoch 1, class sums pending for the next update."""
    model = Tiny(TWO, seed=6)
    loss_fn = PMRLoss(
        NUM_CLASSES,
        {m: HIDDEN for m in TWO},
        None,
        alpha=1.0,
        mu=0.1,
        entropy_epochs=2,
        momentum=0.3,
        coefficient="graded",
        modulation=(0, None),
        ignore_index=-100,
        process_group=None,
    )

    def one(batch: dict[str, Any]) -> Tensor:
        feats = model.features(batch["x"])
        loss = loss_fn(model.fuse(feats), batch["y"], feats)
        loss.backward()
        return loss

    def feats_of(batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        with torch.no_grad():
            return model.features(batch["x"]), batch["y"]

    def train(gen: torch.Generator) -> None:
        for epoch in range(2):
            loss_fn.update_prototypes([feats_of(make_batch(TWO, gen)) for _ in range(2)])
            loss_fn.set_epoch(epoch)
            for _ in range(2):
                one(make_batch(TWO, gen))
                zero_grad(model)
        loss_fn.accumulate_prototypes(*feats_of(make_batch(TWO, gen)))  # pending class sums

    def next_inputs(gen: torch.Generator) -> dict[str, Any]:
        return {"step": make_batch(TWO, gen), "prototypes": make_batch(TWO, gen)}

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        loss = one(inputs["step"])
        loss_fn.accumulate_prototypes(*feats_of(inputs["prototypes"]))
        present = loss_fn.compute_prototypes()
        return {"loss": loss, "grads": grads(model), "steps": loss_fn.steps,
                "last": loss_fn.last, "present": present, "prototypes": loss_fn.prototypes,
                "known": loss_fn.known, "updates": loss_fn.updates}  # fmt: skip

    return Case(loss_fn, model, TWO, train, next_inputs, next_step)


def _branch_losses(gen: torch.Generator, branches: tuple[str, ...]) -> dict[str, Tensor]:
    return {b: torch.rand((), generator=gen, dtype=torch.float64) + 0.5 for b in branches}


def blending() -> Case:
    """Weights from two windows, the current window's start losses held."""
    model = Tiny(TWO, seed=7)
    blend = GradientBlending(
        head=model.head,
        modalities=["audio", "visual"],
        initial_weights={"audio": 0.2, "visual": 0.3, "fused": 0.5},
        fused="fused",
        eps=1e-8,
        reduction="mean",
        ignore_index=-100,
        label_smoothing=0.1,
        process_group=None,
    )
    branches = ("audio", "visual", "fused")

    def one(batch: dict[str, Any]) -> Tensor:
        feats = model.features(batch["x"])
        loss = blend(model.fuse(feats), batch["y"], feats)
        loss.backward()
        return loss

    def train(gen: torch.Generator) -> None:
        for _ in range(3):  # three window boundaries: two windows of weights
            one(make_batch(TWO, gen))
            zero_grad(model)
            blend.update(_branch_losses(gen, branches), _branch_losses(gen, branches))

    def next_inputs(gen: torch.Generator) -> dict[str, Any]:
        return {"step": make_batch(TWO, gen), "train_losses": _branch_losses(gen, branches),
                "val_losses": _branch_losses(gen, branches)}  # fmt: skip

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        loss = one(inputs["step"])
        before = grads(model)
        record = blend.update(inputs["train_losses"], inputs["val_losses"])
        return {"loss": loss, "grads": before, "record": record, "weights": blend.weights,
                "last": blend.last}  # fmt: skip

    return Case(blend, model, TWO, train, next_inputs, next_step)


def mmpareto() -> Case:
    """MMPareto keeps only its settings and step count."""
    model = Tiny(TWO, seed=8)
    pareto = MMPareto(
        dict(model.encoders.items()),
        gamma=1.5,
        rescale="code",
        shared="error",
        process_group=None,
    )

    def one(batch: dict[str, Any]) -> Any:
        feats = model.features(batch["x"])
        fused = F.cross_entropy(model.fuse(feats), batch["y"])
        uni = {
            m: F.cross_entropy(z, batch["y"]) for m, z in unimodal_logits(model.head, feats).items()
        }
        return pareto.backward(fused, uni)

    def train(gen: torch.Generator) -> None:
        for _ in range(2):
            one(make_batch(TWO, gen))
            zero_grad(model)

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        record = one(inputs)
        return {"record": record, "grads": grads(model), "steps": pareto.steps,
                "last": pareto.last}  # fmt: skip

    return Case(pareto, model, TWO, train, lambda g: make_batch(TWO, g), next_step)


def agm() -> Case:
    """AGM in encoders mode, three modalities: running means, pending sums of one micro-batch."""
    model = Tiny(THREE, seed=9)
    mod = AdaptiveGradientModulator(
        model.head,
        alpha=0.5,
        momentum=0.8,
        warmup_steps=1,
        cap=5.0,
        ignore_index=-100,
        encoders=dict(model.encoders.items()),
        process_group=None,
    )

    def micro(batch: dict[str, Any]) -> Tensor:
        feats = mod(model.features(batch["x"]), batch["y"])
        loss = F.cross_entropy(model.fuse(feats), batch["y"])
        loss.backward()
        return loss

    def train(gen: torch.Generator) -> None:
        for _ in range(3):
            micro(make_batch(THREE, gen))
            micro(make_batch(THREE, gen))
            mod.step()
            zero_grad(model)
        micro(make_batch(THREE, gen))  # pending

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        loss = micro(inputs)
        record = mod.step()
        return {"loss": loss, "record": record, "grads": grads(model), "steps": mod.steps,
                "last": mod.last}  # fmt: skip

    return Case(mod, model, THREE, train, lambda g: make_batch(THREE, g), next_step)


def opm() -> Case:
    """OPM: the step counter drives the re-seeded generator."""
    model = Tiny(TWO, seed=10)
    drop = ModalityPredictionModulator(
        ["audio", "visual"],
        head=model.head,
        q_base=0.5,
        lam=0.5,
        p_exe=0.9,
        warmup_steps=1,
        max_ratio=100.0,
        ignore_index=-100,
        seed=11,
        process_group=None,
    )

    def one(batch: dict[str, Any]) -> Any:
        out = drop(model.features(batch["x"]), batch["y"])
        loss = F.cross_entropy(model.fuse(out.features), batch["y"])
        loss.backward()
        return out, loss

    def train(gen: torch.Generator) -> None:
        for _ in range(3):
            one(make_batch(TWO, gen))
            zero_grad(model)

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        out, loss = one(inputs)
        return {"features": out.features, "keep": out.keep, "loss": loss, "grads": grads(model),
                "step_count": drop.step_count, "last": drop.last}  # fmt: skip

    return Case(drop, model, TWO, train, lambda g: make_batch(TWO, g), next_step)


def monitor() -> Case:
    """Monitor mid-window: pooled sums and gradient norms of two steps."""
    model = Tiny(THREE, seed=12)
    mon = ImbalanceMonitor(
        ["audio", "visual", "text"],
        head=model.head,
        encoders=dict(model.encoders.items()),
        ignore_index=-100,
        max_ratio=100.0,
        process_group=None,
    )

    def one(batch: dict[str, Any]) -> None:
        feats = model.features(batch["x"])
        mon.update(feats, batch["y"])
        F.cross_entropy(model.fuse(feats), batch["y"]).backward()
        mon.observe_gradients()

    def train(gen: torch.Generator) -> None:
        for _ in range(2):
            one(make_batch(THREE, gen))
            zero_grad(model)

    def next_step(inputs: dict[str, Any]) -> dict[str, Any]:
        one(inputs)
        return {"compute": mon.compute()}

    return Case(mon, model, THREE, train, lambda g: make_batch(THREE, g), next_step)


CASES: dict[str, Callable[[], Case]] = {
    "ARLLoss/hooks": arl_hooks,
    "ARLLoss/encoders": arl_encoders,
    "SustainedBoostingLoss": boosting,
    "ModalityGradientModulator/ogm_ge": ogm_ge,
    "PMRLoss": pmr,
    "GradientBlending": blending,
    "MMPareto": mmpareto,
    "AdaptiveGradientModulator/encoders": agm,
    "ModalityPredictionModulator": opm,
    "ImbalanceMonitor": monitor,
}
"""Saved-file key -> builder; each builder builds the same object from scratch every time."""
