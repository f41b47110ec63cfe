"""One check suite every detector passes (river's idea), then the wrappers' and registry's own rules.

Every detector, bare model or full registry stack: it learns (an outlier scores above normal
updates once warmed up, and learning changes scores), ``score_one`` changes nothing, the same
seed gives the same scores, a checkpoint restored anywhere in the stream gives identical scores
and verdicts afterwards, and its memory stops growing after the warm-up (within a budget).
"""

from __future__ import annotations

import math
import random
import tracemalloc
from collections.abc import Callable

import pytest

from twinstore.anomaly import (
    REGISTRY,
    Detector,
    Filter,
    MahalanobisDetector,
    Persistence,
    QuantileThreshold,
    RiverDetector,
    Smooth,
    ThresholdFilter,
    UnknownDetectorError,
    checkpoint,
    create,
    describe,
    restore,
    step,
)
from twinstore.anomaly.base import CheckpointError
from twinstore.anomaly.detectors import half_space_trees, local_outlier_factor, one_class_svm

WARMUP = 100
KIB = 1024


def stream(n: int, seed: int = 0, start: int = 0) -> list[dict[str, float]]:
    """Eight correlated signals with a slow cycle and noise, like a pump's telemetry."""
    rng = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        cycle = math.sin(i / 8)
        base = rng.gauss(0.0, 1.0)
        rows.append(
            {f"s{j}": 10.0 * j + cycle * (j % 3) + 0.3 * base + rng.gauss(0.0, 0.2) for j in range(8)}
        )
    return rows


def outlier(row: dict[str, float], shift: float = 25.0) -> dict[str, float]:
    return {k: v + shift for k, v in row.items()}


def stack(name: str) -> Callable[[int], Detector]:
    """A registry detector with a short warm-up (and the seed, if it takes one)."""
    seeded = "seed" in REGISTRY[name].defaults
    return lambda seed: create(name, {"warmup": WARMUP, **({"seed": seed} if seeded else {})})


# name -> (factory taking a seed, memory budget in bytes after the warm-up)
FACTORIES: dict[str, tuple[Callable[[int], Detector], int]] = {
    "mahalanobis": (lambda seed: MahalanobisDetector(warmup=WARMUP), 16 * KIB),
    "mahalanobis-shrunk": (lambda seed: MahalanobisDetector(warmup=WARMUP, shrinkage=0.3), 16 * KIB),
    "half-space-trees-model": (lambda seed: half_space_trees(seed=seed), 4096 * KIB),
    "one-class-svm-model": (lambda seed: one_class_svm(), 64 * KIB),
    "local-outlier-factor-model": (lambda seed: local_outlier_factor(window_size=200), 1024 * KIB),
    **{
        f"stack:{name}": (
            stack(name),
            100 * KIB if name == "mahalanobis" else 4096 * KIB,
        )
        for name in REGISTRY
    },
    "threshold-filter": (
        lambda seed: ThresholdFilter(MahalanobisDetector(warmup=WARMUP), threshold=9.0),
        16 * KIB,
    ),
}
IDS = sorted(FACTORIES)


def feed(detector: Detector, rows: list[dict[str, float]]) -> list[tuple[float, bool | None]]:
    """Stream ``rows``: score, classify (filters), learn; what was said for each row."""
    said: list[tuple[float, bool | None]] = []
    for row in rows:
        if isinstance(detector, Filter):
            verdict = step(detector, row)
            said.append((verdict.score, verdict.anomaly))
        else:
            score = detector.score_one(row)
            detector.learn_one(row)
            said.append((score, None))
    return said


@pytest.fixture(params=IDS)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make(name: str, seed: int = 7) -> Detector:
    return FACTORIES[name][0](seed)


def test_follows_the_contract(name: str) -> None:
    detector = make(name)
    assert isinstance(detector, Detector)
    scores = [score for score, _ in feed(detector, stream(2 * WARMUP + 50))]
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)


