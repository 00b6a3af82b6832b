"""Every constructor that takes modality -> encoder accepts an ``nn.ModuleDict`` (how models hold
their encoders) and treats it exactly like the equivalent dict; a non-mapping is a TypeError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from imbalance_losses import (
    AdaptiveGradientModulator,
    ARLLoss,
    ImbalanceMonitor,
    MMPareto,
    ModalityGradientModulator,
)


def _encoders() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"audio": nn.Linear(3, 4), "visual": nn.Linear(5, 4)})


BUILDERS: dict[str, Callable[[Any], Any]] = {
    "ModalityGradientModulator": lambda enc: ModalityGradientModulator(enc, alpha=0.5),
    "ARLLoss": lambda enc: ARLLoss(head=nn.Linear(8, 3), encoders=enc),
    "AdaptiveGradientModulator": lambda enc: AdaptiveGradientModulator(
        nn.Linear(8, 3), encoders=enc
    ),
    "MMPareto": lambda enc: MMPareto(enc),
    "ImbalanceMonitor": lambda enc: ImbalanceMonitor(["audio", "visual"], encoders=enc),
}


def _params(obj: Any) -> list[int]:
    if isinstance(obj, ModalityGradientModulator):
        return [id(p) for _, p in obj.modulated_parameters]
    found = getattr(obj, "_params", None) or getattr(obj, "_encoder_params", None)
    assert found, f"{type(obj).__name__} exposes no parameter list"
    return [id(p) for _, _, p in found]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_module_dict_is_the_same_as_a_dict(name: str) -> None:
    enc = _encoders()
    from_module_dict = BUILDERS[name](enc)
    from_dict = BUILDERS[name](dict(enc.items()))
    assert _params(from_module_dict) == _params(from_dict)
    assert len(_params(from_dict)) > 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_list_of_encoders_is_a_type_error_that_asks_for_a_mapping(name: str) -> None:
    enc = _encoders()
    with pytest.raises(TypeError, match="mapping"):
        BUILDERS[name](list(enc.values()))
