"""ModalityGradientModulator (OGM / OGM-GE) against formulas written out independently here."""

# Tests read optional gradients / records directly and call torch methods whose stubs are untyped.
# mypy: disable-error-code="no-untyped-call,union-attr,arg-type,index,operator,attr-defined"
# mypy: disable-error-code="call-overload,func-returns-value"

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

from imbalance_losses import unimodal_logits
from imbalance_losses.methods.modulation import ModalityGradientModulator, ModulationRecord
from tests.ddp import run_distributed
from tests.host_reads import HostReads

# ---------------------------------------------------------------------------- helpers


def logits_with_probabilities(p: list[float]) -> tuple[Tensor, Tensor]:
    """Two-class logits whose softmax gives probability ``p_b`` to the true class 0."""
    pt = torch.tensor(p, dtype=torch.float64)
    z = torch.stack([pt.log(), (1 - pt).log()], dim=1).float()
    return z, torch.zeros(len(p), dtype=torch.long)


def expected_k(scores: list[float], alpha: float, form: str) -> list[float]:
    """``k_m`` from the papers' formulas in float64, one-vs-rest ``rho_m``."""
    total, m = sum(scores), len(scores)
    out = []
    for s in scores:
        rho = s / ((total - s) / (m - 1))
        if form == "paper":
            out.append(1 - math.tanh(alpha * max(rho - 1, 0.0)))
        else:
            out.append(1 - math.tanh(alpha * rho) if rho > 1 else 1.0)
    return out


def one_vs_rest(scores: list[float]) -> list[float]:
    total, m = sum(scores), len(scores)
    return [s / ((total - s) / (m - 1)) for s in scores]


