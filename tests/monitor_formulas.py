"""The monitor's values computed from their definitions (docs/diagnosis.md), for the trainer tests.

Independent of the monitor's code: fp64 from the unimodal logits and targets a test recorded on
each training micro-batch and the encoder gradients it copied at each optimiser step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expected_values(
    batches: list[tuple[dict[str, Tensor], Tensor]], grads: list[dict[str, list[Tensor]]]
) -> dict[str, float]:
    """``imbalance/...`` values over the recorded micro-batches and optimiser steps.

    ``batches``: ``(unimodal logits {m: [B, C]}, class targets [B])`` per micro-batch;
    ``grads``: per optimiser step, ``{m: [every gradient tensor of encoder m]}``. Two
    modalities: ``ratio_m = s_m / s_other`` (capped at 100).
    """
    modalities = list(batches[0][0])
    y = torch.cat([t for _, t in batches])
    out: dict[str, float] = {"imbalance/samples": float(len(y))}
    scores = {}
    for m in modalities:
        z = torch.cat([logits[m] for logits, _ in batches]).double()
        out[f"imbalance/{m}/acc"] = (z.argmax(1) == y).double().mean().item()
        p = torch.softmax(z, 1)[torch.arange(len(y)), y]
        scores[m] = p.sum().item()
        out[f"imbalance/{m}/confidence"] = scores[m] / len(y)
    for m in modalities:
        (other,) = [k for k in modalities if k != m]
        out[f"imbalance/{m}/ratio"] = min(scores[m] / scores[other], 100.0)
    if grads:
        norms = {
            m: sum(
                math.sqrt(sum(g.double().square().sum().item() for g in step[m])) for step in grads
            )
            / len(grads)
            for m in modalities
        }
        for m in modalities:
            out[f"imbalance/{m}/grad_norm"] = norms[m]
            out[f"imbalance/{m}/grad_share"] = norms[m] / sum(norms.values())
        out["imbalance/grad_steps"] = float(len(grads))
    return out
