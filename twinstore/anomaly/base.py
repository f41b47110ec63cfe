"""The detector contract, river's: ``learn_one(x)`` and ``score_one(x) -> float``.

``x`` is one update of a feature, a mapping from property name to number. A higher score is more
unusual; the scale is the detector's own. A :class:`Filter` is a detector that also decides: it
has a :attr:`~Filter.threshold` and ``classify(score) -> bool``. Wrappers (see
:mod:`twinstore.anomaly.filters`) turn a detector into a filter, as river's ``ThresholdFilter``
does, instead of each detector growing flags.

The stream protocol every caller follows, per feature and in revision order, is :func:`step`:
score the update with the state as it was, classify the score, then learn the update (a filter
keeps anomalous updates out of its detector). Calling ``score_one`` never changes what a detector
will say later; ``learn_one`` is the only method that moves it on.

Checkpoints are :func:`checkpoint` / :func:`restore`: a detector restored from a checkpoint gives
the same scores, bit for bit, as the one that wrote it would have given.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "Detector",
    "Explainer",
    "Features",
    "Filter",
    "Rebasable",
    "Teachable",
    "Verdict",
    "checkpoint",
    "numeric",
    "restore",
    "step",
]

Features = Mapping[str, float]

CHECKPOINT_FORMAT = 1


@runtime_checkable
class Detector(Protocol):
    """river's anomaly detector contract."""

    def learn_one(self, x: Features) -> None:
        """Move the model on by one (normal) update."""

    def score_one(self, x: Features) -> float:
        """How unusual ``x`` is for the model as it is now (higher is more unusual)."""


@runtime_checkable
class Filter(Detector, Protocol):
    """A detector that also says whether a score is an anomaly."""

    @property
    def threshold(self) -> float:
        """The score above which an update is anomalous (``inf`` while calibrating)."""

    def classify(self, score: float) -> bool:
        """Whether ``score``, the score of the next update, makes that update anomalous."""


@runtime_checkable
class Explainer(Protocol):
    """A detector that can split a score among the properties that produced it."""

    def contributions(self, x: Features) -> dict[str, float]:
        """Each property's share of ``score_one(x)`` (the shares add up to the score)."""


@runtime_checkable
class Rebasable(Protocol):
    """A detector that can take an update as its new centre of normal (used when an alarm fades)."""

    def rebase(self, x: Features) -> None:
        """Treat ``x`` as the new normal operating point (the spread learnt so far is kept)."""


@runtime_checkable
class Teachable(Protocol):
    """A filter that can learn an update as normal past its protection (operator feedback)."""

    def teach(self, x: Features) -> None:
        """Learn ``x`` as normal even where it scores anomalous (a false-alarm label)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :func:`step` found for one update."""

    score: float
    anomaly: bool
    threshold: float


def step(detector: Filter, x: Features) -> Verdict:
    """Score ``x``, classify the score, then learn ``x``: one update of a live stream.

    >>> from twinstore.anomaly.filters import ThresholdFilter
    >>> from twinstore.anomaly.detectors import MahalanobisDetector
    >>> f = ThresholdFilter(MahalanobisDetector(warmup=3), threshold=9.0)
    >>> [step(f, {"t": v}).anomaly for v in (1.0, 2.0, 3.0, 2.5, 40.0)]
    [False, False, False, False, True]
    """
    score = detector.score_one(x)
    anomaly = detector.classify(score)
    detector.learn_one(x)
    return Verdict(score, anomaly, detector.threshold)


def numeric(x: Features) -> dict[str, float]:
    """The finite numbers of ``x`` as floats; booleans, NaN, infinities and non-numbers are left out.

    >>> numeric({"a": 1, "b": True, "c": float("nan"), "d": "7", "e": 2.5})
    {'a': 1.0, 'e': 2.5}
    """
    out: dict[str, float] = {}
    for key, value in x.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = float(value)
        if math.isfinite(number):
            out[key] = number
    return out


class CheckpointError(ValueError):
    """The bytes are not a detector checkpoint this version can read."""


def checkpoint(detector: Detector) -> bytes:
    """The detector's whole state as bytes (a format byte, then a pickle).

    Caches are not part of the state: a detector restored from these bytes scores exactly as
    ``detector`` would. Only restore bytes the service wrote itself: a pickle can run code.

    >>> from twinstore.anomaly.detectors import MahalanobisDetector
    >>> d = MahalanobisDetector(warmup=2)
    >>> for v in (1.0, 3.0):
    ...     d.learn_one({"t": v})
    >>> restore(checkpoint(d)).score_one({"t": 4.0}) == d.score_one({"t": 4.0})
    True
    """
    return bytes([CHECKPOINT_FORMAT]) + pickle.dumps(detector, protocol=pickle.HIGHEST_PROTOCOL)


def restore(data: bytes) -> Detector:
    """The detector saved by :func:`checkpoint`."""
    if not data or data[0] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a detector checkpoint of format {CHECKPOINT_FORMAT}")
    detector = pickle.loads(data[1:])  # our own checkpoints only (see checkpoint)
    if not isinstance(detector, Detector):
        raise CheckpointError("the checkpoint does not hold a detector")
    return detector
