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


# ------------------------------------------------------------------ every method, 3 SGD steps


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(5, 3), "b": nn.Linear(6, 4)})
        self.head = nn.Linear(7, 3)

    def features(self, xa: Tensor, xb: Tensor) -> dict[str, Tensor]:
        return {"a": torch.tanh(self.encoders["a"](xa)), "b": torch.tanh(self.encoders["b"](xb))}


def _data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(48, 5, generator=g),
        torch.randn(48, 6, generator=g),
        torch.randint(0, 3, (48,), generator=g),
    )


def _method_step(method: str, model: _Model) -> Any:
    """``step(features, target)``: the method's loss and backward, as its docs page shows."""
    import imbalance_losses as il

    ce = nn.CrossEntropyLoss()

    def fused(f: dict[str, Tensor]) -> Tensor:
        return model.head(torch.cat(list(f.values()), 1))

    if method == "joint":
        return lambda f, y: ce(fused(f), y).backward()
    if method == "agm":
        agm = il.AdaptiveGradientModulator(model.head, alpha=1.0)
        return lambda f, y: ce(fused(agm(f, y)), y).backward()
    if method == "agm_encoders":
        agm = il.AdaptiveGradientModulator(model.head, alpha=1.0, encoders=model.encoders)

        def agm_step(f: dict[str, Tensor], y: Tensor) -> None:
            ce(fused(agm(f, y)), y).backward()
            agm.step()

        return agm_step
    if method == "gblend":
        blend = il.GradientBlending(head=model.head, modalities=["a", "b"])
        blend.set_weights({"a": 0.3, "b": 0.5, "fused": 1.0})
        return lambda f, y: blend(fused(f), y, features=f).backward()
    if method == "pmr":
        pmr = il.PMRLoss(3, {"a": 3, "b": 4}, alpha=1.0)

        def pmr_step(f: dict[str, Tensor], y: Tensor) -> None:
            with torch.no_grad():
                pmr.update_prototypes([({m: x.detach() for m, x in f.items()}, y)])
            pmr(fused(f), y, f).backward()

        return pmr_step
    if method in ("arl", "arl_encoders"):
        encoders = model.encoders if method == "arl_encoders" else None
        arl = il.ARLLoss(head=model.head, temperature=4.0, encoders=encoders)

        def arl_step(f: dict[str, Tensor], y: Tensor) -> None:
            arl(fused(f), y, features=f).backward()
            if encoders is not None:
                arl.step()

        return arl_step
    if method == "ogm":
        ogm = il.ModalityGradientModulator(dict(model.encoders.items()), alpha=0.8, method="ogm")

        def ogm_step(f: dict[str, Tensor], y: Tensor) -> None:
            ce(fused(f), y).backward()
            with torch.no_grad():
                ogm.step(il.unimodal_logits(model.head, {m: x.detach() for m, x in f.items()}), y)

        return ogm_step
    if method == "opm":  # p_exe = 0: the drop is never executed (its draws are per rank)
        opm = il.ModalityPredictionModulator(["a", "b"], head=model.head, p_exe=0.0)

        def opm_step(f: dict[str, Tensor], y: Tensor) -> None:
            out = opm(f, y)
            per_sample = nn.functional.cross_entropy(fused(out.features), y, reduction="none")
            il.kept_mean(per_sample, out.keep).backward()
            assert opm.last is not None

        return opm_step
    raise ValueError(method)


