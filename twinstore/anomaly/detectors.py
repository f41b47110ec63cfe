"""Anomaly detectors on river's contract, river's own detectors adapted to it, and the registry.

- :class:`MahalanobisDetector`: twinstore's multivariate detector. The warm-up fixes each
  property's centre and spread (and, with ``shrinkage`` < 1, their correlations); the score is
  the squared Mahalanobis distance per property. O(properties) per update with the default
  diagonal form, a few hundred bytes of state.
- :class:`RiverDetector`: any river anomaly detector (or river pipeline) behind the same
  contract; :func:`half_space_trees`, :func:`one_class_svm` and :func:`local_outlier_factor`
  build the ones the registry offers.
- :data:`REGISTRY` / :func:`create`: detectors by name with checked parameters, each built as
  the full stack of :mod:`twinstore.anomaly.filters` (smoothing, persistence, a warm-up quantile
  threshold that protects the model), which is what the REST API will hand out per feature.

>>> import random
>>> from twinstore.anomaly.base import step
>>> rng = random.Random(3)
>>> det = create("mahalanobis", {"warmup": 50})
>>> for _ in range(80):
...     verdict = step(det, {"flow": rng.gauss(32.0, 0.4), "pressure": rng.gauss(1.0, 0.05)})
>>> [step(det, {"flow": 28.0, "pressure": 1.0}).anomaly for _ in range(6)]
[False, False, True, True, True, True]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinstore.anomaly.base import Detector, Features, Filter, numeric
from twinstore.anomaly.filters import Persistence, QuantileThreshold, Smooth

__all__ = [
    "ALARM_DEFAULTS",
    "DEFAULT_DETECTOR",
    "REGISTRY",
    "DetectorSpec",
    "MahalanobisDetector",
    "RiverDetector",
    "UnknownDetectorError",
    "create",
    "describe",
    "half_space_trees",
    "local_outlier_factor",
    "one_class_svm",
]

# A property that did not move during the warm-up still gets a spread, so that a later change
# scores high but finite: 1e-4 of its level (and at least 1e-9).
_MIN_STD_RELATIVE = 1e-4
_MIN_STD = 1e-9


class MahalanobisDetector:
    """Squared Mahalanobis distance from the warm-up's centre, divided by the number of properties.

    The properties are those of the first update (numbers only); a property missing later counts
    as being at its centre, new ones are ignored. The first ``warmup`` updates are learnt
    (Welford), then the spread is fixed and the centre follows normal updates with weight
    ``forget`` (0: fixed). ``shrinkage`` pulls the covariance towards its diagonal: 1.0 (the
    default) scores each property on its own spread, 0.0 uses the full sample covariance.
    Scores are 0 during the warm-up. Deterministic: no randomness at all.

    >>> import random
    >>> rng = random.Random(42)
    >>> d = MahalanobisDetector(warmup=200, shrinkage=0.2)
    >>> for _ in range(200):
    ...     t = rng.gauss(70.0, 1.0)
    ...     d.learn_one({"temperature": t, "current": 0.05 * t + rng.gauss(0.0, 0.02)})
    >>> normal = d.score_one({"temperature": 71.0, "current": 3.55})
    >>> broken = d.score_one({"temperature": 71.0, "current": 3.30})  # current off its relation
    >>> round(normal, 2), round(broken, 2)
    (0.41, 23.65)
    >>> max(d.contributions({"temperature": 71.0, "current": 3.30}).items(), key=lambda kv: kv[1])[0]
    'current'
    """

    def __init__(self, warmup: int = 400, shrinkage: float = 1.0, forget: float = 0.003) -> None:
        self.warmup = warmup
        self.shrinkage = shrinkage
        self.forget = forget
        self._keys: tuple[str, ...] | None = None
        self._n = 0
        self._mean: list[float] = []
        self._comoment: list[list[float]] = []
        self._inv_var: list[float] | None = None
        self._var: list[float] = []  # the sample variances (diagonal), before the floor
        self._cov: np.ndarray[Any, np.dtype[np.float64]] | None = None  # full covariance only
        self._precision: np.ndarray[Any, np.dtype[np.float64]] | None = None

    @property
    def ready(self) -> bool:
        """Whether the warm-up is over."""
        return self._n >= self.warmup

    def _vector(self, x: Features) -> list[float]:
        values = numeric(x)
        return [values.get(k, m) for k, m in zip(self._keys or (), self._mean, strict=True)]

    def learn_one(self, x: Features) -> None:
        if self._keys is None:
            self._keys = tuple(sorted(numeric(x)))
            width = len(self._keys)
            self._mean = [0.0] * width
            self._comoment = [[0.0] * width for _ in range(width)]
        v = self._vector(x)
        if self.ready:
            if self.forget > 0:
                self._mean = [m + self.forget * (vi - m) for vi, m in zip(v, self._mean, strict=True)]
            return
        self._n += 1
        before = [vi - m for vi, m in zip(v, self._mean, strict=True)]
        self._mean = [m + d / self._n for m, d in zip(self._mean, before, strict=True)]
        after = [vi - m for vi, m in zip(v, self._mean, strict=True)]
        full = self.shrinkage < 1
        for i, row in enumerate(self._comoment):
            if full:
                for j in range(len(row)):
                    row[j] += before[i] * after[j]
            else:
                row[i] += before[i] * after[i]
        if self.ready:
            self._fit()

    def _fit(self) -> None:
        n = max(self._n, 1)
        self._set_spread(np.array(self._comoment, dtype=np.float64) / n)
        self._comoment = []

    def _set_spread(self, cov: np.ndarray[Any, np.dtype[np.float64]]) -> None:
        width = len(self._mean)
        floor = [max(_MIN_STD, _MIN_STD_RELATIVE * abs(m)) ** 2 for m in self._mean]
        var = np.maximum(np.diag(cov), floor)
        if self.shrinkage >= 1:
            self._inv_var = [float(1.0 / s) for s in var]
            self._var = [float(s) for s in np.diag(cov)]
        else:
            self._cov = cov
            shrunk = (1 - self.shrinkage) * cov
            shrunk[np.diag_indices(width)] = var
            self._precision = np.asarray(np.linalg.pinv(shrunk), dtype=np.float64)

    def teach(self, x: Features) -> None:
        """Learn ``x`` as normal, spread included (an operator's false-alarm label): after the
        warm-up it counts as one more warm-up update, so the centre and the spread take it in.

        >>> d = MahalanobisDetector(warmup=4, forget=0.0)
        >>> for t in (1.0, 2.0, 1.0, 2.0):
        ...     d.learn_one({"t": t})
        >>> before = d.score_one({"t": 9.0})
        >>> d.teach({"t": 9.0})
        >>> round(before, 1), round(d.score_one({"t": 9.0}), 1)
        (225.0, 3.9)
        """
        if not self.ready or self._keys is None:
            self.learn_one(x)
            return
        v = self._vector(x)
        n = self._n + 1
        before = np.array([vi - m for vi, m in zip(v, self._mean, strict=True)])
        mean = [float(m + d / n) for m, d in zip(self._mean, before, strict=True)]
        after = np.array([vi - m for vi, m in zip(v, mean, strict=True)])
        if self.shrinkage >= 1:
            # checkpoints written before teach() existed have no _var: the floored spread then
            var = getattr(self, "_var", None) or [1.0 / w for w in self._inv_var or ()]
            cov = np.diag(np.array(var) * (n - 1) / n + before * after / n)
        else:
            known = getattr(self, "_cov", None)
            if known is None:
                assert self._precision is not None
                known = np.asarray(np.linalg.pinv(self._precision), dtype=np.float64)
            cov = known * (n - 1) / n + np.outer(before, after) / n
        self._n, self._mean = n, mean
        self._set_spread(cov)

    def _deviation(self, x: Features) -> list[float]:
        return [vi - m for vi, m in zip(self._vector(x), self._mean, strict=True)]

    def score_one(self, x: Features) -> float:
        if not self.ready or not self._mean:
            return 0.0
        d = self._deviation(x)
        if self._inv_var is not None:
            return sum(di * di * w for di, w in zip(d, self._inv_var, strict=True)) / len(d)
        dv = np.array(d)
        return float(dv @ self._precision @ dv) / len(d)

    def contributions(self, x: Features) -> dict[str, float]:
        """Each property's share of the score (the shares add up to ``score_one(x)``)."""
        if not self.ready or not self._mean:
            return {}
        d, keys, width = self._deviation(x), self._keys or (), len(self._mean)
        if self._inv_var is not None:
            shares = [di * di * w / width for di, w in zip(d, self._inv_var, strict=True)]
        else:
            dv = np.array(d)
            shares = [float(s) / width for s in dv * (self._precision @ dv)]
        return dict(zip(keys, shares, strict=True))

    def rebase(self, x: Features) -> None:
        """Take ``x`` as the centre (after the warm-up only; the spread is kept)."""
        if self.ready and self._mean:
            self._mean = self._vector(x)


class RiverDetector:
    """A river anomaly detector (``river.anomaly.*`` or a river pipeline ending in one).

    >>> import random
    >>> from river import anomaly, preprocessing
    >>> rng = random.Random(1)
    >>> trees = anomaly.HalfSpaceTrees(n_trees=5, height=6, window_size=50, seed=1)
    >>> d = RiverDetector(preprocessing.MinMaxScaler() | trees)
    >>> for _ in range(200):
    ...     d.learn_one({"y": rng.gauss(1.0, 0.1)})
    >>> round(d.score_one({"y": 1.0}), 3), round(d.score_one({"y": 1.9}), 3)
    (0.849, 0.967)
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def learn_one(self, x: Features) -> None:
        self.model.learn_one(numeric(x))

    def score_one(self, x: Features) -> float:
        return float(self.model.score_one(numeric(x)))


def half_space_trees(
    n_trees: int = 10, height: int = 8, window_size: int = 250, seed: int = 0
) -> RiverDetector:
    """river's HalfSpaceTrees behind a MinMaxScaler (the trees expect values in [0, 1])."""
    from river import anomaly, preprocessing

    return RiverDetector(
        preprocessing.MinMaxScaler()
        | anomaly.HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, seed=seed)
    )


