"""OPM on a synthetic two-modality task: drop the dominant modality's features while training.

The data (synthetic, from a seed, nothing downloaded): a ``strong`` modality whose class means are
far apart but whose features show a random class for 30% of the samples, and a ``weak`` modality
that always shows the true class with close class means (low SNR). Joint training leans on the
strong one; OPM drops the strong modality's features per sample with probability
``q = q_base (1 + lam tanh(rho - 1))`` (``rho`` its score over the weak one's) on a fraction
``p_exe`` of the steps, so the head and the weak encoder must learn to use the weak modality.

Printed: each modality's test accuracy from the shared head's unimodal logits and the fused
accuracy, for joint training and joint + OPM (same model, seed and SGD), plus the drop
probability and the realised drop fraction of the strong modality at the end of each epoch. On a
toy like this the differences are small and vary with the seed: judge from the spread.

Run: ``python examples/opm_example.py [--epochs 8] [--seeds 2]`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalance_losses import unimodal_logits
from imbalance_losses.methods.opm import ModalityPredictionModulator, kept_mean

CLASSES = 8
DIM = 16
CORRUPT = 0.3


def make_data(n: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.Generator().manual_seed(1234)  # the same class means for train and test
    mu_strong = torch.randn(CLASSES, DIM, generator=means) * 2.0
    mu_weak = torch.randn(CLASSES, DIM, generator=means) * 0.4
    y = torch.randint(CLASSES, (n,), generator=g)
    shown = torch.where(
        torch.rand(n, generator=g) < CORRUPT, torch.randint(CLASSES, (n,), generator=g), y
    )
    strong = mu_strong[shown] + torch.randn(n, DIM, generator=g)
    weak = mu_weak[y] + torch.randn(n, DIM, generator=g)
    return {"strong": strong, "weak": weak}, y


class Model(nn.Module):
    """Two MLP encoders, concatenation, one linear head; OPM in between (identity in eval)."""

    def __init__(self, opm: bool, seed: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
                for m in ("strong", "weak")
            }
        )
        self.head = nn.Linear(64, CLASSES)
        self.opm = (
            ModalityPredictionModulator(["strong", "weak"], head=self.head, seed=seed)
            if opm
            else None
        )

    def forward(self, x: dict[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        feats = {m: enc(x[m]) for m, enc in self.encoders.items()}
        fused, keep = feats, torch.ones(len(y), dtype=torch.bool)
        if self.opm is not None:  # drops and rescales in training mode only
            fused, keep = self.opm(feats, y)
        return self.head(torch.cat(list(fused.values()), dim=1)), keep, feats


@torch.no_grad()
def evaluate(model: Model, x: dict[str, Tensor], y: Tensor) -> dict[str, float]:
    model.eval()
    logits, _, feats = model(x, y)
    out = {
        m: (z.argmax(1) == y).float().mean().item()
        for m, z in unimodal_logits(model.head, feats).items()
    }
    out["fused"] = (logits.argmax(1) == y).float().mean().item()
    return out


def train(use_opm: bool, epochs: int, seed: int) -> tuple[dict[str, float], list[str]]:
    torch.manual_seed(seed)
    x, y = make_data(3000, seed=seed)
    x_test, y_test = make_data(3000, seed=seed + 100)
    model = Model(use_opm, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    trace: list[str] = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.split(torch.randperm(len(y), generator=g), 64):
            logits, keep, _ = model({m: v[idx] for m, v in x.items()}, y[idx])
            loss = kept_mean(F.cross_entropy(logits, y[idx], reduction="none"), keep)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        if model.opm is not None and model.opm.last is not None:
            last = model.opm.last
            trace.append(f"q={last.drop_probabilities[0].item():.2f}/{last.dropped[0].item():.2f}")
    return evaluate(model, x_test, y_test), trace


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows: dict[str, list[dict[str, float]]] = {"joint training": [], "joint + OPM": []}
    for seed in range(args.seeds):
        rows["joint training"].append(train(False, args.epochs, seed)[0])
        result, trace = train(True, args.epochs, seed)
        rows["joint + OPM"].append(result)
        if seed == 0:
            print("strong modality, last batch of each epoch: drop probability / dropped fraction")
            print("  " + " ".join(trace))
    print(f"\ntest accuracy, mean ± std over {args.seeds} seed(s), SGD")
    print(f"{'run':<16} {'strong':>13} {'weak':>13} {'fused':>13}")
    for name, results in rows.items():
        cells = []
        for key in ("strong", "weak", "fused"):
            v = torch.tensor([r[key] for r in results])
            spread = v.std().item() if len(v) > 1 else 0.0
            cells.append(f"{v.mean().item():.3f} ± {spread:.3f}")
        print(f"{name:<16} " + " ".join(f"{c:>13}" for c in cells))
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
