"""Diagnosing & Re-learning (Wei, Li, Hu; ECCV 2024): soft re-initialisation of the encoders.

Nothing changes in a training step. At chosen epoch boundaries each modality's *learning state*
is diagnosed from how separable its encoder's features are, on the training data and on a split
held out of it, and each encoder is pulled back towards its initial parameters by as much as it
over-fits (paper Sec. 3; official ``code/ours.py``)::

    x'     = 2 (x - min) / (max - min) - 1        each feature dimension, fitted per split
    P^s_m  = purity(k-means_C(x'_m on split s))    s in {train, val}, C = number of classes
    g_m    = |P^train_m - P^val_m|
    a_m    = tanh(lambda g_m)
    theta  <- a_m theta^0 + (1 - a_m) theta        every parameter of encoder m

Head, BN running statistics and the optimiser state are left as they are. See docs/relearning.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.distributed import (
    ProcessGroup,
    all_gather_rows,
    all_reduce_sum,
    gathering_together,
    is_distributed,
    is_sharded,
)
from ..core.params import check_head_not_listed, modality_parameters
from ..core.records import StepRecord
from ..core.running import OTHER_RANK_FAILED
from ..core.unimodal import Head, eval_mode
from ..core.validation import (
    check_features,
    check_modalities,
    check_same_modalities,
    check_target,
    int_param,
    real_param,
)

__all__ = [
    "ModalityRelearning",
    "RelearnRecord",
    "cluster_purity",
    "kmeans",
    "learning_state_alphas",
    "minmax_scale",
    "purity_score",
    "soft_reinitialise_",
]

Batch = tuple[Mapping[str, Tensor], Tensor]
"""What ``forward(batch)`` returns: ``({modality: [B, D_m] features}, class indices [B])``."""


def minmax_scale(features: Tensor) -> Tensor:
    """Each column of ``features`` ``[N, D]`` mapped onto ``[-1, 1]``, in fp32.

    ``x' = 2 (x - min_n x) / (max_n x - min_n x) - 1``; a constant column becomes ``-1``
    (``sklearn.preprocessing.MinMaxScaler(feature_range=(-1, 1))``).

    Example:
        >>> import torch
        >>> from imbalance_losses import minmax_scale
        >>> minmax_scale(torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]]))
        tensor([[-1., -1.],
                [ 0., -1.],
                [ 1., -1.]])
    """
    x = features.float()
    low = x.amin(0)
    span = x.amax(0) - low
    return 2 * (x - low) / torch.where(span > 0, span, torch.ones_like(span)) - 1


def _sq_dist(x: Tensor, centres: Tensor) -> Tensor:
    """``[N, K]`` squared Euclidean distances (the matmul form, floored at 0)."""
    cross = x @ centres.T
    return ((x * x).sum(1, keepdim=True) - 2 * cross + (centres * centres).sum(1)).clamp_min(0)


def _seed_centres(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++: ``2 + floor(ln k)`` candidates per centre, drawn with probability
    ``∝ D(x)^2``; the one that lowers the potential ``sum_n min_j D^2`` most is kept."""
    n, trials = x.shape[0], 2 + int(math.log(k))
    centres = x[torch.randint(n, (1,), generator=generator).to(x.device)]
    closest = _sq_dist(x, centres)[:, 0]
    for _ in range(1, k):
        cumulative = closest.cumsum(0)
        draws = torch.rand(trials, generator=generator).to(x.device) * cumulative[-1]
        index = torch.searchsorted(cumulative, draws, right=True).clamp_max(n - 1)
        candidates = torch.minimum(closest[:, None], _sq_dist(x, x[index]))
        best = candidates.sum(0).argmin()
        centres = torch.cat([centres, x[index[best]][None]])
        closest = candidates[:, best]
    return centres


