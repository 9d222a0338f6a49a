"""A stranger against the README's Flower deployment, played with real Flower processes on 127.0.0.1.

One checkout (a copy of this tree) goes through the README's deploy sequence: ``tip-fed
export-sellers``, ``tip-fed deploy up``, ``tip-fed deploy sign``, ``flwr run . tip-local``. Between
those steps a stranger holding only the CA certificate and the SuperLink address:

1. runs ``flwr run`` with its own app, whose ClientApp would write a marker file and read the
   seller's ``data-path``: the guarded SuperLink refuses to start its ServerApp;
2. runs it again signed with its own key, on a SuperLink told to trust that key (an operator the
   sellers do not trust): the ServerApp runs and messages every seller, and each seller refuses;
3. registers its own node key (the Control API needs no login in Flower 1.42) and starts a rogue
   SuperNode claiming ``seller-id="digits-4"`` over other data: the buyer does not count it and
   values the genuine digits-4.

Finally the FAB that ``flwr run .`` builds in that checkout, after the whole sequence, is listed.
Every process is stopped by PID and checked to be gone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from simulations.exchanges import exchange_inprocess
from simulations.scenarios import build_market, make_buyer
from simulations.settings import load_config
from tip_fed import tls
from tip_fed.flower import trust
from tip_fed.protocol import Valuation
from tip_fed.runtimes.deployment import BIN, flower_env, free_port
from tip_fed.runtimes.reaper import descendants, running, terminate

from ..conftest import flower_pyproject

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def stop_pids(pids):
    """Stop these processes and everything below them (only processes this test started)."""
    procs = [psutil.Process(p) for p in running(pids)]
    terminate([*procs, *(d for p in procs for d in descendants(p.pid))], grace_s=5.0)

ROOT = Path(__file__).resolve().parents[2]
SETS = ["causal.seller-classes=[[1],[3],[4]]", "flower.node-wait-s=90", "flower.timeout-s=180"]
SELLERS = ["digits-1", "digits-3", "digits-4"]
REFUSED = "REFUSED untrusted app"
LEFT_BEHIND = ("deploy/result/valuation.json", "deploy/deployment.json", "deploy/run-config.toml",
               "deploy/keys/publisher", "deploy/certs/ca.key", "sellers/digits-4.safetensors", "tip-fed-0.1.0.fab")

STRANGER_PYPROJECT = flower_pyproject("innocent", "stranger", "innocent.server:app", "innocent.client:app",
                                      config='marker = ""\n')
STRANGER_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg, context):
    path = str(context.node_config.get("data-path", ""))
    data = Path(path).read_bytes() if path else b""
    with open(context.run_config["marker"], "a") as f:
        f.write(f"{path} {len(data)}\\n")
    return Message(RecordDict({"loot": ConfigRecord({"bytes": len(data)})}), reply_to=msg)
"""
STRANGER_SERVER = """\
from pathlib import Path

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    Path(context.run_config["marker"] + ".serverapp").write_text("the stranger's ServerApp ran")
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=240))
    errors = [r.error.reason for r in replies if r.has_error()]
    Path(context.run_config["marker"] + ".replies").write_text(f"{len(nodes)} {len(replies)} {len(errors)}")
"""


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _checkout(dest: Path) -> Path:
    """A copy of this tree's tracked and unignored files: what a user has after cloning."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _stranger_app(home: Path, ca: Path, port: int) -> tuple[Path, dict[str, str]]:
    """The stranger's app and its own FLWR_HOME, knowing only the CA certificate and the address."""
    app = home / "app"
    (app / "innocent").mkdir(parents=True)
    (app / "pyproject.toml").write_text(STRANGER_PYPROJECT)
    (app / "innocent" / "__init__.py").write_text("")
    (app / "innocent" / "client.py").write_text(STRANGER_CLIENT)
    (app / "innocent" / "server.py").write_text(STRANGER_SERVER)
    shutil.copy(ca, home / "ca.crt")
    flwr_home = home / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{home / "ca.crt"}"\n'
    )
    return app, {**os.environ, **flower_env(flwr_home)}


