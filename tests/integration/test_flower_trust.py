"""Signed Flower Apps: the signature check the sellers' guard runs before a FAB is installed.

FABs are built by Flower's own builder, exactly as ``flwr run <dir>`` builds them; keys are real
Ed25519 / EC keys. The guard inside real Flower processes is exercised in
``tests/e2e/test_flower_strangers.py``.
"""

import io
import json
import zipfile
from pathlib import Path

import pytest

from tip_fed import tls
from tip_fed.errors import ConfigError
from tip_fed.flower import trust

from ..conftest import flower_pyproject

PYPROJECT = flower_pyproject("tinyapp", "someone", "tinyapp.apps:server", "tinyapp.apps:client",
                             include=["tinyapp/*.py"])


@pytest.fixture()
def app(tmp_path):
    d = tmp_path / "app"
    (d / "tinyapp").mkdir(parents=True)
    (d / "pyproject.toml").write_text(PYPROJECT)
    (d / "tinyapp" / "__init__.py").write_text("")
    (d / "tinyapp" / "apps.py").write_text("server = client = None\n")
    return d


@pytest.fixture()
def publisher(tmp_path):
    private, public, trusted = trust.create_publisher_key(tmp_path / "keys")
    return private, public, trusted


def test_signed_fab_verifies_and_flwr_builds_it_identically_every_time(app, publisher):
    private, public, trusted = publisher
    fab = trust.build_fab(app)
    signature = trust.sign_fab(fab, private)
    assert trust.build_fab(app) == fab  # what 'flwr run' uploads later is byte-identical
    assert trust.verify_fab(fab, signature, trust.load_trusted(trusted)) == trust.key_id(public.read_text())
    assert oct(private.stat().st_mode & 0o777) == "0o600"


def test_edited_app_extra_file_or_other_config_is_refused(app, publisher):
    private, _, trusted = publisher
    signature = trust.sign_fab(trust.build_fab(app), private)
    keys = trust.load_trusted(trusted)
    (app / "tinyapp" / "apps.py").write_text("server = client = None  # edited\n")
    with pytest.raises(trust.UntrustedAppError, match="do not match the signature"):
        trust.verify_fab(trust.build_fab(app), signature, keys)
    (app / "tinyapp" / "apps.py").write_text("server = client = None\n")
    (app / "tinyapp" / "extra.py").write_text("import os\n")
    with pytest.raises(trust.UntrustedAppError, match="do not match the signature"):
        trust.verify_fab(trust.build_fab(app), signature, keys)
    (app / "tinyapp" / "extra.py").unlink()
    (app / "pyproject.toml").write_text(PYPROJECT.replace('app-signature = ""', 'app-signature = ""\nx = 1'))
    with pytest.raises(trust.UntrustedAppError, match="do not match the signature"):
        trust.verify_fab(trust.build_fab(app), signature, keys)


def test_signed_app_replayed_with_other_run_config_is_refused(app, publisher):
    private, _, trusted = publisher
    keys, fab = trust.load_trusted(trusted), trust.build_fab(app)
    signed = {"out-dir": "/srv/tip/out", "sellers": "a=1,b=2"}
    signature = trust.sign_fab(fab, private, signed)
    assert trust.verify_fab(fab, signature, keys, {**signed, trust.SIGNATURE: signature})
    for changed in ({**signed, "out-dir": "/home/operator/.bashrc"}, {**signed, "sellers": "a=1,b=3"},
                    {**signed, "set": "seed=4"}, {"out-dir": "/srv/tip/out"}):
        with pytest.raises(trust.UntrustedAppError, match="run config do not match"):
            trust.verify_fab(fab, signature, keys, changed)


