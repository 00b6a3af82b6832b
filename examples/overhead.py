"""What each module costs on top of plain training: step-time ratios, peak memory, host reads.

Every row trains the same encoders (two small CNNs, about 1M parameters, batch 64, concatenation
fusion with a linear head) with SGD; the reference row is plain cross-entropy. Rows are timed
*interleaved* in one process (round r runs one step of every row), so drift in the machine's
speed hits every row alike, and each row's cost is reported as the median of its per-round
ratio to the reference, with the interquartile range of those ratios.

Peak memory on CPU is the peak resident set size of a fresh subprocess that runs the row for a
few steps (CPU has no allocator statistics), reported as the increase over a subprocess that
only builds the model and data; on CUDA (``--device cuda``) it is the allocator's peak during a
few steps of the row over what was allocated before them. On CUDA every timed step ends with
``torch.cuda.synchronize()``.

Host reads are counted with a ``TorchFunctionMode`` during one training step: every
``bool(t)``, ``t.item()``, ``float(t)``, ``t.tolist()``, ``t.cpu()`` made from the package.
Reads from ``imbalance_losses/core/validation.py`` are the input checks, immediate on CPU and
queued without a sync (``torch._assert_async``) on accelerators; every other read is a host sync
the module adds to the hot path, and the target is zero of them (listed by file and line).

After each table a line measures OGM-GE's own work against its floor, the normal draw of one
value per modulated gradient element (``torch.randn`` of that many values with a generator):
(a) the draw alone, (b) ``ModalityGradientModulator.step`` with ``method="ogm_ge"``, and (b)/(a).

Run: ``python examples/overhead.py`` (about 5 minutes on 2 cores) or ``--quick`` (under a
minute). ``--large`` adds the three-modality setting, ``--device cuda`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from imbalance_losses import (
    AdaptiveGradientModulator,
    AlternatingUnimodalAdaptation,
    ARLLoss,
    GradientBlending,
    MMCosineHead,
    MMPareto,
    ModalityGradientModulator,
    ModalityPredictionModulator,
    ModalityRelearning,
    OPMOutput,
    PMRLoss,
    ReconBoost,
    SampleModalityValuation,
    SustainedBoostingLoss,
    UnimodalTeacherLoss,
    apply_mask,
    kept_mean,
    unimodal_logits,
)
from imbalance_losses.core.masking import subset_masks

BATCH = 64
CLASSES = 10
FEATURE = 256


def encoder(in_channels: int, width: int, *, mlp: bool = False) -> nn.Sequential:
    """A small CNN: four stride-2 3x3 conv blocks, global average pooling, ``FEATURE`` wide.

    ``mlp``: one ``Linear(in_channels, FEATURE)`` and a ReLU instead (the op-count model).
    """
    if mlp:
        return nn.Sequential(nn.Linear(in_channels, FEATURE), nn.ReLU())
    chans = [in_channels, width, 2 * width, 4 * width, FEATURE]
    layers: list[nn.Module] = []
    for cin, cout in itertools.pairwise(chans):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class Model(nn.Module):
    """One encoder per modality, concatenation fusion, one linear head."""

    def __init__(self, channels: dict[str, int], width: int, *, mlp: bool = False) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: encoder(c, width, mlp=mlp) for m, c in channels.items()})
        self.head = nn.Linear(FEATURE * len(channels), CLASSES)

    def features(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: enc(inputs[m]) for m, enc in self.encoders.items()}

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.features(inputs)
        return self.head(torch.cat(list(feats.values()), dim=1)), feats


@dataclass
class Setting:
    name: str
    channels: dict[str, int]
    width: int
    size: int
    mlp: bool = False
    """One Linear + ReLU per modality on ``[B, channels]`` inputs (the op-count model)."""


SMALL = Setting("2 modalities, ~1M params", {"audio": 1, "visual": 3}, 40, 32)
TINY = Setting("2 modalities, one Linear encoder each", {"audio": 16, "visual": 24}, 0, 0, True)
LARGE = Setting("3 modalities, ~1.6M params", {"audio": 1, "visual": 3, "depth": 1}, 40, 32)


def make_data(
    setting: Setting, seed: int = 0, device: str = "cpu"
) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = () if setting.mlp else (setting.size, setting.size)
    inputs = {
        m: torch.randn(BATCH, c, *shape, generator=g).to(device)
        for m, c in setting.channels.items()
    }
    return inputs, torch.randint(CLASSES, (BATCH,), generator=g).to(device)


Step = Callable[[], None]


def build_rows(setting: Setting, only: str | None = None, device: str = "cpu") -> dict[str, Step]:
    """One closure per row, each owning its model copy, optimiser and method object."""
    torch.manual_seed(0)
    base = Model(setting.channels, setting.width, mlp=setting.mlp).to(device)
    inputs, target = make_data(setting, device=device)
    widths = dict.fromkeys(setting.channels, FEATURE)
    ce = nn.CrossEntropyLoss()
    ce_none = nn.CrossEntropyLoss(reduction="none")
    rows: dict[str, Step] = {}

    def sgd(params: object) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)  # type: ignore[arg-type]

    def plain() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            logits, _ = model(inputs)
            ce(logits, target).backward()
            opt.step()

        return step

    def arl() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        criterion = ARLLoss(nn.CrossEntropyLoss(), head=model.head)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            logits, feats = model(inputs)
            criterion(logits, target, features=feats).backward()
            opt.step()

        return step

    def modulator(method: Literal["ogm", "ogm_ge"]) -> Callable[[], Step]:
        def build() -> Step:
            model = copy.deepcopy(base)
            opt = sgd(model.parameters())
            mod = ModalityGradientModulator(dict(model.encoders.items()), alpha=0.8, method=method)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                logits, feats = model(inputs)
                ce(logits, target).backward()
                with torch.no_grad():
                    uni = unimodal_logits(model.head, {m: f.detach() for m, f in feats.items()})
                mod.step(uni, target)
                opt.step()

            return step

        return build

    def boosting(heads: int) -> Callable[[], Step]:
        def build() -> Step:
            model = copy.deepcopy(base)
            boost = SustainedBoostingLoss(
                num_classes=CLASSES,
                in_features=widths,
                max_heads=max(heads, 1),
                check_every="manual",  # heads are added here, not by the schedule
            ).to(device)
            for m in setting.channels:
                for _ in range(heads - 1):
                    boost.add_head(m)
            opt = sgd(list(model.encoders.parameters()) + list(boost.parameters()))

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                boost(model.features(inputs), target).backward()
                opt.step()

            return step

        return build

    def pmr() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        loss_fn = PMRLoss(CLASSES, widths).to(device)
        with torch.no_grad():  # the prototypes, computed once per epoch in real training
            loss_fn.update_prototypes([(model.features(inputs), target)])

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            logits, feats = model(inputs)
            loss_fn(logits, target, feats).backward()
            opt.step()

        return step

    def blending() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        blend = GradientBlending(head=model.head, modalities=list(setting.channels))

        def step() -> None:  # the per-step cost; the weights are updated once per window
            opt.zero_grad(set_to_none=True)
            logits, feats = model(inputs)
            blend(logits, target, features=feats).backward()
            opt.step()

        return step

    def agm() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        modulator = AdaptiveGradientModulator(model.head)

        def step() -> None:  # 2^M masked head evaluations per step, forward only
            opt.zero_grad(set_to_none=True)
            feats = modulator(model.features(inputs), target)
            ce(model.head(torch.cat(list(feats.values()), dim=1)), target).backward()
            opt.step()

        return step

    def mmpareto() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        pareto = MMPareto(dict(model.encoders.items()))

        def step() -> None:  # one backward per objective: the fused loss and each modality's
            opt.zero_grad(set_to_none=True)
            logits, feats = model(inputs)
            uni = unimodal_logits(model.head, feats)
            pareto.backward(ce(logits, target), {m: ce(z, target) for m, z in uni.items()})
            opt.step()

        return step

    def opm() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        dropper = ModalityPredictionModulator(list(setting.channels), head=model.head)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out: OPMOutput = dropper(model.features(inputs), target)
            logits = model.head(torch.cat(list(out.features.values()), dim=1))
            loss: Tensor = kept_mean(ce_none(logits, target), out.keep)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()

        return step

    def umt() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        # stand-ins for the M trained uni-modal encoders (same architecture as the student's)
        teachers = {m: copy.deepcopy(enc) for m, enc in base.encoders.items()}
        loss_fn = UnimodalTeacherLoss(teachers).to(device)

        def step() -> None:  # + M teacher forwards per step (eval mode, no grad, no backward)
            opt.zero_grad(set_to_none=True)
            logits, feats = model(inputs)
            loss_fn(logits, target, features=feats, inputs=inputs).backward()
            opt.step()

        return step

    def relearning() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        ModalityRelearning(dict(model.encoders.items()), CLASSES)  # snapshot theta^0 only

        def step() -> None:  # a training step is plain; the cost is per re-learning epoch
            opt.zero_grad(set_to_none=True)
            logits, _ = model(inputs)
            ce(logits, target).backward()
            opt.step()

        return step

    def mmcosine() -> Step:
        model = copy.deepcopy(base)
        cosine = MMCosineHead(model.head, widths, scaling=10.0)  # model.head's weight; bias frozen
        opt = sgd(model.parameters())

        def step() -> None:  # the cosine logits replace the linear head's output
            opt.zero_grad(set_to_none=True)
            ce(cosine(model.features(inputs)), target).backward()
            opt.step()

        return step

    def mla() -> Step:
        model = copy.deepcopy(base)
        shared = nn.Linear(FEATURE, CLASSES).to(device)  # MLA's head scores one modality at a time
        opt = sgd([*model.encoders.parameters(), *shared.parameters()])
        method = AlternatingUnimodalAdaptation(shared, batches_per_epoch=100)

        def step() -> None:  # M optimiser steps (one per modality), zero_grad included
            method.train_step(model.features(inputs), target, opt)

        return step

    def reconboost(phase: Literal["boost", "rectify"]) -> Callable[[], Step]:
        def build() -> Step:
            model = copy.deepcopy(base)
            head = nn.Linear(FEATURE, CLASSES).to(device)  # one head applied per modality
            rb = ReconBoost(
                dict(model.encoders.items()),
                dict.fromkeys(setting.channels, head),
                boost_epochs=1,
                optimizer_factory=lambda params, _phase, _stage: sgd(params),
            ).to(device)
            if phase == "rectify":
                rb.epoch_end()  # one boosting epoch done: the rectification phase

            def step() -> None:  # boosting: one encoder's backward; rectification: all + beta
                feats = {}
                for m, enc in model.encoders.items():
                    with torch.set_grad_enabled(rb.trains(m)):
                        feats[m] = enc(inputs[m])
                opt = rb.optimizer
                opt.zero_grad(set_to_none=True)
                rb(feats, target).backward()
                opt.step()

            return step

        return build

    def valuation() -> Step:
        model = copy.deepcopy(base)
        opt = sgd(model.parameters())
        names = list(setting.channels)
        val = SampleModalityValuation(model.head, names, num_samples=BATCH, warmup=1)

        def value_forward(x: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
            return model.features(x), target, torch.arange(BATCH, device=device)

        # the per-epoch valuation pass (eval mode, no grad), here once on the batch
        val.value([inputs], forward=value_forward, model=model)
        entries = torch.tensor(list(val.sampler))[:BATCH]  # the first batch of the new epoch
        keep = subset_masks(len(names))[entries[:, 1]].to(device)
        x = {m: t[entries[:, 0].to(device)] for m, t in inputs.items()}
        y = target[entries[:, 0].to(device)]

        def step() -> None:  # the per-step cost: one where per modality (apply_mask)
            opt.zero_grad(set_to_none=True)
            feats = apply_mask(model.features(x), keep)
            ce(model.head(torch.cat(list(feats.values()), dim=1)), y).backward()
            opt.step()

        return step

    builders: dict[str, Callable[[], Step]] = {
        "plain cross-entropy (reference)": plain,
        "ARLLoss": arl,
        "ModalityGradientModulator ogm": modulator("ogm"),
        "ModalityGradientModulator ogm_ge": modulator("ogm_ge"),
        "SustainedBoostingLoss, 1 head": boosting(1),
        "SustainedBoostingLoss, 2 heads": boosting(2),
        "SustainedBoostingLoss, 8 heads": boosting(8),
        "PMRLoss": pmr,
        "GradientBlending": blending,
        "AdaptiveGradientModulator (AGM)": agm,
        "MMPareto": mmpareto,
        "ModalityPredictionModulator (OPM)": opm,
        "UnimodalTeacherLoss (UMT)": umt,
        "ModalityRelearning (per step)": relearning,
        "MMCosineHead": mmcosine,
        "AlternatingUnimodalAdaptation (MLA, M optimiser steps)": mla,
        "ReconBoost, boosting phase": reconboost("boost"),
        "ReconBoost, rectification phase": reconboost("rectify"),
        "SampleModalityValuation (re-sampled batch)": valuation,
    }
    for name, build in builders.items():
        if only is None or name == only:
            rows[name] = build()
    return rows


TARGETS = {
    "ARLLoss": 1.05,
    "ModalityGradientModulator ogm_ge": 1.03,
    "SustainedBoostingLoss, 2 heads": 1.10,
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rows(
    rows: dict[str, Step], warmup: int, rounds: int, device: str = "cpu"
) -> dict[str, list[float]]:
    for step in rows.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, step in rows.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def cuda_peak_mib(step: Step, steps: int) -> float:
    """The CUDA allocator's peak over ``steps`` steps, above what was allocated before them."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