def _node_id(output: str) -> int:
    return [int(w) for w in output.replace(".", " ").split() if w.isdigit()][-1]


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """The README's deploy sequence with the stranger's three attempts in between; a dict of evidence."""
    tmp = tmp_path_factory.mktemp("stranger")
    app = _checkout(tmp / "checkout")
    env = {**os.environ, **flower_env(app / "deploy" / "flwr-home"), "PYTHONPATH": str(app)}
    tip = str(BIN / "tip-fed")
    sets = [a for s in SETS for a in ("--set", s)]
    out = _run([tip, "export-sellers", "configs/causal.toml", "--out", "sellers/", *sets], app, env)
    assert out.returncode == 0, out.stderr
    upped = _run([tip, "deploy", "up", "deploy/", "--sellers", "sellers/"], app, env, timeout=300)
    state_file = app / "deploy" / "deployment.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"processes": {}}
    pids = list(state["processes"].values())
    rogue: subprocess.Popen | None = None
    evidence: dict = {"app": app, "state": state}
    try:
        assert upped.returncode == 0, upped.stderr
        port = state["port"]
        s_app, s_env = _stranger_app(tmp / "stranger", app / "deploy" / "certs" / "ca.crt", port)
        marker = tmp / "stranger" / "marker.txt"
        # 1. an unsigned app: the guarded SuperLink refuses to run its ServerApp
        first = _run([str(BIN / "flwr"), "run", str(s_app), "target", "--stream",
                      "--run-config", f'marker="{marker}"'], s_app, s_env, timeout=300)
        evidence["first"] = (first, marker.exists(), Path(f"{marker}.serverapp").exists(),
                             _read(app / "deploy" / "logs" / "superlink-guard.log"))
        # 2. signed with the stranger's own key, on a SuperLink that trusts it: the sellers refuse
        s_key, _, s_trusted = trust.create_publisher_key(tmp / "stranger" / "keys", "stranger")
        with open(app / "deploy" / "keys" / "superlink.trusted.yaml", "a") as f:
            f.write(s_trusted.read_text())
        signature = trust.sign_fab(trust.build_fab(s_app), s_key, {"marker": str(marker)})
        second = _run([str(BIN / "flwr"), "run", str(s_app), "target", "--stream",
                       "--run-config", f'marker="{marker}" app-signature="{signature}"'], s_app, s_env, timeout=400)
        evidence["second"] = (second, marker.exists(), Path(f"{marker}.serverapp").exists(),
                              Path(f"{marker}.replies").read_text() if Path(f"{marker}.replies").exists() else "",
                              {n: _read(app / "deploy" / "logs" / f"supernode-{n}.log")
                               + _read(app / "deploy" / "logs" / f"superexec-supernode-{n}.log")  # its ClientApps
                               for n in SELLERS})
        # 3. a rogue SuperNode with a key the stranger registered itself, claiming digits-4
        rogue_key, rogue_pub = tls.create_node_key(tmp / "stranger" / "keys", "rogue")
        registered = _run([str(BIN / "flwr"), "supernode", "register", str(rogue_pub), "target"], s_app, s_env)
        assert registered.returncode == 0, registered.stderr + registered.stdout
        rogue_id = _node_id(registered.stdout + registered.stderr)
        other = tmp / "stranger" / "other.safetensors"
        shutil.copy(app / "sellers" / "digits-1.safetensors", other)
        rogue_log = open(tmp / "stranger" / "rogue.log", "w")
        rogue = subprocess.Popen([
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
            "--root-certificates", str(tmp / "stranger" / "ca.crt"), "--auth-supernode-private-key", str(rogue_key),
            "--node-config", f'data-path="{other}" seller-id="digits-4"',
        ], env=s_env, stdout=rogue_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for _ in range(60):  # until the rogue is online next to the three sellers
            listed = _run([str(BIN / "flwr"), "supernode", "list", "target", "--format", "json"], s_app, s_env)
            if str(rogue_id) in listed.stdout and listed.stdout.count('"online"') >= 4:
                break
            time.sleep(1)
        evidence["rogue"] = (rogue_id, listed.stdout)
        # 4. the README's signed run of the genuine app
        signed = _run([tip, "deploy", "sign", "deploy/", "--app", ".", *sets], app, env, timeout=300)
        assert signed.returncode == 0, signed.stderr
        genuine = _run([str(BIN / "flwr"), "run", ".", "tip-local", "--stream",
                        "--run-config", "deploy/run-config.toml"], app, env, timeout=900)
        result = app / "deploy" / "result" / "valuation.json"
        valued = Valuation.from_dict(json.loads(result.read_text())) if result.exists() else None
        evidence["genuine"] = (genuine, valued)
        (app / "tip-fed-0.1.0.fab").write_bytes(b"an earlier FAB lying in the checkout")
        evidence["left"] = {rel: (app / rel).is_file() for rel in LEFT_BEHIND}
        evidence["fab"] = trust.build_fab(app)  # what 'flwr run .' would upload now
        evidence["spawned"] = [p.pid for pid in [*pids, rogue.pid] for p in descendants(pid)]
    finally:
        if rogue is not None:
            stop_pids([rogue.pid])
        downed = _run([tip, "deploy", "down", "deploy/"], app, env, timeout=120) if state_file.exists() else None
        stop_pids(pids)  # only if 'deploy down' did not run or failed
    evidence["downed"] = downed
    evidence["all_pids"] = pids + evidence.get("spawned", []) + ([rogue.pid] if rogue else [])
    return evidence


def test_unsigned_stranger_app_never_runs_on_the_superlink(played):
    first, marker, serverapp_ran, guard_log = played["first"]
    assert not serverapp_ran and not marker, first.stdout[-2000:]
    # the refusal is in the operator's guard log and in the run's log the stranger streamed
    assert REFUSED in guard_log and "not signed" in guard_log, guard_log[-3000:]
    assert REFUSED in first.stdout + first.stderr


def test_no_seller_runs_a_stranger_clientapp_even_when_the_superlink_runs_its_serverapp(played):
    second, marker, serverapp_ran, replies, logs = played["second"]
    # the stranger's ServerApp did run and messaged all three sellers; every reply is an error
    assert serverapp_ran, second.stdout[-3000:] + second.stderr[-2000:]
    assert replies == "3 3 3", replies
    # no seller executed its ClientApp: the marker file was never written, no data file opened
    assert not marker
    for name, log in logs.items():
        assert REFUSED in log and "not by a trusted publisher" in log, (name, log[-3000:])


def test_rogue_node_claiming_a_seller_id_is_not_counted_and_the_genuine_seller_is_valued(played):
    rogue_id, listed = played["rogue"]
    genuine, valuation = played["genuine"]
    assert valuation is not None, genuine.stdout[-3000:] + genuine.stderr[-2000:]
    config = load_config(ROOT / "configs" / "causal.toml", SETS)
    market = build_market(config)
    reference = exchange_inprocess(config, market, make_buyer(market, config), False).by_id()
    got = valuation.by_id()
    assert sorted(got) == SELLERS and valuation.missing == []
    scale = max(abs(r.per_sample).max() for r in reference.values())  # CKKS noise is absolute at this scale
    for sid in SELLERS:  # the genuine data: same size and total as the in-process reference (roots are salted)
        assert got[sid].n_samples == reference[sid].n_samples
        assert abs(got[sid].total - reference[sid].total) <= max(
            1e-5 * abs(reference[sid].total), reference[sid].n_samples * 1e-6 * scale
        )
    assert str(rogue_id) in listed
    assert "not registered for any seller" in valuation.rejected.get(f"node-{rogue_id}", ""), valuation.rejected
    assert set(valuation.rejected) == {f"node-{rogue_id}"}


def test_fab_of_the_readme_sequence_ships_code_and_config_only(played):
    # the README's sequence left results, keys, data and an earlier FAB in the checkout
    assert played["left"] == dict.fromkeys(LEFT_BEHIND, True)
    names = zipfile.ZipFile(io.BytesIO(played["fab"])).namelist()
    code = [n for n in names if n.endswith(".py") and n.split("/")[0] in ("tip_fed", "simulations")]
    config = [n for n in names if n.startswith("configs/") and n.endswith(".toml")]
    assert sorted(set(names) - set(code) - set(config)) == [".info/CONTENT", "pyproject.toml"]
    assert "tip_fed/flower/client_app.py" in code and "configs/causal.toml" in config


def test_every_process_of_the_sequence_is_stopped(played):
    assert played["downed"] is not None and played["downed"].returncode == 0, played["downed"]
    assert running(played["all_pids"]) == []


def test_flowers_own_trusted_entities_refuse_even_an_app_signed_by_the_trusted_key(tmp_path):
    # Why tip_fed checks signatures itself: a SuperNode started with Flower's --trusted-entities
    # (listing the publisher's key) refuses an app the publisher signed, because a FAB uploaded by
    # 'flwr run <dir>' reaches it without the verifications only Flower Hub provides.
    from tip_fed.runtimes.deployment import CONNECTION, LocalDeployment

    deployment = LocalDeployment(tmp_path / "dep")
    with deployment.group:
        deployment.prepare()
        deployment.start_superlink()
        private, public = deployment.node_key("s")
        deployment.nodes["s"] = deployment.register(public)
        node = deployment.group.start(
            "supernode-flower-trust",
            [
                str(BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{deployment.port}",
                "--port",
                str(free_port()),
                "--root-certificates",
                str(deployment.certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(private),
                "--trusted-entities",
                str(deployment.trusted),
                "--node-config",
                f'data-path="{tmp_path / "x"}"',
            ],
            env=deployment.env,
        )  # Flower's own launchers, no tip_fed guard
        app, _ = _stranger_app(tmp_path / "publisher", deployment.certs / "ca.crt", deployment.port)
        marker = tmp_path / "marker.txt"
        signature = trust.sign_fab(trust.build_fab(app), deployment.publisher, {"marker": str(marker)})
        deployment.flwr(
            "run",
            str(app),
            CONNECTION,
            "--stream",
            "--run-config",
            f'marker="{marker}" app-signature="{signature}"',
            timeout_s=400,
        )
        log = node.log.read_text(errors="replace")
    assert Path(f"{marker}.replies").read_text() == "1 1 1"  # the one node answered with an error
    assert not marker.exists()
    assert "App verification is not supported by the connected SuperLink" in log, log[-3000:]
