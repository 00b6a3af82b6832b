"""ReconBoost (Hua, Xu, Li, Jiang, Wang, Huang; ICML 2024): modality reconcilement by boosting.

One *learner* per modality, ``g_m = h_m(phi_m(x_m))`` (``h_m`` one head shared by every modality
in the official setting), and an ensemble ``F = beta sum_m g_m`` with a learnable scalar
``beta``. Training runs in *stages*; stage ``s`` trains modality ``m = s mod M``:

1. **boosting** (``boost_epochs`` epochs, a new optimiser over ``phi_m`` and ``h_m``): with the
   other learners' ensemble ``F_{-m} = beta sum_{k != m} g_k`` (no gradient),
   ``q = softmax(F_{-m})`` and ``p = softmax(g_m)``, the per-sample loss is::

       l = (1 / C) sum_c t_c (w1 - w2 q_c) (-log p_c)   =  (w1 - w2 q_y) / C * CE(g_m, y)

   (one-hot ``t``): the samples the other modalities already classify weigh less. From stage 1
   on, ``alpha MSE(softmax(g_m), softmax(g_k))`` (mean over ``k != m``) is added: detached on both
   sides in the official code (a no-op for the gradients), or with a gradient into ``g_m``;
2. ``m``'s learner replaces its previous version in the ensemble (it joins it the first time);
3. **global rectification** (``rectify_epochs`` epochs, a new optimiser over every learner of the
   ensemble and ``beta``): ``CE(F, y)`` end to end.

Official code: ``huacong/ReconBoost`` @ ``14ab57a``, ``train.py``. See ``docs/reconboost.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.distributed import ProcessGroup, is_distributed
from ..core.gradients import average_over_ranks_
from ..core.params import check_head_not_listed, modality_parameters
from ..core.records import StepRecord
from ..core.stats import true_class_probability
from ..core.unimodal import MappingHead, _check_dtype_device
from ..core.validation import (
    check_modalities,
    check_same_modalities,
    check_target,
    check_unimodal_logits,
    int_param,
    real_param,
)

__all__ = [
    "ReconBoost",
    "ReconBoostRecord",
    "consolidation_loss",
    "ensemble_logits",
    "reconboost_loss",
    "reconboost_weights",
]

Phase = Literal["boost", "rectify"]
Consolidation = Literal["official", "gradient", "off"]
OptimizerFactory = Callable[[list[Tensor], Phase, int], torch.optim.Optimizer]
"""``factory(params, phase, stage) -> optimizer``: the new optimiser of each stage phase."""
LearnerHead = Mapping[str, nn.Module] | nn.ModuleDict | MappingHead
"""What :class:`ReconBoost` serves: a head per modality (one module under every key: shared), or
a :class:`~imbalance_losses.MappingHead` over a module."""


def _fp32(z: Tensor) -> Tensor:
    """``z`` in fp32 when it is fp16 / bf16 (fp32 and fp64 unchanged)."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def reconboost_weights(q_y: Tensor, w1: float, w2: float, num_classes: int) -> Tensor:
    r"""Per-sample weights of the boosting cross-entropy, ``(w1 - w2 q_y) / C``.

    $$\omega_i = \frac{w_1 - w_2\, q_{i, y_i}}{C}$$

    ``q_y``: the probability the other modalities' ensemble gives the true class (fp32 result).

    Example:
        >>> import torch
        >>> from imbalance_losses import reconboost_weights
        >>> reconboost_weights(torch.tensor([0.0, 0.5, 1.0]), w1=5.0, w2=1.0, num_classes=2)
        tensor([2.5000, 2.2500, 2.0000])
    """
    c = int_param("num_classes", num_classes, ge=1)
    return (real_param("w1", w1) - real_param("w2", w2) * _fp32(q_y)) / c


