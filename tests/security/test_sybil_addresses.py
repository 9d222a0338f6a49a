"""One buyer, many source addresses, against a real grpcio seller server on 127.0.0.1: without a
client certificate every buyer is the one anonymous identity of the privacy ledger, whatever address
it calls from (a host has all of 127.0.0.0/8, an IPv6 /64); a certified buyer keeps its own budget.

Each session reaches the seller through a TCP forwarder whose upstream connection is bound to another
loopback source address, so the server sees another peer address per session (the test checks it did).
"""

import contextlib
import json
import re
import socket
import threading
from collections.abc import Iterator

import pytest

from tip_fed.grpc import ClientTLS, SellerEndpoint, ServerTLS, start_server, value_sellers
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.ledger import ANONYMOUS, LedgerPolicy
from tip_fed.tls import create_ca, issue_cert

#: sessions of one buyer, each from its own loopback source address (127.0.0.2, 127.0.0.3, ...)
SOURCES = [f"127.0.0.{k}" for k in range(2, 7)]
PEER = re.compile(r"from (ipv4:127\.0\.0\.\d+)")


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def forwarder(source: str, port: int) -> Iterator[str]:
    """``127.0.0.1:P``, whose connections reach the seller at ``127.0.0.1:port`` from ``source``;
    every socket it opened is closed when the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    opened: list[socket.socket] = [listener]

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed: done
            while True:
                down, _ = listener.accept()
                up = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
                opened.extend((down, up))
                for a, b in ((down, up), (up, down)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for s in opened:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        thread.join(10)


def ask(address: str, offer: bytes, **channel) -> str:
    """'answered', or the seller's refusal."""
    replies, failures = value_sellers([SellerEndpoint("s", address)], offer, timeout_s=120, retries=0, **channel)
    return "answered" if replies else failures["s"]


def _exact(ledger) -> dict[str, int]:
    return {who: entry["exact"] for who, entry in json.loads(ledger.read_text())["buyers"].items()}


@pytest.mark.parametrize("security", ["insecure", "server-tls-only"])
def test_sessions_from_many_source_addresses_share_one_anonymous_exact_answer(
    make_buyer, records, pki, tmp_path, caplog, security
):
    """The red team's attack: a new session per source address got one exact answer each (5 of 5
    here; 16 of 16 against the defaults, up to the seller-wide cap). Now 1 is answered and every
    other address is refused naming --max-exact. Under server-only TLS each session also presents a
    client certificate from a CA the buyer minted: it is not an identity either."""
    ledger = tmp_path / "ledger.json"
    seller = Seller("s", records, policy=SellerPolicy(ledger=str(ledger)))  # defaults: max-exact 1
    assert seller.policy.lifetime.max_exact == 1
    tls = ServerTLS(pki["server"].cert, pki["server"].key) if security == "server-tls-only" else None
    running = start_server(seller, tls=tls, insecure=tls is None, server_tls_only=tls is not None)
    buyer = make_buyer(disclosure="aggregate")
    own_ca = create_ca(tmp_path / "sybil-ca")
    outcomes = []
    try:
        with caplog.at_level("INFO", logger="tip_fed.grpc.server"):
            for k, source in enumerate(SOURCES):
                if tls is None:
                    channel = {"insecure": True}
                else:
                    cert = issue_cert(own_ca, tmp_path / "sybil-ca", f"sybil-{k}", client=True)
                    channel = {"tls": ClientTLS(pki["ca"].cert, cert.cert, cert.key)}
                with forwarder(source, running.port) as address:
                    outcomes.append(ask(address, buyer.offer(max_samples=100), **channel))
    finally:
        running.stop(0)
    peers = {m.group(1) for r in caplog.records if (m := PEER.search(r.getMessage()))}
    assert peers == {f"ipv4:{s}" for s in SOURCES}  # the server did see one address per session
    assert outcomes.count("answered") == 1, outcomes
    refused = [o for o in outcomes if o != "answered"]
    assert all("RESOURCE_EXHAUSTED" in o and "--max-exact" in o and ANONYMOUS in o for o in refused), refused
    assert _exact(ledger) == {ANONYMOUS: 1}


def test_a_certified_buyer_keeps_its_own_budget_beside_the_anonymous_one(make_buyer, records, pki, tmp_path):
    """One seller (one ledger) served in plaintext and over mutual TLS: anonymous sessions from two
    addresses get one exact answer between them; alice and mallory, each with a client certificate
    from the seller's client CA, get one each, and alice's second session is refused."""
    ledger = tmp_path / "ledger.json"
    seller = Seller("s", records, policy=SellerPolicy(ledger=str(ledger)))
    plain = start_server(seller, insecure=True)
    mtls = start_server(seller, tls=ServerTLS(pki["server"].cert, pki["server"].key, pki["ca"].cert))
    certs = {who: issue_cert(pki["ca"], pki["dir"], f"certified-{who}", client=True) for who in ("alice", "mallory")}
    buyer = make_buyer(disclosure="aggregate")

    def certified(who: str) -> str:
        tls = ClientTLS(pki["ca"].cert, certs[who].cert, certs[who].key)
        return ask(mtls.address, buyer.offer(max_samples=100), tls=tls)

    try:
        anonymous = []
        for source in SOURCES[:2]:
            with forwarder(source, plain.port) as address:
                anonymous.append(ask(address, buyer.offer(max_samples=100), insecure=True))
        alice = [certified("alice"), certified("alice")]
        mallory = certified("mallory")
    finally:
        plain.stop(0)
        mtls.stop(0)
    assert anonymous[0] == "answered" and "--max-exact" in anonymous[1], anonymous
    assert alice[0] == "answered" and "--max-exact" in alice[1] and "certified-alice" in alice[1], alice
    assert mallory == "answered"
    spent = _exact(ledger)
    assert spent.pop(ANONYMOUS) == 1 and sorted(spent.values()) == [1, 1], spent
    assert all(who.startswith("x509:") for who in spent), spent


def test_a_dp_budget_spent_from_one_address_is_spent_for_every_address(make_buyer, records, tmp_path):
    """The red team's DP variant (``--dp-epsilon 1``): sessions from the first address until its budget
    is spent, then each new address started afresh (3 x 43 answers, ε 16 composed, against lifetime
    ε 8). Now the first address spends the anonymous budget and every other address is refused at once."""
    ledger = tmp_path / "ledger.json"
    seller = Seller("s", records, policy=SellerPolicy(ledger=str(ledger), lifetime=LedgerPolicy(epsilon=2.0)))
    running = start_server(seller, insecure=True)
    buyer = make_buyer(disclosure="aggregate", dp_epsilon=1.0)
    answered: dict[str, int] = {}
    refusals = []
    try:
        for source in SOURCES[:3]:
            answered[source] = 0
            with forwarder(source, running.port) as address:
                while (outcome := ask(address, buyer.offer(max_samples=100), insecure=True)) == "answered":
                    answered[source] += 1
                    assert answered[source] < 50, "the lifetime budget never ran out"
            refusals.append(outcome)
    finally:
        running.stop(0)
    first, *others = answered.values()
    assert first >= 1 and others == [0, 0], answered
    assert all("spent its lifetime privacy budget" in r and ANONYMOUS in r for r in refusals), refusals
    assert list(json.loads(ledger.read_text())["buyers"]) == [ANONYMOUS]
