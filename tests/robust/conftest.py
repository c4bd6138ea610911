"""Fault tests (issue 15): kill campaign, disk full, run lock, fuzzed inputs, offline guard.

``report(name, text)`` records a line that is printed in pytest's terminal summary ("homebake robustness"), so the
campaign's and the fuzzers' counts show in CI logs without ``-s``. ``fuzz_tally(name)`` counts a fuzzer's cases
and how each ended (accepted, or refused with a HomebakeError).
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tiny_models
sys.path.insert(0, str(TESTS / "train"))  # train_helpers

REPORT: dict[str, str] = {}
TALLIES: dict[str, Counter] = defaultdict(Counter)


def report(name: str, text: str) -> None:
    REPORT[name] = text


def fuzz_tally(name: str) -> Counter:
    return TALLIES[name]


def pytest_terminal_summary(terminalreporter):
    lines = [f"{name}: {text}" for name, text in REPORT.items()]
    for name, tally in TALLIES.items():
        cases = sum(tally.values())
        detail = ", ".join(f"{kind} {n}" for kind, n in sorted(tally.items()))
        lines.append(f"fuzz {name}: {cases} cases ({detail}); any other exception fails the test")
    if lines:
        terminalreporter.section("homebake robustness")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    yield
