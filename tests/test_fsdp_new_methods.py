"""FSDP2 (``fully_shard``) for MLA, ReconBoost, sample-level valuation, UMT and MMCosine.

Two gloo ranks on the CPU, each with half of every batch, against one process on the whole
batch (FSDP2's gradient is the mean over the ranks, the one-process gradient of the whole
batch's mean loss), as in ``tests/test_fsdp.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import imbalance_losses as il
from tests.ddp import run_distributed


def _data(rows: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(rows, 5, generator=g),
        torch.randn(rows, 6, generator=g),
        torch.randint(0, 3, (rows,), generator=g),
    )


def _encoders(width_b: int = 4) -> nn.ModuleDict:
    return nn.ModuleDict({"a": nn.Linear(5, 4), "b": nn.Linear(6, width_b)})


def _shard(world: int, *modules: nn.Module) -> None:
    """``fully_shard`` each module when there is more than one rank (the reference: none)."""
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for module in modules:
            fully_shard(module)


def _full(named: Any) -> dict[str, Tensor]:
    """The full parameters (``full_tensor()`` of a sharded one), detached copies."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in named
    }


def _rows(step: int, rank: int, world: int, batch: int = 8) -> slice:
    """Batch ``step``'s share of ``rank``: ``batch / world`` consecutive rows."""
    per = batch // world
    return slice(batch * step + rank * per, batch * step + rank * per + per)


def _close(sharded: list[dict[str, Any]], one: dict[str, Any]) -> None:
    for r in sharded:
        for name, value in one.items():
            if isinstance(value, Tensor):
                torch.testing.assert_close(r[name], value, atol=1e-5, rtol=1e-5, msg=name)
            else:
                assert r[name] == value, name


# ------------------------------------------------------------------------------------ MLA


def _mla_train(rank: int, world: int, data: Any) -> dict[str, Any]:
    """Three batches of MLA (2 unimodal steps each) through a shared linear head."""
    torch.manual_seed(0)
    enc, head = _encoders(), nn.Linear(4, 3)
    _shard(world, *enc.values(), head)
    mla = il.AlternatingUnimodalAdaptation(head, batches_per_epoch=3)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.5)
    xa, xb, y = data
    for i in range(3):
        rows = _rows(i, rank, world)
        x = {"a": xa[rows], "b": xb[rows]}
        mla.train_step({m: enc[m](x[m]) for m in x}, y[rows], opt)
    assert mla.last is not None
    return {
        **_full([*enc.named_parameters(), *head.named_parameters()]),
        "projector": mla.projector.clone(),
        "alpha": mla.last.alpha,
        "projected": mla.last.projected,
        "steps": mla.steps,
    }


def test_mla_sharded_equals_one_process() -> None:
    data = _data()
    _close(run_distributed(_mla_train, data), _mla_train(0, 1, data))


# ----------------------------------------------------------------------------- ReconBoost