_HOST_READS = {"__bool__", "item", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts the Python-level reads of tensor values on the host made from the package.

    ``bool(t)``, ``t.item()``, ``float(t)``, ``t.tolist()``, ``t.cpu()``... called (directly or
    indirectly) from ``imbalance_losses``, split into the input checks of ``core/validation.py``
    (immediate on CPU, ``torch._assert_async`` with no sync on accelerators) and the rest.
    """

    def __init__(self) -> None:
        super().__init__()
        self.validation = 0
        self.other: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in _HOST_READS:
            files = [f.filename for f in traceback.extract_stack()]
            if any("core/validation.py" in f for f in files):
                self.validation += 1
            elif any("imbalance_losses" in f for f in files):
                frame = next(
                    f
                    for f in reversed(traceback.extract_stack())
                    if "imbalance_losses" in f.filename
                )
                self.other.append(
                    f"{func.__name__} at {frame.filename.split('/')[-1]}:{frame.lineno}"
                )
        return func(*args, **(kwargs or {}))


def host_reads(step: Step) -> tuple[int, list[str]]:
    """(reads by the input checks, other reads by the package) during one training step."""
    with HostReads() as reads:
        step()
    return reads.validation, reads.other


_NOT_COUNTED = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided"}


class OpCount(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the compute ops dispatched (forward, backward, optimiser), by ATen name.

    Views (``func.is_view``), detaches, aliases and bare allocations (``empty*``, which launch
    no kernel) are not counted: what is left is, on a GPU, one kernel launch each (or a copy).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NOT_COUNTED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Step, warmup: int = 3) -> collections.Counter[str]:
    """The ops of one training step (after ``warmup`` steps: warm-up, lazy state), by name."""
    for _ in range(warmup):
        step()
    counter = OpCount()
    with counter:
        step()
    return counter.ops


OPS_BEFORE = {
    "ARLLoss": 132,
    "ModalityGradientModulator ogm": 65,
    "ModalityGradientModulator ogm_ge": 81,
    "SustainedBoostingLoss, 1 head": 86,
    "PMRLoss": 192,
    "GradientBlending": 65,
    "AdaptiveGradientModulator (AGM)": 99,
    "MMPareto": 238,
    "ModalityPredictionModulator (OPM)": 121,
}
"""Each module's own ops on :data:`TINY` before issue 22 (counted 2026-12-02, before its
changes); the issue's own counts, on its model: ARL 132, OGM-GE 85, boosting ~150, PMR 186,
G-Blending 65, AGM 99, MMPareto 139, OPM 107."""

OP_BUDGETS = {
    "ARLLoss": 65,
    "ModalityGradientModulator ogm": 32,
    "ModalityGradientModulator ogm_ge": 40,
    "SustainedBoostingLoss, 1 head": 75,
    "PMRLoss": 93,
    "GradientBlending": 32,
    "AdaptiveGradientModulator (AGM)": 49,
    "MMPareto": 69,
    "ModalityPredictionModulator (OPM)": 53,
}
"""Issue 22's budget: half of the smaller of the issue's count and :data:`OPS_BEFORE`, except
sustained boosting (half of the issue's ~150): 36 of its ops are the forward, backward and SGD
update of the heads it adds (its own parameters, in place of the model's fusion head), so half of
its 86 is out of reach; its own work went from about 50 ops to 16."""


def op_table() -> str:
    """``--count-ops``: ops per step of every row on :data:`TINY`, and each module's own.

    A module's host time per step is measured by ``examples/host_time.py`` (each row paired
    with a plain step, on the same model with batch 4, so that the step is host work).
    """
    torch.set_num_threads(1)
    rows = build_rows(TINY)
    counts = {name: count_ops(step) for name, step in rows.items()}
    ref = next(iter(rows))
    plain_ops = sum(counts[ref].values())
    lines = [
        f"### Ops per training step: {TINY.name} (batch {BATCH})",
        "",
        "| row | ops per step | module's own ops | before issue 22 | budget |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, ops in counts.items():
        own = sum(ops.values()) - plain_ops
        budget = OP_BUDGETS.get(name)
        flag = "" if budget is None else f"{budget}" + (" ok" if own <= budget else " OVER")
        before = OPS_BEFORE.get(name)
        was = "" if before is None else f"{before} ({own / before:.2f}x)"
        lines.append(
            f"| {name} | {sum(ops.values())} | {own if name != ref else '-'} | {was} | {flag} |"
        )
    return "\n".join(lines)


def peak_rss_mib(setting_name: str, row: str | None, steps: int) -> float:
    """Peak RSS (MiB) of a fresh process running ``steps`` steps of ``row`` (None: build only)."""
    cmd = [sys.executable, __file__, "--_memory", setting_name, json.dumps(row), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _memory_child(setting_name: str, row_json: str, steps: int) -> None:
    torch.set_num_threads(1)
    setting = {s.name: s for s in (SMALL, LARGE)}[setting_name]
    row = json.loads(row_json)
    if row is not None:
        step = build_rows(setting, only=row)[row]
        for _ in range(steps):
            step()
    else:
        build_rows(setting, only="plain cross-entropy (reference)")
    print(_peak_rss_kib() / 1024)


def _peak_rss_kib() -> float:
    """This process's peak resident set size in KiB.

    ``VmHWM`` of ``/proc/self/status`` belongs to this program's own address space, unlike
    ``ru_maxrss``, which Linux carries over ``exec`` from a large parent process.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def ge_against_draw(setting: Setting, warmup: int, rounds: int, device: str = "cpu") -> str:
    """OGM-GE's own work against its floor: the normal draw of one value per modulated element.

    (a) ``torch.randn(N)`` with a ``torch.Generator`` on the gradients' device, ``N`` the number
    of modulated gradient elements: what any implementation of GE must pay at least.
    (b) ``ModalityGradientModulator.step(unimodal_logits, target)`` with ``method="ogm_ge"`` on
    the same gradients: input checks, scores, pooling, coefficients, standard deviations, the
    same draw and the in-place updates. Gradients are rewritten (outside the timing) before
    every step, as a backward would. Interleaved rounds; the ratio is that of the medians (and
    of the fastest rounds, the least disturbed by other load on the machine).
    """
    torch.manual_seed(0)
    model = Model(setting.channels, setting.width).to(device)
    inputs, target = make_data(setting, device=device)
    logits, feats = model(inputs)
    nn.CrossEntropyLoss()(logits, target).backward()
    with torch.no_grad():
        uni = unimodal_logits(model.head, {m: f.detach() for m, f in feats.items()})
    mod = ModalityGradientModulator(dict(model.encoders.items()), alpha=0.8, method="ogm_ge")
    modulated = [p for _, p in mod.modulated_parameters if p.grad is not None]
    saved = [p.grad.clone() for p in modulated if p.grad is not None]
    n = sum(g.numel() for g in saved)
    gen = torch.Generator(device=saved[0].device).manual_seed(0)

    def draw() -> None:
        torch.randn(n, generator=gen, device=gen.device, dtype=torch.float32)

    def ge() -> None:
        mod.step(uni, target)

    def restore() -> None:
        for p, g in zip(modulated, saved, strict=True):
            assert p.grad is not None
            p.grad.copy_(g)

    times: dict[str, list[float]] = {"draw": [], "ge": []}
    for r in range(warmup + rounds):
        for name, fn in (("draw", draw), ("ge", ge)):
            restore()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    a, b = statistics.median(times["draw"]), statistics.median(times["ge"])
    a_min, b_min = min(times["draw"]), min(times["ge"])
    return (
        f"OGM-GE against its floor ({len(saved)} modulated parameters, {n / 1e6:.2f}M "
        f"elements; medians of {rounds} interleaved rounds): (a) torch.randn alone "
        f"{a * 1e3:.2f} ms, (b) modulator.step {b * 1e3:.2f} ms, ratio (b)/(a) {b / a:.3f}; "
        f"the module's own work beyond the draw {(b - a) * 1e3:.2f} ms (fastest rounds: "
        f"{a_min * 1e3:.2f} / {b_min * 1e3:.2f} ms, ratio {b_min / a_min:.3f})"
    )


def report(
    setting: Setting, warmup: int, rounds: int, memory_steps: int, device: str = "cpu"
) -> str:
    rows = build_rows(setting, device=device)
    params = sum(p.numel() for p in Model(setting.channels, setting.width).parameters())
    times = time_rows(rows, warmup, rounds, device)
    ref_name = next(iter(rows))
    ref = times[ref_name]
    syncs: list[str] = []
    cuda = device.startswith("cuda")
    base_rss = peak_rss_mib(setting.name, None, 0) if memory_steps and not cuda else float("nan")
    memory = "peak CUDA memory of a step (MiB)" if cuda else "peak RSS over model+data (MiB)"
    lines = [
        f"### {setting.name} ({params / 1e6:.2f}M parameters, batch {BATCH}, "
        f"{setting.size}x{setting.size} inputs)",
        "",
        "| row | median step (ms) | ratio to plain | ratio IQR | target "
        f"| {memory} | host reads: validation / other |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, ref, strict=True)]
        lo, mid, hi = quartiles(ratios)
        target = TARGETS.get(name)
        flag = (
            "" if target is None else (f"<= {target:.2f}" + (" ok" if mid <= target else " OVER"))
        )
        if not memory_steps:
            rss = float("nan")
        elif cuda:
            rss = cuda_peak_mib(rows[name], memory_steps)
        else:
            rss = peak_rss_mib(setting.name, name, memory_steps) - base_rss
        val_reads, other_reads = host_reads(rows[name])
        lines.append(
            f"| {name} | {statistics.median(ts) * 1e3:.1f} | {mid:.3f} | {lo:.3f}-{hi:.3f} | "
            f"{flag} | {rss:.0f} | {val_reads} / {len(other_reads)} |"
        )
        syncs.extend(f"{name}: {where}" for where in other_reads)
    if syncs:
        lines += ["", "Host reads outside the input checks (each a sync on an accelerator):"]
        lines += [f"- {s}" for s in syncs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, no memory (< 1 minute)")
    parser.add_argument("--large", action="store_true", help="also the three-modality setting")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--count-ops", action="store_true", help="ops per step of every row, only")
    parser.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_ops:
        print(op_table())
        return
    if args._memory:
        _memory_child(args._memory[0], args._memory[1], int(args._memory[2]))
        return
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 60)
    warmup = 2 if args.quick else 5
    memory_steps = 0 if args.quick else 3
    settings = [SMALL, LARGE] if args.large else [SMALL]
    print(
        f"# imbalance-losses overhead, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"command: python examples/overhead.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"{rounds} interleaved rounds after {warmup} warm-up steps; SGD(lr=1e-3, momentum=0.9)\n"
    )
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}\n")
    for setting in settings:
        print(report(setting, warmup, rounds, memory_steps, args.device))
        print()
        print(ge_against_draw(setting, warmup, rounds * 4, args.device))
        print()


if __name__ == "__main__":
    main()
