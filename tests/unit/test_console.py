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


def test_a_quiet_stretch_in_a_log_repeats_the_open_count_then_the_phase(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with console.run_progress("tip-fed", 1, enabled=True):
        console.step("session 1/1")
        console.phase("Ray starting its workers")
        monkeypatch.setattr(console, "LOG_EVERY_S", 0.0)  # every beat finds the log quiet for long enough
        console.heartbeat()
        with console.count("workers ready", 4) as ready:
            console.heartbeat()
            ready.update()
            console.heartbeat()
        console.heartbeat()
        monkeypatch.setattr(console, "LOG_EVERY_S", 1e9)  # a log that just had a line stays as it is
        console.heartbeat()
    got = [re.sub(r"\d+ s (so far|ago)\)", r"N s \1)", line) for line in _lines(capsys.readouterr().err)]
    assert got == [
        "tip-fed session 1/1",
        "tip-fed   Ray starting its workers",
        "tip-fed   Ray starting its workers (N s so far)",
        "tip-fed   workers ready 0/4",
        "tip-fed   workers ready 0/4 (N s so far)",  # nothing done yet: the seconds since the loop began
        "tip-fed   workers ready 1/4",  # the update itself, the log having been quiet long enough
        "tip-fed   workers ready 1/4 (the last N s ago)",  # the beat: the open loop's count, not the phase
        "tip-fed   Ray starting its workers (N s so far)",  # the loop closed on the count the log already gave
    ]


def test_the_heartbeat_is_silent_outside_a_run_and_under_quiet(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "LOG_EVERY_S", 0.0)
    console.heartbeat()
    with console.run_progress("tip-fed", 1, enabled=False):
        console.phase("anything")
        console.heartbeat()
    assert capsys.readouterr().err == ""


def test_a_wait_before_the_run_says_what_it_waits_for_and_for_how_long(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with console.waiting("loading torch and TenSEAL", enabled=True):
        monkeypatch.setattr(console, "LOG_EVERY_S", 0.0)
        console.heartbeat()
    console.heartbeat()  # the wait is over: nothing more
    got = [re.sub(r"\(\d+ s so far\)", "(N s so far)", line) for line in _lines(capsys.readouterr().err)]
    assert got == ["tip-fed: loading torch and TenSEAL", "tip-fed loading torch and TenSEAL (N s so far)"]
