"""Does ``torch.compile`` of the user's loss computation remove a module's fixed per-step cost?

On the op-count model of ``examples/overhead.py`` (one ``Linear`` + ReLU encoder per modality, a
linear head, batch 64, SGD), three steps are built eagerly and with the loss computation
(the model's forward and the module's call) wrapped in ``torch.compile``: plain cross-entropy,
``ARLLoss`` and ``ModalityPredictionModulator`` (OPM). For each compiled one it prints the graphs
and graph breaks (``torch._dynamo.explain``) and the break reasons, then the median time per
step of every step, interleaved. The result is reported in ``docs/cost.md``.

Run: ``python examples/compile_check.py`` (a C++ compiler is needed for the CPU backend; the first
compiled steps take about half a minute each).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import overhead
import torch
import torch._dynamo
from torch import Tensor, nn

from imbalance_losses import ARLLoss, ModalityPredictionModulator, kept_mean
from imbalance_losses.methods.arl import _coefficients

LossFn = Callable[[], Tensor]


def loss_function(kind: str, model: overhead.Model, inputs: dict[str, Tensor], y: Tensor) -> LossFn:
    """The user's loss computation for ``kind`` ("plain", "ARLLoss" or "OPM") on ``model``."""
    if kind == "plain":
        ce = nn.CrossEntropyLoss()

        def plain() -> Tensor:
            logits, _ = model(inputs)
            out: Tensor = ce(logits, y)
            return out

        return plain
    if kind == "ARLLoss":
        arl = ARLLoss(nn.CrossEntropyLoss(), head=model.head)

        def with_arl() -> Tensor:
            logits, feats = model(inputs)
            out: Tensor = arl(logits, y, features=feats)
            return out

        return with_arl
    opm = ModalityPredictionModulator(list(overhead.TINY.channels), head=model.head)
    ce_none = nn.CrossEntropyLoss(reduction="none")

    def with_opm() -> Tensor:
        out = opm(model.features(inputs), y)
        logits = model.head(torch.cat(list(out.features.values()), 1))
        return kept_mean(ce_none(logits, y), out.keep)

    return with_opm


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = overhead.Model(overhead.TINY.channels, overhead.TINY.width, mlp=True)
    inputs, y = overhead.make_data(overhead.TINY)
    steps: dict[str, Callable[[], None]] = {}
    for kind in ("plain", "ARLLoss", "OPM"):
        for compiled in (False, True):
            name = f"{kind}, {'torch.compile(loss_fn)' if compiled else 'eager'}"
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
            fn = loss_function(kind, model, inputs, y)
            run = torch.compile(fn) if compiled else fn

            def step(run: Callable[[], Tensor] = run, opt: torch.optim.Optimizer = opt) -> None:
                opt.zero_grad(set_to_none=True)
                run().backward()  # type: ignore[no-untyped-call]
                opt.step()

            start = time.perf_counter()
            for _ in range(3):
                step()
            line = f"{name}: first 3 steps {time.perf_counter() - start:.1f} s"
            if compiled:
                fresh = loss_function(kind, copy.deepcopy(base), inputs, y)
                explained = torch._dynamo.explain(fresh)()
                line += f", {explained.graph_count} graphs, {explained.graph_break_count} breaks"
                reasons = sorted({str(b.reason).splitlines()[0] for b in explained.break_reasons})
                line += "".join(f"\n    break: {r}" for r in reasons)
            print(line, flush=True)
            steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(300):
        for name, one_step in steps.items():
            start = time.perf_counter()
            one_step()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts) * 1e6:.0f} us per step (median of 300, interleaved)")
    statistics_only()


def statistics_only(calls: int = 3000) -> None:
    """ARL's coefficient formula on ``[2, 2]`` statistics, eager and compiled, interleaved."""
    stats = torch.rand(2, 2, generator=torch.Generator().manual_seed(0)) + 0.1
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = torch.compile(_coefficients, fullgraph=True)
    compiled(stats, 8.0, 0.1)
    print(f"ARL coefficients, torch.compile: first call {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(calls):
        for name, fn in (("eager", _coefficients), ("compiled", compiled)):
            start = time.perf_counter()
            fn(stats, 8.0, 0.1)
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"ARL coefficients, {name}: {statistics.median(ts) * 1e6:.1f} us per call")


if __name__ == "__main__":
    main()
