"""Bad input, everywhere: one table over every public entry point and every kind of mistake.

Each row is one call with one mistake and what it must do: raise a clear ``ValueError`` /
``TypeError`` whose message names the modality (or argument) and the shapes, warn, or follow a
documented behaviour. Never a raw torch error, a silent NaN or a hang.

``docs/bad_input.md`` is rendered from this table (``python -m tests.test_bad_input``), and a
test keeps the two identical.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from imbalance_losses import (
    AdaptiveGradientModulator,
    ARLLoss,
    GradientBlending,
    MMPareto,
    ModalityGradientModulator,
    ModalityPredictionModulator,
    PMRLoss,
    SustainedBoostingLoss,
    unimodal_logits,
)

B, C = 4, 3
WIDTHS = {"a": 3, "v": 2, "t": 1}
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"


def feats(**change: Any) -> dict[str, Tensor]:
    """Good features ``{a: [4, 3], v: [4, 2], t: [4, 1]}``, with some entries replaced/removed."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, Tensor] = {m: torch.randn(B, d, generator=g) for m, d in WIDTHS.items()}
    for name, value in change.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def logits(**change: Any) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {m: torch.randn(B, C, generator=g) for m in WIDTHS}
    for name, value in change.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def target() -> Tensor:
    return torch.tensor([0, 1, 2, 1])


def nan_at(shape: tuple[int, ...], value: float = float("nan")) -> Tensor:
    x = torch.randn(*shape)
    x[-1, -1] = value
    return x


def head() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(sum(WIDTHS.values()), C)


def fused(f: dict[str, Tensor]) -> Tensor:
    return head()(torch.cat(list(f.values()), 1))


# -- the entry points, each a function of (features or logits, target) -----------------------


def call_unimodal(f: Any, y: Tensor) -> Any:
    return unimodal_logits(head(), f)


def call_arl(f: Any, y: Tensor, *, train: bool = True) -> Tensor:
    arl = ARLLoss(head=head())
    arl.train(train)
    if isinstance(f, dict):  # the tensors a model fused carry gradients
        f = {m: x.requires_grad_() if x.is_floating_point() else x for m, x in f.items()}
    z = torch.zeros(y.shape[0] if y.dim() else 0, C)
    return arl(z, y, f)


def call_boost(f: Any, y: Tensor, *, train: bool = True) -> Tensor:
    boost = SustainedBoostingLoss(C, WIDTHS, hidden=4, check_every=10)
    boost.train(train)
    return boost(f, y)


def encoders() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({m: nn.Linear(2, d) for m, d in WIDTHS.items()})


def call_modulator(z: Any, y: Tensor) -> Tensor:
    enc = encoders()
    for p in enc.parameters():
        p.grad = torch.ones_like(p)
    return ModalityGradientModulator(dict(enc.items()), alpha=0.5, method="ogm").step(z, y)


def call_pmr(f: Any, y: Tensor, *, train: bool = True) -> Tensor:
    pmr = PMRLoss(C, WIDTHS)
    pmr.update_prototypes([(feats(), target())])
    pmr.train(train)
    return pmr(torch.zeros(y.shape[0] if y.dim() else 0, C), y, f)


def call_blend(f: Any, y: Tensor) -> Tensor:
    blend = GradientBlending(head=head(), modalities=list(WIDTHS))
    return blend(torch.zeros(y.shape[0] if y.dim() else 0, C), y, features=f)


def arl_twice_same_features() -> Tensor:
    arl = ARLLoss(head=head())
    f = {m: x.requires_grad_() for m, x in feats().items()}
    arl(fused(f), target(), f)  # a logging call, then the real one: one step, one hook
    loss = arl(fused(f), target(), f)
    assert arl.steps == 1
    return loss


def arl_under_no_grad() -> Tensor:
    with torch.no_grad():
        return call_arl(feats(), target())


def arl_detached_features() -> Tensor:
    arl = ARLLoss(head=head())
    return arl(torch.zeros(B, C), target(), feats())


def arl_step_twice() -> object:
    enc = encoders()
    arl = ARLLoss(head=head(), encoders=dict(enc.items()))
    f = {m: enc[m](torch.randn(B, 2)) for m in WIDTHS}
    arl(fused(f), target(), f).backward()
    arl.step()
    return arl.step()


def modulator_with(enc: nn.ModuleDict, **kwargs: Any) -> ModalityGradientModulator:
    return ModalityGradientModulator(dict(enc.items()), alpha=0.5, method="ogm", **kwargs)


def shared_trunk(**kwargs: Any) -> Tensor:
    enc = encoders()
    trunk = nn.Linear(2, 2)
    modules = nn.ModuleDict({m: nn.Sequential(trunk, enc[m]) for m in WIDTHS})
    for p in modules.parameters():
        p.grad = torch.ones_like(p)
    return modulator_with(modules, **kwargs).step(logits(), target())


def modulator_no_grads() -> Tensor:
    return modulator_with(encoders()).step(logits(), target())


def modulator_step_twice() -> Tensor:
    enc = encoders()
    for p in enc.parameters():
        p.grad = torch.ones_like(p)
    mod = modulator_with(enc)
    mod.step(logits(), target())
    return mod.step(logits(), target())


def call_agm(f: Any, y: Tensor, *, train: bool = True) -> Any:
    agm = AdaptiveGradientModulator(head())
    agm.train(train)
    return agm(f, y)


def call_opm(f: Any, y: Tensor, *, train: bool = True) -> Any:
    opm = ModalityPredictionModulator(list(WIDTHS), head=head())
    opm.train(train)
    return opm(f, y).features


def call_mmpareto(losses: Any) -> object:
    enc = encoders()
    f = {m: enc[m](torch.randn(B, 2)) for m in WIDTHS}
    fused_loss = nn.functional.cross_entropy(fused(f), target())
    return MMPareto(dict(enc.items())).backward(fused_loss, losses(f))


def blend_reordered() -> Tensor:
    blend = GradientBlending(head=head(), modalities=list(WIDTHS))
    f = dict(reversed(list(feats().items())))
    return blend(torch.zeros(B, C), target(), features=f)


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    entry: str
    case: str
    call: Callable[[], object]
    expect: str  # "ValueError", "TypeError", "RuntimeError", "RuntimeWarning", "ok"
    match: str = ""  # regex the message must match (raise / warn), or "" for "ok"
    behaviour: str = ""  # what "ok" means, for the docs


