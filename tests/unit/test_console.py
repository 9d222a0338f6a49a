"""The run's progress in a log (stderr is no terminal): what a user reading the log sees, and --quiet."""

from __future__ import annotations

import re
import warnings

import pytest

from tip_fed import console


def _lines(text: str) -> list[str]:
    """Log lines without their clock, e.g. 'tip-fed   sellers answered 3/3'."""
    return [re.sub(r" \[\s*\d+ s\]", "", line) for line in text.splitlines()]


def test_a_log_shows_every_step_phase_and_final_count(capsys: pytest.CaptureFixture[str]) -> None:
    with console.run_progress("tip-fed", 2, enabled=True):
        console.step("session 1/1")
        console.phase("the buyer's query")
        assert list(console.counted(range(3), "sellers answered")) == [0, 1, 2]
        console.step("writing results")
    got = _lines(capsys.readouterr().err)
    assert got == [
        "tip-fed session 1/1",
        "tip-fed   the buyer's query",
        "tip-fed   sellers answered 0/3",
        "tip-fed   sellers answered 3/3",  # a started 0/N is never the last word
        "tip-fed writing results",
    ]


def test_quiet_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with console.run_progress("tip-fed", 1, enabled=False):
        console.step("session 1/1")
        console.phase("anything")
        list(console.counted(range(5), "loop"))
    assert capsys.readouterr().err == ""


def test_outside_a_run_library_code_reports_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    list(console.counted(range(5), "fine-tunes"))  # e.g. a Flower app rebuilding a market in its own process
    console.step("a step")
    assert capsys.readouterr().err == ""


def test_only_the_listed_third_party_warnings_are_silenced() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_third_party()
        warnings.warn_explicit("Tip: In future versions of Ray, ...", FutureWarning, "worker.py", 1,
                               module="ray._private.worker")
        warnings.warn_explicit("our own deprecation", DeprecationWarning, "x.py", 1, module="tip_fed.x")
    assert [str(w.message) for w in caught] == ["our own deprecation"]
