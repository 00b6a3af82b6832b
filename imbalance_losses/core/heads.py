"""Classifier heads that grow during training: pre-allocated, switched on one at a time.

A method that gives a modality more classifier heads while it trains (sustained boosting adds
one to the weakest modality at each check) cannot create parameters on the fly: the optimiser,
DDP and every checkpoint hold the parameter set built at the start. :class:`GrowingHeads`
therefore allocates every head up front and switches them on in place:

* modality ``m`` (mapping order) owns ``max_heads`` first layers, each its own parameter
  (``head_weight[m][j]`` ``[hidden, D_m]``, ``head_bias[m][j]`` ``[hidden]``), zero while off;
  head ``j`` is ``z_mj = output_layer(relu(u_m W_mj^T + b_mj))`` with **one** output layer
  shared by every head; ``head_counts`` (a buffer) says how many are on;
* the active heads of a modality run as one matmul (their weights concatenated) and the shared
  output layer once over all of them (:meth:`GrowingHeads._head_tensors`);
* every inactive head is attached to the loss through an empty slice
  (:meth:`GrowingHeads._inactive_zero`): it is in the graph (DDP never sees an unused
  parameter) with a gradient of exactly zero, so it stays exactly zero under weight decay,
  momentum and Adam;
* switching a head on (:meth:`GrowingHeads.add_head`) draws it in place (Xavier-normal weight,
  zero bias) from the module's own seeded generator, identical on every rank and saved in the
  owner's state, and drops its state in the optimisers bound with
  :meth:`GrowingHeads.attach_optimizer`, so Adam / AdamW start it at step 0 exactly as a
  freshly created parameter;
* checkpoints of the stacked layout of versions up to 0.1 (``head_weight.i``
  ``[max_heads, hidden, D]``) load, and a load refreshes the host mirror of ``head_counts``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_features, check_modalities, int_param

__all__ = ["GrowingHeads", "head_widths"]


def head_widths(in_features: object) -> dict[str, int]:
    """Validated ``{modality: D_m}``: an ordered mapping of at least two positive widths."""
    if not isinstance(in_features, Mapping) or len(in_features) < 2:
        raise ValueError(
            "in_features must be a mapping modality -> feature width with at least two "
            f"modalities, got {in_features!r}"
        )
    return {
        name: int_param(f"in_features[{name!r}] (the width D of features [B, D])", d, ge=1)
        for name, d in in_features.items()
    }


class GrowingHeads(nn.Module):
    """Mixin of a module that owns per-modality classifier heads switched on during training.

    The owner calls :meth:`_build_heads` in its ``__init__`` (after ``nn.Module.__init__``); it
    sets ``modalities``, ``in_features``, ``hidden``, ``num_classes``, ``max_heads``, the
    parameters, the ``head_counts`` buffer and the generator (``_generator``, whose state the
    owner saves). It sets ``_trained`` once a training step ran (then switching a head on with no
    optimiser bound warns, since the optimiser may hold state for the zero head).
    """

    head_counts: Tensor

    def _build_heads(
        self,
        widths: dict[str, int],
        hidden: int,
        num_classes: int,
        max_heads: int,
        *,
        output_layer: nn.Module | None,
        seed: int,
    ) -> None:
        """Allocate every head (one on per modality) and the shared output layer from ``seed``."""
        self.modalities: tuple[str, ...] = tuple(widths)
        self.in_features: dict[str, int] = widths
        self.hidden, self.num_classes, self.max_heads = hidden, num_classes, max_heads
        self._generator = torch.Generator().manual_seed(seed)
        self.head_weight, self.head_bias = (
            nn.ModuleList(
                nn.ParameterList(nn.Parameter(torch.zeros(*shape(d))) for _ in range(max_heads))
                for d in widths.values()
            )
            for shape in (lambda d: (hidden, d), lambda d: (hidden,))
        )
        if output_layer is None:
            output_layer = nn.Linear(hidden, num_classes)
            # nn.Linear's own default (uniform +-1/sqrt(hidden)), drawn from our generator.
            bound = 1.0 / math.sqrt(hidden)
            with torch.no_grad():
                for p in (output_layer.weight, output_layer.bias):
                    p.copy_(torch.rand(p.shape, generator=self._generator) * 2 * bound - bound)
        self.output_layer = output_layer
        self.register_buffer("head_counts", torch.zeros(len(widths), dtype=torch.long))
        self._counts: list[int] = [0] * len(widths)  # host mirror of head_counts
        self._optimizers: list[weakref.ref[torch.optim.Optimizer]] = []
        self._warned_unbound = False
        self._trained = False  # a training step ran (optimiser state may exist)
        for i in range(len(widths)):
            self._activate(i, initial=True)
        self._register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            _split_stacked_heads, with_module=True
        )
        self.register_load_state_dict_post_hook(_refresh_counts)  # type: ignore[no-untyped-call]

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and deep copies drop the optimiser binding (weak references)."""
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state["_optimizers"] = []
        return state

    @property
    def num_heads(self) -> dict[str, int]:
        """Active heads per modality, in mapping order."""
        return dict(zip(self.modalities, self._counts, strict=True))

    def _head_params(self, index: int, j: int) -> tuple[nn.Parameter, nn.Parameter]:
        weight = cast(nn.ParameterList, self.head_weight[index])
        return weight[j], cast(nn.ParameterList, self.head_bias[index])[j]

    def _all_head_params(self) -> Iterator[nn.Parameter]:
        for i in range(len(self.modalities)):
            for j in range(self.max_heads):
                yield from self._head_params(i, j)

    def attach_optimizer(self, *optimizers: torch.optim.Optimizer) -> None:
        """Bind the optimiser(s) holding the heads, so a head switched on starts fresh.

        When :meth:`add_head` (or the owner's decision) switches a head on, its weight's and
        bias's state is dropped from every bound optimiser; Adam / AdamW then start it lazily at
        step 0 (zero moments, bias correction of step 1), exactly as a freshly created parameter,
        and SGD with momentum starts a fresh momentum buffer. Without a binding an inactive head,
        which received exact zero gradients, keeps the state those built: SGD without dampening
        is exact anyway, but Adam's step counter is already ``t``, so the new head's first
        updates are off by ``(1 - beta1) / sqrt(1 - beta2) * sqrt(1 - beta2^t) / (1 - beta1^t)``
        (~3x for a large ``t``).

        Weak references are kept (the module does not keep an optimiser alive; pickling and
        ``copy.deepcopy`` drop them: bind the copy to its own optimiser). Call again to re-bind
        (e.g. after building a new optimiser); each call replaces the previous binding. Do the
        same on every rank.

        Raises:
            TypeError: an argument is not a ``torch.optim.Optimizer``.
            ValueError: some head parameters are in none of the optimisers (build them with
                the module's ``parameters()``).
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
                f"{missing} of the {len(heads)} head parameters of {type(self).__name__} are in "
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
                f"{type(self).__name__} switched on a head of {self.modalities[index]!r} but no "
                "optimizer is bound: call boost.attach_optimizer(opt) once after building the "
                "optimizer so that a new head starts with fresh optimizer state (under Adam/AdamW "
                "its first updates are otherwise ~3x too large; SGD without dampening is exact "
                "either way). Shown once per module",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def add_head(self, modality: str) -> int:
        """Give ``modality`` one more head now; return its new number of heads.

        Under DDP call it on every rank at the same point.

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
                f"max_heads when constructing {type(self).__name__} to allow more"
            )
        self._activate(index, stacklevel=4)
        return self._counts[index]

    def _check_features(self, features: Mapping[str, Tensor]) -> int:
        """Validate ``features`` for the heads (widths, dtype, device, finite); the batch size."""
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
            w: Tensor
            b: Tensor
            w, b = self._head_params(i, 0)
            if n > 1:
                params = [self._head_params(i, j) for j in range(n)]
                w, b = torch.cat([p[0] for p in params]), torch.cat([p[1] for p in params])
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


def _split_stacked_heads(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
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
    assert isinstance(module, GrowingHeads)
    counts = [int(c) for c in module.head_counts.tolist()]
    if any(c < 1 or c > module.max_heads for c in counts):
        named = dict(zip(module.modalities, counts, strict=True))
        raise ValueError(
            f"loaded head counts {named} must lie in [1, max_heads={module.max_heads}]"
        )
    module._counts = counts
