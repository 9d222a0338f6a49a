"""What a run tells its user while it works, on stderr: its progress, and nothing from other libraries.

Progress: on a terminal, tqdm bars. The run's bar counts its steps (phases, or replicates) and
names what the run does now; a loop inside a step (sellers answering, fine-tunes) gets a bar of
its own that goes away when done. In a log (stderr is no terminal) the same progress is plain
lines, each with the seconds since the run began: one per step and phase, and for a loop one at
its start, at most one every :data:`LOG_EVERY_S` seconds, and one with its final count; phases
and loops are indented under their step.

A heartbeat keeps a long wait from looking like a hang (Ray starting its workers, a seller
fitting its answer): on a terminal the open bars are redrawn every :data:`HEARTBEAT_S`, so their
clocks move; in a log, after :data:`LOG_EVERY_S` without a line, the open loop's count or the
current phase is repeated with the seconds it has taken so far.

Every call takes ``enabled`` (false under ``--quiet``: nothing is printed); left out, it is the
open run's, so code deep inside a run (a scenario's builder) reports without being handed a flag,
and reports nothing when no run is open (a Flower app rebuilding a market in its own process).

:func:`quiet_third_party` is the one place where other libraries' warnings and log records that
tell a tip_fed user nothing are turned off, each by module, category and message.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_EVERY_S = 10.0  # in a log, the longest stretch without a line while a run is open
HEARTBEAT_S = 1.0  # on a terminal, how often the open bars are redrawn
RUN_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"  # steps take minutes: no rate
PREFIX = "tip-fed"
WAIT_BAR = "{desc} [{elapsed}]"  # a wait of unknown length: its clock
ANSWERED = "sellers answered"  # every runtime's count of the sellers whose answer (or silence) is in


class _Run:
    """The progress of the run now open (one per process: a run is one command)."""

    bar: Any = None  # the run's tqdm bar on a terminal
    label: str = ""  # the current step, e.g. "replicate 3/20"
    started: float | None = None
    steps: int = 0
    enabled: bool = False
    said: float = 0.0  # when the log last had a line
    doing: str = ""  # the last step or phase named, repeated by the heartbeat
    doing_since: float = 0.0

    def __init__(self) -> None:
        self.counts: list[Count] = []  # the loops now open, innermost last


_run = _Run()
_lock = threading.RLock()  # the heartbeat's thread and the run's share the bars and the log


def _on(enabled: bool | None) -> bool:
    return _run.enabled if enabled is None else enabled


def _live() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _line(text: str) -> None:
    """One log line: seconds since the run began, then ``text``, indented under the current step."""
    with _lock:
        _run.said = time.perf_counter()
        clock = f" [{_run.said - _run.started:4.0f} s]" if _run.started is not None else ""
        indent = "  " if _run.label else ""
        print(f"{PREFIX}{clock} {indent}{text}", file=sys.stderr, flush=True)


def _doing(text: str) -> None:
    """Remember what the run does now, for the heartbeat."""
    _run.doing, _run.doing_since = text, time.perf_counter()


def heartbeat() -> None:
    """One beat (the run's thread calls it every :data:`HEARTBEAT_S`): redraw the terminal's bars, or
    in a log, after :data:`LOG_EVERY_S` without a line, say what the run still does."""
    with _lock:
        if not _run.enabled or _run.started is None:
            return
        if _run.bar is not None:
            for bar in [_run.bar, *(c.bar for c in _run.counts if c.bar is not None)]:
                bar.refresh()
            return
        now = time.perf_counter()
        if now - _run.said < LOG_EVERY_S:
            return
        if _run.counts:
            _run.counts[-1].say()
        elif _run.doing:
            _line(f"{_run.doing} ({now - _run.doing_since:.0f} s so far)")


def _beat(stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        heartbeat()


@contextmanager
def run_progress(desc: str, total: int, *, enabled: bool, unit: str = "step", bar_format: str = RUN_BAR,
                 leave: bool = True) -> Iterator[None]:
    """Open the run's progress of ``total`` steps; :func:`step`, :func:`phase` and :func:`counted` report into it."""
    saved = (_run.bar, _run.label, _run.started, _run.steps, _run.enabled, _run.said, _run.doing, _run.counts)
    _run.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, bar_format=bar_format,
                    leave=leave) if enabled and _live() else None
    _run.label, _run.started, _run.steps, _run.enabled = "", time.perf_counter(), 0, enabled
    _run.said, _run.doing, _run.counts = _run.started, desc, []
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(stop,), name="tip-fed-progress", daemon=True)
    if enabled:
        beat.start()
    try:
        yield
        if _run.bar is not None:
            _run.bar.update(_run.bar.total - _run.bar.n)
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        if _run.bar is not None:
            _run.bar.close()
        (_run.bar, _run.label, _run.started, _run.steps, _run.enabled, _run.said, _run.doing,
         _run.counts) = saved


