"""The diagnosis: which modality is under-trained, and by how much (run on held-out data).

:func:`imbalance_report` measures, for each modality ``m`` of a trained model:

* **head**: the accuracy of its unimodal logits through the shared fusion head
  (:func:`~imbalance_losses.unimodal_logits`) on the held-out set: how much the fused classifier
  takes from ``m``;
* **probe**: the held-out accuracy of a linear probe fitted on the encoder's **frozen** features
  of a training set: how much the encoder learned, whatever the head makes of it;
* **alone** (optional): the same probe on an encoder of ``m`` trained alone (uni-modal): what the
  encoder can learn when no other modality competes.

The probe (:func:`linear_probe_accuracy`) is multinomial logistic regression on the features
standardised with the fitting set's statistics, ``x' = (x - mean) / (std + 1e-6)``::

    min_{W, b}  (1/N) sum_i CE(x'_i W + b, y_i) + l2 ||W||_F^2

by full-batch L-BFGS (strong Wolfe line search, ``max_iter`` iterations) from ``W = 0, b = 0``,
in fp32 on the CPU: deterministic, nothing tuned, so the held-out set chooses nothing.

The **deficit** of modality ``m`` is ``alone_m - probe_m``. It is called significant when it
exceeds twice the standard error of a difference of two accuracies on ``n`` held-out samples,
``2 sqrt((p_a (1 - p_a) + p_j (1 - p_j)) / n)`` (and at least one sample, ``1/n``): a modality
with a significant deficit is **under-trained** by joint training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.unimodal import Head, eval_mode, unimodal_logits
from ..core.validation import check_finite, int_param, real_param

__all__ = [
    "FeatureSet",
    "ImbalanceReport",
    "imbalance_report",
    "linear_probe_accuracy",
    "pooled_tokens",
]

FeatureSet = tuple[Mapping[str, Tensor], Tensor]
"""``(features, target)``: modality -> features ``[N, D_m]`` (or tokens ``[N, ..., D_m]``) and
class indices ``[N]``."""

Features = FeatureSet | Iterable[FeatureSet]
"""One :data:`FeatureSet`, or batches of them (a loader's), concatenated in order."""


def linear_probe_accuracy(
    fit_x: Tensor,
    fit_y: Tensor,
    eval_x: Tensor,
    eval_y: Tensor,
    num_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> float:
    """Held-out accuracy of a linear probe (multinomial logistic regression) on frozen features.

    ``x' = (x - mean) / (std + 1e-6)`` with the fitting set's mean and (unbiased) std;
    ``min_{W, b} mean_i CE(x'_i W + b, y_i) + l2 ||W||^2`` by full-batch L-BFGS from zero (fp32,
    CPU, deterministic); then ``(1/n) sum_i [argmax_c (x'_i W + b)_c = y_i]`` on ``eval``.

    Args:
        fit_x: ``[N, D]`` features the probe is fitted on (detached, moved to the CPU).
        fit_y: ``[N]`` class indices in ``[0, num_classes)``.
        eval_x: ``[n, D]`` held-out features.
        eval_y: ``[n]`` held-out class indices.
        num_classes: ``C``.
        l2: weight of ``||W||^2`` (``>= 0``).
        max_iter: L-BFGS iterations (``>= 1``).

    Returns:
        the accuracy in ``[0, 1]``.

    Raises:
        ValueError: shapes that do not match, ``N < 2``, an empty held-out set (``n = 0``),
            non-finite features, labels out of range.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(100) % 2
        >>> x = torch.randn(100, 3, generator=g) + 4.0 * y[:, None]   # linearly separable
        >>> linear_probe_accuracy(x[:80], y[:80], x[80:], y[80:], 2)
        1.0
    """
    l2 = real_param("l2", l2, ge=0.0)
    max_iter = int_param("max_iter", max_iter, ge=1)
    xs = []
    for name, x, y in (("fit", fit_x, fit_y), ("eval", eval_x, eval_y)):
        if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"the probe's {name} features must be [N, D] with targets [N]; got features "
                f"{tuple(x.shape)} and targets {tuple(y.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"the probe's {name} features must be floating point, got {x.dtype}")
        check_finite(x, name=f"the probe's {name} features")
        if name == "eval" and x.shape[0] == 0:
            raise ValueError(
                f"the probe's held-out (eval) set is empty: features {tuple(x.shape)}, targets "
                f"{tuple(y.shape)}; an accuracy on no sample is undefined"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"the probe's {name} targets must be class indices in [0, {num_classes}), got "
                f"values in [{int(y.min())}, {int(y.max())}]"
            )
        xs.append(x.detach().float().cpu())
    if fit_x.shape[0] < 2 or fit_x.shape[1] != eval_x.shape[1]:
        raise ValueError(
            "the probe needs at least 2 fitting samples and the same width for fitting and "
            f"evaluation; got {tuple(fit_x.shape)} and {tuple(eval_x.shape)}"
        )
    train_x, test_x = xs
    train_y, test_y = fit_y.detach().long().cpu(), eval_y.detach().long().cpu()
    # the fit needs autograd, also when called under no_grad or inference_mode (Lightning's
    # validation hooks): every tensor it differentiates through is made here, outside both
    with torch.inference_mode(False), torch.enable_grad():
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        xtr, xte = (train_x - mean) / std, (test_x - mean) / std
        target = train_y.clone()  # cross_entropy saves it for backward
        w = torch.zeros(xtr.shape[1], num_classes, requires_grad=True)
        b = torch.zeros(num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xtr @ w + b, target) + l2 * (w * w).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            return float((((xte @ w + b).argmax(dim=-1)) == test_y).float().mean())


def pooled_tokens(x: Tensor) -> Tensor:
    """``[N, D]`` features for a probe: tokens ``[N, T..., D]`` averaged over ``T...``.

    Features that are already vectors are returned as they are. Padding tokens are averaged
    too: to leave them out, pass features pooled with your own mask instead.
    """
    return x if x.dim() == 2 else x.flatten(1, -2).mean(1)


def _collect(data: Features, what: str) -> tuple[FeatureSet, list[FeatureSet]]:
    """One feature set from a set or from batches of sets, and the batches as given.

    The set holds the features pooled over tokens (:func:`pooled_tokens`), concatenated and
    detached, for the probes; the batches keep the tokens for the head (token counts may differ
    from one batch to the next).
    """
    expected = (
        f"{what} must be (features, target), features a mapping modality -> [N, D] (or tokens "
        "[N, T, D]) tensor and target [N] class indices, or an iterable of such pairs (a "
        "loader's batches)"
    )
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Mapping):
        parts: list[FeatureSet] = [(data[0], data[1])]
    elif isinstance(data, Mapping | Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"{expected}; got {type(data).__name__}")
    else:
        parts = list(data)
    if not parts:
        raise ValueError(f"{what} is empty: give (features, target) or batches of them")
    for i, part in enumerate(parts):
        if not (
            isinstance(part, tuple | list)
            and len(part) == 2
            and isinstance(part[0], Mapping)
            and isinstance(part[1], Tensor)
        ):
            raise TypeError(f"{expected}; item {i} is a {type(part).__name__}")
    names = list(parts[0][0])
    if not names:
        raise ValueError(f"{what} has no modality")
    for i, (feats, y) in enumerate(parts):
        if list(feats) != names:
            raise ValueError(
                f"{what} batch {i} has modalities {list(feats)} but batch 0 has {names}"
            )
        for m, x in feats.items():
            if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != y.shape[0]:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"{what}: features[{m!r}] must be [N, D] (or tokens [N, T, D]) with N = "
                    f"the target's length {tuple(y.shape)}; got {shape}"
                )
        if y.dim() != 1 or y.is_floating_point():
            raise ValueError(
                f"{what}: the target must be class indices [N] (integers), got "
                f"{y.dtype} {tuple(y.shape)}"
            )
    features = {m: torch.cat([pooled_tokens(f[m].detach()) for f, _ in parts]) for m in names}
    return (features, torch.cat([y.detach() for _, y in parts])), parts