def ensemble_logits(
    logits: Mapping[str, Tensor], beta: Tensor | float, members: Collection[str] | None = None
) -> Tensor:
    r"""The ensemble's logits ``F = beta sum_{k in members} g_k`` (default: every modality).

    $$F = \beta \sum_{k \in S} g_k$$

    At least fp32 (bf16 / fp16 logits are promoted); zeros when ``members`` is empty (no learner
    yet: a uniform ``softmax``). Gradients flow to the logits and to a tensor ``beta``.

    Example:
        >>> import torch
        >>> from imbalance_losses import ensemble_logits
        >>> g = {"a": torch.tensor([[1.0, 0.0]]), "v": torch.tensor([[0.0, 2.0]])}
        >>> ensemble_logits(g, 0.5), ensemble_logits(g, 0.5, members=["v"])
        (tensor([[0.5000, 1.0000]]), tensor([[0., 1.]]))
    """
    names = list(logits) if members is None else [m for m in logits if m in members]
    unknown = [m for m in (members or ()) if m not in logits]
    if unknown:
        raise ValueError(f"members {unknown} are not modalities of the logits {list(logits)}")
    if not names:
        return _fp32(torch.zeros_like(next(iter(logits.values())).detach()))
    total = _fp32(logits[names[0]])
    for name in names[1:]:
        total = total + _fp32(logits[name])
    return beta * total


def reconboost_loss(
    logits: Tensor, others: Tensor, target: Tensor, *, w1: float = 5.0, w2: float = 1.0
) -> Tensor:
    r"""ReconBoost's per-sample boosting loss ``[B]`` (fp32) of the learner being trained.

    $$\ell_i = \frac{1}{C} \sum_c t_{ic} \left(w_1 - w_2\, q_{ic}\right) \left(-\log p_{ic}\right),
    \qquad q = \operatorname{softmax}(F_{-m}),\ p = \operatorname{softmax}(g_m)$$

    For class indices (``t`` one-hot) it is ``(w1 - w2 q_y) / C * CE(g_m, y)``. ``others`` is
    ``F_{-m}`` (detached here: no gradient reaches it); soft targets ``[B, C]`` are accepted.

    Example:
        >>> import torch
        >>> from imbalance_losses import reconboost_loss
        >>> g, rest = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])   # p = q = 1/2
        >>> reconboost_loss(g, rest, torch.tensor([0]), w1=5.0, w2=1.0)      # 2.25 * log 2
        tensor([1.5596])
    """
    num_classes = logits.shape[-1]
    q = torch.softmax(_fp32(others.detach()), -1)
    log_p = torch.log_softmax(_fp32(logits), -1)
    if target.is_floating_point():
        t = _fp32(target)
        return -(t * reconboost_weights(q, w1, w2, num_classes) * log_p).sum(-1)
    y = target.long()[:, None]
    q_y, log_p_y = q.gather(-1, y)[:, 0], log_p.gather(-1, y)[:, 0]
    return -reconboost_weights(q_y, w1, w2, num_classes) * log_p_y


def consolidation_loss(own: Tensor, others: Sequence[Tensor]) -> Tensor:
    r"""The "memory consolidation" term: ``mean_k MSE(softmax(g_m), softmax(g_k))`` (fp32).

    $$\frac{1}{|K|} \sum_{k \in K} \frac{1}{BC} \big\lVert \operatorname{softmax}(g_m) -
    \operatorname{softmax}(g_k) \big\rVert^2$$

    The others are detached; ``own`` keeps its gradient (detach it for the official no-op).

    Example:
        >>> import torch
        >>> from imbalance_losses import consolidation_loss
        >>> big = 1e4 * torch.tensor([[1.0, 0.0]])
        >>> consolidation_loss(big, [-big])               # one-hot p against the other one-hot
        tensor(1.)
    """
    if not others:
        raise ValueError("consolidation_loss needs at least one other learner's logits")
    p = torch.softmax(_fp32(own), -1)
    terms = [F.mse_loss(p, torch.softmax(_fp32(z.detach()), -1)) for z in others]
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class ReconBoostRecord(StepRecord):
    """What :class:`ReconBoost` computed on its last loss call (``last``).

    Example:
        >>> import torch
        >>> from imbalance_losses import ReconBoostRecord
        >>> rec = ReconBoostRecord(("a", "v"), 3, 1, True, torch.tensor(0.5), torch.tensor(0.75),
        ...                        None, torch.tensor(1.0))
        >>> rec.to_dict()
        {'stage': 3.0, 'trained': 1.0, 'boosting': 1.0, 'loss': 0.5, 'agreement': 0.75, 'beta': 1.0}
    """

    stage: int
    trained: int
    """Index (mapping order) of the stage's modality, ``stage % M``."""
    boosting: bool
    """The boosting phase (else the rectification)."""
    loss: Tensor
    """The phase's loss on this rank's batch: mean boosting loss, or ``CE(F, y)`` (fp32)."""
    agreement: Tensor | None
    """Boosting: mean ``q_y``, how sure the other modalities' ensemble already is of the truth."""
    consolidation: Tensor | None
    """Boosting from stage 1: the consolidation term (before ``alpha``); ``None`` when off."""
    beta: Tensor


