"""Child processes a runtime starts (seller services, SuperLink, SuperNodes), always stopped by PID.

A runtime that starts real processes must leave none behind, whether the valuation succeeds,
fails or is interrupted with Ctrl-C. :class:`ProcessGroup` is a context manager that records every
process it starts and, on exit, stops each one by its PID: SIGTERM first, SIGKILL after a grace
period. Output goes to log files (never to pipes, which would block a chatty child) so readiness
is found by polling the log and a failed start can be explained with the log's last lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tip_fed.errors import TipError


class ProcessStartError(TipError):
    """A child process exited or stayed silent before it reported ready."""


@dataclass
class Child:
    """One started process and the file its stdout and stderr go to."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """Process id, the only handle used to stop it."""
        return self.proc.pid

    def tail(self, lines: int = 3) -> str:
        """Last non-empty lines of the log on one line, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no output)"
        last = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(last) or "(no output)"


class ProcessGroup:
    """Start processes, wait for their ready lines, and stop every one of them on exit."""

    def __init__(self, log_dir: str | Path, *, grace_s: float = 5.0):
        self.log_dir = Path(log_dir)
        self.grace_s = grace_s
        self.children: list[Child] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Child:
        """Start ``argv`` with output to ``log_dir/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def wait_for(self, child: Child, pattern: str, timeout_s: float) -> re.Match[str]:
        """Poll ``child``'s log until ``pattern`` matches; ProcessStartError if it exits or times out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            match = regex.search(child.log.read_text(errors="replace")) if child.log.exists() else None
            if match:
                return match
            code = child.proc.poll()
            if code is not None:
                raise ProcessStartError(
                    f"{child.name} exited with code {code} before it was ready; last output: {child.tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessStartError(f"{child.name} was not ready after {timeout_s:g} s; last output: {child.tail()}")
            time.sleep(0.05)

    def stop_all(self) -> None:
        """Stop every started process, newest first; SIGTERM goes to all before anyone is waited on."""
        alive = [c for c in reversed(self.children) if c.proc.poll() is None]
        for child in alive:
            _signal(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in alive:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(child.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):  # only a process stuck in the kernel
                    child.proc.wait(self.grace_s)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
