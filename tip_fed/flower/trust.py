"""Signed Flower Apps: a seller's SuperNode runs a ClientApp only from an app its operator trusts.

A SuperNode runs whatever app a ``flwr run`` ships to it, and in Flower 1.42 anyone who reaches
the SuperLink port with its CA certificate may start a run. Flower's own answer,
``flower-supernode --trusted-entities``, accepts only FABs whose signatures the SuperLink fetched
from Flower Hub: a FAB uploaded with ``flwr run <dir>`` always carries empty verifications, so
the SuperNode refuses it ("App verification is not supported by the connected SuperLink") and
no locally built app can ever pass. Offline, the check therefore lives here, in the seller's
own process, before Flower installs or imports a single file of the FAB:

* the publisher signs the FAB that ``flwr run <dir>`` builds (Flower builds it
  deterministically) together with the run's other run-config overrides, with an Ed25519 key in
  Flower's signature format (``timestamp || digest``), and passes the signature as the
  ``app-signature`` run config;
* the seller starts its SuperNode with ``flwr-clientapp`` resolving to :func:`guarded_app`
  (see :func:`install_guard`) and ``--node-config 'trusted-publishers="publishers.yaml"'``, a
  file in the ``--trusted-entities`` format (``key-id: "ssh-ed25519 AAAA..."``);
* the guard verifies the signature of the FAB it was handed against those keys and, failing
  that, refuses the task: an ERROR line in the SuperNode's log and an error reply, with the
  FAB never written to disk. No trusted publishers configured means nothing runs.

The SuperLink runs each run's ServerApp on its own host, so a guarded SuperLink
(``flwr-serverapp`` through the same guard, trusted keys in ``TIP_FED_TRUSTED_PUBLISHERS``)
refuses a stranger's ServerApp before it can touch the operator's machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tip_fed.errors import ConfigError, TipError

PUBLISHERS = "trusted-publishers"  # node config: YAML file of trusted publisher keys
SIGNATURE = "app-signature"  # run config: "<key-id>:<signed-at>:<base64url signature>"
PUBLISHERS_ENV = "TIP_FED_TRUSTED_PUBLISHERS"  # the same, for a guarded SuperLink's ServerApps
GUARD_LOG_ENV = "TIP_FED_GUARD_LOG"  # optional file every accept/refuse decision is appended to


class UntrustedAppError(TipError):
    """A Flower App that no publisher this seller trusts has signed."""


def key_id(public_key_line: str) -> str:
    """Stable id of an ``ssh-ed25519`` public key: ``tip-`` + the first 16 hex of its SHA-256."""
    return "tip-" + hashlib.sha256(public_key_line.split()[1].encode()).hexdigest()[:16]


def create_publisher_key(directory: str | Path, name: str = "publisher") -> tuple[Path, Path, Path]:
    """Ed25519 key pair (``name`` 0600, ``name.pub``) and ``name.trusted.yaml`` for sellers to trust."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tip_fed.tls import write_secret

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    priv_path, pub_path, trusted = d / name, d / f"{name}.pub", d / f"{name}.trusted.yaml"
    write_secret(priv_path, private)
    pub_path.write_text(public + "\n")
    trusted.write_text(f'{key_id(public)}: "{public}"\n')
    return priv_path, pub_path, trusted


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB exactly as ``flwr run <app_dir>`` builds and uploads it."""
    import warnings

    from flwr.cli.build import build_fab_from_disk

    try:
        with warnings.catch_warnings():  # Flower's ignore-file parsing uses a pattern style pathspec deprecates
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="pathspec")
            return build_fab_from_disk(Path(app_dir))
    except ValueError as exc:
        raise ConfigError(f"cannot build the Flower App in {app_dir}: {exc}") from exc


def signed_digest(fab: bytes, run_config: Mapping[str, object]) -> bytes:
    """What a signature covers: the FAB and every run-config override but the signature itself, so a
    signed app cannot be replayed with other settings (another ``out-dir``, other seller bindings)."""
    config = json.dumps({k: v for k, v in run_config.items() if k != SIGNATURE}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"tip-fed app v1\0" + hashlib.sha256(fab).digest() + config.encode()).digest()


def sign_fab(fab: bytes, private_key: str | Path, run_config: Mapping[str, object] | None = None) -> str:
    """``app-signature`` value for ``fab`` run with the overrides ``run_config``, signed with an
    OpenSSH Ed25519 private key (Flower's format: ``timestamp || digest``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, sign_message

    try:
        key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the publisher key {private_key}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{private_key} is not an Ed25519 key; create one with 'tip-fed deploy keygen'")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    signed_at = int(time.time())
    signature = sign_message(key, create_message_to_sign(signed_digest(fab, run_config or {}), signed_at))
    return f"{key_id(public)}:{signed_at}:{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


def load_trusted(path: str | Path) -> dict[str, str]:
    """``key-id -> ssh-ed25519 public key`` from a ``--trusted-entities`` style YAML file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read trusted publishers from {path}: {exc}") from exc
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"{path} must map key ids to 'ssh-ed25519 ...' public keys (see 'tip-fed deploy keygen')")
    return {str(k): v for k, v in data.items()}


def verify_fab(
    fab: bytes, signature: object, trusted: dict[str, str], run_config: Mapping[str, object] | None = None
) -> str:
    """The id of the trusted publisher who signed ``fab`` with these run-config overrides;
    UntrustedAppError otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.supercore.primitives.asymmetric_ed25519 import (
        create_message_to_sign,
        decode_base64url,
        verify_signature,
    )

    digest = hashlib.sha256(fab).digest()
    if not isinstance(signature, str) or not signature:
        raise UntrustedAppError(
            f"app (FAB sha256 {digest.hex()[:16]}) is not signed: no '{SIGNATURE}' in its run config"
        )
    parts = signature.split(":")
    if len(parts) != 3 or not parts[1].isdigit():
        raise UntrustedAppError(f"'{SIGNATURE}' must look like KEY-ID:SIGNED-AT:SIGNATURE, got {signature[:80]!r}")
    kid, signed_at, sig = parts
    if kid not in trusted:
        raise UntrustedAppError(
            f"app (FAB sha256 {digest.hex()[:16]}) is signed by {kid[:40]!r}, "
            f"not by a trusted publisher ({', '.join(sorted(trusted))})"
        )
    try:
        public = serialization.load_ssh_public_key(trusted[kid].encode())
        raw = decode_base64url(sig)
    except (ValueError, TypeError) as exc:
        raise UntrustedAppError(f"signature or trusted key {kid} is malformed: {exc}") from exc
    if not isinstance(public, ed25519.Ed25519PublicKey) or not verify_signature(
        public, create_message_to_sign(signed_digest(fab, run_config or {}), int(signed_at)), raw
    ):
        raise UntrustedAppError(
            f"app (FAB sha256 {digest.hex()[:16]}) and its run config do not match the signature of {kid}"
        )
    return kid


def check_task(fab: bytes, node_config: Mapping[str, object], run_config: Mapping[str, object]) -> str:
    """Verify a task's FAB and run-config overrides against the trusted publishers (node config,
    else the environment)."""
    path = node_config.get(PUBLISHERS) or os.environ.get(PUBLISHERS_ENV)
    if not isinstance(path, str) or not path:
        raise UntrustedAppError(
            f"no trusted publisher is configured, so no app runs here: start the SuperNode with "
            f"--node-config '{PUBLISHERS}=\"/path/publisher.trusted.yaml\"' (SuperLink: {PUBLISHERS_ENV}=...)"
        )
    return verify_fab(fab, run_config.get(SIGNATURE), load_trusted(path), run_config)


def guarded_app(kind: str) -> None:
    """``flwr-clientapp`` / ``flwr-serverapp`` that installs and runs a FAB only once :func:`check_task`
    accepts it.

    Flower's ``run_clientapp`` / ``run_serverapp`` pull the task (context, run, FAB) and then install
    the FAB; the check sits between the two, so a refused FAB is never unpacked or imported, and
    Flower's own error path ends the task (a ClientApp answers the sender with the reason).
    """
    import importlib

    if kind == "clientapp":
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp as entry
    else:
        from flwr.superlink.cli.flwr_serverapp import flwr_serverapp as entry
    side = "supernode" if kind == "clientapp" else "superlink"
    # the module, not the function of the same name that the package re-exports
    runtime: Any = importlib.import_module(f"flwr.{side}.runtime.run_{kind}")

    seen: dict[str, object] = {}
    context_from_proto, run_from_proto, install = (
        runtime.context_from_proto,
        runtime.run_from_proto,
        runtime.install_from_fab,
    )

    def capture_context(proto: Any) -> Any:
        seen["context"] = context_from_proto(proto)
        return seen["context"]

    def capture_run(proto: Any) -> Any:
        seen["run"] = run_from_proto(proto)
        return seen["run"]

    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        context, run = seen.get("context"), seen.get("run")
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        run_config = dict(getattr(run, "override_config", {}) or {})  # what 'flwr run' passed: all signed
        try:
            signer = check_task(content, dict(getattr(context, "node_config", {}) or {}), run_config)
        except TipError as exc:
            _record(
                logging.ERROR,
                f"tip-fed: REFUSED untrusted app {getattr(run, 'fab_id', '?')} "
                f"(run {getattr(run, 'run_id', '?')}): {exc}",
            )
            raise
        _record(
            logging.INFO,
            f"tip-fed: app {getattr(run, 'fab_id', '?')} (run {getattr(run, 'run_id', '?')}) "
            f"signed by trusted publisher {signer}",
        )
        for name in [m for m in sys.modules if m == "tip_fed" or m.startswith("tip_fed.")]:
            del sys.modules[name]  # the app imports the signed FAB's own tip_fed, not this copy
        return install(fab_file, *args, **kwargs)

    runtime.context_from_proto, runtime.run_from_proto = capture_context, capture_run
    runtime.install_from_fab = install_from_fab
    entry()


def _record(level: int, line: str) -> None:
    """Log a guard decision where the operator sees it: Flower's log (a SuperNode's output; the run's
    log for a ServerApp, whose output Flower discards) and the file named by ``TIP_FED_GUARD_LOG``."""
    from flwr.supercore import log as flwr_log

    flwr_log(level, "%s", line)
    if path := os.environ.get(GUARD_LOG_ENV):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {logging.getLevelName(level)} {line}\n")


def install_guard(bin_dir: str | Path) -> Path:
    """Write ``bin_dir/flwr-clientapp`` and ``bin_dir/flwr-serverapp`` running :func:`guarded_app`.

    With ``bin_dir`` first on a SuperNode's (SuperLink's) PATH, Flower's SuperExec launches every
    ClientApp (ServerApp) through the guard."""
    d = Path(bin_dir)
    d.mkdir(parents=True, exist_ok=True)
    for kind in ("clientapp", "serverapp"):
        path = d / f"flwr-{kind}"
        path.write_text(
            f"#!{sys.executable}\nimport sys\nfrom tip_fed.flower.trust import guarded_app\n\n"
            f"sys.exit(guarded_app({kind!r}))\n"
        )
        os.chmod(path, 0o755)  # noqa: S103 - an executable launcher Flower runs; it holds no secret
    return d