@dataclass(frozen=True)
class ImbalanceReport:
    """What :func:`imbalance_report` measured; accuracies are fractions in ``[0, 1]``.

    ``str(report)`` is a Markdown table and the diagnosis in words; :meth:`to_dict` is flat for
    a logger.

    Attributes:
        modalities: the modalities, in the features' order.
        probe: modality -> held-out accuracy of the linear probe on the jointly trained encoder.
        head: modality -> held-out accuracy of its unimodal logits through the shared head
            (empty when no head was given).
        alone: modality -> the probe on an encoder of that modality trained alone (only the
            modalities given).
        num_classes: ``C``.
        num_fit: samples the probes were fitted on.
        num_evaluated: held-out samples every accuracy is measured on.

    Example:
        >>> report = ImbalanceReport(
        ...     modalities=("image", "audio"),
        ...     probe={"image": 0.97, "audio": 0.80},
        ...     alone={"audio": 0.95},
        ...     num_classes=10, num_fit=1000, num_evaluated=400,
        ... )
        >>> report.under_trained, round(report.deficit["audio"], 2)
        (('audio',), 0.15)
    """

    modalities: tuple[str, ...]
    probe: dict[str, float]
    head: dict[str, float] = field(default_factory=dict)
    alone: dict[str, float] = field(default_factory=dict)
    num_classes: int = 0
    num_fit: int = 0
    num_evaluated: int = 0

    def margin(self, p: float, q: float) -> float:
        """Twice the standard error of ``p - q`` on ``num_evaluated`` samples (at least ``1/n``)."""
        n = max(self.num_evaluated, 1)
        return max(2.0 * math.sqrt((p * (1 - p) + q * (1 - q)) / n), 1.0 / n)

    @property
    def deficit(self) -> dict[str, float]:
        """``alone_m - probe_m`` for every modality with an encoder trained alone."""
        return {m: self.alone[m] - self.probe[m] for m in self.alone}

    @property
    def under_trained(self) -> tuple[str, ...]:
        """Modalities whose deficit is significant (above :meth:`margin`), largest first."""
        found = [
            m for m, d in self.deficit.items() if d > self.margin(self.alone[m], self.probe[m])
        ]
        return tuple(sorted(found, key=lambda m: -self.deficit[m]))

    @property
    def weakest(self) -> str:
        """The modality whose jointly trained encoder's probe is lowest."""
        return min(self.modalities, key=lambda m: self.probe[m])

    @property
    def verdict(self) -> str:
        """The diagnosis in words."""
        pct = _pct
        lines = []
        for m in self.under_trained:
            lines.append(
                f"**{m} is under-trained**: its encoder's linear probe reaches "
                f"{pct(self.probe[m])} % after joint training against {pct(self.alone[m])} % "
                f"for an encoder of {m} trained alone, {100 * self.deficit[m]:.1f} points lower "
                f"(sampling noise: about {100 * self.margin(self.alone[m], self.probe[m]):.1f} "
                f"points on {self.num_evaluated} samples)."
            )
        if self.alone and not self.under_trained:
            lines.append(
                "No modality is under-trained: every encoder's probe is within sampling noise "
                f"of (or above) the encoder trained alone ({_listing(self.alone, self.probe)})."
            )
        if not self.alone and len(self.modalities) > 1:
            w = self.weakest
            others = ", ".join(f"{pct(self.probe[m])} % for {m}" for m in self.modalities if m != w)
            lines.append(
                f"{w} is the weakest modality: its encoder's probe reaches {pct(self.probe[w])} % "
                f"against {others}. Whether it is under-trained or just less informative needs "
                f"the probe of a {w} encoder trained alone (imbalance_report(..., alone=...))."
            )
        if len(self.head) > 1:
            least = min(self.head, key=lambda m: self.head[m] - self.probe[m])
            if self.probe[least] - self.head[least] > self.margin(
                self.probe[least], self.head[least]
            ):
                others = "; ".join(
                    f"{m}: {pct(self.head[m])} % vs {pct(self.probe[m])} %"
                    for m in self.head
                    if m != least
                )
                lines.append(
                    f"The fused head relies least on {least}: its logits through the shared "
                    f"head reach {pct(self.head[least])} % against {pct(self.probe[least])} % "
                    f"for its probe ({others})."
                )
        return " ".join(lines)

    def to_dict(self) -> dict[str, float]:
        """``{"imbalance/<modality>/<probe_acc | head_acc | alone_probe_acc | deficit>": v}``."""
        out: dict[str, float] = {}
        for m in self.modalities:
            out[f"imbalance/{m}/probe_acc"] = self.probe[m]
            if m in self.head:
                out[f"imbalance/{m}/head_acc"] = self.head[m]
            if m in self.alone:
                out[f"imbalance/{m}/alone_probe_acc"] = self.alone[m]
                out[f"imbalance/{m}/deficit"] = self.deficit[m]
        return out

    def table(self) -> str:
        """The Markdown table alone (accuracies in %)."""
        cols = ["modality"]
        if self.head:
            cols.append("head acc %")
        cols.append("probe acc %")
        if self.alone:
            cols += ["alone probe acc %", "deficit (points)"]
        rows = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for m in self.modalities:
            cells = [m]
            if self.head:
                cells.append(_pct(self.head.get(m)))
            cells.append(_pct(self.probe[m]))
            if self.alone:
                cells.append(_pct(self.alone.get(m)))
                d = self.deficit.get(m)
                cells.append("—" if d is None else f"{100 * d:.1f}")
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return (
            self.table()
            + f"\n\n{self.verdict}\n\n"
            + f"(held-out: {self.num_evaluated} samples, {self.num_classes} classes, chance "
            f"{100 / max(self.num_classes, 1):.1f} %; probes fitted on {self.num_fit} samples)"
        )