def test_learns(name: str) -> None:
    rows = stream(3 * WARMUP)
    detector = make(name)
    feed(detector, rows)
    probe = stream(20, seed=99, start=len(rows))
    normal = sum(detector.score_one(r) for r in probe) / len(probe)
    # river's OneClassSVM is linear: it sees outliers on one side only, so both sides are tried
    high = sum(detector.score_one(outlier(r)) for r in probe) / len(probe)
    low = sum(detector.score_one(outlier(r, -25.0)) for r in probe) / len(probe)
    assert max(high, low) > normal
    fresh = make(name)
    assert [fresh.score_one(r) for r in probe] != [detector.score_one(r) for r in probe]


def test_scoring_changes_nothing(name: str) -> None:
    rows, probe = stream(2 * WARMUP), stream(30, seed=5)
    quiet, busy = make(name), make(name)
    for row in rows:
        for extra in probe[:3]:
            busy.score_one(extra)
            busy.score_one(outlier(extra))
        quiet.learn_one(row)
        busy.learn_one(row)
    assert [quiet.score_one(r) for r in probe] == [busy.score_one(r) for r in probe]


def test_deterministic_with_a_seed(name: str) -> None:
    rows = stream(2 * WARMUP + 100, seed=3)
    assert feed(make(name, seed=11), rows) == feed(make(name, seed=11), rows)


