"""A buyer killed with SIGKILL mid-valuation leaves nothing behind: no process, no key, no data file.

``tip-fed simulate`` runs with ``runtime=grpc`` (four ``tip-fed seller serve`` processes over
mTLS) and ``runtime=flower-deployment`` (SuperLink, four SuperNodes and what Flower spawns
below them: ``flower-superexec`` in its own session, ``flwr-serverapp``, ``flwr-clientapp``).
While it runs, every process below the buyer is recorded (PID and start time, with psutil); once
the sellers are scoring the Offer, the buyer alone is sent SIGKILL (no handler, no ``finally``
runs). Then no recorded process may still run and the buyer's TMPDIR (where its CA key, buyer
and seller keys, seller data and Flower state went) must be emptied, by the reaper alone. The test
kills anything that survived, so a failure leaves nothing either.
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ..conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"
SECRET_SUFFIXES = {".key", ".crt", ".pem", ".safetensors", ".pub", ".db"}
# torch creates its (empty) compile-cache directory in TMPDIR when the buyer imports it: no key, no data
TORCH_CACHE = f"torchinductor_{psutil.Process().username()}"
#: how long the test waits for the reaper: a guard against a hang, not a speed requirement (the reaper
#: acts on its parent's death; how long the clean-up takes is for benchmarks/)
CLEANUP_BOUND_S = 120.0

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Recorder:
    """Every process ever seen below the buyer, keyed by (pid, start time) so a reused PID never counts."""

    def __init__(self, buyer: subprocess.Popen):
        self.buyer = buyer
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.commands: dict[tuple[int, float], str] = {}  # the latest command line seen (a launcher execs)

    def scan(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in psutil.Process(self.buyer.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    key = (proc.pid, proc.create_time())
                    self.seen.setdefault(key, proc)
                    self.commands[key] = " ".join(proc.cmdline())

    def names(self) -> list[str]:
        return list(self.commands.values())

    def survivors(self) -> list[psutil.Process]:
        alive = []
        for proc in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                # is_running() compares the start time: a reused PID is not our process
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive


def _start(tmp_path: Path, runtime: str, *extra: str) -> subprocess.Popen:
    (tmp_path / "t").mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path / "t"))
    return subprocess.Popen(
        [str(CLI), "simulate", "configs/causal.toml", "--quiet", "--out", str(tmp_path / "out"),
         "--set", f"runtime={runtime}", "--set", "ground-truth.enabled=false", *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr.txt").open("w"),
    )


def _kill_when(buyer: subprocess.Popen, recorder: Recorder, scoring, tmp_path: Path, budget_s: float = 400) -> None:
    """Record processes until ``scoring(recorder)`` says the sellers work on the Offer, then SIGKILL the buyer."""
    try:

        def ready() -> bool:
            recorder.scan()
            return buyer.poll() is not None or scoring(recorder)

        wait_until(ready, budget_s)
        code = buyer.poll()
        assert code is None, (
            f"the buyer ended ({code}) before it was killed: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
        )
        assert scoring(recorder), f"the sellers never started scoring; seen: {recorder.names()}"
        recorder.scan()
        os.kill(buyer.pid, signal.SIGKILL)
        assert buyer.wait(30) == -signal.SIGKILL
    finally:
        if buyer.poll() is None:
            buyer.kill()
            buyer.wait()


def _listing(directory: Path) -> list[str]:
    """Every path below ``directory`` (os.walk skips what disappears while it walks: the reaper is deleting)."""
    return sorted(
        os.path.relpath(os.path.join(d, n), directory) for d, dirs, files in os.walk(directory) for n in dirs + files
    )


def _assert_nothing_left(recorder: Recorder, tmp_path: Path) -> None:
    tmp = tmp_path / "t"
    survivors: list[psutil.Process] = []
    files: list[str] = []

    def clean() -> bool:
        survivors[:] = recorder.survivors()
        files[:] = [f for f in _listing(tmp) if f != TORCH_CACHE]
        return not survivors and not files

    wait_until(clean, CLEANUP_BOUND_S, poll_s=0.1)
    described = [recorder.commands.get((p.pid, p.create_time()), str(p.pid))[:200] for p in survivors]
    for proc in survivors:  # never leave them, also when the assertions below fail
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert described == [], f"still running {CLEANUP_BOUND_S:g} s after the buyer was killed"
    assert files == [], f"left on disk {CLEANUP_BOUND_S:g} s after the buyer was killed"
    secrets = [f for f in _listing(tmp_path) if Path(f).suffix in SECRET_SUFFIXES]
    assert secrets == []
    # the run was interrupted mid-valuation: no results were written
    assert not (tmp_path / "out" / "valuations.csv").exists()


def _cpu_s(proc: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = proc.cpu_times()
        return times.user + times.system
    return 0.0


def test_kill_9_of_a_grpc_buyer_leaves_no_seller_process_and_no_key_or_data(tmp_path):
    buyer = _start(tmp_path, "grpc")
    recorder = Recorder(buyer)
    baseline: dict[int, float] = {}

    def scoring(rec: Recorder) -> bool:
        """All four sellers are ready, then one of them spends CPU on the Offer."""
        sellers = [p for key, p in rec.seen.items() if "seller serve" in rec.commands.get(key, "")]
        logs = list((tmp_path / "t").glob("tip-fed-grpc-*/logs/*.log"))
        ready = [log for log in logs if "ready on" in log.read_text(errors="replace")]
        if len(sellers) < 4 or len(ready) < 4:
            return False
        if not baseline:
            baseline.update({p.pid: _cpu_s(p) for p in sellers})
            return False
        return any(_cpu_s(p) > baseline[p.pid] + 0.3 for p in sellers)

    _kill_when(buyer, recorder, scoring, tmp_path)
    names = recorder.names()
    assert sum("seller serve" in n for n in names) == 4 and any("tip_fed.runtimes.reaper" in n for n in names), names
    _assert_nothing_left(recorder, tmp_path)


def test_kill_9_of_a_flower_deployment_buyer_leaves_no_flower_process_and_no_key_or_data(tmp_path):
    buyer = _start(tmp_path, "flower-deployment", "--set", "flower.node-wait-s=120", "--set", "flower.timeout-s=300")
    recorder = Recorder(buyer)

    def scoring(rec: Recorder) -> bool:
        """A seller's ClientApp process runs (it handles the buyer's messages)."""
        return any("flwr-clientapp" in rec.commands.get(key, "") for key, p in rec.seen.items() if _running(p))

    _kill_when(buyer, recorder, scoring, tmp_path)
    names = " | ".join(recorder.names())
    for program in (
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
        "tip_fed.runtimes.reaper",
    ):
        assert program in names, f"{program} never ran: {names}"
    _assert_nothing_left(recorder, tmp_path)


def _running(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False
