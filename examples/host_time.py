"""Each module's own host time per training step, paired with plain training (issue 22).

On a model whose step is almost all host work (the op-count model of ``overhead.py`` with
batch 4 and 8-wide features, so the compute is negligible and a step is Python and dispatch),
each row is built on its own beside a plain cross-entropy step on a copy of the same model, and
the two are timed alternately, one step each, for ``--rounds`` rounds after a warm-up. A row's
own host time is ``median(row step) - median(plain step)``, printed in microseconds and in plain
steps (``/ median(plain step)``): the second figure does not move with the speed of a shared
machine, so two runs made at different times (or two checkouts) compare on it.

Building each row alone matters: with every row live in one process (``overhead.py
--count-ops``) the interleaved steps of 19 models evict each other from the caches and every
step looks slower.

Before and after a change: copy this file into the ``examples/`` of the other checkout (it
needs only that checkout's ``overhead.build_rows`` and row names) and run both, alternately, a
few times: ``python examples/host_time.py [part of a row name ...]``. One thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import overhead
import torch

ROWS = (
    "ARLLoss",
    "ModalityGradientModulator ogm",
    "ModalityGradientModulator ogm_ge",
    "SustainedBoostingLoss, 1 head",
    "PMRLoss",
    "GradientBlending",
    "AdaptiveGradientModulator (AGM)",
    "MMPareto",
    "ModalityPredictionModulator (OPM)",
)
"""The rows issue 22 measures (the modules it lists)."""

PLAIN = "plain cross-entropy (reference)"


def host_time(name: str, rounds: int, warmup: int = 30) -> tuple[float, float]:
    """``(own host time in us, in plain steps)`` of one row, paired with a plain step."""
    overhead.BATCH, overhead.FEATURE = 4, 8  # compute negligible: the step is host work
    plain = overhead.build_rows(overhead.TINY, only=PLAIN)[PLAIN]
    step = overhead.build_rows(overhead.TINY, only=name)[name]
    for _ in range(warmup):
        plain()
        step()
    plain_times, row_times = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        plain_times.append(t1 - t0)
        row_times.append(t2 - t1)
    reference = statistics.median(plain_times)
    extra = statistics.median(row_times) - reference
    return extra * 1e6, extra / reference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "rows", nargs="*", help="rows whose name contains one of these (default: every row)"
    )
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| row | own host time per step (us) | in plain steps |")
    print("| --- | ---: | ---: |")
    for name in ROWS:
        if args.rows and not any(part in name for part in args.rows):
            continue
        us, steps = host_time(name, args.rounds)
        print(f"| {name} | {us:.0f} | {steps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
