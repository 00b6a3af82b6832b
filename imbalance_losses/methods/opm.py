"""On-the-fly prediction modulation (OPM): drop the dominant modalities' features, N-modal.

Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(arXiv 2410.11582; official code github GeWu-Lab/BML_TPAMI2024). OGM, the same paper's gradient
action, is :class:`~imbalance_losses.ModalityGradientModulator`; both act on one measurement,
computed by the same functions (:func:`~imbalance_losses.core.stats.true_class_probability`,
:func:`~imbalance_losses.methods.modulation.capped_ratio`).

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
   (:func:`drop_factors`).
5. **Samples with every modality dropped** are excluded from the loss: the call returns a keep
   mask ``[B]`` (:func:`kept_mean`).

Not executed, inside the warm-up, in eval mode, or under ``torch.no_grad``: the features are
returned as they are (identity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.distributed import ProcessGroup, is_distributed, stream_seed
from ..core.records import StepRecord
from ..core.remedy import Remedy
from ..core.running import Pooled
from ..core.scoring import _capped_ratio_of_sums
from ..core.stats import count_of, counted, true_class_scores
from ..core.unimodal import Head
from ..core.unimodal import unimodal_logits as _unimodal_logits
from ..core.validation import (
    check_features,
    check_modalities,
    check_same_modalities,
    check_scored_logits,
    int_param,
    modality_names,
    real_param,
)

__all__ = [
    "ModalityPredictionModulator",
    "OPMOutput",
    "OPMRecord",
    "drop_factors",
    "drop_probabilities",
    "kept_mean",
    "rescale_factor",
]


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
    # relu dropped: it only changes modalities with rho <= 1, zeroed below
    q = (q_base + (q_base * lam) * torch.tanh(ratios - 1.0)).clamp(0.0, 1.0)
    dominant = ratios > ratios.min().clamp_min(1.0)  # rho > 1 and rho > min_k rho_k
    return q * dominant  # q >= 0 is finite: q * False is +0.0, as torch.where(.., 0) gives


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
    return _rescale(q, w, w.sum())


def _rescale(q: Tensor, widths: Tensor, width_sum: Tensor) -> Tensor:
    """:func:`rescale_factor` given ``widths`` in ``q``'s dtype and their sum:
    ``sum_m d_m / (sum_m d_m - sum_m d_m q_m) = 1 / (1 - theta)``."""
    return width_sum / (width_sum - widths @ q)


def drop_factors(
    q: Tensor, widths: Tensor, draws: Tensor, execute: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One call's drop from its uniform draws: ``(factors [B, M], dropped [B, M], scale)``.

    ::

        delta_bm = [u_bm < q_m] and execute                 (dropped, bool)
        scale    = 1 / (1 - theta) if execute, else 1       (theta: :func:`rescale_factor`)
        f_bm     = (1 - delta_bm) * scale                   (x~_bm = f_bm x_bm)

    ``u_bm`` are ``draws`` in ``[0, 1)``, one per sample and modality, so each sample drops
    modality ``m`` with probability ``q_m`` independently; ``execute`` is the 0-dim bool draw of
    the whole call (False: every factor is 1). A sample is kept in the loss when some modality
    survives: ``keep_b = any_m not delta_bm``.

    Args:
        q: ``[M]`` drop probabilities (:func:`drop_probabilities`).
        widths: ``[M]`` features per sample ``d_m``.
        draws: ``[B, M]`` uniform draws.
        execute: 0-dim bool.

    Example:
        >>> import torch
        >>> from imbalance_losses import drop_factors
        >>> q, widths = torch.tensor([0.5, 0.0]), torch.tensor([2, 2])    # theta = 1/4
        >>> draws = torch.tensor([[0.2, 0.9], [0.7, 0.1]])
        >>> factors, dropped, scale = drop_factors(q, widths, draws, torch.tensor(True))
        >>> factors, dropped.tolist(), scale
        (tensor([[0.0000, 1.3333],
                [1.3333, 1.3333]]), [[True, False], [False, False]], tensor(1.3333))
    """
    w = widths.to(q.dtype)
    return _drop_factors(q, w, w.sum(), draws, execute)