def _rows() -> list[Row]:
    y = target()
    rows: list[Row] = []

    def add(
        entry: str,
        case: str,
        call: Callable[[], object],
        expect: str,
        match: str = "",
        behaviour: str = "",
    ) -> None:
        rows.append(Row(entry, case, call, expect, match, behaviour))

    # unimodal_logits(head, features) with a concat nn.Linear head
    u = "unimodal_logits"
    add(
        u,
        "wrong width",
        lambda: call_unimodal(feats(a=torch.randn(B, 4)), y),
        "ValueError",
        r"in_features=6.*a: \(4, 4\)",
    )
    add(
        u,
        "missing modality",
        lambda: call_unimodal(feats(t=None), y),
        "ValueError",
        r"in_features=6.*give 5 \(a: \(4, 3\), v: \(4, 2\)\)",
    )
    add(
        u,
        "differing batch sizes",
        lambda: call_unimodal(feats(v=torch.randn(3, 2)), y),
        "ValueError",
        r"features\['v'\] has shape \(3, 2\) \(batch 3\)",
    )
    add(
        u,
        "one modality",
        lambda: call_unimodal({"a": torch.randn(B, 6)}, y),
        "ValueError",
        r"at least two modalities",
    )
    add(
        u,
        "integer features",
        lambda: call_unimodal(feats(v=torch.ones(B, 2, dtype=torch.long)), y),
        "TypeError",
        r"features\['v'\] of shape \(4, 2\) are torch.int64",
    )
    add(
        u,
        "float64 features with an fp32 head",
        lambda: call_unimodal(feats(v=torch.randn(B, 2, dtype=torch.float64)), y),
        "TypeError",
        r"features\['v'\] of shape \(4, 2\) are torch.float64 but .* torch.float32",
    )
    add(
        u,
        "mapping passed as a list",
        lambda: call_unimodal(list(feats().values()), y),
        "TypeError",
        r"must be a mapping",
    )
    add(
        u,
        "B = 0",
        lambda: call_unimodal(feats(**{m: torch.zeros(0, d) for m, d in WIDTHS.items()}), y),
        "ok",
        behaviour="empty logits `[0, C]` per modality",
    )

    # ARLLoss(head=...)(logits, target, features)
    a = "ARLLoss"
    add(
        a,
        "wrong width",
        lambda: call_arl(feats(a=torch.randn(B, 4)), y),
        "ValueError",
        r"in_features=6.*a: \(4, 4\)",
    )
    add(
        a,
        "differing batch sizes",
        lambda: call_arl(feats(v=torch.randn(3, 2)), y),
        "ValueError",
        r"features\['v'\] has shape \(3, 2\)",
    )
    add(
        a,
        "one modality",
        lambda: call_arl({"a": torch.randn(B, 6)}, y),
        "ValueError",
        r"at least two modalities",
    )
    add(
        a,
        "NaN features",
        lambda: call_arl(feats(v=nan_at((B, 2))), y),
        "ValueError",
        r"\['v'\].*non-finite",
    )
    add(
        a,
        "inf features",
        lambda: call_arl(feats(v=nan_at((B, 2), float("inf"))), y),
        "ValueError",
        r"\['v'\].*non-finite",
    )
    add(a, "float class indices", lambda: call_arl(feats(), y.float()), "ValueError", r"\.long\(\)")
    add(
        a,
        "out-of-range target",
        lambda: call_arl(feats(), torch.tensor([0, 1, 2, 3])),
        "ValueError",
        r"outside \[0, 3\)",
    )
    add(
        a,
        "negative target",
        lambda: call_arl(feats(), torch.tensor([0, 1, -1, 1])),
        "ValueError",
        r"outside \[0, 3\)",
    )
    add(
        a,
        "target = ignore_index (-100)",
        lambda: call_arl(feats(), torch.tensor([0, -100, 2, 1])),
        "ok",
        behaviour="accepted; skipped by the loss and left out of the statistics",
    )
    add(
        a,
        "integer features",
        lambda: call_arl(feats(v=torch.ones(B, 2, dtype=torch.long)), y),
        "TypeError",
        r"features\['v'\] of shape \(4, 2\) are torch.int64",
    )
    add(
        a,
        "3-D features",
        lambda: call_arl(
            feats(a=torch.randn(B, 2, 3), v=torch.randn(B, 2, 2), t=torch.randn(B, 2, 1)), y
        ),
        "ValueError",
        r"shape \[B, C\]",
    )
    add(
        a,
        "mapping passed as a list",
        lambda: call_arl(list(feats().values()), y),
        "TypeError",
        r"must be a mapping",
    )
    add(
        a,
        "eval mode",
        lambda: call_arl(feats(), y, train=False),
        "ok",
        behaviour="the loss only: no statistics, no collective, no state change",
    )

    # SustainedBoostingLoss(...)(features, target)
    s = "SustainedBoostingLoss"
    add(
        s,
        "wrong width",
        lambda: call_boost(feats(a=torch.randn(B, 4)), y),
        "ValueError",
        r"features\['a'\] must have shape \[B, 3\].*\(4, 4\)",
    )
    add(
        s,
        "missing modality",
        lambda: call_boost(feats(t=None), y),
        "ValueError",
        r"missing \['t'\]",
    )
    add(
        s,
        "extra modality",
        lambda: call_boost(feats(x=torch.randn(B, 1)), y),
        "ValueError",
        r"unexpected \['x'\]",
    )
    add(
        s,
        "reordered modalities",
        lambda: call_boost(dict(reversed(list(feats().items()))), y),
        "ValueError",
        r"different order",
    )
    add(
        s,
        "NaN features",
        lambda: call_boost(feats(v=nan_at((B, 2))), y),
        "ValueError",
        r"features\['v'\] contains non-finite",
    )
    add(
        s,
        "one-hot float targets",
        lambda: call_boost(feats(), torch.nn.functional.one_hot(y, C).float()),
        "ok",
        behaviour="soft targets `[B, C]`: accepted",
    )
    add(
        s,
        "one-hot integer targets",
        lambda: call_boost(feats(), torch.nn.functional.one_hot(y, C)),
        "ValueError",
        r"class indices of shape \[B\]",
    )
    add(
        s,
        "soft targets not summing to 1",
        lambda: call_boost(feats(), torch.full((B, C), 0.5)),
        "ValueError",
        r"sum to 1",
    )
    add(
        s,
        "float64 features",
        lambda: call_boost(feats(v=torch.randn(B, 2).double()), y),
        "TypeError",
        r"features\['v'\].*torch.float64 but .*torch.float32",
    )
    add(
        s,
        "mapping passed as a list",
        lambda: call_boost(list(feats().values()), y),
        "TypeError",
        r"must be a mapping",
    )

    # ModalityGradientModulator(...).step(unimodal_logits, target)
    g = "ModalityGradientModulator.step"
    add(
        g,
        "missing modality",
        lambda: call_modulator(logits(t=None), y),
        "ValueError",
        r"missing \['t'\]",
    )
    add(
        g,
        "reordered modalities",
        lambda: call_modulator(dict(reversed(list(logits().items()))), y),
        "ValueError",
        r"different order",
    )
    add(
        g,
        "differing class counts",
        lambda: call_modulator(logits(v=torch.randn(B, 4)), y),
        "ValueError",
        r"\['v'\] has shape \(4, 4\)",
    )
    add(
        g,
        "NaN logits",
        lambda: call_modulator(logits(v=nan_at((B, C))), y),
        "ValueError",
        r"\['v'\] contains non-finite",
    )
    add(
        g,
        "integer logits",
        lambda: call_modulator(logits(v=torch.ones(B, C, dtype=torch.long)), y),
        "TypeError",
        r"\['v'\] of shape \(4, 3\) are torch.int64",
    )
    add(
        g,
        "target batch mismatch",
        lambda: call_modulator(logits(), y[:3]),
        "ValueError",
        r"target has shape \(3,\)",
    )

    # PMRLoss(C, widths)(logits, target, features), prototypes computed
    p = "PMRLoss"
    add(
        p,
        "wrong width",
        lambda: call_pmr(feats(a=torch.randn(B, 4)), y),
        "ValueError",
        r"features\['a'\] must have shape \[B, 3\].*\(4, 4\)",
    )
    add(p, "missing modality", lambda: call_pmr(feats(t=None), y), "ValueError", r"missing \['t'\]")
    add(
        p,
        "differing batch sizes",
        lambda: call_pmr(feats(v=torch.randn(3, 2)), y),
        "ValueError",
        r"features\['v'\] has shape \(3, 2\)",
    )
    add(
        p,
        "NaN features",
        lambda: call_pmr(feats(v=nan_at((B, 2))), y),
        "ValueError",
        r"features\['v'\].*non-finite",
    )
    add(
        p,
        "integer features",
        lambda: call_pmr(feats(v=torch.ones(B, 2, dtype=torch.long)), y),
        "TypeError",
        r"features\['v'\] of shape \(4, 2\) are torch.int64",
    )
    add(
        p,
        "soft targets",
        lambda: call_pmr(feats(), torch.full((B, C), 1 / C)),
        "TypeError",
        r"class-index targets \[B\], got torch.float32 of shape \(4, 3\)",
    )
    add(
        p,
        "out-of-range target",
        lambda: call_pmr(feats(), torch.tensor([0, 1, 2, 3])),
        "ValueError",
        r"outside \[0, 3\)",
    )
    add(
        p,
        "target = ignore_index (-100)",
        lambda: call_pmr(feats(), torch.tensor([0, -100, 2, 1])),
        "ok",
        behaviour="accepted; left out of the prototypes, the losses and the statistics",
    )
    add(
        p,
        "B = 0",
        lambda: call_pmr(
            {m: torch.zeros(0, d) for m, d in WIDTHS.items()}, torch.zeros(0, dtype=torch.long)
        ),
        "ok",
        behaviour="a zero loss; no step, no statistics",
    )
    add(
        p,
        "eval mode",
        lambda: call_pmr(feats(), y, train=False),
        "ok",
        behaviour="the fused criterion only",
    )

    # GradientBlending(head=..., modalities=...)(logits, target, features=...)
    b = "GradientBlending"
    add(
        b,
        "wrong width",
        lambda: call_blend(feats(a=torch.randn(B, 4)), y),
        "ValueError",
        r"in_features=6.*a: \(4, 4\)",
    )
    add(
        b,
        "missing modality",
        lambda: call_blend(feats(t=None), y),
        "ValueError",
        r"in_features=6.*give 5 \(a: \(4, 3\), v: \(4, 2\)\)",
    )
    add(
        b,
        "differing batch sizes",
        lambda: call_blend(feats(v=torch.randn(3, 2)), y),
        "ValueError",
        r"features\['v'\] has shape \(3, 2\)",
    )
    add(
        b,
        "NaN features",
        lambda: call_blend(feats(v=nan_at((B, 2))), y),
        "ValueError",
        r"\['v'\].*non-finite",
    )
    add(
        b,
        "out-of-range target",
        lambda: call_blend(feats(), torch.tensor([0, 1, 2, 3])),
        "ValueError",
        r"outside \[0, 3\)",
    )
    add(
        b,
        "target = ignore_index (-100)",
        lambda: call_blend(feats(), torch.tensor([0, -100, 2, 1])),
        "ok",
        behaviour="accepted; skipped by every branch loss",
    )
    add(
        b,
        "B = 0",
        lambda: call_blend(
            {m: torch.zeros(0, d) for m, d in WIDTHS.items()}, torch.zeros(0, dtype=torch.long)
        ),
        "ok",
        behaviour="a zero loss",
    )
    # the defined behaviours and guards of every module, beyond shapes and dtypes
    empty = {m: torch.zeros(0, d) for m, d in WIDTHS.items()}
    no_target = torch.zeros(0, dtype=torch.long)
    add(
        a,
        "B = 0",
        lambda: call_arl(dict(empty), no_target),
        "ok",
        behaviour="a zero loss with zero gradients; no step counted, no statistics",
    )
    add(
        a,
        "the same features passed twice (a logging call, then the real one)",
        arl_twice_same_features,
        "ok",
        behaviour="one step and one gradient hook, not two",
    )
    add(
        a,
        "training-mode forward under torch.no_grad()",
        arl_under_no_grad,
        "RuntimeWarning",
        r"no_grad",
    )
    add(
        a,
        "detached features (frozen encoders)",
        arl_detached_features,
        "RuntimeWarning",
        r"no feature requires grad",
    )
    add(
        a,
        "step() twice without a forward (encoders mode)",
        arl_step_twice,
        "RuntimeError",
        r"without a training-mode forward",
    )
    add(
        s,
        "B = 0",
        lambda: call_boost(dict(empty), no_target),
        "ok",
        behaviour="a zero loss with zero gradients; not a step (one process)",
    )
    add(
        s,
        "eval mode",
        lambda: call_boost(feats(), y, train=False),
        "ok",
        behaviour="the loss; no scores pooled, no check",
    )
    add(
        s,
        "no check schedule chosen",
        lambda: SustainedBoostingLoss(C, WIDTHS),
        "TypeError",
        r"check_every",
    )
    add(
        g,
        "mapping passed as a list",
        lambda: call_modulator(list(logits().values()), y),
        "TypeError",
        r"must be a mapping",
    )
    add(
        g,
        "B = 0",
        lambda: call_modulator({m: torch.zeros(0, C) for m in WIDTHS}, no_target),
        "ok",
        behaviour="a no-op step: gradients untouched, coefficients ones, not counted",
    )
    add(
        g,
        "target = ignore_index (-100)",
        lambda: call_modulator(logits(), torch.tensor([0, -100, 2, 1])),
        "ok",
        behaviour="accepted; left out of the scores and the sample count",
    )
    add(
        g,
        "frozen encoders (no gradients)",
        modulator_no_grads,
        "RuntimeWarning",
        r"no modulated parameter has a gradient",
    )
    add(
        g,
        "step() twice without a backward",
        modulator_step_twice,
        "RuntimeError",
        r"no backward\(\) in between",
    )
    add(
        "ModalityGradientModulator",
        "parameters shared between modalities",
        shared_trunk,
        "ValueError",
        r"shared",
    )
    add(
        "ModalityGradientModulator",
        "shared parameters with shared='exclude'",
        lambda: shared_trunk(shared="exclude"),
        "ok",
        behaviour="the shared trunk is left unmodulated",
    )
    add(
        u,
        "reordered modalities (widths still add up)",
        lambda: call_unimodal(dict(reversed(list(feats().items()))), y),
        "ok",
        behaviour="not detectable from one call: the mapping order is the concatenation order "
        "(documented); the methods that keep state (ARL, boosting, the modulator, PMR) refuse "
        "a change of order",
    )
    b, ag, op, mp = (
        "GradientBlending",
        "AdaptiveGradientModulator",
        "ModalityPredictionModulator",
        "MMPareto.backward",
    )
    add(
        b,
        "mapping passed as a list",
        lambda: call_blend(list(feats().values()), y),
        "TypeError",
        r"must be a mapping",
    )
    add(
        b,
        "modalities= given as a string",
        lambda: GradientBlending(modalities="audio"),
        "TypeError",
        r"sequence of modality names",
    )
    add(b, "reordered modalities", blend_reordered, "ValueError", r"different order")
    add(
        ag,
        "wrong width",
        lambda: call_agm(feats(a=torch.randn(B, 4)), y),
        "ValueError",
        r"a: \(4, 4\)",
    )
    add(
        ag,
        "NaN features",
        lambda: call_agm(feats(v=nan_at((B, 2))), y),
        "ValueError",
        r"\['v'\].*non-finite",
    )
    add(
        ag,
        "mapping passed as a list",
        lambda: call_agm(list(feats().values()), y),
        "TypeError",
        r"must be a mapping",
    )
    add(
        ag,
        "B = 0",
        lambda: call_agm(dict(empty), no_target),
        "ok",
        behaviour="features returned as they are; no step, no statistics",
    )
    add(
        ag,
        "eval mode",
        lambda: call_agm(feats(), y, train=False),
        "ok",
        behaviour="the identity: features returned, nothing recorded",
    )
    add(
        op, "missing modality", lambda: call_opm(feats(t=None), y), "ValueError", r"missing \['t'\]"
    )
    add(
        op,
        "NaN features",
        lambda: call_opm(feats(v=nan_at((B, 2))), y),
        "ValueError",
        r"\['v'\].*non-finite",
    )
    add(
        op,
        "mapping passed as a list",
        lambda: call_opm(list(feats().values()), y),
        "TypeError",
        r"must be a mapping",
    )
    add(
        op,
        "B = 0",
        lambda: call_opm(dict(empty), no_target),
        "ok",
        behaviour="features returned as they are; no step, no draw",
    )
    add(op, "eval mode", lambda: call_opm(feats(), y, train=False), "ok", behaviour="the identity")
    add(
        mp,
        "a modality's loss missing",
        lambda: call_mmpareto(lambda f: {"a": fused(f).sum(), "v": fused(f).sum()}),
        "ValueError",
        r"missing \['t'\]",
    )
    add(
        mp,
        "a non-scalar loss",
        lambda: call_mmpareto(lambda f: {m: fused(f).sum(1) for m in WIDTHS}),
        "ValueError",
        r"scalar",
    )
    # the methods that act in their call have no step() / attach() (Remedy.no_step)
    for entry, build in (
        (s, lambda: SustainedBoostingLoss(C, WIDTHS, hidden=4, check_every=10)),
        (p, lambda: PMRLoss(C, WIDTHS)),
        (op, lambda: ModalityPredictionModulator(list(WIDTHS), head=head())),
    ):
        add(entry, "step() called", lambda b=build: b().step(), "RuntimeError", r"has no step\(\)")
    return rows