def kmeans(
    points: Tensor, k: int, *, seed: int = 0, iters: int = 300, tol: float = 1e-4
) -> tuple[Tensor, Tensor]:
    r"""Lloyd's k-means with greedy k-means++ seeding: ``(assignment [N] long, centres [k, D])``.

    Minimises $\sum_n \min_j \lVert x_n - c_j \rVert^2$. Seeding: the first centre uniformly,
    each next one the best of ``2 + floor(ln k)`` candidates drawn with probability
    proportional to the squared distance to the nearest centre (scikit-learn's default). Then at
    most ``iters`` Lloyd iterations (assign each point to its nearest centre, lowest index on
    ties; move each centre to its points' mean, an empty cluster keeps its centre), stopping when
    the centres move by at most ``tol`` times the mean per-dimension variance (total squared
    shift). Deterministic: the draws come from a CPU generator seeded with ``seed``, the sums
    are matrix products (no atomic adds on accelerators), so a seed gives one result on a device.
    fp32 (``points`` are cast).

    Example:
        >>> import torch
        >>> from imbalance_losses import kmeans
        >>> x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]])
        >>> assignment, centres = kmeans(x, 2, seed=0)
        >>> assignment[0] == assignment[1], assignment[1] != assignment[2]
        (tensor(True), tensor(True))
        >>> centres[assignment[2]]
        tensor([10.0000, 10.5000])
    """
    k, iters = int_param("k", k, ge=1), int_param("iters", iters, ge=1)
    if points.dim() != 2 or points.shape[0] < k:
        raise ValueError(f"kmeans needs points [N, D] with N >= k = {k}, got {tuple(points.shape)}")
    x = points.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"kmeans: points of shape {tuple(x.shape)} contain NaN or inf")
    threshold = real_param("tol", tol, ge=0.0) * x.var(0, unbiased=False).mean()
    centres = _seed_centres(x, k, torch.Generator().manual_seed(seed))
    for _ in range(iters):
        members = F.one_hot(_sq_dist(x, centres).argmin(1), k).to(x.dtype)
        counts = members.sum(0)[:, None]
        moved = torch.where(counts > 0, members.T @ x / counts.clamp_min(1), centres)
        shift, centres = ((moved - centres) ** 2).sum(), moved
        if bool(shift <= threshold):
            break
    return _sq_dist(x, centres).argmin(1), centres


def purity_score(
    clusters: Tensor,
    labels: Tensor,
    num_clusters: int | None = None,
    num_classes: int | None = None,
) -> Tensor:
    r"""Cluster purity, 0-dim fp32: the share of samples whose label is their cluster's majority.

    $$P = \frac{1}{N} \sum_{j} \max_{c} \left\lvert \{ n : \kappa_n = j,\ y_n = c \} \right\rvert$$

    Invariant to renaming the clusters; 1 when every cluster holds one class; never below the
    largest class's share. ``clusters`` and ``labels`` are integer ``[N]`` (``N > 0``) in
    ``[0, num_clusters)`` and ``[0, num_classes)`` (default: their maxima + 1).

    Example:
        >>> import torch
        >>> from imbalance_losses import purity_score
        >>> purity_score(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([2, 2, 1, 0, 0]))
        tensor(0.8000)
    """
    if clusters.dim() != 1 or clusters.shape != labels.shape or not clusters.numel():
        raise ValueError(
            f"purity_score: clusters {tuple(clusters.shape)} and labels "
            f"{tuple(labels.shape)} must both be [N], N > 0"
        )
    if clusters.is_floating_point() or labels.is_floating_point():
        raise TypeError(
            f"purity_score: integer clusters and labels, got {clusters.dtype}, {labels.dtype}"
        )
    k = int(clusters.max()) + 1 if num_clusters is None else num_clusters
    c = int(labels.max()) + 1 if num_classes is None else num_classes
    if bool(
        (clusters < 0).any() | (clusters >= k).any() | (labels < 0).any() | (labels >= c).any()
    ):
        raise ValueError(f"purity_score: clusters outside [0, {k}) or labels outside [0, {c})")
    table = torch.bincount(clusters.long() * c + labels.long(), minlength=k * c).view(k, c)
    return table.amax(1).sum().float() / clusters.numel()


