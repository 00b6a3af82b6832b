"""The benchmark's model: one encoder per modality, concatenation fusion, one linear head.

The same architecture is used by every row (uni-modal rows use one encoder and a linear head of
their own; sustained boosting replaces the linear head by its own heads, which is the method).
The second variant, ``head="per-modality"`` (``--model per-modality``), has one linear head per
modality and sums their logits (late fusion): a head that scores each modality alone, which MLA
and ReconBoost need.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["FEATURE_WIDTH", "HEADS", "FusionModel", "build_encoder"]

FEATURE_WIDTH = 64
"""Width of every modality's feature vector (the input of the fusion head)."""

HEADS = ("concat", "per-modality")
"""The fusion heads of :class:`FusionModel`: one ``nn.Linear`` over the concatenation, or one
``nn.Linear`` per modality with the logits summed."""


class SequenceEncoder(nn.Module):
    """Small 1-D convolution over a ``[B, C, T]`` sequence, then masked mean pooling over time.

    ``h = relu(conv(relu(conv(x))))``; ``pooled = sum_t h_t mask_t / sum_t mask_t`` (padded
    frames excluded); ``features = relu(Linear(pooled))``.
    """

    def __init__(self, channels: int, width: int = FEATURE_WIDTH) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(channels, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(32, width, kernel_size=5, padding=2),
            nn.ReLU(),
        )
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU())

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.conv(x)
        if mask is None:
            pooled = h.mean(dim=-1)
        else:
            m = mask.unsqueeze(1).to(h.dtype)
            pooled = (h * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)
        return self.out(pooled)  # type: ignore[no-any-return]


class ImageEncoder(nn.Module):
    """Small CNN for ``[B, 1, 8, 8]`` images: two 3x3 convolutions, 2x2 max-pool, linear."""

    def __init__(self, width: int = FEATURE_WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, width),
            nn.ReLU(),
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class VectorEncoder(nn.Module):
    """MLP for a ``[B, D]`` feature vector: ``D -> 128 -> width`` with ReLU."""

    def __init__(self, in_features: int, width: int = FEATURE_WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, 128), nn.ReLU(), nn.Linear(128, width), nn.ReLU()
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def build_encoder(kind: str, example: Tensor) -> nn.Module:
    """The encoder suited to a modality's data, sized from one example batch."""
    if kind == "sequence":
        return SequenceEncoder(example.shape[1])
    if kind == "image":
        return ImageEncoder()
    if kind == "vector":
        return VectorEncoder(example.shape[1])
    raise ValueError(f"unknown modality kind {kind!r}")


class FusionModel(nn.Module):
    """``head(cat(enc_1(x_1), ..., enc_M(x_M)))`` with an ``nn.Linear`` head (``"concat"``), or
    ``sum_m head_m(enc_m(x_m))`` with one ``nn.Linear`` per modality (``"per-modality"``).

    With one modality both are the uni-modal baseline (encoder + linear classifier).
    """

    head: nn.Linear | nn.ModuleDict

    def __init__(
        self, encoders: Mapping[str, nn.Module], num_classes: int, head: str = "concat"
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        if head == "concat":
            self.head = nn.Linear(FEATURE_WIDTH * len(encoders), num_classes)
        elif head == "per-modality":
            self.head = nn.ModuleDict(
                {m: nn.Linear(FEATURE_WIDTH, num_classes) for m in self.encoders}
            )
        else:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")

    def features(
        self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-modality features, in the concatenation order."""
        return {m: enc(inputs[m], masks.get(m)) for m, enc in self.encoders.items()}

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """Fused logits: ``head(cat(features))``, or the sum of the per-modality heads' logits."""
        if isinstance(self.head, nn.ModuleDict):
            return torch.stack([self.head[m](x) for m, x in features.items()]).sum(0)
        return self.head(torch.cat(list(features.values()), dim=-1))  # type: ignore[no-any-return]