def one_class_svm(nu: float = 0.1) -> RiverDetector:
    """river's stochastic one-class SVM behind a StandardScaler."""
    from river import anomaly, preprocessing

    return RiverDetector(preprocessing.StandardScaler() | anomaly.OneClassSVM(nu=nu))


def local_outlier_factor(n_neighbors: int = 10, window_size: int = 400) -> RiverDetector:
    """river's LocalOutlierFactor over a sliding window, behind a StandardScaler."""
    from river import anomaly, neighbors, preprocessing

    engine = neighbors.LazySearch(window_size=window_size)
    return RiverDetector(
        preprocessing.StandardScaler() | anomaly.LocalOutlierFactor(n_neighbors=n_neighbors, engine=engine)
    )


Param = int | float

# The alarm stack every registry detector gets (chosen once on the SKAB tuning files: see
# bench/anomaly_offline.py --select). warmup is also the model's warm-up.
ALARM_DEFAULTS: Mapping[str, Param] = {
    "warmup": 400,  # updates learnt before anything is scored; the threshold comes from them
    "q": 0.99,  # quantile of the warm-up scores ...
    "factor": 1.5,  # ... times this margin is the threshold
    "k": 3,  # high scores in a row that raise an alarm
    "release": 30,  # low (or faded) scores in a row that end it
    "peak_ratio": 0.2,  # "faded": under this share of the alarm's highest score
    "alpha": 0.2,  # EWMA weight of the newest update (1.0: no smoothing)
}

