"""Sustained boosting with adaptive classifier assignment (Jiang, Huang, Yang; NeurIPS 2025).

The weak modality gets more classifiers. Each modality ``m`` owns ``n_m`` heads; head ``j`` is::

    z_mj = W2 relu(L_mj(u_m)) + b2          L_mj: Linear(D_m, hidden) of its own,
                                            (W2, b2): ONE output layer shared by every head
    Z_m  = sum_j z_mj                       (the modality's ensemble, plain sum of logits)

and the loss of modality ``m`` with ``n`` heads is (batch means, every weight 1)::

    L_m = CE(Z_m, y)                                    eps_all
        + CE(sum_{j<n} z_mj, y)                         eps_pre   (n > 1)
        + mean_b (1 - lam p_b) CE(z_mn, y)_b            eps       (n > 1, newest head only)
    p_b = stopgrad(softmax(sum_{j<n} z_mj))[b, y_b]

with ``L_m = CE(z_m1, y)`` for one head and total ``L = sum_m L_m``. The residual term is the
official code's ``CE(z_mn, y - lam y ⊙ p)`` written per sample: for a one-hot ``y`` the soft
target has the single entry ``1 - lam p_y`` so the two are identical.

Every ``check()`` compares the modalities' confidence ``s_m = mean_i softmax(Z_m)[i, y_i]``
(pooled over the training samples since the previous check, all ranks) and gives at most one new
head to the weakest modality; see :meth:`SustainedBoostingLoss.check`.

**How an added head reaches the optimiser.** Every modality's ``max_heads`` first layers are
pre-allocated as one stacked parameter (weight ``[max_heads, hidden, D_m]``, bias
``[max_heads, hidden]``), and the forward pass uses the slice ``[:n_m]`` in one batched matmul.
The parameter therefore exists, is registered with the optimiser and with DDP from the start, and
is always part of the graph (so DDP never sees an unused parameter). Inactive slices are exactly
zero and receive exactly zero gradient, so weight decay, momentum and Adam moments leave them at
zero. Activating a head draws its slice in place (Xavier-normal weight, zero bias) from the
module's own seeded generator, identical on every rank and saved in ``state_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._distributed import ProcessGroup, all_reduce_sum, world_size
from ._running import RunningSums
from ._stats import as_fp32, one_vs_rest_ratio, true_class_probability
from ._validation import check_finite, check_modalities, check_same_modalities, check_target
from .diagnostics import StepRecord

__all__ = ["BoostingRecord", "SustainedBoostingLoss"]


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
    """

    scores: Tensor
    ratios: Tensor
    num_heads: Tensor
    head_added: Tensor
    samples: Tensor
    added_to: str | None = None
    capped: str | None = None


def _choose_modality(scores: Tensor, *, sigma: float, tau: float) -> tuple[int | None, Tensor]:
    """The adaptive assignment rule: ``(index of the modality to boost or None, ratios [M])``.

    ``scores`` is ``[M]`` on the host; the ratios are :func:`one_vs_rest_ratio`'s
    ``r_m = s_m / mean_{k != m} s_k`` (``x / 0`` is ``inf``, ``0 / 0`` is 1).

    * ``M = 2``: ``r = s_1 / s_2``; ``r > sigma + tau`` -> modality 2, ``r < sigma - tau`` ->
      modality 1, otherwise none (the dead zone).
    * ``M > 2``: the modality with the smallest ``r_m`` (first in mapping order on a tie) if
      ``r_m < sigma - tau``, otherwise none.
    """
    ratios = one_vs_rest_ratio(scores)
    values = scores.tolist()
    if len(values) == 2:
        # the spec's r = s_1 / s_2 exactly; the helper's ratio only where s_2 = 0
        r = values[0] / values[1] if values[1] != 0 else float(ratios[0])
        return (1 if r > sigma + tau else 0 if r < sigma - tau else None), ratios
    best = int(ratios.argmin())  # argmin returns the first index on a tie
    return (best if float(ratios[best]) < sigma - tau else None), ratios


def _autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (torch >= 2.1)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


