"""On-the-fly prediction modulation (OPM): drop the dominant modalities' features, N-modal.

Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(arXiv 2410.11582; official code github GeWu-Lab/BML_TPAMI2024). OGM, the same paper's gradient
action, is :class:`~imbalance_losses.ModalityGradientModulator`; both act on one measurement,
:class:`~imbalance_losses.methods.modulation.ModalityScorer`.

Each training-mode call, on the features of the batch *before* they reach the fusion head:

1. **Scores and ratios** of this call's batch, before any drop (as the official code), from the
   unimodal logits ``z_m`` of the shared head, all-reduced over the ranks (one collective)::

       s_m = sum_b softmax(z_m)[b, y_b],      rho_m = min(s_m / mean_{k != m} s_k, R)

2. **Drop probability** of each modality (:func:`drop_probabilities`)::

       q_m = min(q_base (1 + lam tanh(rho_m - 1)), 1)    if rho_m > 1
       q_m = 0                                           otherwise

3. **Execute** the drop on this call at all with probability ``p_exe`` (one draw, the same on
   every rank).
4. **Masks**: per sample ``b`` and modality ``m`` independently, ``delta_bm ~ Bernoulli(q_m)``
   (1 = drop), and with ``theta = sum_m d_m q_m / sum_m d_m`` (``d_m`` the number of features per
   sample of modality ``m``; :func:`rescale_factor`)::

       x~_bm = x_bm (1 - delta_bm) / (1 - theta)

   Every kept feature is divided by ``1 - theta``, the expected kept fraction of the
   concatenated feature vector; the backward pass gets the same factor (autograd of a product).
5. **Samples with every modality dropped** are excluded from the loss: the call returns a keep
   mask ``[B]`` (:func:`kept_mean`).

Not executed, inside the warm-up, in eval mode, or under ``torch.no_grad``: the features are
returned as they are (identity).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..core.distributed import ProcessGroup, is_distributed
from ..core.records import StepRecord
from ..core.repeats import OpenTensors, repeated_call
from ..core.unimodal import Head
from ..core.unimodal import unimodal_logits as _unimodal_logits
from ..core.validation import (
    check_features,
    check_modalities,
    check_same_modalities,
    int_param,
    real_param,
)
from .modulation import Discrepancy, ModalityScorer

__all__ = [
    "ModalityPredictionModulator",
    "OPMOutput",
    "OPMRecord",
    "drop_probabilities",
    "kept_mean",
    "rescale_factor",
]

_MASK64 = (1 << 64) - 1


def drop_probabilities(ratios: Tensor, q_base: float, lam: float) -> Tensor:
    r"""Drop probability ``q_m`` of each modality from its discrepancy ratio ``rho_m``.

    $$q_m = \min\big(q_{\text{base}} (1 + \lambda \tanh(\operatorname{relu}(\rho_m - 1))), 1\big)
    \;\; (\rho_m > 1), \qquad q_m = 0 \;\; (\rho_m \le 1)$$

    ::

        q_m = min(q_base (1 + lam tanh(relu(rho_m - 1))), 1)    if rho_m > 1
        q_m = 0                                                 if rho_m <= 1

    Only the dominant modalities (score above the mean of the others; for two modalities the one
    with the larger score) are dropped; a tie (``rho = 1``) drops nothing. ``q`` jumps from 0 to
    ``q_base`` as ``rho_m`` passes 1 and grows to ``q_base (1 + lam)`` (clipped at 1) as
    ``rho_m -> inf``.

    At most ``M - 1`` modalities have ``rho_m > 1`` in exact arithmetic (they cannot all score
    above the mean of the others). In floating point, ``M > 2`` equal scores can round to ratios
    just above 1 for every modality (``q = 1`` everywhere would then make ``theta = 1``), so the
    modalities with the smallest ratio, the lowest score, are never dropped: ``q_m = 0`` also
    where ``rho_m = min_k rho_k``. This changes nothing in exact arithmetic (the lowest score's
    ratio is at most 1) and guarantees that some modality keeps ``q = 0``: ``theta < 1`` and no
    sample ever loses every modality.

    Args:
        ratios: ``[M]`` ratios ``rho_m`` (any floating dtype; NaN-free).
        q_base: base drop probability in ``[0, 1]``.
        lam: strength ``>= 0`` of the ratio term.

    Returns:
        ``[M]`` probabilities in ``[0, 1]``, dtype of ``ratios``.

    Example:
        >>> import torch
        >>> from imbalance_losses import drop_probabilities
        >>> drop_probabilities(torch.tensor([2.0, 0.5]), q_base=0.5, lam=0.5).round(decimals=4)
        tensor([0.6904, 0.0000])
    """
    q = (q_base * (1.0 + lam * torch.tanh(torch.relu(ratios - 1.0)))).clamp(0.0, 1.0)
    dominant = (ratios > 1.0) & (ratios > ratios.min())
    return torch.where(dominant, q, torch.zeros_like(q))


def rescale_factor(q: Tensor, widths: Tensor) -> Tensor:
    """Factor ``1 / (1 - theta)`` applied to every kept feature, 0-dim.

    ::

        theta = sum_m d_m q_m / sum_m d_m

    ``theta`` is the expected fraction of the concatenated feature vector that is dropped, so
    ``1 / (1 - theta)`` keeps its expected number of kept values. Finite whenever some modality
    has ``q_m < 1`` (always the case for :func:`drop_probabilities`).

    Args:
        q: ``[M]`` drop probabilities.
        widths: ``[M]`` features per sample ``d_m`` (or any positive weights proportional).

    Example:
        >>> import torch
        >>> from imbalance_losses import rescale_factor
        >>> rescale_factor(torch.tensor([0.5, 0.0]), widths=torch.tensor([512, 512]))  # 1/(1-1/4)
        tensor(1.3333)
    """
    w = widths.to(q.dtype)
    theta = (w * q).sum() / w.sum()
    return 1.0 / (1.0 - theta)


def kept_mean(losses: Tensor, keep: Tensor) -> Tensor:
    """Mean of per-sample ``losses`` ``[B]`` over the kept samples (``keep`` ``[B]`` bool).

    ``sum_{b kept} l_b / max(#kept, 1)``: a batch whose samples were all removed gives 0 (zero
    gradients), never ``0 / 0``; no host sync. The excluded samples' losses are *selected out*
    (``torch.where``), not multiplied by 0, so a NaN or inf loss of an excluded sample does not
    reach the mean (nor its gradient).

    Raises:
        TypeError: ``losses`` not floating point, or ``keep`` not bool.
        ValueError: ``losses`` or ``keep`` not 1-D (an already-reduced scalar loss, or
            ``[B, 1]`` losses that would broadcast against ``[B]`` to ``[B, B]``), of
            different lengths, or on different devices.

    Example:
        >>> import torch
        >>> from imbalance_losses import kept_mean
        >>> kept_mean(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([True, False, True]))
        tensor(3.5000)
        >>> kept_mean(torch.tensor([1.0]), torch.tensor([False]))      # nothing kept: 0, not NaN
        tensor(0.)
    """
    if not isinstance(losses, Tensor) or not isinstance(keep, Tensor):
        raise TypeError(
            f"kept_mean takes tensors, got losses: {type(losses).__name__}, keep: "
            f"{type(keep).__name__}"
        )
    if not losses.is_floating_point():
        raise TypeError(f"losses must be floating point, got {losses.dtype}")
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool mask [B] (OPMOutput.keep), got {keep.dtype}")
    if losses.dim() != 1 or keep.dim() != 1 or losses.shape[0] != keep.shape[0]:
        raise ValueError(
            f"kept_mean needs per-sample losses [B] and keep [B] of the same length, got "
            f"losses of shape {tuple(losses.shape)} and keep of shape {tuple(keep.shape)}; use "
            "reduction='none' and flatten [B, 1] losses (losses.squeeze(1))"
        )
    if keep.device != losses.device:
        raise ValueError(
            f"keep of shape {tuple(keep.shape)} is on {keep.device} but losses of shape "
            f"{tuple(losses.shape)} are on {losses.device}; put them on one device"
        )
    kept = torch.where(keep, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
    return kept.sum() / keep.sum().clamp_min(1).to(losses.dtype)


def _stream_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for draw ``stream`` of step ``step`` (splitmix64 finaliser, host ints)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + stream * 0xABC98388FB8FAC03) & (
        _MASK64
    )
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class OPMOutput(NamedTuple):
    """What :class:`ModalityPredictionModulator` returns.

    Example:
        >>> import torch
        >>> from imbalance_losses import ModalityPredictionModulator
        >>> opm = ModalityPredictionModulator(["audio", "visual"]).eval()   # evaluation: no drop
        >>> feats = {"audio": torch.ones(2, 3), "visual": torch.ones(2, 3)}
        >>> features, keep = opm(feats, torch.tensor([0, 1]), unimodal_logits=feats)
        >>> features["audio"] is feats["audio"], keep.tolist()
        (True, [True, True])
    """

    features: dict[str, Tensor]
    """The (masked and rescaled) features, same names, order, shapes and dtypes as the input."""
    keep: Tensor
    """``[B]`` bool: False for a sample whose every modality was dropped (exclude it from the
    loss, e.g. with :func:`kept_mean`)."""


@dataclass(frozen=True)
class OPMRecord(StepRecord):
    """What :class:`ModalityPredictionModulator` decided on its last counted call.

    Attributes:
        scores: ``[M]`` scores ``s_m`` of the call's batch over every rank (fp32).
        num_samples: scalar, the samples the scores were pooled over (``ignore_index`` left out).
        ratios: ``[M]`` capped ratios ``rho_m`` (the same as :class:`ModulationRecord`'s).
        drop_probabilities: ``[M]`` ``q_m`` from the formula (also in the warm-up, where they
            are not used).
        executed: 0-dim bool, whether the drop was executed on this call (False in the warm-up).
        rescale: 0-dim, the factor applied to the kept features (``1 / (1 - theta)`` when
            executed, else 1).
        dropped: ``[M]`` the fraction of this rank's samples whose modality ``m`` was dropped.
        removed: 0-dim, this rank's samples with every modality dropped (excluded from the loss).
        active: whether the call was past the warm-up.
        step: index of the call this record describes (0 for the first counted call).

    Example:
        >>> import torch
        >>> from imbalance_losses import ModalityPredictionModulator
        >>> opm = ModalityPredictionModulator(["audio", "visual"], q_base=0.5, lam=0.5, p_exe=1.0)
        >>> z = {"audio": torch.tensor([[4.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}
        >>> _ = opm({"audio": torch.ones(1, 2), "visual": torch.ones(1, 2)}, torch.tensor([0]),
        ...         unimodal_logits=z)
        >>> rec = opm.last
        >>> rec.drop_probabilities.round(decimals=3), rec.executed    # audio dominates: dropped
        (tensor([0.6870, 0.0000]), tensor(True))
    """

    scores: Tensor
    num_samples: Tensor
    ratios: Tensor
    drop_probabilities: Tensor
    executed: Tensor
    rescale: Tensor
    dropped: Tensor
    removed: Tensor
    active: bool
    step: int


class ModalityPredictionModulator(nn.Module):
    r"""OPM: in training, drop the dominant modalities' features per sample, before fusion.

    $$q_m = \begin{cases} \min\big(q_{\text{base}} (1 + \lambda \tanh(\rho_m - 1)), 1\big)
    & \rho_m > 1 \\ 0 & \rho_m \le 1 \end{cases}, \qquad
    x_m \leftarrow \frac{\mathrm{mask}_m\, x_m}{1 - \theta}, \qquad
    \theta = \frac{\sum_m d_m q_m}{\sum_m d_m}$$

    (each sample keeps modality $m$ with probability $1 - q_m$; the drop runs on a step with
    probability $p_{\text{exe}}$.)

    Two lines in a training loop (the module has no parameters; it is the identity in eval
    mode, so it can live inside the model)::

        opm = ModalityPredictionModulator(["audio", "visual"], head=model.fusion_head)
        feats = {"audio": model.audio_net(a), "visual": model.visual_net(v)}
        out = opm(feats, y)                              # masked, rescaled features + keep mask
        logits = model.fusion_head(torch.cat(list(out.features.values()), dim=1))
        loss = kept_mean(F.cross_entropy(logits, y, reduction="none"), out.keep)

    Which scores drive a call's drop: the scores of that call's own batch, computed from its
    features *before* the drop (the official code's order), all-reduced over the process group
    so that every rank uses the same ``q``. One counted call = one training-mode forward with at
    least one sample on some rank; under gradient accumulation every micro-batch is a call (the
    drop happens in the forward, so it cannot wait for the other micro-batches).

    Randomness comes from the module's own generator (never the global RNG), re-seeded on each
    call from ``(seed, step)`` for the execute draw, identical on every rank, and from
    ``(seed, step, rank)`` for the per-sample masks, different on each rank (the ranks hold
    different samples). A run is therefore reproducible from ``seed``, and a ``state_dict``
    (the step counter) resumes it bit for bit, even when only rank 0 saved it.

    Args:
        modalities: the modality names in the features' order (at least two, unique).
        head: the model's fusion head, used to compute the unimodal logits for the scores
            (:func:`~imbalance_losses.unimodal_logits`; not registered as a submodule). Without
            it, pass ``unimodal_logits=`` on each call.
        q_base: base drop probability in ``[0, 1]`` (official default 0.5).
        lam: strength ``lam >= 0`` of the ratio term (official default 0.5).
        p_exe: probability in ``[0, 1]`` that a call executes the drop at all (official 0.7).
        warmup_steps: counted calls, integer ``>= 0``, before any drop (official: 6 epochs,
            ``epoch <= 5``; pass ``6 * len(loader)``).
        max_ratio: cap ``R > 1`` of the ratios, as the gradient modulator's (default 100).
        ignore_index: class-index targets equal to it are left out of the scores (default
            ``-100``; ``None``: none). Their samples are still masked like the others.
        seed: seed of the module's generator (the same on every rank).
        process_group: the group the scores are all-reduced over (default: the world).

    Raises:
        TypeError: ``modalities`` not a sequence of strings, or a hyper-parameter of the wrong
            type (``warmup_steps=2.5``, a bool...).
        ValueError: fewer than two or repeated modalities, a probability outside ``[0, 1]``,
            ``lam < 0``, ``max_ratio <= 1``, non-finite values.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from imbalance_losses import ModalityPredictionModulator, kept_mean
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(4 + 6, 3)
        >>> opm = ModalityPredictionModulator(["audio", "visual"], head=head)
        >>> feats = {"audio": torch.randn(6, 4), "visual": torch.randn(6, 6)}
        >>> target = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> out = opm(feats, target)                # training mode: may drop the dominant modality
        >>> logits = head(torch.cat(list(out.features.values()), 1))
        >>> loss = kept_mean(F.cross_entropy(logits, target, reduction="none"), out.keep)
        >>> tuple(out.keep.shape), opm.last.modalities
        ((6,), ('audio', 'visual'))
    """

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        head: Head | None = None,
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        warmup_steps: int = 0,
        max_ratio: float = 100.0,
        ignore_index: int | None = -100,
        seed: int = 0,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if isinstance(modalities, str | Mapping) or not isinstance(modalities, Sequence):
            raise TypeError(
                "modalities must be a sequence of modality names in the features' order (e.g. "
                f"['audio', 'visual']), got {type(modalities).__name__}"
            )
        names = tuple(modalities)
        if not all(isinstance(m, str) for m in names):
            raise TypeError(f"modalities must be strings, got {names!r}")
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"modalities needs at least two distinct names, got {list(names)}")
        self.modalities = names
        self.q_base = real_param("q_base", q_base, ge=0.0, le=1.0)
        self.lam = real_param("lam", lam, ge=0.0)
        self.p_exe = real_param("p_exe", p_exe, ge=0.0, le=1.0)
        self.warmup_steps = int_param("warmup_steps", warmup_steps, ge=0)
        self.max_ratio = real_param("max_ratio", max_ratio, gt=1.0)
        self.ignore_index = (
            None if ignore_index is None else int_param("ignore_index", ignore_index)
        )
        self.seed = int_param("seed", seed)
        self.process_group = process_group
        self.__dict__["_head"] = head  # not a submodule: OPM owns no parameters
        self._scorer = ModalityScorer(
            names,
            max_ratio=self.max_ratio,
            ignore_index=self.ignore_index,
            process_group=process_group,
            owner="the OPM's",
        )
        self._step = 0
        self._generator: torch.Generator | None = None
        # (widths, device) -> widths [M] fp32 on device (one host-to-device copy per layout)
        self._widths: tuple[tuple[tuple[int, ...], torch.device], Tensor] | None = None
        self.last: OPMRecord | None = None
        self._open = OpenTensors()  # the open step's feature tensors (repeat detection)
        # the open step's decision: per-sample factors [B, M] (None: identity) and keep [B]
        self._open_out: tuple[Tensor | None, Tensor] | None = None

    @property
    def head(self) -> Head | None:
        """The fusion head used for the scores (``None`` if not given)."""
        head: Head | None = self.__dict__["_head"]
        return head

    @property
    def step_count(self) -> int:
        """Counted calls so far (training-mode forwards with a sample on some rank)."""
        return self._step

    # ------------------------------------------------------------------ the call

    def forward(
        self,
        features: Mapping[str, Tensor],
        target: Tensor,
        unimodal_logits: Mapping[str, Tensor] | None = None,
    ) -> OPMOutput:
        """Drop and rescale the features of this batch (training mode), else the identity.

        Args:
            features: ordered mapping modality -> floating features ``[B, ...]`` (batch first),
                the module's modalities in the same order; ``d_m`` is the number of features
                per sample (``x_m[0].numel()``).
            target: class indices ``[B]`` (``ignore_index`` allowed) or soft targets ``[B, C]``.
            unimodal_logits: optional ``{modality: [B, C]}`` for the scores; default: computed
                from ``head`` on the features under ``torch.no_grad``.

        Returns:
            :class:`OPMOutput` ``(features, keep)``. A step with no sample on any rank, the
            warm-up, eval mode and gradient-free calls return the input tensors and an
            all-True ``keep`` (and the warm-up still counts the call and records the scores).

        Raises:
            ValueError: modalities that differ from the module's (names or order), batch sizes
                that differ, bad targets, non-finite logits, neither ``head`` nor
                ``unimodal_logits``; or (``RuntimeError``) the input failed on another rank in
                this same call.
            TypeError: non-floating-point features or logits, a non-mapping.
        """
        if not self.training or not torch.is_grad_enabled():
            batch = check_modalities(features)
            if self.training:
                warnings.warn(
                    "ModalityPredictionModulator is in training mode but gradients are disabled "
                    "(torch.no_grad or inference_mode): nothing can be trained, so it acts as in "
                    "eval mode (no drop, no collective, no step counted)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            device = next(iter(features.values())).device
            return OPMOutput(dict(features), torch.ones(batch, dtype=torch.bool, device=device))

        device = self._device_of(features)
        try:
            repeat, mixed = self._repeat(features), None
        except ValueError as err:
            repeat, mixed = False, err
        if repeat and self._open_out is not None:  # same tensors in the open step: same drop
            check_modalities(features)
            factors, keep = self._open_out
            return OPMOutput(self._masked(features, factors), keep)
        with self._scorer.failing_together(device):
            if mixed is not None:
                raise mixed
            batch = check_modalities(features)
            check_same_modalities(
                self.modalities, features, expected_what="the OPM's", actual_what="features"
            )
            check_features(features, finite=True, by="the OPM's fusion head")
            if unimodal_logits is None:
                if self.head is None:
                    raise ValueError(
                        "ModalityPredictionModulator needs unimodal logits for its scores: "
                        "construct it with head=model.fusion_head or pass unimodal_logits="
                    )
                with torch.no_grad():
                    unimodal_logits = _unimodal_logits(self.head, features)
            zb = check_modalities(unimodal_logits, what="unimodal_logits")
            if zb != batch:
                raise ValueError(
                    f"unimodal_logits have batch {zb} but the features have batch {batch}"
                )
            for name, z in unimodal_logits.items():
                if z.device != device:
                    raise ValueError(
                        f"unimodal_logits[{name!r}] of shape {tuple(z.shape)} are on {z.device} "
                        f"but the features are on {device}; put the logits on the features' "
                        "device"
                    )
            self._scorer.observe(unimodal_logits, target)
        found = self._scorer.decide(device, missing="nothing observed")  # one all-reduce
        keep_all = torch.ones(batch, dtype=torch.bool, device=device)
        self._open_out = (None, keep_all)
        for x in features.values():
            if x.requires_grad:
                self._open.add_until_backward(x)
        if found is None:  # no sample on any rank: nothing decided, nothing counted
            return OPMOutput(dict(features), keep_all)
        q = drop_probabilities(found.ratios, self.q_base, self.lam)
        step, active = self._step, self._step >= self.warmup_steps
        self._step += 1
        if not active:
            self.last = self._record(found, q, step, active=False, device=device)
            return OPMOutput(dict(features), keep_all)

        gen = self._get_generator(device)
        gen.manual_seed(_stream_seed(self.seed, step, 0))  # the same on every rank
        execute = torch.rand((), generator=gen, device=device) < self.p_exe
        gen.manual_seed(_stream_seed(self.seed, step, 1 + self._rank()))  # this rank's samples
        size = len(self.modalities)
        draws = torch.rand(batch, size, generator=gen, device=device)
        dropped = (draws < q) & execute  # [B, M]
        widths = self._widths_on(features, device)
        factor = rescale_factor(q, widths)
        scale = torch.where(execute, factor, factor.new_ones(()))
        factors = (~dropped).float() * scale  # [B, M]
        out = self._masked(features, factors)
        keep = (~dropped).any(1)
        self._open_out = (factors, keep)
        self.last = OPMRecord(
            modalities=self.modalities,
            scores=found.scores,
            num_samples=found.num_samples,
            ratios=found.ratios,
            drop_probabilities=q,
            executed=execute,
            rescale=scale,
            dropped=dropped.sum(0).float() / max(batch, 1),
            removed=(~keep).sum(),
            active=True,
            step=step,
        )
        return OPMOutput(out, keep)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _masked(features: Mapping[str, Tensor], factors: Tensor | None) -> dict[str, Tensor]:
        """``x_m * factors[:, m]`` per sample (``None``: the features as they are)."""
        if factors is None:
            return dict(features)
        return {
            name: x * factors[:, i].reshape((x.shape[0],) + (1,) * (x.dim() - 1)).to(x.dtype)
            for i, (name, x) in enumerate(features.items())
        }

    def _repeat(self, features: object) -> bool:
        """Whether this call repeats the open step's: every feature that requires grad was
        passed in a call whose backward has not reached it (the same tensors, by identity)."""
        return repeated_call(
            features,
            self._open.pending,
            grad_only=True,
            who="ModalityPredictionModulator",
            what="whose backward has not run",
            effect="the same drop",
        )

    def _record(
        self, found: Discrepancy, q: Tensor, step: int, *, active: bool, device: torch.device
    ) -> OPMRecord:
        return OPMRecord(
            modalities=self.modalities,
            scores=found.scores,
            num_samples=found.num_samples,
            ratios=found.ratios,
            drop_probabilities=q,
            executed=torch.zeros((), dtype=torch.bool, device=device),
            rescale=torch.ones((), device=device),
            dropped=torch.zeros(len(self.modalities), device=device),
            removed=torch.zeros((), dtype=torch.long, device=device),
            active=active,
            step=step,
        )

    @staticmethod
    def _device_of(features: Mapping[str, Tensor]) -> torch.device:
        if isinstance(features, Mapping):
            for x in features.values():
                if isinstance(x, Tensor):
                    return x.device
        return torch.device("cpu")

    def _rank(self) -> int:
        if not is_distributed(self.process_group):
            return 0
        return int(torch.distributed.get_rank(group=self.process_group))

    def _widths_on(self, features: Mapping[str, Tensor], device: torch.device) -> Tensor:
        """``d_m`` (features per sample) as an fp32 ``[M]`` tensor on ``device``, cached."""
        widths = tuple(math.prod(x.shape[1:]) for x in features.values())
        key = (widths, device)
        if self._widths is None or self._widths[0] != key:
            self._widths = (key, torch.tensor(widths, dtype=torch.float32).to(device))
        return self._widths[1]

    def _get_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        return self._generator

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict[str, Any]:
        """Step counter and seed (the generator is re-seeded from them on every call)."""
        return {"step": self._step, "seed": self.seed, "modalities": self.modalities}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        if tuple(state["modalities"]) != self.modalities:
            raise ValueError(
                f"the OPM state is for modalities {list(state['modalities'])}, this module has "
                f"{list(self.modalities)}"
            )
        self._step = int(state["step"])
        self.seed = int(state["seed"])
        self.last = None

    def extra_repr(self) -> str:
        return (
            f"modalities={list(self.modalities)}, q_base={self.q_base}, lam={self.lam}, "
            f"p_exe={self.p_exe}, warmup_steps={self.warmup_steps}, seed={self.seed}"
        )
