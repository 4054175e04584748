"""NFE-sweep evaluation: samples per solver and budget, FID / IS / trajectory error / time.

``evaluate_sweep`` (and ``SweepEngine``, which keeps the reference solutions between runs) is
the one engine behind ``bafm eval-nfe-sweep`` and the training callback. Modules depend one way:
``plan`` (points, settings, columns) <- ``points`` <- ``engine`` <- ``inputs`` (built from a
config) and ``report`` (all writing) <- ``sweep`` (the command).
"""

from bafm.eval.engine import (
    COLUMNS,
    ReferenceCache,
    SweepEngine,
    SweepInputError,
    SweepResult,
    SweepSettings,
    evaluate_sweep,
    plan_sweep,
)
from bafm.eval.features import ClassifierFeatures, FeatureExtractor, InceptionFeatures
from bafm.eval.metrics import FeatureStats, feature_statistics, frechet_distance, inception_score

__all__ = [
    "COLUMNS",
    "ClassifierFeatures",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatures",
    "ReferenceCache",
    "SweepEngine",
    "SweepInputError",
    "SweepResult",
    "SweepSettings",
    "evaluate_sweep",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "plan_sweep",
]
