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

from .compare import ComparisonResult, compare_remedies
from .core.records import StepRecord
from .core.unimodal import Head, MappingHead, unimodal_logits
from .diagnosis.monitor import ImbalanceMonitor
from .diagnosis.plotting import plot_history
from .diagnosis.report import ImbalanceReport, imbalance_report
from .methods.agm import (
    AdaptiveGradientModulator,
    AGMRecord,
    agm_coefficients,
    discrepancy_ratios,
    mono_modal_cross_entropy,
    mono_modal_responses,
)
from .methods.arl import (
    ARLCoefficients,
    ARLLoss,
    ARLRecord,
    arl_coefficients,
    inverse_variance_weights,
)
from .methods.blending import (
    BlendingRecord,
    GradientBlending,
    blending_weights,
    branch_losses,
    overfitting_to_generalization_ratio,
    window_changes,
)
from .methods.boosting import (
    BoostingRecord,
    SustainedBoostingLoss,
    assign_head,
    boosting_residual_loss,
    confidence_scores,
)
from .methods.mmpareto import MMPareto, MMParetoRecord, pareto_weights
from .methods.modulation import ModalityGradientModulator, ModulationRecord
from .methods.opm import (
    ModalityPredictionModulator,
    OPMOutput,
    OPMRecord,
    drop_probabilities,
    kept_mean,
    rescale_factor,
)
from .methods.pmr import (
    PMRLoss,
    PMRRecord,
    entropy_weights,
    prototype_entropy,
    prototype_logits,
    prototypical_cross_entropy,
    rebalance_coefficients,
)

__all__ = [
    "AGMRecord",
    "ARLCoefficients",
    "ARLLoss",
    "ARLRecord",
    "AdaptiveGradientModulator",
    "BlendingRecord",
    "BoostingRecord",
    "ComparisonResult",
    "GradientBlending",
    "Head",
    "ImbalanceMonitor",
    "ImbalanceReport",
    "MMPareto",
    "MMParetoRecord",
    "MappingHead",
    "ModalityGradientModulator",
    "ModalityPredictionModulator",
    "ModulationRecord",
    "OPMOutput",
    "OPMRecord",
    "PMRLoss",
    "PMRRecord",
    "StepRecord",
    "SustainedBoostingLoss",
    "agm_coefficients",
    "arl_coefficients",
    "assign_head",
    "blending_weights",
    "boosting_residual_loss",
    "branch_losses",
    "compare_remedies",
    "confidence_scores",
    "discrepancy_ratios",
    "drop_probabilities",
    "entropy_weights",
    "imbalance_report",
    "inverse_variance_weights",
    "kept_mean",
    "mono_modal_cross_entropy",
    "mono_modal_responses",
    "overfitting_to_generalization_ratio",
    "pareto_weights",
    "plot_history",
    "prototype_entropy",
    "prototype_logits",
    "prototypical_cross_entropy",
    "rebalance_coefficients",
    "rescale_factor",
    "unimodal_logits",
    "window_changes",
]

__version__ = "0.1.0"