class ReconBoost(nn.Module):
    r"""ReconBoost: stage-wise alternating boosting of one modality, then global rectification.

    $$\ell^{\text{boost}}_m = \frac{1}{B}\sum_i \frac{w_1 - w_2\, q_{i,y_i}}{C}\,
    \mathrm{CE}(g_{m,i}, y_i) + \alpha\, \mathrm{GA},\quad q = \operatorname{softmax}\Big(\beta
    \sum_{k \ne m} g_k\Big);\qquad \ell^{\text{rect}} = \mathrm{CE}\Big(\beta \sum_k g_k, y\Big)$$

    It owns ``beta`` and the schedule (:attr:`stage`, :attr:`phase`, epochs done) and builds a new
    optimiser (:attr:`optimizer`) for every stage phase: use it in place of your own, call
    :meth:`epoch_end` after every epoch. Usage::

        rb = ReconBoost(model.encoders, {m: model.head for m in model.encoders})
        loss = rb(feats, y)         # the phase's loss; rb.optimizer.zero_grad/step around backward
        logits = rb.predict(feats)  # evaluation: F

    Args:
        encoders: ``{modality: module or parameters}`` in the features' order (``M >= 2``).
        head: a module per modality (the same module under every key: the official shared head)
            or a :class:`~imbalance_losses.MappingHead` over a module; any other head is refused.
        w1: the boosting loss's weight of every sample (official CREMA-D 5).
        w2: its reduction by the others' confidence ``q_y`` (official 1).
        alpha: weight of the consolidation term (official 0.5).
        consolidation: ``"official"`` (both sides detached: parameters identical to ``"off"``),
            ``"gradient"`` (into ``g_m``; our proposal) or ``"off"``.
        boost_epochs: epochs of each boosting phase (official 4).
        rectify_epochs: epochs of each rectification phase (official 4; 0: none).
        beta: the initial ``beta`` (official 1.0).
        warm_start: every learner is in the ensemble from the start (official with pretrained
            encoders); ``False``: a modality joins after its first boosting phase.
        optimizer_factory: ``(params, phase, stage) -> optimizer``; default the official
            ``SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)``.
        process_group: the ranks over which ``beta``'s gradient is averaged (default: the world).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import ReconBoost
        >>> _ = torch.manual_seed(0)
        >>> enc = nn.ModuleDict({"a": nn.Linear(3, 4), "v": nn.Linear(5, 4)})
        >>> head = nn.Linear(4, 2)
        >>> rb = ReconBoost(enc, {"a": head, "v": head}, boost_epochs=1, rectify_epochs=1)
        >>> x, y = {"a": torch.randn(6, 3), "v": torch.randn(6, 5)}, torch.tensor([0, 1] * 3)
        >>> for epoch in range(4):
        ...     feats = {m: e(x[m]) for m, e in enc.items()}
        ...     loss = rb(feats, y)
        ...     rb.optimizer.zero_grad(); loss.backward(); rb.optimizer.step()
        ...     rb.epoch_end()
        >>> rb.stage, rb.phase, rb.modality, tuple(rb.predict(feats).shape)
        (2, 'boost', 'a', (6, 2))
    """

    head: dict[str, nn.Module] | MappingHead  # the model's: not a submodule here
    _encoder_params: list[list[Tensor]]  # per modality, the model's parameters
    _head_lists: dict[str, list[Tensor]]  # per modality, its head's parameters

    def __init__(
        self,
        encoders: Mapping[str, Any] | nn.ModuleDict,
        head: LearnerHead,
        *,
        w1: float = 5.0,
        w2: float = 1.0,
        alpha: float = 0.5,
        consolidation: Consolidation = "official",
        boost_epochs: int = 4,
        rectify_epochs: int = 4,
        beta: float = 1.0,
        warm_start: bool = True,
        optimizer_factory: OptimizerFactory | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.w1, self.w2 = real_param("w1", w1, ge=0.0), real_param("w2", w2, ge=0.0)
        self.alpha = real_param("alpha", alpha, ge=0.0)
        if consolidation not in ("official", "gradient", "off"):
            raise ValueError(f"consolidation must be official, gradient or off: {consolidation!r}")
        self.consolidation: Consolidation = consolidation
        self.boost_epochs = int_param("boost_epochs", boost_epochs, ge=1)
        self.rectify_epochs = int_param("rectify_epochs", rectify_epochs, ge=0)
        self.beta = nn.Parameter(torch.tensor(real_param("beta", beta)))
        self.warm_start, self.process_group = bool(warm_start), process_group
        self._factory = optimizer_factory or _official_sgd
        params = modality_parameters(encoders, what="encoders")
        self.modalities: tuple[str, ...] = tuple(dict(encoders.items()))
        self.__dict__["head"] = _check_head(head, self.modalities)
        modules = head.fn if isinstance(head, MappingHead) else head
        check_head_not_listed(params, modules, self.modalities, who="ReconBoost", action="hold")
        self.__dict__["_encoder_params"] = [[p for i, _, p in params if i == m] for m in
                                            range(len(self.modalities))]  # fmt: skip
        # the heads' parameters now, as the encoders': an FSDP2 module's forward swaps in
        # gathered copies until its backward, so the optimiser built after it must not read them
        self.__dict__["_head_lists"] = {
            m: list((head if isinstance(head, MappingHead) else head[m]).parameters())
            for m in self.modalities
        }
        self._stage, self._phase, self._epochs = 0, "boost", 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self.last: ReconBoostRecord | None = None

    @property
    def stage(self) -> int:
        """The stage ``s`` (0-based); it trains modality ``s mod M``."""
        return self._stage

    @property
    def phase(self) -> Phase:
        """``"boost"`` or ``"rectify"``."""
        return "boost" if self._phase == "boost" else "rectify"

    @property
    def modality(self) -> str:
        """The stage's modality, ``modalities[stage % M]``."""
        return self.modalities[self._stage % len(self.modalities)]

    @property
    def members(self) -> tuple[str, ...]:
        """The modalities whose learner is in the ensemble (all of them, ``M``, once joined)."""
        joined = self._stage + (self._phase == "rectify")
        return self.modalities if self.warm_start else self.modalities[:joined]

    def trains(self, modality: str) -> bool:
        """Whether ``modality``'s encoder gets a gradient in the current phase."""
        return modality == self.modality if self._phase == "boost" else modality in self.members

    def _head_params(self, name: str) -> list[Tensor]:
        return self._head_lists[name]

    def parameters_for(self) -> list[Tensor]:
        """The parameters the current phase trains (its optimiser's), each once: boosting
        ``phi_m`` and ``h_m``; rectification every member's encoder and head, and ``beta``."""
        names = [n for n in self.modalities if self.trains(n)]
        params = [p for n in names for p in self._encoder_params[self.modalities.index(n)]]
        params += [p for n in names for p in self._head_params(n)]
        params += [self.beta] if self._phase == "rectify" else []
        return list({id(p): p for p in params}.values())

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The current phase's optimiser, built by ``optimizer_factory`` on first use."""
        if self._optimizer is None:
            opt = self._factory(self.parameters_for(), self.phase, self._stage)
            opt.register_step_pre_hook(self._before_step)
            if self._pending is not None:
                opt.load_state_dict(self._pending)
            self._optimizer, self._pending = opt, None
        return self._optimizer

    def _before_step(self, *_: Any) -> None:
        """Under DDP (``beta`` is not in the wrapped model): ``beta.grad`` averaged over ranks."""
        if self._phase == "rectify" and is_distributed(self.process_group):
            grad = self.beta.grad if self.beta.grad is not None else torch.zeros_like(self.beta)
            average_over_ranks_([grad], self.process_group)
            self.beta.grad = grad

    def epoch_end(self) -> None:
        """Count one epoch; at a phase's end move to the next phase (or stage). A new phase
        starts without gradients and builds a new optimiser."""
        self._epochs += 1
        if self._epochs < (self.boost_epochs if self._phase == "boost" else self.rectify_epochs):
            return
        if self._phase == "boost" and self.rectify_epochs > 0:
            self._phase = "rectify"
        else:
            self._phase, self._stage = "boost", self._stage + 1
        self._epochs, self._optimizer = 0, None
        for params in [*self._encoder_params, *map(self._head_params, self.modalities)]:
            for p in params:
                p.grad = None
        self.beta.grad = None

    def learners(
        self, features: Mapping[str, Tensor], *, all_grad: bool = False
    ) -> dict[str, Tensor]:
        """``{m: g_m}``: the head on each modality alone; the learners the phase does not train are
        run under ``torch.no_grad()`` (unless ``all_grad``). The loss methods check them."""
        check_modalities(features)
        check_same_modalities(self.modalities, features, expected_what="encoders",
                              actual_what="features")  # fmt: skip
        out = {}
        for name in self.modalities:
            with torch.set_grad_enabled(
                torch.is_grad_enabled() and (all_grad or self.trains(name))
            ):
                out[name] = self._score(name, features)
        return out

    def _score(self, name: str, features: Mapping[str, Tensor]) -> Tensor:
        head = self.head
        if isinstance(head, MappingHead):
            _check_dtype_device(features, head, by="the MappingHead")
            return head.subset(features, (name,))
        _check_dtype_device({name: features[name]}, head[name], by=f"head[{name!r}]")
        return head[name](features[name])  # type: ignore[no-any-return]

    def forward(self, features: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """The current phase's loss from the encoders' features (:meth:`learners`, then
        :meth:`loss`)."""
        return self.loss(self.learners(features), target)

    def loss(self, logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """The current phase's loss from the learners' logits ``{m: g_m}``."""
        if self._phase == "boost":
            return self.boosting_loss(logits, target)
        return self.rectification_loss(logits, target)

    def boosting_loss(self, logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """Mean boosting loss of the stage's learner, plus ``alpha`` times the consolidation term
        from stage 1 (``F_{-m}`` and the other learners carry no gradient)."""
        batch = self._check(logits, target)  # B = 0 (an empty DDP shard): 0, never 0 / 0
        name = self.modality
        own, others = logits[name], [z.detach() for k, z in logits.items() if k != name]
        with torch.no_grad():
            rest = ensemble_logits(logits, self.beta, [k for k in self.members if k != name])
        per = reconboost_loss(own, rest, target, w1=self.w1, w2=self.w2)
        loss = per.mean() if batch else per.sum()
        ga = None
        if self.consolidation != "off" and self._stage >= 1:
            ga = consolidation_loss(own if self.consolidation == "gradient" else own.detach(),
                                    others) if batch else per.sum()  # fmt: skip
        q_y = true_class_probability(rest, target)
        agreement = q_y.mean() if batch else q_y.sum()
        self._record(loss, agreement, ga)
        return loss if ga is None else loss + self.alpha * ga

    def rectification_loss(self, logits: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """``CE(F, y)``, ``F = beta sum_{k in members} g_k``, end to end (gradient to ``beta``)."""
        batch = self._check(logits, target)
        fused = ensemble_logits(logits, self.beta, self.members)
        y = _fp32(target) if target.is_floating_point() else target
        loss = F.cross_entropy(fused, y) if batch else fused.sum() * 0.0
        self._record(loss, None, None)
        return loss

    def predict(self, features: Mapping[str, Tensor]) -> Tensor:
        """The ensemble's logits ``F = beta sum_{k in members} g_k`` (fp32 at least)."""
        logits = self.learners(features, all_grad=True)
        check_unimodal_logits(logits, what="the learners' logits")
        return ensemble_logits(logits, self.beta, self.members)

    def _check(self, logits: Mapping[str, Tensor], target: Tensor) -> int:
        batch, classes = check_unimodal_logits(logits, what="logits")
        check_same_modalities(self.modalities, logits, expected_what="encoders",
                              actual_what="logits")  # fmt: skip
        first = next(iter(logits.values()))
        check_target(target, batch=batch, num_classes=classes, device=first.device)
        return batch

    def _record(self, loss: Tensor, agreement: Tensor | None, ga: Tensor | None) -> None:
        trained = self._stage % len(self.modalities)
        beta = self.beta.detach().clone()
        self.last = ReconBoostRecord(self.modalities, self._stage, trained, self._phase == "boost",
                                     loss.detach(), agreement, None if ga is None else ga.detach(),
                                     beta)  # fmt: skip

    def get_extra_state(self) -> dict[str, Any]:
        """The schedule, the current optimiser's state and the last record (``beta``: a
        parameter)."""
        opt = self._optimizer.state_dict() if self._optimizer is not None else self._pending
        last = None if self.last is None else dataclasses.asdict(self.last)
        return {"modalities": self.modalities, "stage": self._stage, "phase": self._phase,
                "epochs": self._epochs, "optimizer": opt, "last": last}  # fmt: skip

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        names = dict.fromkeys(state["modalities"])
        check_same_modalities(self.modalities, names, expected_what="encoders", actual_what="state")
        self._stage, self._phase = int(state["stage"]), str(state["phase"])
        self._epochs, self._optimizer, self._pending = (
            int(state["epochs"]),
            None,
            state["optimizer"],
        )
        last = state["last"]
        self.last = None if last is None else ReconBoostRecord(
            **{**last, "modalities": tuple(last["modalities"])})  # fmt: skip

    def extra_repr(self) -> str:
        return (f"modalities={list(self.modalities)}, w1={self.w1}, w2={self.w2}, "
                f"alpha={self.alpha}, consolidation={self.consolidation!r}, "
                f"boost_epochs={self.boost_epochs}, rectify_epochs={self.rectify_epochs}, "
                f"warm_start={self.warm_start}")  # fmt: skip


def _official_sgd(params: list[Tensor], phase: Phase, stage: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def _check_head(head: object, modalities: tuple[str, ...]) -> dict[str, nn.Module] | MappingHead:
    """The head, if it scores each modality alone and exposes its parameters; else an error."""
    if isinstance(head, MappingHead):
        if not isinstance(head.fn, nn.Module):
            raise TypeError(
                "ReconBoost builds each phase's optimiser, so it must see the head's parameters: "
                f"give the MappingHead an nn.Module fn, got {type(head.fn).__name__}"
            )
        return head
    if not isinstance(head, Mapping | nn.ModuleDict):
        raise TypeError(
            "ReconBoost needs a head that scores each modality alone: a mapping {modality: "
            "module} (the same module under every key for one head shared by all modalities, "
            "the official setting) or a MappingHead over a module; got "
            f"{type(head).__name__}. A head over the concatenated features does not score a "
            "modality alone: give the model per-modality heads, or one head applied per modality"
        )
    heads = dict(head.items())
    check_same_modalities(modalities, heads, expected_what="encoders", actual_what="head")
    for name, module in heads.items():
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"head[{name!r}] must be an nn.Module (ReconBoost trains its parameters), got "
                f"{type(module).__name__}"
            )
    return heads
