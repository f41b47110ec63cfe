"""Online anomaly detection on feature updates (issue 7): detectors on river's contract.

- :mod:`~twinstore.anomaly.base`: the contract (``learn_one`` / ``score_one``, ``classify``),
  :func:`step` (score, classify, learn: one live update) and checkpoints.
- :mod:`~twinstore.anomaly.filters`: wrappers that make alarms out of scores (warm-up quantile
  threshold that keeps anomalies out of learning, persistence, smoothing).
- :mod:`~twinstore.anomaly.detectors`: twinstore's multivariate detector, river's detectors
  adapted, and the registry that builds them by name.
- :mod:`~twinstore.anomaly.skab`: the SKAB benchmark's files and its outlier-detection scoring.

Pure computation: no I/O but reading SKAB files on request, nothing shared between detectors.
"""

from twinstore.anomaly.base import (
    CheckpointError,
    Detector,
    Filter,
    Verdict,
    checkpoint,
    restore,
    step,
)
from twinstore.anomaly.detectors import (
    DEFAULT_DETECTOR,
    REGISTRY,
    MahalanobisDetector,
    RiverDetector,
    UnknownDetectorError,
    create,
    describe,
)
from twinstore.anomaly.filters import Persistence, QuantileThreshold, Smooth, ThresholdFilter

__all__ = [
    "DEFAULT_DETECTOR",
    "REGISTRY",
    "CheckpointError",
    "Detector",
    "Filter",
    "MahalanobisDetector",
    "Persistence",
    "QuantileThreshold",
    "RiverDetector",
    "Smooth",
    "ThresholdFilter",
    "UnknownDetectorError",
    "Verdict",
    "checkpoint",
    "create",
    "describe",
    "restore",
    "step",
]
