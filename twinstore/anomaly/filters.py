"""Wrappers that turn a detector into a filter and shape its alarms (river's wrapper idea).

A live detector is a stack of wrappers around a model, outermost first::

    Smooth(                      # EWMA of each property, every update (no learning to protect)
        Persistence(             # k high scores in a row raise an alarm; held while it lasts
            QuantileThreshold(   # threshold from the warm-up scores; protects the model
                MahalanobisDetector())))

Each wrapper keeps the contract (``learn_one``, ``score_one``) and adds ``classify`` and
``threshold``. State that must follow every update (the smoothed values, the alarm counters)
lives in the outer wrappers, because a protecting filter does not pass anomalous updates inward:
river's ``protect_anomaly_detector`` keeps anomalies out of *learning*, not out of time.

Scores are cached per update (``score_one(x)`` then ``learn_one(x)`` scores once); the cache is
not state and is left out of checkpoints.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from twinstore.anomaly.base import Detector, Explainer, Features, Filter, Rebasable, Teachable, numeric

__all__ = ["Persistence", "QuantileThreshold", "Smooth", "ThresholdFilter", "quantile"]


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default method).

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    >>> quantile([5.0], 0.99)
    5.0
    """
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class _Wrapper:
    """Forwards the optional abilities (explain, rebase) to the wrapped detector."""

    _inner: Detector

    def contributions(self, x: Features) -> dict[str, float]:
        return self._inner.contributions(x) if isinstance(self._inner, Explainer) else {}

    def rebase(self, x: Features) -> None:
        if isinstance(self._inner, Rebasable):
            self._inner.rebase(x)
            self._forget()

    def teach(self, x: Features) -> None:
        """Learn ``x`` as normal even where it scores anomalous (an operator's false-alarm
        label): the innermost model learns it, past every protecting filter."""
        inner = self._inner
        if isinstance(inner, Teachable):
            inner.teach(x)
        else:
            inner.learn_one(x)
        self._forget()

    def _forget(self) -> None:
        """Drop cached scores (the model has moved)."""


class _Scored(_Wrapper):
    """A filter around a bare detector: caches the last score so learn_one does not score again."""

    def __init__(self) -> None:
        self._memo: tuple[dict[str, float], float] | None = None

    def score_one(self, x: Features) -> float:
        memo = self._memo
        if memo is not None and memo[0] == x:
            return memo[1]
        score = float(self._inner.score_one(x))
        self._memo = (dict(x), score)
        return score

    def _forget(self) -> None:
        self._memo = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memo": None}


class ThresholdFilter(_Scored):
    """A fixed threshold; with ``protect`` the detector does not learn anomalous updates.

    >>> from twinstore.anomaly.detectors import MahalanobisDetector
    >>> f = ThresholdFilter(MahalanobisDetector(warmup=2), threshold=4.0)
    >>> for v in (1.0, 3.0):
    ...     f.learn_one({"t": v})
    >>> f.score_one({"t": 8.0}), f.classify(f.score_one({"t": 8.0}))
    (36.0, True)
    """

    def __init__(self, detector: Detector, threshold: float, protect: bool = True) -> None:
        super().__init__()
        self.detector = detector
        self.protect = protect
        self._inner = detector
        self._threshold = threshold

    @property
    def threshold(self) -> float:
        return self._threshold

    def classify(self, score: float) -> bool:
        return score > self._threshold

    def learn_one(self, x: Features) -> None:
        if not (self.protect and self.classify(self.score_one(x))):
            self.detector.learn_one(x)
            self._memo = None