_BOUNDS: Mapping[str, tuple[float, float]] = {
    "warmup": (1, 10**7),
    "q": (0.0, 1.0),
    "factor": (0.0, math.inf),
    "k": (1, 10**7),
    "release": (1, 10**7),
    "peak_ratio": (0.0, 1.0),
    "alpha": (1e-6, 1.0),
    "shrinkage": (0.0, 1.0),
    "forget": (0.0, 1.0),
    "n_trees": (1, 1000),
    "height": (1, 30),
    "window_size": (1, 100_000),
    "nu": (1e-6, 1.0),
    "n_neighbors": (1, 1000),
    "seed": (0, 2**63 - 1),
}


class UnknownDetectorError(ValueError):
    """No detector of that name, or a parameter it does not take, or a value out of its range."""


@dataclass(frozen=True)
class DetectorSpec:
    """A named detector: its model factory and the parameters (with defaults) it accepts."""

    name: str
    summary: str
    model: Callable[..., Detector]
    model_defaults: Mapping[str, Param]
    alarm_defaults: Mapping[str, Param] = field(default_factory=lambda: dict(ALARM_DEFAULTS))
    uses_warmup: bool = False  # the model takes the stack's warm-up length too

    @property
    def defaults(self) -> dict[str, Param]:
        return {**self.alarm_defaults, **self.model_defaults}


