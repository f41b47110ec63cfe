"""A histogram of observations in fixed buckets, counted in place for ``/metrics``.

The parts that observe in a hot path (the journal's group commit, the HTTP middleware, the
anomaly scorer) keep one of these and :mod:`twinstore.metrics` reads it at scrape time. All of
them run on one event loop, so an observation is a ``bisect`` and two additions, without the
locks prometheus_client's own histogram takes for threads.

>>> h = Histogram((0.1, 1.0))
>>> for value in (0.05, 0.1, 0.5, 3.0):
...     h.observe(value)
>>> h.cumulative(), h.count, h.sum
([2, 3, 4], 4, 3.65)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["BATCH_BUCKETS", "SCORE_BUCKETS", "SECONDS_BUCKETS", "Histogram"]

# request and commit latencies (seconds): 1 ms .. 10 s
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# group-commit batch sizes (write requests per transaction)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# anomaly scores: detectors score >= 0, typical alarms from ~1 to ~100
SCORE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 25.0, 50.0, 100.0, 1000.0)


class Histogram:
    """Counts per bucket (``value <= bound``, Prometheus' ``le``), their sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if value != value:  # NaN: not an observation of anything
            return
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Observations at or below each bound, then in all (the ``+Inf`` bucket)."""
        total = 0
        out = []
        for n in self.counts:
            total += n
            out.append(total)
        return out
