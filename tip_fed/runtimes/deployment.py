"""A local Flower deployment on loopback: one SuperLink, N seller SuperNodes, TLS and node auth.

Sellers run only signed code: the deployment makes a publisher key (``keys/publisher``), every
SuperNode trusts only its public half (``trusted-publishers`` node config) and launches its
ClientApps through tip_fed's guard (``guard-bin/flwr-clientapp``, :mod:`tip_fed.flower.trust`),
and :meth:`LocalDeployment.write_run_config` signs the FAB the buyer runs. The run config also
names the node id registered for each seller, so the buyer counts a reply only from that node.

Used by :func:`tip_fed.workflow_flower_deployment` (start, value, stop) and by ``tip-fed
deploy up/down`` (start, leave running, stop later from the state file). Every process is a real Flower process
talking HTTPS on 127.0.0.1. Every process carries the deployment's run token (see
:mod:`tip_fed.runtimes.reaper`), and so does everything Flower spawns below it, detached or orphaned
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``): stopping the deployment stops
exactly the processes carrying its token, never a process found by name.

Only the deployment's own ``flower-superexec`` processes may claim a task from a Runtime API:
the SuperLink and every SuperNode run in Flower's ``process`` isolation with
``--superexec-auth-secret-file``, and their superexecs (started here, not by Flower) sign each
``AcquireTask`` with the same secret. The SuperLink's secret and each seller's own secret are
random 32-byte files, mode 0600, in ``keys/`` (mode 0700); a seller's secret is shared only with
its own superexec, so one seller's secret opens no other seller's Runtime API.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tip_fed import tls
from tip_fed.console import counted, phase
from tip_fed.errors import ConfigError, TipError
from tip_fed.files import write_private
from tip_fed.flower import trust
from tip_fed.flower.server_app import format_bindings, parse_bindings
from tip_fed.runtimes.processes import Child, ProcessGroup, ProcessStartError
from tip_fed.runtimes.reaper import Reaper, stop_tagged

BIN = Path(sys.executable).parent
CONNECTION = "tip-local"
STATE_FILE = "deployment.json"
RUN_CONFIG_FILE = "run-config.toml"


def flower_env(home: Path) -> dict[str, str]:
    """Environment for every Flower process: private FLWR_HOME, no telemetry, no installs, no update check."""
    return {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        # Flower spawns flower-superexec, flwr-serverapp and flwr-clientapp by name
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, child: Child, timeout_s: float = 60.0) -> None:
    """Block until ``port`` accepts connections; ProcessStartError (with its log) if ``child`` dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise ProcessStartError(
                f"{child.name} exited with code {child.proc.returncode} before listening on {port}:\n{child.tail()}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise ProcessStartError(f"{child.name} did not listen on 127.0.0.1:{port} within {timeout_s:g} s:\n{child.tail()}")


@dataclass
class LocalDeployment:
    """Paths, ports and processes of one loopback deployment rooted at ``root``.

    With ``reaper`` (a run's deployment in a :class:`~tip_fed.runtimes.processes.PrivateRun`) every
    process dies with this one; without (``tip-fed deploy up``) they keep running until ``down``.
    """

    root: Path
    port: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # seller name -> Flower node id
    runtime_ports: dict[str, int] = field(default_factory=dict)  # seller name -> its SuperNode's Runtime API port
    reaper: Reaper | None = None
    exact_per_sample: bool = False  # simulated data only: per-sample scores without DP noise, no exact-answer cap

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.home = self.root / "flwr-home"
        self.certs = self.root / "certs"
        self.keys = self.root / "keys"  # private: publisher key, node keys, Runtime API secrets
        self.publisher = self.keys / "publisher"
        self.trusted = self.keys / "publisher.trusted.yaml"
        self.superlink_trusted = self.keys / "superlink.trusted.yaml"  # publishers whose ServerApps the SuperLink runs
        self.guard_bin = self.root / "guard-bin"
        self.group = ProcessGroup(self.root / "logs", reaper=self.reaper, die_with_parent=self.reaper is not None)
        self.env = {**flower_env(self.home), **self.group.child_env()}
        self.port = self.port or free_port()

    def superexec_secret(self, owner: str) -> Path:
        """A fresh random shared secret for ``owner``'s Runtime API (owner-only file in ``keys/``)."""
        path = self.keys / f"{owner}.superexec-secret"
        write_private(path, secrets.token_bytes(32))
        return path

    def start_superexec(self, name: str, runtime_port: int, secret: Path, parent: Child,
                        env: dict[str, str], tls_ca: Path | None = None) -> Child:
        """The one ``flower-superexec`` allowed to claim tasks on 127.0.0.1:``runtime_port``: it signs
        its ``AcquireTask`` calls with ``secret``; it exits with ``parent``."""
        transport = ["--root-certificates", str(tls_ca)] if tls_ca else ["--insecure"]
        return self.group.start(f"superexec-{name}", [
            str(BIN / "flower-superexec"), *transport, "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--superexec-auth-secret-file", str(secret), "--parent-pid", str(parent.pid),
        ], env=env)

    def prepare(self) -> None:
        """Create the CA, the SuperLink certificate and the ``flwr`` CLI connection (no keys yet)."""
        self.keys.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys, 0o700)
        ca = tls.create_ca(self.certs)
        tls.issue_cert(ca, self.certs, "superlink")
        trust.create_publisher_key(self.keys, self.publisher.name)
        self.superlink_trusted.write_text(self.trusted.read_text())
        trust.install_guard(self.guard_bin)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def guarded_env(self, **extra: str) -> dict[str, str]:
        """Flower environment whose ``flwr-clientapp`` / ``flwr-serverapp`` are tip_fed's signature guard."""
        return {**self.env, "PATH": f"{self.guard_bin}{os.pathsep}{self.env['PATH']}", **extra}

    def start_superlink(self) -> None:
        """SuperLink with HTTPS and SuperNode authentication on 127.0.0.1:port; it runs only ServerApps
        signed by a key in ``keys/superlink.trusted.yaml``, launched by its superexec, the only client
        holding the SuperLink's Runtime API secret (Flower 1.42 serves that API on the same port)."""
        secret = self.superexec_secret("superlink")
        env = self.guarded_env(**{trust.PUBLISHERS_ENV: str(self.superlink_trusted),
                                  trust.GUARD_LOG_ENV: str(self.group.log_dir / "superlink-guard.log")})
        child = self.group.start("superlink", [
            str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "superlink.crt"), "--ssl-keyfile", str(self.certs / "superlink.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(self.root / "superlink.db"),
            "--isolation", "process", "--superexec-auth-secret-file", str(secret),
        ], env=env)
        wait_for_port(self.port, child)
        self.start_superexec("superlink", self.port, secret, child, env, tls_ca=self.certs / "ca.crt")

    def node_key(self, name: str) -> tuple[Path, Path]:
        """A fresh SuperNode key pair (OpenSSH EC P-384) under ``keys/``."""
        return tls.create_node_key(self.keys, name)

    def register(self, public_key: Path) -> int:
        """``flwr supernode register``: allow this key to connect; returns the node id."""
        out = self.flwr("supernode", "register", str(public_key), CONNECTION)
        digits = [int(w) for w in out.replace(".", " ").split() if w.isdigit()]
        if not digits:
            raise TipError(f"could not read the node id from 'flwr supernode register':\n{out}")
        return digits[-1]

    def start_supernode(self, name: str, private_key: Path, data_path: Path, seller_id: str | None = None) -> Child:
        """A seller SuperNode with its own data file, authenticating with ``private_key``, running
        ClientApps only through the guard and only from apps the publisher key signed, launched by
        its own superexec, the only client holding this seller's Runtime API secret."""
        # the privacy ledger lives with the deployment; simulated sellers hold no one's data: no exact-answer cap
        simulated = " exact-per-sample=true max-exact=-1 total-max-exact=-1" if self.exact_per_sample else ""
        node_config = (f'data-path="{data_path}" seller-id="{seller_id or data_path.stem}" '
                       f'{trust.PUBLISHERS}="{self.trusted}" ledger="{self.root / "ledgers" / name}.json"{simulated}')
        env = self.guarded_env()
        secret, runtime_port = self.superexec_secret(f"supernode-{name}"), free_port()
        child = self.group.start(f"supernode-{name}", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(runtime_port),
            "--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key", str(private_key),
            "--node-config", node_config, "--isolation", "process", "--superexec-auth-secret-file", str(secret),
        ], env=env)
        self.start_superexec(f"supernode-{name}", runtime_port, secret, child, env)
        self.runtime_ports[name] = runtime_port
        return child

    def write_run_config(self, app_dir: Path, out_dir: Path, extra: Mapping[str, object] | None = None) -> Path:
        """``run-config.toml`` for ``flwr run app_dir``: the publisher's signature of that FAB, the
        seller -> node bindings and ``out-dir`` (plus ``extra`` keys)."""
        return write_run_config(self.root / RUN_CONFIG_FILE, app_dir, self.publisher, self.nodes, out_dir, extra)

    def flwr(self, *args: str, timeout_s: float = 120.0, cwd: Path | None = None,
             on_line: Callable[[str], None] | None = None) -> str:
        """Run the ``flwr`` CLI against this deployment; TipError with its output if it fails."""
        return run_flwr(args, self.env, timeout_s=timeout_s, cwd=cwd, logs=f"; logs in {self.group.log_dir}",
                        on_line=on_line)

    def up(self, sellers: dict[str, Path], *, progress: bool = False) -> None:
        """Prepare, start the SuperLink, register one key per seller (id -> data file) and start its SuperNode."""
        phase("starting the SuperLink (TLS, SuperNode authentication, signed apps only)", enabled=progress)
        self.prepare()
        self.start_superlink()
        for name, path in counted(sellers.items(), "SuperNodes registered and started", enabled=progress):
            private, public = self.node_key(name)
            self.nodes[name] = self.register(public)
            self.start_supernode(name, private, path, seller_id=name)

    def save_state(self) -> Path:
        """Write PIDs, ports and the connection so ``tip-fed deploy down`` can stop exactly these processes."""
        state = {
            "root": str(self.root),
            "port": self.port,
            "connection": CONNECTION,
            "flwr_home": str(self.home),
            "nodes": self.nodes,
            "runtime_ports": self.runtime_ports,
            "processes": {c.name: c.pid for c in self.group.children},
            "token": self.group.token,
            "publisher_key": str(self.publisher),
            "trusted_publishers": str(self.trusted),
        }
        path = self.root / STATE_FILE
        path.write_text(json.dumps(state, indent=2) + "\n")
        return path


