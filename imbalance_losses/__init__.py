"""imbalance-losses: remedies for modality imbalance in multimodal PyTorch classifiers.

Conventions shared by every module (see ``docs/index.md``):

* per-modality tensors travel as an ordered ``Mapping[str, Tensor]``, batch first; its order is
  the concatenation order; any number of modalities >= 2;
* unimodal logits come from the model's own fusion head (:func:`unimodal_logits`), with no new
  parameters;
* statistics are fp32, detached, and all-reduced under ``torch.distributed``;
* every stateful object has ``state_dict()`` / ``load_state_dict()`` and a ``last`` diagnostics
  record.
"""

from .arl import *  # noqa: F403
from .arl import __all__ as _arl_all
from .boosting import *  # noqa: F403
from .boosting import __all__ as _boosting_all
from .diagnostics import StepRecord
from .modulation import *  # noqa: F403
from .modulation import __all__ as _modulation_all
from .unimodal import Head, unimodal_logits

__all__ = [
    "Head",
    "StepRecord",
    "unimodal_logits",
    *_arl_all,
    *_boosting_all,
    *_modulation_all,
]

__version__ = "0.1.0.dev0"