ROWS = _rows()


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.entry}: {r.case}" for r in ROWS])
def test_bad_input_row(row: Row) -> None:
    errors = {"ValueError": ValueError, "TypeError": TypeError, "RuntimeError": RuntimeError}
    if row.expect in errors:
        with pytest.raises(errors[row.expect], match=row.match):
            row.call()
    elif row.expect == "RuntimeWarning":
        with pytest.warns(RuntimeWarning, match=row.match):
            row.call()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "ok" rows neither raise nor warn
            out = row.call()
        values = out.values() if isinstance(out, dict) else [out]
        for v in values:
            assert isinstance(v, Tensor) and torch.isfinite(v).all()


def _message(row: Row) -> str:
    """The message the row's call raises or warns with (what a user reads)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row.call()
        except Exception as err:
            return str(err)
    return str(caught[-1].message)


def markdown() -> str:
    lines = [
        "# Bad input: what every entry point does",
        "",
        "Rendered from `tests/test_bad_input.py` (`python -m tests.test_bad_input > "
        "docs/bad_input.md`), where every row is a test. Fixtures: features "
        "`{a: [4, 3], v: [4, 2], t: [4, 1]}`, a concat `nn.Linear(6, 3)` head, targets `[4]`.",
        "",
        "| entry point | input | what the user gets |",
        "| --- | --- | --- |",
    ]
    entries = list(dict.fromkeys(r.entry for r in ROWS))
    for r in sorted(ROWS, key=lambda r: entries.index(r.entry)):  # grouped, stable
        if r.expect == "ok":
            result = f"defined: {r.behaviour}"
        else:
            message = _message(r).replace("|", "\\|")
            result = f"`{r.expect}`: {message}"
        lines.append(f"| `{r.entry}` | {r.case} | {result} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current() -> None:
    assert DOC.read_text() == markdown(), "run: python -m tests.test_bad_input > docs/bad_input.md"


if __name__ == "__main__":
    sys.stdout.write(markdown())


# --- issue 19: PMR and G-Blending -------------------------------------------------------------
# Constructor arguments are checked at construction, with the parameter named (they used to fail
# at first use, or with a raw unpacking error).


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ignore_index": "x"}, TypeError, r"ignore_index must be an integer, got str 'x'"),
        ({"ignore_index": 2.0}, TypeError, r"ignore_index must be an integer, got float 2\.0"),
        ({"ignore_index": True}, TypeError, r"ignore_index must be an integer, got bool"),
        ({"criterion": "ce"}, TypeError, r"criterion must be a callable loss.*got str 'ce'"),
        ({"modulation": 5}, TypeError, r"modulation must be a \(start, end\) pair.*got int 5"),
        ({"modulation": (1,)}, TypeError, r"modulation must be a \(start, end\) pair.*\(1,\)"),
        ({"modulation": (0, 1, 2)}, TypeError, r"modulation must be a \(start, end\) pair"),
        ({"modulation": "0,5"}, TypeError, r"modulation must be a \(start, end\) pair.*str"),
        ({"modulation": ("a", None)}, TypeError, r"modulation start must be an integer, got str"),
        ({"modulation": (3, 1)}, ValueError, r"modulation end must be an integer >= 3, got 1"),
        ({"modulation": (-1, None)}, ValueError, r"modulation start must be an integer >= 0"),
    ],
)
def test_issue19_pmr_constructor_names_the_bad_parameter(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        PMRLoss(C, WIDTHS, **kwargs)


def test_issue19_pmr_good_constructor_values_still_work() -> None:
    """The new checks refuse nothing that worked: None (no ignored target), lists, callables."""
    pmr = PMRLoss(C, WIDTHS, lambda z, y: z.sum() * 0, ignore_index=None, modulation=[1, 4])
    assert pmr.ignore_index is None and pmr.modulation == (1, 4)
    pmr = PMRLoss(C, WIDTHS, ignore_index=7)
    assert pmr.ignore_index == 7
    assert isinstance(pmr.criterion, nn.CrossEntropyLoss) and pmr.criterion.ignore_index == 7


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("x", r"ignore_index must be an integer, got str 'x'"),
        (2.5, r"ignore_index must be an integer, got float 2\.5"),
        (None, r"ignore_index must be an integer, got NoneType None"),
    ],
)
def test_issue19_blending_ignore_index_is_checked_at_construction(value: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        GradientBlending(head=head(), modalities=list(WIDTHS), ignore_index=value)


def test_issue19_every_target_ignored_is_zero_not_nan() -> None:
    """PMR (training, in the window; and eval) and G-Blending: 0, with zero gradients."""
    ignored = torch.full((B,), -100)
    f = {m: x.requires_grad_() for m, x in feats().items()}
    loss = call_pmr(f, ignored)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(x.grad is not None and not x.grad.any() for x in f.values())
    assert float(call_pmr(feats(), ignored, train=False)) == 0.0  # eval: the criterion alone
    f = {m: x.requires_grad_() for m, x in feats().items()}
    loss = call_blend(f, ignored)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(x.grad is not None and not x.grad.any() for x in f.values())


# --- issue 19: MMPareto -----------------------------------------------------------------------


def _mmpareto_losses(enc: nn.ModuleDict) -> tuple[Tensor, dict[str, Tensor]]:
    """The fused loss and each modality's own unimodal loss (its slice of the concat head)."""
    f = {m: enc[m](torch.randn(B, 2)) for m in WIDTHS}
    fused_loss = nn.functional.cross_entropy(fused(f), target())
    z = unimodal_logits(head(), f)
    return fused_loss, {m: nn.functional.cross_entropy(z[m], target()) for m in WIDTHS}