def run_flwr(
    args: Sequence[str], env: Mapping[str, str], *, timeout_s: float = 120.0, cwd: Path | None = None, logs: str = "",
    on_line: Callable[[str], None] | None = None,
) -> str:
    """Run the ``flwr`` CLI with Flower's environment ``env``; its output, or TipError with it.

    ``on_line`` sees each line of output as it comes (``flwr run --stream`` follows a run for minutes)."""
    lines: list[str] = []
    proc = subprocess.Popen(
        [str(BIN / "flwr"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **env}, cwd=cwd, stdin=subprocess.DEVNULL,
    )

    def read() -> None:
        for line in proc.stdout or ():
            lines.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise TipError(
            f"'flwr {' '.join(args[:2])}' did not finish within {timeout_s:.0f} s "
            f"(raise flower.timeout-s / flower.node-wait-s){logs}"
        ) from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    output = "".join(lines)
    if proc.returncode != 0:
        raise TipError(f"'flwr {' '.join(args[:2])}' failed ({proc.returncode}):\n{output[-3000:]}")
    return output


def write_run_config(
    path: Path,
    app_dir: Path,
    key: Path,
    nodes: dict[str, int],
    out_dir: Path,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Sign the FAB ``flwr run app_dir`` will build, with these run-config values, using ``key``; write
    the run config (values and signature) to ``path``."""
    values = {**(extra or {}), "out-dir": str(Path(out_dir).resolve()), "sellers": format_bindings(nodes)}
    values[trust.SIGNATURE] = trust.sign_fab(trust.build_fab(app_dir), key, values)
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def sign(
    root: Path,
    app_dir: Path,
    out_dir: Path,
    key: Path | None = None,
    sellers: str | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """``tip-fed deploy sign``: run config for the app in ``app_dir`` on the deployment under ``root``.

    ``key`` and ``sellers`` default to the publisher key and node ids ``deploy up`` recorded."""
    state_path = Path(root) / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    key = key or (Path(state["publisher_key"]) if "publisher_key" in state else None)
    if key is None:
        raise ConfigError(f"no publisher key: {state_path} does not exist; pass --key (from 'tip-fed deploy keygen')")
    nodes = parse_bindings(sellers) if sellers is not None else {k: int(v) for k, v in state.get("nodes", {}).items()}
    if not nodes:
        raise ConfigError(
            "no seller -> node bindings: pass --sellers 'SELLER_ID=NODE_ID,...' "
            "(node ids as printed by 'flwr supernode register')"
        )
    extra = {"set": ";".join(overrides)} if overrides else None
    Path(root).mkdir(parents=True, exist_ok=True)
    return write_run_config(Path(root) / RUN_CONFIG_FILE, app_dir, key, nodes, out_dir, extra)


def down(root: Path, grace_s: float = 5.0) -> list[int]:
    """Stop the processes of a deployment left running by :meth:`LocalDeployment.save_state`."""
    path = Path(root) / STATE_FILE
    if not path.is_file():
        raise TipError(f"no running deployment under {root}: {path} does not exist")
    state = json.loads(path.read_text())
    if not state.get("token"):
        raise TipError(f"{path} names no run token (written by an older tip-fed); stop the PIDs it lists by hand")
    pids = stop_tagged(state["token"], grace_s)
    path.unlink()
    return pids


def up(root: Path, sellers_dir: Path, port: int = 0) -> LocalDeployment:
    """Start a deployment serving every seller file in ``sellers_dir`` (``*.safetensors`` or raw records:
    ``.csv``, ``.parquet``, ``.jsonl``, ``.txt``) and leave it running.

    The files are a simulated market's (``tip-fed export-sellers``): its sellers release exact
    per-sample scores, as in-process ones do. If any step fails, whatever was started is stopped
    again before the error propagates.
    """
    suffixes = (".safetensors", ".csv", ".parquet", ".jsonl", ".txt")
    files = {p.stem: p.resolve() for p in sorted(Path(sellers_dir).iterdir()) if p.suffix.lower() in suffixes}
    if not files:
        raise ConfigError(
            f"no seller files in {sellers_dir}; write them with 'tip-fed export-sellers CONFIG --out DIR'"
        )
    if (Path(root) / STATE_FILE).exists():
        raise TipError(f"a deployment is already running under {root}; stop it with 'tip-fed deploy down {root}'")
    deployment = LocalDeployment(Path(root), port, exact_per_sample=True)
    try:
        deployment.up(files)
        deployment.save_state()
    except BaseException:
        deployment.group.stop_all()
        raise
    return deployment
