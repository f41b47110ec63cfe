"""BENCHMARKS.md says one thing: its summaries, its index and its analyses agree with its tables.

The bench scripts write each section's tables and its generated summary from the same numbers
(``benchlib.Verdict``, ``benchlib.summary``); hand-written *Analysis* blocks sit beside them. This
check catches the ways they drift apart: a summary figure no table shows, a verdict that is not the
table's, a verdict or a dated figure in hand-written prose that a re-run made stale, an index not
rebuilt. No server is needed: it reads the file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "BENCHMARKS.md"
sys.path.insert(0, str(ROOT / "bench"))

import benchlib  # noqa: E402  (bench/ is a directory of scripts, not a package)

# A figure: 3,460 or 25.6 or 0.24; not the 99 of "p99", not a piece of a longer word or number.
NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
VERDICT = re.compile(r"\b(met|MISSED)\b")
RUN_OF = re.compile(r"run of (\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC)")
SEPARATOR = re.compile(r"^\|[\s\-:|]+\|$")


def numbers(text: str) -> list[str]:
    """The figures in ``text``, thousands separators dropped (3,460 and 3460 are one figure)."""
    return [n.replace(",", "") for n in NUMBER.findall(text)]


def table_rows(text: str) -> list[str]:
    """Every data row of every Markdown table in ``text``."""
    rows = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    data: list[str] = []
    for i, row in enumerate(rows):
        if SEPARATOR.match(row):
            continue
        if i + 1 < len(rows) and SEPARATOR.match(rows[i + 1]):
            continue  # a header row
        data.append(row)
    return data


def table_lines(text: str) -> list[str]:
    """Every header and data row of every Markdown table in ``text`` (a header can hold a figure:
    "latency at 4,994 updates/s")."""
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln.startswith("|") and not SEPARATOR.match(ln)]


def summary_bullets(body: str) -> tuple[str | None, list[str], set[int]]:
    """The generated summary's heading, its bullets and the numbers of its lines (``None`` and
    empty when the section has none)."""
    lines = body.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith(benchlib.SUMMARY_HEADING)]
    if not starts:
        return None, [], set()
    bullets: list[str] = []
    taken = {starts[0]}
    for i in range(starts[0] + 1, len(lines)):
        ln = lines[i]
        if ln.startswith("- "):
            bullets.append(ln[2:])
        elif ln.startswith("  ") and bullets:
            bullets[-1] += " " + ln.strip()
        elif bullets:
            break
        taken.add(i)
    return lines[starts[0]], bullets, taken


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines, with each bullet item a block of its own."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        items = re.split(r"\n(?=\s*- )", block)
        out.extend(item for item in items if item.strip())
    return out


def sections() -> dict[str, str]:
    return {m.group(1): m.group(2) for m in benchlib.SECTION.finditer(DOC.read_text())}


def problems_of_section(key: str, body: str) -> list[str]:
    problems: list[str] = []
    rows = table_rows(body)
    in_tables = {n for row in table_lines(body) for n in numbers(row)}
    date = benchlib.DATE.search(body)
    if date is None:
        problems.append(f"{key}: no 'date: YYYY-MM-DD HH:MM UTC' line: a reader cannot tell when it ran")
    heading, bullets, summary_lines = summary_bullets(body)
    verdict_rows = [row for row in rows if VERDICT.search(row)]
    if heading is None and verdict_rows:
        problems.append(f"{key}: its tables judge targets but it has no generated summary")
    if heading is not None and date is not None and date.group(1) not in heading:
        problems.append(f"{key}: the summary names another run than the section's {date.group(1)}")
    matched_rows: set[str] = set()
    for bullet in bullets:
        figures = numbers(bullet)
        stray = [n for n in figures if n not in in_tables]
        if stray:
            problems.append(f"{key}: summary figures {stray} are in no table of the section: {bullet!r}")
        said = VERDICT.findall(bullet)
        if not said:
            continue
        rows_with_all = [row for row in verdict_rows if set(figures) <= set(numbers(row))]
        if not rows_with_all:
            problems.append(f"{key}: no table row with a verdict shows all of {bullet!r}")
        for row in rows_with_all:
            matched_rows.add(row)
            if VERDICT.findall(row)[-1] != said[-1]:
                problems.append(f"{key}: the summary says {said[-1]} where the table says {row!r}")
    for row in verdict_rows:
        if row not in matched_rows:
            problems.append(f"{key}: the table's verdict is not in the summary: {row!r}")
    # Verdicts are generated: prose around the tables and the summary carries none.
    for i, ln in enumerate(body.splitlines()):
        if i not in summary_lines and not ln.lstrip().startswith("|") and VERDICT.search(ln):
            problems.append(f"{key}: a verdict outside the tables and the summary: {ln!r}")
    return problems


def problems_of_analysis(key: str, body: str, all_sections: dict[str, str]) -> list[str]:
    problems: list[str] = []
    parent_key = key.removesuffix("-analysis")
    parent = all_sections.get(parent_key)
    if parent is None:
        return [f"{key}: analysis of a section the file does not have ({parent_key})"]
    date = benchlib.DATE.search(parent)
    in_tables = {n for row in table_lines(parent) + table_lines(body) for n in numbers(row)}
    for ln in body.splitlines():
        if VERDICT.search(ln):
            problems.append(f"{key}: a verdict in hand-written prose (the summary gives them): {ln!r}")
    for para in paragraphs(body):
        cited = RUN_OF.findall(para)
        if not cited:
            continue
        for when in cited:
            if date is None or when != date.group(1):
                problems.append(
                    f"{key}: cites the run of {when}, the section now shows "
                    f"{date.group(1) if date else 'no date'}: re-read the analysis against the new tables"
                )
        text = RUN_OF.sub("", para)
        stray = [n for n in numbers(text) if n not in in_tables]
        if stray:
            problems.append(f"{key}: figures {stray} cited from the run are in no table: {para[:120]!r}")
    return problems


def test_the_file_has_sections() -> None:
    assert DOC.exists()
    assert len(sections()) >= 5


@pytest.mark.parametrize("key", sorted(k for k in sections() if not k.endswith("-analysis")))
def test_summary_agrees_with_tables(key: str) -> None:
    assert problems_of_section(key, sections()[key]) == []


@pytest.mark.parametrize("key", sorted(k for k in sections() if k.endswith("-analysis")))
def test_analysis_cites_only_the_tables(key: str) -> None:
    every = sections()
    assert problems_of_analysis(key, every[key], every) == []


def test_index_is_rebuilt_from_the_sections() -> None:
    text = DOC.read_text()
    assert benchlib.INDEX_START in text, "BENCHMARKS.md has no index (benchlib.write_section builds it)"
    assert benchlib.rebuild_index(text) == text, "the index is stale: run benchlib.rebuild_index"


# ---- the checker itself: it must catch the contradictions issue 16 found ---------------------------

SECTION_OK = """## HTTP API
- date: 2026-11-22 12:25 UTC