def test_mmpareto_load_state_dict_names_every_missing_key_and_changes_nothing() -> None:
    mm = MMPareto(dict(encoders().items()), gamma=2.0, rescale="paper")
    before = mm.state_dict()
    with pytest.raises(KeyError, match=r"MMPareto state is missing \['gamma', 'rescale', "
                       r"'steps', 'modalities'\]"):  # fmt: skip
        mm.load_state_dict({})
    with pytest.raises(KeyError, match=r"MMPareto state is missing \['steps'\]"):
        mm.load_state_dict({k: v for k, v in before.items() if k != "steps"})
    with pytest.raises(ValueError, match="rescale must be 'paper' or 'code', got 'both'"):
        mm.load_state_dict({**before, "gamma": 3.0, "rescale": "both", "steps": 7})
    with pytest.raises(ValueError, match=r"the state's modalities \['a', 'v'\] do not match"):
        mm.load_state_dict({**before, "modalities": ["a", "v"]})
    assert mm.state_dict() == before  # a failed load changed nothing (gamma was valid, too)


def test_mmpareto_refuses_the_same_losses_twice_naming_them() -> None:
    enc = encoders()
    mm = MMPareto(dict(enc.items()))
    fused_loss, uni = _mmpareto_losses(enc)
    mm.backward(fused_loss, uni, retain_graph=True)
    grads_once = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
    with pytest.raises(
        ValueError,
        match=r"fused_loss, unimodal_losses\['a'\], unimodal_losses\['v'\], "
        r"unimodal_losses\['t'\] were already passed to this MMPareto's backward \(step 0\)",
    ):
        mm.backward(fused_loss, uni)
    new_fused, _ = _mmpareto_losses(enc)  # one repeated tensor is enough
    with pytest.raises(ValueError, match=r"^unimodal_losses\['v'\] were already passed"):
        mm.backward(new_fused, {**_mmpareto_losses(enc)[1], "v": uni["v"]})
    assert mm.steps == 1
    assert all(torch.equal(p.grad, grads_once[k]) for k, p in enc.named_parameters())
    mm.backward(*_mmpareto_losses(enc))  # new tensors (the next micro-batch): accepted
    assert mm.steps == 2