@pytest.mark.parametrize("cut", [WARMUP // 2, WARMUP + 60])
def test_checkpoint_restore_gives_identical_scores(name: str, cut: int) -> None:
    rows = stream(2 * WARMUP + 100, seed=4)
    rows[WARMUP + 80 : WARMUP + 90] = [outlier(r) for r in rows[WARMUP + 80 : WARMUP + 90]]
    original = make(name)
    feed(original, rows[:cut])
    copy = restore(checkpoint(original))
    assert type(copy) is type(original)
    assert feed(copy, rows[cut:]) == feed(original, rows[cut:])


def test_memory_is_bounded(name: str) -> None:
    budget = FACTORIES[name][1]
    rows = stream(4 * WARMUP + 400, seed=6)
    make(name)  # imports and caches of the libraries are not the detector's
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        detector = make(name)
        feed(detector, rows[: 2 * WARMUP + 200])
        warm = tracemalloc.get_traced_memory()[0] - before
        feed(detector, rows[2 * WARMUP + 200 :])
        later = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert warm <= budget, f"{warm} bytes after the warm-up, budget {budget}"
    assert later <= warm * 1.1 + 2 * KIB, f"grew from {warm} to {later} bytes"
    assert len(checkpoint(detector)) <= budget


# The wrappers' own rules.


def test_protected_model_does_not_learn_anomalies() -> None:
    rows = stream(2 * WARMUP, seed=8)
    burst = [outlier(r) for r in stream(40, seed=9)]
    guarded = MahalanobisDetector(warmup=WARMUP, forget=0.05)
    threshold = QuantileThreshold(guarded, warmup=WARMUP, q=0.99, factor=1.5)
    alarms = Persistence(threshold, k=1, release=5, peak_ratio=0)
    reference = MahalanobisDetector(warmup=WARMUP, forget=0.05)
    feed(alarms, rows)
    for row in rows:
        reference.learn_one(row)
    assert [v for _, v in feed(alarms, burst)] == [True] * len(burst)
    probe = stream(5, seed=10)
    assert [guarded.score_one(r) for r in probe] == [reference.score_one(r) for r in probe]


def test_quiet_while_warming_up() -> None:
    detector = create("mahalanobis", {"warmup": WARMUP})
    rows = [outlier(r) if i % 7 == 0 else r for i, r in enumerate(stream(WARMUP))]
    said = feed(detector, rows[:-1])
    assert not any(anomaly for _, anomaly in said)
    assert detector.threshold == math.inf
    feed(detector, rows[-1:])
    assert 0 < detector.threshold < math.inf


def test_alarm_needs_k_in_a_row_and_ends_when_the_cause_fades() -> None:
    detector = create("mahalanobis", {"warmup": WARMUP, "alpha": 1.0, "k": 3, "release": 5})
    feed(detector, stream(2 * WARMUP))
    spike = [outlier(r) for r in stream(2, seed=1, start=2 * WARMUP)]
    assert [a for _, a in feed(detector, spike)] == [False, False]
    episode = [outlier(r) for r in stream(20, seed=2, start=2 * WARMUP)]
    assert [a for _, a in feed(detector, episode)][2:] == [True] * 18
    after = [a for _, a in feed(detector, stream(30, seed=3, start=2 * WARMUP + 20))]
    assert after[:4] == [True] * 4 and not any(after[5:])


def test_contributions_name_the_property_that_moved() -> None:
    detector = create("mahalanobis", {"warmup": WARMUP, "alpha": 1.0})
    rows = stream(2 * WARMUP)
    feed(detector, rows)
    odd = {**rows[-1], "s5": rows[-1]["s5"] + 10.0}
    shares = detector.contributions(odd)
    assert max(shares, key=lambda k: shares[k]) == "s5"
    assert sum(shares.values()) == pytest.approx(detector.score_one(odd))


def test_missing_and_non_numeric_properties() -> None:
    detector = create("mahalanobis", {"warmup": WARMUP})
    feed(detector, stream(2 * WARMUP))
    row = dict(stream(1, start=2 * WARMUP)[0])
    del row["s3"]
    weird: dict[str, object] = {**row, "state": "running", "flag": True, "s4": float("nan")}
    assert math.isfinite(detector.score_one(weird))  # type: ignore[arg-type]
    detector.learn_one(weird)  # type: ignore[arg-type]


def test_smooth_averages_every_update() -> None:
    smooth = Smooth(ThresholdFilter(MahalanobisDetector(warmup=2), threshold=1e9), alpha=0.5)
    for value in (0.0, 4.0, 8.0):
        smooth.learn_one({"t": value})
    assert smooth.smoothed({}) == {"t": 5.0}


# The registry.


def test_registry_builds_every_detector_with_its_defaults() -> None:
    listed = {entry["name"] for entry in describe()}
    assert listed == set(REGISTRY)
    assert listed >= {"mahalanobis", "half-space-trees", "one-class-svm", "local-outlier-factor"}
    for name in REGISTRY:
        assert isinstance(create(name), Filter)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("isolation-forest", {}, "no detector"),
        ("mahalanobis", {"colour": 1}, "no parameter 'colour'"),
        ("mahalanobis", {"k": 0}, "between"),
        ("mahalanobis", {"k": 2.5}, "integer"),
        ("mahalanobis", {"alpha": "0.1"}, "number"),
        ("mahalanobis", {"q": True}, "number"),
        ("mahalanobis", {"factor": float("nan")}, "between"),
        ("one-class-svm", {"seed": 1}, "no parameter 'seed'"),
    ],
)
def test_registry_refuses_bad_parameters(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(UnknownDetectorError, match=message):
        create(name, params)


def test_registry_parameters_reach_the_stack() -> None:
    top = create("half-space-trees", {"seed": 5, "n_trees": 3, "k": 4, "alpha": 0.5, "warmup": 10})
    assert isinstance(top, Smooth) and top.alpha == 0.5
    assert isinstance(top.filter, Persistence) and top.filter.k == 4
    assert isinstance(top.filter.filter, QuantileThreshold) and top.filter.filter.warmup == 10
    model = top.filter.filter.detector
    assert isinstance(model, RiverDetector) and model.model["HalfSpaceTrees"].n_trees == 3


def test_restore_refuses_other_bytes() -> None:
    with pytest.raises(CheckpointError):
        restore(b"")
    with pytest.raises(CheckpointError):
        restore(b"\x09not a checkpoint")