def _train(rank: int, world: int, method: str, data: Any, shard: bool) -> dict[str, Tensor]:
    """Three SGD steps of 16 rows (each rank its share); the full parameters after them."""
    torch.manual_seed(0)
    model = _Model()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for enc in model.encoders.values():
            fully_shard(enc)
        fully_shard(model.head)
    step = _method_step(method, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    xa, xb, y = data
    per = 16 // world
    for i in range(3):
        rows = slice(16 * i + rank * per, 16 * i + rank * per + per)
        opt.zero_grad()
        step(model.features(xa[rows], xb[rows]), y[rows])
        opt.step()
    full = {}
    for name, p in model.named_parameters():
        full[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
    return full


METHODS = ("joint", "agm", "agm_encoders", "gblend", "pmr", "arl", "arl_encoders", "ogm", "opm")


def _fsdp_body(rank: int, world: int, data: Any) -> dict[str, dict[str, Tensor]]:
    return {method: _train(rank, world, method, data, shard=True) for method in METHODS}


def test_sharded_encoders_and_head_equal_one_process() -> None:
    """Every method in one pair of processes (a spawn costs seconds)."""
    data = _data()
    results = run_distributed(_fsdp_body, data)
    for method in METHODS:
        reference = _train(0, 1, method, data, shard=False)
        for r in results:
            for name, value in reference.items():
                torch.testing.assert_close(
                    r[method][name], value, atol=1e-5, rtol=1e-5, msg=f"{method}: {name}"
                )


def _mmpareto_body(rank: int, world: int) -> str:
    from torch.distributed.fsdp import fully_shard

    import imbalance_losses as il

    model = _Model()
    for enc in model.encoders.values():
        fully_shard(enc)
    try:
        il.MMPareto(dict(model.encoders.items()))
    except NotImplementedError as err:
        return str(err)
    return ""


def test_mmpareto_refuses_sharded_parameters_clearly() -> None:
    for message in run_distributed(_mmpareto_body):
        assert "FSDP2" in message and "['a', 'b']" in message


def _bf16_body(rank: int, world: int, data: Any) -> dict[str, Tensor]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import imbalance_losses as il

    torch.manual_seed(0)
    model = _Model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for enc in model.encoders.values():
        fully_shard(enc, mp_policy=policy)
    fully_shard(model.head, mp_policy=policy)
    agm = il.AdaptiveGradientModulator(model.head, alpha=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    xa, xb, y = data
    for i in range(3):
        rows = slice(16 * i + rank * 8, 16 * i + rank * 8 + 8)
        opt.zero_grad()
        feats = agm(model.features(xa[rows], xb[rows]), y[rows])
        assert feats["a"].dtype == torch.bfloat16
        logits = model.head(torch.cat(list(feats.values()), 1))
        torch.nn.functional.cross_entropy(logits.float(), y[rows]).backward()
        opt.step()
    assert agm.last is not None
    return {"k": agm.last.coefficients, "weight": model.head.weight.full_tensor()}  # type: ignore[operator]


def test_bf16_mixed_precision_policy_is_accepted_and_stays_finite() -> None:
    results = run_distributed(_bf16_body, _data())
    for r in results:
        assert r["k"].dtype == torch.float32 and bool(torch.isfinite(r["k"]).all())
        assert bool(torch.isfinite(r["weight"]).all())
    torch.testing.assert_close(results[0]["k"], results[1]["k"])


def _ogm_ge_body(rank: int, world: int, data: Any) -> dict[str, Tensor]:
    """One OGM-GE step on sharded encoders: the full gradients before and after, and k."""
    import imbalance_losses as il

    torch.manual_seed(0)
    encoders = nn.ModuleDict({"a": nn.Linear(40, 64), "b": nn.Linear(30, 64)})
    head = nn.Linear(128, 3)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for enc in encoders.values():
            fully_shard(enc)
        fully_shard(head)
    ogm = il.ModalityGradientModulator(dict(encoders.items()), alpha=0.8, seed=3)
    xa, xb, y = data
    per = 32 // world
    rows = slice(rank * per, rank * per + per)
    f = {"a": encoders["a"](xa[rows]), "b": encoders["b"](xb[rows])}
    nn.functional.cross_entropy(head(torch.cat(list(f.values()), 1)), y[rows]).backward()

    def full(t: Any) -> Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    before = {m: full(e.weight.grad) for m, e in encoders.items()}
    with torch.no_grad():
        record = ogm.step(il.unimodal_logits(head, {m: x.detach() for m, x in f.items()}), y[rows])
    after = {m: full(e.weight.grad) for m, e in encoders.items()}
    return {
        "k": record,
        **{f"before/{m}": before[m] for m in before},
        **{f"after/{m}": after[m] for m in after},
    }


def test_ogm_ge_noise_over_shards_has_the_moments_of_one_process() -> None:
    """The noise is drawn per shard (its own stream per rank); its scale is the whole
    gradient's std (sums all-reduced over the shards): the same k and std as one process, and
    standardised noise of mean 0 and variance 1 over the full tensor."""
    g = torch.Generator().manual_seed(7)
    data = (
        torch.randn(32, 40, generator=g),
        torch.randn(32, 30, generator=g),
        torch.randint(0, 3, (32,), generator=g),
    )
    sharded = run_distributed(_ogm_ge_body, data)
    one = _ogm_ge_body(0, 1, data)
    torch.testing.assert_close(sharded[0]["k"], one["k"])
    torch.testing.assert_close(sharded[0]["after/a"], sharded[1]["after/a"])  # one full tensor
    for i, m in enumerate(("a", "b")):
        before = one[f"before/{m}"]
        torch.testing.assert_close(sharded[0][f"before/{m}"], before, atol=1e-6, rtol=1e-5)
        std = float(before.std())
        z = (sharded[0][f"after/{m}"] - float(one["k"][i]) * before) / std
        z_one = (one[f"after/{m}"] - float(one["k"][i]) * before) / std
        for noise in (z, z_one):  # 2560 and 1920 draws: mean within 0.1, variance within 15 %
            assert abs(float(noise.mean())) < 0.1 and 0.85 < float(noise.var()) < 1.15
        assert not torch.allclose(z, z_one)  # drawn per shard, not the one-process stream


def _boost_train(rank: int, world: int, data: Any) -> dict[str, Tensor]:
    """Sustained boosting with its own heads: the encoders and the boosting module sharded."""
    import imbalance_losses as il

    torch.manual_seed(0)
    model = _Model()
    boost = il.SustainedBoostingLoss(
        num_classes=3, in_features={"a": 3, "b": 4}, check_every=2, seed=0
    )
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for enc in model.encoders.values():
            fully_shard(enc)
        fully_shard(boost)
    opt = torch.optim.SGD([*model.encoders.parameters(), *boost.parameters()], lr=0.5)
    boost.attach_optimizer(opt)
    xa, xb, y = data
    per = 16 // world
    for i in range(3):  # a head check after step 2
        rows = slice(16 * i + rank * per, 16 * i + rank * per + per)
        opt.zero_grad()
        boost(model.features(xa[rows], xb[rows]), y[rows]).backward()
        opt.step()
    named = [*model.encoders.named_parameters(), *boost.named_parameters()]
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()  # type: ignore[operator]
        for n, p in named
    }


def test_sustained_boosting_sharded_equals_one_process() -> None:
    data = _data()
    sharded = run_distributed(_boost_train, data)
    one = _boost_train(0, 1, data)
    for name, value in one.items():
        torch.testing.assert_close(sharded[0][name], value, atol=1e-5, rtol=1e-5, msg=name)
