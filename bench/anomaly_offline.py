"""SKAB offline: the anomaly detectors on the SKAB benchmark, online, as the leaderboard scores them.

    .venv/bin/python bench/anomaly_offline.py [--dataset ../shared/datasets/skab] [--only NAME ...]
    .venv/bin/python bench/anomaly_offline.py --select     # how the default parameters were chosen

Each of SKAB's 34 files is streamed through a fresh detector (``twinstore.anomaly.skab``): every
row is scored with the state the detector had, classified, then learnt; the first 400 rows are
the warm-up (nothing is raised). Confusion counts are summed over all rows of all files, as the
leaderboard does, and F1 / FAR / MAR computed from them; the online part alone (rows 400 on),
the 17 tuning files and the 17 held-out files are reported too. Speed is updates per CPU-second
of this process (score + classify + learn, one core); memory is what ``tracemalloc`` sees per
detector after 400 warm-up and 400 scored updates, the peak during the warm-up (it keeps the
warm-up rows to set the threshold) and the checkpoint's size. Writes the section
``anomaly-offline`` of BENCHMARKS.md.

This is the ML core alone: the pipeline figure of issue 7 (updates through twinstore, events,
detector, anomaly messages) comes with the scoring service.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
import tracemalloc
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import river
from benchlib import ROOT, _cpu_model, _git_commit, command_line, markdown_table, write_section

from twinstore.anomaly import checkpoint, create, step
from twinstore.anomaly.detectors import ALARM_DEFAULTS, REGISTRY
from twinstore.anomaly.skab import TUNING_FILES, WARMUP, Confusion, Result, SkabFile, load_skab, run_file

# No smoothing, no persistence, no margin: an update is anomalous when its own score is over the
# 0.99 quantile of the warm-up scores (the "out of the box" way to threshold a river detector).
PLAIN = {"alpha": 1.0, "k": 1, "release": 1, "peak_ratio": 0.0, "factor": 1.0}


@dataclass(frozen=True)
class Config:
    label: str
    name: str
    params: Mapping[str, float]


CONFIGS = (
    Config("mahalanobis (default detector)", "mahalanobis", {}),
    Config("mahalanobis, shrinkage 0.5 (full covariance)", "mahalanobis", {"shrinkage": 0.5}),
    Config("mahalanobis, plain threshold", "mahalanobis", PLAIN),
    Config("half-space-trees, twinstore stack", "half-space-trees", {}),
    Config(
        "half-space-trees, twinstore stack, q 0.9, factor 1", "half-space-trees", {"q": 0.9, "factor": 1.0}
    ),
    Config("half-space-trees, plain threshold", "half-space-trees", PLAIN),
    Config("half-space-trees, plain threshold, q 0.9", "half-space-trees", {**PLAIN, "q": 0.9}),
    Config("one-class-svm, twinstore stack", "one-class-svm", {}),
    Config("one-class-svm, plain threshold", "one-class-svm", PLAIN),
    Config("local-outlier-factor, twinstore stack", "local-outlier-factor", {}),
    Config("local-outlier-factor, plain threshold", "local-outlier-factor", PLAIN),
)

# The grid --select searches on the tuning files (the defaults are its best point).
GRID = {
    "alpha": (0.1, 0.2),
    "factor": (1.5, 2.0, 3.0),
    "k": (3, 5, 10),
    "peak_ratio": (0.0, 0.2),
    "forget": (0.0, 0.001, 0.003, 0.01),
}


@dataclass
class Run:
    config: Config
    per_file: dict[str, Result]
    cpu_seconds: float

    def total(self, names: set[str] | None = None) -> Result:
        out = Result()
        for name, result in self.per_file.items():
            if names is None or name in names:
                out = out + result
        return out

    @property
    def rate(self) -> float:
        return self.total().updates / self.cpu_seconds if self.cpu_seconds else 0.0


def run(config: Config, files: list[SkabFile]) -> Run:
    per_file: dict[str, Result] = {}
    started = time.process_time()
    for file in files:
        per_file[file.name] = run_file(create(config.name, config.params), file)[0]
    return Run(config, per_file, time.process_time() - started)


def reference(files: list[SkabFile], every: bool) -> Result:
    """No detector: alarm on every row after the warm-up (``every``), or never (the null detector)."""
    total = Result()
    for file in files:
        for index, label in enumerate(file.labels):
            predicted = every and index >= WARMUP
            total.all_rows.add(label, predicted)
            if index >= WARMUP:
                total.online.add(label, predicted)
            total.updates += 1
    return total


@dataclass(frozen=True)
class Memory:
    steady: float
    peak: float
    checkpoint: int


def memory(config: Config, file: SkabFile, count: int) -> Memory:
    rows = file.rows[: 2 * WARMUP]
    create(config.name, config.params)  # library imports and caches are not the detectors'
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        detectors = [create(config.name, config.params) for _ in range(count)]
        for detector in detectors:
            for row in rows[: WARMUP - 1]:
                step(detector, row)
        peak = tracemalloc.get_traced_memory()[0] - before
        for detector in detectors:
            for row in rows[WARMUP - 1 :]:
                step(detector, row)
        steady = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return Memory(steady / count, peak / count, len(checkpoint(detectors[0])))


def measures(c: Confusion) -> list[str]:
    return [f"{c.f1:.3f}", f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.far:.2f}", f"{c.mar:.2f}"]


def select(files: list[SkabFile]) -> str:
    tuning = [f for f in files if f.name in TUNING_FILES]
    held_out = [f for f in files if f.name not in TUNING_FILES]
    results = []
    for values in itertools.product(*GRID.values()):
        params = dict(zip(GRID, values, strict=True))
        config = Config("grid", "mahalanobis", params)
        tune = run(config, tuning).total().all_rows
        results.append((tune.f1, params, config))
    results.sort(key=lambda r: -r[0])
    rows = []
    for f1, params, config in results[:10]:
        held = run(config, held_out).total().all_rows
        rows.append([", ".join(f"{k}={v}" for k, v in params.items()), f"{f1:.3f}", f"{held.f1:.3f}"])
    grid = "; ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in GRID.items())
    return (
        f"Grid ({len(results)} points, other parameters at their defaults): {grid}.\n"
        "Ranked by F1 on the 17 tuning files; the held-out F1 is shown, not used.\n\n"
        + markdown_table(["parameters", "F1 tuning", "F1 held-out"], rows)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "skab")
    parser.add_argument("--only", nargs="*", help="only the configurations whose label starts with these")
    parser.add_argument("--select", action="store_true", help="search the default detector's grid and stop")
    parser.add_argument("--memory-count", type=int, default=50, help="detectors per memory measurement")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-output", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = parser.parse_args()

    files = load_skab(args.dataset)
    if args.select:
        print(select(files))
        return 0
    configs = [c for c in CONFIGS if not args.only or any(c.label.startswith(o) for o in args.only)]
    tuning = set(TUNING_FILES)
    held_out = {f.name for f in files} - tuning
    quality, speed = [], []
    for config in configs:
        result = run(config, files)
        total = result.total()
        row = [config.label, *measures(total.all_rows), f"{total.online.f1:.3f}", f"{total.online.far:.2f}"]
        row += [f"{result.total(tuning).all_rows.f1:.3f}", f"{result.total(held_out).all_rows.f1:.3f}"]
        quality.append(row)
        count = (
            max(2, args.memory_count // 10) if config.name == "local-outlier-factor" else args.memory_count
        )
        mem = memory(config, files[0], count)
        per_gib = 1024**3 / max(mem.steady, mem.peak)
        kib = [f"{mem.steady / 1024:.1f}", f"{mem.peak / 1024:.1f}", f"{mem.checkpoint / 1024:.1f}"]
        speed.append([config.label, f"{result.rate:,.0f}", *kib, f"{per_gib:,.0f}"])
        print(" | ".join(row), "|", " | ".join(speed[-1][1:]), flush=True)
    for label, every in (
        ("reference: alarm on every row after the warm-up", True),
        ("reference: null", False),
    ):
        ref = reference(files, every)
        quality.append(
            [label, *measures(ref.all_rows), f"{ref.online.f1:.3f}", f"{ref.online.far:.2f}", "", ""]
        )

    headers = ["detector", "F1", "precision", "recall", "FAR %", "MAR %", "F1 online", "FAR % online"]
    headers += ["F1 tuning", "F1 held-out"]
    table = markdown_table(headers, quality)
    speed_headers = ["detector", "updates/s (1 core)", "KiB steady", "KiB warm-up peak", "checkpoint KiB"]
    speed_table = markdown_table([*speed_headers, "detectors per GiB"], speed)
    print(table + "\n\n" + speed_table)
    if args.no_output:
        return 0
    rows = sum(len(f.rows) for f in files)
    anomalies = sum(sum(f.labels) for f in files)
    defaults = ", ".join(
        f"{k}={v}" for k, v in {**ALARM_DEFAULTS, **REGISTRY["mahalanobis"].model_defaults}.items()
    )
    text = SECTION.format(
        command=command_line(),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{_cpu_model()}, 2 cores shared with other work (figures are CPU time of one process)",
        versions=f"Python {platform.python_version()}, river {river.__version__}, twinstore {_git_commit()}",
        files=len(files),
        rows=f"{rows:,}",
        anomalies=f"{anomalies:,}",
        defaults=defaults,
        table=table,
        speed=speed_table,
    )
    write_section(args.output, "anomaly-offline", text)
    return 0


SECTION = """\
## Anomaly detection offline: SKAB (issue 7, the detectors alone)