# --- issue 19: AGM and OPM ---------------------------------------------------------------------


def test_opm_nan_features_raise_the_same_with_unimodal_logits_as_with_head() -> None:
    bad = feats(v=nan_at((B, 2)))
    with_head = ModalityPredictionModulator(list(WIDTHS), head=head())
    without = ModalityPredictionModulator(list(WIDTHS))
    with pytest.raises(ValueError) as a:
        with_head(bad, target())
    with pytest.raises(ValueError) as b:
        without(bad, target(), unimodal_logits=logits())
    assert str(a.value) == str(b.value)
    assert "features['v']" in str(b.value) and "non-finite" in str(b.value)
    assert without.step_count == 0


def test_opm_logits_on_another_device_name_both_devices() -> None:
    opm = ModalityPredictionModulator(list(WIDTHS))
    z = logits(v=torch.randn(B, C, device="meta"))
    with pytest.raises(ValueError, match=r"unimodal_logits\['v'\].*\(4, 3\).*meta.*cpu"):
        opm(feats(), target(), unimodal_logits=z)


@pytest.mark.parametrize(
    ("losses", "keep", "error", "match"),
    [
        (
            torch.tensor([[1.0], [2.0], [6.0]]),
            torch.tensor([1, 0, 1]).bool(),
            ValueError,
            r"\(3, 1\).*\(3,\)",
        ),
        (torch.tensor(3.0), torch.tensor([True, False]), ValueError, r"shape \(\).*\(2,\)"),
        (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False]), ValueError, r"\(3,\).*\(2,\)"),
        (torch.tensor([1.0, 2.0]), torch.tensor([1, 0]), TypeError, r"bool"),
        (torch.tensor([1, 2]), torch.tensor([True, False]), TypeError, r"floating point"),
        (
            torch.tensor([1.0, 2.0]),
            torch.ones(2, dtype=torch.bool, device="meta"),
            ValueError,
            r"meta.*cpu",
        ),
    ],
    ids=["[B,1] losses", "reduced scalar", "length mismatch", "int keep", "int losses", "devices"],
)
def test_kept_mean_refuses_what_would_broadcast_or_mislead(
    losses: Tensor, keep: Tensor, error: type[Exception], match: str
) -> None:
    from imbalance_losses import kept_mean

    with pytest.raises(error, match=match):
        kept_mean(losses, keep)