class Net(nn.Module):
    """Two small encoders (no BatchNorm: DDP must equal one process) and a concat linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 6))
        self.visual = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6))
        self.head = nn.Linear(12, 3)

    def forward(self, xa: Tensor, xv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {"audio": self.audio(xa), "visual": self.visual(xv)}
        return self.head(torch.cat(list(feats.values()), dim=1)), feats


def make_data(steps: int, batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (steps, batch), generator=g)
    # audio carries the label strongly, visual weakly: audio dominates
    xa = torch.randn(steps, batch, 1, 8, generator=g) + 2.0 * y[..., None, None].float()
    xv = torch.randn(steps, batch, 5, generator=g) + 0.2 * y[..., None].float()
    return xa, xv, y


def encoders(model: Net) -> dict[str, nn.Module]:
    return {"audio": model.audio, "visual": model.visual}


def fill_grads(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch_logits(pa: list[float], pv: list[float]) -> tuple[dict[str, Tensor], Tensor]:
    za, y = logits_with_probabilities(pa)
    zv, _ = logits_with_probabilities(pv)
    return {"audio": za, "visual": zv}, y


probs = st.floats(0.02, 0.98)

# ---------------------------------------------------------------------------- coefficients


@given(
    m=st.integers(2, 5),
    data=st.data(),
    alpha=st.floats(0.0, 4.0),
    form=st.sampled_from(["paper", "code"]),
)
def test_coefficients_match_formulas_and_are_applied(
    m: int, data: st.DataObject, alpha: float, form: str
) -> None:
    batch = data.draw(st.integers(1, 6))
    p = [data.draw(st.lists(probs, min_size=batch, max_size=batch)) for _ in range(m)]
    scores = [sum(row) for row in p]
    rho = one_vs_rest(scores)
    assume(all(abs(r - 1) > 1e-4 for r in rho))  # the code form jumps at rho = 1
    params = [nn.Parameter(torch.zeros(2, 3)) for _ in range(m)]
    for q in params:
        q.grad = torch.ones(2, 3)
    names = [f"mod{i}" for i in range(m)]
    mod = ModalityGradientModulator(
        {n: [q] for n, q in zip(names, params, strict=True)}, alpha, method="ogm", coefficient=form
    )
    logits = {n: logits_with_probabilities(row)[0] for n, row in zip(names, p, strict=True)}
    k = mod.step(logits, torch.zeros(batch, dtype=torch.long))
    want = torch.tensor(expected_k(scores, alpha, form))
    torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod.last.ratios, torch.tensor(rho), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod.last.scores, torch.tensor(scores), rtol=1e-5, atol=1e-6)
    for q, kk in zip(params, want, strict=True):
        torch.testing.assert_close(q.grad, torch.full((2, 3), float(kk)), rtol=1e-5, atol=1e-6)


@given(
    m=st.integers(2, 5),
    data=st.data(),
    alpha=st.floats(0.0, 4.0),
    form=st.sampled_from(["paper", "code"]),
)
def test_coefficient_properties(m: int, data: st.DataObject, alpha: float, form: str) -> None:
    """k in (0, 1]; 1 for every non-dominant modality; non-increasing in rho."""
    p = [data.draw(st.lists(probs, min_size=3, max_size=3)) for _ in range(m)]
    names = [f"m{i}" for i in range(m)]
    mod = ModalityGradientModulator(
        {n: [nn.Parameter(torch.zeros(2, 2))] for n in names},
        alpha,
        method="ogm",
        coefficient=form,
    )
    k = mod.step(
        {n: logits_with_probabilities(r)[0] for n, r in zip(names, p, strict=True)},
        torch.zeros(3, dtype=torch.long),
    )
    rho = mod.last.ratios
    # k > 0 in exact arithmetic; fp32 underflows once alpha * (rho - 1) exceeds ~50
    assert ((k > 0) | (alpha * (rho - 1) > 50)).all() and (k <= 1).all()
    assert (k[rho <= 1] == 1).all()  # non-dominant: untouched
    order = torch.argsort(rho)
    assert (k[order].diff() <= 1e-7).all()  # monotone non-increasing in rho
    if alpha == 0:
        assert (k == 1).all()


@given(rho=st.lists(st.floats(0.0, 12.0), min_size=2, max_size=8), alpha=st.floats(0.01, 3.0))
def test_coefficient_is_monotone_function_of_rho(rho: list[float], alpha: float) -> None:
    """Both forms against rho values directly (covers ratios a batch rarely produces)."""
    from imbalance_losses.methods.modulation import ogm_coefficients as _coefficients

    r = torch.tensor(sorted(rho), dtype=torch.float64)
    for form in ("paper", "code"):
        k = _coefficients(r, alpha, form)
        assert ((k > 0) & (k <= 1)).all()
        assert (k.diff() <= 0).all()
        want = torch.tensor(expected_k_from_rho(sorted(rho), alpha, form), dtype=torch.float64)
        torch.testing.assert_close(k, want, rtol=1e-12, atol=1e-12)


def expected_k_from_rho(rho: list[float], alpha: float, form: str) -> list[float]:
    if form == "paper":
        return [1 - math.tanh(alpha * max(r - 1, 0.0)) for r in rho]
    return [1 - math.tanh(alpha * r) if r > 1 else 1.0 for r in rho]


def test_code_form_two_modalities_matches_official_rule() -> None:
    """Only the dominant modality is damped, by 1 - tanh(alpha * s_dom / s_other)."""
    params = {
        "audio": [nn.Parameter(torch.zeros(2, 2))],
        "visual": [nn.Parameter(torch.zeros(2, 2))],
    }
    mod = ModalityGradientModulator(params, 0.8, coefficient="code")
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    k = mod.step(logits, y)
    torch.testing.assert_close(k, torch.tensor([1 - math.tanh(0.8 * 1.7 / 0.5), 1.0]))


def test_alpha_zero_ogm_leaves_gradients_bitwise_unchanged() -> None:
    model = Net()
    before = fill_grads(model)
    mod = ModalityGradientModulator(encoders(model), 0.0, method="ogm", parameters="all")
    logits, y = batch_logits([0.9, 0.95], [0.1, 0.2])
    assert (mod.step(logits, y) == 1).all()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n


# ---------------------------------------------------------------------------- which parameters


class BNNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(
            nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(24, 6)
        )


@pytest.mark.parametrize("selection", ["weights", "all", "predicate"])
def test_exactly_the_selected_parameters_change(selection: str) -> None:
    model = BNNet()
    before = fill_grads(model)
    sel: object = selection
    if selection == "predicate":
        sel = lambda name, p: name.startswith("0.")  # noqa: E731  first layer of each encoder
    mod = ModalityGradientModulator(encoders(model), 1.5, method="ogm", parameters=sel)
    logits, y = batch_logits([0.9, 0.8, 0.95], [0.3, 0.2, 0.4])
    mod.step(logits, y)
    k = dict(zip(["audio", "visual"], expected_k([2.65, 0.9], 1.5, "paper"), strict=True))
    assert k["audio"] < 0.5 and k["visual"] == 1.0
    changed = set()
    for name, p in model.named_parameters():
        modality, _, local = name.partition(".")
        if selection == "weights":
            want = modality in k and p.dim() >= 2
        elif selection == "all":
            want = modality in k
        else:
            want = modality in k and local.startswith("0.")
        if want and k[modality] != 1.0:
            torch.testing.assert_close(p.grad, before[name] * k[modality], rtol=1e-5, atol=0)
            changed.add(name)
        else:
            assert torch.equal(p.grad, before[name]), name
    expected = {
        "weights": {"audio.0.weight", "audio.4.weight"},
        "all": {
            "audio.0.weight",
            "audio.0.bias",
            "audio.1.weight",
            "audio.1.bias",
            "audio.4.weight",
            "audio.4.bias",
        },
        "predicate": {"audio.0.weight", "audio.0.bias"},
    }[selection]
    assert changed == expected


def test_parameters_without_grad_are_skipped() -> None:
    model = Net()
    before = fill_grads(model)
    model.audio[0].weight.grad = None
    model.visual[0].weight.grad = None
    mod = ModalityGradientModulator(encoders(model), 1.0, method="ogm_ge", seed=1)
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    k = mod.step(logits, y)
    assert model.audio[0].weight.grad is None and model.visual[0].weight.grad is None
    assert not torch.equal(model.audio[3].weight.grad, before["audio.3.weight"])
    assert torch.equal(model.head.weight.grad, before["head.weight"])
    # nothing has a gradient at all: no error, nothing drawn
    for p in model.parameters():
        p.grad = None
    torch.testing.assert_close(mod.step(logits, y), k)


def test_parameter_sources_and_shared_parameter_errors() -> None:
    a, b, c = (nn.Parameter(torch.zeros(3, 2)) for _ in range(3))
    seen: list[str] = []
    mod = ModalityGradientModulator(
        {"x": [a, a], "y": c, "z": (q for q in [b])},
        0.5,
        parameters=lambda name, p: seen.append(name) is None,
    )
    assert seen == ["", "", ""]  # a listed twice in one modality is kept once
    assert [(m, p is q) for (m, p), q in zip(mod.modulated_parameters, [a, c, b], strict=True)] == [
        ("x", True),
        ("y", True),
        ("z", True),
    ]
    with pytest.raises(ValueError, match=r"both modules\['x'\] and modules\['y'\]"):
        ModalityGradientModulator({"x": [a], "y": [b, a]}, 0.5)
    model = Net()
    with pytest.raises(ValueError, match=r"'audio'.*'visual'"):
        ModalityGradientModulator({"audio": model.audio, "visual": model.audio}, 0.5)


# ---------------------------------------------------------------------------- GE noise


def test_ge_noise_has_the_gradients_std() -> None:
    """noise = g_new - k g must be N(0, std(g)^2) per parameter.

    With n iid normal draws the sample std has relative standard error 1/sqrt(2(n-1)) (about
    0.003 for n = 60000), so a 2% bound is ~7 standard errors: it cannot fail by chance, and
    it fails at once if the noise used the modulated gradient's std (off by a factor k), one std
    for every parameter, or no noise (the biased std is caught by the next test). The fraction
    inside one std checks the shape (0.6827 for a normal; binomial standard error 0.002, bound
    0.01).
    """
    big_a = nn.Parameter(torch.zeros(300, 200))
    big_v = nn.Parameter(torch.zeros(250, 240))
    g = torch.Generator().manual_seed(5)
    ga = torch.rand(300, 200, generator=g) * 6.0 + 1.0  # uniform: std sqrt(3), mean 4
    gv = torch.randn(250, 240, generator=g) * 1e-3
    big_a.grad, big_v.grad = ga.clone(), gv.clone()
    mod = ModalityGradientModulator({"a": [big_a], "v": [big_v]}, 1.0, seed=11)
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    logits = {"a": logits["audio"], "v": logits["visual"]}
    k = expected_k([1.7, 0.5], 1.0, "paper")
    mod.step(logits, y)
    for grad, g0, kk in ((big_a.grad, ga, k[0]), (big_v.grad, gv, k[1])):
        g64 = g0.double()
        sigma = math.sqrt(((g64 - g64.mean()) ** 2).sum().item() / (g64.numel() - 1))
        noise = grad.double() - kk * g64
        n = noise.numel()
        assert abs(noise.std().item() / sigma - 1) < 0.02
        assert abs(noise.mean().item()) < 6 * sigma / math.sqrt(n)
        inside = (noise.abs() < sigma).double().mean().item()
        assert abs(inside - 0.6827) < 0.01
        # independent of the gradient itself
        corr = torch.corrcoef(torch.stack([noise.reshape(-1), g64.reshape(-1)]))[0, 1]
        assert abs(corr.item()) < 0.03


def test_ge_noise_uses_the_unbiased_std_of_each_parameter() -> None:
    """On a 4-element gradient the unbiased std is sqrt(4/3) = 1.155 times the biased one.

    2000 parameters with the same 4-element gradient give 8000 noise values: the relative
    standard error of their std is 1/sqrt(2 * 8000) = 0.008, so the 4% bound is 5 standard
    errors from the truth and 11 from the biased std (or from a std pooled over parameters:
    the other modality's gradient is 100 times larger).
    """
    small = [nn.Parameter(torch.zeros(2, 2)) for _ in range(2000)]
    other = nn.Parameter(torch.zeros(3, 3))
    g0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    sigma = statistics_stdev([0.5, -1.0, 2.0, 0.25])
    for q in small:
        q.grad = g0.clone()
    other.grad = torch.randn(3, 3) * 100
    mod = ModalityGradientModulator({"a": small, "v": [other]}, 0.5, seed=2)
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    mod.step({"a": logits["audio"], "v": logits["visual"]}, y)
    k = expected_k([1.7, 0.5], 0.5, "paper")[0]
    z = torch.stack([q.grad.double() - k * g0.double() for q in small])
    assert abs(z.std().item() / sigma - 1) < 0.04
    assert abs(z.mean().item()) < 5 * sigma / math.sqrt(z.numel())


def statistics_stdev(values: list[float]) -> float:
    """Sample standard deviation with the n - 1 denominator, in plain Python."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_ge_noise_is_reproducible_and_seeded() -> None:
    def run(seed: int) -> list[Tensor]:
        torch.manual_seed(0)
        model = Net()
        fill_grads(model)
        mod = ModalityGradientModulator(encoders(model), 0.8, seed=seed)
        logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
        torch.manual_seed(123)  # the global generator must not matter
        mod.step(logits, y)
        first = [p.grad.clone() for p in model.parameters()]
        fill_grads(model)
        mod.step(logits, y)
        return first + [p.grad.clone() for p in model.parameters()]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    n = len(a) // 2
    assert not torch.equal(a[0], a[n])  # a fresh draw every step


def test_single_element_parameter_gets_no_noise() -> None:
    a, v = nn.Parameter(torch.zeros(1, 1)), nn.Parameter(torch.zeros(2, 2))
    a.grad, v.grad = torch.full((1, 1), 2.0), torch.ones(2, 2)
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 1.0)
    logits, y = batch_logits([0.9], [0.3])
    k = mod.step({"a": logits["audio"], "v": logits["visual"]}, y)
    torch.testing.assert_close(a.grad, 2.0 * k[0].reshape(1, 1))
    assert torch.isfinite(v.grad).all()
    torch.testing.assert_close(v.grad, torch.ones(2, 2))  # constant grad: std 0, no noise