def _mahalanobis(warmup: int, shrinkage: float, forget: float) -> Detector:
    return MahalanobisDetector(warmup=warmup, shrinkage=shrinkage, forget=forget)


REGISTRY: Mapping[str, DetectorSpec] = {
    spec.name: spec
    for spec in (
        DetectorSpec(
            "mahalanobis",
            "twinstore's multivariate detector: distance from the warm-up's normal, per property spread",
            _mahalanobis,
            {"shrinkage": 1.0, "forget": 0.003},
            uses_warmup=True,
        ),
        DetectorSpec(
            "half-space-trees",
            "river HalfSpaceTrees behind a MinMaxScaler",
            half_space_trees,
            {"n_trees": 10, "height": 8, "window_size": 250, "seed": 0},
        ),
        DetectorSpec(
            "one-class-svm", "river OneClassSVM behind a StandardScaler", one_class_svm, {"nu": 0.1}
        ),
        DetectorSpec(
            "local-outlier-factor",
            "river LocalOutlierFactor over a sliding window, behind a StandardScaler",
            local_outlier_factor,
            {"n_neighbors": 10, "window_size": 400},
        ),
    )
}
DEFAULT_DETECTOR = "mahalanobis"


def _checked(name: str, value: object, default: Param) -> Param:
    low, high = _BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnknownDetectorError(f"parameter {name!r} must be a number, not {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if not (isinstance(value, int) or float(value).is_integer()):
            raise UnknownDetectorError(f"parameter {name!r} must be an integer, not {value!r}")
        value = int(value)
    else:
        value = float(value)
    if not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
        raise UnknownDetectorError(f"parameter {name!r} must be between {low} and {high}, not {value!r}")
    return value


def create(name: str = DEFAULT_DETECTOR, params: Mapping[str, object] | None = None) -> Filter:
    """A new detector stack by registry name, with ``params`` overriding the defaults.

    >>> create("half-space-trees", {"seed": 7, "k": 5}).filter.k
    5
    >>> create("mahalanobis", {"colour": 1})
    Traceback (most recent call last):
    ...
    twinstore.anomaly.detectors.UnknownDetectorError: 'mahalanobis' takes no parameter 'colour' ...
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise UnknownDetectorError(f"no detector {name!r} (known: {', '.join(sorted(REGISTRY))})")
    defaults = spec.defaults
    given = dict(params or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UnknownDetectorError(
            f"{name!r} takes no parameter {unknown[0]!r} (it takes: {', '.join(sorted(defaults))})"
        )
    p = {key: _checked(key, given.get(key, default), default) for key, default in defaults.items()}
    model_params = {key: p[key] for key in spec.model_defaults}
    if spec.uses_warmup:
        model_params["warmup"] = p["warmup"]
    model = spec.model(**model_params)
    threshold = QuantileThreshold(model, warmup=int(p["warmup"]), q=p["q"], factor=p["factor"])
    alarms = Persistence(threshold, k=int(p["k"]), release=int(p["release"]), peak_ratio=p["peak_ratio"])
    return Smooth(alarms, alpha=p["alpha"])


def describe() -> list[dict[str, object]]:
    """The registry as data (for an API listing): name, summary and default parameters."""
    return [{"name": s.name, "summary": s.summary, "parameters": s.defaults} for s in REGISTRY.values()]