def test_stranger_key_missing_or_forged_signatures_are_refused(app, publisher, tmp_path):
    private, _, trusted = publisher
    keys = trust.load_trusted(trusted)
    fab = trust.build_fab(app)
    stranger_private, _, _ = trust.create_publisher_key(tmp_path / "stranger", "stranger")
    with pytest.raises(trust.UntrustedAppError, match="not by a trusted publisher"):
        trust.verify_fab(fab, trust.sign_fab(fab, stranger_private), keys)
    # the stranger's signature relabelled with the trusted key id
    kid = next(iter(keys))
    _, signed_at, nonce, sig = trust.sign_fab(fab, stranger_private).split(":")
    with pytest.raises(trust.UntrustedAppError, match="do not match"):
        trust.verify_fab(fab, f"{kid}:{signed_at}:{nonce}:{sig}", keys)
    # a genuine signature with its timestamp, or its nonce, changed
    _, signed_at, nonce, sig = trust.sign_fab(fab, private).split(":")
    with pytest.raises(trust.UntrustedAppError, match="do not match"):
        trust.verify_fab(fab, f"{kid}:{int(signed_at) + 1}:{nonce}:{sig}", keys)
    with pytest.raises(trust.UntrustedAppError, match="do not match"):
        trust.verify_fab(fab, f"{kid}:{signed_at}:{'0' * 32}:{sig}", keys)
    for bad in ("", None, 3, "abc", f"{kid}:x:{nonce}:{sig}", f"{kid}:1:{nonce}:!!!", f"{kid}:{signed_at}:{sig}",
                f"{kid}:{signed_at}:zz:{sig}"):
        with pytest.raises(trust.UntrustedAppError):
            trust.verify_fab(fab, bad, keys)


def test_no_trusted_publisher_means_nothing_runs(app, publisher, monkeypatch):
    private, _, trusted = publisher
    fab = trust.build_fab(app)
    run_config = {trust.SIGNATURE: trust.sign_fab(fab, private)}
    monkeypatch.delenv(trust.PUBLISHERS_ENV, raising=False)
    with pytest.raises(trust.UntrustedAppError, match="no trusted publisher"):
        trust.check_task(fab, {}, run_config)
    assert trust.check_task(fab, {trust.PUBLISHERS: str(trusted)}, run_config)
    monkeypatch.setenv(trust.PUBLISHERS_ENV, str(trusted))
    assert trust.check_task(fab, {}, run_config)


def _signed_at(monkeypatch, when, fab, private, config):
    with monkeypatch.context() as m:
        m.setattr(trust.time, "time", lambda: when)
        return trust.sign_fab(fab, private, config)


def test_a_signature_expires_and_is_never_dated_ahead(app, publisher, monkeypatch):
    private, _, trusted = publisher
    keys, fab, now = trust.load_trusted(trusted), trust.build_fab(app), trust.time.time()
    config = {"out-dir": "/home/buyer/out", "sellers": "a=1"}
    for when, why in [(now - 3 * 365 * 86400, "more than 3600 s ago"), (now - trust.MAX_AGE_S - 60, "ago"),
                      (now + 50 * 365 * 86400, "ahead"), (now + trust.CLOCK_SKEW_S + 60, "ahead")]:
        old = _signed_at(monkeypatch, when, fab, private, config)
        with pytest.raises(trust.UntrustedAppError, match=why):
            trust.verify_fab(fab, old, keys, {**config, trust.SIGNATURE: old})
    # within the age and the clock skew it verifies; a guard may choose a shorter age
    recent = _signed_at(monkeypatch, now - 600, fab, private, config)
    assert trust.verify_fab(fab, recent, keys, config)
    with pytest.raises(trust.UntrustedAppError, match="more than 60 s ago"):
        trust.verify_fab(fab, recent, keys, config, max_age_s=60)
    assert trust.verify_fab(fab, _signed_at(monkeypatch, now + 60, fab, private, config), keys, config)


def test_a_signed_run_config_runs_once(app, publisher):
    private, _, trusted = publisher
    fab = trust.build_fab(app)
    node = {trust.PUBLISHERS: str(trusted)}
    config = {"out-dir": "/home/buyer/out", "sellers": "a=1"}
    run_config = {**config, trust.SIGNATURE: trust.sign_fab(fab, private, config)}
    # every task of the genuine run (ServerApp, each ClientApp) carries its run id: all accepted
    for _ in range(3):
        assert trust.check_task(fab, node, run_config, run_id=101)
    # anyone who saw the run config submits it again: a new run id, refused by every guard sharing the file
    with pytest.raises(trust.UntrustedAppError, match="already used by run 101"):
        trust.check_task(fab, node, run_config, run_id=202)
    ledger = Path(str(trusted) + ".runs.json")
    assert ledger.stat().st_mode & 0o077 == 0
    # the publisher's fresh signature of the same run config is a new run
    again = {**config, trust.SIGNATURE: trust.sign_fab(fab, private, config)}
    assert again[trust.SIGNATURE] != run_config[trust.SIGNATURE]
    assert trust.check_task(fab, node, again, run_id=202)


