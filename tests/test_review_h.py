"""Cold review of the merged review round: regressions the round's own changes introduced."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from imbalance_losses import unimodal_logits
from imbalance_losses.core.masking import masked_outputs


def _lazy_heads() -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Lazy modules are a new feature"
        return {"a": nn.LazyLinear(3), "v": nn.LazyLinear(3)}


def test_uninitialised_lazy_per_modality_heads_still_run() -> None:
    # modality_head's up-front width check read a LazyLinear's in_features (0 until its first
    # input) and refused every width: a late-fusion model with lazy heads failed on first use
    feats = {"a": torch.randn(4, 5), "v": torch.randn(4, 6)}
    heads = _lazy_heads()
    z = unimodal_logits(heads, feats)
    assert {m: tuple(x.shape) for m, x in z.items()} == {"a": (4, 3), "v": (4, 3)}
    torch.testing.assert_close(z["v"], heads["v"](feats["v"]))
    assert tuple(masked_outputs(_lazy_heads(), feats).shape) == (4, 4, 3)
