"""Run a function in several processes under ``torch.distributed`` (gloo, CPU, 127.0.0.1).

Usage from a test::

    from tests.ddp import run_distributed

    def _body(rank: int, world_size: int, x: torch.Tensor) -> torch.Tensor:
        ...                       # the process group is initialised here
        return result             # anything torch.save can write

    results = run_distributed(_body, x)   # [result of rank 0, result of rank 1]

``fn`` must be a module-level function (it is pickled by name into freshly spawned processes).
Each rank runs with one intra-op thread. A rank that raises makes the call raise with that
rank's traceback; a rank that hangs (a desynchronised collective, say) is killed after
``timeout`` seconds and the call raises ``TimeoutError``. Process groups are always destroyed.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    collective_timeout: float,
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    path = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )
        try:
            result = fn(rank, world_size, *args)
            torch.save(result, path / f"result{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (path / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    # The result is saved and the group destroyed: leave without the interpreter's teardown,
    # where a backend thread still being joined can abort the process ("terminate called
    # without an active exception", exit code -6) after a successful run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_PORT_TAKEN = ("Address already in use", "EADDRINUSE", "address already in use")


def run_distributed(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return results.

    The free port is only free when it is chosen: if another process takes it before the
    group starts (parallel test runs on one machine), the launch is retried on a new port, at
    most twice. Any other failure is reported at once.
    """
    for attempt in range(3):
        try:
            return _run_once(fn, args, world_size, timeout)
        except RuntimeError as err:
            if attempt == 2 or not any(text in str(err) for text in _PORT_TAKEN):
                raise
    raise AssertionError("unreachable")


def _run_once(
    fn: Callable[..., Any], args: tuple[Any, ...], world_size: int, timeout: float
) -> list[Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, out_dir, fn, args, max(timeout / 2, 10.0)),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(deadline - time.monotonic(), 0.0))
        finally:
            hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        errors = {
            rank: (Path(out_dir) / f"error{rank}.txt").read_text()
            for rank in range(world_size)
            if (Path(out_dir) / f"error{rank}.txt").exists()
        }
        if errors:
            rank, text = next(iter(sorted(errors.items())))
            raise RuntimeError(f"rank {rank} of {world_size} failed:\n{text}")
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} did not finish in {timeout:.0f} s")
        bad = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks exited with non-zero codes: {bad}")
        return [
            torch.load(Path(out_dir) / f"result{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]