class SustainedBoostingLoss(nn.Module):
    r"""Sustained boosting loss with adaptive classifier assignment; owns the classifier heads.

    Put its parameters in the optimiser with your encoders; heads added later are already there::

        boost = SustainedBoostingLoss(num_classes=6, in_features={"audio": 512, "visual": 512},
                                      check_every=500)
        opt = torch.optim.SGD([*encoders.parameters(), *boost.parameters()], lr=1e-2)
        loss = boost({"audio": a, "visual": v}, target)      # training step
        loss.backward(); opt.step(); opt.zero_grad()
        logits = boost.predict({"audio": a, "visual": v})    # inference

    Args:
        num_classes: number of classes ``C``.
        in_features: ordered mapping modality -> feature width ``D_m`` (at least two).
        hidden: width of each head's first layer (256 in the paper).
        lam: residual weight ``lam`` in ``1 - lam p_b`` (official HEAD code 0.5).
        sigma: balance point of the assignment rule (1.0).
        tau: half-width of the dead zone around ``sigma`` (0.01).
        check_every: run :meth:`check` automatically every this many training forward calls (at
            the start of the next one, so a new head is in that step's graph). ``None``: you call
            :meth:`check` yourself, e.g. once per epoch, between ``optimizer.step()`` and the next
            forward. With gradient accumulation over ``k`` micro-batches use a multiple of ``k``.
        max_heads: cap on heads per modality (pre-allocated). When the rule picks a modality at
            the cap, no head is added and a warning says so.
        fusion_weights: prediction weights ``alpha_m`` (mapping modality -> weight or a sequence
            in mapping order); uniform ``1/M`` by default.
        output_layer: your own shared output layer (any module mapping ``[N, hidden]`` to
            ``[N, num_classes]``); default ``nn.Linear(hidden, num_classes)`` drawn from ``seed``.
        seed: seed of the module's own generator (initial heads, default output layer, added
            heads). Must be the same on every rank (it is by default).
        process_group: group over which the confidence scores are all-reduced (default: world).
    """

    head_counts: Tensor

    def __init__(
        self,
        num_classes: int,
        in_features: Mapping[str, int],
        *,
        hidden: int = 256,
        lam: float = 0.5,
        sigma: float = 1.0,
        tau: float = 0.01,
        check_every: int | None = None,
        max_heads: int = 8,
        fusion_weights: Mapping[str, float] | Sequence[float] | None = None,
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
        for name, width in in_features.items():
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise ValueError(
                    f"in_features[{name!r}] must be a positive int (the width D of features "
                    f"[B, D]), got {width!r}"
                )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1] so that 1 - lam p >= 0, got {lam}")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if check_every is not None and check_every < 1:
            raise ValueError(
                f"check_every must be a positive number of steps or None, got {check_every}"
            )
        if max_heads < 1:
            raise ValueError(f"max_heads must be >= 1, got {max_heads}")

        self.modalities: tuple[str, ...] = tuple(in_features)
        self.in_features: dict[str, int] = dict(in_features)
        self.num_classes = num_classes
        self.hidden = hidden
        self.lam = float(lam)
        self.sigma = float(sigma)
        self.tau = float(tau)
        self.check_every = check_every
        self.max_heads = max_heads
        self.process_group = process_group
        self.seed = seed
        self.fusion_weights = self._fusion_weights(fusion_weights)

        self._generator = torch.Generator().manual_seed(seed)
        # One stacked first layer per modality, in mapping order. Slices >= n_m are zero.
        self.head_weight = nn.ParameterList(
            [nn.Parameter(torch.zeros(max_heads, hidden, d)) for d in in_features.values()]
        )
        self.head_bias = nn.ParameterList(
            [nn.Parameter(torch.zeros(max_heads, hidden)) for _ in in_features]
        )
        if output_layer is None:
            output_layer = nn.Linear(hidden, num_classes)
            # nn.Linear's own default (uniform +-1/sqrt(hidden)), drawn from our generator.
            bound = 1.0 / math.sqrt(hidden)
            with torch.no_grad():
                for p in (output_layer.weight, output_layer.bias):
                    p.copy_(torch.rand(p.shape, generator=self._generator) * 2 * bound - bound)
        self.output_layer = output_layer
        self.register_buffer("head_counts", torch.zeros(len(in_features), dtype=torch.long))
        self._counts: list[int] = [0] * len(in_features)  # host mirror of head_counts
        for i in range(len(in_features)):
            self._activate(i)

        self._pool = RunningSums()
        self._since_check = 0  # training forward calls since the last check
        self.last: BoostingRecord | None = None
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
            return tuple(float(weights[name]) for name in self.modalities)
        values = tuple(float(w) for w in weights)
        if len(values) != m:
            raise ValueError(
                f"fusion_weights has {len(values)} values but there are {m} modalities "
                f"{list(self.modalities)}"
            )
        return values

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"hidden={self.hidden}, lam={self.lam}, sigma={self.sigma}, tau={self.tau}, "
            f"check_every={self.check_every}, max_heads={self.max_heads}"
        )

    # ------------------------------------------------------------------ heads
    @property
    def num_heads(self) -> dict[str, int]:
        """Active heads per modality, in mapping order."""
        return dict(zip(self.modalities, self._counts, strict=True))

    def _activate(self, index: int) -> None:
        """Turn on the next head of modality ``index``: Xavier-normal weight, zero bias.

        Written through ``.data`` so that it is legal even while a graph built from the active
        slice ``[:n]`` is alive: only row ``n`` changes, which that graph never read.
        """
        n = self._counts[index]
        weight = self.head_weight[index]
        fan_out, fan_in = weight.shape[1], weight.shape[2]
        std = math.sqrt(2.0 / (fan_in + fan_out))  # Xavier-normal, gain 1
        new = torch.randn(fan_out, fan_in, generator=self._generator) * std
        with torch.no_grad():
            weight.data[n].copy_(new)
            self.head_bias[index].data[n].zero_()
        self._counts[index] = n + 1
        self.head_counts[index] = n + 1

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
        self._activate(index)
        return self._counts[index]

    # ------------------------------------------------------------------ forward pieces
    def _check_features(self, features: Mapping[str, Tensor]) -> int:
        batch = check_modalities(features)
        check_same_modalities(
            self.modalities, features, expected_what="in_features", actual_what="features"
        )
        for name, x in features.items():
            width = self.in_features[name]
            if x.dim() != 2 or x.shape[1] != width:
                raise ValueError(
                    f"features[{name!r}] must have shape [B, {width}] (in_features[{name!r}] = "
                    f"{width}), got shape {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise TypeError(f"features[{name!r}] must be floating point, got {x.dtype}")
            dtype = self.head_weight[0].dtype
            if x.dtype != dtype and not _autocast_enabled(x.device.type):
                raise TypeError(
                    f"features[{name!r}] are {x.dtype} but the heads' parameters are {dtype}; "
                    "run the forward under torch.autocast, or cast the features or the module"
                )
            check_finite(x, name=f"features[{name!r}]")
        return batch

    def _head_tensors(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """Per modality the logits of its active heads, ``[B, n_m, C]``, in mapping order.

        ``h_m = relu(u_m W_m[:n]^T + b_m[:n])`` is one matmul per modality (the ``n`` first
        layers stacked to ``[n * hidden, D_m]``); the shared output layer then runs once over
        every head of every modality.
        """
        hidden_parts = []
        for i, x in enumerate(features.values()):
            n = self._counts[i]
            w = self.head_weight[i][:n].reshape(n * self.hidden, -1)
            b = self.head_bias[i][:n].reshape(n * self.hidden)
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

    def _modality_loss(self, z: Tensor, target: Tensor) -> Tensor:
        """``L_m`` for one modality from its heads' logits ``z`` ``[B, n, C]``."""
        ensemble = z.sum(1)
        loss = F.cross_entropy(ensemble, target)  # eps_all (= CE(z_m1, y) for one head)
        if z.shape[1] == 1:
            return loss
        previous = z[:, :-1].sum(1)
        newest = z[:, -1]
        loss = loss + F.cross_entropy(previous, target)  # eps_pre
        if target.is_floating_point():
            # soft targets: CE(z_n, t - lam t ⊙ p) with p the detached previous softmax.
            p = torch.softmax(as_fp32(previous), dim=-1)
            residual_target = target * (1.0 - self.lam * p)
            dtype = torch.promote_types(newest.dtype, torch.float32)
            return loss + F.cross_entropy(newest, residual_target.to(dtype))
        p_true = true_class_probability(previous, target)  # detached, fp32
        per_sample = F.cross_entropy(newest, target, reduction="none")
        return loss + ((1.0 - self.lam * p_true) * per_sample).mean()  # eps

    # ------------------------------------------------------------------ public API
    def forward(self, features: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """Training loss ``L = sum_m L_m`` (a scalar); see the module docstring for ``L_m``.

        In training mode this also pools the confidence scores ``s_m`` of this batch (computed
        before the update, detached, fp32) and, with ``check_every``, runs :meth:`check` first
        when ``check_every`` training steps have passed since the last one.

        Args:
            features: ordered mapping modality -> ``[B, D_m]``, the modalities of
                ``in_features`` in the same order.
            target: class indices ``LongTensor[B]`` or soft targets ``[B, C]`` (rows summing
                to 1).
        """
        batch = self._check_features(features)
        check_target(target, batch=batch, num_classes=self.num_classes)
        if self.training and self.check_every is not None and self._since_check >= self.check_every:
            self.check()
        logits = self._head_tensors(features)
        loss = torch.stack([self._modality_loss(z, target) for z in logits]).sum()
        if self.training:
            scores = torch.stack([true_class_probability(z.sum(1), target).sum() for z in logits])
            self._pool.add(scores, batch)
            self._since_check += 1
        return loss

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
        """Adaptive classifier assignment; call on every rank at the same point.

        Pools ``s_m`` over the training samples since the last check (every rank: one
        all-reduce of ``M + 1`` sums plus a consistency fingerprint), applies the rule

        * two modalities: ``r = s_1 / s_2``; ``r > sigma + tau`` -> a head for modality 2,
          ``r < sigma - tau`` -> a head for modality 1, otherwise none;
        * ``M > 2``: ``r_m = s_m / mean_{k != m} s_k``; a head for ``argmin_m r_m`` if
          ``r_m < sigma - tau``;

        adds at most one head (a warning instead when that modality is at ``max_heads``),
        resets the pool and returns (and stores in :attr:`last`) a :class:`BoostingRecord`.

        The decision is read on the host: one sync per check, not per step.

        Raises:
            RuntimeError: no training batch was seen since the last check (on any rank), or the
                ranks disagree on the head counts or seed (``add_head`` called on one rank only).
        """
        m = len(self.modalities)
        device = self.head_counts.device
        if self._pool.empty:
            self._pool.add(torch.zeros(m, device=device), 0)  # join the collective anyway
        state = self._pool.state_dict()
        fingerprint = torch.tensor(
            [float(self.seed % 65536), *map(float, self._counts)], device=state["sums"].device
        )
        local = torch.cat([state["sums"], state["count"].reshape(1), fingerprint])
        pooled = all_reduce_sum(local, self.process_group)
        self._pool.reset()
        self._since_check = 0
        host = pooled.cpu().double()  # the one host read of a check
        count = float(host[m])
        ranks = world_size(self.process_group)
        if not torch.equal(host[m + 1 :], ranks * fingerprint.cpu().double()):
            raise RuntimeError(
                "SustainedBoostingLoss differs across ranks (head counts "
                f"{self.num_heads} or seed {self.seed} on this rank are not those of every "
                "rank); call add_head/check on every rank at the same step and use one seed"
            )
        if count == 0:
            raise RuntimeError(
                "check() needs at least one training-mode forward since the last check; no "
                "samples were pooled"
            )
        scores = host[:m] / count
        choice, ratios = _choose_modality(scores, sigma=self.sigma, tau=self.tau)
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
                    stacklevel=2,
                )
            else:
                self._activate(choice)
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
            samples=pooled[m].clone(),
            added_to=added,
            capped=capped,
        )
        return self.last

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """Generator, pooled scores and the step counter (head counts are the buffer)."""
        return {
            "generator": self._generator.get_state(),
            "pool": self._pool.state_dict(),
            "since_check": self._since_check,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        self._pool.load_state_dict(state["pool"])
        self._since_check = int(state["since_check"])


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