class QuantileThreshold(_Scored):
    """Threshold = ``factor`` x the ``q`` quantile of the detector's scores on its warm-up updates.

    The first ``warmup`` updates are learnt and kept (``8 * warmup * properties`` bytes, freed
    afterwards); once the last is learnt they are scored by the trained detector and the threshold
    is set, as SKAB's baselines set their upper control limit (quantile of the training residuals
    times a margin). Until then the threshold is infinite: nothing is anomalous while warming up.
    Afterwards, with ``protect``, updates classified anomalous are not learnt.

    >>> from twinstore.anomaly.detectors import MahalanobisDetector
    >>> f = QuantileThreshold(MahalanobisDetector(warmup=4), warmup=4, q=1.0, factor=2.0)
    >>> for v in (1.0, 2.0, 3.0, 2.0):
    ...     f.learn_one({"t": v})
    >>> round(f.threshold, 3), f.classify(f.score_one({"t": 2.5})), f.classify(f.score_one({"t": 9.0}))
    (4.0, False, True)
    """

    def __init__(
        self,
        detector: Detector,
        warmup: int = 400,
        q: float = 0.99,
        factor: float = 1.5,
        protect: bool = True,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.warmup = warmup
        self.q = q
        self.factor = factor
        self.protect = protect
        self._inner = detector
        self._threshold = math.inf
        self._seen = 0
        self._keys: tuple[str, ...] | None = None
        self._rows: array[float] | None = array("d")

    @property
    def threshold(self) -> float:
        return self._threshold

    def classify(self, score: float) -> bool:
        return score > self._threshold

    def learn_one(self, x: Features) -> None:
        if self._rows is None:
            if not (self.protect and self.classify(self.score_one(x))):
                self.detector.learn_one(x)
                self._memo = None
            return
        if self._keys is None:
            self._keys = tuple(sorted(numeric(x)))
        self._rows.extend(float(x.get(k, math.nan)) for k in self._keys)
        self.detector.learn_one(x)
        self._memo = None
        self._seen += 1
        if self._seen >= self.warmup:
            self._calibrate()

    def _calibrate(self) -> None:
        keys, rows = self._keys or (), self._rows or array("d")
        width = len(keys)
        scores = []
        for start in range(0, len(rows), max(width, 1)):
            values = rows[start : start + width]
            row = {k: v for k, v in zip(keys, values, strict=True) if not math.isnan(v)}
            scores.append(float(self.detector.score_one(row)))
        self._threshold = self.factor * quantile(scores, self.q) if scores else math.inf
        self._rows = None


class Persistence(_Wrapper):
    """Alarms from runs of high scores: raised after ``k`` in a row, held while the anomaly lasts.

    The alarm ends after ``release`` scores in a row at or under the threshold, or after
    ``release`` scores in a row under ``peak_ratio`` x the highest score of the alarm: the cause
    has gone even if the process did not come back exactly where it was; then the wrapped
    detector is rebased on the current update (the offset that is left is the new normal).
    ``peak_ratio=0`` turns that off. While the alarm is on nothing is learnt (``protect``).

    >>> from twinstore.anomaly.detectors import MahalanobisDetector
    >>> f = Persistence(ThresholdFilter(MahalanobisDetector(warmup=2), threshold=4.0), k=2, release=2)
    >>> for v in (1.0, 3.0):
    ...     f.learn_one({"t": v})
    >>> alarms = []
    >>> for v in (2.0, 9.0, 9.0, 9.0, 2.0, 2.0, 2.0):
    ...     alarms.append(f.classify(f.score_one({"t": v})))
    ...     f.learn_one({"t": v})
    >>> alarms
    [False, False, True, True, True, False, False]
    """

    def __init__(
        self, filter: Filter, k: int = 5, release: int = 30, peak_ratio: float = 0.2, protect: bool = True
    ) -> None:
        self.filter = filter
        self.k = k
        self.release = release
        self.peak_ratio = peak_ratio
        self.protect = protect
        self._inner = filter
        self._alarm = False
        self._above = 0
        self._below = 0
        self._peak = 0.0
        self._fading = 0

    @property
    def threshold(self) -> float:
        return self.filter.threshold

    def score_one(self, x: Features) -> float:
        return self.filter.score_one(x)

    def classify(self, score: float) -> bool:
        return self._next(score)[0]

    def _next(self, score: float) -> tuple[bool, int, int, float, int, bool]:
        over = self.filter.classify(score)
        above = self._above + 1 if over else 0
        below = 0 if over else self._below + 1
        alarm, peak, fading, rebase = self._alarm, self._peak, self._fading, False
        if alarm:
            peak = max(peak, score)
            fading = fading + 1 if score < self.peak_ratio * peak else 0
        if not alarm and above >= self.k:
            alarm, peak, fading = True, score, 0
        elif alarm and below >= self.release:
            alarm = False
        elif alarm and self.peak_ratio > 0 and fading >= self.release:
            alarm, rebase = False, True
        return alarm, above, below, peak, fading, rebase

    def learn_one(self, x: Features) -> None:
        alarm, self._above, self._below, self._peak, self._fading, rebase = self._next(self.score_one(x))
        self._alarm = alarm
        if rebase:
            self.rebase(x)
        if not (self.protect and alarm):
            self.filter.learn_one(x)


class Smooth(_Wrapper):
    """Exponentially weighted moving average of each property before the wrapped filter sees it.

    ``alpha`` is the weight of the newest update (1.0: no smoothing). A property missing from an
    update keeps its last smoothed value. The average moves on every update, anomalous or not.

    >>> from twinstore.anomaly.detectors import MahalanobisDetector
    >>> f = Smooth(ThresholdFilter(MahalanobisDetector(warmup=2), threshold=4.0), alpha=0.5)
    >>> f.learn_one({"t": 0.0})
    >>> f.smoothed({"t": 4.0})
    {'t': 2.0}
    """

    def __init__(self, filter: Filter, alpha: float = 0.1) -> None:
        self.filter = filter
        self.alpha = alpha
        self._inner = filter
        self._level: dict[str, float] = {}

    @property
    def threshold(self) -> float:
        return self.filter.threshold

    def smoothed(self, x: Features) -> dict[str, float]:
        """The averages after ``x`` (without moving them)."""
        level = dict(self._level)
        alpha = self.alpha
        for key, value in numeric(x).items():
            previous = level.get(key)
            level[key] = value if previous is None else previous + alpha * (value - previous)
        return level

    def score_one(self, x: Features) -> float:
        return self.filter.score_one(self.smoothed(x))

    def classify(self, score: float) -> bool:
        return self.filter.classify(score)

    def learn_one(self, x: Features) -> None:
        self._level = self.smoothed(x)
        self.filter.learn_one(self._level)

    def contributions(self, x: Features) -> dict[str, float]:
        return super().contributions(self.smoothed(x))
