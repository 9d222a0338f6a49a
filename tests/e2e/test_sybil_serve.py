"""The red team's Sybil-address attack against a real ``tip-fed seller serve --insecure`` process: one
buyer sends each session from another loopback source address and gets one exact answer in all."""

import json

import pytest

from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.ledger import ANONYMOUS

from ..conftest import make_data
from ..security.test_sybil_addresses import PEER, SOURCES, ask, forwarder
from .serving import serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_seller_serve_charges_every_address_to_the_anonymous_identity(make_buyer, tmp_path):
    data = save_dataset(make_data(33, 11, shift=0.3), tmp_path / "s1.safetensors")
    ledger = tmp_path / "ledger.json"
    buyer = make_buyer(disclosure="aggregate")
    outcomes = []
    with serving(["--data", str(data), "--seller-id", "s", "--insecure", "--port", "0", "--ledger",
                  str(ledger)]) as (ready, lines):
        for source in SOURCES:
            with forwarder(source, int(ready["port"])) as address:
                outcomes.append(ask(address, buyer.offer(max_samples=100), insecure=True))
    assert outcomes.count("answered") == 1, outcomes
    assert all("--max-exact" in o for o in outcomes if o != "answered"), outcomes
    peers = {m.group(1) for line in lines if (m := PEER.search(line))}
    assert peers == {f"ipv4:{s}" for s in SOURCES}, lines[-20:]  # the seller saw one address per session
    assert {who: e["exact"] for who, e in json.loads(ledger.read_text())["buyers"].items()} == {ANONYMOUS: 1}
