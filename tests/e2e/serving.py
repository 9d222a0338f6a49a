"""``tip-fed seller serve`` processes started by e2e tests: wait for the ready line, stop by PID."""

import os
import re
import signal
import subprocess
import threading
import time

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

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
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
