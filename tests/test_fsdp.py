"""FSDP2 (``fully_shard``): the methods on sharded encoders and heads equal one process.

Two gloo ranks on the CPU; each rank holds one shard of every parameter outside the forward.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from imbalance_losses import unimodal_logits
from tests.ddp import run_distributed


def _unimodal_body(rank: int, world: int, xa: Tensor, xb: Tensor) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    head = nn.Linear(7, 3)
    fully_shard(head)
    z = unimodal_logits(head, {"a": xa[rank * 4 : rank * 4 + 4], "b": xb[rank * 4 : rank * 4 + 4]})
    (z["a"] * torch.arange(3.0)).sum().backward()
    return {
        "z": {m: v.detach() for m, v in z.items()},
        "weight_grad": head.weight.grad.full_tensor(),  # type: ignore[union-attr]
        "bias_grad": head.bias.grad.full_tensor(),  # type: ignore[union-attr]
    }


def test_unimodal_logits_of_a_sharded_linear_head_go_through_its_forward() -> None:
    """The exact split ``x_m W_m^T + b / M`` and its gradients, on a ``fully_shard`` head."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)
    results = run_distributed(_unimodal_body, xa, xb)
    torch.manual_seed(0)
    head = nn.Linear(7, 3)
    z = unimodal_logits(head, {"a": xa, "b": xb})
    (z["a"] * torch.arange(3.0)).sum().backward()
    for rank, r in enumerate(results):
        for m in ("a", "b"):
            torch.testing.assert_close(r["z"][m], z[m][rank * 4 : rank * 4 + 4].detach())
    # FSDP2 averages the gradients over the ranks: the mean of the two halves' sums is half
    torch.testing.assert_close(results[0]["weight_grad"], head.weight.grad / 2)
    torch.testing.assert_close(results[0]["bias_grad"], head.bias.grad / 2)
