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
from .methods.mla import (
    AlternatingUnimodalAdaptation,
    MLARecord,
    fuse_unimodal_logits,
    fusion_weights,
    owm_alpha,
    owm_update,
    project_gradient,
)
from .methods.mmcosine import MMCosineHead, MMCosineRecord, cosine_logits, split_weight
from .methods.mmpareto import MMPareto, MMParetoRecord, pareto_weights
from .methods.modulation import (
    ModalityGradientModulator,
    ModulationRecord,
    ge_noise_stds,
    ogm_coefficients,
)
from .methods.opm import (
    ModalityPredictionModulator,
    OPMOutput,
    OPMRecord,
    drop_factors,
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
from .methods.reconboost import (
    ReconBoost,
    ReconBoostRecord,
    consolidation_loss,
    ensemble_logits,
    reconboost_loss,
    reconboost_weights,
)
from .methods.relearning import (
    ModalityRelearning,
    RelearnRecord,
    cluster_purity,
    kmeans,
    learning_state_alphas,
    minmax_scale,
    purity_score,
    soft_reinitialise_,
)
from .methods.umt import UMTRecord, UnimodalTeacherLoss, feature_distillation, unimodal_ensemble
from .methods.valuation import (
    MaskedDataset,
    SampleModalityValuation,
    ValuationRecord,
    ValuationSampler,
    apply_mask,
    copy_counts,
    modality_level_extra,
    resampling_plan,
    sample_shapley,
)

__all__ = [
    "AGMRecord",
    "ARLCoefficients",
    "ARLLoss",
    "ARLRecord",
    "AdaptiveGradientModulator",
    "AlternatingUnimodalAdaptation",
    "BlendingRecord",
    "BoostingRecord",
    "ComparisonResult",
    "GradientBlending",
    "Head",
    "ImbalanceMonitor",
    "ImbalanceReport",
    "MLARecord",
    "MMCosineHead",
    "MMCosineRecord",
    "MMPareto",
    "MMParetoRecord",
    "MappingHead",
    "MaskedDataset",
    "ModalityGradientModulator",
    "ModalityPredictionModulator",
    "ModalityRelearning",
    "ModulationRecord",
    "OPMOutput",
    "OPMRecord",
    "PMRLoss",
    "PMRRecord",
    "ReconBoost",
    "ReconBoostRecord",
    "RelearnRecord",
    "SampleModalityValuation",
    "StepRecord",
    "SustainedBoostingLoss",
    "UMTRecord",
    "UnimodalTeacherLoss",
    "ValuationRecord",
    "ValuationSampler",
    "agm_coefficients",
    "apply_mask",
    "arl_coefficients",
    "assign_head",
    "blending_weights",
    "boosting_residual_loss",
    "branch_losses",
    "cluster_purity",
    "compare_remedies",
    "confidence_scores",
    "consolidation_loss",
    "copy_counts",
    "cosine_logits",
    "discrepancy_ratios",
    "drop_factors",
    "drop_probabilities",
    "ensemble_logits",
    "entropy_weights",
    "feature_distillation",
    "fuse_unimodal_logits",
    "fusion_weights",
    "ge_noise_stds",
    "imbalance_report",
    "inverse_variance_weights",
    "kept_mean",
    "kmeans",
    "learning_state_alphas",
    "minmax_scale",
    "modality_level_extra",
    "mono_modal_cross_entropy",
    "mono_modal_responses",
    "ogm_coefficients",
    "overfitting_to_generalization_ratio",
    "owm_alpha",
    "owm_update",
    "pareto_weights",
    "plot_history",
    "project_gradient",
    "prototype_entropy",
    "prototype_logits",
    "prototypical_cross_entropy",
    "purity_score",
    "rebalance_coefficients",
    "reconboost_loss",
    "reconboost_weights",
    "resampling_plan",
    "rescale_factor",
    "sample_shapley",
    "soft_reinitialise_",
    "split_weight",
    "unimodal_ensemble",
    "unimodal_logits",
    "window_changes",
]

__version__ = "0.1.0"