def _pct(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _listing(alone: Mapping[str, float], probe: Mapping[str, float]) -> str:
    return "; ".join(f"{m}: {_pct(probe[m])} % vs {_pct(a)} % alone" for m, a in alone.items())


def _require_samples(target: Tensor, what: str, meaning: str) -> None:
    """``ValueError`` when a held-out set has no sample (every accuracy would be ``0 / 0``)."""
    if target.shape[0] == 0:
        raise ValueError(
            f"{what} ({meaning}) is empty: targets of shape {tuple(target.shape)}; every accuracy "
            "and the diagnosis are measured on it, so it needs at least one sample"
        )


def imbalance_report(
    fit: Features,
    evaluate: Features,
    *,
    head: Head | None = None,
    alone: tuple[Features, Features] | None = None,
    num_classes: int | None = None,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> ImbalanceReport:
    """Diagnose a trained multimodal model: per modality, head accuracy and linear probes.

    Args:
        fit: ``(features, target)`` (or batches of them) of a **training** set, on which the
            probes are fitted: the encoders' frozen features (``model.eval()``, ``no_grad``).
            Token features ``[N, T, D]`` (attention fusion) are probed averaged over their
            tokens (:func:`pooled_tokens`); the head still sees the tokens.
        evaluate: ``(features, target)`` (or batches) of a **held-out** set, on which every
            accuracy is measured.
        head: the shared fusion head; when given, the unimodal logits of ``evaluate``'s features
            through it (:func:`~imbalance_losses.unimodal_logits`) are scored too (two or more
            modalities). It is read under ``no_grad`` with its modules in eval mode (each
            module's own mode restored after): no BatchNorm statistic or dropout draw changes
            the model, also when it is still in training mode.
        alone: ``(fit, evaluate)`` features of encoders trained **alone** (uni-modal models),
            for some or all modalities (the same samples' targets): their probes are the
            reference of the deficit.
        num_classes: ``C`` (default: the head's output width, else the largest label + 1).
        l2: the probes' L2 weight (see :func:`linear_probe_accuracy`).
        max_iter: the probes' L-BFGS iterations.

    Returns:
        :class:`ImbalanceReport`.

    Raises:
        ValueError: features that are not ``[N, D]``, sets whose modalities differ, an
            ``alone`` modality the model does not have, labels out of range, an empty held-out
            set (``evaluate`` or ``alone[1]`` with no sample: every accuracy would be ``0 / 0``).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(400) % 4
        >>> strong = torch.randn(400, 8, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 8)
        >>> weak = torch.randn(400, 8, generator=g)           # this encoder learned nothing
        >>> alone = torch.randn(400, 8, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 8)
        >>> feats = {"image": strong, "audio": weak}
        >>> report = imbalance_report(
        ...     ({m: x[:300] for m, x in feats.items()}, y[:300]),
        ...     ({m: x[300:] for m, x in feats.items()}, y[300:]),
        ...     alone=(({"audio": alone[:300]}, y[:300]), ({"audio": alone[300:]}, y[300:])),
        ... )
        >>> report.under_trained
        ('audio',)
        >>> report.probe["image"] > 0.9, report.probe["audio"] < 0.4, report.alone["audio"] > 0.9
        (True, True, True)
        >>> print(report.table().splitlines()[0])     # print(report): the table and the verdict
        | modality | probe acc % | alone probe acc % | deficit (points) |
    """
    (fit_x, fit_y), _ = _collect(fit, "fit")
    (eval_x, eval_y), eval_parts = _collect(evaluate, "evaluate")
    _require_samples(eval_y, "evaluate", "the held-out set")
    modalities = tuple(fit_x)
    if tuple(eval_x) != modalities:
        raise ValueError(f"evaluate has modalities {list(eval_x)} but fit has {list(modalities)}")
    alone_sets: tuple[FeatureSet, FeatureSet] | None = None
    if alone is not None:
        alone_sets = (_collect(alone[0], "alone[0]")[0], _collect(alone[1], "alone[1]")[0])
        _require_samples(alone_sets[1][1], "alone[1]", "the held-out set of the encoders alone")
        if list(alone_sets[0][0]) != list(alone_sets[1][0]):
            raise ValueError(
                f"alone: the fitting set has modalities {list(alone_sets[0][0])} but the "
                f"held-out set has {list(alone_sets[1][0])}"
            )
        for (feats, _), which in zip(alone_sets, ("fit", "evaluate"), strict=True):
            unknown = [m for m in feats if m not in modalities]
            if unknown:
                raise ValueError(
                    f"alone ({which}) has modalities {unknown} that the model's features "
                    f"{list(modalities)} do not have"
                )
    head_logits: dict[str, Tensor] = {}
    if head is not None:
        # batch by batch: the head sees the features as given (tokens); in eval mode, so that
        # a head still in training mode neither updates its BatchNorm statistics nor draws
        # dropout masks (each module's own mode comes back after)
        with torch.no_grad(), eval_mode(head):
            per_batch = [
                unimodal_logits(head, {m: x.detach() for m, x in f.items()}) for f, _ in eval_parts
            ]
        for m, z in per_batch[0].items():
            if z.dim() != 2:  # per-token logits [B, T, C] would be scored against [B] labels
                raise ValueError(
                    f"the head returned logits of shape {tuple(z.shape)} for modality {m!r}; "
                    "the report scores one [B, C] row of class scores per sample: give a head "
                    "that pools the tokens (e.g. a MappingHead over the token features)"
                )
        head_logits = {m: torch.cat([z[m] for z in per_batch]) for m in per_batch[0]}
    if num_classes is None:
        if head_logits:
            num_classes = int(next(iter(head_logits.values())).shape[-1])
        else:
            labels = [fit_y, eval_y] + ([s[1] for s in alone_sets] if alone_sets else [])
            num_classes = max(int(t.max()) + 1 for t in labels if t.numel())
    num_classes = int_param("num_classes", num_classes, ge=2)

    def probe(fx: Tensor, fy: Tensor, ex: Tensor, ey: Tensor) -> float:
        return linear_probe_accuracy(fx, fy, ex, ey, num_classes, l2=l2, max_iter=max_iter)

    probes = {m: probe(fit_x[m], fit_y, eval_x[m], eval_y) for m in modalities}
    heads = {
        m: float((z.argmax(-1) == eval_y.to(z.device)).float().mean())
        for m, z in head_logits.items()
    }
    alones: dict[str, float] = {}
    if alone_sets is not None:
        (afx, afy), (aex, aey) = alone_sets
        alones = {m: probe(afx[m], afy, aex[m], aey) for m in modalities if m in afx}
    return ImbalanceReport(
        modalities=modalities,
        probe=probes,
        head=heads,
        alone=alones,
        num_classes=num_classes,
        num_fit=int(fit_y.shape[0]),
        num_evaluated=int(eval_y.shape[0]),
    )
