"""Strangers polling the Runtime APIs of a real loopback deployment while the genuine run goes on.

Flower 1.42 hands a run's ServerApp task (on the SuperLink) or ClientApp task (on a SuperNode) to
whoever calls ``AcquireTask`` first, unless the component holds a SuperExec secret. Here a stranger
polls, for the whole genuine run:

- the SuperLink's public port (it serves Fleet, Control and Runtime APIs) for ``flwr-serverapp``
  tasks, with no secret and with a secret of its own;
- every seller's SuperNode Runtime API on 127.0.0.1 for ``flwr-clientapp`` tasks, with no secret
  and with *another seller's* secret (sellers do not trust each other).

None of those calls gets a task; the genuine run completes and values the genuine data, equal to
the in-process reference.
"""

from __future__ import annotations

import secrets
import stat
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from simulations.exchanges import exchange_inprocess
from simulations.flower_apps import scenario_app
from simulations.scenarios import build_market, make_buyer, write_seller_files
from simulations.settings import load_config
from tip_fed.runtimes.deployment import LocalDeployment
from tip_fed.runtimes.flower_deployment import run_app

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SETS = ["causal.seller-classes=[[1],[3],[4]]", "flower.node-wait-s=90", "flower.timeout-s=180"]
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


def _client(address: str, ca: Path | None, secret: bytes | None) -> RuntimeHttpClient:
    """A Runtime API client as a stranger builds it: Flower's own, optionally signing with ``secret``."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({ACQUIRE})))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=ca is None, root_certificates=ca.read_bytes() if ca else None,
        interceptors=interceptors)


class Stranger(threading.Thread):
    """Polls ``AcquireTask`` on every (name, client, task type) until stopped; counts what came back."""

    def __init__(self, targets: list[tuple[str, RuntimeHttpClient, str]]) -> None:
        super().__init__(daemon=True)
        self.targets, self.stop = targets, threading.Event()
        self.outcomes: dict[str, Counter] = {name: Counter() for name, _, _ in targets}
        self.errors: dict[str, str] = {}
        self.tasks: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for name, client, task_type in self.targets:
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
                except Exception as exc:
                    self.outcomes[name]["refused"] += 1
                    self.errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                self.outcomes[name]["token" if res.token else "empty"] += 1
                if res.token:
                    self.tasks.append(f"{name} run {res.task.run_id}")
            self.stop.wait(0.05)


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime-auth")
    config = load_config(ROOT / "configs" / "causal.toml", SETS)
    market = build_market(config)
    reference = exchange_inprocess(config, market, make_buyer(market, config), False)
    deployment = LocalDeployment(tmp / "deploy", exact_per_sample=True)
    with deployment.group:
        deployment.up(write_seller_files(market, tmp / "sellers"))
        ca = deployment.certs / "ca.crt"
        names = sorted(deployment.runtime_ports)
        foreign = {n: (deployment.keys / f"supernode-{names[i - 1]}.superexec-secret").read_bytes()
                   for i, n in enumerate(names)}  # the neighbouring seller's secret
        public = f"127.0.0.1:{deployment.port}"
        targets = [("superlink-no-secret", _client(public, ca, None), "flwr-serverapp"),
                   ("superlink-own-secret", _client(public, ca, secrets.token_bytes(32)), "flwr-serverapp")]
        for n in names:
            local = f"127.0.0.1:{deployment.runtime_ports[n]}"
            targets += [(f"{n}-no-secret", _client(local, None, None), "flwr-clientapp"),
                        (f"{n}-other-sellers-secret", _client(local, None, foreign[n]), "flwr-clientapp")]
        stranger = Stranger(targets)
        stranger.start()
        try:
            valuation = run_app(deployment, scenario_app(config, market.replicate or 0), tmp / "result",
                                flower=config.flower)
        finally:
            stranger.stop.set()
            stranger.join(30)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in deployment.keys.glob("*.superexec-secret")}
        keys_mode = stat.S_IMODE(deployment.keys.stat().st_mode)
        logs = {p.stem: p.read_text(errors="replace") for p in deployment.group.log_dir.glob("*.log")}
    return {"stranger": stranger, "valuation": valuation, "reference": reference, "names": names,
            "modes": modes, "keys_mode": keys_mode, "logs": logs}


def test_no_stranger_ever_gets_a_task_from_any_runtime_api(played):
    stranger = played["stranger"]
    print({name: dict(c) for name, c in stranger.outcomes.items()})
    assert stranger.tasks == [], stranger.tasks
    for name, counts in stranger.outcomes.items():
        # it polled all along, and every call was refused as unauthenticated
        assert counts["refused"] >= 5 and set(counts) == {"refused"}, (name, counts)
        assert "401 Unauthorized" in stranger.errors[name], (name, stranger.errors[name])


def test_the_genuine_run_completes_with_the_genuine_valuation(played):
    got, reference = played["valuation"].by_id(), played["reference"].by_id()
    assert sorted(got) == played["names"] and played["valuation"].missing == []
    assert played["valuation"].rejected == {}
    # the genuine sellers' data: same record counts, and per-sample scores within CKKS noise (absolute
    # at the session's scale) of the in-process session, so the stranger's forged +729,461 cannot pass
    # (commitment roots are salted per session, so they differ between any two sessions)
    scale = max(np.abs(r.per_sample).max() for r in reference.values())
    for sid in got:
        assert got[sid].n_samples == reference[sid].n_samples
        np.testing.assert_allclose(got[sid].per_sample, reference[sid].per_sample, atol=1e-6 * scale)
    # the genuine app ran through the guard on the SuperLink and on every seller
    assert "signed by trusted publisher" in played["logs"]["superlink-guard"]
    for sid in got:
        assert "signed by trusted publisher" in played["logs"][f"superexec-supernode-{sid}"], sid


def test_each_runtime_api_has_its_own_owner_only_secret(played):
    assert played["keys_mode"] == 0o700
    expected = {"superlink.superexec-secret", *(f"supernode-{n}.superexec-secret" for n in played["names"])}
    assert played["modes"] == dict.fromkeys(expected, 0o600)
