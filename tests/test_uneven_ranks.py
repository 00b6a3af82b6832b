"""Under DDP a rank with no samples in a step still joins the pooling: no hang, same decision.

The other ranks' statistics decide the coefficient, exactly as one process would on the samples
that exist (an uneven last batch, say). One launch covers the modulator and ARL's step() mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imbalance_losses import ARLLoss, ModalityGradientModulator
from tests.ddp import run_distributed


def _model() -> tuple[nn.ModuleDict, nn.Linear]:
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(3, 4), "v": nn.Linear(2, 4)}), nn.Linear(8, 3)


def _data() -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(6, 3, generator=g), "v": torch.randn(6, 2, generator=g)}
    z = {"a": torch.randn(6, 3, generator=g) * 2, "v": torch.randn(6, 3, generator=g)}
    return x, torch.randint(3, (6,), generator=g), z, torch.randint(3, (6,), generator=g)


def _arl_steps(
    enc: nn.ModuleDict, head: nn.Linear, batches: list[tuple[dict[str, Tensor], Tensor] | None]
) -> list[Tensor]:
    """One ARL step() per entry (``None``: no forward here); ``cat(beta, V)`` of each step.

    The variances depend on the pooled sample count (the coefficients alone are scale-free).
    """
    arl = ARLLoss(head=head, encoders=dict(enc.items()))
    out = []
    for batch in batches:
        enc.zero_grad()
        if batch is not None:
            x, y = batch
            feats = {m: enc[m](v) for m, v in x.items()}
            arl(head(torch.cat(list(feats.values()), 1)), y, feats).backward()
        record = arl.step()
        out.append(torch.cat([record.coefficients, record.variances]))
    return out


def _body(rank: int, size: int) -> dict[str, object]:
    x, y, z, t = _data()
    enc, head = _model()
    mod = ModalityGradientModulator(dict(enc.items()), alpha=0.8, method="ogm")
    for p in enc.parameters():
        p.grad = torch.ones_like(p)
    # rank 0 has the whole batch, rank 1 none
    k = mod.step(z, t) if rank == 0 else mod.step()
    assert mod.last is not None
    samples = mod.last.num_samples
    grads = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
    # ARL: rank 1 is empty on the very first step, both have half the batch on the second,
    # only rank 0 has samples on the third
    half = {m: v[3 * rank : 3 * rank + 3] for m, v in x.items()}, y[3 * rank : 3 * rank + 3]
    first = {m: v[:3] for m, v in x.items()}, y[:3]
    mine = first if rank == 0 else None
    coefs = _arl_steps(enc, head, [mine, half, mine])
    # every rank empty: every rank raises, nobody hangs
    errors = []
    for fn in (mod.step, ARLLoss(head=head, encoders=dict(enc.items())).step):
        try:
            fn()
        except RuntimeError as err:
            errors.append(str(err))
    return {"k": k, "samples": samples, "grads": grads, "arl": coefs, "errors": errors}


def test_a_rank_without_samples_joins_and_gets_the_same_decision() -> None:
    r0, r1 = run_distributed(_body)
    x, y, z, t = _data()
    # one process: the modulator on the whole batch, ARL on the whole batch then rank 0's half
    enc, head = _model()
    mod = ModalityGradientModulator(dict(enc.items()), alpha=0.8, method="ogm")
    for p in enc.parameters():
        p.grad = torch.ones_like(p)
    k = mod.step(z, t)
    first = {m: v[:3] for m, v in x.items()}, y[:3]
    coefs = _arl_steps(enc, head, [first, (x, y), first])
    for r in (r0, r1):
        torch.testing.assert_close(r["k"], k)
        assert r["samples"] == 6
        assert len(r["errors"]) == 2 and all("on every rank" in e for e in r["errors"])
        assert not torch.equal(k, torch.ones(2))  # the modulation did act
        for got, want in zip(r["arl"], coefs, strict=True):
            torch.testing.assert_close(got, want)
    assert len(r0["grads"]) == 4
    for g0, g1 in zip(r0["grads"], r1["grads"], strict=True):
        assert torch.equal(g0, g1)