def test_the_run_ledger_is_bounded_and_forgets_only_expired_nonces(app, publisher, monkeypatch):
    private, _, trusted = publisher
    fab, node, now = trust.build_fab(app), {trust.PUBLISHERS: str(trusted)}, trust.time.time()
    expired = {trust.SIGNATURE: _signed_at(monkeypatch, now - 3 * trust.MAX_AGE_S, fab, private, {})}
    assert trust.check_task(fab, node, expired, run_id=1, max_age_s=4 * trust.MAX_AGE_S)  # a guard with a longer age
    monkeypatch.setattr(trust, "MAX_RUNS", 5)
    fresh = [{trust.SIGNATURE: trust.sign_fab(fab, private, {})} for _ in range(7)]
    for i, run_config in enumerate(fresh):
        trust.check_task(fab, node, run_config, run_id=10 + i)
    kept = json.loads(Path(str(trusted) + ".runs.json").read_text())
    assert len(kept) == 5 and expired[trust.SIGNATURE].split(":")[2] not in kept
    with pytest.raises(trust.UntrustedAppError, match="already used by run 16"):
        trust.check_task(fab, node, fresh[-1], run_id=99)


def test_trusted_file_must_hold_ed25519_keys(tmp_path, app, publisher):
    private, _, _ = publisher
    _, ec_public = tls.create_node_key(tmp_path, "node")  # a SuperNode auth key, not a signing key
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(f'k: "{ec_public.read_text().strip()}"\n')
    fab = trust.build_fab(app)
    with pytest.raises(trust.UntrustedAppError):
        trust.verify_fab(fab, "k:" + trust.sign_fab(fab, private).split(":", 1)[1], trust.load_trusted(wrong))
    for text in ("", "- a\n- b\n", "k: [1]\n", "{{{"):
        wrong.write_text(text)
        with pytest.raises(ConfigError):
            trust.load_trusted(wrong)
    with pytest.raises(ConfigError, match="Ed25519"):
        trust.sign_fab(fab, tmp_path / "node")


def test_guard_commands_replace_flowers_app_launchers(tmp_path):
    d = trust.install_guard(tmp_path / "bin")
    for name in ("flwr-clientapp", "flwr-serverapp"):
        text = (d / name).read_text()
        assert (d / name).stat().st_mode & 0o111 and "guarded_app" in text and "max_age_s=3600.0" in text
    with pytest.raises(ConfigError, match="> 0 seconds"):
        trust.install_guard(tmp_path / "bin", 0)


def test_repository_fab_holds_code_and_config_only():
    root = Path(__file__).resolve().parents[2]
    names = zipfile.ZipFile(io.BytesIO(trust.build_fab(root))).namelist()
    others = [n for n in names if not (n.endswith(".py") and n.split("/")[0] in ("tip_fed", "simulations"))
              and not (n.startswith("configs/") and n.endswith(".toml"))]
    assert sorted(others) == [".info/CONTENT", "pyproject.toml"]


def test_deploy_keygen_guard_and_sign_commands(tmp_path, app, capsys):
    import tomllib

    from tip_fed.cli import main

    assert main(["deploy", "keygen", str(tmp_path / "pub")]) == 0
    assert main(["deploy", "guard", str(tmp_path / "bin")]) == 0
    assert main(["deploy", "guard", str(tmp_path / "bin2"), "--max-signature-age", "120"]) == 0
    assert "max_age_s=120.0" in (tmp_path / "bin2" / "flwr-clientapp").read_text()
    key, trusted = tmp_path / "pub" / "publisher", tmp_path / "pub" / "publisher.trusted.yaml"
    assert main(["deploy", "sign", str(tmp_path / "market"), "--app", str(app), "--key", str(key),
                 "--sellers", "a=1,b=2", "--out", str(tmp_path / "out"), "--set", "seed=3"]) == 0
    run_config = tomllib.loads((tmp_path / "market" / "run-config.toml").read_text())
    assert run_config["sellers"] == "a=1,b=2" and run_config["set"] == "seed=3"
    assert run_config["out-dir"] == str((tmp_path / "out").resolve())
    assert trust.verify_fab(trust.build_fab(app), run_config[trust.SIGNATURE], trust.load_trusted(trusted), run_config)
    # without a deployment.json the key and the seller -> node bindings must be given, and valid
    capsys.readouterr()
    assert main(["deploy", "sign", str(tmp_path / "m2"), "--app", str(app)]) == 2
    assert main(["deploy", "sign", str(tmp_path / "m2"), "--app", str(app), "--key", str(key)]) == 2
    assert main(["deploy", "sign", str(tmp_path / "m2"), "--app", str(app), "--key", str(key), "--sellers", "a=x"]) == 2
    assert capsys.readouterr().err.count("tip-fed: error:") == 3
