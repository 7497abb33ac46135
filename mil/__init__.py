"""mil — patch encoders, embeddings, attention-MIL heads, training and evaluation."""

if __name__ != "oncotrace.mil":
    # The source folder was imported under its bare name (e.g. from the repository root, which
    # is on sys.path there): a second, unrelated copy of the stage. Refuse it.
    raise ImportError(
        f"this is OncoTrace's `mil` stage, importable only as `oncotrace.mil` "
        f"(got {__name__!r}): write `from oncotrace import mil` after `pip install -e .`"
    )


from . import _metrics as metrics
from ._bags import ZarrBags, prefetch_bags
from ._card import CovariateSpec, ModelCard, ModelEncoder
from ._embed import embed, read_features
from ._encoders import (
    EncoderConfig,
    WeightsError,
    create_encoder,
    encoder_config,
    list_encoders,
    register_encoder,
)
from ._evaluate import (
    CalibratedPredictions,
    ConformalResult,
    Estimate,
    TaskEvaluation,
    apply_calibration,
    evaluate_predictions,
    fit_calibration,
)
from ._fewshot import (
    FewShotRepeat,
    FewShotReport,
    LinearProbeHead,
    PrototypeHead,
    RepeatSpread,
    case_embeddings,
    fewshot_evaluate,
    load_fewshot_head,
)
from ._heads import (
    HeadConfig,
    MILHead,
    MILOutput,
    MILPool,
    create_head,
    list_heads,
    load_head,
    register_head,
    save_head,
)
from ._import import FeatureImportError, H5Features, import_features, read_h5_features
from ._metrics import (
    BinaryMetrics,
    McNemarResult,
    MetricCI,
    MulticlassMetrics,
    apply_temperature,
    auc_ci,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    compare_readers,
    conformal_fit,
    conformal_sets,
    delong_auc,
    delong_test,
    empirical_coverage,
    expected_calibration_error,
    fit_temperature,
    mcnemar_test,
    multiclass_metrics,
    reliability_curve,
)
from ._protocol import TrainConfig, TrainConfigError, TrainResult, train_model
from ._report import plot_confusion, plot_reliability, plot_roc, render_html
from ._splits import grouped_kfold, grouped_split, inner_validation, site_holdout
from ._train import (
    CohortData,
    Evaluation,
    cross_validate,
    fit,
    load_cohort,
    load_model,
    predict,
    save_model,
)

__all__ = [
    "BinaryMetrics",
    "CalibratedPredictions",
    "CohortData",
    "ConformalResult",
    "CovariateSpec",
    "EncoderConfig",
    "Estimate",
    "Evaluation",
    "FeatureImportError",
    "FewShotRepeat",
    "FewShotReport",
    "H5Features",
    "HeadConfig",
    "LinearProbeHead",
    "MILHead",
    "MILOutput",
    "MILPool",
    "McNemarResult",
    "MetricCI",
    "ModelCard",
    "ModelEncoder",
    "MulticlassMetrics",
    "PrototypeHead",
    "RepeatSpread",
    "TaskEvaluation",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "WeightsError",
    "ZarrBags",
    "apply_calibration",
    "apply_temperature",
    "auc_ci",
    "binary_metrics",
    "bootstrap_ci",
    "case_embeddings",
    "choose_threshold",
    "compare_readers",
    "conformal_fit",
    "conformal_sets",
    "create_encoder",
    "create_head",
    "cross_validate",
    "delong_auc",
    "delong_test",
    "embed",
    "empirical_coverage",
    "encoder_config",
    "evaluate_predictions",
    "expected_calibration_error",
    "fewshot_evaluate",
    "fit",
    "fit_calibration",
    "fit_temperature",
    "grouped_kfold",
    "grouped_split",
    "import_features",
    "inner_validation",
    "list_encoders",
    "list_heads",
    "load_cohort",
    "load_fewshot_head",
    "load_head",
    "load_model",
    "mcnemar_test",
    "metrics",
    "multiclass_metrics",
    "plot_confusion",
    "plot_reliability",
    "plot_roc",
    "predict",
    "prefetch_bags",
    "read_features",
    "read_h5_features",
    "register_encoder",
    "register_head",
    "reliability_curve",
    "render_html",
    "save_head",
    "save_model",
    "site_holdout",
    "train_model",
]
