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

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.distributed import ProcessGroup, is_distributed
from ..core.evaluation import check_same_on_ranks
from ..core.heads import GrowingHeads, head_widths
from ..core.hooks import warn_on_backward
from ..core.records import StepRecord
from ..core.remedy import Remedy
from ..core.stats import (
    Reduction,
    at_least_fp32,
    count_of,
    counted,
    one_vs_rest_ratio,
    reduce_loss,
    true_class_probability,
    true_class_scores,
)
from ..core.validation import (
    check_target,
    int_param,
    modality_weights,
    optional_int_param,
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

_NO_SAMPLES = (
    "check() needs at least one training-mode forward with samples since the last check; none "
    "was pooled (no training-mode forward, only empty batches, or every target equal to "
    "ignore_index)"
)


_NO_STEP = (
    "SustainedBoostingLoss has no step() (it acts in its forward and check()); to bind the "
    "optimizer, so that a head switched on starts with fresh state, call "
    "boost.attach_optimizer(opt)"
)

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
    dtype = at_least_fp32(logits_heads.dtype)
    tgt = target.to(dtype) if soft else target

    def ce(logits: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(logits, t, reduction="none", ignore_index=ignore)

    if logits_heads.shape[1] == 1:  # eps_all = CE(z_m1, y): the one head's logits, a view
        return ce(logits_heads.squeeze(1), tgt)
    per = ce(logits_heads.sum(1), tgt)  # eps_all
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
    return true_class_scores([_ensemble(z) for z in logits_heads], target, ignore_index)


def _ensemble(logits_heads: Tensor) -> Tensor:
    """``Z = sum_j z_j`` ``[B, C]`` of ``[B, n, C]`` (a view of the one head's logits for n = 1)."""
    return logits_heads.squeeze(1) if logits_heads.shape[1] == 1 else logits_heads.sum(1)


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


class SustainedBoostingLoss(Remedy[BoostingRecord], GrowingHeads):
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

    **Steps.** A step is one training-mode forward (gradients enabled) with a non-empty batch:
    it pools the batch's confidence scores ``s_m`` (computed before the update, detached, fp32)
    and, with an automatic schedule, first runs the check when it is due. A training-mode call
    under ``torch.no_grad`` warns and acts as evaluation (nothing pooled, nothing counted).

    * **The same call twice in one step** (a logging call, then the real one, on the very same
      feature tensors before a backward pass has reached them) is one step, as in
      :class:`~imbalance_losses.ARLLoss`: the repeat returns the loss and pools nothing, counts
      no step and runs no check, so no extra head appears. Tensors are recognised by identity,
      and only those that require grad (features of frozen or precomputed encoders are never a
      repeat: each such call is a step). New tensors are a new step: the micro-batches of an
      accumulated step are each a step. A call mixing tensors of the open step with new ones
      raises ``ValueError``.
    * An **empty batch** (``B = 0``) gives a zero loss that is still part of the graph (every
      parameter gets a zero gradient, so ``backward`` and DDP work) and pools no sample. In a
      single process it is not a step (the schedule does not advance); under DDP every
      training-mode forward is a step on every rank, so the ranks' schedules stay identical, and
      a scheduled check that finds no sample on any rank makes no decision.
    * Under DDP, if the input fails validation on one rank in a forward where a check is due
      (the only collective), that rank joins the check's all-reduce with a failure flag and
      raises its error, and every other rank raises a ``RuntimeError`` saying that another rank
      failed, in the same call.

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

    record_type = BoostingRecord
    no_step = _NO_STEP
    who = "SustainedBoostingLoss"
    repeat_effect = "the loss only, nothing pooled or counted"

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
        super().__init__(process_group=process_group)
        widths = head_widths(in_features)
        num_classes = int_param("num_classes", num_classes, ge=2)
        self.check_every, self.first_check = _schedule(check_every, first_check)
        hidden = int_param("hidden", hidden, ge=1)
        self.lam = real_param("lam", lam, ge=0.0, le=1.0)
        self.sigma = real_param("sigma", sigma, gt=0.0)
        self.tau = real_param("tau", tau, ge=0.0)
        max_heads = int_param("max_heads", max_heads, ge=1)
        self.reduction = cast(Reduction, reduction_param(reduction))
        self.ignore_index = optional_int_param("ignore_index", ignore_index)
        self.seed = int_param("seed", seed, ge=0)
        self.fusion_weights = modality_weights(
            "fusion_weights", fusion_weights, tuple(widths), expected_what="in_features"
        )
        self._build_heads(
            widths, hidden, num_classes, max_heads, output_layer=output_layer, seed=self.seed
        )
        self._since_check = 0  # steps since the last check
        self._checked = False  # whether a check ran yet (first_check applies before it)

    def extra_repr(self) -> str:
        names = ["in_features", "num_classes", "hidden", "lam", "sigma", "tau", "check_every"]
        names += ["first_check", "max_heads", "reduction", "ignore_index"]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names)

    @property
    def steps(self) -> int:
        """Training steps counted since the last check (the schedule's position)."""
        return self._since_check

    def _loss(self, logits: list[Tensor], target: Tensor, count: Tensor | int) -> Tensor:
        """``l_b = sum_m l_mb`` reduced, plus ``0`` attached to every inactive head.

        The zero reaches each inactive head through an empty slice, so it is in the graph with
        an exactly zero gradient (DDP without ``find_unused_parameters`` sees every parameter
        used) at the cost of one zero fill per inactive parameter.
        """
        losses = [
            boosting_residual_loss(z, target, lam=self.lam, ignore_index=self.ignore_index)
            for z in logits
        ]
        per = losses[0]
        for more in losses[1:]:  # l_b = sum_m l_mb, one add per modality
            per = per + more
        loss = reduce_loss(per, self.reduction, count=count)
        zero = self._inactive_zero()
        return loss if zero is None else loss + zero.to(loss.dtype)

    def _check_due(self) -> bool:
        if self.check_every == "manual":
            return False
        due_at = self.check_every if self._checked or self.first_check is None else self.first_check
        return self._since_check >= due_at

    # ------------------------------------------------------------------ public API
    def forward(self, features: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """Training loss from ``l_b = sum_m l_mb`` (see the module docstring), reduced.

        ``"mean"``: ``sum_b l_b / (number of samples whose target is not ignore_index)`` (0 when
        there are none), ``"sum"``: ``sum_b l_b``, ``"none"``: ``[B]``. ``features``: ordered
        ``{modality: [B, D_m]}`` as ``in_features``; ``target``: class indices ``[B]`` or soft
        targets ``[B, C]``. A training step also pools ``s_m`` and may run a due check first;
        repeats, empty batches, DDP and the errors raised: the class doc (**Steps**).
        """
        training = self._training_call()
        repeat, mixed = self._classify(features) if training else (False, None)
        distributed = is_distributed(self.process_group)
        due = training and not repeat and self._check_due()
        batch = self._validated(features, target, mixed, pools=due and distributed)
        step = training and not repeat and (batch > 0 or distributed)  # 1 process: B = 0 no step
        if due and step:
            self._check(explicit=False, stacklevel=6)
        logits = self._head_tensors(features)
        mask = counted(target, ii := self.ignore_index)
        loss = self._loss(logits, target, count := count_of(mask, batch))
        if step:  # confidence_scores, with the loss's mask and count
            scores = true_class_scores([_ensemble(z) for z in logits], target, ii, mask)
            self._add(scores, count, rows=batch)
            self._since_check += 1
        if training:
            self._trained = True
            if not repeat:
                self._remember(features.values())
        else:
            warn_on_backward(loss, self, _EVAL_BACKWARD)
        return loss

    def _validated(
        self, features: Mapping[str, Tensor], target: Tensor, mixed: Exception | None, pools: bool
    ) -> int:
        """One call's input checks (failing together when ``pools``); the batch size."""
        try:
            with self._validating(len(self.modalities), self.head_counts.device, pools=pools):
                if mixed is not None:
                    raise mixed
                batch = self._check_features(features)
                check_target(
                    target,
                    batch=batch,
                    num_classes=self.num_classes,
                    ignore_index=self.ignore_index,
                )
        except Exception:
            if pools:  # every rank dropped this window in the same call
                self._since_check, self._checked = 0, True
            raise
        return batch

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
        all-reduce of the ``M`` sums and the counts, then one that compares the head counts and
        seed across ranks), applies the rule

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
        m, device = len(self.modalities), self.head_counts.device
        self._since_check, self._checked = 0, True
        pooled = self._pool.pool(m, device, self.process_group, missing=_NO_SAMPLES)
        message = (
            f"SustainedBoostingLoss differs across ranks (head counts {self.num_heads}, seed "
            f"{self.seed} on this rank); call add_head/check on every rank alike, one seed"
        )
        mine = [float(self.seed), *map(float, self._counts)]
        same = torch.tensor(mine, dtype=pooled.samples.dtype, device=device)  # fp64 (MPS: fp32)
        check_same_on_ranks(same, self.process_group, message=message, error=RuntimeError)
        host = torch.cat([pooled.sums.to(same.dtype), pooled.samples.reshape(1)]).cpu().double()
        count = float(host[m])  # the one host read of a check (with the comparison's)
        if pooled.empty or count == 0:
            if explicit:
                raise RuntimeError(_NO_SAMPLES + " on any rank")
            return None  # a scheduled check over empty steps: no decision, no record
        scores = host[:m] / count
        choice, ratios = assign_head(scores, sigma=self.sigma, tau=self.tau)
        added = capped = None
        if choice is not None and self._counts[choice] >= self.max_heads:
            capped = self.modalities[choice]
            warnings.warn(
                f"SustainedBoostingLoss: modality {capped!r} is the weakest but already has "
                f"max_heads={self.max_heads} heads; no head added (raise max_heads to allow "
                "more)",
                RuntimeWarning,
                stacklevel=stacklevel - 1,
            )
        elif choice is not None:
            self._activate(choice, stacklevel=stacklevel)
            added = self.modalities[choice]
        index = -1 if added is None or choice is None else choice
        head_added = torch.eq(torch.arange(m, device=device), index).long()
        self.last = BoostingRecord(
            self.modalities, scores.to(device, torch.float32), ratios.to(device, torch.float32),
            self.head_counts.clone(), head_added, pooled.samples.clone(), added, capped,
        )  # fmt: skip
        return self.last

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """Generator, pooled scores, the schedule's position and the last record (0.1.0 keys).

        (Head counts are the ``head_counts`` buffer.)
        """
        common = super().get_extra_state()
        return {
            "generator": self._generator.get_state(),
            "pool": common["pending"],
            "since_check": self._since_check,
            "checked": self._checked,
            "trained": self._trained,
            "last": common["last"],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        self._generator.set_state(state["generator"])
        self._since_check = int(state["since_check"])
        # older checkpoints: no first_check existed, so the first check counts as done
        self._checked = bool(state.get("checked", True))
        self._trained = bool(state.get("trained", True))
        common = {"pending": state["pool"], "last": state.get("last")}
        super().set_extra_state({"steps": 0, "modalities": None, **common})


def _schedule(
    check_every: int | Literal["manual"], first_check: int | None
) -> tuple[int | Literal["manual"], int | None]:
    """Validated ``(check_every, first_check)``."""
    if check_every == "manual":
        if first_check is not None:
            raise ValueError('first_check needs an automatic schedule, not check_every="manual"')
        return "manual", None
    if check_every is None or isinstance(check_every, str):
        raise TypeError(
            "check_every must be a positive number of training steps between classifier-"
            'assignment checks, or "manual" if you call check() yourself; got '
            f"{check_every!r}. The paper checks after the first epoch, then every tenth of "
            "the training: check_every=total_steps // 10, first_check=steps_per_epoch"
        )
    every = int_param("check_every", check_every, ge=1)
    return every, None if first_check is None else int_param("first_check", first_check, ge=1)
