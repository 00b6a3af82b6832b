"""Review of the shared core: defects found from the outside, each pinned by a test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imbalance_losses import ARLLoss, unimodal_logits
from imbalance_losses.core.masking import masked_outputs
from imbalance_losses.core.validation import check_target, int_param, real_param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_soft_targets_are_valid_distributions(dtype: torch.dtype) -> None:
    # the uniform distribution over 3 classes rounded to bf16 sums to 1.0020 (1/3 -> 0.33398),
    # to fp16 to 0.99994: a valid probability row at that precision (each entry rounded to
    # nearest, so the row sum is off by at most half an ulp of 1 = eps / 2)
    uniform = torch.full((4, 3), 1 / 3, dtype=dtype)
    check_target(uniform, batch=4, num_classes=3)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 10, generator=g) * 2, -1).to(dtype)
    check_target(probs, batch=64, num_classes=10)
    # still refused: a row that is not a distribution at that precision
    with pytest.raises(ValueError, match="sum to 1"):
        check_target(torch.full((2, 4), 0.24, dtype=dtype), batch=2, num_classes=4)
    with pytest.raises(ValueError, match="sum to 1"):
        check_target(torch.tensor([[1.0, 0.03]], dtype=dtype), batch=1, num_classes=2)


def test_arl_pure_bf16_model_with_bf16_soft_targets() -> None:
    # a model cast to bf16 end to end: features, head and soft targets in bf16; the loss is the
    # formula l(z, t) + sum_m l(z_m, t) that plain cross-entropy accepts for these inputs
    torch.manual_seed(0)
    head = nn.Linear(10, 3).to(torch.bfloat16)
    feats = {
        "a": torch.randn(4, 4, dtype=torch.bfloat16),
        "v": torch.randn(4, 6, dtype=torch.bfloat16),
    }
    logits = head(torch.cat(list(feats.values()), 1))
    target = torch.full((4, 3), 1 / 3, dtype=torch.bfloat16)
    loss = ARLLoss(head=head).eval()(logits, target, features=feats)
    w = head.weight.float()
    za = feats["a"].float() @ w[:, :4].T + head.bias.float() / 2
    zv = feats["v"].float() @ w[:, 4:].T + head.bias.float() / 2
    t = target.float()
    expected = sum(F.cross_entropy(z, t) for z in (logits.float(), za, zv))
    torch.testing.assert_close(loss.float(), expected, atol=3e-2, rtol=1e-2)


def test_per_modality_head_width_error_names_the_modality_and_shapes() -> None:
    # api.md: shapes that do not add up raise a ValueError naming the modality and the expected
    # and actual shapes; a mapping of per-modality heads (sum fusion) gave the raw matmul error
    heads = {"audio": nn.Linear(4, 3), "visual": nn.Linear(6, 3)}
    feats = {"audio": torch.randn(2, 5), "visual": torch.randn(2, 6)}
    expected = r"heads\['audio'\].*in_features=4.*features\['audio'\].*shape \(2, 5\)"
    with pytest.raises(ValueError, match=expected):
        unimodal_logits(heads, feats)
    with pytest.raises(ValueError, match=expected):
        unimodal_logits(nn.ModuleDict(heads), feats)
    with pytest.raises(ValueError, match=expected):
        masked_outputs(heads, feats)
    # a head that is not an nn.Linear: its own shape error, with the modality and the shape
    mlps = {
        m: nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 3))
        for m, d in (("audio", 4), ("visual", 6))
    }
    with pytest.raises(
        ValueError, match=r"heads\['audio'\] failed on features\['audio'\] of shape \(2, 5\)"
    ):
        unimodal_logits(mlps, feats)
    with pytest.raises(
        ValueError, match=r"heads\['audio'\] failed on features\['audio'\] of shape \(2, 5\)"
    ):
        masked_outputs(mlps, feats)  # run on [x; 0], named by x
    # right widths: unchanged (z_m = heads[m](x_m))
    good = {"audio": torch.randn(2, 4), "visual": torch.randn(2, 6)}
    z = unimodal_logits(heads, good)
    torch.testing.assert_close(z["visual"], heads["visual"](good["visual"]))


def test_numpy_scalars_are_numbers() -> None:
    # a sweep over np.arange / np.linspace(dtype=np.float32) gives numpy scalars: a whole
    # number is still a whole number (nothing truncated), a real still a real
    np = pytest.importorskip("numpy")
    assert int_param("warmup_steps", np.int64(3), ge=0) == 3
    assert type(int_param("warmup_steps", np.int32(3), ge=0)) is int
    assert real_param("gamma", np.float32(0.5), ge=0.0) == 0.5
    assert type(real_param("gamma", np.float32(0.5))) is float
    assert ARLLoss(head=nn.Linear(4, 2), warmup_steps=np.int64(2)).warmup_steps == 2
    # still refused: truncation and booleans, numpy's too
    for bad in (np.float64(2.0), np.bool_(True), True):
        with pytest.raises(TypeError, match="warmup_steps must be an integer"):
            int_param("warmup_steps", bad)
    with pytest.raises(TypeError, match="must be a real number"):
        real_param("gamma", np.bool_(True))
    with pytest.raises(ValueError, match="gamma must be finite"):
        real_param("gamma", np.float32("nan"))


class _CosineLinear(nn.Linear):
    """A cosine classifier written as an ``nn.Linear`` subclass (its own forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def test_linear_subclass_with_its_own_forward_is_evaluated_not_split() -> None:
    # the weight split z_m = x_m W_m^T + b / M is what nn.Linear.forward computes; a subclass
    # that computes something else is "any other callable head": z_m = head([0, .., x_m, .., 0])
    # (it silently got x_m W_m^T, neither that nor parts adding up to head(cat(x)))
    torch.manual_seed(0)
    head = _CosineLinear(10, 3, bias=False)
    feats = {"a": torch.randn(2, 4), "v": torch.randn(2, 6)}
    z = unimodal_logits(head, feats)
    zeros = {m: torch.zeros_like(x) for m, x in feats.items()}
    torch.testing.assert_close(z["a"], head(torch.cat([feats["a"], zeros["v"]], 1)))
    torch.testing.assert_close(z["v"], head(torch.cat([zeros["a"], feats["v"]], 1)))
    # a plain nn.Linear keeps the exact split: the parts add up to the fused logits
    plain = nn.Linear(10, 3)
    parts = unimodal_logits(plain, feats)
    torch.testing.assert_close(parts["a"] + parts["v"], plain(torch.cat(list(feats.values()), 1)))
