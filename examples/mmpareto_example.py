"""MMPareto on synthetic two-modality data with one dominant modality (CPU, a few seconds).

"strong" sees the class with little noise, "weak" with a lot. Three runs from the same start:
the fused loss alone, the uniform baseline (fused + unimodal losses summed, ``loss.backward()``)
and MMPareto (``mmpareto.backward(fused, unimodal)``: per encoder, the sum when the fused and
unimodal gradients agree, their min-norm combination when they conflict, rescaled). Prints the
fused test accuracy, each modality's unimodal test accuracy through the shared head, and how
often MMPareto saw a conflict. Run: ``python examples/mmpareto_example.py [--epochs 6]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalance_losses import unimodal_logits
from imbalance_losses.methods.mmpareto import MMPareto

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

    def forward(self, x: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {m: self.enc[m](x[m]) for m in NOISE}
        return self.head(torch.cat(list(feats.values()), 1)), feats


def train(method: str, epochs: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = sample(2000, g)
    x_test, y_test = sample(1000, g)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mmpareto = MMPareto(dict(model.enc.items()), gamma=1.5)
    conflicts, steps = torch.zeros(len(NOISE)), 0
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(2000, generator=g), 64):
            logits, feats = model({m: v[idx] for m, v in x.items()})
            fused = F.cross_entropy(logits, y[idx])
            uni = {
                m: F.cross_entropy(z, y[idx]) for m, z in unimodal_logits(model.head, feats).items()
            }
            opt.zero_grad()
            if method == "fused only":
                fused.backward()  # type: ignore[no-untyped-call]
            elif method == "uniform sum":
                (fused + sum(uni.values())).backward()  # type: ignore[no-untyped-call]
            else:
                record = mmpareto.backward(fused, uni)
                conflicts += record.conflict.float()
                steps += 1
            opt.step()
    model.eval()
    with torch.no_grad():
        logits, feats = model(x_test)
        out = {"fused": float((logits.argmax(1) == y_test).float().mean())}
        for m, z in unimodal_logits(model.head, feats).items():
            out[m] = float((z.argmax(1) == y_test).float().mean())
    if steps:
        for m, c in zip(NOISE, conflicts.tolist(), strict=True):
            out[f"conflict rate {m}"] = c / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    for method in ("fused only", "uniform sum", "mmpareto"):
        result = train(method, args.epochs, args.seed)
        print(f"{method:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()))
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
