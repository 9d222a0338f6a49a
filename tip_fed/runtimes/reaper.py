"""Nothing a run starts outlives it: run tags, a reaper process, and stopping by tag.

Every process a run starts carries a random token in ``TIP_FED_RUN``; its descendants inherit
it, also those Flower detaches into new sessions (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) and those orphaned when their parent dies. "Everything this run started" is
therefore the set of live processes whose environment holds the token, found with psutil: no
PID bookkeeping, no recycled PID ever signalled, no process tree that breaks when a parent dies.

A run that may be killed outright (SIGKILL leaves no ``finally`` to run) starts a reaper with
:meth:`Reaper.launch`: a small process in its own session (a signal to the run's process group
does not reach it) that watches the run two ways, a pipe whose only writer is the run (EOF when
the run dies) and a pidfd on the run. When either fires it freezes every process carrying the
token (SIGSTOP until no new one appears, so none can fork away), kills them all, and deletes the
run's private directory: the CA key, the buyer's and sellers' keys, seller data, logs and the
children's TMPDIR. A run that stops normally shuts its processes down gracefully first (SIGTERM,
then SIGKILL after a grace period). A zombie counts as gone: an init that never reaps orphans
must not make a stop wait. The reaper imports only the standard library and psutil.

Direct children also get ``PR_SET_PDEATHSIG`` (Linux) through :func:`exec_with_parent`, so they
die with the run even if the reaper itself was killed; the kernel fires it when the *thread*
that started the child exits, so it is set only for children started from the main thread.

Run as ``python -m tip_fed.runtimes.reaper watch DIR TOKEN`` (the reaper) or
``python -m tip_fed.runtimes.reaper exec PARENT_PID -- ARGV...`` (the launcher).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

TAG = "TIP_FED_RUN"
PR_SET_PDEATHSIG = 1


class ReaperError(RuntimeError):
    """The reaper process could not be started, so a run would not be cleaned up if it were killed."""


def new_token(parent: str | None = None) -> str:
    """A fresh token appended to ``parent``'s chain, or to the chain this process carries (nested runs):
    a process is found by every token of its chain."""
    inherited = os.environ.get(TAG, "") if parent is None else parent
    token = secrets.token_hex(12)
    return f"{inherited}:{token}" if inherited else token


def own_token(chain: str) -> str:
    """The last token of a chain: the one that names this run only."""
    return chain.rsplit(":", 1)[-1]


def tagged(token: str) -> list[psutil.Process]:
    """Live processes (other than this one) whose environment carries ``token``."""
    token = own_token(token)
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            chain = proc.environ().get(TAG, "")
            if token in chain.split(":") and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _gone(proc: psutil.Process) -> bool:
    """True once ``proc`` has exited; a zombie has (an init that never reaps would otherwise keep it "alive")."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.AccessDenied:
        return not proc.is_running()


def wait_gone(procs: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for ``procs`` to exit; returns those still running."""
    alive = [p for p in procs if not _gone(p)]
    deadline = time.monotonic() + timeout_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _gone(p)]
    return alive


def terminate(procs: Iterable[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM ``procs``, SIGKILL those still alive after ``grace_s``; returns any that survived even that."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.terminate()
    alive = wait_gone(procs, grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
    return wait_gone(alive, grace_s)


def kill_tagged(token: str, timeout_s: float = 5.0, rounds: int = 20) -> list[int]:
    """Freeze every process carrying ``token`` (SIGSTOP, until no new one appears: a stopped process
    cannot fork), then SIGKILL them all. For a run that is already dead: nothing to shut down gracefully."""
    frozen: dict[int, psutil.Process] = {}
    for _ in range(rounds):
        new = [p for p in tagged(token) if p.pid not in frozen]
        if not new:
            break
        for proc in new:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.suspend()
                frozen[proc.pid] = proc
    for proc in frozen.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
    wait_gone(frozen.values(), timeout_s)
    return list(frozen)


def stop_tagged(token: str, grace_s: float, rounds: int = 5) -> list[int]:
    """Stop every process carrying ``token`` gracefully, again while new ones appear; returns the PIDs stopped."""
    stopped: list[int] = []
    for _ in range(rounds):
        procs = tagged(token)
        if not procs:
            break
        stopped.extend(p.pid for p in procs)
        terminate(procs, grace_s)
    return stopped


def running(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that still run (a zombie has exited: only its parent has not collected it)."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` (empty if ``pid`` is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass
class Reaper:
    """A started reaper watching this process; ``close()`` ends it after a normal stop."""

    directory: Path
    token: str
    proc: subprocess.Popen[bytes]

    @classmethod
    def launch(cls, directory: Path, *, startup_timeout_s: float = 30.0) -> Reaper:
        """Start a reaper that, when this process dies, stops the tagged processes and deletes ``directory``."""
        token = new_token()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tip_fed.runtimes.reaper", "watch", str(directory), own_token(token)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, env={k: v for k, v in os.environ.items() if k != TAG},
        )
        reaper = cls(Path(directory), token, proc)
        if proc.stdout is None:  # stdout=PIPE always gives one; this narrows the type
            raise ReaperError("the reaper process has no stdout pipe")
        ready, _, _ = select.select([proc.stdout], [], [], startup_timeout_s)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"watching":
            reaper.close(5.0)
            raise ReaperError(f"the reaper process did not start within {startup_timeout_s:g} s (exit code "
                              f"{proc.returncode}); check that 'python -m tip_fed.runtimes.reaper' runs with "
                              f"{sys.executable}")
        return reaper

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the reaper run its sweep now (nothing is left after a normal stop) and wait for it."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def exec_with_parent(parent: int, argv: Sequence[str]) -> None:
    """Ask the kernel for SIGKILL when ``parent`` dies, then exec ``argv`` (the PID stays the same)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(1)
    os.execvp(argv[0], list(argv))  # noqa: S606 - replaces this process by design; argv is ours, no shell


def launcher(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so that it dies with this process (Linux, main thread); unchanged otherwise."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return list(argv)
    return [sys.executable, "-m", "tip_fed.runtimes.reaper", "exec", str(os.getpid()), "--", *argv]


def _wait_for_parent_death() -> None:
    """Block until stdin reaches EOF (the run closed it, or died) or the run's pidfd fires.

    The pidfd covers a run whose pipe end was copied into a forked child that lives on.
    """
    parent = os.getppid()
    fds = [sys.stdin.fileno()]
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(parent)
        fds.append(pidfd)
    while True:
        ready, _, _ = select.select(fds, [], [])
        if pidfd in ready or not os.read(fds[0], 4096):
            return


def _watch(directory: Path, token: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # an explicit stop still cleans up (finally)
    try:
        os.write(sys.stdout.fileno(), b"watching\n")
        os.close(sys.stdout.fileno())
        _wait_for_parent_death()
    finally:
        for _ in range(3):
            kill_tagged(token)
            shutil.rmtree(directory, ignore_errors=True)
            if not directory.exists() and not tagged(token):
                break


def main(args: Sequence[str]) -> None:
    """Entry point of the reaper and of the launcher."""
    if len(args) == 3 and args[0] == "watch":
        _watch(Path(args[1]), args[2])
    elif len(args) >= 4 and args[0] == "exec" and args[2] == "--":
        exec_with_parent(int(args[1]), args[3:])
    else:
        sys.exit("usage: python -m tip_fed.runtimes.reaper watch DIR TOKEN | exec PARENT_PID -- ARGV...")


if __name__ == "__main__":
    main(sys.argv[1:])
