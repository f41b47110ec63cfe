"""SKAB scoring as the leaderboard does it, and the default detector's quality on the real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require
from twinstore.anomaly import create
from twinstore.anomaly.skab import TUNING_FILES, WARMUP, Confusion, SkabFile, evaluate, load_skab, run_file

SKAB = Path(
    os.environ.get("TWINSTORE_SKAB_DIR", Path(__file__).resolve().parents[3] / "shared/datasets/skab")
)


def test_confusion_matches_the_leaderboard_formulas() -> None:
    c = Confusion(tp=300, fp=100, fn=50, tn=550)
    assert c.f1 == pytest.approx(300 / (300 + (100 + 50) / 2))
    assert c.f1 == pytest.approx(2 * c.precision * c.recall / (c.precision + c.recall))
    assert c.far == pytest.approx(100 * 100 / 650)
    assert c.mar == pytest.approx(100 * 50 / 350)
    assert Confusion(1, 2, 3, 4) + Confusion(10, 20, 30, 40) == Confusion(11, 22, 33, 44)


def test_run_file_counts_all_rows_and_the_online_part() -> None:
    rows = tuple({"a": float(i % 5), "b": float(i % 3)} for i in range(WARMUP + 100))
    labels = tuple(int(WARMUP + 50 <= i < WARMUP + 70) for i in range(WARMUP + 100))
    anomalous = tuple(
        {"a": 50.0, "b": -40.0} if label else row for row, label in zip(rows, labels, strict=True)
    )
    result, predictions = run_file(create("mahalanobis"), SkabFile("synthetic", anomalous, labels))
    assert len(predictions) == len(rows) and not any(predictions[:WARMUP])
    assert result.updates == len(rows)
    assert result.all_rows.tp == result.online.tp > 0
    assert result.all_rows.tn == result.online.tn + WARMUP


def test_default_detector_reaches_the_issue_figure_on_skab() -> None:
    require(SKAB.is_dir(), f"SKAB not found at {SKAB} (set TWINSTORE_SKAB_DIR)")
    files = load_skab(SKAB)
    assert len(files) == 34 and {f.name for f in files} >= set(TUNING_FILES)
    assert sum(len(f.rows) for f in files) == 37_401 and sum(sum(f.labels) for f in files) == 13_067
    result = evaluate(create, files)
    assert result.all_rows.f1 >= 0.80