@contextmanager
def waiting(text: str, *, enabled: bool) -> Iterator[None]:
    """A wait before the run opens (loading torch and TenSEAL): on a terminal a line whose clock moves,
    gone when the block ends; in a log its line, then the seconds it has taken every :data:`LOG_EVERY_S`."""
    if enabled and not _live():
        phase(text, enabled=True)
    with run_progress(f"{PREFIX}: {text}", 0, enabled=enabled, bar_format=WAIT_BAR, leave=False):
        _doing(text)
        yield


def restart(desc: str, total: int, *, unit: str) -> None:
    """Count the open run's steps anew: ``total`` ``unit``s named ``desc`` (a run found to be replicated)."""
    if _run.bar is not None:
        _run.bar.reset(total=total)
        _run.bar.set_description(desc)
        _run.bar.unit = unit
    _run.steps, _run.label = 0, ""


def step(label: str, *, enabled: bool | None = None) -> None:
    """Begin the run's next step (the one before it is done); phases after this are ``label``'s."""
    if not _on(enabled):
        return
    if _run.bar is not None:
        if _run.steps:
            _run.bar.update()
        _run.bar.set_postfix_str(label)
    _run.steps += 1
    _run.label = ""
    _doing(label)
    if _run.bar is None:
        _line(label)
    _run.label = label


def phase(text: str, *, enabled: bool | None = None) -> None:
    """Name what the current step does now."""
    if not _on(enabled):
        return
    _doing(text)
    if _run.bar is not None:
        _run.bar.set_postfix_str(text)
    elif _run.started is not None:
        _line(text)
    else:  # no run open: a line of its own, above any bar a library user has open
        tqdm.write(f"{PREFIX}: {text}", file=sys.stderr)


class Count:
    """A loop's count (``done``/``total``) inside the current step: a bar, or throttled log lines."""

    def __init__(self, desc: str, total: int | None, *, enabled: bool | None = None) -> None:
        enabled = _on(enabled)
        self.desc, self.total, self.enabled, self.done = desc, total, enabled, 0
        self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True) \
            if enabled and _live() else None
        self.started = self.said = self.moved = time.perf_counter()  # moved: when the count last grew
        self.said_done: int | None = None  # the count the last log line gave
        if enabled:
            with _lock:
                _run.counts.append(self)
        if enabled and self.bar is None and total is not None:  # an open-ended count speaks once it has news
            self.say()

    def say(self) -> None:
        """A log line with the count so far; when it has not moved since the last line (a heartbeat's),
        also the seconds since the loop began (nothing done yet) or since the count last grew."""
        now = time.perf_counter()
        waited = ""
        if self.said_done == self.done:
            waited = f" ({now - self.started:.0f} s so far)" if not self.done else \
                f" (the last {now - self.moved:.0f} s ago)"
        self.said, self.said_done = now, self.done
        _line((f"{self.desc} {self.done}/{self.total}" if self.total is not None else f"{self.desc} {self.done}")
              + waited)

    def update(self, n: int = 1) -> None:
        """``n`` more items are done."""
        self.done += n
        self.moved = time.perf_counter()
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.said >= LOG_EVERY_S:
            self.say()

    def close(self) -> None:
        """The loop is over: the bar goes; a log gives the final count (a started "0/N" is never left standing)."""
        with _lock:
            if self in _run.counts:
                _run.counts.remove(self)
            if self.bar is not None:
                self.bar.close()
            elif self.enabled and self.said_done is not None and self.said_done != self.done:
                self.say()
            self.enabled = False


@contextmanager
def count(desc: str, total: int | None, *, enabled: bool | None = None) -> Iterator[Count]:
    """A :class:`Count` for the length of a block."""
    c = Count(desc, total, enabled=enabled)
    try:
        yield c
    finally:
        c.close()


def counted(items: Iterable[T], desc: str, *, enabled: bool | None = None, total: int | None = None) -> Iterator[T]:
    """``items``, counted as they are consumed (``total`` defaults to ``len(items)`` where it has one)."""
    n = total if total is not None else (len(items) if isinstance(items, Sized) else None)
    with count(desc, n, enabled=enabled) as c:
        for item in items:
            yield item
            c.update()


# (logger, level): loggers of other libraries kept to their errors during a run
QUIET_LOGGERS = (
    ("flwr", logging.ERROR),  # deprecation notices and simulation chatter, logged rather than warned
    ("ray", logging.ERROR),  # "Started a local Ray instance", worker start-up notices
)
# (category, module regex, message regex): warnings a user cannot act on
QUIET_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (DeprecationWarning, "pathspec", ""),  # Flower's ignore-file parsing uses a pattern style pathspec deprecates
    # ray.init, asked for CPU workers by Flower, announces a change to GPU device masking
    (FutureWarning, r"ray\._private\.worker", "Tip: In future versions of Ray"),
    # reading the standard library's docstrings (the LLM market's text) touches typing's deprecated aliases
    (DeprecationWarning, "inspect", r"typing\.(io|re) is deprecated"),
)


def quiet_third_party() -> None:
    """Keep other libraries' warnings and log records that tell a tip_fed user nothing off stderr."""
    for name, level in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _AtLeast) for f in logger.filters):
            logger.addFilter(_AtLeast(level))
    for category, module, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class _AtLeast(logging.Filter):
    """Passes records of ``level`` and above (a filter, not a level: the library sets its own level on import)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level
