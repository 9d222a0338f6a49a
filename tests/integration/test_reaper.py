"""Run tokens, the reaper and PR_SET_PDEATHSIG, with real processes (small shell programs).

A parent process opens a :class:`PrivateRun`, writes a key into it and starts children the way
runtimes do: one that detaches a grandchild into a new session (as ``flower-superexec`` does),
one that ignores SIGTERM (as an orphaned ``flwr-serverapp`` did). The parent is then killed with
SIGKILL, so none of its own cleanup runs: the reaper must stop every one of them and delete the
directory. Without a reaper (``tip-fed deploy up``) children outlive their parent until they are
stopped by their token.
"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tip_fed.runtimes.processes import PrivateRun, ProcessGroup
from tip_fed.runtimes.reaper import TAG, running, stop_tagged, tagged

from ..conftest import wait_until

PARENT = textwrap.dedent("""
    import sys, time
    from tip_fed.runtimes.processes import PrivateRun, ProcessGroup
    with PrivateRun("tip-reaper-test-") as run, ProcessGroup(run.root / "logs", reaper=run.reaper) as group:
        (run.root / "seller.key").write_text("secret")
        group.start("detaches", ["bash", "-c", "setsid sleep 300 & sleep 300"])
        group.start("ignores-term", ["bash", "-c", "trap '' TERM; sleep 300 & sleep 300"])
        print(run.root, flush=True)
        time.sleep(300)
""")


def _tree(pid):
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_a_killed_run_leaves_no_process_and_no_directory(tmp_path):
    # Prepare: the parent's processes and its private directory exist
    env = dict(os.environ, TMPDIR=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env)
    started = []
    try:
        root = Path(parent.stdout.readline().strip())
        assert (root / "seller.key").is_file() and oct(root.stat().st_mode & 0o777) == "0o700"
        assert wait_until(lambda: len(_tree(parent.pid)) >= 7, 10)  # reaper, 2 bash, 4 sleep (1 in a new session)
        started = _tree(parent.pid)
        assert len({os.getsid(p) for p in started}) >= 3  # the reaper and the detached sleep each have their own
        # Execute: SIGKILL, no cleanup in the parent runs
        parent.kill()
        assert parent.wait(10) == -signal.SIGKILL
        # Assert: every process it started (the reaper too) and the directory go away by themselves
        assert wait_until(lambda: running(started) == [] and not root.exists(), 10), (running(started), root.exists())
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in running(started):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    assert list(tmp_path.iterdir()) == []


def test_a_normal_exit_stops_detached_descendants_and_deletes_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with PrivateRun("tip-reaper-test-") as run, ProcessGroup(run.root / "logs", reaper=run.reaper, grace_s=1) as group:
        child = group.start("detaches", ["bash", "-c", "setsid sleep 300 & sleep 300"])
        assert wait_until(lambda: len(tagged(group.token)) == 3, 10)
        pids = [p.pid for p in tagged(group.token)]
        assert child.pid in pids and os.environ.get(TAG) is None  # only children carry the token
    assert running(pids) == [] and not run.root.exists()
    assert run.reaper is not None and run.reaper.proc.returncode == 0


def test_without_a_reaper_children_outlive_their_parent_until_stopped_by_token(tmp_path):
    # `tip-fed deploy up` leaves its processes running; `deploy down` stops them by the token it saved
    code = ("import sys; from tip_fed.runtimes.processes import ProcessGroup;"
            f"g = ProcessGroup({str(tmp_path / 'logs')!r}, die_with_parent=False);"
            "g.start('s', ['bash', '-c', 'setsid sleep 300 & sleep 300']); print(g.token)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    token = out.stdout.strip()
    try:
        assert wait_until(lambda: len(tagged(token)) == 3, 10)
        survivors = [p.pid for p in tagged(token)]
    finally:
        stopped = stop_tagged(token, 1.0)
    assert sorted(stopped) == sorted(survivors) and running(survivors) == [] and tagged(token) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_direct_children_die_with_their_parent_even_without_a_reaper(tmp_path):
    code = ("import time; from tip_fed.runtimes.processes import ProcessGroup;"
            f"g = ProcessGroup({str(tmp_path / 'logs')!r});"
            "c = g.start('s', ['sleep', '300']); print(c.pid, flush=True); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert wait_until(lambda: psutil.Process(child).name() == "sleep", 10)  # the launcher has exec'd
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: running([child]) == [], 10)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(child).kill()