def cluster_purity(
    features: Tensor, labels: Tensor, num_classes: int, seed: int = 0, *, iters: int = 300,
    tol: float = 1e-4,
) -> Tensor:  # fmt: skip
    """Purity of a ``num_classes``-means clustering of the min-max scaled ``features`` ``[N, D]``.

    ``purity_score(kmeans(minmax_scale(features), num_classes, seed=seed)[0], labels)``: the
    separability of one modality's features on one split (0-dim fp32).

    Example:
        >>> import torch
        >>> from imbalance_losses import cluster_purity
        >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.2], [9.0], [9.1]])
        >>> cluster_purity(x, torch.tensor([0, 0, 1, 1, 2, 2]), num_classes=3, seed=0)
        tensor(1.)
    """
    scaled = minmax_scale(features)
    assignment, _ = kmeans(scaled, num_classes, seed=seed, iters=iters, tol=tol)
    return purity_score(assignment, labels.to(assignment.device), num_classes, num_classes)


def learning_state_alphas(purity_train: Tensor, purity_val: Tensor, lam: float) -> Tensor:
    r"""Re-initialisation strengths ``a_m = tanh(lam |P^train_m - P^val_m|)``, each in ``[0, 1)``.

    $$\alpha_m = \tanh\left(\lambda \left\lvert P^{\text{train}}_m - P^{\text{val}}_m
    \right\rvert\right)$$

    Example:
        >>> import torch
        >>> from imbalance_losses import learning_state_alphas
        >>> learning_state_alphas(torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.5]), lam=3.0)
        tensor([0.7163, 0.0000])
    """
    if purity_train.shape != purity_val.shape:
        raise ValueError(f"purities {tuple(purity_train.shape)} and {tuple(purity_val.shape)}")
    lam = real_param("lam", lam, ge=0.0)
    return torch.tanh(lam * (purity_train.float() - purity_val.float()).abs())


@torch.no_grad()
def soft_reinitialise_(
    params: Sequence[Tensor], initial: Sequence[Tensor], alpha: float | Tensor
) -> None:
    r"""``theta <- alpha theta^0 + (1 - alpha) theta`` in place, for every pair of tensors.

    $$\theta \leftarrow \alpha\, \theta^0 + (1 - \alpha)\, \theta$$

    Computed as ``torch.lerp(theta, theta^0, alpha)`` in each parameter's dtype, so ``alpha = 0``
    leaves ``theta`` bit-identical and ``alpha = 1`` restores ``theta^0`` exactly. ``alpha``: a
    real or 0-dim tensor in ``[0, 1]`` (read on the host once).

    Example:
        >>> import torch
        >>> from imbalance_losses import soft_reinitialise_
        >>> theta = torch.tensor([1.0, 3.0])
        >>> soft_reinitialise_([theta], [torch.tensor([0.0, -1.0])], 0.25)
        >>> theta
        tensor([0.7500, 2.0000])
    """
    params, initial = list(params), list(initial)
    if len(params) != len(initial):
        raise ValueError(f"{len(params)} parameters but {len(initial)} initial tensors")
    for i, (p, p0) in enumerate(zip(params, initial, strict=True)):
        if p.shape != p0.shape:
            raise ValueError(f"parameter {i} has shape {tuple(p.shape)}, initial {tuple(p0.shape)}")
    a = real_param("alpha", float(alpha), ge=0.0, le=1.0)
    if params and a > 0:
        torch._foreach_lerp_(params, [p0.to(p) for p, p0 in zip(params, initial, strict=True)], a)


@dataclass(frozen=True)
class RelearnRecord(StepRecord):
    """What one diagnosis found (``ModalityRelearning.last``), per modality in mapping order.

    Example:
        >>> import torch
        >>> from imbalance_losses import RelearnRecord
        >>> t = torch.tensor
        >>> rec = RelearnRecord(("a", "v"), t([0.9, 0.5]), t([0.6, 0.5]), t([0.3, 0.0]),
        ...                     t([0.7163, 0.0]), 100, 20)
        >>> rec.to_dict()["alphas/a"]
        0.7163000106811523
    """

    purity_train: Tensor
    """``P^train_m`` over the whole training split (every rank's samples)."""
    purity_val: Tensor
    """``P^val_m`` over the whole held-out split."""
    gaps: Tensor
    """``g_m = |P^train_m - P^val_m|``."""
    alphas: Tensor
    """``a_m = tanh(lambda g_m)``: how far encoder ``m`` is pulled back to ``theta^0``."""
    train_samples: int
    val_samples: int


