"""MMPareto (Wei & Hu, ICML 2024, arXiv 2405.17730): innocent unimodal assistance, N modalities.

The model is trained on the fused loss ``L_mm`` plus one unimodal loss ``L_m`` per modality. On
the encoder parameters ``theta_m`` of modality ``m`` the two gradients
``a = dL_mm/dtheta_m`` and ``b = dL_m/dtheta_m`` are combined per step (``<.,.>``, ``||.||`` over
the whole flattened encoder)::

    agreement (<a, b> > 0, or a or b zero):  k_mm = k_m = 1/2
    conflict  (<a, b> <= 0, a and b non-zero): k_mm = clip(<b - a, b> / ||a - b||^2, 0, 1),
                                               k_m = 1 - k_mm
                             (the min-norm point of the segment [a, b]: two-objective MGDA)
    d = 2 (k_mm a + k_m b)                               (= a + b under agreement)
    rescale="code" (default): g_p = gamma * max(||a_p + b_p|| / ||d_p||, 1) * d_p  (per tensor)
    rescale="paper":          g = gamma * (||a + b|| / ||d||) * d          (one factor per encoder)

with ``gamma = 1.5``; a zero ``d`` (or ``d_p``) gets factor 1 (a zero gradient). The defaults
follow the official code (``gamma``, the per-tensor rescale, a zero gradient giving ``gamma``
times the other one); ``"paper"`` is our reading of the paper's encoder-level notation. Norms
accumulate in fp64 and ``<a, b> = (||a + b||^2 - ||a||^2 - ||b||^2) / 2`` (scale-invariant: a
``GradScaler`` factor or entries near ``1e30`` change nothing and overflow nothing). Every other
parameter the losses reach (the fusion head, unimodal heads) gets the plain summed gradient
``d(L_mm + sum_m L_m)/dp``; a unimodal loss ``L_m`` must not reach another modality's encoder
(``ValueError``: its gradient there would be in neither ``a`` nor ``b``). ``d`` never conflicts
with either objective: ``<d, a> >= 0`` and ``<d, b> >= 0``. See ``docs/mmpareto.md``
(official-code differences, accumulation, DDP, AMP, cost).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..core.distributed import ProcessGroup, is_sharded
from ..core.dtypes import wide_dtype
from ..core.gradients import (
    Runs,
    agree_over_ranks,
    average_over_ranks_,
    objective_gradients,
    reached_leaves,
)
from ..core.params import SharedPolicy, modality_parameters
from ..core.records import StepRecord
from ..core.validation import check_same_modalities, check_state_keys, real_param

__all__ = ["MMPareto", "MMParetoRecord", "pareto_weights", "rescale_factors"]

Rescale = Literal["paper", "code"]


@dataclass(frozen=True)
class MMParetoRecord(StepRecord):
    """What the last :meth:`MMPareto.backward` decided, one entry per modality (``[M]``).

    Attributes:
        cosine: ``<a, b> / (||a|| ||b||)`` of the fused and unimodal gradients on the encoder
            (0 when either is zero).
        conflict: bool, ``<a, b> <= 0`` with both gradients non-zero (the min-norm weights
            were used; a zero gradient counts as agreement).
        k_mm, k_m: the weights on ``a`` and ``b`` (``k_mm + k_m = 1``).
        rescale: the encoder's mean over tensors of ``max(||a_p + b_p|| / ||d_p||, 1)``
            (``"code"``), or ``||a + b|| / ||d||`` (``"paper"``); gamma not included.
        step: 0-based index of the :meth:`MMPareto.backward` call this record describes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import MMPareto
        >>> w = {"audio": nn.Parameter(torch.tensor([1.0, 0.0])),
        ...      "visual": nn.Parameter(torch.ones(2))}
        >>> mmpareto = MMPareto({"audio": [w["audio"]], "visual": [w["visual"]]})
        >>> fused = w["audio"].sum() + w["visual"].sum()
        >>> uni = {"audio": -(w["audio"] ** 2).sum(), "visual": w["visual"].sum()}
        >>> rec = mmpareto.backward(fused, uni)
        >>> rec.conflict.tolist()                           # audio's two gradients disagree
        [True, False]
        >>> rec.k_mm.round(decimals=3)                      # fused loss's weight per encoder
        tensor([0.6000, 0.5000])
    """

    cosine: Tensor
    conflict: Tensor
    k_mm: Tensor
    k_m: Tensor
    rescale: Tensor
    step: int


def pareto_weights(aa: Tensor, ab: Tensor, bb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(k_mm, k_m, conflict)`` from the Gram entries ``<a,a>``, ``<a,b>``, ``<b,b>`` (any shape).

    $$k_{mm} = \operatorname{clip}\Big(\frac{\langle b - a, b \rangle}{\lVert a - b \rVert^2},
    0, 1\Big), \quad k_m = 1 - k_{mm} \;\; \text{if } \langle a, b \rangle \le 0, \qquad
    k_{mm} = k_m = \tfrac12 \;\; \text{otherwise}$$

    ``k_mm = 1/2`` where ``<a, b> > 0`` or either gradient is zero (``<a,a> = 0`` or
    ``<b,b> = 0``: a zero gradient agrees with anything, so ``d = a + b``, the other gradient);
    elsewhere the min-norm weight ``clip((<b,b> - <a,b>) / (<a,a> + <b,b> - 2<a,b>), 0, 1)``
    (:func:`~imbalance_losses.core.gradients.min_norm_weight`; its denominator is
    ``>= <a,a> + <b,b> > 0`` there); ``k_m = 1 - k_mm``; ``conflict`` is where the min-norm
    weights were used. Chosen on the device (``masked_fill``, no host sync); a non-finite Gram entry
    (a non-finite gradient) gives NaN weights.

    Example:
        >>> import torch
        >>> from imbalance_losses import pareto_weights
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflicting: <a, b> < 0
        >>> k_mm, k_m, conflict = pareto_weights(a @ a, a @ b, b @ b)
        >>> k_mm, k_m, conflict                                         # the min-norm combination
        (tensor(0.6000), tensor(0.4000), tensor(True))
        >>> pareto_weights(a @ a, a @ a, a @ a)[:2]                     # agreeing: the plain sum
        (tensor(0.5000), tensor(0.5000))
    """
    num = bb - ab
    return _choose(aa, bb, ab, num, aa - ab + num)


