"""modality_parameters: distinct parameters per modality and what happens to shared ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from imbalance_losses.core.params import modality_parameters


class Trunked(nn.Module):
    """One shared trunk behind two modality-specific stems (audio, visual)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.audio = nn.Sequential(nn.Linear(2, 4), self.trunk)
        self.visual = nn.Sequential(nn.Linear(3, 4), self.trunk)


def _ids(out: list[tuple[int, str, torch.Tensor]]) -> list[tuple[int, str, int]]:
    return [(m, name, id(p)) for m, name, p in out]


def test_shared_error_is_the_default_and_names_both_modalities() -> None:
    net = Trunked()
    modules = {"audio": net.audio, "visual": net.visual}
    with pytest.raises(ValueError, match=r"1\.weight of shape \(4, 4\).*'audio'.*'visual'"):
        modality_parameters(modules)
    with pytest.raises(ValueError, match=r"one modality only \(pass shared=\.\.\.\)"):
        modality_parameters(modules, shared="error", hint="pass shared=...")


def test_shared_exclude_leaves_shared_parameters_out() -> None:
    net = Trunked()
    out = modality_parameters({"audio": net.audio, "visual": net.visual}, shared="exclude")
    a, v = net.audio[0], net.visual[0]
    assert _ids(out) == [
        (0, "0.weight", id(a.weight)),
        (0, "0.bias", id(a.bias)),
        (1, "0.weight", id(v.weight)),
        (1, "0.bias", id(v.bias)),
    ]


@pytest.mark.parametrize("owner", ["audio", "visual"])
def test_shared_assigned_to_a_modality(owner: str) -> None:
    net = Trunked()
    out = modality_parameters({"audio": net.audio, "visual": net.visual}, shared=owner)
    a, v, t = net.audio[0], net.visual[0], net.trunk
    audio = [(0, "0.weight", id(a.weight)), (0, "0.bias", id(a.bias))]
    visual = [(1, "0.weight", id(v.weight)), (1, "0.bias", id(v.bias))]
    m = 0 if owner == "audio" else 1
    trunk = [(m, "1.weight", id(t.weight)), (m, "1.bias", id(t.bias))]
    want = audio + trunk + visual if owner == "audio" else audio + visual + trunk
    assert _ids(out) == want


