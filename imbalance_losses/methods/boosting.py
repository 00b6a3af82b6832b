"""Sustained boosting with adaptive classifier assignment (Jiang, Huang, Yang; NeurIPS 2025).

The weak modality gets more classifiers. Each modality ``m`` owns ``n_m`` heads; head ``j`` is::

    z_mj = W2 relu(L_mj(u_m)) + b2          L_mj: Linear(D_m, hidden) of its own,
                                            (W2, b2): ONE output layer shared by every head
    Z_m  = sum_j z_mj                       (the modality's ensemble, plain sum of logits)

and the per-sample loss of modality ``m`` with ``n`` heads is (every weight 1)::

    l_mb = CE(Z_m, y)_b                                 eps_all
         + CE(sum_{j<n} z_mj, y)_b                      eps_pre   (n > 1)
         + (1 - lam p_b) CE(z_mn, y)_b                  eps       (n > 1, newest head only)
    p_b  = stopgrad(softmax(sum_{j<n} z_mj))[b, y_b]

with ``l_mb = CE(z_m1, y)_b`` for one head. The loss is ``l_b = sum_m l_mb`` reduced over the
batch (``reduction``: the mean over the counted samples, the sum, or ``[B]``); samples whose
target is ``ignore_index`` contribute 0 and are not counted. The residual term is the official
code's ``CE(z_mn, y - lam y ⊙ p)`` written per sample: for a one-hot ``y`` the soft target has the
single entry ``1 - lam p_y`` so the two are identical.

Every check compares the modalities' confidence ``s_m = mean_i softmax(Z_m)[i, y_i]`` (pooled
over the training samples since the previous check, all ranks) and gives at most one new head to
the weakest modality; see :meth:`SustainedBoostingLoss.check`.

**How an added head reaches the optimiser.** Every modality's ``max_heads`` first layers exist
from the start as separate parameters (``head_weight[m][j]`` ``[hidden, D_m]``,
``head_bias[m][j]`` ``[hidden]``), so they are registered with the optimiser and with DDP before
any head is switched on. The forward pass concatenates the active heads' weights into one batched
matmul per modality; every inactive head is attached to the loss through an empty slice, so it is
in the graph (DDP never sees an unused parameter) and gets a gradient of exactly zero: inactive
heads are zero and stay exactly zero under weight decay, momentum and Adam. Switching a head on
draws it in place (Xavier-normal weight, zero bias) from the module's own seeded generator,
identical on every rank and saved in ``state_dict``, and drops that head's state in the
optimisers bound with :meth:`SustainedBoostingLoss.attach_optimizer`, so Adam / AdamW start it at
step 0 exactly as a freshly created parameter.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..core.distributed import ProcessGroup, is_distributed, world_size
from ..core.hooks import warn_on_backward
from ..core.records import StepRecord
from ..core.running import RunningSums
from ..core.stats import Reduction, counted, one_vs_rest_ratio, reduce_loss, true_class_probability
from ..core.validation import (
    check_features,
    check_modalities,
    check_same_modalities,
    check_target,
    int_param,
    real_param,
    reduction_param,
)

__all__ = [
    "BoostingRecord",
    "SustainedBoostingLoss",
    "assign_head",
    "boosting_residual_loss",
    "confidence_scores",
]

_OpenSteps = MutableMapping[Tensor, "_StepMark"]


_NO_SAMPLES = (
    "check() needs at least one training-mode forward with samples since the last check; none "
    "was pooled (no training-mode forward, only empty batches, or every target equal to "
    "ignore_index)"
)


class _StepMark:
    """One training step's feature tensors; ``fired`` once a backward went through its loss."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, grad: Tensor) -> None:
        self.fired = True


_EVAL_BACKWARD = (
    "SustainedBoostingLoss is in eval mode but a backward pass went through its loss: in "
    "eval mode it pools no confidence score and runs no check, so no head is ever added "
    "(plain ensemble training). Forgot boost.train() after a validation pass? Unless you "
    "registered it on your model (model.boost = boost), model.train() does not reach it: "
    "call boost.train() too (and run validation under torch.no_grad()). Shown once per "
    "module"
)


@dataclass(frozen=True)
class BoostingRecord(StepRecord):
    """What the last :meth:`SustainedBoostingLoss.check` saw and decided.

    Attributes:
        scores: ``[M]`` confidence ``s_m = mean_i softmax(Z_m)[i, y_i]`` over the pooled samples
            (every rank), fp32.
        ratios: ``[M]`` one-vs-rest ratio ``r_m = s_m / mean_{k != m} s_k``; for two modalities
            ``[s_1/s_2, s_2/s_1]``.
        num_heads: ``[M]`` heads per modality after the decision (int64).
        head_added: ``[M]`` 1 for the modality that got a head at this check, else 0 (int64).
        samples: scalar, number of pooled training samples behind ``scores`` (all ranks).
        added_to: name of the modality that got a head, or ``None``.
        capped: name of the modality that should have got a head but is at ``max_heads``, or
            ``None``.

    Example:
        >>> import torch
        >>> from imbalance_losses import SustainedBoostingLoss
        >>> _ = torch.manual_seed(0)
        >>> boost = SustainedBoostingLoss(3, {"audio": 4, "visual": 4}, check_every="manual")
        >>> optimizer = torch.optim.SGD(boost.parameters(), lr=0.1)
        >>> boost.attach_optimizer(optimizer)
        >>> feats = {"audio": torch.randn(6, 4), "visual": torch.randn(6, 4)}
        >>> _ = boost(feats, torch.arange(6) % 3)
        >>> rec = boost.check()
        >>> rec.modalities, tuple(rec.scores.shape), rec.num_heads.tolist() in ([1, 2], [2, 1])
        (('audio', 'visual'), (2,), True)
    """

    scores: Tensor
    ratios: Tensor
    num_heads: Tensor
    head_added: Tensor
    samples: Tensor
    added_to: str | None = None
    capped: str | None = None