def _choose(
    aa: Tensor, bb: Tensor, ab: Tensor, num: Tensor, den: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pareto_weights` given also ``num = <b,b> - <a,b>`` and ``den = ||a - b||^2``."""
    agree = (ab > 0) | (torch.minimum(aa, bb) == 0)
    k = (num / den).clamp(0.0, 1.0).masked_fill_(agree, 0.5)
    return k, 1.0 - k, ~agree


_POLAR = ((-0.5, -0.5, 0.5), (0.5, 1.5, -0.5), (2.0, 2.0, -1.0))
"""``<a, b>``, ``<b, b> - <a, b>`` and ``||a - b||^2`` from ``||a||^2``, ``||b||^2`` and
``||a + b||^2`` (polarisation), as the rows of one matrix."""


def rescale_factors(summed: Tensor, combined: Tensor, *, floor_one: bool) -> Tensor:
    """``r = ||a + b|| / ||d||`` elementwise from the two norms.

    ``floor_one`` (the official code's per-tensor rule) gives ``max(r, 1)``: never shrink. Where
    ``d = 0`` (``0 / 0`` or ``x / 0``) and where ``r`` is NaN (a non-finite gradient: the official
    ``r > 1`` test is false there) the factor is 1; a non-finite ``d`` stays non-finite after
    scaling.

    Example:
        >>> import torch
        >>> from imbalance_losses.methods.mmpareto import rescale_factors
        >>> rescale_factors(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([2.0, 2.0, 0.0]),
        ...                 floor_one=True)
        tensor([1.5000, 1.0000, 1.0000])
    """
    r = torch.nan_to_num(summed / combined, nan=1.0, posinf=1.0)
    return r.clamp_min(1.0) if floor_one else r


_HALF = (torch.float16, torch.bfloat16)


def _sums(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """``a_p + b_p``, in fp32 where ``a_p`` is fp16 / bf16: the sum of two half-precision
    values is (nearly always) exact there, so ``<a, b>`` formed from its norm keeps fp32
    precision instead of the half type's."""
    if any(x.dtype in _HALF for x in a):
        a = [x.float() if x.dtype in _HALF else x for x in a]
    return list(torch._foreach_add(a, b))


def _per_tensor(values: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """``values`` ``[..., P]`` as ``P`` tensors ``[...]``, each in the dtype of its ``like``."""
    dtypes = {t.dtype for t in like}
    if len(dtypes) == 1:
        return list(values.to(dtypes.pop()).unbind(-1))
    return [v.to(t.dtype) for v, t in zip(values.unbind(-1), like, strict=True)]


def _plain_sums(
    raw: list[list[Tensor | None]], first: int, params: list[Tensor], seen: set[int]
) -> list[Tensor]:
    """``sum_j raw[j][first + i]`` for every ``params[i]``: the plain summed gradient of the
    parameters outside the encoders, one ``torch._foreach_add_`` per loss (zeros where no loss
    reached one). The first term of each is made safe to modify (:func:`_own`)."""
    sums: list[Tensor | None] = [None] * len(params)
    for grads in raw:
        into: list[Tensor] = []
        terms: list[Tensor] = []
        for i, g in enumerate(grads[first:]):
            if g is None:
                continue
            total = sums[i]
            if total is None:
                sums[i] = _own(g, params[i], seen)
            else:
                into.append(total)
                terms.append(g)
        if into:
            torch._foreach_add_(into, terms)
    return [_own(g, p, seen) if g is None else g for g, p in zip(sums, params, strict=True)]


def _own(g: Tensor | None, like: Tensor, seen: set[int]) -> Tensor:
    """A gradient safe to modify in place and to store as ``.grad`` of one tensor only.

    Zeros for ``None``; a copy of an expanded one, or of one whose storage is in ``seen`` (the
    storages already handed out in this call: ``torch.autograd.grad`` returns one tensor for
    two parameters when the graph adds them, ``w1 + w2``, and a view of one buffer for the
    pieces of a ``torch.cat``). The storage returned is added to ``seen``.
    """
    if g is None:
        return torch.zeros_like(like)
    ptr = g.untyped_storage().data_ptr()
    if (0 in g.stride() and g.numel() > 1) or ptr in seen:
        g = g.clone()
        ptr = g.untyped_storage().data_ptr()
    seen.add(ptr)
    return g


class MMPareto:
    r"""MMPareto's gradient combination in place of ``loss.backward()``.

    $$a = \nabla_{\theta_m} \mathcal{L}_{mm}, \quad b = \nabla_{\theta_m} \mathcal{L}_m, \qquad
    k_{mm} = \begin{cases} \tfrac12 & \langle a, b \rangle > 0 \\
    \operatorname{clip}\big(\tfrac{\langle b - a, b \rangle}{\lVert a - b \rVert^2}, 0, 1\big)
    & \text{otherwise} \end{cases}, \qquad k_m = 1 - k_{mm}$$

    $$d = 2 (k_{mm} a + k_m b), \qquad
    g_p = \gamma \max\Big(\frac{\lVert a_p + b_p \rVert}{\lVert d_p \rVert}, 1\Big)\, d_p$$

    per parameter tensor ``p`` (the official code's rule; ``rescale="paper"``:
    $g = \gamma \frac{\lVert a + b \rVert}{\lVert d \rVert} d$ per encoder). A zero
    gradient ($a = 0$ or $b = 0$) counts as agreement.

    ::

        mmpareto = MMPareto({"audio": model.audio_net, "visual": model.visual_net})
        fused, feats = model(batch)
        zs = unimodal_logits(model.fusion_head, feats)        # or the model's own unimodal heads
        mmpareto.backward(ce(fused, y), {m: ce(z, y) for m, z in zs.items()})
        optimizer.step()

    Each call adds to ``.grad`` (as ``backward()`` does) the combined gradient of *this call's*
    losses on the encoders and their plain summed gradient on every other parameter they reach.
    Cost: one backward pass per loss (``M + 1``), none for the sum.

    Args:
        modules: ordered mapping modality -> encoder (``nn.Module`` or iterable of parameters),
            at least two; frozen parameters (``requires_grad=False``) are skipped.
        gamma: magnitude factor ``> 0`` (1.5, the official value).
        rescale: ``"code"`` (the official code's rule, default: per tensor, never below 1) or
            ``"paper"`` (one factor per encoder, our reading of the paper's notation).
        shared: a parameter listed under several modalities: ``"error"``, ``"exclude"`` (it then
            gets the plain summed gradient) or the modality that owns it.
        process_group: under DDP, each loss's gradients are averaged over this group before the
            combination (default: the whole world). Run the step under ``ddp_model.no_sync()``
            (or without DDP): the result must not be all-reduced again. Before that average,
            the ranks agree (two small all-reduces): an input failure on one rank raises on
            every rank in the same call, and an encoder parameter reached on any rank gets the
            averaged gradient on every rank.

    Raises:
        ValueError, TypeError: bad modules, gamma or rescale (see :meth:`backward` for inputs).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from imbalance_losses import MMPareto, unimodal_logits
        >>> _ = torch.manual_seed(0)
        >>> encoders = nn.ModuleDict({"audio": nn.Linear(5, 4), "visual": nn.Linear(7, 4)})
        >>> head = nn.Linear(8, 3)
        >>> mmpareto = MMPareto(dict(encoders.items()), gamma=1.5)
        >>> x = {"audio": torch.randn(6, 5), "visual": torch.randn(6, 7)}
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> feats = {m: encoders[m](x[m]) for m in x}
        >>> fused = F.cross_entropy(head(torch.cat(list(feats.values()), 1)), target)
        >>> uni = {m: F.cross_entropy(z, target) for m, z in unimodal_logits(head, feats).items()}
        >>> record = mmpareto.backward(fused, uni)           # instead of loss.backward()
        >>> record.modalities, head.weight.grad.shape, encoders["audio"].weight.grad.shape
        (('audio', 'visual'), torch.Size([3, 8]), torch.Size([4, 5]))
    """

    def __init__(
        self,
        modules: Mapping[str, object] | nn.ModuleDict,
        *,
        gamma: float = 1.5,
        rescale: Rescale = "code",
        shared: SharedPolicy = "error",
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.gamma = real_param("gamma", gamma, gt=0.0)
        if rescale not in ("paper", "code"):
            raise ValueError(f"rescale must be 'paper' or 'code', got {rescale!r}")
        self.rescale: Rescale = rescale
        self.modalities = tuple(modules)
        self._params = modality_parameters(modules, what="modules", shared=shared)
        sharded = sorted({m for m, _, p in self._params if is_sharded(p)})
        if sharded:
            names = [self.modalities[m] for m in sharded]
            raise NotImplementedError(
                f"MMPareto does not support FSDP2 (the parameters of {names} are sharded "
                "DTensors): its per-objective torch.autograd.grad cannot reach them (the forward "
                "runs on gathered copies) and would bypass FSDP's gradient reduce-scatter. Use "
                "DDP, or shard only what MMPareto does not modulate (docs/attention.md)"
            )
        self.process_group = process_group
        self.steps = 0
        self.last: MMParetoRecord | None = None
        self._segments: Runs | None = None
        self._constants: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # loss tensor -> the step it was passed in (weak: the user's tensors, not ours to keep)
        self._passed: MutableMapping[Tensor, int] = WeakIdKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling / deepcopy: everything but the weak table of the losses already passed and the
        device caches."""
        state = self.__dict__.copy()
        for cache in ("_passed", "_segments", "_constants"):  # rebuilt on use
            state.pop(cache, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._passed = WeakIdKeyDictionary()
        self._segments, self._constants = None, {}

    def __repr__(self) -> str:
        return (
            f"MMPareto(modalities={list(self.modalities)}, gamma={self.gamma}, rescale="
            f"{self.rescale!r}, parameters={len(self._params)}, steps={self.steps})"
        )

    def _check(self, fused: object, unimodal: object) -> list[Tensor]:
        if not isinstance(unimodal, Mapping):
            raise TypeError(
                f"unimodal_losses must be a mapping modality -> scalar loss, got "
                f"{type(unimodal).__name__}"
            )
        if set(unimodal) != set(self.modalities) or len(unimodal) != len(self.modalities):
            check_same_modalities(
                self.modalities, unimodal, expected_what="modules", actual_what="unimodal_losses"
            )
        out, named = [], {f"unimodal_losses[{m!r}]": unimodal[m] for m in self.modalities}
        for name, loss in {"fused_loss": fused, **named}.items():
            if not isinstance(loss, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(loss).__name__}")
            if loss.numel() != 1 or not loss.is_floating_point():
                raise ValueError(
                    f"{name} must be a floating-point scalar (reduce it, e.g. .mean()), got "
                    f"shape {tuple(loss.shape)} of {loss.dtype}"
                )
            if not loss.requires_grad:
                raise ValueError(f"{name} does not require grad (computed under no_grad?)")
            out.append(loss)
        again = [name for name, loss in zip(["fused_loss", *named], out, strict=True)
                 if loss in self._passed]  # fmt: skip
        if again:
            raise ValueError(
                f"{', '.join(again)} were already passed to this MMPareto's backward (step "
                f"{max(self._passed[x] for x in out if x in self._passed)}): a second call with "
                "the same loss tensors would add their combined gradient to .grad again and count "
                "another step; call backward once per loss (each micro-batch of an accumulated "
                "step computes new losses)"
            )
        return out

    def _check_reach(self, raw: list[list[Tensor | None]], counts: list[int]) -> None:
        """Each encoder reached by the fused loss and its own unimodal loss, by no other one;
        dense gradients only (the rule's norms and in-place combination need strided tensors)."""
        ends = [sum(counts[: m + 1]) for m in range(len(counts))]
        runs = [slice(end - c, end) for end, c in zip(ends, counts, strict=True)]
        losses = ["fused_loss", *(f"unimodal_losses[{m!r}]" for m in self.modalities)]
        for what, gs in zip(losses, raw, strict=True):
            for i, g in enumerate(gs):
                if g is not None and g.layout != torch.strided:
                    m = next((k for k, end in enumerate(ends) if i < end), None)
                    where = "a parameter outside the modules" if m is None else (
                        f"a parameter of modules[{self.modalities[m]!r}]")  # fmt: skip
                    raise ValueError(
                        f"{what} gives {where} (shape {tuple(g.shape)}) a {g.layout} gradient; "
                        "MMPareto needs dense gradients (e.g. nn.Embedding(..., sparse=False))"
                    )
        for m, name in enumerate(self.modalities):
            for what, gs in (("fused_loss", raw[0]), (f"unimodal_losses[{name!r}]", raw[m + 1])):
                if all(g is None for g in gs[runs[m]]):
                    raise ValueError(
                        f"{what} does not reach any parameter of modules[{name!r}]: its "
                        "gradient there is zero; compute it from that encoder's features"
                    )
        for j, name in enumerate(self.modalities):
            for m, other in enumerate(self.modalities):
                if m != j and any(g is not None for g in raw[j + 1][runs[m]]):
                    raise ValueError(
                        f"unimodal_losses[{name!r}] also reaches modules[{other!r}]: MMPareto "
                        f"combines on modules[{other!r}] only the fused loss and "
                        f"unimodal_losses[{other!r}], so its gradient there would be dropped; "
                        f"detach modality {other!r}'s features in the {name!r} unimodal branch "
                        "(or list the shared part with shared='exclude')"
                    )

    def backward(
        self,
        fused_loss: Tensor,
        unimodal_losses: Mapping[str, Tensor],
        *,
        retain_graph: bool = False,
    ) -> MMParetoRecord:
        """Add MMPareto's gradients to ``.grad`` (see the module docstring) and return the record.

        Args:
            fused_loss: scalar multimodal loss ``L_mm`` (scaled by a ``GradScaler`` or not).
            unimodal_losses: mapping modality -> scalar ``L_m``, the modules' modalities.
            retain_graph: keep the graph after the last pass.

        Raises:
            TypeError / ValueError: bad input (:meth:`_gradients`: keys, losses, an encoder not
                reached or reached by another modality's loss, a loss tensor already passed).
                Under DDP every other rank raises ``RuntimeError`` in the same call.
            ValueError: under DDP, on every rank, when the ranks' losses reach different
                parameters outside the modules (a head one rank uses and another does not).
        """
        enc, counts, others, raw, losses = self._gradients(
            fused_loss, unimodal_losses, retain_graph
        )
        n, device = len(enc), enc[0].device if enc else torch.device("cpu")
        index = [m for m, c in enumerate(counts) for _ in range(c)]
        a_raw, b_raw = raw[0][:n], [raw[index[i] + 1][i] for i in range(n)]
        reached = [x is not None or y is not None for x, y in zip(a_raw, b_raw, strict=True)]
        touched = agree_over_ranks(reached, others, device, self.process_group)
        seen: set[int] = set()  # storages handed out in this call (autograd may alias them)
        a = [_own(g, p, seen) for g, p in zip(a_raw, enc, strict=True)]
        b = [_own(g, p, seen) for g, p in zip(b_raw, enc, strict=True)]
        # the plain sum on every other parameter; zero where no pass produced one
        head = _plain_sums(raw, n, others, seen)
        average_over_ranks_(a + b + head, self.process_group)
        self._apply(enc, a, b, counts, touched)
        for loss in losses:
            self._passed[loss] = self.steps - 1
        for p, g in zip(others, head, strict=True):
            p.grad = g if p.grad is None else p.grad.add_(g)
        assert self.last is not None
        return self.last

    def _gradients(
        self, fused_loss: Tensor, unimodal_losses: Mapping[str, Tensor], retain_graph: bool
    ) -> tuple[list[Tensor], list[int], list[Tensor], list[list[Tensor | None]], list[Tensor]]:
        """Validate; every loss's gradient on the encoders and the other parameters it reaches.

        Returns ``(encoder parameters, their count per modality, the other parameters, the
        gradients [loss][parameter], the losses)``.

        Raises:
            TypeError / ValueError: keys that differ from the modules' modalities, a loss that is
                not a floating scalar requiring grad, a modality whose encoder the fused loss
                or its own unimodal loss does not reach, or a unimodal loss that reaches another
                modality's encoder (named in the message), or a loss tensor already passed to
                an earlier call (a repeat: it would add the same gradient twice and count two
                steps; micro-batches compute new tensors and are not repeats). Under DDP such a
                rank joins the ranks' agreement with a failure flag before raising, and every
                other rank raises ``RuntimeError`` (another rank's input failed) in the same
                call.
        """
        mods = range(len(self.modalities))
        own = [[p for i, _, p in self._params if i == m and p.requires_grad] for m in mods]
        enc, counts = [p for ps in own for p in ps], [len(ps) for ps in own]
        try:  # a rank whose input fails joins the ranks' agreement with a failure flag
            losses = self._check(fused_loss, unimodal_losses)
            if not all(own):
                raise ValueError(
                    f"modules[{self.modalities[own.index([])]!r}] has no trainable parameter"
                )
            ids = {id(p) for p in enc}
            others = [p for p in reached_leaves(losses) if id(p) not in ids]
            # every loss over every encoder: a unimodal loss reaching another encoder is refused
            raw = objective_gradients(losses, [enc + others] * len(losses),
                                      retain_graph=retain_graph)  # fmt: skip
            self._check_reach(raw, counts)
        except Exception:
            device = enc[0].device if enc else torch.device("cpu")
            agree_over_ranks([False] * len(enc), [], device, self.process_group, failed=True)
            raise
        return enc, counts, others, raw, losses

    def _apply(
        self, enc: list[Tensor], a: list[Tensor], b: list[Tensor], counts: list[int],
        touched: list[bool],
    ) -> None:  # fmt: skip
        """The rule on the encoders, written to ``.grad``; ``a`` and ``b`` are consumed.

        Every statistic comes from per-tensor norms accumulated in fp64 (fp32 on MPS): one
        ``torch._foreach_norm`` of ``a``, ``b`` and ``a + b`` together (the sum in fp32 for
        fp16 / bf16 gradients), one of ``d``. The squares of fp32 / bf16 / fp16 entries neither
        overflow nor underflow in fp64, so a ``GradScaler`` factor of ``2^32`` or entries near
        ``1e30`` change no decision, and a power-of-two scale scales the result exactly.
        ``<a, b> = (||a + b||^2 - ||a||^2 - ||b||^2) / 2`` per encoder. The combination
        ``d = 2 k_mm a + 2 k_m b`` is formed in place in ``a`` (exactly ``a + b`` under
        agreement) and scaled once by ``gamma`` times its factor.
        """
        runs, wide = self._runs(counts), wide_dtype(a[0].device)
        total = _sums(a, b)
        n = torch.stack(torch._foreach_norm([*a, *b, *total], 2, dtype=wide))
        del total
        n = n.view(3, -1)  # ||a_p||, ||b_p||, ||a_p + b_p||
        gram = runs.sum(n.square())  # ||a||^2, ||b||^2, ||a + b||^2 per encoder
        ab, num, den = self._polar(gram) @ gram
        k_mm, k_m, conflict = _choose(gram[0], gram[1], ab, num, den)
        weights = _per_tensor(runs.expand(torch.stack([k_mm, k_m]) * 2.0), a)
        torch._foreach_mul_(a, [w[0] for w in weights])
        torch._foreach_addcmul_(a, b, [w[1] for w in weights])  # a := d (a + b under agreement)
        nd = torch.stack(torch._foreach_norm(a, 2, dtype=wide))
        if self.rescale == "paper":  # one factor per encoder
            rescale = rescale_factors(gram[2].sqrt(), runs.sum(nd.square()).sqrt(), floor_one=False)
            per = runs.expand(rescale)
        else:  # per tensor, never below 1
            per = rescale_factors(n[2], nd, floor_one=True)
            rescale = runs.mean(per)
        torch._foreach_mul_(a, _per_tensor(self.gamma * per, a))  # gamma * factor * d
        for p, g, t in zip(enc, a, touched, strict=True):
            if t:
                p.grad = g if p.grad is None else p.grad.add_(g)
        norm = gram[:2].sqrt()
        cosine = ab / (norm[0] * norm[1]).clamp_min(torch.finfo(wide).tiny)
        stats = torch.stack([cosine, k_mm, k_m, rescale]).float()
        self.last = MMParetoRecord(
            modalities=self.modalities, cosine=stats[0], conflict=conflict, k_mm=stats[1],
            k_m=stats[2], rescale=stats[3], step=self.steps,
        )  # fmt: skip
        self.steps += 1

    def _polar(self, like: Tensor) -> Tensor:
        """:data:`_POLAR` on ``like``'s device, in its dtype (copied there once)."""
        key = (like.device, like.dtype)
        if key not in self._constants:
            self._constants[key] = torch.tensor(_POLAR, dtype=like.dtype).to(like.device)
        return self._constants[key]

    def _runs(self, counts: list[int]) -> Runs:
        """The encoders' runs of parameter tensors (kept while the trainable set is the same)."""
        if self._segments is None or self._segments.counts != tuple(counts):
            self._segments = Runs(counts)
        return self._segments

    def state_dict(self) -> dict[str, Any]:
        """``{"gamma", "rescale", "steps", "modalities"}`` (MMPareto keeps no running statistic)."""
        return {"gamma": self.gamma, "rescale": self.rescale, "steps": self.steps,
                "modalities": list(self.modalities)}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the modalities must be the same, in the same order.

        Raises:
            KeyError: a key is missing (all missing keys named).
            ValueError: the state was saved for other modalities, or holds a bad ``gamma`` /
                ``rescale``. Nothing is changed when it raises.
        """
        check_state_keys(state, ("gamma", "rescale", "steps", "modalities"), who="MMPareto")
        check_same_modalities(self.modalities, dict.fromkeys(state["modalities"]),
                              expected_what="modules", actual_what="the state's")  # fmt: skip
        gamma = real_param("gamma", state["gamma"], gt=0.0)
        if state["rescale"] not in ("paper", "code"):
            raise ValueError(f"rescale must be 'paper' or 'code', got {state['rescale']!r}")
        self.gamma, self.rescale, self.steps = gamma, state["rescale"], int(state["steps"])