def test_shared_policy_errors() -> None:
    net = Trunked()
    depth = nn.Linear(2, 2)
    modules = {"audio": net.audio, "visual": net.visual, "depth": depth}
    with pytest.raises(ValueError, match=r"shared by modules\['audio'\] and modules\['visual'\]"):
        modality_parameters(modules, shared="depth")  # depth does not list the trunk
    with pytest.raises(ValueError, match=r"one of the modalities \['audio', 'visual', 'depth'\]"):
        modality_parameters(modules, shared="text")
    with pytest.raises(TypeError, match="shared"):
        modality_parameters(modules, shared=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ambiguous"):
        modality_parameters({"exclude": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, shared="exclude")
    # a modality whose parameters are all shared is left with nothing
    stem = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"modules\['b'\] has no parameters of its own"):
        modality_parameters({"a": [stem.weight, stem.bias], "b": [stem.weight]}, shared="a")
    with pytest.raises(ValueError, match=r"modules\['a'\] has no parameters of its own"):
        modality_parameters({"a": [stem.weight], "b": [stem.weight, stem.bias]}, shared="exclude")


def test_existing_behaviour_kept_for_other_callers() -> None:
    """Duplicates within a modality are kept once; the ``what`` name is used in messages."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    out = modality_parameters({"x": [a, a], "y": b}, what="encoders")
    assert _ids(out) == [(0, "", id(a)), (1, "", id(b))]
    with pytest.raises(ValueError, match=r"both encoders\['x'\] and encoders\['y'\]; each"):
        modality_parameters({"x": [a], "y": [b, a]}, what="encoders")
    with pytest.raises(ValueError, match=r"encoders\['y'\] has no parameters"):
        modality_parameters({"x": [a], "y": []}, what="encoders")


@given(
    membership=st.lists(st.sets(st.integers(0, 2), min_size=1, max_size=3), min_size=1, max_size=8),
    policy=st.sampled_from(["error", "exclude", "m0", "m1", "m2"]),
)
def test_shared_policy_against_an_independent_model(
    membership: list[set[int]], policy: str
) -> None:
    """Random sharing patterns over three modalities, checked against the rules written out."""
    params = [nn.Parameter(torch.zeros(i + 1)) for i in range(len(membership))]
    lists = {
        f"m{m}": [p for p, ms in zip(params, membership, strict=True) if m in ms] for m in range(3)
    }
    shared_any = any(len(ms) > 1 for ms in membership)
    # the rules: who keeps which parameter, or which error
    kept: dict[int, list[int]] = {m: [] for m in range(3)}
    error: str | None = None
    if any(not lists[f"m{m}"] for m in range(3)):
        error = "has no parameters"
    elif shared_any and policy == "error":
        error = "one modality only"
    else:
        for i, ms in enumerate(membership):
            if len(ms) == 1:
                kept[next(iter(ms))].append(i)
            elif policy == "exclude":
                continue
            elif int(policy[1]) in ms:
                kept[int(policy[1])].append(i)
            else:
                error = error or "does not list it"
        if error is None and any(not kept[m] for m in range(3)):
            error = "no parameters of its own"
    if error is not None:
        with pytest.raises(ValueError, match=error):
            modality_parameters(lists, shared=policy)
        return
    out = modality_parameters(lists, shared=policy)
    got = [(m, id(p)) for m, _, p in out]
    assert got == [(m, id(params[i])) for m in range(3) for i in kept[m]]


# ---------------------------------------------------------------------------- selection, marks


def test_select_parameters_by_policy_and_a_modality_left_without_any() -> None:
    from imbalance_losses.core.params import select_parameters

    enc = {"audio": nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)), "visual": nn.Linear(3, 3)}
    every = modality_parameters(enc)
    weights = select_parameters(every, "weights", enc)
    assert [(m, name) for m, name, _ in weights] == [(0, "0.weight"), (1, "weight")]
    assert select_parameters(every, "all", enc) == every
    biases = select_parameters(every, lambda name, p: name.endswith("bias"), enc)
    assert [(m, name) for m, name, _ in biases] == [(0, "0.bias"), (0, "1.bias"), (1, "bias")]
    norm_only = {"audio": nn.Linear(2, 3), "visual": nn.LayerNorm(3)}
    with pytest.raises(ValueError, match=r"modality 'visual'.*\(2 parameter\(s\) in total\)"):
        select_parameters(modality_parameters(norm_only), "weights", norm_only)


def test_gradient_marks_see_every_write_to_a_marked_gradient() -> None:
    from imbalance_losses.core.params import GradientMarks

    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    marks = GradientMarks()
    assert marks.fresh([a, b, c]) == [0, 1]  # c has no gradient
    marks.mark([(a, a.grad), (b, b.grad)])
    assert marks.unchanged(a) and marks.unchanged(b) and not marks.unchanged(c)
    assert marks.fresh([a, b, c]) == []
    b.grad.mul_(2.0)  # written in place (a backward accumulating into it)
    a.grad = torch.ones(2)  # replaced (zero_grad(set_to_none) then a backward)
    assert marks.fresh([a, b, c]) == [0, 1]
    marks.mark([(b, b.grad)])  # a keeps its old, now stale, mark
    assert marks.fresh([a, b]) == [0]


def test_scale_gradients_multiplies_each_modality_by_its_factor_in_one_fused_op_each() -> None:
    """``g <- g * k_m`` exactly, and one ``_foreach_mul_`` per modality with one 0-dim factor
    (the overload CUDA fuses into one launch; a list of per-tensor factors is one per tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from imbalance_losses.core.params import scale_gradients_

    torch.manual_seed(0)
    shapes = [(3, 2), (3,), (4, 4), (2,), (5, 1), (1,), (2, 3)]
    index = [0, 0, 1, 2, 1, 2, 0]
    grads = [torch.randn(s) for s in shapes]
    half = torch.randn(6).half()  # another dtype in modality 1: its own group
    grads.append(half)
    index.append(1)
    k = torch.tensor([0.5, 3.0, -2.0])
    want = [g * k[m].to(g.dtype) for g, m in zip(grads, index, strict=True)]

    calls: list[tuple[str, int, list[int]]] = []

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ == "_foreach_mul_":
                calls.append((func._overloadname, args[1].dim(), [t.numel() for t in args[0]]))
            return func(*args, **(kwargs or {}))

    with Calls():
        scale_gradients_(grads, index, k)
    for got, expected in zip(grads, want, strict=True):
        assert torch.equal(got, expected)
    assert [c[:2] for c in calls] == [("Tensor", 0)] * 4  # modality 0, 1 (fp32), 2, 1 (fp16)
    assert sorted(n for c in calls for n in c[2]) == sorted(g.numel() for g in grads)
