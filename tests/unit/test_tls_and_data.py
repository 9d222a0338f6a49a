"""Deployment helpers: certificates verify against their CA, secrets are owner-only, datasets round-trip."""

import stat
import subprocess

import pytest
import torch

from tip_fed.errors import ConfigError, DataError
from tip_fed.files import write_private
from tip_fed.protocol.data import load_dataset, save_dataset
from tip_fed.tls import create_ca, create_node_key, issue_cert, seller_name


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_certificates_chain_to_the_ca_and_keys_are_private(tmp_path):
    ca = create_ca(tmp_path)
    server = issue_cert(ca, tmp_path, "server", hosts=["127.0.0.1", "localhost"])
    client = issue_cert(ca, tmp_path, "client", client=True)
    for cert in (server.cert, client.cert):
        out = subprocess.run(["openssl", "verify", "-CAfile", str(ca.cert), str(cert)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(server.cert), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    for key in (ca.key, server.key, client.key):
        assert _mode(key) == 0o600


def test_a_seller_certificate_names_its_seller_id(tmp_path):
    ca = create_ca(tmp_path)
    cert = issue_cert(ca, tmp_path, "seller-0", seller_id="Clinic A")
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert.cert), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    assert f"DNS:{seller_name('Clinic A')}" in text and "IP Address:127.0.0.1" in text
    plain = subprocess.run(
        ["openssl", "x509", "-in", str(issue_cert(ca, tmp_path, "s").cert), "-noout", "-text"],
        capture_output=True,
        text=True,
    ).stdout
    assert seller_name("Clinic A") not in plain
    with pytest.raises(ConfigError, match="client certificate"):
        issue_cert(ca, tmp_path, "buyer", client=True, seller_id="Clinic A")


def test_secrets_are_written_whole_and_owner_only(tmp_path):
    data = bytes(range(256)) * 40000  # 10 MB: more than one write() may take
    write_private(tmp_path / "k" / "big.key", data)
    assert (tmp_path / "k" / "big.key").read_bytes() == data and _mode(tmp_path / "k" / "big.key") == 0o600


def test_node_keys_are_openssh_ecdsa(tmp_path):
    private, public = create_node_key(tmp_path, "node1")
    assert _mode(private) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert b"OPENSSH PRIVATE KEY" in private.read_bytes()


def test_dataset_round_trip_and_errors(tmp_path):
    data = {"x": torch.randn(5, 3), "y": torch.arange(5)}
    path = save_dataset(data, tmp_path / "seller.safetensors")
    back = load_dataset(path)
    assert torch.equal(back["x"], data["x"]) and torch.equal(back["y"], data["y"])
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a valid safetensors"):
        load_dataset(tmp_path / "bad.safetensors")
    with pytest.raises(DataError, match="disagree"):
        save_dataset({"x": torch.randn(5, 3), "y": torch.arange(4)}, tmp_path / "x.safetensors")
