"""Signed Flower Apps: the signature check the sellers' guard runs before a FAB is installed.

FABs are built by Flower's own builder, exactly as ``flwr run <dir>`` builds them; keys are real
Ed25519 / EC keys. The guard inside real Flower processes is exercised in
``tests/e2e/test_flower_strangers.py``.
"""

import io
import zipfile
from pathlib import Path

import pytest

from tip_fed import tls
from tip_fed.errors import ConfigError
from tip_fed.flower import trust

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "someone"
fab-include = ["tinyapp/*.py"]

[tool.flwr.app.components]
serverapp = "tinyapp.apps:server"
clientapp = "tinyapp.apps:client"

[tool.flwr.app.config]
app-signature = ""
"""


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
    _, signed_at, sig = trust.sign_fab(fab, stranger_private).split(":")
    with pytest.raises(trust.UntrustedAppError, match="do not match"):
        trust.verify_fab(fab, f"{kid}:{signed_at}:{sig}", keys)
    # a genuine signature with its timestamp changed
    _, signed_at, sig = trust.sign_fab(fab, private).split(":")
    with pytest.raises(trust.UntrustedAppError, match="do not match"):
        trust.verify_fab(fab, f"{kid}:{int(signed_at) + 1}:{sig}", keys)
    for bad in ("", None, 3, "abc", f"{kid}:x:{sig}", f"{kid}:1:!!!"):
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
        assert (d / name).stat().st_mode & 0o111 and "guarded_app" in text


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