def test_non_finite_gradients_stay_non_finite() -> None:
    model = Net()
    fill_grads(model)
    model.audio[0].weight.grad[0, 0, 0] = float("inf")
    model.visual[0].weight.grad[1, 1] = float("nan")
    mod = ModalityGradientModulator(encoders(model), 0.8)
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    mod.step(logits, y)
    assert not torch.isfinite(model.audio[0].weight.grad).all()
    assert not torch.isfinite(model.visual[0].weight.grad).all()
    assert torch.isfinite(model.audio[3].weight.grad).all()


def test_amp_order_grad_scaler_skips_overflowed_step() -> None:
    """scale -> backward -> unscale_ -> modulator.step -> scaler.step -> update."""
    xa, xv, y = make_data(1, 8)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mod = ModalityGradientModulator(encoders(model), 0.8)
    logits, feats = model(xa[0], xv[0])
    scaler.scale(F.cross_entropy(logits, y[0])).backward()
    model.audio[0].weight.grad[0, 0, 0] = float("inf")  # an fp16 overflow
    before = [p.detach().clone() for p in model.parameters()]
    scaler.unscale_(opt)
    mod.step(unimodal_logits(model.head, feats), y[0])
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() < 1024.0


# ---------------------------------------------------------------------------- window, record


def test_window_and_record() -> None:
    p, q = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))
    mod = ModalityGradientModulator(
        {"audio": [p], "visual": [q]}, 1.0, method="ogm", start_step=1, stop_step=3
    )
    assert mod.last is None
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    k_in = expected_k([1.7, 0.5], 1.0, "paper")[0]
    for t in range(5):
        p.grad, q.grad = torch.ones(2, 2), torch.ones(2, 2)
        k = mod.step(logits, y)
        rec = mod.last
        assert isinstance(rec, ModulationRecord) and rec.step == t and mod.step_count == t + 1
        assert rec.active == (1 <= t < 3)
        want = k_in if rec.active else 1.0
        torch.testing.assert_close(p.grad, torch.full((2, 2), want))
        torch.testing.assert_close(k, torch.tensor([want, 1.0]))
        torch.testing.assert_close(rec.ratios, torch.tensor([1.7 / 0.5, 0.5 / 1.7]))
        assert rec.scores.shape == rec.coefficients.shape == (2,)
        assert float(rec.num_samples) == 2
    d = mod.last.to_dict()
    assert {"scores/audio", "ratios/visual", "coefficients/audio", "active", "step"} <= set(d)


