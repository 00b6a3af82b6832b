"""unimodal_logits: the exact linear split, per-modality heads, zero-padding, and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from imbalance_losses import unimodal_logits

NAMES = ["audio", "visual", "text", "depth", "flow"]


@st.composite
def linear_setup(draw: st.DrawFn) -> tuple[nn.Linear, dict[str, torch.Tensor], torch.dtype]:
    m = draw(st.integers(2, 5))
    widths = draw(st.lists(st.integers(1, 17), min_size=m, max_size=m))
    batch = draw(st.integers(1, 9))
    classes = draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(sum(widths), classes, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(classes, generator=g, dtype=dtype))
    feats = {
        NAMES[i]: torch.randn(batch, w, generator=g, dtype=dtype) for i, w in enumerate(widths)
    }
    return head, feats, dtype


@given(linear_setup())
def test_linear_split_sums_to_fused_logits(
    setup: tuple[nn.Linear, dict[str, torch.Tensor], torch.dtype],
) -> None:
    head, feats, dtype = setup
    z = unimodal_logits(head, feats)
    assert list(z) == list(feats)
    fused = head(torch.cat(list(feats.values()), dim=-1))
    total = torch.stack(list(z.values())).sum(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(total, fused, rtol=tol, atol=tol)


@given(linear_setup())
def test_linear_split_matches_the_formula(
    setup: tuple[nn.Linear, dict[str, torch.Tensor], torch.dtype],
) -> None:
    """z_m = x_m W_m^T + b/M, W_m the columns of modality m, computed here independently."""
    head, feats, _ = setup
    z = unimodal_logits(head, feats)
    m = len(feats)
    offset = 0
    for name, x in feats.items():
        w = head.weight.detach()[:, offset : offset + x.shape[1]]
        expected = x @ w.T
        if head.bias is not None:
            expected = expected + head.bias.detach() / m
        torch.testing.assert_close(z[name].detach(), expected)
        offset += x.shape[1]


def test_linear_split_adds_no_parameters_and_keeps_gradients() -> None:
    head = nn.Linear(5, 3)
    before = [p.clone() for p in head.parameters()]
    a = torch.randn(4, 2, requires_grad=True)
    v = torch.randn(4, 3, requires_grad=True)
    z = unimodal_logits(head, {"a": a, "v": v})
    z["a"].sum().backward()
    assert a.grad is not None and v.grad is None
    # d/dx_a sum(x_a W_a^T) = column sums of W_a
    torch.testing.assert_close(a.grad, head.weight[:, :2].sum(0).expand(4, 2).detach())
    assert sum(1 for _ in head.parameters()) == 2
    assert all(torch.equal(p, q) for p, q in zip(before, head.parameters(), strict=True))


def test_fp16_and_bf16_features() -> None:
    torch.manual_seed(0)
    head32 = nn.Linear(6, 4)
    feats32 = {"a": torch.randn(3, 2), "b": torch.randn(3, 4)}
    w, b = head32.weight.detach(), head32.bias.detach()
    expected = {"a": feats32["a"] @ w[:, :2].T + b / 2, "b": feats32["b"] @ w[:, 2:].T + b / 2}
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        head = nn.Linear(6, 4).to(dtype)
        head.load_state_dict(head32.state_dict())
        z = unimodal_logits(head, {m: x.to(dtype) for m, x in feats32.items()})
        for m, t in z.items():
            assert t.dtype == dtype
            torch.testing.assert_close(t.float(), expected[m], atol=tol, rtol=tol)


def test_per_modality_heads_sum_fusion() -> None:
    torch.manual_seed(0)
    heads = nn.ModuleDict({"audio": nn.Linear(4, 3), "visual": nn.Linear(6, 3)})
    feats = {"audio": torch.randn(5, 4), "visual": torch.randn(5, 6)}
    z = unimodal_logits(heads, feats)
    torch.testing.assert_close(z["audio"], heads["audio"](feats["audio"]))
    torch.testing.assert_close(z["visual"], heads["visual"](feats["visual"]))
    plain = {"audio": heads["audio"], "visual": heads["visual"]}
    z2 = unimodal_logits(plain, dict(reversed(list(feats.items()))))
    assert list(z2) == ["visual", "audio"]


def test_generic_head_zeroes_other_modalities() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    a, v = torch.randn(4, 2), torch.randn(4, 3)
    z = unimodal_logits(mlp, {"a": a, "v": v})
    torch.testing.assert_close(z["a"], mlp(torch.cat([a, torch.zeros(4, 3)], 1)))
    torch.testing.assert_close(z["v"], mlp(torch.cat([torch.zeros(4, 2), v], 1)))
    # a lambda wrapping a two-argument (FiLM-style) head
    film = lambda x: x[:, :2].sum(1, keepdim=True) * x[:, 2:]  # noqa: E731
    z = unimodal_logits(film, {"a": a, "v": v})
    assert torch.equal(z["v"], torch.zeros(4, 3))


@given(
    st.integers(2, 5),
    st.integers(0, 4),
    st.integers(1, 5),
    st.sampled_from(["width", "missing", "extra"]),
)
def test_linear_width_errors_name_the_modalities(m: int, wrong: int, delta: int, kind: str) -> None:
    widths = [3 + i for i in range(m)]
    head = nn.Linear(sum(widths), 2)
    feats = {NAMES[i]: torch.randn(2, w) for i, w in enumerate(widths)}
    if kind == "width":
        name = NAMES[wrong % m]
        feats[name] = torch.randn(2, feats[name].shape[1] + delta)
    elif kind == "missing":
        if m == 2:
            feats[NAMES[0]] = torch.randn(2, widths[0] + delta)
        else:
            del feats[NAMES[wrong % m]]
    else:
        feats["extra"] = torch.randn(2, delta)
    with pytest.raises(ValueError, match=rf"in_features={sum(widths)}") as info:
        unimodal_logits(head, feats)
    for name, x in feats.items():
        assert f"{name}: {tuple(x.shape)}" in str(info.value)


@given(st.integers(2, 5), st.integers(0, 4), st.integers(1, 4))
def test_batch_mismatch_raises_naming_the_modality(m: int, which: int, delta: int) -> None:
    feats = {NAMES[i]: torch.randn(4, 3) for i in range(m)}
    bad = NAMES[which % m]
    if bad == NAMES[0]:
        bad = NAMES[1]
    feats[bad] = torch.randn(4 + delta, 3)
    with pytest.raises(ValueError, match=rf"batch size mismatch.*'{bad}'.*\({4 + delta}, 3\)"):
        unimodal_logits(nn.Linear(3 * m, 2), feats)


def test_fewer_than_two_modalities() -> None:
    with pytest.raises(ValueError, match="at least two modalities"):
        unimodal_logits(nn.Linear(3, 2), {"audio": torch.randn(2, 3)})
    with pytest.raises(TypeError, match="mapping"):
        unimodal_logits(nn.Linear(3, 2), torch.randn(2, 3))  # type: ignore[arg-type]


def test_per_modality_head_key_mismatch() -> None:
    heads = {"audio": nn.Linear(3, 2), "visual": nn.Linear(3, 2)}
    with pytest.raises(
        ValueError, match=r"missing features for \['visual'\], no head for \['text'\]"
    ):
        unimodal_logits(heads, {"audio": torch.randn(2, 3), "text": torch.randn(2, 3)})


def test_inconsistent_head_outputs() -> None:
    heads = {"audio": nn.Linear(3, 2), "visual": nn.Linear(3, 4)}
    with pytest.raises(ValueError, match=r"\(2, 4\) for modality 'visual'"):
        unimodal_logits(heads, {"audio": torch.randn(2, 3), "visual": torch.randn(2, 3)})


def test_features_that_cannot_be_concatenated() -> None:
    with pytest.raises(ValueError, match=r"features\['v'\] has shape \(2, 5, 3\)"):
        unimodal_logits(nn.Linear(6, 2), {"a": torch.randn(2, 3), "v": torch.randn(2, 5, 3)})
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        unimodal_logits(nn.Linear(6, 2), {"a": torch.randn(2), "v": torch.randn(2)})
    with pytest.raises(TypeError, match="head must be"):
        unimodal_logits(3, {"a": torch.randn(2, 3), "v": torch.randn(2, 3)})  # type: ignore[arg-type]


def test_generic_head_width_error_names_the_modalities() -> None:
    mlp = nn.Sequential(nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3))
    feats = {"audio": torch.randn(4, 16), "visual": torch.randn(4, 4)}
    with pytest.raises(
        ValueError, match=r"modality 'audio' \(width 20 from audio: \(4, 16\), visual: \(4, 4\)\)"
    ):
        unimodal_logits(mlp, feats)


def test_generic_head_errors_that_are_not_about_widths_propagate_unchanged() -> None:
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # fp32 head
    feats = {"audio": torch.randn(4, 2, dtype=torch.float64), "visual": torch.randn(4, 4).double()}
    # a dtype mismatch is caught before the head runs (first parameter's dtype), not a width
    # problem and not torch's raw "mat1 and mat2 must have the same dtype"
    with pytest.raises(TypeError, match=r"features\['audio'\] .* torch.float64 .* torch.float32"):
        unimodal_logits(mlp, feats)

    def shape_blind(x: torch.Tensor) -> torch.Tensor:  # a head whose own error is not ours
        raise RuntimeError("device-side assert: index out of bounds")

    with pytest.raises(RuntimeError, match="device-side assert"):
        unimodal_logits(shape_blind, {"audio": torch.randn(4, 2), "visual": torch.randn(4, 4)})

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("my head is broken")

    with pytest.raises(RuntimeError, match="my head is broken"):
        unimodal_logits(broken, {"audio": torch.randn(4, 2), "visual": torch.randn(4, 4)})
