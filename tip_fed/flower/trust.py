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
  FAB never written to disk. No trusted publishers configured means nothing runs;
* a signature is fresh for :data:`MAX_AGE_S` (``tip-fed deploy guard --max-signature-age``) and
  never dated ahead of the guard's clock by more than :data:`CLOCK_SKEW_S`; each carries a random
  nonce that the guard records, next to its trusted-publishers file, with the first run that used
  it, so anyone who saw a run config (every SuperNode does) cannot start the run again.

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
import re
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from tip_fed.console import quiet_third_party
from tip_fed.errors import ConfigError, TipError

PUBLISHERS = "trusted-publishers"  # node config: YAML file of trusted publisher keys
SIGNATURE = "app-signature"  # run config: "<key-id>:<signed-at>:<nonce>:<base64url signature>"
MAX_AGE_S = 3600  # default: a signature older than this is refused (sign again right before 'flwr run')
CLOCK_SKEW_S = 300  # a signature dated further ahead of the guard's clock is refused
MAX_RUNS = 4096  # nonces a guard remembers (those of signatures too old to verify are dropped first)
_NONCE = re.compile(r"^[0-9a-f]{32}$")
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

    from tip_fed.files import write_private

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    priv_path, pub_path, trusted = d / name, d / f"{name}.pub", d / f"{name}.trusted.yaml"
    write_private(priv_path, private)
    pub_path.write_text(public + "\n")
    trusted.write_text(f'{key_id(public)}: "{public}"\n')
    return priv_path, pub_path, trusted


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB exactly as ``flwr run <app_dir>`` builds and uploads it."""
    import warnings

    from flwr.cli.build import build_fab_from_disk

    try:
        with warnings.catch_warnings():  # quiet only while building (this also runs in the sellers' guard)
            quiet_third_party()
            return build_fab_from_disk(Path(app_dir))
    except ValueError as exc:
        raise ConfigError(f"cannot build the Flower App in {app_dir}: {exc}") from exc


def signed_digest(fab: bytes, run_config: Mapping[str, object], nonce: str) -> bytes:
    """What a signature covers: the FAB, every run-config override but the signature itself, and the
    run's nonce, so a signed app cannot be replayed with other settings (another ``out-dir``, other
    seller bindings) nor, once its nonce is used, at all."""
    config = json.dumps({k: v for k, v in run_config.items() if k != SIGNATURE}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(
        b"tip-fed app v2\0" + hashlib.sha256(fab).digest() + nonce.encode() + b"\0" + config.encode()
    ).digest()


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
    signed_at, nonce = int(time.time()), secrets.token_hex(16)
    signature = sign_message(key, create_message_to_sign(signed_digest(fab, run_config or {}, nonce), signed_at))
    return f"{key_id(public)}:{signed_at}:{nonce}:{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


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
    fab: bytes,
    signature: object,
    trusted: dict[str, str],
    run_config: Mapping[str, object] | None = None,
    *,
    max_age_s: float = MAX_AGE_S,
) -> str:
    """The id of the trusted publisher who signed ``fab`` with these run-config overrides at most
    ``max_age_s`` ago (and not ahead of this clock beyond :data:`CLOCK_SKEW_S`);
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
    if len(parts) != 4 or not parts[1].isdigit() or not _NONCE.match(parts[2]):
        raise UntrustedAppError(
            f"'{SIGNATURE}' must look like KEY-ID:SIGNED-AT:NONCE:SIGNATURE, got {signature[:80]!r}; "
            "sign the app again with this version ('tip-fed deploy sign')"
        )
    kid, signed_at, nonce, sig = parts
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
        public, create_message_to_sign(signed_digest(fab, run_config or {}, nonce), int(signed_at)), raw
    ):
        raise UntrustedAppError(
            f"app (FAB sha256 {digest.hex()[:16]}) and its run config do not match the signature of {kid}"
        )
    age = time.time() - int(signed_at)
    if age > max_age_s or age < -CLOCK_SKEW_S:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(signed_at)))
        raise UntrustedAppError(
            f"app (FAB sha256 {digest.hex()[:16]}) was signed by {kid} at {when}, "
            + (f"more than {max_age_s:.0f} s ago" if age > 0 else "ahead of this machine's clock")
            + ": sign it again right before 'flwr run' (tip-fed deploy sign), and check both clocks"
        )
    return kid


