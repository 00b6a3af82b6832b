"""The DDP harness and the all-reduce helper: identical on every rank, equal to the global sum."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from imbalance_losses.core.distributed import all_reduce_sum, is_distributed, world_size
from tests.ddp import run_distributed


def test_all_reduce_is_identity_without_process_group() -> None:
    x = torch.arange(3.0, requires_grad=True)
    y = all_reduce_sum(x)
    assert not is_distributed() and world_size() == 1
    assert torch.equal(y, x.detach()) and not y.requires_grad


def _sum_body(rank: int, size: int, chunks: torch.Tensor) -> dict[str, object]:
    local = chunks[rank]
    before = local.clone()
    reduced = all_reduce_sum(local)
    # a sub-group containing only this rank: the sum over it is the local value
    groups = [dist.new_group([r]) for r in range(size)]
    alone = all_reduce_sum(local, group=groups[rank])
    return {
        "reduced": reduced,
        "untouched": torch.equal(local, before),
        "alone": alone,
        "world": world_size(),
        "distributed": is_distributed(),
    }


def test_all_reduce_sums_over_ranks() -> None:
    chunks = torch.randn(2, 5, dtype=torch.float64)
    r0, r1 = run_distributed(_sum_body, chunks)
    torch.testing.assert_close(r0["reduced"], chunks.sum(0))
    assert torch.equal(r0["reduced"], r1["reduced"])
    assert r0["untouched"] and r1["untouched"]
    assert torch.equal(r0["alone"], chunks[0]) and torch.equal(r1["alone"], chunks[1])
    assert r0["world"] == 2 and r0["distributed"]


def _fails(rank: int, size: int) -> None:
    if rank == 1:
        raise ArithmeticError("boom on rank 1")


def _hangs(rank: int, size: int) -> None:
    if rank == 0:
        dist.barrier()  # rank 1 never joins


def test_harness_reports_failures_and_hangs() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*boom on rank 1"):
        run_distributed(_fails)
    with pytest.raises((TimeoutError, RuntimeError)):
        run_distributed(_hangs, timeout=20)


def _running_body(rank: int, size: int, values: torch.Tensor) -> torch.Tensor:
    from imbalance_losses.core.running import RunningSums

    acc = RunningSums()
    for chunk in values[rank].split(2):  # micro-batches of this rank's samples
        acc.add(chunk.sum(0), chunk.shape[0])
    return acc.mean()


def test_running_sums_pool_over_ranks_equals_global_mean() -> None:
    values = torch.rand(2, 6, 3)  # [rank, sample, modality]
    r0, r1 = run_distributed(_running_body, values)
    assert torch.equal(r0, r1)
    torch.testing.assert_close(r0, values.reshape(-1, 3).mean(0))


def _all_ranks_state_body(rank: int, size: int, values: torch.Tensor) -> dict[str, object]:
    from imbalance_losses.core.running import RunningSums

    acc = RunningSums()
    if rank == 0:  # rank 1 added nothing: it joins with zeros
        for chunk in values.split(2):
            acc.add(chunk.sum(0), chunk.shape[0])
    state = acc.all_ranks_state(3, torch.device("cpu"))
    return {"state": state, "kept": acc.state_dict()}


def test_all_ranks_state_holds_every_ranks_sums_and_resets_nothing() -> None:
    """``sums = sum over ranks and micro-batches``, ``count``/``rows`` the samples added on any
    rank; every rank gets the same state, and each rank's own pending sums stay."""
    values = torch.rand(5, 3)
    r0, r1 = run_distributed(_all_ranks_state_body, values)
    for r in (r0, r1):
        state = r["state"]
        torch.testing.assert_close(state["sums"], values.sum(0))
        assert float(state["count"]) == 5.0 and state["rows"] == 5
    assert r0["kept"]["count"] is not None and r1["kept"]["sums"] is None