# ---------------------------------------------------------------------------- accumulation


def test_accumulation_gives_one_coefficient_from_pooled_scores() -> None:
    g = torch.Generator().manual_seed(3)
    za, zv = torch.randn(12, 5, generator=g) * 3, torch.randn(12, 5, generator=g)
    y = torch.randint(0, 5, (12,), generator=g)
    params = {
        "audio": [nn.Parameter(torch.zeros(2, 2))],
        "visual": [nn.Parameter(torch.zeros(2, 2))],
    }
    whole = ModalityGradientModulator(params, 0.8, method="ogm")
    k_whole = whole.step({"audio": za, "visual": zv}, y)
    acc = ModalityGradientModulator(params, 0.8, method="ogm")
    for idx in torch.arange(12).split([4, 3, 5]):  # uneven micro-batches
        acc.observe({"audio": za[idx], "visual": zv[idx]}, y[idx])
    k_acc = acc.step()
    torch.testing.assert_close(k_acc, k_whole)
    # against the formula: s_m = sum_b softmax(z_m)[b, y_b]
    s = [torch.softmax(z.double(), 1)[torch.arange(12), y].sum().item() for z in (za, zv)]
    torch.testing.assert_close(
        k_acc, torch.tensor(expected_k(s, 0.8, "paper")), rtol=1e-5, atol=1e-6
    )
    assert float(acc.last.num_samples) == 12
    with pytest.raises(RuntimeError, match="nothing observed"):
        acc.step()  # the pool was reset by the previous step
    with pytest.raises(ValueError, match="both"):
        acc.step({"audio": za, "visual": zv})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_finite_fp32_statistics(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    za = (torch.randn(16, 10, generator=g) * 20).to(dtype)  # saturated softmax
    zv = torch.randn(16, 10, generator=g).to(dtype)
    y = torch.randint(0, 10, (16,), generator=g)
    params = {
        "audio": [nn.Parameter(torch.zeros(2, 2))],
        "visual": [nn.Parameter(torch.zeros(2, 2))],
    }
    mod = ModalityGradientModulator(params, 0.8, method="ogm")
    k = mod.step({"audio": za, "visual": zv}, y)
    rec = mod.last
    assert rec is not None and k.dtype == torch.float32 and rec.scores.dtype == torch.float32
    assert torch.isfinite(rec.scores).all() and torch.isfinite(k).all()
    s = [torch.softmax(z.double(), 1)[torch.arange(16), y].sum().item() for z in (za, zv)]
    torch.testing.assert_close(rec.scores, torch.tensor(s, dtype=torch.float32))
    torch.testing.assert_close(k, torch.tensor(expected_k(s, 0.8, "paper")), rtol=1e-5, atol=1e-6)


def test_soft_targets() -> None:
    za, zv = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.softmax(torch.randn(4, 3), 1)
    params = {
        "audio": [nn.Parameter(torch.zeros(2, 2))],
        "visual": [nn.Parameter(torch.zeros(2, 2))],
    }
    mod = ModalityGradientModulator(params, 0.8, method="ogm")
    mod.step({"audio": za, "visual": zv}, t)
    s = [(torch.softmax(z, 1) * t).sum().item() for z in (za, zv)]
    torch.testing.assert_close(mod.last.scores, torch.tensor(s))


# ---------------------------------------------------------------------------- state


def _train(
    model: Net,
    opt: torch.optim.Optimizer,
    mod: ModalityGradientModulator,
    data: tuple[Tensor, ...],
    steps: range,
) -> None:
    xa, xv, y = data
    for t in steps:
        opt.zero_grad()
        for idx in torch.arange(xa.shape[1]).split(3):  # two micro-batches per step
            logits, feats = model(xa[t, idx], xv[t, idx])
            (F.cross_entropy(logits, y[t, idx]) / 2).backward()
            mod.observe(unimodal_logits(model.head, feats), y[t, idx])
        mod.step()
        opt.step()


@pytest.mark.parametrize("split", [0, 3])
def test_state_round_trip_resumes_bit_for_bit(split: int) -> None:
    data = make_data(6, 6)

    def fresh() -> tuple[Net, torch.optim.Optimizer, ModalityGradientModulator]:
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, ModalityGradientModulator(encoders(model), 0.8, seed=7)

    model, opt, mod = fresh()
    _train(model, opt, mod, data, range(6))

    m1, o1, mod1 = fresh()
    _train(m1, o1, mod1, data, range(split))
    buf = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict(), "g": mod1.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m2, o2, mod2 = fresh()
    torch.manual_seed(999)  # a different global RNG state must not matter
    m2.load_state_dict(state["m"])
    o2.load_state_dict(state["o"])
    mod2.load_state_dict(state["g"])
    assert mod2.step_count == split
    _train(m2, o2, mod2, data, range(split, 6))
    for p, q in zip(model.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    torch.testing.assert_close(mod.last.coefficients, mod2.last.coefficients, rtol=0, atol=0)


def test_pickled_with_its_model_resumes_the_run() -> None:
    """A modulator pickled with its model (``torch.save`` of a whole checkpoint) after a
    modulated step: pickling must not fail on the marks of the gradients it modulated, and the
    copy continues exactly as the original (same coefficients, same GE noise)."""
    data = make_data(6, 6)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mod = ModalityGradientModulator(encoders(model), 0.8, seed=7)
    _train(model, opt, mod, data, range(3))
    m2, o2, mod2 = pickle.loads(pickle.dumps((model, opt, mod)))
    _train(model, opt, mod, data, range(3, 6))
    _train(m2, o2, mod2, data, range(3, 6))
    for p, q in zip(model.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(mod.last.coefficients, mod2.last.coefficients)


def test_state_keeps_scores_observed_but_not_stepped() -> None:
    params = {
        "audio": [nn.Parameter(torch.zeros(2, 2))],
        "visual": [nn.Parameter(torch.zeros(2, 2))],
    }
    mod = ModalityGradientModulator(params, 0.8, method="ogm", start_step=5)
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    mod.observe(logits, y)
    state = mod.state_dict()
    other = ModalityGradientModulator(params, 0.8, method="ogm", start_step=5)
    other.load_state_dict(state)
    mod.observe(logits, y)
    other.observe(logits, y)
    mod.step()
    other.step()
    assert torch.equal(mod.last.scores, other.last.scores)
    torch.testing.assert_close(other.last.scores, torch.tensor([3.4, 1.0]))
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"step": 1})


# ---------------------------------------------------------------------------- bad input


def _two() -> dict[str, list[nn.Parameter]]:
    return {"audio": [nn.Parameter(torch.zeros(2, 2))], "visual": [nn.Parameter(torch.zeros(2, 2))]}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modules": {"audio": [nn.Parameter(torch.zeros(2, 2))]}}, ValueError, "at least two"),
        ({"alpha": -0.1}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"method": "agm"}, ValueError, "method"),
        ({"coefficient": "tpami"}, ValueError, "coefficient"),
        ({"parameters": "biases"}, ValueError, "parameters"),
        ({"start_step": 3, "stop_step": 3}, ValueError, "stop_step"),
        ({"start_step": -1}, ValueError, "start_step"),
        (
            {"modules": {"audio": nn.Linear(2, 2), "visual": nn.BatchNorm1d(2)}},
            ValueError,
            "modality 'visual'",
        ),
        (
            {"modules": {"audio": [nn.Parameter(torch.zeros(2, 2)) * 2], "visual": []}},
            TypeError,
            "'audio'",
        ),
        ({"modules": {"audio": 3, "visual": []}}, TypeError, "'audio'"),
        ({"modules": [nn.Linear(2, 2)]}, TypeError, "mapping"),
    ],
)
def test_constructor_rejects_bad_arguments(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    args: dict[str, object] = {"modules": _two(), "alpha": 0.8}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ModalityGradientModulator(**args)


def test_step_rejects_bad_input() -> None:
    mod = ModalityGradientModulator(_two(), 0.8)
    z, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"missing \['visual'\]"):
        mod.step({"audio": z, "depth": z}, y)
    with pytest.raises(ValueError, match="different order"):
        mod.step({"visual": z, "audio": z}, y)
    with pytest.raises(ValueError, match=r"'visual'.*batch 3"):
        mod.step({"audio": z, "visual": z[:3]}, y)
    with pytest.raises(ValueError, match=r"target has shape \(3,\)"):
        mod.step({"audio": z, "visual": z}, y[:3])
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        mod.step({"audio": z, "visual": z}, torch.tensor([0, 1, 2, 3]))
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"unimodal_logits\['visual'\].*non-finite"):
        mod.step({"audio": z, "visual": bad}, y)
    with pytest.raises(ValueError, match=r"unimodal_logits\['visual'\] has shape \(4, 5\)"):
        mod.step({"audio": z, "visual": torch.randn(4, 5)}, y)
    with pytest.raises(ValueError, match="at least two"):
        mod.step({"audio": z}, y)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        mod.step({"audio": z[:, None], "visual": z[:, None]}, y)
    # nothing bad was added to the pool: a good step still works, on 4 samples
    mod.step({"audio": z, "visual": z}, y)
    assert float(mod.last.num_samples) == 4


