"""Child processes a runtime starts (seller services, SuperLink, SuperNodes), and the run's private directory.

A runtime that starts real processes must leave none behind, whether the valuation succeeds,
fails, is interrupted with Ctrl-C or is killed with SIGKILL. :class:`ProcessGroup` is a context
manager that starts processes tagged with its run token (see :mod:`tip_fed.runtimes.reaper`) and, on
exit, stops its own children by their Popen handle (SIGTERM first, SIGKILL after a grace period),
then every other process carrying the token: what Flower spawned and detached below them.
Output goes to log files (never to pipes, which would block a chatty child) so readiness is found
by polling the log and a failed start can be explained with the log's last lines.

:class:`PrivateRun` is the owner-only temporary directory where a run keeps its keys and seller
data, guarded by a reaper: if the run dies in any way, the reaper stops the run's processes and
deletes the directory, so no key or data file outlives the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tip_fed.errors import TipError
from tip_fed.runtimes.reaper import (
    TAG,
    Reaper,
    ReaperError,
    launcher,
    new_token,
    stop_tagged,
)


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
    """Start processes, wait for their ready lines, and stop every one of them (and what they spawned) on exit.

    With ``reaper`` the children carry the reaper's token, their TMPDIR is inside the reaper's
    directory, and they die with this process even if it is killed. ``die_with_parent=False``
    (``tip-fed deploy up``) lets them outlive it, to be stopped later by their token.
    """

    def __init__(
        self, log_dir: str | Path, *, grace_s: float = 5.0, reaper: Reaper | None = None, die_with_parent: bool = True
    ):
        self.log_dir = Path(log_dir)
        self.grace_s = grace_s
        self.children: list[Child] = []
        self.reaper = reaper
        self.die_with_parent = die_with_parent
        self.token = new_token(reaper.token if reaper else None)  # the reaper's token, and the group's own

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def child_env(self) -> dict[str, str]:
        """What every process of this run gets in its environment: the run token, and a private TMPDIR."""
        env = {TAG: self.token}
        if self.reaper is not None:
            tmp = self.reaper.directory / "tmp"
            tmp.mkdir(mode=0o700, exist_ok=True)
            env["TMPDIR"] = str(tmp)
        return env

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Child:
        """Start ``argv`` with output to ``log_dir/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        command = launcher(argv) if self.die_with_parent else list(argv)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), **self.child_env()},
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
                raise ProcessStartError(f"{child.name} was not ready after {timeout_s:g} s; last output: "
                                        f"{child.tail()}")
            time.sleep(0.05)

    def stop_all(self) -> None:
        """Stop every started process, newest first (SIGTERM to all before anyone is waited on), then
        every process still carrying this run's token."""
        alive = [c for c in reversed(self.children) if c.proc.poll() is None]
        for child in alive:
            child.proc.terminate()
        deadline = time.monotonic() + self.grace_s
        for child in alive:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):  # only a process stuck in the kernel
                    child.proc.wait(self.grace_s)
        stop_tagged(self.token, self.grace_s)


class PrivateRun:
    """An owner-only (0700) temporary directory for one run's keys and data, deleted however the run ends.

    On a normal exit (or an exception) the directory is deleted here; if this process is killed,
    the reaper started on entry stops the run's tagged processes and deletes it.
    """

    def __init__(self, prefix: str, *, grace_s: float = 3.0):
        self.prefix = prefix
        self.grace_s = grace_s
        self.root = Path()
        self.reaper: Reaper | None = None

    def __enter__(self) -> Self:
        self.root = Path(tempfile.mkdtemp(prefix=self.prefix))
        try:
            self.reaper = Reaper.launch(self.root)
        except ReaperError as exc:
            shutil.rmtree(self.root, ignore_errors=True)
            raise ProcessStartError(f"{exc}; without it a killed run would leave keys and processes behind") from exc
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.reaper is not None:
            stop_tagged(self.reaper.token, self.grace_s)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.reaper is not None:
            self.reaper.close()