- command: `{command}`
- date: {date}; machine: {machine}; {versions}
- data: SKAB v0.9, {files} files (valve1, valve2, other; not anomaly-free), {rows} rows, {anomalies} labelled
  anomalous (`anomaly` column), read from `../shared/datasets/skab`
- protocol: per file a fresh detector; every row scored with the state it had, classified, then learnt
  (a live stream); the first 400 rows are the warm-up (learnt, nothing raised; the threshold is set from
  their scores). Point-wise comparison with `anomaly`; counts summed over all rows of all files and
  F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN), MAR = FN / (FN + TP), as SKAB's leaderboard
  (tsad `metric='binary'`). "online" = rows 400 on only. Hyper-parameters were chosen once, on the 17
  tuning files (`TUNING_FILES`: every other file in path order, `--select` shows the grid); the other
  17 are held out. Nothing is tuned per file.
- default detector: `create("mahalanobis")` = Smooth(Persistence(QuantileThreshold(MahalanobisDetector)))
  with {defaults}
- "plain threshold": no smoothing, no persistence, threshold = the 0.99 quantile of the warm-up scores

{table}

{speed}

What the figures say:
- The default detector is above the issue's 0.80 on all 34 files, causally and online, with parameters
  chosen on half of the files (it is lower on the tuning half, which holds the two files no detector
  here finds, other/2 and other/13, and higher on the held-out half). The leaderboard's best (Conv-AE
  0.79, MSET 0.73 in SKAB's README; 0.78 quoted in the issue) are trained offline and, as we read SKAB's
  autoencoder notebooks, label row i from the 60-row windows that start 1 to 59 rows before it, i.e.
  with up to 58 rows of the future: a live detector cannot do that.