# ---------------------------------------------------------------------------- DDP


def _ddp_body(
    rank: int, world: int, init: dict[str, Tensor], data: tuple[Tensor, ...]
) -> dict[str, object]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    xa, xv, y = data  # [steps, global batch, ...]; this rank takes its half
    half = xa.shape[1] // world
    mine = slice(rank * half, (rank + 1) * half)
    out: dict[str, object] = {}
    group = dist.new_group(list(range(world)))
    for scenario in ("plain", "accumulate"):
        model = Net()
        model.load_state_dict(init)
        ddp = DDP(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        mod = ModalityGradientModulator(
            encoders(model),
            0.8,
            seed=3,
            process_group=group if scenario == "accumulate" else None,
        )
        ks = []
        for t in range(xa.shape[0]):
            opt.zero_grad()
            if scenario == "plain":
                logits, feats = ddp(xa[t, mine], xv[t, mine])
                F.cross_entropy(logits, y[t, mine]).backward()
                ks.append(mod.step(unimodal_logits(model.head, feats), y[t, mine]))
            else:
                micro = torch.arange(rank * half, (rank + 1) * half).split(half // 2)
                for i, idx in enumerate(micro):
                    ctx = ddp.no_sync() if i == 0 else torch.enable_grad()
                    with ctx:
                        logits, feats = ddp(xa[t, idx], xv[t, idx])
                        (F.cross_entropy(logits, y[t, idx]) / len(micro)).backward()
                    mod.observe(unimodal_logits(model.head, feats), y[t, idx])
                ks.append(mod.step())
            opt.step()
        out[scenario] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "k": torch.stack(ks),
        }
    return out


def _reference(init: dict[str, Tensor], data: tuple[Tensor, ...]) -> dict[str, object]:
    """One process, the global batch, mean-reduced loss: what DDP must reproduce."""
    xa, xv, y = data
    model = Net()
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mod = ModalityGradientModulator(encoders(model), 0.8, seed=3)
    ks = []
    for t in range(xa.shape[0]):
        opt.zero_grad()
        logits, feats = model(xa[t], xv[t])
        F.cross_entropy(logits, y[t]).backward()
        ks.append(mod.step(unimodal_logits(model.head, feats), y[t]))
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "k": torch.stack(ks)}