def boosting_residual_loss(
    logits_heads: Tensor, target: Tensor, *, lam: float, ignore_index: int | None = -100
) -> Tensor:
    """Per-sample sustained-boosting loss ``l_mb`` ``[B]`` of one modality's stack of heads.

    ``logits_heads`` is ``[B, n, C]``, the logits ``z_mj`` of the modality's ``n`` heads, oldest
    first. With ``Z = sum_j z_mj`` and ``P = sum_{j<n} z_mj`` (the previous ensemble)::

        n = 1:  l_b = CE(z_m1, y)_b
        n > 1:  l_b = CE(Z, y)_b + CE(P, y)_b + (1 - lam p_b) CE(z_mn, y)_b
                p_b = stopgrad(softmax(P))[b, y_b]

    For soft targets ``t`` ``[B, C]`` the last term is ``CE(z_mn, t - lam t ⊙ stopgrad(softmax(
    P)))``, the official code's residual target (for a one-hot ``t`` both forms agree). Samples
    whose class index is ``ignore_index`` give 0 in every term (``None``: no index is ignored;
    the cross-entropies then use ``F.cross_entropy``'s default ``-100``). The cross-entropies
    run in ``promote_types(dtype, float32)`` for soft targets; ``p`` is detached, at least fp32.

    Example:
        >>> import torch
        >>> z = torch.zeros(2, 1, 3)                    # one head, uniform logits
        >>> boosting_residual_loss(z, torch.tensor([0, 2]), lam=0.5)
        tensor([1.0986, 1.0986])
    """
    ignore = -100 if ignore_index is None else ignore_index
    soft = target.is_floating_point()
    dtype = torch.promote_types(logits_heads.dtype, torch.float32)
    tgt = target.to(dtype) if soft else target

    def ce(logits: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(logits, t, reduction="none", ignore_index=ignore)

    per = ce(logits_heads.sum(1), tgt)  # eps_all (= CE(z_m1, y) for one head)
    if logits_heads.shape[1] == 1:
        return per
    previous = logits_heads[:, :-1].sum(1)
    newest = logits_heads[:, -1]
    per = per + ce(previous, tgt)  # eps_pre
    if soft:
        # soft targets: CE(z_n, t - lam t ⊙ p) with p the detached previous softmax.
        p = torch.softmax(previous.detach().to(dtype), dim=-1)
        return per + ce(newest, tgt * (1.0 - lam * p))
    p_true = true_class_probability(previous, target, ignore_index)  # detached, 0 if ignored
    return per + (1.0 - lam * p_true) * ce(newest, target)  # eps


def confidence_scores(
    logits_heads: Sequence[Tensor], target: Tensor, *, ignore_index: int | None = -100
) -> Tensor:
    """Per modality the summed true-class probability of its ensemble, ``[M]``, at least fp32.

    ``logits_heads[m]`` is ``[B, n_m, C]`` (the logits ``z_mj`` of modality ``m``'s heads)::

        S_m = sum_b softmax(Z_m)[b, y_b]          Z_m = sum_j z_mj

    (``sum_c softmax(Z_m)_bc t_bc`` for soft targets ``t`` ``[B, C]``). Samples whose target is
    ``ignore_index`` add 0. These are *sums*: the confidence score of a check is
    ``s_m = S_m / (number of counted samples)``, pooled over steps and ranks first. Not part of
    the graph (detached probabilities; fp16 / bf16 logits are promoted to fp32 first).

    Example:
        >>> import torch
        >>> z = [torch.zeros(2, 1, 4), torch.zeros(2, 3, 4)]   # uniform: p = 1/4 per sample
        >>> confidence_scores(z, torch.tensor([1, 3]))
        tensor([0.5000, 0.5000])
    """
    return torch.stack(
        [true_class_probability(z.sum(1), target, ignore_index).sum() for z in logits_heads]
    )


def assign_head(scores: Tensor, *, sigma: float, tau: float) -> tuple[int | None, Tensor]:
    """The adaptive assignment rule: ``(index of the modality to boost or None, ratios [M])``.

    ``scores`` is ``[M]`` on the host; the ratios are :func:`one_vs_rest_ratio`'s
    ``r_m = s_m / mean_{k != m} s_k`` (``x / 0`` is ``inf``, ``0 / 0`` is 1).

    * ``M = 2``: ``r = s_1 / s_2``; ``r > sigma + tau`` -> modality 2 (index 1),
      ``r < sigma - tau`` -> modality 1 (index 0), otherwise none (the dead zone, edges
      included).
    * ``M > 2``: the modality with the smallest ``r_m`` (first in mapping order on a tie) if
      ``r_m < sigma - tau``, otherwise none.

    Example:
        >>> import torch
        >>> assign_head(torch.tensor([0.4, 0.8]), sigma=1.0, tau=0.01)[0]
        0
        >>> assign_head(torch.tensor([0.5, 0.5, 0.5]), sigma=1.0, tau=0.01)[0] is None
        True
    """
    ratios = one_vs_rest_ratio(scores)
    values = scores.tolist()
    if len(values) == 2:
        # the spec's r = s_1 / s_2 exactly; the helper's ratio only where s_2 = 0
        r = values[0] / values[1] if values[1] != 0 else float(ratios[0])
        return (1 if r > sigma + tau else 0 if r < sigma - tau else None), ratios
    best = int(ratios.argmin())  # argmin returns the first index on a tie
    return (best if float(ratios[best]) < sigma - tau else None), ratios


_choose_modality = assign_head  # the former private name


class SustainedBoostingLoss(nn.Module):
    r"""Sustained boosting loss with adaptive classifier assignment; owns the classifier heads.

    $$Z_m = \sum_{j=1}^{n} z_{mj}, \qquad
    \ell_m = \mathrm{CE}(Z_m, y) + \mathrm{CE}\Big(\sum_{j<n} z_{mj}, y\Big)
    + (1 - \lambda p_y)\, \mathrm{CE}(z_{mn}, y), \qquad
    p = \operatorname{sg}\Big[\operatorname{softmax}\Big(\sum_{j<n} z_{mj}\Big)\Big]$$

    At each check, with $s_m = \operatorname{mean}_i \operatorname{softmax}(Z_m)_{i, y_i}$ and
    $r_m = s_m / \operatorname{mean}_{k \ne m} s_k$, the modality $\arg\min_m r_m$ gets one more
    head if $r_m < \sigma - \tau$.

    Put its parameters in the optimiser with your encoders, bind that optimiser, and train::

        boost = SustainedBoostingLoss(num_classes=6, in_features={"audio": 512, "visual": 512},
                                      check_every=total_steps // 10, first_check=steps_per_epoch)
        opt = torch.optim.AdamW([*encoders.parameters(), *boost.parameters()], lr=1e-3)
        boost.attach_optimizer(opt)        # a head switched on later starts with fresh state
        loss = boost({"audio": a, "visual": v}, target)      # training step
        loss.backward(); opt.step(); opt.zero_grad()
        logits = boost.predict({"audio": a, "visual": v})    # inference

    **Checkpoints: its heads are not in your model.** The heads and the shared output layer are
    this module's parameters, so ``model.state_dict()`` leaves them out unless the module is
    registered on the model. Either register it (``model.boost = boost``: then
    ``model.state_dict()``, ``model.to(device)``, ``model.train()`` / ``model.eval()`` and a
    trainer's checkpoint all include it), or save and load it beside the model::

        torch.save({"model": model.state_dict(), "boost": boost.state_dict(),
                    "optimizer": opt.state_dict()}, path)
        state = torch.load(path)
        model.load_state_dict(state["model"]); boost.load_state_dict(state["boost"])

    Build it **once, before the training loop** (a module built per epoch would start over with
    new, untrained heads). It is not switched by ``model.train()`` / ``model.eval()`` unless
    registered on the model: a backward pass through an eval-mode call (the module left in eval
    mode after validation) warns once, since in eval mode no head is ever added.

    **The check schedule must be chosen** (``check_every`` has no default): the module cannot
    know how long an epoch or the training is, and with no check it would silently be plain
    ensemble training. The paper's practice is a check after the first epoch, then every tenth of
    the training: ``check_every=total_steps // 10, first_check=steps_per_epoch``.
    ``check_every="manual"`` opts out: you call :meth:`check` yourself.

    Args:
        num_classes: number of classes ``C``.
        in_features: ordered mapping modality -> feature width ``D_m`` (at least two).
        check_every: number of training steps between automatic checks (a positive int), or
            ``"manual"`` to call :meth:`check` yourself. A due check runs at the start of the next
            training-mode forward, so a new head is in that step's graph. A step is one
            training-mode forward with a non-empty batch (under DDP every training-mode forward
            counts, so that the schedule is the same on every rank). With gradient accumulation
            over ``k`` micro-batches use multiples of ``k``.
        first_check: steps before the first automatic check (default ``check_every``); the paper
            checks after the first epoch, then every ``check_every``.
        hidden: width of each head's first layer (256 in the paper).
        lam: residual weight ``lam`` in ``1 - lam p_b``, in ``[0, 1]`` (official HEAD code 0.5).
        sigma: balance point of the assignment rule, ``> 0`` (1.0).
        tau: half-width of the dead zone around ``sigma``, ``>= 0`` (0.01).
        max_heads: cap on heads per modality (pre-allocated). When the rule picks a modality at
            the cap, no head is added and a warning says so.
        fusion_weights: prediction weights ``alpha_m`` (mapping modality -> weight or a sequence
            in mapping order): finite, ``>= 0``, not all zero; uniform ``1/M`` by default.
        reduction: ``"mean"`` (default; over the counted samples), ``"sum"`` or ``"none"``
            (``[B]``, each sample's ``sum_m l_mb``).
        ignore_index: class index whose samples are left out of the loss and the confidence
            scores (``-100``, as ``F.cross_entropy``); ``None``: none.
        output_layer: your own shared output layer (any module mapping ``[N, hidden]`` to
            ``[N, num_classes]``); default ``nn.Linear(hidden, num_classes)`` drawn from ``seed``.
        seed: seed of the module's own generator (initial heads, default output layer, added
            heads), ``>= 0``. Must be the same on every rank (it is by default).
        process_group: group over which the confidence scores are all-reduced (default: world).

    Raises:
        TypeError: a hyper-parameter of the wrong type (``hidden=4.5``, ``check_every=2.5``,
            ``check_every=None``).
        ValueError: a hyper-parameter out of range or not finite.

    Example:
        >>> import torch
        >>> from imbalance_losses import SustainedBoostingLoss
        >>> _ = torch.manual_seed(0)
        >>> boost = SustainedBoostingLoss(num_classes=3, in_features={"audio": 4, "visual": 6},
        ...                               check_every="manual", hidden=8)
        >>> optimizer = torch.optim.SGD(boost.parameters(), lr=0.1)
        >>> boost.attach_optimizer(optimizer)
        >>> feats = {"audio": torch.randn(6, 4), "visual": torch.randn(6, 6)}
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> loss = boost(feats, target)
        >>> loss.backward(); optimizer.step()
        >>> tuple(boost.predict(feats).shape)
        (6, 3)
        >>> record = boost.check()              # the least confident modality may get another head
        >>> record.num_heads.sum().item() in (2, 3)
        True
    """

    head_counts: Tensor

    def __init__(
        self,
        num_classes: int,
        in_features: Mapping[str, int],
        *,
        check_every: int | Literal["manual"],
        first_check: int | None = None,
        hidden: int = 256,
        lam: float = 0.5,
        sigma: float = 1.0,
        tau: float = 0.01,
        max_heads: int = 8,
        fusion_weights: Mapping[str, float] | Sequence[float] | None = None,
        reduction: Reduction = "mean",
        ignore_index: int | None = -100,
        output_layer: nn.Module | None = None,
        seed: int = 0,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(in_features, Mapping) or len(in_features) < 2:
            raise ValueError(
                "in_features must be a mapping modality -> feature width with at least two "
                f"modalities, got {in_features!r}"
            )
        widths = {
            name: int_param(f"in_features[{name!r}] (the width D of features [B, D])", d, ge=1)
            for name, d in in_features.items()
        }
        self.num_classes = int_param("num_classes", num_classes, ge=2)
        if check_every == "manual":
            self.check_every: int | Literal["manual"] = "manual"
            if first_check is not None:
                raise ValueError(
                    'first_check needs an automatic schedule, not check_every="manual"'
                )
        elif check_every is None or isinstance(check_every, str):
            raise TypeError(
                "check_every must be a positive number of training steps between classifier-"
                'assignment checks, or "manual" if you call check() yourself; got '
                f"{check_every!r}. The paper checks after the first epoch, then every tenth of "
                "the training: check_every=total_steps // 10, first_check=steps_per_epoch"
            )
        else:
            self.check_every = int_param("check_every", check_every, ge=1)
        self.first_check = (
            None if first_check is None else int_param("first_check", first_check, ge=1)
        )
        self.hidden = int_param("hidden", hidden, ge=1)
        self.lam = real_param("lam", lam, ge=0.0, le=1.0)
        self.sigma = real_param("sigma", sigma, gt=0.0)
        self.tau = real_param("tau", tau, ge=0.0)
        self.max_heads = int_param("max_heads", max_heads, ge=1)
        self.reduction = cast(Reduction, reduction_param(reduction))
        self.ignore_index = (
            None if ignore_index is None else int_param("ignore_index", ignore_index)
        )
        self.seed = int_param("seed", seed, ge=0)
        self.modalities: tuple[str, ...] = tuple(widths)
        self.in_features: dict[str, int] = widths
        self.process_group = process_group
        self.fusion_weights = self._fusion_weights(fusion_weights)

        self._generator = torch.Generator().manual_seed(self.seed)
        # Every head's first layer is its own parameter, zero until switched on.
        self.head_weight = nn.ModuleList(
            [
                nn.ParameterList(
                    [nn.Parameter(torch.zeros(self.hidden, d)) for _ in range(self.max_heads)]
                )
                for d in widths.values()
            ]
        )
        self.head_bias = nn.ModuleList(
            [
                nn.ParameterList(
                    [nn.Parameter(torch.zeros(self.hidden)) for _ in range(self.max_heads)]
                )
                for _ in widths
            ]
        )
        if output_layer is None:
            output_layer = nn.Linear(self.hidden, self.num_classes)
            # nn.Linear's own default (uniform +-1/sqrt(hidden)), drawn from our generator.
            bound = 1.0 / math.sqrt(self.hidden)
            with torch.no_grad():
                for p in (output_layer.weight, output_layer.bias):
                    p.copy_(torch.rand(p.shape, generator=self._generator) * 2 * bound - bound)
        self.output_layer = output_layer
        self.register_buffer("head_counts", torch.zeros(len(widths), dtype=torch.long))
        self._counts: list[int] = [0] * len(widths)  # host mirror of head_counts
        self._optimizers: list[weakref.ref[torch.optim.Optimizer]] = []
        self._warned_unbound = False
        self._trained = False  # a training-mode forward ran (optimiser state may exist)
        for i in range(len(widths)):
            self._activate(i, initial=True)

        self._pool = RunningSums()
        self._open: _OpenSteps = WeakIdKeyDictionary()  # feature tensor -> its step's mark
        self._warned_eval = False
        self._since_check = 0  # steps since the last check
        self._checked = False  # whether a check ran yet (first_check applies before it)
        self.last: BoostingRecord | None = None
        self._register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            _split_stacked_heads, with_module=True
        )
        self.register_load_state_dict_post_hook(_refresh_counts)  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ configuration helpers
    def _fusion_weights(
        self, weights: Mapping[str, float] | Sequence[float] | None
    ) -> tuple[float, ...]:
        m = len(self.modalities)
        if weights is None:
            return (1.0 / m,) * m
        if isinstance(weights, Mapping):
            check_same_modalities(
                self.modalities,
                weights,
                expected_what="in_features",
                actual_what="fusion_weights",
            )
            raw = [(f"fusion_weights[{name!r}]", weights[name]) for name in self.modalities]
        else:
            items = list(weights)
            if len(items) != m:
                raise ValueError(
                    f"fusion_weights has {len(items)} values but there are {m} modalities "
                    f"{list(self.modalities)}"
                )
            raw = [(f"fusion_weights[{i}]", w) for i, w in enumerate(items)]
        values = tuple(real_param(name, w, ge=0.0) for name, w in raw)
        if not any(values):
            raise ValueError(f"fusion_weights must not all be zero, got {list(values)}")
        return values

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"hidden={self.hidden}, lam={self.lam}, sigma={self.sigma}, tau={self.tau}, "
            f"check_every={self.check_every!r}, first_check={self.first_check}, "
            f"max_heads={self.max_heads}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}"
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save(module)``) drops the optimiser binding (weak references) and
        the table of open steps (tied to this process's tensors)."""
        state = dict(self.__dict__)
        state["_optimizers"] = []
        state.pop("_open", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._open = WeakIdKeyDictionary()
        self.__dict__.setdefault("_warned_eval", False)

    # ------------------------------------------------------------------ heads and optimisers
    @property
    def num_heads(self) -> dict[str, int]:
        """Active heads per modality, in mapping order."""
        return dict(zip(self.modalities, self._counts, strict=True))

    def _head_params(self, index: int, j: int) -> tuple[nn.Parameter, nn.Parameter]:
        weight = self.head_weight[index]
        bias = self.head_bias[index]
        assert isinstance(weight, nn.ParameterList) and isinstance(bias, nn.ParameterList)
        return weight[j], bias[j]

    def _all_head_params(self) -> Iterator[nn.Parameter]:
        for i in range(len(self.modalities)):
            for j in range(self.max_heads):
                yield from self._head_params(i, j)

    def attach_optimizer(self, *optimizers: torch.optim.Optimizer) -> None:
        """Bind the optimiser(s) holding the heads, so a head switched on starts fresh.

        When :meth:`add_head` or a check switches a head on, its weight's and bias's state is
        dropped from every bound optimiser; Adam / AdamW then start it lazily at step 0 (zero
        moments, bias correction of step 1), exactly as a freshly created parameter, and SGD
        with momentum starts a fresh momentum buffer. Without a binding an inactive head, which
        received exact zero gradients, keeps the state those built: SGD without dampening is
        exact anyway, but Adam's step counter is already ``t``, so the new head's first updates
        are off by ``(1 - beta1) / sqrt(1 - beta2) * sqrt(1 - beta2^t) / (1 - beta1^t)`` (~3x for
        a large ``t``).

        Weak references are kept (the module does not keep an optimiser alive; pickling and
        ``copy.deepcopy`` drop them: bind the copy to its own optimiser). Call again to re-bind
        (e.g. after building a new optimiser); each call replaces the previous binding. Do the
        same on every rank.

        Raises:
            TypeError: an argument is not a ``torch.optim.Optimizer``.
            ValueError: some head parameters are in none of the optimisers (build them with
                ``boost.parameters()``).
        """
        held: set[int] = set()
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    "attach_optimizer takes torch.optim.Optimizer objects, got "
                    f"{type(opt).__name__}"
                )
            held.update(id(p) for group in opt.param_groups for p in group["params"])
        heads = list(self._all_head_params())
        missing = sum(id(p) not in held for p in heads)
        if missing:
            raise ValueError(
                f"{missing} of the {len(heads)} head parameters of SustainedBoostingLoss are in "
                "none of the optimisers given; build the optimiser with boost.parameters() "
                "(every head, active or not, must be in it from the start)"
            )
        self._optimizers = [weakref.ref(opt) for opt in optimizers]

    def _activate(self, index: int, *, initial: bool = False, stacklevel: int = 3) -> None:
        """Turn on the next head of modality ``index``: Xavier-normal weight, zero bias.

        Written in place under ``no_grad`` (the parameter objects stay those the optimiser and
        DDP hold). Then the head's state is dropped from the bound optimisers.
        """
        n = self._counts[index]
        weight, bias = self._head_params(index, n)
        fan_out, fan_in = weight.shape
        std = math.sqrt(2.0 / (fan_in + fan_out))  # Xavier-normal, gain 1
        new = torch.randn(fan_out, fan_in, generator=self._generator) * std
        with torch.no_grad():
            weight.copy_(new)
            bias.zero_()
        self._counts[index] = n + 1
        self.head_counts[index] = n + 1
        if initial:
            return
        bound = [opt for opt in (ref() for ref in self._optimizers) if opt is not None]
        for opt in bound:
            for p in (weight, bias):
                opt.state.pop(p, None)
        if not bound and self._trained and not self._warned_unbound:
            # after a training forward the optimiser may hold state for this (zero) head
            self._warned_unbound = True
            warnings.warn(
                f"SustainedBoostingLoss switched on a head of {self.modalities[index]!r} but no "
                "optimizer is bound: call boost.attach_optimizer(opt) once after building the "
                "optimizer so that a new head starts with fresh optimizer state (under Adam/AdamW "
                "its first updates are otherwise ~3x too large; SGD without dampening is exact "
                "either way). Shown once per module",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def add_head(self, modality: str) -> int:
        """Give ``modality`` one more head now; return its new number of heads.

        Under DDP call it on every rank at the same point (:meth:`check` does so by itself).

        Raises:
            KeyError: unknown modality.
            RuntimeError: the modality already has ``max_heads`` heads.
        """
        if modality not in self.modalities:
            raise KeyError(
                f"unknown modality {modality!r}; the modalities are {list(self.modalities)}"
            )
        index = self.modalities.index(modality)
        if self._counts[index] >= self.max_heads:
            raise RuntimeError(
                f"modality {modality!r} already has max_heads={self.max_heads} heads; raise "
                "max_heads when constructing SustainedBoostingLoss to allow more"
            )
        self._activate(index, stacklevel=4)
        return self._counts[index]

    # ------------------------------------------------------------------ forward pieces
    def _check_features(self, features: Mapping[str, Tensor]) -> int:
        batch = check_modalities(features)
        first, _ = self._head_params(0, 0)
        check_features(
            features,
            widths=self.in_features,
            dtype=first.dtype,
            device=first.device,
            finite=True,
            by="the boosting heads",
        )
        return batch

    def _head_tensors(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """Per modality the logits of its active heads, ``[B, n_m, C]``, in mapping order.

        ``h_m = relu(u_m [W_m1; ...; W_mn]^T + [b_m1; ...; b_mn])`` is one matmul per modality
        (the active first layers concatenated to ``[n * hidden, D_m]``); the shared output layer
        then runs once over every head of every modality.
        """
        hidden_parts = []
        for i, x in enumerate(features.values()):
            n = self._counts[i]
            params = [self._head_params(i, j) for j in range(n)]
            w: Tensor
            b: Tensor
            if n == 1:
                w, b = params[0]
            else:
                w = torch.cat([p[0] for p in params])
                b = torch.cat([p[1] for p in params])
            hidden_parts.append(F.relu(F.linear(x, w, b)).reshape(x.shape[0], n, self.hidden))
        h = torch.cat(hidden_parts, dim=1)  # [B, N, hidden], N = sum_m n_m
        batch, total = h.shape[0], h.shape[1]
        z = self.output_layer(h.reshape(batch * total, self.hidden))
        if z.dim() != 2 or z.shape[1] != self.num_classes:
            raise ValueError(
                f"output_layer must map [N, {self.hidden}] to [N, {self.num_classes}], got "
                f"shape {tuple(z.shape)}"
            )
        return list(z.reshape(batch, total, self.num_classes).split(self._counts, dim=1))

    def _inactive_zero(self) -> Tensor | None:
        """``0`` attached to every inactive head through an empty slice, or ``None`` if none.

        Adding it to the loss puts every inactive head in the graph with an exactly zero
        gradient (so DDP without ``find_unused_parameters`` sees every parameter used) at the
        cost of one zero fill per inactive parameter, no arithmetic on its values.
        """
        empty = [
            p.reshape(-1)[:0]
            for i, n in enumerate(self._counts)
            for j in range(n, self.max_heads)
            for p in self._head_params(i, j)
        ]
        return torch.cat(empty).sum() if empty else None

    def _check_due(self) -> bool:
        if self.check_every == "manual":
            return False
        every = self.check_every
        if not self._checked and self.first_check is not None:
            every = self.first_check
        return self._since_check >= every

    # ------------------------------------------------------------------ public API
    def forward(self, features: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """Training loss from ``l_b = sum_m l_mb`` (see the module docstring), reduced.

        ``reduction="mean"``: ``sum_b l_b / (number of samples whose target is not
        ignore_index)`` (0 when there are none), ``"sum"``: ``sum_b l_b``, ``"none"``: ``[B]``.

        In training mode this also pools the confidence scores ``s_m`` of this batch (computed
        before the update, detached, fp32) and, with an automatic schedule, runs the check first
        when it is due.

        **The same call twice in one step** (a logging call, then the real one, on the very
        same feature tensors, before a backward pass has reached either loss) is one step, as in
        :class:`~imbalance_losses.ARLLoss`: the repeat returns the loss and pools nothing, counts
        no step and runs no check, so no extra head appears. Tensors are recognised by identity,
        and only those that require grad (features of frozen or precomputed encoders are never
        a repeat: each such call is a step). New tensors are a new step: the micro-batches of an
        accumulated step are each a step, as before.

        An **empty batch** (``B = 0``) gives a zero loss that is still part of the graph (every
        parameter gets a zero gradient, so ``backward`` and DDP work) and pools no sample. In a
        single process it is not a step (the schedule does not advance); under DDP every
        training-mode forward is a step on every rank, so the ranks' schedules stay identical,
        and a scheduled check that finds no sample on any rank makes no decision.

        Under DDP, if the input fails validation on one rank in a forward where a check is due
        (the only collective), that rank joins the check's all-reduce with a failure flag and
        raises its error, and every other rank raises a ``RuntimeError`` saying that another
        rank failed, in the same call.

        Args:
            features: ordered mapping modality -> ``[B, D_m]``, the modalities of
                ``in_features`` in the same order, floating point of the heads' dtype (or under
                ``torch.autocast``), on the heads' device.
            target: class indices ``LongTensor[B]`` (values in ``[0, C)`` or ``ignore_index``)
                or soft targets ``[B, C]`` (rows summing to 1).

        Returns:
            A scalar for ``"mean"`` / ``"sum"``, ``[B]`` for ``"none"``.

        Raises:
            ValueError, TypeError: bad features or targets (naming the modality and shapes).
        """
        m = len(self.modalities)
        device = self.head_counts.device
        distributed = is_distributed(self.process_group)
        mark = self._open_step(features) if self.training else None
        repeat = mark is not None  # the same tensors again, before a backward: the same step
        due = self.training and not repeat and self._check_due()
        joins = due and distributed
        try:
            with self._pool.failing_together(
                m, device, self.process_group, extra_size=2 * (m + 1), due=joins
            ):
                batch = self._check_features(features)
                check_target(
                    target,
                    batch=batch,
                    num_classes=self.num_classes,
                    ignore_index=self.ignore_index,
                )
        except Exception:
            if joins:  # every rank dropped this window in the same call
                self._since_check = 0
                self._checked = True
            raise
        if due and (batch > 0 or distributed):  # one process: an empty forward is no step
            self._check(explicit=False, stacklevel=6)
        logits = self._head_tensors(features)
        per = torch.stack(
            [
                boosting_residual_loss(z, target, lam=self.lam, ignore_index=self.ignore_index)
                for z in logits
            ]
        ).sum(0)  # [B]
        mask = counted(target, self.ignore_index)
        loss = reduce_loss(per, self.reduction, mask)
        zero = self._inactive_zero()
        if zero is not None:
            loss = loss + zero.to(loss.dtype)
        if self.training and not repeat and (batch > 0 or distributed):
            scores = confidence_scores(logits, target, ignore_index=self.ignore_index)
            self._pool.add(scores, batch if mask is None else mask.sum(), rows=batch)
            self._since_check += 1
        if self.training:
            self._trained = True
            self._track(features, loss, mark)
        else:
            warn_on_backward(loss, self, _EVAL_BACKWARD)
        return loss

    def _open_step(self, features: object) -> _StepMark | None:
        """The open step these very tensors were passed in, or ``None`` (a new step).

        As in :class:`~imbalance_losses.ARLLoss`, only features that require grad are tracked:
        a repeat is a call whose every such tensor was passed, together, in one earlier
        training-mode call that no backward pass has reached yet (a logging call, then the real
        one). New tensors are a new step (micro-batches of an accumulated step are new tensors);
        so is any call whose features do not require grad (frozen, precomputed).
        """
        if not isinstance(features, Mapping):
            return None
        tracked = [x for x in features.values() if isinstance(x, Tensor) and x.requires_grad]
        if not tracked:
            return None
        first = self._open.get(tracked[0])
        if first is None or first.fired or any(self._open.get(x) is not first for x in tracked):
            return None
        return first

    def _track(self, features: Mapping[str, Tensor], loss: Tensor, mark: _StepMark | None) -> None:
        """Remember this training call's features until a backward reaches its loss."""
        tracked = [x for x in features.values() if x.requires_grad]
        if not tracked or not loss.requires_grad:  # not trackable (see _open_step), or no_grad
            return
        if mark is None:
            mark = _StepMark()
            for x in tracked:
                self._open[x] = mark
        loss.register_hook(mark)  # type: ignore[no-untyped-call]  # either call's backward ends it

    def head_logits(self, features: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
        """Per modality, the logits ``z_mj`` ``[B, C]`` of each of its heads, oldest first."""
        self._check_features(features)
        return {
            name: list(z.unbind(1))
            for name, z in zip(self.modalities, self._head_tensors(features), strict=True)
        }

    def predict(self, features: Mapping[str, Tensor]) -> Tensor:
        """Fused logits ``sum_m alpha_m Z_m`` ``[B, C]`` with ``Z_m = sum_j z_mj``."""
        self._check_features(features)
        logits = self._head_tensors(features)
        return torch.stack(
            [a * z.sum(1) for a, z in zip(self.fusion_weights, logits, strict=True)]
        ).sum(0)

    def check(self) -> BoostingRecord:
        """Adaptive classifier assignment now; call on every rank at the same point.

        Pools ``s_m`` over the training samples since the last check (every rank: one
        all-reduce of the ``M`` sums, the counts and a consistency fingerprint), applies the rule

        * two modalities: ``r = s_1 / s_2``; ``r > sigma + tau`` -> a head for modality 2,
          ``r < sigma - tau`` -> a head for modality 1, otherwise none;
        * ``M > 2``: ``r_m = s_m / mean_{k != m} s_k``; a head for ``argmin_m r_m`` if
          ``r_m < sigma - tau``;

        adds at most one head (a warning instead when that modality is at ``max_heads``),
        resets the pool and the step counter and returns (and stores in :attr:`last`) a
        :class:`BoostingRecord`. Automatic checks (``check_every``) call the same code, except
        that one finding no sample on any rank makes no decision instead of raising.

        The decision is read on the host: one sync per check, not per step.

        Raises:
            RuntimeError: no training sample was pooled since the last check (on any rank), or
                the ranks disagree on the head counts or seed (``add_head`` called on one rank
                only).
        """
        record = self._check(explicit=True, stacklevel=4)
        assert record is not None
        return record

    def _check(self, *, explicit: bool, stacklevel: int) -> BoostingRecord | None:
        """The check; ``stacklevel`` points warnings at the user's line (``_activate`` depth)."""
        m = len(self.modalities)
        device = self.head_counts.device
        self._since_check = 0
        self._checked = True
        fingerprint = torch.tensor(
            [float(self.seed % 65536), *map(float, self._counts)], dtype=torch.float64
        )
        # [fp, fp^2] summed over n ranks: every rank holds the same fp iff n * sum(fp^2) ==
        # sum(fp)^2 (equality in Cauchy-Schwarz); exact in fp64 for these small integers, and
        # every rank decides from the same sums, so all ranks raise or none does
        pooled = self._pool.pool(
            m,
            device,
            self.process_group,
            missing=_NO_SAMPLES,
            extra=torch.cat([fingerprint, fingerprint * fingerprint]).to(device),
        )
        assert pooled.extra is not None
        host = torch.cat(
            [pooled.sums.double(), pooled.samples.reshape(1).double(), pooled.extra.double()]
        ).cpu()  # the one host read of a check
        ranks = world_size(self.process_group) if is_distributed(self.process_group) else 1
        k = fingerprint.shape[0]
        total, squares = host[m + 1 : m + 1 + k], host[m + 1 + k :]
        if not torch.equal(ranks * squares, total * total):
            raise RuntimeError(
                "SustainedBoostingLoss differs across ranks (head counts "
                f"{self.num_heads} or seed {self.seed} on this rank are not those of every "
                "rank); call add_head/check on every rank at the same step and use one seed"
            )
        count = float(host[m])
        if pooled.empty or count == 0:
            if explicit:
                raise RuntimeError(_NO_SAMPLES + " on any rank")
            return None  # a scheduled check over empty steps: no decision, no record
        scores = host[:m] / count
        choice, ratios = assign_head(scores, sigma=self.sigma, tau=self.tau)
        added: str | None = None
        capped: str | None = None
        if choice is not None:
            name = self.modalities[choice]
            if self._counts[choice] >= self.max_heads:
                capped = name
                warnings.warn(
                    f"SustainedBoostingLoss: modality {name!r} is the weakest but already has "
                    f"max_heads={self.max_heads} heads; no head added (raise max_heads to allow "
                    "more)",
                    RuntimeWarning,
                    stacklevel=stacklevel - 1,
                )
            else:
                self._activate(choice, stacklevel=stacklevel)
                added = name
        head_added = torch.zeros(m, dtype=torch.long, device=device)
        if added is not None:
            head_added[self.modalities.index(added)] = 1
        self.last = BoostingRecord(
            modalities=self.modalities,
            scores=scores.to(device, torch.float32),
            ratios=ratios.to(device, torch.float32),
            num_heads=self.head_counts.clone(),
            head_added=head_added,
            samples=pooled.samples.clone(),
            added_to=added,
            capped=capped,
        )
        return self.last

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """Generator, pooled scores, the schedule's position and the last record.

        (Head counts are the ``head_counts`` buffer.)
        """
        return {
            "generator": self._generator.get_state(),
            "pool": self._pool.state_dict(),
            "since_check": self._since_check,
            "checked": self._checked,
            "trained": self._trained,
            "last": None if self.last is None else dataclasses.asdict(self.last),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        self._generator.set_state(state["generator"])
        self._pool.load_state_dict(state["pool"])
        self._since_check = int(state["since_check"])
        # older checkpoints: no first_check existed, so the first check counts as done
        self._checked = bool(state.get("checked", True))
        self._trained = bool(state.get("trained", True))
        last = state.get("last")
        self.last = (
            None
            if last is None
            else BoostingRecord(**{**last, "modalities": tuple(last["modalities"])})
        )


def _split_stacked_heads(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Load checkpoints of the stacked layout (``head_weight.i`` ``[max_heads, hidden, D]``).

    Versions up to 0.1 kept each modality's heads in one stacked parameter; split it into the
    per-head parameters ``head_weight.i.j`` / ``head_bias.i.j``.
    """
    for name, ndim in (("head_weight", 3), ("head_bias", 2)):
        for i in range(len(getattr(module, "modalities", ()))):
            key = f"{prefix}{name}.{i}"
            value = state_dict.get(key)
            if isinstance(value, Tensor) and value.dim() == ndim:
                del state_dict[key]
                for j, row in enumerate(value.unbind(0)):
                    state_dict[f"{key}.{j}"] = row


def _refresh_counts(module: nn.Module, incompatible_keys: Any) -> None:
    """Refresh the host mirror of ``head_counts`` after ``load_state_dict`` (once per load)."""
    assert isinstance(module, SustainedBoostingLoss)
    counts = [int(c) for c in module.head_counts.tolist()]
    if any(c < 1 or c > module.max_heads for c in counts):
        named = dict(zip(module.modalities, counts, strict=True))
        raise ValueError(
            f"loaded head counts {named} must lie in [1, max_heads={module.max_heads}]"
        )
    module._counts = counts