- SKAB's labels are long segments (about 400 rows from row ~570 of ~1,150), so the part after the
  warm-up is 54 % anomalous and alarming on every row after the warm-up already scores F1 0.69 (reference
  row). Persistence and release are what lift a detector above that: the same Mahalanobis score with a
  plain threshold stays near the reference. river's OneClassSVM gains inside the stack too, and
  HalfSpaceTrees once its threshold has no margin; LocalOutlierFactor loses recall there (its score on
  smoothed values rarely stays over the threshold for k rows in a row).
- Where the default errs: the labelled segment starts ~40-70 rows before the signals move (valve files:
  the flow drops later); other/13 (cavitation) is not seen; other/2's anomaly lies mostly inside the
  warm-up (296 of its 384 labelled rows); and after several experiments the process does not come back
  to the warm-up's state (motor and fluid temperatures keep drifting, rotor imbalance leaves vibration
  higher), so the alarm outlasts the label.
- river's HalfSpaceTrees saturates near its maximum score on this data, so a warm-up quantile with a
  margin never fires (0.000 rows); its trees (10 x 511 nodes) also cost about 1 MiB per detector.
  LocalOutlierFactor scans its 400-row window on every score (a few hundred updates/s). river's
  detectors here run with their defaults, only the threshold rows named above differ.
- Speed varies with the shared machine: the default's updates/s moved between 27,000 and 44,000 in
  runs of the same commit on the same day.
- Memory: the default keeps the warm-up rows until its threshold is set (8 bytes x rows x properties);
  that peak, not the steady state, bounds how many detectors fit in 1 GiB.
"""


if __name__ == "__main__":
    raise SystemExit(main())