def test_ddp_identical_on_ranks_and_equal_to_one_process() -> None:
    torch.manual_seed(0)
    init = Net().state_dict()
    data = make_data(4, 8, seed=1)
    r0, r1 = run_distributed(_ddp_body, init, data)
    ref = _reference(init, data)
    assert (ref["k"] < 1).any()  # modulation did run
    for scenario in ("plain", "accumulate"):
        a, b = r0[scenario], r1[scenario]
        assert torch.equal(a["k"], b["k"])
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))
        torch.testing.assert_close(a["k"], ref["k"])
        for p, q in zip(a["params"], ref["params"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("method", ["ogm", "ogm_ge"])
def test_step_makes_no_host_reads(method: str) -> None:
    model = Net()
    fill_grads(model)
    mod = ModalityGradientModulator(encoders(model), 0.8, method=method)
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    with HostReads() as spy:
        mod.observe(logits, y)
        mod.step(logits, y)
        fill_grads(model, seed=1)  # a new backward's gradients
        mod.step(logits, y)
    assert spy.reads == []
    # the spy does see a read made from the package
    with HostReads() as spy:
        mod.last.to_dict()
    assert "tolist" in spy.reads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_keep_their_dtype(dtype: torch.dtype) -> None:
    a, v = (
        nn.Parameter(torch.zeros(64, 32, dtype=dtype)),
        nn.Parameter(torch.zeros(8, 8, dtype=dtype)),
    )
    ga = torch.randn(64, 32).to(dtype)
    a.grad, v.grad = ga.clone(), torch.randn(8, 8).to(dtype)
    mod = ModalityGradientModulator({"a": [a], "v": [v]}, 1.0, seed=0)
    logits, y = batch_logits([0.9, 0.8], [0.3, 0.2])
    mod.step({"a": logits["audio"], "v": logits["visual"]}, y)
    assert a.grad.dtype == dtype and torch.isfinite(a.grad).all()
    k = expected_k([1.7, 0.5], 1.0, "paper")[0]
    noise = a.grad.double() - k * ga.double()
    sigma = ga.double().std().item()
    assert abs(noise.std().item() / sigma - 1) < 0.1  # 2048 draws plus low-precision rounding


@pytest.mark.parametrize("coefficient", ["paper", "code"])
def test_alpha_zero_is_identity_even_when_a_modality_scores_zero(coefficient: str) -> None:
    """A score of exactly 0 makes the other ratio maximal; alpha = 0 must still give k = 1."""
    enc_a, enc_v = nn.Linear(3, 2), nn.Linear(3, 2)
    mod = ModalityGradientModulator(
        {"audio": enc_a, "visual": enc_v}, alpha=0.0, method="ogm", coefficient=coefficient
    )
    for p in [*enc_a.parameters(), *enc_v.parameters()]:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in [*enc_a.parameters(), *enc_v.parameters()]]
    # audio puts probability exp(-2e4) = 0 (fp32) on the true class: s_audio = 0, rho_v = inf
    z_audio = torch.tensor([[1e4, -1e4]])
    z_visual = torch.tensor([[0.0, 1.0]])
    k = mod.step({"audio": z_audio, "visual": z_visual}, torch.tensor([1]))
    assert mod.last is not None and mod.last.scores[0] == 0
    assert mod.last.ratios[1] == 100.0  # the ratio is capped at max_ratio (default 100)
    assert torch.equal(k, torch.ones(2))
    after = [p.grad for p in [*enc_a.parameters(), *enc_v.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_step_without_gradients_warns_and_changes_nothing() -> None:
    enc_a, enc_v = nn.Linear(3, 2), nn.Linear(3, 2)
    mod = ModalityGradientModulator({"audio": enc_a, "visual": enc_v}, alpha=0.8)
    z = {"audio": torch.randn(4, 2), "visual": torch.randn(4, 2)}
    with pytest.warns(RuntimeWarning, match="no modulated parameter has a gradient"):
        mod.step(z, torch.zeros(4, dtype=torch.long))
    assert all(p.grad is None for p in [*enc_a.parameters(), *enc_v.parameters()])