def test_agm_refuses_the_head_in_encoders_like_arl() -> None:
    h = head()
    encs: dict[str, Any] = {"a": h, "v": nn.Linear(2, 2), "t": nn.Linear(1, 1)}
    with pytest.raises(ValueError, match=r"fusion head's parameters .*encoders\['a'\].*AGM"):
        AdaptiveGradientModulator(h, encoders=encs)
    with pytest.raises(ValueError, match=r"fusion head's parameters .*encoders\['a'\].*ARL"):
        ARLLoss(head=h, encoders=encs)
    per = {m: nn.Linear(d, C) for m, d in WIDTHS.items()}  # sum fusion: a mapping of heads
    with pytest.raises(ValueError, match=r"\(3, 2\).*encoders\['v'\]"):
        AdaptiveGradientModulator(
            per, encoders={"a": nn.Linear(3, 3), "v": per["v"].weight, "t": nn.Linear(1, 1)}
        )


@pytest.mark.parametrize("which", ["agm", "opm"])
def test_a_mix_of_open_and_new_tensors_is_refused(which: str) -> None:
    f = {m: x.requires_grad_() for m, x in feats().items()}
    module: Any = (
        AdaptiveGradientModulator(head())
        if which == "agm"
        else ModalityPredictionModulator(list(WIDTHS), head=head())
    )
    module(f, target())
    mixed = {**f, "v": f["v"].detach().clone().requires_grad_()}
    with pytest.raises(ValueError, match=r"\['a', 't'\] were already passed.*\['v'\] are new"):
        module(mixed, target())


# --- issue 19: monitor, report, plots ---


def _meta_target() -> Tensor:
    """Class indices on another device than the (CPU) logits: the meta device stands in for a
    GPU on a CPU-only machine (only the tensors' metadata is read by the check)."""
    return torch.tensor([0, 1, 2, 1], device="meta")


def test_issue19_check_target_names_both_devices() -> None:
    from imbalance_losses.core.validation import check_target

    cpu = torch.device("cpu")
    check_target(target(), batch=B, num_classes=C, device=cpu)  # same device: fine
    with pytest.raises(
        ValueError, match=r"target of shape \(4,\) is on meta but the logits are on cpu"
    ):
        check_target(_meta_target(), batch=B, num_classes=C, device=cpu)
    # a device without an index (``cuda``) matches the same type with any index
    from imbalance_losses.core.validation import _same_device

    assert _same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not _same_device(torch.device("cuda", 1), torch.device("cuda", 0))


def test_issue19_monitor_target_on_another_device() -> None:
    from imbalance_losses import ImbalanceMonitor

    monitor = ImbalanceMonitor(list(WIDTHS))
    with pytest.raises(ValueError, match=r"target .* is on meta but unimodal_logits\['a'\] .* cpu"):
        monitor.update(logits(), _meta_target())
    with_head = ImbalanceMonitor(list(WIDTHS), head=head())
    with pytest.raises(ValueError, match=r"is on meta but unimodal_logits\['a'\] are on cpu"):
        with_head.update(feats(), _meta_target())
    with pytest.raises(RuntimeError, match="nothing observed"):  # the bad batch added nothing
        monitor.compute()


def test_issue19_modulator_target_on_another_device() -> None:
    with pytest.raises(ValueError, match=r"target .* is on meta but unimodal_logits\['a'\] .* cpu"):
        call_modulator(logits(), _meta_target())
    enc = encoders()
    modulator = ModalityGradientModulator(dict(enc.items()), alpha=0.5)
    with pytest.raises(ValueError, match=r"is on meta but unimodal_logits\['a'\] are on cpu"):
        modulator.observe(logits(), _meta_target())


