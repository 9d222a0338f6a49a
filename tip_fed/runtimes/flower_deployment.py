"""Flower deployment runtime: a ServerApp run with ``flwr run`` on a deployment, its valuation read back.

The buyer runs in Flower's own process (``flwr-serverapp``), so what runs is a Flower App
(:class:`FlowerApp`: a directory and its run config) rather than a buyer object; the ServerApp
writes its settled valuation to the run config's ``out-dir`` (:func:`tip_fed.flower.runs.write_valuation`)
and :func:`run_app` reads it back. :func:`value_flower_deployment` starts a
:class:`~tip_fed.runtimes.deployment.LocalDeployment` (SuperLink and one SuperNode per seller data
file on 127.0.0.1, TLS, node authentication, signed app), runs the app and stops every process.

Which buyer the ServerApp builds is the app's business: a market simulation rebuilds it from its
scenario config (``simulations.flower_apps``); a buyer of its own runs :func:`prepared_app`, the
library's app, handing it the directory of its prepared query through the run config.

:func:`value_flower_superlink` runs an app on a SuperLink that is already running (someone else's
deployment, or ``tip-fed deploy up``): the buyer signs the app with the publisher key the sellers'
SuperNodes trust and names the node registered for each seller. The ServerApp runs on the
SuperLink's host, so the prepared query and ``out-dir`` are paths there: the valuation is read
back only when that host is this one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tip_fed.config import FlowerConfig
from tip_fed.console import ANSWERED, Count, phase
from tip_fed.errors import ConfigError, TipError
from tip_fed.flower.runs import VALUATION_FILE
from tip_fed.protocol import Valuation
from tip_fed.runtimes.deployment import (
    CONNECTION,
    RUN_CONFIG_FILE,
    LocalDeployment,
    flower_env,
    run_flwr,
    write_run_config,
)
from tip_fed.runtimes.processes import PrivateRun

RunConfigValue = str | int | float | bool
# the ServerApp's log lines that ``flwr run --stream`` relays: what it does, and each seller's answer
_SERVER_LINE = re.compile(r"query\.value: (?P<what>offering .*|\d+ of \d+ seller nodes lack .*|" + ANSWERED + r" .*)")
_ANSWERED_LINE = re.compile(ANSWERED + r" (?P<done>\d+)/\d+")


@dataclass(frozen=True)
class FlowerApp:
    """A Flower App directory (its ``pyproject.toml`` names the buyer ServerApp and the seller
    ClientApp) and the run-config values the buyer needs; ``out-dir``, ``sellers`` and the
    signature are added by the deployment."""

    directory: Path
    run_config: Mapping[str, RunConfigValue] = field(default_factory=dict)


def prepared_app(prepared_dir: str | Path, max_samples: int, flower: FlowerConfig | None = None) -> FlowerApp:
    """The library's buyer app (:mod:`tip_fed.flower.prepared_app`) valuing the query saved in ``prepared_dir``."""
    from tip_fed.flower.prepared_app import APP_DIR, run_config

    return FlowerApp(APP_DIR, run_config(prepared_dir, max_samples, flower))


class Deployment(Protocol):
    """What :func:`run_app` needs of a deployment: its seller nodes, a signed run config, the ``flwr`` CLI."""

    nodes: dict[str, int]

    def write_run_config(self, app_dir: Path, out_dir: Path, extra: Mapping[str, object] | None = None) -> Path: ...

    def flwr(self, *args: str, timeout_s: float = 120.0, cwd: Path | None = None,
             on_line: Callable[[str], None] | None = None) -> str: ...


@dataclass
class RemoteSuperLink:
    """A SuperLink already running: where it listens, how to trust it, which node serves each seller,
    and the publisher key (OpenSSH Ed25519, private) whose signature the sellers' SuperNodes accept."""

    address: str
    nodes: dict[str, int]
    publisher_key: Path
    root: Path  # private directory for the connection's FLWR_HOME and the signed run config
    root_certificates: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure == (self.root_certificates is not None):
            raise ConfigError(
                "connect to the SuperLink with exactly one of root_certificates (its CA) or insecure=True"
            )
        home = Path(self.root) / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        trust = (
            f'root-certificates = "{Path(self.root_certificates).resolve()}"'
            if self.root_certificates
            else "insecure = true"
        )
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n{trust}\n'
        )
        self.env = flower_env(home)

    def write_run_config(self, app_dir: Path, out_dir: Path, extra: Mapping[str, object] | None = None) -> Path:
        """The run config for ``flwr run app_dir``: signed with the publisher key, sellers bound to their nodes."""
        return write_run_config(
            Path(self.root) / RUN_CONFIG_FILE, app_dir, self.publisher_key, self.nodes, out_dir, extra
        )

    def flwr(self, *args: str, timeout_s: float = 120.0, cwd: Path | None = None,
             on_line: Callable[[str], None] | None = None) -> str:
        """Run the ``flwr`` CLI against this SuperLink."""
        return run_flwr(args, self.env, timeout_s=timeout_s, cwd=cwd, logs=f" (SuperLink {self.address})",
                        on_line=on_line)


