"""The native gRPC runtime with real processes: ``tip-fed seller serve`` services over TLS on 127.0.0.1.

Three seller processes are valued from the buyer client, then one is killed while the buyer is
waiting for it; ``tip-fed simulate --set runtime=grpc`` must give the in-process valuations and
leave no process behind, also when interrupted. Every process a test starts is stopped by PID.
"""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from simulations.runner import run_scenario
from simulations.scenarios import build_market, make_buyer, max_samples, plaintext_reference, write_seller_files
from simulations.settings import load_config
from tip_fed.config import GrpcConfig
from tip_fed.grpc import ClientTLS, SellerEndpoint, value_sellers, wait_until_healthy
from tip_fed.runtimes import value_grpc
from tip_fed.runtimes.processes import ProcessGroup

from ..conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"
SELLERS = ("digits-1", "digits-2", "digits-4")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _run(*args, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([str(CLI), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def _pids_mentioning(*texts):
    """Live processes whose command line contains every one of ``texts`` (a path unique to one test)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.pid != os.getpid() and all(t in cmdline for t in texts) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def _files_left(tmp):
    """What a run left in its TMPDIR, but for torch's (empty) compile-cache directory made at import."""
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.name.startswith("torchinductor_"))


def _kill_leftovers(text):
    pids = _pids_mentioning(text)
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    return pids


def _valuations(path):
    return {r["seller_id"]: float(r["score"]) for r in csv.DictReader((path / "valuations.csv").open())}


def _check_against_plaintext(valuation, buyer, market):
    """Decryptions equal the plaintext scores up to CKKS and sanitising noise (1e-6 of the score bound,
    as the audit)."""
    plain = {sid: plaintext_reference(buyer, market, sid) for sid in market.sellers}
    tol = 1e-6 * buyer.query_norm * buyer.grad_norm_bound
    for v in valuation.sellers:
        assert np.max(np.abs(v.per_sample - plain[v.seller_id])) <= tol
        assert abs(v.total - plain[v.seller_id].sum()) <= len(plain[v.seller_id]) * tol


def test_three_tls_seller_processes_and_one_killed_mid_round(tmp_path):
    config = load_config(ROOT / "configs/causal.toml", ["ground-truth.enabled=false"])
    market = build_market(config)
    market.sellers = {sid: market.sellers[sid] for sid in SELLERS}
    files = write_seller_files(market, tmp_path / "data")
    assert _run("tls", "init", str(tmp_path / "tls")).returncode == 0
    tls = ClientTLS(tmp_path / "tls" / "ca.crt")

    with ProcessGroup(tmp_path / "logs") as group:
        children = {
            sid: group.start(
                sid,
                [
                    str(CLI),
                    "seller",
                    "serve",
                    "--data",
                    str(path),
                    "--port",
                    "0",
                    "--tls-cert",
                    str(tmp_path / "tls" / "seller.crt"),
                    "--tls-key",
                    str(tmp_path / "tls" / "seller.key"),
                    "--server-tls-only",
                    "--exact-per-sample",
                    "--max-exact",
                    "-1",
                    "--total-max-exact",
                    "-1",
                ],
            )
            for sid, path in files.items()
        }
        ports = {
            sid: group.wait_for(child, r"ready on 127\.0\.0\.1:(?P<port>\d+) \(tls\)", 120)["port"]
            for sid, child in children.items()
        }
        endpoints = [SellerEndpoint(sid, f"127.0.0.1:{port}") for sid, port in ports.items()]
        for endpoint in endpoints:
            wait_until_healthy(endpoint, tls=tls, timeout_s=30)

        # round 1 (the library driver): every seller valued, decryptions match the plaintext reference
        buyer = make_buyer(market, config)
        valuation = value_grpc(buyer, endpoints, tls, GrpcConfig(timeout_s=60), max_samples(market))
        assert valuation.missing == [] and valuation.rejected == {}
        transport = valuation.manifest["transport"]
        assert {k: transport[k] for k in ("runtime", "security", "seller_identity", "failures")} == {
            "runtime": "grpc",
            "security": "tls",
            "seller_identity": "address",
            "failures": {},
        }
        # first contact: every seller lacked the model, so each was sent its weights
        assert {sid: o["weights_shipped"] for sid, o in transport["offers"].items()} == dict.fromkeys(ports, True)
        _check_against_plaintext(valuation, buyer, market)

        # round 2: digits-2 freezes as its Value call starts and is killed while the buyer waits on it
        victim = children["digits-2"]

        def freeze_then_kill(endpoint):
            if endpoint.name == "digits-2":
                os.kill(victim.pid, signal.SIGSTOP)
                threading.Timer(1.0, os.kill, (victim.pid, signal.SIGKILL)).start()

        buyer = make_buyer(market, config)
        replies, failures = value_sellers(
            endpoints,
            buyer.offer(max_samples=max_samples(market)),
            tls=tls,
            timeout_s=60,
            retries=1,
            backoff_s=0.1,
            before_call=freeze_then_kill,
        )
        assert victim.proc.wait(10) == -signal.SIGKILL
        # the call failed because the process died (then the retry found nobody), not by waiting out its deadline
        assert "after 2 attempts: UNAVAILABLE" in failures["digits-2"], failures
        valuation = buyer.settle(list(replies.values()), expected=list(SELLERS))
        assert valuation.missing == ["digits-2"] and list(failures) == ["digits-2"]
        assert "UNAVAILABLE" in failures["digits-2"]
        assert sorted(v.seller_id for v in valuation.sellers) == ["digits-1", "digits-4"]
        _check_against_plaintext(valuation, buyer, market)
    assert all(c.proc.returncode is not None for c in children.values())
    assert _pids_mentioning(str(tmp_path)) == []


def test_simulate_runtime_grpc_matches_inprocess(tmp_path):
    args = ["simulate", "configs/causal.toml", "--quiet", "--set", "ground-truth.enabled=false"]
    (tmp_path / "t").mkdir()
    try:
        grpc_run = _run(
            *args, "--out", str(tmp_path / "grpc"), "--set", "runtime=grpc", env={"TMPDIR": str(tmp_path / "t")}
        )
    finally:
        leftovers = _kill_leftovers(str(tmp_path))
    assert grpc_run.returncode == 0, grpc_run.stderr
    assert leftovers == [], "tip-fed simulate left seller processes running"
    assert _files_left(tmp_path / "t") == [], "tip-fed simulate left keys or data behind"
    # the reference runtime, in this process (what 'tip-fed simulate' runs, minus the interpreter start)
    run_scenario(
        load_config(ROOT / "configs/causal.toml", ["ground-truth.enabled=false"]),
        tmp_path / "inprocess",
        progress=False,
    )

    grpc_scores, inproc_scores = _valuations(tmp_path / "grpc"), _valuations(tmp_path / "inprocess")
    assert list(grpc_scores) == list(inproc_scores) == ["digits-1", "digits-2", "digits-3", "digits-4"]
    ranking = [sorted(s, key=s.get, reverse=True) for s in (grpc_scores, inproc_scores)]
    assert ranking[0] == ranking[1]
    # Sellers add fresh sanitising noise (OS entropy, 2^-18 of a slot, ~1e-8 of the largest total) to
    # every release, so two sessions agree to 1e-5 of each score, or to that noise floor near zero.
    scale = max(abs(s) for s in inproc_scores.values())
    for sid, score in inproc_scores.items():
        diff = abs(grpc_scores[sid] - score)
        assert diff <= max(1e-5 * abs(score), 1e-7 * scale), (sid, grpc_scores[sid], score)
    manifest = (tmp_path / "grpc" / "manifest.json").read_text()
    assert '"runtime": "grpc"' in manifest and '"failures": {}' in manifest


def _ctrl_c_delivered() -> None:
    """In the child: SIGINT handled and unblocked whatever this test process inherited or set (an ignored
    or blocked SIGINT is inherited across exec, and then Ctrl-C would never reach the run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_interrupted_simulate_stops_every_seller_process(tmp_path):
    (tmp_path / "t").mkdir()
    # only what the run needs from this (long-lived, many-tests) process's environment
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "PYTHONPATH") if k in os.environ}
    env.update(PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path / "t"))
    proc = subprocess.Popen(
        [
            str(CLI),
            "simulate",
            "configs/causal.toml",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
            "--set",
            "runtime=grpc",
            "--set",
            "ground-truth.enabled=false",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_delivered,
    )
    try:
        # interrupt as soon as the first seller process exists: the sellers are still starting (each loads
        # torch), so the run cannot have finished; waiting for all four left a window in which a fast run
        # (and a slow process scan on a loaded machine) let the Ctrl-C land after the results were written
        wait_until(lambda: proc.poll() is not None or _pids_mentioning(str(tmp_path / "t"), "seller serve"), 120,
                   poll_s=0.02)
        assert proc.poll() is None, proc.communicate()
        assert _pids_mentioning(str(tmp_path / "t"), "seller serve")
        proc.send_signal(signal.SIGINT)  # as Ctrl-C does, while the sellers are starting
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = _kill_leftovers(str(tmp_path))
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err[-3000:])
    assert leftovers == []
    assert _files_left(tmp_path / "t") == []
