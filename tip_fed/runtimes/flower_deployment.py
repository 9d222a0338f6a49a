"""Flower deployment runtime: a ServerApp run with ``flwr run`` on a deployment, its valuation read back.

The buyer runs in Flower's own process (``flwr-serverapp``), so what runs is a Flower App
(:class:`FlowerApp`: a directory and its run config) rather than a buyer object; the ServerApp
writes its settled valuation to the run config's ``out-dir`` (:func:`tip_fed.flower.runs.write_valuation`)
and :func:`run_app` reads it back. :func:`value_flower_deployment` starts a
:class:`~tip_fed.runtimes.deployment.LocalDeployment` (SuperLink and one SuperNode per seller data
file on 127.0.0.1, TLS, node authentication, signed app), runs the app and stops every process.

Which buyer the ServerApp builds is the app's business: a market simulation rebuilds it from its
scenario config (``simulations.flower_apps``); a buyer of its own hands the app the directory of a
prepared buyer through the run config (e.g. ``FlowerApp(app_dir, {"buyer-dir": "/path/query"})``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tip_fed.config import FlowerConfig
from tip_fed.errors import TipError
from tip_fed.flower.runs import VALUATION_FILE
from tip_fed.protocol import Valuation
from tip_fed.runtimes.deployment import CONNECTION, LocalDeployment
from tip_fed.runtimes.processes import PrivateRun

RunConfigValue = str | int | float | bool


@dataclass(frozen=True)
class FlowerApp:
    """A Flower App directory (its ``pyproject.toml`` names the buyer ServerApp and the seller
    ClientApp) and the run-config values the buyer needs; ``out-dir``, ``sellers`` and the
    signature are added by the deployment."""

    directory: Path
    run_config: Mapping[str, RunConfigValue] = field(default_factory=dict)


def run_app(deployment: LocalDeployment, app: FlowerApp, out_dir: Path, *, flower: FlowerConfig | None = None,
            stream: bool = False) -> Valuation:
    """Sign ``app`` for ``deployment``, ``flwr run`` it and return the valuation its ServerApp wrote
    to ``out_dir``. The wait covers ``flower.node-wait-s`` plus one ``flower.timeout-s`` per wave."""
    flower = flower or FlowerConfig()
    directory = Path(app.directory).resolve()
    run_config = deployment.write_run_config(directory, out_dir, dict(app.run_config))
    waves = 1 + len(deployment.nodes) // flower.wave_size
    output = deployment.flwr("run", str(directory), CONNECTION, "--stream", "--run-config", str(run_config),
                             timeout_s=flower.node_wait_s + flower.timeout_s * waves + 300, cwd=directory)
    if stream:
        print(output)
    path = Path(out_dir) / VALUATION_FILE
    if not path.is_file():
        raise TipError(f"the Flower run wrote no {VALUATION_FILE}; its output ends with:\n{output[-3000:]}")
    return Valuation.from_dict(json.loads(path.read_text()))


def value_flower_deployment(files: Mapping[str, Path], app: FlowerApp, *, flower: FlowerConfig | None = None,
                            exact_per_sample: bool = False, progress: bool = False,
                            run: PrivateRun | None = None) -> Valuation:
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
            deployment.up({sid: Path(path) for sid, path in files.items()})
            return run_app(deployment, app, run.root / "result", flower=flower, stream=progress)
