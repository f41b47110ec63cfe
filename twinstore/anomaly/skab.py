"""SKAB (Skoltech Anomaly Benchmark) files and its outlier-detection scoring, for online detectors.

The dataset is read where it lies (``../shared/datasets/skab`` in development; never copied into
the project): ``valve1/*.csv``, ``valve2/*.csv`` and ``other/*.csv``, 34 experiments with one
anomaly each, ``;``-separated, columns ``datetime``, eight sensor signals, ``anomaly`` and
``changepoint``. ``anomaly-free/`` is not part of the benchmark's scoring and is left out.

The protocol is the leaderboard's, made online. In SKAB's notebooks each file's first 400 rows
train the model (and set its threshold) and every row of the file is then labelled; F1, FAR and
MAR come from the confusion counts summed over all rows of all files (tsad's ``evaluating`` with
``metric='binary'``: ``F1 = TP / (TP + (FP + FN) / 2)``, ``FAR = FP / (FP + TN)``,
``MAR = FN / (FN + TP)``). Here a fresh detector sees each file as a live stream: every row is
scored with the state it had, classified, then learnt (:func:`~twinstore.anomaly.base.step`); the
first 400 rows are its warm-up, during which it raises nothing. :class:`Result` keeps the counts
over all rows (the leaderboard's figure) and over the online part alone (rows 400 on).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twinstore.anomaly.base import Filter, step

__all__ = [
    "SIGNALS",
    "TUNING_FILES",
    "WARMUP",
    "Confusion",
    "Result",
    "SkabFile",
    "evaluate",
    "load_skab",
    "run_file",
]

WARMUP = 400
GROUPS = ("valve1", "valve2", "other")
SIGNALS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)

# Hyper-parameters are chosen on these 17 files only (every other file, in path order) and the
# other 17 are held out; the figures are reported on both halves and on all 34.
TUNING_FILES = (
    "valve1/0.csv", "valve1/10.csv", "valve1/12.csv", "valve1/14.csv", "valve1/2.csv", "valve1/4.csv",
    "valve1/6.csv", "valve1/8.csv", "valve2/0.csv", "valve2/2.csv", "other/1.csv", "other/11.csv",
    "other/13.csv", "other/2.csv", "other/4.csv", "other/6.csv", "other/8.csv",
)  # fmt: skip


@dataclass(frozen=True)
class SkabFile:
    """One experiment: its path under the dataset root, the rows (signals only) and the labels."""

    name: str
    rows: tuple[dict[str, float], ...]
    labels: tuple[int, ...]


def load_skab(root: Path) -> list[SkabFile]:
    """The 34 benchmark files under ``root``, in path order (``other/1.csv``, ``other/10.csv``, ...)."""
    files = []
    for group in GROUPS:
        for path in sorted((root / group).glob("*.csv")):
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle, delimiter=";")
                rows, labels = [], []
                for record in reader:
                    rows.append({name: float(record[name]) for name in SIGNALS})
                    labels.append(int(float(record["anomaly"])))
            files.append(SkabFile(f"{group}/{path.name}", tuple(rows), tuple(labels)))
    if not files:
        raise FileNotFoundError(f"no SKAB files under {root} (expected {', '.join(GROUPS)}/*.csv)")
    return files


@dataclass
class Confusion:
    """Point-wise confusion counts and the leaderboard's measures.

    >>> c = Confusion(tp=8, fp=2, fn=2, tn=88)
    >>> c.f1, c.precision, c.recall, round(c.far, 2), c.mar
    (0.8, 0.8, 0.8, 2.22, 20.0)
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, label: int, predicted: bool) -> None:
        if label:
            if predicted:
                self.tp += 1
            else:
                self.fn += 1
        elif predicted:
            self.fp += 1
        else:
            self.tn += 1

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def f1(self) -> float:
        denominator = self.tp + (self.fp + self.fn) / 2
        return self.tp / denominator if denominator else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def far(self) -> float:
        """False alarm rate, %: the share of normal points flagged."""
        return 100 * self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        """Missing alarm rate, %: the share of anomalous points not flagged."""
        return 100 * self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0


@dataclass
class Result:
    """Counts over all rows (the leaderboard's) and over the online part (rows ``WARMUP`` on)."""

    all_rows: Confusion = field(default_factory=Confusion)
    online: Confusion = field(default_factory=Confusion)
    updates: int = 0

    def __add__(self, other: Result) -> Result:
        return Result(
            self.all_rows + other.all_rows, self.online + other.online, self.updates + other.updates
        )


def run_file(detector: Filter, file: SkabFile, warmup: int = WARMUP) -> tuple[Result, list[bool]]:
    """Stream one file through ``detector`` (fresh, with a warm-up of ``warmup`` updates)."""
    result, predictions = Result(), []
    for index, (row, label) in enumerate(zip(file.rows, file.labels, strict=True)):
        anomaly = step(detector, row).anomaly
        predictions.append(anomaly)
        result.all_rows.add(label, anomaly)
        if index >= warmup:
            result.online.add(label, anomaly)
        result.updates += 1
    return result, predictions


def evaluate(
    make: Callable[[], Filter], files: Iterable[SkabFile], names: Sequence[str] | None = None
) -> Result:
    """Counts summed over ``files`` (only those in ``names`` if given), a new detector per file."""
    total = Result()
    for file in files:
        if names is None or file.name in names:
            total = total + run_file(make(), file)[0]
    return total
