"""MMCosine (``MMCosineHead``): the cosine logits against references written from the formula.

``z_{m,c} = s <f_m, w_{m,c}> / (||f_m|| ||w_{m,c}||)``, ``z = sum_m z_m``, no bias. The
references are written by hand (Python loops over the formula, and the official code's own
two-modality expression), never from the module's output. Invariants (bound, positive
rescaling) are hypothesis properties. The module keeps no statistics: DDP (2 gloo ranks) equals
one process on the global batch, accumulation equals one batch, and resume is bit-exact.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import (
    MappingHead,
    MMCosineHead,
    MMCosineRecord,
    cosine_logits,
    split_weight,
    unimodal_logits,
)
from tests.ddp import run_distributed
from tests.pages import run_page

WIDTHS = {"audio": 3, "visual": 5, "text": 4}


def _feats(batch: int = 6, widths: dict[str, int] = WIDTHS, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in widths.items()}


def _by_hand(feats: dict[str, Tensor], weight: Tensor, s: float) -> dict[str, list[list[float]]]:
    """``z_m[b][c] = s * sum_i x_i w_i / (sqrt(sum x^2) sqrt(sum w^2))``, loops over floats."""
    out: dict[str, list[list[float]]] = {}
    offset = 0
    for m, x in feats.items():
        d = x.shape[1]
        rows = []
        for xb in x.tolist():
            row = []
            for wc in weight[:, offset : offset + d].tolist():
                dot = sum(a * b for a, b in zip(xb, wc, strict=True))
                norm = math.sqrt(sum(a * a for a in xb)) * math.sqrt(sum(b * b for b in wc))
                row.append(s * dot / norm)
            rows.append(row)
        out[m] = rows
        offset += d
    return out


def test_matches_an_explicit_cosine_computation_for_three_modalities() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 4)
    head = MMCosineHead(linear, scaling=7.5)
    feats = _feats()
    ref = _by_hand(feats, linear.weight.detach(), 7.5)
    parts = head.unimodal_logits(feats)
    assert list(parts) == list(WIDTHS)
    for m in WIDTHS:
        torch.testing.assert_close(parts[m], torch.tensor(ref[m]))
    fused = [[sum(ref[m][b][c] for m in WIDTHS) for c in range(4)] for b in range(6)]
    torch.testing.assert_close(head(feats), torch.tensor(fused))
    assert torch.equal(head(feats), parts["audio"] + parts["visual"] + parts["text"])


def test_cross_entropy_equals_the_official_two_modality_loss() -> None:
    """main_CD.py: mm(normalize(a, 1), normalize(W[:, :D].T, 0)) * s, the same for v, summed."""
    torch.manual_seed(1)
    d, s = 8, 10.0
    linear = nn.Linear(2 * d, 6)
    a, v, y = torch.randn(5, d), torch.randn(5, d), torch.tensor([0, 1, 2, 3, 5])
    w = linear.weight.detach()
    out_a = torch.mm(F.normalize(a, dim=1), F.normalize(w[:, :d].t(), dim=0)) * s
    out_v = torch.mm(F.normalize(v, dim=1), F.normalize(w[:, d:].t(), dim=0)) * s
    official = F.cross_entropy(out_a + out_v, y)
    ours = F.cross_entropy(MMCosineHead(linear, scaling=s)({"a": a, "v": v}), y)
    torch.testing.assert_close(ours, official)


def test_per_modality_heads_and_the_pure_functions() -> None:
    torch.manual_seed(2)
    heads = nn.ModuleDict({m: nn.Linear(d, 3) for m, d in WIDTHS.items()})
    head = MMCosineHead(heads, scaling=5.0)
    feats = _feats(4)
    weight = torch.cat([heads[m].weight.detach() for m in WIDTHS], dim=1)
    ref = _by_hand(feats, weight, 5.0)
    for m, z in head.unimodal_logits(feats).items():
        torch.testing.assert_close(z, torch.tensor(ref[m]))
    blocks = split_weight(weight, WIDTHS)
    assert [tuple(b.shape) for b in blocks.values()] == [(3, 3), (3, 5), (3, 4)]
    for m, z in cosine_logits(feats, blocks, 5.0).items():
        torch.testing.assert_close(z, torch.tensor(ref[m]))
    # any order of the features' keys: the logits follow the features' order
    shuffled = {m: feats[m] for m in ("text", "audio", "visual")}
    assert list(head.unimodal_logits(shuffled)) == ["text", "audio", "visual"]


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 4),
    s=st.floats(0.1, 50.0),
    log_scale=st.floats(-6.0, 6.0),
    seed=st.integers(0, 10_000),
)
def test_bound_and_invariance_to_positive_rescaling(
    m: int, s: float, log_scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    widths = {f"m{i}": 2 + i for i in range(m)}
    feats = {k: torch.randn(5, d, generator=g, dtype=torch.float64) for k, d in widths.items()}
    linear = nn.Linear(sum(widths.values()), 3).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(3, sum(widths.values()), generator=g))
    head = MMCosineHead(linear, widths, scaling=s)
    z = head(feats)
    assert bool((z.abs() <= m * s * (1 + 1e-12)).all())
    k = int(torch.randint(m, (1,), generator=g))
    c = int(torch.randint(3, (1,), generator=g))
    scale = math.exp(log_scale)
    rows = torch.rand(5, 1, generator=g, dtype=torch.float64) * scale + 1e-3  # per sample
    scaled = {n: x * rows if i == k else x for i, (n, x) in enumerate(feats.items())}
    torch.testing.assert_close(head(scaled), z)
    offset = sum(list(widths.values())[:k])
    with torch.no_grad():  # rescale w_{k,c}: one class row of one modality's block
        linear.weight[c, offset : offset + widths[f"m{k}"]] *= scale
    torch.testing.assert_close(head(feats), z)


def test_bias_receives_no_gradient_and_the_weight_is_the_users() -> None:
    torch.manual_seed(3)
    linear = nn.Linear(8, 3)
    bias0 = linear.bias.detach().clone()
    head = MMCosineHead(linear, {"a": 3, "b": 5})
    assert head.weight is linear.weight and head.bias is linear.bias
    assert not linear.bias.requires_grad and linear.weight.requires_grad
    assert list(head.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]
    opt = torch.optim.SGD(linear.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    feats = {"a": torch.randn(4, 3), "b": torch.randn(4, 5)}
    before = head(feats).detach()
    F.cross_entropy(head(feats), torch.tensor([0, 1, 2, 0])).backward()
    assert linear.bias.grad is None and linear.weight.grad is not None
    opt.step()  # the optimizer of the user's head trains the cosine classifier
    assert torch.equal(linear.bias, bias0) and not torch.equal(head(feats).detach(), before)
    heads = {"a": nn.Linear(3, 2), "b": nn.Linear(5, 2)}
    per = MMCosineHead(heads)
    F.cross_entropy(per(feats), torch.tensor([0, 1, 1, 0])).backward()
    assert all(h.bias.grad is None and h.weight.grad is not None for h in heads.values())
    assert list(per.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]


def test_eval_logits_equal_training_logits_and_the_record() -> None:
    torch.manual_seed(4)
    head = MMCosineHead(nn.Linear(12, 5), scaling=15.0)
    model = nn.ModuleDict({"head": head})
    feats = _feats(7)
    model.train()
    train = head(feats)
    model.eval()
    with torch.no_grad():
        assert torch.equal(head(feats), train.detach())
    last = head.last
    assert isinstance(last, MMCosineRecord) and last.modalities == tuple(WIDTHS)
    norms = [
        sum(math.sqrt(sum(v * v for v in row)) for row in x.tolist()) / 7 for x in feats.values()
    ]
    torch.testing.assert_close(last.feature_norms, torch.tensor(norms))
    w = head.weight.detach()
    w_norms = [
        w[:, :3].norm(dim=1).mean(),
        w[:, 3:8].norm(dim=1).mean(),
        w[:, 8:].norm(dim=1).mean(),
    ]
    torch.testing.assert_close(last.weight_norms, torch.stack(w_norms))


def test_as_mapping_head_scores_any_subset_for_the_diagnosis_tools() -> None:
    torch.manual_seed(12)
    feats = _feats(5)
    for fusion in (nn.Linear(12, 3), {m: nn.Linear(d, 3) for m, d in WIDTHS.items()}):
        head = MMCosineHead(fusion, WIDTHS)
        mapping = head.as_mapping_head()
        own = head.unimodal_logits(feats)
        for m, z in unimodal_logits(mapping, feats).items():  # the core's function, unchanged
            assert torch.equal(z, own[m])
        pair = mapping.subset(feats, ("audio", "text"))
        assert torch.equal(pair, own["audio"] + own["text"])
        assert torch.equal(mapping(feats), head(feats))
        with pytest.raises(ValueError, match=r"non-empty subset of \['audio', 'visual', 'text'\]"):
            mapping({"depth": feats["audio"]})
    with pytest.raises(ValueError, match="needs widths="):
        MMCosineHead(nn.Linear(12, 3)).as_mapping_head()


def test_tokens_and_a_zero_feature() -> None:
    torch.manual_seed(5)
    linear = nn.Linear(6, 2)
    head = MMCosineHead(linear)
    feats = {"a": torch.randn(2, 4, 2), "b": torch.randn(2, 4, 4)}  # [B, T, D_m]
    flat = head({m: x.reshape(8, -1) for m, x in feats.items()})
    torch.testing.assert_close(head(feats), flat.reshape(2, 4, 2))
    zero = head.unimodal_logits({"a": torch.zeros(3, 2), "b": torch.randn(3, 4)})
    assert torch.equal(zero["a"], torch.zeros(3, 2))  # no evidence from a zero feature


def test_accumulation_equals_one_batch() -> None:
    torch.manual_seed(6)
    linear = nn.Linear(12, 3)
    head = MMCosineHead(linear)
    feats, y = _feats(8), torch.randint(0, 3, (8,))
    F.cross_entropy(head(feats), y).backward()
    full = linear.weight.grad.clone()
    linear.weight.grad = None
    for half in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(head({m: x[half] for m, x in feats.items()}), y[half]) / 2).backward()
    torch.testing.assert_close(linear.weight.grad, full)


class _Model(nn.Module):
    def __init__(self, mapping: bool) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(5, 6)})
        fusion = {"a": nn.Linear(3, 4), "b": nn.Linear(6, 4)} if mapping else nn.Linear(9, 4)
        self.head = MMCosineHead(fusion, scaling=10.0)  # swapped in before DDP wraps the model

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.head({m: torch.relu(enc(x[m])) for m, enc in self.encoders.items()})


def _data(seed: int = 7) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {"a": torch.randn(3, 8, 4, generator=g), "b": torch.randn(3, 8, 5, generator=g)}
    return x, torch.randint(0, 4, (3, 8), generator=g)


def _train(model: nn.Module, steps: range, rank: int = 0, world: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    x, y = _data()
    per = 8 // world
    for t in steps:
        rows = slice(rank * per, (rank + 1) * per)
        loss = F.cross_entropy(model({m: v[t, rows] for m, v in x.items()}), y[t, rows])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ddp_body(rank: int, world_size: int, states: list[dict[str, Tensor]]) -> list[dict]:
    out = []
    for mapping, state in zip((False, True), states, strict=True):
        model = _Model(mapping)
        model.load_state_dict(state)
        ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
        _train(ddp, range(3), rank, world_size)  # the frozen biases: no reducer error
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def test_ddp_two_ranks_equal_one_process_on_the_global_batch() -> None:
    torch.manual_seed(8)
    models = [_Model(False), _Model(True)]
    states = [copy.deepcopy(m.state_dict()) for m in models]
    results = run_distributed(_ddp_body, states)
    for model, per_rank in zip(models, zip(*results, strict=True), strict=True):
        _train(model, range(3))
        for got in per_rank:
            for key, value in model.state_dict().items():
                torch.testing.assert_close(got[key], value, msg=key)


def test_resume_is_bit_exact() -> None:
    torch.manual_seed(9)
    straight = _Model(False)
    resumed = copy.deepcopy(straight)
    x, y = _data(10)
    opt = torch.optim.SGD(straight.parameters(), lr=0.3, momentum=0.9)

    def step(model: nn.Module, optim: torch.optim.Optimizer, t: int) -> None:
        optim.zero_grad()
        F.cross_entropy(model({m: v[t] for m, v in x.items()}), y[t]).backward()
        optim.step()

    for t in range(3):
        step(straight, opt, t)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    for t in range(2):
        step(resumed, opt2, t)
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    fresh = _Model(False)
    fresh.load_state_dict(ckpt["model"])
    opt3 = torch.optim.SGD(fresh.parameters(), lr=0.3, momentum=0.9)
    opt3.load_state_dict(ckpt["opt"])
    step(fresh, opt3, 2)
    for key, value in straight.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_bf16_autocast_is_finite_and_fp32() -> None:
    torch.manual_seed(11)
    model = _Model(False)
    x, y = _data(12)
    xs = {m: v[0] for m, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = {m: torch.relu(enc(xs[m])) for m, enc in model.encoders.items()}
        z = model.head(feats)
    assert all(f.dtype == torch.bfloat16 for f in feats.values())
    assert z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    assert bool((z.abs() <= 2 * 10.0 * (1 + 1e-6)).all())
    ref = model.head({m: f.float() for m, f in feats.items()})  # same features, no autocast
    torch.testing.assert_close(z, ref)
    F.cross_entropy(z, y[0]).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_other_heads_are_refused_with_what_the_method_needs() -> None:
    for head, name in (
        (MappingHead(lambda f: sum(f.values())), "MappingHead"),
        (nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), "Sequential"),
    ):
        needs = rf"needs the model's final nn.Linear over the concatenated .* Got {name}, which"
        with pytest.raises(TypeError, match=needs):
            MMCosineHead(head)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"heads\['b'\] is Sequential"):
        MMCosineHead({"a": nn.Linear(2, 3), "b": nn.Sequential(nn.Linear(2, 3))})  # type: ignore[dict-item]


def test_bad_input_names_the_modality_and_the_shapes() -> None:
    linear = nn.Linear(8, 3)
    with pytest.raises(ValueError, match=r"add up to 7 but the nn\.Linear head has in_features=8"):
        MMCosineHead(linear, {"a": 3, "b": 4})
    with pytest.raises(ValueError, match="scaling must be > 0"):
        MMCosineHead(linear, scaling=0.0)
    with pytest.raises(ValueError, match="same out_features"):
        MMCosineHead({"a": nn.Linear(2, 3), "b": nn.Linear(2, 4)})
    with pytest.raises(ValueError, match="'scaling' clashes"):
        MMCosineHead({"scaling": nn.Linear(2, 3), "b": nn.Linear(2, 3)})
    with pytest.raises(ValueError, match="differ from the heads' in_features"):
        MMCosineHead({"a": nn.Linear(2, 3), "b": nn.Linear(2, 3)}, {"a": 2, "b": 3})
    head = MMCosineHead(linear, {"a": 3, "b": 5})
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"features\['b'\] of shape \(2, 4\) do not fit"):
        head({"a": a, "b": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="different order"):
        head({"b": b, "a": a})
    with pytest.raises(ValueError, match="at least two modalities"):
        head({"a": a})
    with pytest.raises(ValueError, match=r"non-finite .* in features\['a'\] of shape \(2, 3\):"):
        head({"a": torch.full((2, 3), float("nan")), "b": b})
    with torch.no_grad():
        linear.weight[0, 4] = float("inf")
    with pytest.raises(
        ValueError, match=r"non-finite values \(NaN or inf\) in the weight block of 'b':"
    ):
        head({"a": a, "b": b})
    with pytest.raises(ValueError, match=r"not fit"):  # one modality of the subset head is wrong
        head.as_mapping_head()({"b": a})
    with pytest.raises(TypeError, match=r"features\['a'\].*floating point"):
        head({"a": torch.ones(2, 3, dtype=torch.long), "b": b})
    with pytest.raises(ValueError, match="batch size mismatch"):
        head({"a": a, "b": torch.randn(3, 5)})
    free = MMCosineHead(nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"in_features=8.*give 9 \(a: \(2, 4\), b: \(2, 5\)\)"):
        free({"a": torch.randn(2, 4), "b": b})
    with pytest.raises(ValueError, match="same leading shape"):
        free({"a": torch.randn(2, 1, 3), "b": b})
    per = MMCosineHead({"a": nn.Linear(3, 2), "b": nn.Linear(5, 2)})
    with pytest.raises(ValueError, match=r"no weight block for \['c'\]"):
        per({"a": a, "c": b})


def test_the_docs_page_runs_as_written(tmp_path: Path) -> None:
    ns = run_page("mmcosine.md", tmp_path)
    head, feats = ns["head"], ns["feats"]
    assert ns["logits"].shape == (32, 6) and ns["fusion_head"].weight is head.weight
    assert ns["fusion_head"].bias.grad is None and ns["fusion_head"].weight.grad is not None
    torch.testing.assert_close(sum(ns["per_modality"].values()), head(feats).detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_equals_the_cpu_fp32_logits() -> None:
    torch.manual_seed(13)
    linear = nn.Linear(12, 4)
    feats = _feats(6)
    ref = MMCosineHead(copy.deepcopy(linear))(feats)
    head = MMCosineHead(linear.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = head({m: x.cuda().requires_grad_() for m, x in feats.items()})
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.detach().cpu(), ref.detach())
    z.sum().backward()
    assert linear.bias.grad is None and bool(torch.isfinite(linear.weight.grad).all())