def _sgd(params: list[Tensor], phase: str, stage: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _reconboost_train(rank: int, world: int, data: Any) -> dict[str, Any]:
    """Four one-batch epochs: boost ``a``, rectify, boost ``b`` (consolidation on), rectify."""
    torch.manual_seed(0)
    enc, head = _encoders(), nn.Linear(4, 3)
    _shard(world, *enc.values(), head)
    rb = il.ReconBoost(
        enc, {"a": head, "b": head}, boost_epochs=1, rectify_epochs=1,
        consolidation="gradient", optimizer_factory=_sgd,
    )  # fmt: skip
    xa, xb, y = data
    out: dict[str, Any] = {}
    for i in range(4):
        rows = _rows(i, rank, world)
        loss = rb({"a": enc["a"](xa[rows]), "b": enc["b"](xb[rows])}, y[rows])
        rb.optimizer.zero_grad()
        loss.backward()
        rb.optimizer.step()
        assert rb.last is not None
        out[f"{i}/stage"], out[f"{i}/boosting"] = rb.last.stage, rb.last.boosting
        out[f"{i}/loss"] = rb.last.loss  # this rank's half: the mean of the ranks' is compared
        out[f"{i}/beta"] = rb.last.beta
        rb.epoch_end()
    return {**_full([*enc.named_parameters(), *head.named_parameters()]), "beta": rb.beta, **out}


def _equal_to_one_process(train: Any, key: str, rounds: int) -> None:
    """``train`` on 2 sharded ranks equals one process; ``key`` (a per-sample mean of each
    round, over two equal halves) is the mean of the ranks' values."""
    data = _data()
    sharded, one = run_distributed(train, data), train(0, 1, data)
    for i in range(rounds):
        mean = (sharded[0][f"{i}/{key}"] + sharded[1][f"{i}/{key}"]) / 2
        torch.testing.assert_close(mean, one.pop(f"{i}/{key}"), atol=1e-5, rtol=1e-5)
    _close(sharded, one)


def test_reconboost_sharded_equals_one_process() -> None:
    _equal_to_one_process(_reconboost_train, "loss", 4)


# -------------------------------------------------------------------------------- valuation


def _valuation_train(rank: int, world: int, data: Any) -> dict[str, Any]:
    """Epoch 0 (two batches), the valuation of the 16 samples, two batches of epoch 1's plan."""
    torch.manual_seed(0)
    enc, head = _encoders(), nn.Linear(8, 3)
    _shard(world, *enc.values(), head)
    val = il.SampleModalityValuation(head, ["a", "b"], num_samples=16, warmup=1, seed=3)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.5)
    xa, xb, y = data
    masks = il.MaskedDataset(range(16), 2).masks

    def step(index: Tensor, keep: Tensor) -> None:
        f = il.apply_mask({"a": enc["a"](xa[index]), "b": enc["b"](xb[index])}, keep)
        opt.zero_grad()
        nn.functional.cross_entropy(head(torch.cat(list(f.values()), 1)), y[index]).backward()
        opt.step()

    for i in range(2):
        index = torch.arange(16)[_rows(i, rank, world)]
        step(index, masks[torch.full((len(index),), 3)])
    shares = torch.tensor(list(val.value_indices())).split(3)
    record = val.epoch_end(
        0, shares, forward=lambda i: ({"a": enc["a"](xa[i]), "b": enc["b"](xb[i])}, y[i], i)
    )
    assert record is not None
    val.sampler.set_epoch(1)
    entries = torch.tensor(list(val.sampler))  # rank r: the plan's positions r, r + R, ...
    per = 8 // world
    for i in range(2):  # both ranks' i-th batches: positions 8 i .. 8 i + 7 of one process
        batch = entries[i * per : i * per + per]
        step(batch[:, 0], masks[batch[:, 1]])
    return {
        **_full([*enc.named_parameters(), *head.named_parameters()]),
        "mean_phi": record.mean_phi, "copies": record.copies, "accuracy": record.accuracy,
        "plan_size": record.plan_size, "index": val.sampler.index, "bits": val.sampler.bits,
    }  # fmt: skip


def test_valuation_sharded_equals_one_process() -> None:
    data = _data(16)
    _close(run_distributed(_valuation_train, data), _valuation_train(0, 1, data))


# -------------------------------------------------------------------------------------- UMT


def _umt_train(rank: int, world: int, data: Any) -> dict[str, Any]:
    """Three steps, the term on for the first two; ``b``'s adapter is ``umt``'s parameter."""
    torch.manual_seed(0)
    enc, head = _encoders(width_b=3), nn.Linear(7, 3)
    teachers = {"a": nn.Linear(5, 4), "b": nn.Linear(6, 4)}
    umt = il.UnimodalTeacherLoss(
        teachers, scaling={"a": 10.0, "b": 2.0}, adapters={"b": nn.Linear(3, 4)}, stop_step=2
    )
    _shard(world, *enc.values(), head, umt)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters(), *umt.parameters()], lr=0.5)
    umt.attach(opt)
    xa, xb, y = data
    out: dict[str, Any] = {}
    for i in range(3):
        rows = _rows(i, rank, world)
        x = {"a": xa[rows], "b": xb[rows]}
        f = {m: enc[m](x[m]) for m in x}
        opt.zero_grad()
        umt(head(torch.cat(list(f.values()), 1)), y[rows], features=f, inputs=x).backward()
        opt.step()
        assert umt.last is not None
        out[f"{i}/active"], out[f"{i}/distillation"] = umt.last.active, umt.last.distillation
    named = [*enc.named_parameters(), *head.named_parameters(), *umt.named_parameters()]
    return {**_full(named), **out, "steps": umt.steps}


