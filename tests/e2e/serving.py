"""``tip-fed seller serve`` processes started by e2e tests: wait for the ready line, stop by PID."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..conftest import wait_until

#: the ``tip-fed`` console script of the interpreter running the tests
TIP_FED = str(Path(sys.executable).parent / "tip-fed")
#: what ``tip-fed seller serve`` prints once it listens
READY = re.compile(r"tip-fed: seller (?P<id>\S+) \((?P<n>\d+) samples\) ready on 127\.0\.0\.1:(?P<port>\d+) "
                   r"\((?P<security>[^)]+)\)")


def wait_ready(proc: subprocess.Popen, lines: list[str], timeout_s: float) -> re.Match:
    """The seller's ready line from its stdout, read in a thread that keeps draining the pipe (so the
    seller never blocks on it) and collects every line into ``lines``."""
    found: list[re.Match] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not found and (m := READY.search(line)) is not None:
                found.append(m)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: found or not reader.is_alive(), timeout_s, poll_s=0.1)
    assert found, f"seller did not start (exit {proc.poll()}): {''.join(lines)[-2000:]}"
    return found[0]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process this test started, by PID; SIGKILL if it has not exited in 20 s."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start(args: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``tip-fed seller serve ARGS`` with its output (stdout and stderr) on one text pipe."""
    return subprocess.Popen([TIP_FED, "seller", "serve", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(env or os.environ, PYTHONUNBUFFERED="1"))


@contextlib.contextmanager
def serving(args: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout_s: float = 120) -> Iterator[tuple[re.Match, list[str]]]:
    """One ``tip-fed seller serve ARGS`` until the block ends: its ready line and every line it has
    printed so far (the list grows); it must still be alive at the end, and is stopped by PID."""
    proc = start(args, cwd=cwd, env=env)
    lines: list[str] = []
    try:
        yield wait_ready(proc, lines, timeout_s), lines
        assert proc.poll() is None, f"the seller died: {''.join(lines)[-2000:]}"
    finally:
        stop(proc)