class ModalityRelearning(nn.Module):
    r"""Diagnosing & Re-learning: soft re-initialisation of each encoder by its learning state.

    $$\alpha_m = \tanh\left(\lambda \left\lvert P^{\text{train}}_m - P^{\text{val}}_m
    \right\rvert\right), \qquad \theta_m \leftarrow \alpha_m \theta_m^0 + (1 - \alpha_m)\theta_m$$

    ``P^s_m``: purity of a ``C``-means clustering of modality ``m``'s min-max scaled encoder
    features on split ``s``; ``theta_m^0``: encoder ``m``'s parameters when this object was
    built (build it right after the model, before any training step). After training epoch
    ``e`` (0-based), :meth:`epoch_end` re-initialises when ``e > 0``, ``e % reinit_every == 0``
    and fewer than ``max_reinits`` re-initialisations were made: after epochs ``E_r, 2 E_r,
    ..., N_r E_r`` (the official count rule). Nothing happens in a training step.

    Args:
        encoders: ``{modality: nn.Module or parameters}`` in the features' order.
        num_classes: ``C``, the number of k-means clusters (and classes).
        lam: ``lambda >= 0`` (official ``--move_lambda 3``).
        reinit_every: ``E_r`` epochs (official ``--reinit_epoch 20``).
        max_reinits: ``N_r`` (official ``--reinit_num 3``).
        seed: k-means seed, the same for every diagnosis (official ``random_state=0``).
        head: the fusion head, to refuse its parameters in ``encoders`` (optional).
        iters: at most this many Lloyd iterations (:func:`kmeans`).
        tol: Lloyd's stopping tolerance (:func:`kmeans`).
        process_group: the ranks whose features are gathered (default: the world).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import ModalityRelearning
        >>> _ = torch.manual_seed(0)
        >>> encoders = nn.ModuleDict({"a": nn.Linear(3, 4), "v": nn.Linear(5, 4)})
        >>> relearn = ModalityRelearning(encoders, num_classes=2, lam=3.0, reinit_every=2)
        >>> def batch(n):
        ...     x = {"a": torch.randn(n, 3), "v": torch.randn(n, 5)}
        ...     return {m: enc(x[m]) for m, enc in encoders.items()}, torch.arange(n) % 2
        >>> train, val = [batch(8), batch(8)], [batch(8)]
        >>> relearn.epoch_end(1, train, val) is None        # not a re-learning epoch
        True
        >>> rec = relearn.epoch_end(2, train, val)          # diagnose, then pull back
        >>> rec.modalities, relearn.reinits, bool((rec.alphas >= 0).all())
        (('a', 'v'), 1, True)
    """

    _params: list[tuple[int, Tensor]]  # (modality index, parameter): the model's, not ours

    def __init__(
        self,
        encoders: Mapping[str, Any] | nn.ModuleDict,
        num_classes: int,
        *,
        lam: float = 3.0,
        reinit_every: int = 20,
        max_reinits: int = 3,
        seed: int = 0,
        head: Head | None = None,
        iters: int = 300,
        tol: float = 1e-4,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int_param("num_classes", num_classes, ge=2)
        self.lam = real_param("lam", lam, ge=0.0)
        self.reinit_every = int_param("reinit_every", reinit_every, ge=1)
        self.max_reinits = int_param("max_reinits", max_reinits, ge=0)
        self.seed, self.iters = int_param("seed", seed), int_param("iters", iters, ge=1)
        self.tol, self.process_group = real_param("tol", tol, ge=0.0), process_group
        params = modality_parameters(encoders, what="encoders")
        self.modalities: tuple[str, ...] = tuple(dict(encoders.items()))
        check_head_not_listed(
            params, head, self.modalities, who="ModalityRelearning", action="re-initialise"
        )
        sharded = [self.modalities[m] for m, _, p in params if is_sharded(p)]
        if sharded:
            raise NotImplementedError(
                f"ModalityRelearning: encoders[{sharded[0]!r}] has FSDP2-sharded (DTensor) "
                "parameters; sharded encoders are not supported yet"
            )
        self.__dict__["_params"] = [(m, p) for m, _, p in params]  # the model owns them
        for j, (_, _, p) in enumerate(params):
            self.register_buffer(f"initial_{j}", p.detach().clone())
        self.reinits, self._fired_epoch = 0, 0
        self._widths: dict[str, int] | None = None
        self.last: RelearnRecord | None = None

    def initial(self, modality: str) -> list[Tensor]:
        """``theta^0`` of encoder ``modality``: the buffers, in its parameters' order."""
        m = self.modalities.index(modality)
        return [getattr(self, f"initial_{j}") for j, (i, _) in enumerate(self._params) if i == m]

    def due(self, epoch: int) -> bool:
        """Whether :meth:`epoch_end` re-initialises after training epoch ``epoch`` (0-based)."""
        epoch = int_param("epoch", epoch, ge=0)
        return (
            epoch > 0
            and epoch % self.reinit_every == 0
            and epoch > self._fired_epoch
            and self.reinits < self.max_reinits
        )

    def epoch_end(
        self, epoch: int, train: Iterable[Any], val: Iterable[Any], *,
        forward: Callable[[Any], Batch] | None = None, model: nn.Module | None = None,
    ) -> RelearnRecord | None:  # fmt: skip
        """After training epoch ``epoch``: when :meth:`due`, :meth:`diagnose` then
        :meth:`reinitialise` and return the record; otherwise ``None`` (the splits are not read).
        """
        if not self.due(epoch):
            return None
        record = self.diagnose(train, val, forward=forward, model=model)
        self.reinitialise()
        self._fired_epoch = epoch
        return record

    @torch.no_grad()
    def diagnose(
        self, train: Iterable[Any], val: Iterable[Any], *,
        forward: Callable[[Any], Batch] | None = None, model: nn.Module | None = None,
    ) -> RelearnRecord:  # fmt: skip
        """Purities, gaps and ``alpha`` over both splits (changes no weight or buffer).

        ``train`` and ``val`` are iterables of batches (``val`` held out of the training data,
        never the test split); ``forward(batch)`` returns ``({m: [B, D_m]}, target [B])``
        (default: the batch is that pair). ``model`` is put in eval mode meanwhile (flags
        restored). Under DDP every rank's samples are gathered (rank order) and every rank gets
        the first rank's result. Stored as ``last``.
        """
        purities, sizes = [], []
        for split, data in (("train", train), ("val", val)):
            feats, labels = self._gather(split, data, forward, model)
            sizes.append(labels.shape[0])
            p = [cluster_purity(x, labels, self.num_classes, self.seed, iters=self.iters,
                                tol=self.tol) for x in feats]  # fmt: skip
            purities.append(torch.stack(p))
        alphas = learning_state_alphas(purities[0], purities[1], self.lam)
        values = self._from_first_rank(torch.stack([*purities, alphas]))
        pt, pv, a = values.unbind()
        self.last = RelearnRecord(self.modalities, pt, pv, (pt - pv).abs(), a, *sizes)
        return self.last

    def reinitialise(self, alphas: Tensor | None = None) -> None:
        """``theta_m <- a_m theta_m^0 + (1 - a_m) theta_m`` for every encoder (default ``a``: the
        last diagnosis's); counts one re-initialisation."""
        if alphas is None:
            if self.last is None:
                raise RuntimeError("ModalityRelearning.reinitialise: no diagnosis yet")
            alphas = self.last.alphas
        if tuple(alphas.shape) != (len(self.modalities),) or not bool(
            ((alphas >= 0) & (alphas <= 1)).all()
        ):
            raise ValueError(
                f"alphas must be [M] = [{len(self.modalities)}] in [0, 1], got {alphas}"
            )
        for m, a in enumerate(alphas.tolist()):
            params = [p for i, p in self._params if i == m]
            soft_reinitialise_(params, self.initial(self.modalities[m]), a)
        self.reinits += 1

    def _from_first_rank(self, values: Tensor) -> Tensor:
        """The group's first rank's values on every rank (device differences cannot split)."""
        if not is_distributed(self.process_group):
            return values
        first = dist.get_rank(self.process_group) == 0
        return all_reduce_sum(values if first else torch.zeros_like(values), self.process_group)

    def _gather(
        self, split: str, data: Iterable[Any], forward: Callable[[Any], Batch] | None,
        model: nn.Module | None,
    ) -> tuple[list[Tensor], Tensor]:  # fmt: skip
        """Every rank's features and labels of one split: ``([N, D_m] per modality, [N])``."""
        device, group = self._params[0][1].device, self.process_group
        with gathering_together(device, group), eval_mode(model):
            rows = self._collect(split, data, forward, device)
        known = [list(self._widths.values())] if self._widths else []
        known_t = torch.tensor(known, dtype=torch.long, device=device)
        widths = all_gather_rows(
            known_t.reshape(-1, len(self.modalities)), group, message=OTHER_RANK_FAILED
        )
        rows = all_gather_rows(rows, group)
        if rows.shape[0] < self.num_classes:
            raise ValueError(
                f"ModalityRelearning: the {split} split has {rows.shape[0]} samples "
                f"(all ranks), fewer than num_classes = {self.num_classes} clusters"
            )
        if bool((widths != widths[0]).any()):
            raise ValueError(f"{split} features have widths {widths.tolist()} on different ranks")
        parts = torch.split(rows[:, :-1], widths[0].tolist(), dim=1)
        return list(parts), rows[:, -1].long()

    def _collect(
        self, split: str, data: Iterable[Any], forward: Callable[[Any], Batch] | None,
        device: torch.device,
    ) -> Tensor:  # fmt: skip
        """This rank's ``[n, sum_m D_m + 1]`` fp32 rows: the features, then the label."""
        rows: list[Tensor] = []
        for batch in data:
            feats, target = forward(batch) if forward is not None else batch
            what = f"{split} features"
            size = check_modalities(feats, what=what, min_ndim=2)
            check_same_modalities(
                self.modalities, feats, expected_what="encoders", actual_what=what
            )
            if self._widths is None:  # the first batch ever fixes the widths
                self._widths = {m: int(x.shape[-1]) for m, x in feats.items()}
            check_features(
                feats, widths=self._widths, finite=True, what=what, by="ModalityRelearning"
            )
            if target.is_floating_point():
                raise TypeError(f"{split} target must be class indices [B], got {target.dtype}")
            check_target(target, batch=size, num_classes=self.num_classes, name=f"{split} target")
            cols = [x.detach().float() for x in feats.values()]
            label = target[:, None].to(device=cols[0].device, dtype=torch.float32)
            rows.append(torch.cat([*cols, label], 1).to(device))  # a CPU target: moved
        width = sum(self._widths.values()) if self._widths else 0
        return torch.cat(rows) if rows else torch.zeros(0, width + 1, device=device)

    def get_extra_state(self) -> dict[str, Any]:
        """The count, the last re-initialised epoch and the last record (``theta^0``: buffers)."""
        last = None if self.last is None else dataclasses.asdict(self.last)
        return {"modalities": self.modalities, "reinits": self.reinits,
                "fired_epoch": self._fired_epoch, "last": last}  # fmt: skip

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        names = dict.fromkeys(state["modalities"])
        check_same_modalities(self.modalities, names, expected_what="encoders", actual_what="state")
        self.reinits, self._fired_epoch = int(state["reinits"]), int(state["fired_epoch"])
        last = state["last"]
        if last is not None:
            last = RelearnRecord(**{**last, "modalities": tuple(last["modalities"])})
        self.last = last