| workers | test | per second | p99 ms | target |
| --- | --- | --- | --- | --- |
| 1 | GET thing | 3,460 | 25.6 | ≥ 5,000/s, p99 ≤ 20 ms: MISSED |
| 1 | PUT property | 1,864 | 155.6 | ≥ 3,000/s: MISSED |

**Summary** (generated from the tables of this run, 2026-11-22 12:25 UTC):

- workers=1 GET thing: 3,460 req/s, p99 25.6 ms (target ≥ 5,000/s, p99 ≤ 20 ms): MISSED
- workers=1 PUT property: 1,864 writes/s (target ≥ 3,000/s): MISSED
"""


def test_checker_accepts_a_consistent_section() -> None:
    assert problems_of_section("api", SECTION_OK) == []


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("3,460 req/s, p99 25.6 ms (target", "8,424 req/s, p99 9.4 ms (target", "in no table"),
        ("1,864 writes/s (target ≥ 3,000/s): MISSED", "1,864 writes/s (target ≥ 3,000/s): met", "says met"),
        ("- workers=1 PUT property: 1,864 writes/s (target ≥ 3,000/s): MISSED\n", "", "not in the summary"),
        ("this run, 2026-11-22 12:25 UTC", "this run, 2026-11-21 09:00 UTC", "names another run"),
        ("**Summary**", "Two fixes made the target: met.\n\n**Summary**", "outside the tables"),
    ],
)
def test_checker_catches(old: str, new: str, complaint: str) -> None:
    assert old in SECTION_OK
    problems = problems_of_section("api", SECTION_OK.replace(old, new))
    assert any(complaint in p for p in problems), problems


def test_checker_catches_a_stale_analysis() -> None:
    every = {"api": SECTION_OK}
    fresh = "GET stayed CPU-bound: 3,460 req/s (table above, run of 2026-11-22 12:25 UTC)."
    assert problems_of_analysis("api-analysis", fresh, every) == []
    stale = "GET made the target: 8,424 req/s (table above, run of 2026-11-22 12:25 UTC)."
    assert any("in no table" in p for p in problems_of_analysis("api-analysis", stale, every))
    assert any("a verdict" in p for p in problems_of_analysis("api-analysis", "The target is met.", every))
    rerun = {"api": SECTION_OK.replace("2026-11-22 12:25", "2026-12-01 08:00")}
    assert any("re-read" in p for p in problems_of_analysis("api-analysis", fresh, rerun))