def test_umt_sharded_equals_one_process() -> None:
    _equal_to_one_process(_umt_train, "distillation", 2)


# --------------------------------------------------------------------------------- MMCosine


def _mmcosine_train(rank: int, world: int, data: Any) -> dict[str, Any]:
    """Three steps of ``CE(MMCosineHead(feats))``, the MMCosineHead itself ``fully_shard``-ed."""
    torch.manual_seed(0)
    enc = _encoders()
    head = il.MMCosineHead(nn.Linear(8, 3), widths={"a": 4, "b": 4})
    _shard(world, *enc.values(), head)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.5)
    xa, xb, y = data
    out: dict[str, Any] = {}
    for i in range(3):
        rows = _rows(i, rank, world)
        opt.zero_grad()
        logits = head({"a": enc["a"](xa[rows]), "b": enc["b"](xb[rows])})
        nn.functional.cross_entropy(logits, y[rows]).backward()
        opt.step()
        assert head.last is not None
        out[f"{i}/feature_norms"] = head.last.feature_norms
        out[f"{i}/weight_norms"] = head.last.weight_norms
    f = {"a": torch.tanh(xa[:4, :4]), "b": torch.tanh(xb[:4, :4])}
    with torch.no_grad():
        if world > 1:  # outside its forward the weight is sharded: refused, then gathered
            out["refused"] = _refusal(lambda: head.unimodal_logits(f))
            out["refused_subsets"] = _refusal(lambda: il.unimodal_logits(head.as_mapping_head(), f))
            head.unshard()  # type: ignore[operator]
        out["parts"] = head.unimodal_logits(f)
        if world > 1:
            head.reshard()  # type: ignore[operator]
            from torch.distributed.fsdp import fully_shard

            sharded_first = fully_shard(nn.Linear(8, 3))
            out["refused_wrap"] = _refusal(lambda: il.MMCosineHead(sharded_first))
    return {**_full([*enc.named_parameters(), *head.named_parameters()]), **out}


def _refusal(call: Any) -> str:
    try:
        call()
    except NotImplementedError as err:
        return str(err)
    return ""


def test_mmcosine_sharded_head_equals_one_process_or_refuses_clearly() -> None:
    """Training through the ``fully_shard``-ed MMCosineHead's forward equals one process; its
    per-modality logits outside the forward (the weight sharded) are refused with the way out,
    which gives the one-process values; a head sharded before wrapping is refused."""
    data = _data()
    sharded, one = run_distributed(_mmcosine_train, data), _mmcosine_train(0, 1, data)
    for i in range(3):  # a per-row mean over two equal halves
        mean = (sharded[0][f"{i}/feature_norms"] + sharded[1][f"{i}/feature_norms"]) / 2
        torch.testing.assert_close(mean, one.pop(f"{i}/feature_norms"), atol=1e-5, rtol=1e-5)
    for r in sharded:
        for key in ("refused", "refused_subsets"):
            assert "sharded outside its forward" in r[key] and "head.unshard()" in r[key]
        assert (
            "already FSDP2-sharded" in r["refused_wrap"]
            and "MMCosineHead(head)" in r["refused_wrap"]
        )
        for m in ("a", "b"):
            torch.testing.assert_close(r["parts"][m], one["parts"][m], atol=1e-5, rtol=1e-5)
    _close(sharded, {k: v for k, v in one.items() if k != "parts"})
