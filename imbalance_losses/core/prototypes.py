"""A prototype store: per-class sums of per-modality features, pooled over batches and ranks.

Prototype methods (PMR, nearest-class-mean classifiers, prototype alignment losses) need, for
each modality ``m`` and class ``k``, the class mean of the features over a sample of the data::

    c_{m,k} = (1 / N_k) sum_{b : y_b = k} x_{m,b}          N_k = #{b : y_b = k}

computed batch by batch, with no gradient, often on several ranks. :class:`PrototypeStore`
keeps the class sums ``[C, D_m]`` and class counts ``[C]`` on the device (one ``index_add_`` per
modality and batch, no Python loop over samples or classes, no host sync) and pools them over
the ranks of a process group with **one** all-reduce in :meth:`PrototypeStore.pool`, so the means
are exactly those of one process over the global sample. Sums and counts are fp64 (fp32 on
devices without fp64), whatever the precision of the features.

:func:`blend_prototypes` is the momentum update ``c <- (1 - mu) c_new + mu c_old`` in which a
class absent from the sample keeps its previous prototype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .distributed import ProcessGroup, all_reduce_sum, is_distributed
from .dtypes import wide_dtype
from .running import OTHER_RANK_FAILED
from .validation import check_features, check_modalities, check_target

__all__ = ["ClassMeans", "PrototypeStore", "Prototypes", "blend_prototypes"]


class ClassMeans(NamedTuple):
    """What :meth:`PrototypeStore.pool` returns (global over the ranks of the group)."""

    means: dict[str, Tensor]
    """``{modality: [C, D_m]}`` fp32 class means; rows of absent classes are 0."""
    counts: Tensor
    """``[C]`` number of samples of each class (fp64; fp32 on devices without fp64)."""
    present: Tensor
    """``[C]`` bool, ``counts > 0``."""


class PrototypeStore:
    """Class sums ``{m: [C, D_m]}`` and class counts ``[C]`` since the last :meth:`pool`.

    Args:
        num_classes: ``C``.
        dims: ``{modality: D_m}``, in the order every later mapping must have.
    """

    def __init__(self, num_classes: int, dims: Mapping[str, int]) -> None:
        self.num_classes = int(num_classes)
        self.dims = dict(dims)
        self._sums: dict[str, Tensor] | None = None
        self._counts: Tensor | None = None
        self.failed = False  # a batch failed validation on this rank since the last pool

    @property
    def empty(self) -> bool:
        """True when nothing was added since the last pool or reset."""
        return self._counts is None

    def _zeros(self, device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
        dtype = wide_dtype(device)
        sums = {m: torch.zeros(self.num_classes, d, dtype=dtype, device=device)
                for m, d in self.dims.items()}  # fmt: skip
        return sums, torch.zeros(self.num_classes, dtype=dtype, device=device)

    def check(
        self,
        features: Mapping[str, Tensor],
        target: Tensor,
        device: torch.device | None = None,
        ignore_index: int | None = None,
        by: str = "the prototypes",
    ) -> int:
        """Validate a batch for this store and return its batch size ``B``.

        ``features`` must have exactly the store's modalities, in order, each floating point
        ``[B, D_m]`` on ``device``; ``target`` class indices ``[B]`` in ``[0, C)`` or equal to
        ``ignore_index``.

        Raises:
            ValueError: missing / extra / reordered modalities, a wrong width or batch size (the
                message names the modality and both shapes), targets out of range.
            TypeError: non-floating features, floating-point (soft) targets.
        """
        size = check_modalities(features, min_ndim=2)
        check_features(features, widths=self.dims, device=device, finite=True, by=by)
        if target.is_floating_point():
            raise TypeError(
                f"prototypes need class-index targets [B], got {target.dtype} of shape "
                f"{tuple(target.shape)} (soft targets are not supported)"
            )
        check_target(target, batch=size, num_classes=self.num_classes, ignore_index=ignore_index)
        return size

    @torch.no_grad()
    def add(
        self, features: Mapping[str, Tensor], target: Tensor, mask: Tensor | None = None
    ) -> None:
        """Add a batch: ``features[m]`` ``[B, D_m]``, class indices ``target`` ``[B]``.

        ``mask`` (bool ``[B]``) leaves samples out (an ``ignore_index`` target, say); targets
        of left-out samples may be any value. Validation is the caller's (the shapes and class
        range are assumed checked). Detached: never part of an autograd graph. The sums live
        on the features' device; a target elsewhere (a CPU target from the loader beside features
        on an accelerator) is moved there.
        """
        device = next(iter(features.values())).device
        target = target.to(device)
        mask = None if mask is None else mask.to(device)
        if self._sums is None or self._counts is None:
            self._sums, self._counts = self._zeros(device)
        dtype = self._counts.dtype
        keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask
        index = torch.where(keep, target, 0).long()
        weight = keep.to(dtype)
        self._counts.index_add_(0, index, weight)
        for m, x in features.items():
            rows = x.detach().to(dtype) * weight[:, None]
            self._sums[m].index_add_(0, index, rows)

    def pool(self, device: torch.device, group: ProcessGroup | None = None) -> ClassMeans:
        """Class means over everything added on every rank of ``group`` (one all-reduce); reset.

        A rank that added nothing joins with zeros on ``device`` (where the other ranks pool).
        Under DDP the all-reduce also carries :attr:`failed`: if a batch failed validation on any
        rank since the last pool, every rank raises here (nothing is computed anywhere).

        Raises:
            RuntimeError: under DDP, a batch failed validation on some rank since the last pool.
        """
        if self._sums is None or self._counts is None:
            sums, counts = self._zeros(device)
        else:
            sums, counts = self._sums, self._counts
        flag = counts.new_zeros(1)
        if self.failed:
            flag.fill_(1.0)
        flat = torch.cat([*(s.reshape(-1) for s in sums.values()), counts, flag])
        flat = all_reduce_sum(flat, group)
        failed_here = self.failed
        self.reset()
        if is_distributed(group) and float(flat[-1]) > 0:  # once per computation, not per step
            raise RuntimeError(
                "a prototype batch failed validation on this rank since the last computation; "
                "no prototype was computed on any rank"
                if failed_here
                else OTHER_RANK_FAILED + " (a prototype batch since the last computation)"
            )
        flat = flat[:-1]
        counts = flat[-self.num_classes :]
        means, offset = {}, 0
        for m, d in self.dims.items():
            total = flat[offset : offset + self.num_classes * d].reshape(self.num_classes, d)
            means[m] = (total / counts.clamp_min(1.0)[:, None]).float()
            offset += self.num_classes * d
        return ClassMeans(means=means, counts=counts, present=counts > 0)

    def reset(self) -> None:
        """Forget everything added so far."""
        self._sums = self._counts = None
        self.failed = False

    def state_dict(self) -> dict[str, Any]:
        """Copies of the local (not yet pooled) class sums and counts."""
        return {
            "sums": None if self._sums is None else {m: s.clone() for m, s in self._sums.items()},
            "counts": None if self._counts is None else self._counts.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore (copies of) what :meth:`state_dict` returned."""
        sums, counts = state["sums"], state["counts"]
        self._sums = None if sums is None else {m: s.detach().clone() for m, s in sums.items()}
        self._counts = None if counts is None else counts.detach().clone()