def test_issue19_monitor_window_without_a_countable_sample() -> None:
    from imbalance_losses import ImbalanceMonitor

    monitor = ImbalanceMonitor(list(WIDTHS), ignore_index=-100)
    monitor.update(logits(), torch.full((B,), -100))
    with pytest.raises(RuntimeError, match=r"no countable sample .*ignore_index=-100"):
        monitor.compute()


def _probe_sets(n_eval: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(20) % 2
    x = {m: torch.randn(20, 3, generator=g) + y[:, None] for m in ("a", "v")}
    fit = ({m: v[:12] for m, v in x.items()}, y[:12])
    held = ({m: v[12 : 12 + n_eval] for m, v in x.items()}, y[12 : 12 + n_eval])
    return fit, held


def test_issue19_report_with_an_empty_held_out_set() -> None:
    from imbalance_losses import imbalance_report
    from imbalance_losses.diagnosis.report import linear_probe_accuracy

    fit, held = _probe_sets(0)
    with pytest.raises(ValueError, match=r"evaluate \(the held-out set\) is empty.*\(0,\)"):
        imbalance_report(fit, held)
    with pytest.raises(ValueError, match=r"held-out set\) is empty"):
        imbalance_report(fit, [held, held])  # batches that are all empty
    fit, good = _probe_sets(4)
    with pytest.raises(ValueError, match=r"alone\[1\] \(the held-out set .*\) is empty"):
        imbalance_report(
            fit, good, alone=(({"a": fit[0]["a"]}, fit[1]), ({"a": held[0]["a"]}, held[1]))
        )
    with pytest.raises(ValueError, match=r"held-out \(eval\) set is empty: features \(0, 3\)"):
        linear_probe_accuracy(fit[0]["a"], fit[1], held[0]["a"], held[1], 2)


def test_issue19_plot_history_says_what_to_give(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from imbalance_losses import plot_history

    one = {"imbalance/a/acc": 0.5, "imbalance/v/acc": 0.7}
    out = tmp_path / "x.png"
    with pytest.raises(TypeError, match=r"list of \{key: number\} dicts.*one point.*\[values\]"):
        plot_history(one, out)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"history\[0\]\['imbalance/a/acc'\] is str '0.5'.*number"):
        plot_history([{"imbalance/a/acc": "0.5", "imbalance/v/acc": 0.7}], out)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"history\['sgd'\]\[1\]\['imbalance/v/acc'\] is str"):
        plot_history({"sgd": [one, {**one, "imbalance/v/acc": "high"}]}, out)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"list of \{key: number\} dicts.*got str"):
        plot_history("imbalance/a/acc", out)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"history\[0\] is float"):
        plot_history([0.5, 0.7], out)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"value for 'sgd' is str"):
        plot_history({"sgd": "history.json"}, out)  # type: ignore[dict-item]
    assert not out.exists()


# --- issue 19: ARL, boosting -----------------------------------------------------------------
# Silent misuse of ARLLoss and SustainedBoostingLoss: a module left in eval mode while training,
# the same call twice in one step, a reordered mapping, a criterion rebuilt every epoch. Each
# warns or raises with what to do; the normal use (below, last) warns about nothing.

WIDE = {"a": 3, "v": 2}  # two modalities of different widths, so that a swap is detectable


def _encoded(seed: int = 0, batch: int = B) -> dict[str, Tensor]:
    """Features as an encoder gives them: non-leaf tensors that require grad."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(batch, d, generator=g).requires_grad_() * 1.0) for m, d in WIDE.items()}


def _fused(head_: nn.Linear, f: dict[str, Tensor]) -> Tensor:
    return head_(torch.cat(list(f.values()), 1))


def _boost(**kw: Any) -> SustainedBoostingLoss:
    boost = SustainedBoostingLoss(C, WIDE, hidden=4, **{"check_every": "manual", **kw})
    boost.optimizer = torch.optim.SGD(boost.parameters(), lr=0.1)  # kept alive with the module
    boost.attach_optimizer(boost.optimizer)
    return boost


def test_boosting_same_features_twice_is_one_step() -> None:
    """A logging call then the real one on the same tensors: one step, B samples, no extra check.

    check_every=2 with the pattern (log, real, backward) per step: the check is due after two
    steps, i.e. at the third step's first call, and pools 2 B samples (4 B if repeats counted,
    with a check already at the second step's logging call)."""
    boost = _boost(check_every=2)
    y = target()
    checked_at = []
    for step in range(3):
        f = _encoded(seed=step)
        before = boost.last
        logged = boost(f, y).detach()  # the logging call
        loss = boost(f, y)  # the real one
        torch.testing.assert_close(loss.detach(), logged)
        loss.backward()
        if boost.last is not before:
            checked_at.append(step)
    assert checked_at == [2]
    assert boost.last is not None and float(boost.last.samples) == 2 * B
    assert sum(boost.num_heads.values()) <= len(WIDE) + 1  # at most the one head of one check


def test_boosting_micro_batches_and_a_second_update_are_steps() -> None:
    """New tensors are new steps; the same tensors after a backward are a new step too."""
    y = target()
    boost = _boost()
    total = boost(_encoded(1), y) + boost(_encoded(2), y)  # two micro-batches, one backward
    total.backward()
    assert boost._since_check == 2
    f = _encoded(3)
    boost(f, y).backward(retain_graph=True)
    boost(f, y).backward()  # a second update on the same batch: its own step
    assert boost._since_check == 4
    assert float(boost.check().samples) == 4 * B


def test_boosting_features_without_grad_are_never_a_repeat() -> None:
    """Precomputed (frozen) features carry no identity across steps: each call is a step."""
    boost = _boost()
    f, y = feats(t=None, a=torch.randn(B, 3)), target()
    boost(f, y)
    boost(f, y)
    assert boost._since_check == 2


def _boost_eval_then_train(y: Tensor) -> SustainedBoostingLoss:
    boost = _boost(check_every=1)
    boost(_encoded(0), y).backward()
    boost.eval()  # a validation pass ...
    return boost  # ... and no boost.train()