def record_run(signature: str, run_id: object, ledger: Path, max_age_s: float = MAX_AGE_S) -> None:
    """Bind a verified signature's nonce to ``run_id`` in ``ledger`` (JSON, owner-only, shared by
    the guards that use the same trusted-publishers file); UntrustedAppError if another run used it.

    Every task of one run (the ServerApp, each ClientApp) carries the same run id; a replay of the
    run config is a new run. Nonces of signatures too old to verify are dropped, and at most
    :data:`MAX_RUNS` are kept.
    """
    from tip_fed.files import write_private

    _, signed_at, nonce, _ = signature.split(":")
    run = str(run_id)
    try:
        with FileLock(str(ledger) + ".lock", timeout=60):
            try:
                runs = json.loads(ledger.read_text(encoding="utf-8"))
            except FileNotFoundError:
                runs = {}
            except ValueError:
                runs = {}  # a damaged ledger forgets nonces; their signatures still expire
            if not isinstance(runs, dict):
                runs = {}
            first = runs.get(nonce)
            if isinstance(first, list) and first and first[0] != run:
                raise UntrustedAppError(
                    f"app signature nonce {nonce[:12]}… was already used by run {first[0]}; this run "
                    f"{run} replays that signed run config: refused (the publisher signs each run anew)"
                )
            oldest = time.time() - max_age_s - CLOCK_SKEW_S
            runs[nonce] = [run, int(signed_at)]
            kept = sorted(
                ((n, v) for n, v in runs.items() if isinstance(v, list) and len(v) == 2 and v[1] >= oldest),
                key=lambda item: item[1][1],
            )[-MAX_RUNS:]
            write_private(ledger, json.dumps(dict(kept)).encode())  # under the lock: no reader sees half
    except OSError as exc:
        raise UntrustedAppError(
            f"cannot record the run's signature nonce in {ledger}: {exc}; the guard needs write access "
            "to the directory of its trusted-publishers file"
        ) from exc


def check_task(
    fab: bytes,
    node_config: Mapping[str, object],
    run_config: Mapping[str, object],
    *,
    run_id: object = None,
    max_age_s: float = MAX_AGE_S,
) -> str:
    """Verify a task's FAB and run-config overrides against the trusted publishers (node config,
    else the environment) and, given the task's ``run_id``, record the signature's nonce for that
    run (:func:`record_run`, in ``<trusted-publishers file>.runs.json``)."""
    path = node_config.get(PUBLISHERS) or os.environ.get(PUBLISHERS_ENV)
    if not isinstance(path, str) or not path:
        raise UntrustedAppError(
            f"no trusted publisher is configured, so no app runs here: start the SuperNode with "
            f"--node-config '{PUBLISHERS}=\"/path/publisher.trusted.yaml\"' (SuperLink: {PUBLISHERS_ENV}=...)"
        )
    signer = verify_fab(fab, run_config.get(SIGNATURE), load_trusted(path), run_config, max_age_s=max_age_s)
    if run_id is not None:
        record_run(str(run_config[SIGNATURE]), run_id, Path(path + ".runs.json"), max_age_s)
    return signer


def guarded_app(kind: str, max_age_s: float = MAX_AGE_S) -> None:
    """``flwr-clientapp`` / ``flwr-serverapp`` that installs and runs a FAB only once :func:`check_task`
    accepts it (signed at most ``max_age_s`` ago, its nonce used by no other run).

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
            run_id = getattr(run, "run_id", None)
            if run_id is None:
                raise UntrustedAppError("the task names no run id, so a replayed run could not be told apart")
            signer = check_task(content, dict(getattr(context, "node_config", {}) or {}), run_config,
                                run_id=run_id, max_age_s=max_age_s)
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


def install_guard(bin_dir: str | Path, max_age_s: float = MAX_AGE_S) -> Path:
    """Write ``bin_dir/flwr-clientapp`` and ``bin_dir/flwr-serverapp`` running :func:`guarded_app`
    (refusing signatures older than ``max_age_s``).

    With ``bin_dir`` first on a SuperNode's (SuperLink's) PATH, Flower's SuperExec launches every
    ClientApp (ServerApp) through the guard."""
    if not max_age_s > 0:
        raise ConfigError(f"the maximum signature age must be > 0 seconds, got {max_age_s}")
    d = Path(bin_dir)
    d.mkdir(parents=True, exist_ok=True)
    for kind in ("clientapp", "serverapp"):
        path = d / f"flwr-{kind}"
        path.write_text(
            f"#!{sys.executable}\nimport sys\nfrom tip_fed.flower.trust import guarded_app\n\n"
            f"sys.exit(guarded_app({kind!r}, max_age_s={float(max_age_s)!r}))\n"
        )
        os.chmod(path, 0o755)  # noqa: S103 - an executable launcher Flower runs; it holds no secret
    return d