def blend_prototypes(
    old: Tensor, new: Tensor, present: Tensor, known: Tensor, momentum: float
) -> Tensor:
    """Momentum update of prototypes ``[C, D]``, row by row (no loop)::

        c_k <- (1 - mu) c_new_k + mu c_old_k     class k in the sample and known before
        c_k <- c_new_k                           class k in the sample, first time
        c_k <- c_old_k                           class k absent from the sample

    Args:
        old, new: ``[C, D]`` previous prototypes and the class means of the new sample.
        present: ``[C]`` bool, class k had samples in the new sample.
        known: ``[C]`` bool, class k had a prototype before.
        momentum: ``mu`` in ``[0, 1]``; 0 replaces the prototypes by the new means.
    """
    blended = torch.lerp(new, old.to(new), momentum)
    fresh = torch.where(known[:, None], blended, new)
    return torch.where(present[:, None], fresh, old.to(new))


class Prototypes(nn.Module):
    """Class prototypes ``{m: [C, D_m]}`` as buffers, fed batch by batch, pooled over ranks.

    ``add(features, target)`` per batch (no grad), then ``compute()``: one all-reduce of the class
    sums and counts, then :func:`blend_prototypes` with ``momentum``. ``known [C]`` marks classes
    that have a prototype; ``updates`` counts computations (0: no prototypes yet). The buffers,
    ``updates`` and the pending sums are in ``state_dict()``.
    """

    known: Tensor

    def __init__(
        self, num_classes: int, dims: Mapping[str, int], momentum: float, ignore_index: int | None
    ) -> None:
        super().__init__()
        self.momentum, self.ignore_index = momentum, ignore_index
        self.store = PrototypeStore(num_classes, dims)
        for i, d in enumerate(dims.values()):
            self.register_buffer(f"prototypes_{i}", torch.zeros(num_classes, d))
        self.register_buffer("known", torch.zeros(num_classes, dtype=torch.bool))
        self.updates = 0

    def as_dict(self) -> dict[str, Tensor]:
        """``{modality: [C, D_m]}`` (the buffers themselves)."""
        return {m: getattr(self, f"prototypes_{i}") for i, m in enumerate(self.store.dims)}

    def check(self, features: Mapping[str, Tensor], target: Tensor, by: str) -> int:
        """:meth:`PrototypeStore.check` on this module's device; returns the batch size."""
        return self.store.check(features, target, self.known.device, self.ignore_index, by)

    @torch.no_grad()
    def add(
        self, features: Mapping[str, Tensor], target: Tensor, by: str = "the prototypes"
    ) -> None:
        """Validate and add one batch's class sums (``ignore_index`` targets left out).

        A batch that fails validation raises here and marks the store, so that under DDP the
        next :meth:`compute` raises on every rank (call it on every rank all the same).
        """
        try:
            self.check(features, target, by)
        except Exception:
            self.store.failed = True
            raise
        mask = None if self.ignore_index is None else target != self.ignore_index
        self.store.add(features, target, mask)

    @torch.no_grad()
    def compute(self, group: ProcessGroup | None = None) -> Tensor:
        """Pool over ranks (every rank must call), blend, and return ``present [C]``.

        Raises:
            RuntimeError: no sample on any rank since the last computation.
        """
        pooled = self.store.pool(self.known.device, group)
        if not bool(pooled.present.any()):  # once per schedule, outside the training step
            raise RuntimeError("compute_prototypes: no samples were accumulated on any rank")
        for m, proto in self.as_dict().items():
            new = pooled.means[m]
            proto.copy_(blend_prototypes(proto, new, pooled.present, self.known, self.momentum))
        self.known |= pooled.present
        self.updates += 1
        return pooled.present

    def update(
        self, batches: Iterable[tuple[Mapping[str, Tensor], Tensor]], group: ProcessGroup | None
    ) -> Tensor:
        """:meth:`add` every ``(features, target)`` batch (no grad), then :meth:`compute`.

        If a batch fails validation, this rank still joins the computation's all-reduce (with
        its failure flag) before raising, so under DDP every rank raises in the same call.
        """
        try:
            with torch.no_grad():
                for features, target in batches:
                    self.add(features, target)
        except Exception:
            if is_distributed(group):
                try:
                    self.store.pool(self.known.device, group)
                except RuntimeError:
                    pass  # the failure flag we sent; raise the batch's own error below
            raise
        return self.compute(group)

    def get_extra_state(self) -> dict[str, Any]:
        """The computation count and the pending (not yet computed) class sums."""
        return {"updates": self.updates, "store": self.store.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned."""
        self.updates = int(state["updates"])
        self.store.load_state_dict(state["store"])