def test_boosting_left_in_eval_mode_warns_once_at_backward() -> None:
    y = target()
    boost = _boost_eval_then_train(y)
    loss = boost(_encoded(1), y)  # the forward alone may be a validation pass: no warning
    with pytest.warns(RuntimeWarning, match=r"eval mode.*boost\.train\(\)") as caught:
        loss.backward()
    assert caught[0].filename == __file__  # points at the user's backward() line
    heads = dict(boost.num_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        boost(_encoded(2), y).backward()
    # indeed nothing happened: the check due since the first step (check_every=1) never ran
    assert boost.num_heads == heads and boost.last is None and boost._since_check == 1


def test_arl_left_in_eval_mode_warns_once_at_backward() -> None:
    h, y = nn.Linear(5, C), target()
    crit = ARLLoss(head=h)
    f = _encoded(0)
    crit(_fused(h, f), y, f).backward()
    crit.eval()
    f = _encoded(1)
    loss = crit(_fused(h, f), y, f)
    with pytest.warns(RuntimeWarning, match=r"eval mode.*criterion\.train\(\)") as caught:
        loss.backward()
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = _encoded(2)
        crit(_fused(h, f), y, f).backward()
    assert crit.steps == 1  # no step in eval mode: what the warning is about


def test_eval_mode_without_backward_does_not_warn() -> None:
    """Validation, with or without torch.no_grad(): no backward, no warning."""
    h, y = nn.Linear(5, C), target()
    crit, boost = ARLLoss(head=h).eval(), _boost().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = _encoded(0)
        crit(_fused(h, f), y, f)
        boost(f, y)
        with torch.no_grad():
            crit(_fused(h, f), y, f)
            boost(f, y)


def _arl_trained(h: nn.Linear) -> ARLLoss:
    crit = ARLLoss(head=h)
    f = _encoded(0)
    crit(_fused(h, f), target(), f).backward()
    return crit


@pytest.mark.parametrize("training", [True, False])
def test_arl_refuses_a_mapping_in_another_order(training: bool) -> None:
    """After training on {a, v}, {v, a} would split the head's weight wrongly: refused."""
    h = nn.Linear(5, C)
    crit = _arl_trained(h).train(training)
    f = _encoded(1)
    swapped = {"v": f["v"], "a": f["a"]}
    with pytest.raises(ValueError, match=r"same order"):
        crit(h(torch.cat([f["v"], f["a"]], 1)), target(), swapped)


@pytest.mark.parametrize("training", [True, False])
def test_arl_refuses_tensors_under_each_others_names(training: bool) -> None:
    """{a: v's tensor, v: a's tensor}: the widths add up to the head's, but not per name."""
    h = nn.Linear(5, C)
    crit = _arl_trained(h).train(training)
    f = _encoded(1)
    relabelled = {"a": f["v"], "v": f["a"]}
    with pytest.raises(ValueError, match=r"widths \{'a': 2, 'v': 3\} differ.*\{'a': 3, 'v': 2\}"):
        crit(_fused(h, relabelled), target(), relabelled)
    assert crit.steps == 1


def test_arl_widths_survive_a_checkpoint() -> None:
    h = nn.Linear(5, C)
    resumed = ARLLoss(head=h)
    resumed.load_state_dict(_arl_trained(h).state_dict())
    f = _encoded(1)
    relabelled = {"a": f["v"], "v": f["a"]}
    with pytest.raises(ValueError, match=r"widths"):
        resumed(_fused(h, relabelled), target(), relabelled)


def _epochs(h: nn.Linear, epochs: int, steps: int, **kw: Any) -> list[ARLLoss]:
    """The mistake: the criterion built inside the epoch loop."""
    built = []
    for epoch in range(epochs):
        crit = ARLLoss(head=h, **kw)
        built.append(crit)
        for s in range(steps):
            f = _encoded(10 * epoch + s)
            crit(_fused(h, f), target(), f).backward()
    return built


def test_arl_rebuilt_every_epoch_warns() -> None:
    h = nn.Linear(5, C)
    with pytest.warns(RuntimeWarning, match=r"3 training steps.*warm-up of 5 steps.*once, before"):
        built = _epochs(h, epochs=2, steps=3, warmup_steps=5)
    assert not any(c.last is not None and c.last.active for c in built)  # indeed never started


def test_arl_rebuilt_with_an_ema_warns() -> None:
    with pytest.warns(RuntimeWarning, match=r"fresh EMA statistics"):
        _epochs(nn.Linear(5, C), epochs=2, steps=1, momentum=0.9)


def test_arl_second_criterion_without_a_mistake_does_not_warn() -> None:
    """Nothing to restart (no warm-up, no EMA), another head, a deleted or resumed criterion."""
    h = nn.Linear(5, C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _epochs(h, epochs=2, steps=2)  # rebuilt, but the same coefficients as one criterion
        _epochs(nn.Linear(5, C), epochs=1, steps=1, warmup_steps=5)
        first = _epochs(h, epochs=1, steps=1, warmup_steps=5)[0]
        resumed = ARLLoss(head=h, warmup_steps=5)
        resumed.load_state_dict(first.state_dict())  # a resume
        f = _encoded(1)
        resumed(_fused(h, f), target(), f).backward()
        del first, resumed
        fresh = ARLLoss(head=h, warmup_steps=5)  # the old one deleted: a deliberate restart
        fresh(_fused(h, f), target(), f)


def test_arl_head_registry_keeps_nothing_alive() -> None:
    import gc
    import weakref

    h = nn.Linear(5, C)
    crit = _arl_trained(h)
    refs = weakref.ref(h), weakref.ref(crit)
    del h, crit
    gc.collect()
    assert refs[0]() is None and refs[1]() is None


def test_normal_use_warns_about_nothing() -> None:
    """Built once, logging calls, accumulation, validation under no_grad, back to train()."""
    h, y = nn.Linear(5, C), target()
    crit = ARLLoss(head=h, warmup_steps=1, momentum=0.5)
    boost = _boost(check_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _epoch in range(2):
            crit.train(), boost.train()
            for s in range(2):
                f = _encoded(s)
                crit(_fused(h, f), y, f).detach()  # a logging call
                for micro in (_encoded(s + 10), f):
                    (crit(_fused(h, micro), y, micro) + boost(micro, y)).backward()
            crit.eval(), boost.eval()
            with torch.no_grad():
                f = _encoded(99)
                crit(_fused(h, f), y, f), boost(f, y), boost.predict(f)
    assert crit.steps == 8 and boost.last is not None
