"""Flower runtimes against the in-process reference, with real Flower processes.

``flower-simulation`` runs under Ray in this process; ``flower-deployment`` starts a real
SuperLink (HTTPS, SuperNode authentication) and three seller SuperNodes as separate processes,
runs the app with ``flwr run`` and shows that a fourth SuperNode with an unregistered key is
refused. Every process a test starts is stopped by PID before it ends, and checked to be gone.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations.exchanges import exchange_flower_simulation, exchange_inprocess
from simulations.flower_apps import scenario_app
from simulations.scenarios import build_market, make_buyer, write_seller_files
from simulations.settings import load_config
from tip_fed.runtimes.deployment import CONNECTION, LocalDeployment
from tip_fed.runtimes.flower_deployment import run_app
from tip_fed.runtimes.reaper import descendants, running, stop_tagged, tagged

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# three sellers (the SuperNodes), generous waits for a loaded 2-core machine
OVERRIDES = ["causal.seller-classes=[[1], [3], [4]]", "flower.node-wait-s=90", "flower.timeout-s=180"]


@pytest.fixture(scope="module")
def scenario():
    config = load_config(ROOT / "configs" / "causal.toml", OVERRIDES)
    market = build_market(config)
    buyer = make_buyer(market, config)
    return config, market, buyer, exchange_inprocess(config, market, buyer, False)


def _assert_same_valuation(got, ref):
    assert got.rejected == {} and got.missing == []
    got_by, ref_by = got.by_id(), ref.by_id()
    assert sorted(got_by) == sorted(ref_by)
    # CKKS noise is absolute at the session's scale, so per-sample scores are compared at that scale
    scale = max(np.abs(r.per_sample).max() for r in ref_by.values())
    total_scale = max(abs(r.total) for r in ref_by.values())
    for sid, r in ref_by.items():
        g = got_by[sid]
        # commitments are salted per session: two sessions over the same data never share a root
        assert g.n_samples == r.n_samples and g.commitment != r.commitment and len(g.commitment) == 64
        # a total sums n per-sample scores, each within the session's CKKS and sanitising noise
        assert abs(g.total - r.total) <= max(1e-5 * abs(r.total), r.n_samples * 1e-6 * scale, 1e-7 * total_scale), \
            (sid, g.total, r.total)
        np.testing.assert_allclose(g.per_sample, r.per_sample, rtol=1e-5, atol=1e-6 * scale)

    def ranking(v):
        return [s.seller_id for s in sorted(v.sellers, key=lambda s: s.total, reverse=True)]

    assert ranking(got) == ranking(ref)


def test_flower_simulation_matches_inprocess(scenario):
    config, market, buyer, ref = scenario
    valuation = exchange_flower_simulation(config, market, buyer, False)
    _assert_same_valuation(valuation, ref)
    assert buyer.valuation_seconds is not None  # the buyer object ran the session: its phase is timed


def test_flower_deployment_with_tls_and_node_auth_matches_inprocess(scenario, tmp_path):
    # Prepare: CA + SuperLink certificate, SuperLink with --enable-supernode-auth, one registered
    # key and SuperNode per seller file; a fourth SuperNode with a key nobody registered
    config, market, _, ref = scenario
    deployment = LocalDeployment(tmp_path, exact_per_sample=True)
    started: list[int] = []
    with deployment.group:
        deployment.up(write_seller_files(market, tmp_path / "sellers"))
        intruder_key, _ = deployment.node_key("intruder")
        intruder = deployment.start_supernode("intruder", intruder_key, tmp_path / "sellers" / "digits-1.safetensors",
                                              seller_id="intruder")
        # Execute: a valuation through `flwr run`, over HTTPS
        valuation = run_app(deployment, scenario_app(config), tmp_path / "result", flower=config.flower)
        listed = deployment.flwr("supernode", "list", CONNECTION)
        intruder_code = intruder.proc.wait(timeout=60)
        started = [c.pid for c in deployment.group.children]
        started += [p.pid for c in deployment.group.children for p in descendants(c.pid)]
    # Assert: same valuations and ranking as in-process; the unregistered SuperNode was refused
    _assert_same_valuation(valuation, ref)
    log = intruder.log.read_text(errors="replace")
    assert intruder_code != 0 and "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log[-2000:]
    assert all(str(node_id) in listed for node_id in deployment.nodes.values())
    assert len(deployment.nodes) == 3
    # every process the test started (and what Flower spawned below them) is gone
    assert running(started) == [] and tagged(deployment.group.token) == []


def test_deploy_up_and_down_cli_stop_exactly_what_they_started(scenario, tmp_path):
    # Prepare: one seller file
    _, market, _, _ = scenario
    sellers = tmp_path / "sellers"
    write_seller_files(dataclasses.replace(market, sellers={"digits-4": market.sellers["digits-4"]}), sellers)
    cli = Path(sys.executable).parent / "tip-fed"
    root = tmp_path / "dep"
    # Execute: deploy up leaves a SuperLink and a SuperNode running after the command exits
    upped = subprocess.run([str(cli), "deploy", "up", str(root), "--sellers", str(sellers)],
                           capture_output=True, text=True, timeout=300)
    state = json.loads((root / "deployment.json").read_text()) if upped.returncode == 0 else {"processes": {}}
    pids = list(state["processes"].values())
    try:
        assert upped.returncode == 0, upped.stderr
        assert sorted(state["processes"]) == ["superexec-superlink", "superexec-supernode-digits-4", "superlink",
                                              "supernode-digits-4"]
        assert running(pids) == pids
        spawned = [p.pid for pid in pids for p in descendants(pid)]
        downed = subprocess.run([str(cli), "deploy", "down", str(root)], capture_output=True, text=True, timeout=120)
    finally:
        if state.get("token"):
            stop_tagged(state["token"], 5.0)  # only if the assertions above failed before 'down' ran
    # Assert: down stopped those PIDs and what Flower spawned under them; the state file is gone
    assert downed.returncode == 0, downed.stderr
    assert running(pids + spawned) == [] and tagged(state["token"]) == []
    assert not (root / "deployment.json").exists()
    assert "ca.crt" in {p.name for p in (root / "certs").iterdir()}
    assert oct((root / "keys" / "digits-4").stat().st_mode & 0o777) == "0o600"
