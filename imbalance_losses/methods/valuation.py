"""Sample-level modality valuation (Wei, Yan, Cai, Feng, Hu, Gao; CVPR 2024).

Each modality's contribution to each training sample's prediction is valued exactly, and the
samples on which a modality contributes little are trained again with that modality alone, so
that it learns where it lags (paper Sec. 3; official ``code/sample_level.py``)::

    v(S)    = |S| 1[argmax head(x_S) = y],  v({}) = 0       x_S: the features outside S zeroed
    phi_m   = sum_{S not containing m} |S|! (M - |S| - 1)! / M! (v(S + {m}) - v(S))
    c(phi)  = 3 if phi <= -0.1, 2 if -0.1 < phi <= 0.4, 1 if 0.4 < phi < 1, 0 if phi >= 1

After an epoch (from ``warmup - 1`` on) one no-grad eval pass values every training sample;
the next epoch trains on the ``N`` originals plus, per sample and modality ``m``, ``c(phi_m)``
copies with every *other* modality dropped (zeroed features). ``sum_m phi_m = v(all) = M`` for a
correctly classified sample: the fair share of each modality is 1 for any ``M``. See
``docs/valuation.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..core.distributed import (
    ProcessGroup,
    all_gather_rows,
    gathering_together,
    is_distributed,
    world_size,
)
from ..core.masking import masked_outputs, shapley_weights, subset_masks
from ..core.records import StepRecord
from ..core.running import OTHER_RANK_FAILED
from ..core.unimodal import Head, _first_parameter, eval_mode
from ..core.validation import (
    check_features,
    check_finite,
    check_modalities,
    check_same_modalities,
    check_target,
    int_param,
    modality_names,
    real_param,
)

__all__ = [
    "MaskedDataset",
    "SampleModalityValuation",
    "ValuationRecord",
    "ValuationSampler",
    "apply_mask",
    "copy_counts",
    "modality_level_extra",
    "resampling_plan",
    "sample_shapley",
]

Entry = tuple[int, int]
"""One entry of an epoch's plan: ``(sample index, kept-modality bits)`` (bit ``j`` = modality
``j`` kept, the convention of :mod:`imbalance_losses.core.masking`; ``2^M - 1`` keeps all)."""
Batch = tuple[Mapping[str, Tensor], Tensor, Tensor]
"""What the valuation ``forward(batch)`` returns: ``({m: features}, target [B], index [B])``."""
MAX_MODALITIES = 16


def sample_shapley(correct_by_subset: Tensor) -> Tensor:
    r"""Exact per-sample Shapley values ``[M, ...]`` (fp64) of ``v(S) = |S| 1[correct on S]``.

    $$\phi_m = \sum_{S \not\ni m} \frac{|S|!\,(M-|S|-1)!}{M!}\,\bigl(v(S \cup \{m\}) -
    v(S)\bigr), \qquad v(S) = |S|\,\mathbb{1}[\hat y_S = y], \quad v(\emptyset) = 0$$

    ``correct_by_subset[s]`` (``[2^M, ...]``, bool or 0/1) says whether the head was right
    with the modalities of subset ``s`` (bit ``j`` = modality ``j`` present); row 0 (no
    modality) is ignored. Efficiency: ``sum_m phi_m = v(all) = M 1[correct]``. Computed on
    integers (``M! phi`` is one) and divided once, so a value equal to a threshold such as 0.4
    is that float exactly. ``1 <= M <= 16``.

    Example:
        >>> import torch
        >>> from imbalance_losses import sample_shapley
        >>> # columns: both right; only modality 0 alone right; neither alone right
        >>> c = torch.tensor([[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
        >>> sample_shapley(c)
        tensor([[1.0000, 1.5000, 1.0000],
                [1.0000, 0.5000, 1.0000]], dtype=torch.float64)
    """
    n = correct_by_subset.shape[0] if correct_by_subset.dim() else 0
    m = n.bit_length() - 1
    if n < 2 or n != 2**m or m > MAX_MODALITIES:
        raise ValueError(
            f"sample_shapley needs [2^M, ...] correctness (1 <= M <= {MAX_MODALITIES} "
            f"modalities), got shape {tuple(correct_by_subset.shape)}"
        )
    c = correct_by_subset.detach().to(torch.float64)
    if not bool(((c == 0) | (c == 1)).all()):
        raise ValueError("sample_shapley: correct_by_subset must be bool or 0/1")
    size = subset_masks(m, c.device).sum(1).to(torch.float64)
    values = (size.reshape(n, *([1] * (c.dim() - 1))) * c).reshape(n, -1)
    scale = math.factorial(m)  # scale * w(k) are integers; every partial sum < 2^53 for M <= 16
    weights = (shapley_weights(m) * scale).round().to(c.device)
    return ((weights @ values) / scale).reshape(m, *c.shape[1:])


def copy_counts(phi: Tensor, bounds: tuple[float, float, float] = (-0.1, 0.4, 1.0)) -> Tensor:
    r"""Copies per sample and modality (``int64``, the shape of ``phi``).

    $$c(\phi) = \begin{cases} 3 & \phi \le b_0 \\ 2 & b_0 < \phi \le b_1 \\ 1 & b_1 < \phi
    < b_2 \\ 0 & \phi \ge b_2 \end{cases} \qquad (b_0, b_1, b_2) = (-0.1, 0.4, 1)$$

    Half-open intervals covering the line (no gap at a bound); ``phi >= 1`` (a full fair
    share) gets none. The bounds are compared in ``phi``'s dtype.

    Example:
        >>> import torch
        >>> from imbalance_losses import copy_counts
        >>> copy_counts(torch.tensor([-0.5, -0.1, 0.0, 0.4, 0.5, 1.0, 1.5]))
        tensor([3, 3, 2, 2, 1, 0, 0])
    """
    low, mid, high = (real_param(f"bounds[{i}]", b) for i, b in enumerate(bounds))
    if not low < mid < high:
        raise ValueError(f"copy_counts: bounds must increase, got {bounds}")
    if not bool(torch.isfinite(phi).all()):
        raise ValueError(f"copy_counts: phi of shape {tuple(phi.shape)} has NaN or inf values")
    p = phi.detach()  # compared in its own dtype: a float32 0.4 is the bound 0.4
    return (p <= low).long() + (p <= mid).long() + (p < high).long()


def resampling_plan(counts: Tensor) -> tuple[Tensor, Tensor]:
    """An epoch's entries from copy counts ``[M, N]``: ``(index [L], bits [L])``, int64.

    First the ``N`` originals (``index = n``, ``bits = 2^M - 1``: nothing dropped), then per
    sample ``n`` and modality ``m`` (in that order) ``counts[m, n]`` copies keeping ``m`` only
    (``bits = 2^m``). ``L = N + sum counts``.

    Example:
        >>> import torch
        >>> from imbalance_losses import resampling_plan
        >>> resampling_plan(torch.tensor([[1, 0], [0, 2]]))
        (tensor([0, 1, 0, 1, 1]), tensor([3, 3, 1, 2, 2]))
    """
    if counts.dim() != 2 or counts.is_floating_point() or bool((counts < 0).any()):
        raise ValueError(f"counts must be non-negative integers [M, N], got {counts}")
    m, n = counts.shape
    flat = counts.T.reshape(-1).cpu()
    index = torch.arange(n).repeat_interleave(m).repeat_interleave(flat)
    bits = (1 << torch.arange(m)).repeat(n).repeat_interleave(flat)
    return torch.cat([torch.arange(n), index]), torch.cat([torch.full((n,), 2**m - 1), bits])


def modality_level_extra(mean_phi: Tensor, num_samples: int, alpha: float = 1.0) -> tuple[int, int]:
    r"""The modality-level variant's ``(K, weakest)``: ``K`` extra samples keep ``weakest`` only.

    $$g_m = 1 - \bar\phi_m, \qquad K = \left\lfloor N \alpha\, \tfrac{2}{3}\,
    (\max_m g_m - \min_m g_m) \right\rfloor, \qquad w = \arg\max_m g_m$$

    For two modalities ``max - min = |g_a - g_v|`` and keeping ``w`` drops the smaller-gap
    modality (the official rule); the first modality wins a tie. The floor is taken exactly
    (rational arithmetic on the given floats).

    Example:
        >>> import torch
        >>> from imbalance_losses import modality_level_extra
        >>> modality_level_extra(torch.tensor([1.25, 0.5]), num_samples=100)
        (50, 1)
    """
    if mean_phi.dim() != 1 or mean_phi.numel() < 2 or not bool(torch.isfinite(mean_phi).all()):
        raise ValueError(f"mean_phi must be finite [M], M >= 2, got {mean_phi}")
    n, a = int_param("num_samples", num_samples, ge=0), real_param("alpha", alpha, ge=0.0)
    phi = mean_phi.detach().double().cpu()  # max_m g_m - min_m g_m = max phi - min phi
    spread = Fraction(float(phi.max() - phi.min()))  # exact from here: no floor off by one
    return math.floor(Fraction(n) * Fraction(a) * 2 * spread / 3), int(phi.argmin())


def apply_mask(features: Mapping[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """Zero each sample's dropped modalities: ``x_m[b] -> 0`` where ``keep[b, m]`` is false.

    ``keep``: ``[B, M]`` bool (what :class:`MaskedDataset` batches give), mapping order. Uses
    ``torch.where``, so a dropped row passes no gradient and a NaN there does not leak.

    Example:
        >>> import torch
        >>> from imbalance_losses import apply_mask
        >>> out = apply_mask({"a": torch.ones(2, 2), "v": torch.ones(2, 1)},
        ...                  torch.tensor([[True, True], [True, False]]))
        >>> out["v"].flatten().tolist()
        [1.0, 0.0]
    """
    batch = check_modalities(features, what="features")
    if keep.shape != (batch, len(features)) or keep.is_floating_point():
        shapes = {n: tuple(x.shape) for n, x in features.items()}
        raise ValueError(
            f"keep must be bool [B, M] = [{batch}, {len(features)}], got {keep.dtype} "
            f"{tuple(keep.shape)} for features {shapes}"
        )
    out = {}
    for j, (name, x) in enumerate(features.items()):
        k = keep[:, j].to(device=x.device, dtype=torch.bool, non_blocking=True)
        out[name] = torch.where(k.reshape(-1, *([1] * (x.dim() - 1))), x, x.new_zeros(()))
    return out


class MaskedDataset(Dataset[tuple[Any, int, Tensor]]):
    """Wraps a map-style dataset for :class:`ValuationSampler`: ``ds[(n, bits)]`` is
    ``(dataset[n], n, keep)`` with ``keep`` bool ``[M]`` (bit ``j`` of ``bits``); ``ds[n]``
    keeps every modality. The default collate turns ``keep`` into ``[B, M]`` for
    :func:`apply_mask`, and ``n`` into the indices a valuation pass needs.

    Example:
        >>> import torch
        >>> from imbalance_losses import MaskedDataset
        >>> ds = MaskedDataset([("clip0", 1), ("clip1", 0)], num_modalities=2)
        >>> ds[(1, 2)]                      # sample 1 keeping modality 1 only
        (('clip1', 0), 1, tensor([False,  True]))
    """

    def __init__(self, dataset: Any, num_modalities: int) -> None:
        self.dataset = dataset
        self.masks = subset_masks(int_param("num_modalities", num_modalities, ge=2))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, entry: int | Entry) -> tuple[Any, int, Tensor]:
        n, bits = entry if isinstance(entry, tuple) else (entry, self.masks.shape[0] - 1)
        return self.dataset[n], n, self.masks[bits]


class ValuationSampler(Sampler[Entry]):
    """The epoch's plan, shuffled with ``seed + epoch`` and sharded as ``DistributedSampler``.

    Every rank permutes the same plan with the same generator, pads it by wrapping around to a
    multiple of ``num_replicas`` (or drops the tail with ``drop_last``) and takes entries
    ``rank, rank + R, ...``: the same length on every rank. Call :meth:`set_epoch` before each
    epoch. Yields :data:`Entry` tuples for :class:`MaskedDataset`. A new plan
    (:meth:`set_plan`) takes effect at the next iteration.

    Example:
        >>> import torch
        >>> from imbalance_losses import ValuationSampler
        >>> shards = [ValuationSampler(5, 2, num_replicas=2, rank=r, seed=0) for r in (0, 1)]
        >>> for s in shards:
        ...     s.set_plan(torch.tensor([0, 1, 2, 0, 2]), torch.tensor([3, 3, 3, 1, 2]))
        ...     s.set_epoch(1)
        >>> [len(s) for s in shards]        # 5 entries padded to 6, 3 per rank
        [3, 3]
        >>> sorted(set(list(shards[0]) + list(shards[1])))
        [(0, 1), (0, 3), (1, 3), (2, 2), (2, 3)]
    """

    def __init__(
        self, num_samples: int, num_modalities: int, *, num_replicas: int | None = None,
        rank: int | None = None, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
    ) -> None:  # fmt: skip
        self.num_modalities = int_param("num_modalities", num_modalities, ge=2)
        n = int_param("num_samples", num_samples, ge=1)
        self.num_replicas = int_param(
            "num_replicas", num_replicas if num_replicas is not None else world_size(), ge=1
        )
        rank = rank if rank is not None else (dist.get_rank() if is_distributed() else 0)
        if not 0 <= int_param("rank", rank) < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {rank}")
        self.rank, self.shuffle, self.drop_last = rank, bool(shuffle), bool(drop_last)
        self.seed = int_param("seed", seed)
        self.epoch, self._skip, self._yielded = 0, 0, 0
        self.set_plan(torch.arange(n), torch.full((n,), 2**self.num_modalities - 1))

    def set_plan(self, index: Tensor, bits: Tensor) -> None:
        """Replace the plan: ``index``, ``bits`` ``[L]`` integers (see :func:`resampling_plan`)."""
        if index.shape != bits.shape or index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"plan index {tuple(index.shape)} and bits {tuple(bits.shape)}")
        full = 2**self.num_modalities
        if bool((bits <= 0).any() | (bits >= full).any() | (index < 0).any()):
            raise ValueError(f"plan bits must be in [1, {full}) and indices >= 0")
        self.index, self.bits = index.long().cpu().clone(), bits.long().cpu().clone()

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order :meth:`__iter__` gives (a resumed epoch keeps its position)."""
        if int_param("epoch", epoch, ge=0) != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        size, r = self.index.numel(), self.num_replicas
        return (size - r) // r + 1 if self.drop_last and size % r else -(-size // r)

    def order(self) -> Tensor:
        """This epoch's global order (positions into the plan), before sharding: ``[len * R]``."""
        size, total = self.index.numel(), len(self) * self.num_replicas
        if self.shuffle:
            order = torch.randperm(
                size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
        else:
            order = torch.arange(size)
        return order.repeat(-(-total // size))[:total]

    def __iter__(self) -> Iterator[Entry]:
        positions = self.order()[self.rank :: self.num_replicas][self._skip :]
        entries = zip(self.index[positions].tolist(), self.bits[positions].tolist(), strict=True)
        self._yielded, self._skip = self._skip, 0
        for entry in entries:
            self._yielded += 1
            yield entry

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Plan, epoch and position; ``consumed``: this rank's entries the loop has trained on
        this epoch (default: those yielded, exact for a ``DataLoader`` without workers)."""
        done = self._yielded if consumed is None else int_param("consumed", consumed, ge=0)
        return {"index": self.index.clone(), "bits": self.bits.clone(), "epoch": self.epoch,
                "consumed": done, "seed": self.seed, "num_replicas": self.num_replicas}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; the next iteration of that epoch resumes after ``consumed`` entries."""
        if state["num_replicas"] != self.num_replicas:
            raise ValueError(
                f"the state was saved with {state['num_replicas']} replicas, this sampler has "
                f"{self.num_replicas}; resume with the same world size"
            )
        self.set_plan(state["index"], state["bits"])
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._skip = self._yielded = int(state["consumed"])


@dataclass(frozen=True)
class ValuationRecord(StepRecord):
    """What one valuation found (``SampleModalityValuation.last``), per modality.

    Example:
        >>> import torch
        >>> from imbalance_losses import ValuationRecord
        >>> rec = ValuationRecord(("a", "v"), torch.tensor([1.2, 0.6]), torch.tensor([3, 40]),
        ...                       torch.tensor(0.9), 5, 100, 143)
        >>> rec.to_dict()["copies/v"], rec.to_dict()["plan_size"]
        (40.0, 143.0)
    """

    mean_phi: Tensor
    """``mean_n phi_m`` over the training set (fair share 1)."""
    copies: Tensor
    """Entries added for the next epoch keeping modality ``m`` only."""
    accuracy: Tensor
    """Fused accuracy of the valuation pass."""
    epoch: int
    samples: int
    plan_size: int


class SampleModalityValuation:
    r"""Sample-level modality valuation and re-sampling (or its modality-level variant).

    $$\phi_m(x) = \text{Shapley value of } v(S) = |S|\,\mathbb{1}[\arg\max h(x_S) = y],
    \qquad \text{next epoch} = \{x_n\} \cup \{c(\phi_m(x_n)) \times x_n \text{ keeping } m\}$$

    Owns the data order: build the training loader from :attr:`sampler` and
    :meth:`dataset`, zero the dropped modalities with :func:`apply_mask`, and call
    :meth:`epoch_end` after every epoch.

    Args:
        head: the fusion head (a callable over the concatenation, a mapping of per-modality
            heads or a :class:`~imbalance_losses.MappingHead`; see
            :func:`~imbalance_losses.core.masking.masked_outputs`).
        modalities: names in the features' order (``M >= 2``).
        num_samples: ``N``, the training set's size (indices ``0 .. N-1``).
        warmup: value after epochs ``warmup - 1, warmup, ...`` (0-based; official 5), so the
            re-sampled sets start at epoch ``warmup``.
        level: ``"sample"`` (copies per sample) or ``"modality"`` (``K`` random samples, drawn
            with replacement, keeping the weakest modality; :func:`modality_level_extra`).
        alpha: the modality-level ``alpha``.
        bounds: the copy thresholds (:func:`copy_counts`).
        seed: the sampler's and the modality-level draws' seed.
        shuffle: shuffle each epoch's plan.
        drop_last: as ``DistributedSampler``'s.
        process_group: the ranks that gather the values and share the order (default: world).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from imbalance_losses import SampleModalityValuation
        >>> head = nn.Linear(4, 2)
        >>> val = SampleModalityValuation(head, ["a", "v"], num_samples=6, warmup=1)
        >>> feats = {"a": torch.randn(6, 2), "v": torch.randn(6, 2)}
        >>> batches = [(feats, torch.tensor([0, 1, 0, 1, 0, 1]), torch.arange(6))]
        >>> rec = val.epoch_end(0, batches)
        >>> rec.plan_size == 6 + int(rec.copies.sum()) == len(val.sampler)
        True
    """

    def __init__(
        self, head: Head, modalities: Sequence[str], num_samples: int, *, warmup: int = 5,
        level: Literal["sample", "modality"] = "sample", alpha: float = 1.0,
        bounds: tuple[float, float, float] = (-0.1, 0.4, 1.0), seed: int = 0,
        shuffle: bool = True, drop_last: bool = False, process_group: ProcessGroup | None = None,
    ) -> None:  # fmt: skip
        self.head = head
        self.modalities = modality_names(modalities)
        self.num_samples = int_param("num_samples", num_samples, ge=1)
        self.warmup = int_param("warmup", warmup, ge=1)
        if level not in ("sample", "modality"):
            raise ValueError(f"level must be 'sample' or 'modality', got {level!r}")
        self.level, self.alpha = level, real_param("alpha", alpha, ge=0.0)
        self.bounds = bounds
        copy_counts(torch.zeros(1), bounds)  # validates the bounds
        self.process_group = process_group
        rank = dist.get_rank(process_group) if is_distributed(process_group) else 0
        self.sampler = ValuationSampler(
            num_samples, len(self.modalities), num_replicas=world_size(process_group),
            rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last,
        )  # fmt: skip
        self.last: ValuationRecord | None = None

    def dataset(self, dataset: Any) -> MaskedDataset:
        """``dataset`` wrapped for :attr:`sampler` (items ``(sample, index, keep)``)."""
        if len(dataset) != self.num_samples:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, num_samples is {self.num_samples}"
            )
        return MaskedDataset(dataset, len(self.modalities))

    def value_indices(self) -> range:
        """This rank's share of ``0 .. N-1`` for the valuation loader (``sampler=``): no
        padding, no shuffle."""
        return range(self.sampler.rank, self.num_samples, self.sampler.num_replicas)

    def epoch_end(
        self, epoch: int, loader: Iterable[Any], *, forward: Callable[[Any], Batch] | None = None,
        model: torch.nn.Module | None = None,
    ) -> ValuationRecord | None:  # fmt: skip
        """After training epoch ``epoch`` (0-based): from ``warmup - 1`` on, :meth:`value` the
        training set and plan the next epoch; otherwise ``None`` (``loader`` is not read)."""
        if int_param("epoch", epoch, ge=0) < self.warmup - 1:
            return None
        return self.value(loader, forward=forward, model=model, epoch=epoch)

    @torch.no_grad()
    def value(
        self, loader: Iterable[Any], *, forward: Callable[[Any], Batch] | None = None,
        model: torch.nn.Module | None = None, epoch: int = 0,
    ) -> ValuationRecord:  # fmt: skip
        """Value every training sample and give :attr:`sampler` the next epoch's plan.

        ``loader`` (this rank's share, e.g. ``sampler=value_indices()``) yields batches;
        ``forward(batch)`` returns ``({m: features}, target [B], index [B])`` (default: the batch
        is that triple). ``model`` is in eval mode meanwhile (flags restored); nothing is
        trained. Under DDP the ranks' values are gathered, so every rank builds the same plan.
        """
        rows = self._gather(loader, forward, model)
        index = rows[:, 0]
        order = torch.argsort(index, stable=True)
        index, rows = index[order], rows[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]  # a sample valued twice (padding): its first value
        index, correct = index[first], rows[first, 1:].T
        if index.numel() != self.num_samples:  # sorted, distinct, in [0, N): all N or a gap
            missing = sorted(set(range(self.num_samples)) - set(index.tolist()))[:5]
            raise ValueError(
                f"SampleModalityValuation: {self.num_samples - index.numel()} of "
                f"{self.num_samples} samples were not valued (first missing: {missing}); the "
                f"loader must cover every index 0 .. {self.num_samples - 1} across the ranks"
            )
        phi = sample_shapley(correct)
        counts = self._counts(phi, epoch)
        self.sampler.set_plan(*resampling_plan(counts))
        self.last = ValuationRecord(
            self.modalities, phi.mean(1).float(), counts.sum(1), correct[-1].float().mean(),
            epoch, self.num_samples, self.sampler.index.numel(),
        )  # fmt: skip
        return self.last

    def _counts(self, phi: Tensor, epoch: int) -> Tensor:
        """Copies ``[M, N]``: per sample, or ``K`` random draws keeping the weakest modality."""
        if self.level == "sample":
            return copy_counts(phi, self.bounds)
        k, weakest = modality_level_extra(phi.mean(1), self.num_samples, self.alpha)
        g = torch.Generator().manual_seed(self.sampler.seed + epoch)
        counts = torch.zeros_like(phi, dtype=torch.long)
        counts[weakest] = torch.bincount(
            torch.randint(self.num_samples, (k,), generator=g), minlength=self.num_samples
        )
        return counts

    def _gather(
        self, loader: Iterable[Any], forward: Callable[[Any], Batch] | None,
        model: torch.nn.Module | None,
    ) -> Tensor:  # fmt: skip
        """Every rank's ``[n, 1 + 2^M]`` int64 rows (index, correct per subset) on the CPU."""
        group, param = self.process_group, _first_parameter(self.head)
        device = param.device if param is not None else torch.device("cpu")
        with gathering_together(device, group):
            with eval_mode(model):
                parts = []
                for batch in loader:
                    parts.append(self._rows(*(forward(batch) if forward is not None else batch)))
            rows = torch.cat(parts) if parts else torch.zeros(0, 1 + 2 ** len(self.modalities))
        return all_gather_rows(rows.long().to(device), group, message=OTHER_RANK_FAILED).cpu()

    def _rows(self, features: Mapping[str, Tensor], target: Tensor, index: Tensor) -> Tensor:
        """One batch's rows: the sample index, then whether each subset's prediction is right."""
        batch = check_modalities(features, what="valuation features")
        check_same_modalities(self.modalities, features, expected_what="modalities",
                              actual_what="valuation features")  # fmt: skip
        check_features(features, finite=True, what="valuation features")
        out = masked_outputs(self.head, features)
        if out.dim() != 3 or out.shape[1] != batch:
            raise ValueError(
                f"the head's masked outputs must be [2^M, B, C], got {tuple(out.shape)}"
            )
        check_finite(out, name="the head's masked outputs")  # argmax would read NaN as the top
        if target.is_floating_point():
            raise TypeError(f"valuation target must be class indices [B], got {target.dtype}")
        check_target(target, batch=batch, num_classes=out.shape[-1], name="valuation target")
        index = torch.as_tensor(index)
        if index.shape != (batch,) or index.is_floating_point():
            raise ValueError(f"index must be integer [B] = [{batch}], got {tuple(index.shape)}")
        if bool(((index < 0) | (index >= self.num_samples)).any()):
            raise ValueError(
                f"index values must be in [0, {self.num_samples}), got {index.tolist()}"
            )
        correct = out.argmax(-1) == target.to(out.device)
        return torch.cat([index.to(out.device)[:, None], correct.T.long()], 1)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampler's state (plan, epoch, position; see :meth:`ValuationSampler.state_dict`)
        and the last record."""
        last = None if self.last is None else dataclasses.asdict(self.last)
        return {"modalities": self.modalities, "sampler": self.sampler.state_dict(consumed),
                "last": last}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        check_same_modalities(self.modalities, dict.fromkeys(state["modalities"]),
                              expected_what="modalities", actual_what="state")  # fmt: skip
        self.sampler.load_state_dict(state["sampler"])
        last = state["last"]
        if last is not None:
            last = ValuationRecord(**{**last, "modalities": tuple(last["modalities"])})
        self.last = last
