"""Faults and load on real processes: ``tip-fed seller serve`` services over TLS on 127.0.0.1.

* 3 of 10 sellers are killed (2) or hung (1) mid-round: the other 7 are valued, the round ends
  while the hung seller is still frozen (the per-call deadline, not the seller, ends its call) and
  the 3 are named as missing.
* one seller service answers 20 concurrent buyer sessions without error, with bounded memory.

Every process a test starts is stopped by PID (ProcessGroup), also when the test fails.
"""

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from simulations.scenarios import build_market, make_buyer
from simulations.settings import load_config
from tip_fed.grpc import ClientTLS, SellerEndpoint, value_sellers, wait_until_healthy
from tip_fed.protocol.data import save_dataset
from tip_fed.runtimes.processes import ProcessGroup
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tip-fed"
READY = r"ready on 127\.0\.0\.1:(?P<port>\d+) \(tls\)"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _setup(tmp_path, n_sellers):
    """The causal market's buyer, and ``n_sellers`` seller files cut from its sellers' data."""
    config = load_config(ROOT / "configs/causal.toml", ["ground-truth.enabled=false"])
    market = build_market(config)
    pool = list(market.sellers.values())
    files = {}
    for i in range(n_sellers):
        data = pool[i % len(pool)]
        part = {k: v[(i // len(pool)) * 20:(i // len(pool)) * 20 + 20] for k, v in data.items()}
        files[f"seller-{i:02d}"] = save_dataset(part, tmp_path / "data" / f"seller-{i:02d}.safetensors")
    proc = subprocess.run([str(CLI), "tls", "init", str(tmp_path / "tls")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return config, market, files, ClientTLS(tmp_path / "tls" / "ca.crt")


def _start(group, tmp_path, files, extra=()):
    children = {
        sid: group.start(sid, [
            str(CLI), "seller", "serve", "--data", str(path), "--seller-id", sid, "--port", "0",
            "--tls-cert", str(tmp_path / "tls" / "seller.crt"), "--tls-key", str(tmp_path / "tls" / "seller.key"),
            "--server-tls-only", "--exact-per-sample", "--max-exact", "-1", "--total-max-exact", "-1",
            *extra,
        ])
        for sid, path in files.items()
    }
    ports = {sid: group.wait_for(child, READY, 300)["port"] for sid, child in children.items()}
    return children, [SellerEndpoint(sid, f"127.0.0.1:{port}") for sid, port in ports.items()]


def _rss_kib(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not found for {pid}")


def test_three_of_ten_sellers_killed_or_hung_mid_round(tmp_path):
    config, market, files, tls = _setup(tmp_path, 10)
    killed, hung = {"seller-02", "seller-05"}, {"seller-08"}
    timeout_s = 20.0
    with ProcessGroup(tmp_path / "logs") as group:
        children, endpoints = _start(group, tmp_path, files)
        for endpoint in endpoints:
            wait_until_healthy(endpoint, tls=tls, timeout_s=60)

        def sabotage(endpoint):
            """Runs as each Value call starts: the round is under way when the faults hit."""
            pid = children[endpoint.name].pid
            if endpoint.name in killed:
                os.kill(pid, signal.SIGKILL)
            elif endpoint.name in hung:
                os.kill(pid, signal.SIGSTOP)

        buyer = make_buyer(market, config)
        offer = buyer.offer(max_samples=20)
        replies, failures = value_sellers(endpoints, offer, tls=tls, timeout_s=timeout_s, retries=0,
                                          before_call=sabotage)
        # the round ended while the hung seller was still frozen: it never waited for it to come back
        hung_states = {sid: psutil.Process(children[sid].pid).status() for sid in hung}
        valuation = buyer.settle(list(replies.values()), expected=list(files))
        for sid in hung:
            os.kill(children[sid].pid, signal.SIGKILL)  # a stopped process ignores SIGTERM
        killed_codes = {sid: children[sid].proc.wait(10) for sid in killed}
    assert hung_states == {sid: psutil.STATUS_STOPPED for sid in hung}
    assert killed_codes == {sid: -signal.SIGKILL for sid in killed}
    for s in killed:  # a dead seller is reported unreachable, not slow
        assert "UNAVAILABLE" in failures[s], failures[s]
    assert sorted(valuation.missing) == sorted(killed | hung)
    assert sorted(failures) == sorted(killed | hung)
    # frozen mid-call: the deadline expires; frozen during the TLS handshake: no connection
    for s in hung:
        assert "DEADLINE" in failures[s] or "UNAVAILABLE" in failures[s], failures[s]
    assert sorted(v.seller_id for v in valuation.sellers) == sorted(set(files) - killed - hung)
    assert valuation.rejected == {}


def test_one_seller_service_answers_20_concurrent_sessions_with_bounded_memory(tmp_path):
    config, market, files, tls = _setup(tmp_path, 1)
    with ProcessGroup(tmp_path / "logs") as group:
        # 20 buyers on one host share an address: without client certificates the per-buyer cap sees one
        children, endpoints = _start(group, tmp_path, files, extra=("--max-offers-per-peer", "20"))
        (endpoint,) = endpoints
        pid = children[endpoint.name].pid
        wait_until_healthy(endpoint, tls=tls, timeout_s=60)
        buyer = make_buyer(market, config)
        rss = []
        for _ in range(2):  # two waves: memory after the second is not above the first's plateau
            offers = [buyer.offer(max_samples=20) for _ in range(20)]
            ids = [pb.Offer.FromString(o).session_id for o in offers]
            start = threading.Barrier(20)

            def one(offer, start=start):
                start.wait()
                return value_sellers([endpoint], offer, tls=tls, timeout_s=300, retries=0)

            with ThreadPoolExecutor(max_workers=20) as threads:
                results = list(threads.map(one, offers))
            for sid, (replies, failures) in zip(ids, results, strict=True):
                assert failures == {}, failures
                valuation = buyer.settle(list(replies.values()), session_id=sid, expected=[endpoint.name])
                assert valuation.rejected == {} and valuation.missing == [] and len(valuation.sellers) == 1
            rss.append(_rss_kib(pid))
        peak = _rss_kib(pid, "VmHWM")
    assert peak < 3 * 1024 * 1024, f"seller peak RSS {peak / 1024:.0f} MiB"
    assert rss[1] < rss[0] + 200 * 1024, f"seller RSS grew from {rss[0] / 1024:.0f} to {rss[1] / 1024:.0f} MiB"