def _drop_factors(
    q: Tensor, widths: Tensor, width_sum: Tensor, draws: Tensor, execute: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`drop_factors` given ``widths`` in ``q``'s dtype and their sum."""
    q = q * execute  # not executed: q = 0, nothing dropped, theta = 0, scale exactly 1
    dropped = draws < q
    scale = _rescale(q, widths, width_sum)
    return (~dropped) * scale.float(), dropped, scale  # fp32 factors, as documented


def kept_mean(losses: Tensor, keep: Tensor) -> Tensor:
    """Mean of per-sample ``losses`` ``[B]`` over the kept samples (``keep`` ``[B]`` bool).

    ``sum_{b kept} l_b / max(#kept, 1)``: a batch whose samples were all removed gives 0 (zero
    gradients), never ``0 / 0``; no host sync. The excluded samples' losses are *selected out*
    (``masked_fill``), not multiplied by 0, so a NaN or inf loss of an excluded sample does not
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
    kept = losses.masked_fill(~keep, 0.0)  # selected out: no NaN of an excluded sample passes
    if losses.dtype in (torch.float32, torch.float64):  # the count, exact, summed in that dtype
        return kept.sum() / keep.sum(dtype=losses.dtype).clamp_min(1)
    return kept.sum() / keep.sum().clamp_min(1).to(losses.dtype)


def _device_of(features: object) -> torch.device:
    """The device of the first tensor of ``features`` (the CPU when there is none)."""
    if isinstance(features, Mapping):
        for x in features.values():
            if isinstance(x, Tensor):
                return x.device
    return torch.device("cpu")


def _scaled(features: Mapping[str, Tensor], factors: Tensor | None) -> dict[str, Tensor]:
    """``x_m * factors[:, m]`` per sample (``None``: the features as they are)."""
    if factors is None:
        return dict(features)
    return {
        name: x * factors[:, i].reshape((x.shape[0],) + (1,) * (x.dim() - 1)).to(x.dtype)
        for i, (name, x) in enumerate(features.items())
    }


class _Output(NamedTuple):
    features: dict[str, Tensor]
    """The (masked and rescaled) features, same names, order, shapes and dtypes as the input."""
    keep: Tensor
    """``[B]`` bool: False for a sample whose every modality was dropped (exclude it from the
    loss, e.g. with :func:`kept_mean`)."""


class OPMOutput(_Output):
    """What :class:`ModalityPredictionModulator` returns: ``(features, keep)``, and ``presence``.

    ``presence`` (``[B, M]`` bool, True = modality ``m`` kept for sample ``b``) is for heads that
    cannot take a zeroed modality as absent: an attention head turns it into its key-padding mask
    (every token of a dropped modality masked), docs/attention.md. Computed on first access.

    Example:
        >>> import torch
        >>> from imbalance_losses import ModalityPredictionModulator
        >>> opm = ModalityPredictionModulator(["audio", "visual"]).eval()   # evaluation: no drop
        >>> feats = {"audio": torch.ones(2, 3), "visual": torch.ones(2, 3)}
        >>> features, keep = opm(feats, torch.tensor([0, 1]), unimodal_logits=feats)
        >>> features["audio"] is feats["audio"], keep.tolist()
        (True, [True, True])
        >>> opm(feats, torch.tensor([0, 1]), unimodal_logits=feats).presence.tolist()
        [[True, True], [True, True]]
    """

    _factors: Tensor | None

    def __new__(
        cls, features: dict[str, Tensor], keep: Tensor, factors: Tensor | None = None
    ) -> OPMOutput:
        out = super().__new__(cls, features, keep)
        out._factors = factors  # [B, M] drop factors (None: nothing dropped)
        return out

    @property
    def presence(self) -> Tensor:
        """``[B, M]`` bool: which modalities each sample kept (all True when nothing dropped)."""
        if self._factors is not None:
            return self._factors > 0
        return self.keep.unsqueeze(1).expand(-1, len(self.features)).clone()


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


class ModalityPredictionModulator(Remedy[OPMRecord]):
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

    record_type = OPMRecord
    no_step = (
        "ModalityPredictionModulator has no step() (it acts on the features in its call); there "
        "is nothing to attach to the optimizer"
    )
    who = "ModalityPredictionModulator"
    repeat_effect = "the same drop"
    no_grad_warning = (
        "ModalityPredictionModulator is in training mode but gradients are disabled "
        "(torch.no_grad or inference_mode): nothing can be trained, so it acts as in eval mode "
        "(no drop, no collective, no step counted)"
    )

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
        names = modality_names(modalities)
        super().__init__(warmup_steps=warmup_steps, process_group=process_group)
        self.modalities = names
        self.q_base = real_param("q_base", q_base, ge=0.0, le=1.0)
        self.lam = real_param("lam", lam, ge=0.0)
        self.p_exe = real_param("p_exe", p_exe, ge=0.0, le=1.0)
        self.max_ratio = real_param("max_ratio", max_ratio, gt=1.0)
        self.ignore_index = (
            None if ignore_index is None else int_param("ignore_index", ignore_index)
        )
        self.seed = int_param("seed", seed)
        self.__dict__["_head"] = head  # not a submodule: OPM owns no parameters
        self._generator: torch.Generator | None = None
        # (widths, device) -> widths [M] fp32 on device (one host-to-device copy per layout)
        self._widths: tuple[tuple[tuple[int, ...], torch.device], tuple[Tensor, Tensor]] | None = (
            None
        )

    @property
    def head(self) -> Head | None:
        """The fusion head used for the scores (``None`` if not given)."""
        head: Head | None = self.__dict__["_head"]
        return head

    @property
    def step_count(self) -> int:
        """Counted calls so far (training-mode forwards with a sample on some rank)."""
        return self._steps

    def forward(
        self,
        features: Mapping[str, Tensor],
        target: Tensor,
        unimodal_logits: Mapping[str, Tensor] | None = None,
    ) -> OPMOutput:
        """Drop and rescale the features of this batch (training mode), else the identity.

        ``features``: ordered ``{modality: floating [B, ...]}`` (``d_m = x_m[0].numel()``);
        ``target``: class indices ``[B]`` or soft ``[B, C]``; ``unimodal_logits``: optional
        ``{modality: [B, C]}`` for the scores (default: ``head`` under ``no_grad``). Returns
        :class:`OPMOutput`; the inputs and an all-True ``keep`` in eval mode, without gradients,
        with no sample on any rank and in the warm-up. Bad input: ``ValueError`` / ``TypeError``
        (every rank raises in the same call).
        """
        if not self._training_call():
            batch, device = check_modalities(features), _device_of(features)
            return OPMOutput(dict(features), torch.ones(batch, dtype=torch.bool, device=device))
        repeat, mixed = self._classify(features)
        kept = self._open.kept(features, who=self.who) if repeat else None
        if kept is not None:  # an open call's tensors again: that call's drop
            check_modalities(features)
            factors, keep = cast("tuple[Tensor | None, Tensor]", kept)
            return OPMOutput(_scaled(features, factors), keep, factors)
        device = _device_of(features)
        with self._validating(len(self.modalities), device, pools=True):
            if mixed is not None:
                raise mixed
            batch, logits = self._observe(features, target, unimodal_logits, device)
        ii = self.ignore_index  # the call's scores, added once its checks have passed
        mask = counted(target, ii)
        scores = true_class_scores(list(logits.values()), target, ii, mask)
        self._add(scores, count_of(mask, batch), rows=batch)
        record = self._decide(self.modalities, device)  # one all-reduce; counts the call
        if record is not None and record.active:
            factors, keep = self._drop(record, features, batch, device)
        else:
            factors, keep = None, torch.ones(batch, dtype=torch.bool, device=device)
        self._remember(features.values())
        self._open.keep(features.values(), (factors, keep))  # a repeat of this call: this drop
        return OPMOutput(_scaled(features, factors), keep, factors)

    def _observe(
        self,
        features: Mapping[str, Tensor],
        target: Tensor,
        logits: Mapping[str, Tensor] | None,
        device: torch.device,
    ) -> tuple[int, Mapping[str, Tensor]]:
        """Check one call's input: ``(B, the unimodal logits z_m)`` (given or from the head)."""
        batch = check_modalities(features)
        check_same_modalities(
            self.modalities, features, expected_what="the OPM's", actual_what="features"
        )
        check_features(features, finite=True, by="the OPM's fusion head")
        if logits is None:
            if self.head is None:
                raise ValueError(
                    "ModalityPredictionModulator needs unimodal logits for its scores: "
                    "construct it with head=model.fusion_head or pass unimodal_logits="
                )
            with torch.no_grad():
                logits = _unimodal_logits(self.head, features)
        if (zb := check_modalities(logits, what="unimodal_logits")) != batch:
            raise ValueError(f"unimodal_logits have batch {zb} but the features have batch {batch}")
        for name, z in logits.items():
            if z.device != device:
                raise ValueError(
                    f"unimodal_logits[{name!r}] of shape {tuple(z.shape)} are on {z.device} "
                    f"but the features are on {device}; put the logits on the features' device"
                )
        check_scored_logits(
            logits, target, self.modalities, owner="the OPM's", ignore_index=self.ignore_index
        )
        return batch, logits

    def _formula(self, pooled: Pooled, names: tuple[str, ...], active: bool) -> OPMRecord:
        """Steps 1-2 of the module doc: ratios and ``q`` (nothing dropped yet)."""
        ratios = _capped_ratio_of_sums(pooled.sums, self.max_ratio)
        q = drop_probabilities(ratios, self.q_base, self.lam)
        if active:  # _drop draws next and fills these four in at once: no placeholders built
            none: tuple[Tensor, Tensor, Tensor, Tensor] = (q, q, q, q)
        else:
            zero = torch.zeros((), device=ratios.device)  # nothing drawn
            none = (zero.bool(), zero + 1, zero.repeat(len(names)), zero.long())
        return OPMRecord(names, pooled.sums, pooled.samples, ratios, q, *none, active, self._steps)

    def _drop(
        self, record: OPMRecord, features: Mapping[str, Tensor], batch: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Steps 3-5: draw the call's drop, complete ``last``; ``(factors [B, M], keep [B])``."""
        gen = self._generator
        if gen is None or gen.device != device:
            gen = self._generator = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, record.step, 0))  # the same on every rank
        execute = torch.rand((), generator=gen, device=device) < self.p_exe
        rank = dist.get_rank(group=self.process_group) if is_distributed(self.process_group) else 0
        gen.manual_seed(stream_seed(self.seed, record.step, 1 + rank))  # this rank's samples
        draws = torch.rand(batch, len(self.modalities), generator=gen, device=device)
        widths, width_sum = self._widths_on(features, device)
        factors, dropped, scale = _drop_factors(
            record.drop_probabilities, widths, width_sum, draws, execute
        )
        keep = factors.any(1)
        self.last = dataclasses.replace(
            record,
            executed=execute,
            rescale=scale,
            dropped=(dropped.mean if batch else dropped.sum)(0, dtype=torch.float32),  # B = 0: 0
            removed=(~keep).sum(),
        )
        return factors, keep

    def _widths_on(
        self, features: Mapping[str, Tensor], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """``d_m`` (features per sample) as an fp32 ``[M]`` tensor on ``device`` and its sum,
        cached."""
        key = (tuple(math.prod(x.shape[1:]) for x in features.values()), device)
        if self._widths is None or self._widths[0] != key:
            widths = torch.tensor(key[0], dtype=torch.float32).to(device)
            self._widths = (key, (widths, widths.sum()))
        return self._widths[1]

    def get_extra_state(self) -> dict[str, Any]:
        """Step counter and seed (the generator is re-seeded from them on every call).

        The 0.1.0 keys; nothing is pending between calls (each call decides), and ``last``
        is not kept.
        """
        return {"step": self._steps, "seed": self.seed, "modalities": self.modalities}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (via ``load_state_dict``)."""
        if tuple(state["modalities"]) != self.modalities:
            raise ValueError(
                f"the OPM state is for modalities {list(state['modalities'])}, this module has "
                f"{list(self.modalities)}"
            )
        self._steps = int(state["step"])
        self.seed = int(state["seed"])
        self.last = None

    def extra_repr(self) -> str:
        return (
            f"modalities={list(self.modalities)}, q_base={self.q_base}, lam={self.lam}, "
            f"p_exe={self.p_exe}, warmup_steps={self.warmup_steps}, seed={self.seed}"
        )
