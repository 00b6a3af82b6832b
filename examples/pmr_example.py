"""PMRLoss on synthetic two-modality data with one dominant modality (CPU, a few seconds).

"strong" sees the class with little noise, "weak" with a lot, so joint training leans on the
strong modality and leaves the weak encoder under-trained. Each epoch the prototypes are
recomputed from a tenth of the training set (as the official code does), and PMR adds the
prototypical cross-entropy of the slower modality with a constant weight alpha (the official
code's rule, the default). Prints, for plain training and for PMR, the
fused test accuracy and each modality's nearest-prototype accuracy (its own, encoder-only skill).
Run: ``python examples/pmr_example.py [--epochs 8] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalance_losses.methods.pmr import PMRLoss, prototype_logits

CLASSES, DIM, WIDTH = 5, 16, 32
NOISE = {"strong": 0.7, "weak": 2.5}


def sample(n: int, g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    centres = torch.randn(len(NOISE), CLASSES, DIM, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = {
        m: centres[i][y] + s * torch.randn(n, DIM, generator=g)
        for i, (m, s) in enumerate(NOISE.items())
    }
    return x, y


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(DIM, WIDTH), nn.ReLU()) for m in NOISE}
        )
        self.head = nn.Linear(WIDTH * len(NOISE), CLASSES)

    def features(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.enc[m](x[m]) for m in NOISE}

    def forward(self, x: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.features(x)
        return self.head(torch.cat(list(feats.values()), 1)), feats


def train(use_pmr: bool, epochs: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = sample(2000, g)
    x_test, y_test = sample(1000, g)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # coefficient="code" is the default: the official code's constant alpha on the slower modality
    pmr = PMRLoss(
        CLASSES, {m: WIDTH for m in NOISE}, alpha=1.0, mu=0.1, entropy_epochs=2, coefficient="code"
    )
    batches = [(torch.arange(i, min(i + 64, 2000))) for i in range(0, 2000, 64)]
    for epoch in range(epochs):
        model.eval()  # prototypes: eval mode, no grad, a tenth of the training set
        pmr.update_prototypes(
            (model.features({m: x[m][idx] for m in NOISE}), y[idx]) for idx in batches[:3]
        )
        model.train()
        pmr.set_epoch(epoch)
        for idx in batches:
            logits, feats = model({m: x[m][idx] for m in NOISE})
            loss = pmr(logits, y[idx], feats) if use_pmr else F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits, feats = model(x_test)
        pmr.update_prototypes([(model.features(x), y)])
        out = {"fused": (logits.argmax(1) == y_test).float().mean().item()}
        for m in NOISE:
            z = prototype_logits(feats[m], pmr.prototypes[m])
            out[m] = (z.argmax(1) == y_test).float().mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"{'':8s} {'fused':>7s} " + " ".join(f"{m + ' (proto)':>15s}" for m in NOISE))
    for name, use in (("plain", False), ("PMR", True)):
        acc = train(use, args.epochs, args.seed)
        print(f"{name:8s} {acc['fused']:7.3f} " + " ".join(f"{acc[m]:15.3f}" for m in NOISE))
    print(f"({time.perf_counter() - start:.1f} s; one seed: differences of a point are noise)")


if __name__ == "__main__":
    main()