def run_app(
    deployment: Deployment, app: FlowerApp, out_dir: Path, *, flower: FlowerConfig | None = None,
    progress: bool = False,
) -> Valuation:
    """Sign ``app`` for ``deployment``, ``flwr run`` it and return the valuation its ServerApp wrote
    to ``out_dir``. The wait covers ``flower.node-wait-s`` plus one ``flower.timeout-s`` per wave.
    With ``progress``, the sellers' answers are counted from the ServerApp's log as the run streams it."""
    flower = flower or FlowerConfig()
    directory = Path(app.directory).resolve()
    phase("signing the app; the run goes to the SuperLink, whose ServerApp builds the buyer", enabled=progress)
    run_config = deployment.write_run_config(directory, out_dir, dict(app.run_config))
    waves = 1 + len(deployment.nodes) // flower.wave_size
    answers: list[Count] = []  # opened when the ServerApp says it is offering (it has built the buyer)

    def follow(line: str) -> None:
        said = _SERVER_LINE.search(line)
        if said is None:
            return
        done = _ANSWERED_LINE.match(said["what"])
        if done is None:
            phase(f"ServerApp: {said['what'].strip()}", enabled=progress)
        if not answers:
            answers.append(Count(ANSWERED, len(deployment.nodes), enabled=progress))
        if done is not None:
            answers[0].update(int(done["done"]) - answers[0].done)

    try:
        output = deployment.flwr(
            "run",
            str(directory),
            CONNECTION,
            "--stream",
            "--run-config",
            str(run_config),
            timeout_s=flower.node_wait_s + flower.timeout_s * waves + 300,
            cwd=directory,
            on_line=follow,
        )
    finally:
        for count in answers:
            count.close()
    path = Path(out_dir) / VALUATION_FILE
    if not path.is_file():
        raise TipError(
            f"the Flower run wrote no {VALUATION_FILE} to {out_dir} (the ServerApp writes it on the "
            f"SuperLink's host); its output ends with:\n{output[-3000:]}"
        )
    return Valuation.from_dict(json.loads(path.read_text()))


def value_flower_deployment(
    files: Mapping[str, Path],
    app: FlowerApp,
    *,
    flower: FlowerConfig | None = None,
    exact_per_sample: bool = False,
    progress: bool = False,
    run: PrivateRun | None = None,
) -> Valuation:
    """Start a loopback deployment serving the sellers of ``files`` (seller id -> data file), run
    ``app`` on it, stop every process and return the buyer's valuation.

    ``exact_per_sample`` is the sellers' opt-in to per-sample scores without DP noise (simulated
    sellers, whose data is no one's). Keys, logs and every Flower process live in ``run`` (a new
    private run when None): gone when this returns, fails, or this process is killed.
    """
    with ExitStack() as stack:
        if run is None:
            run = stack.enter_context(PrivateRun("tip-flower-dep-"))
        deployment = LocalDeployment(run.root, reaper=run.reaper, exact_per_sample=exact_per_sample)
        with deployment.group:
            deployment.up({sid: Path(path) for sid, path in files.items()}, progress=progress)
            return run_app(deployment, app, run.root / "result", flower=flower, progress=progress)


def value_flower_superlink(
    app: FlowerApp,
    superlink: RemoteSuperLink,
    *,
    flower: FlowerConfig | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
) -> Valuation:
    """Run ``app`` on an existing SuperLink and return the valuation its ServerApp wrote to ``out_dir``
    (default: ``superlink.root/result``; a path on the SuperLink's host, so this works when that
    host is this one). Only the nodes in ``superlink.nodes`` are offered and counted."""
    if not superlink.nodes:
        raise ConfigError(
            "name the node registered for each seller (seller id -> node id); without them any "
            "node connected to the SuperLink would be counted as a seller"
        )
    out = Path(out_dir or Path(superlink.root) / "result")
    out.mkdir(parents=True, exist_ok=True)
    return run_app(superlink, app, out, flower=flower, progress=progress)
