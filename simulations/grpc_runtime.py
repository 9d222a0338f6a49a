"""``runtime = "grpc"``: every seller a real ``tip-fed seller serve`` process, valued over mutual TLS.

This is the native gRPC deployment run on one machine: each seller process gets only its own data
file and listens on 127.0.0.1 on a port it picks itself (reported in its ready line); a throwaway
CA issues each seller a server certificate naming its seller id, and the buyer a client
certificate. The buyer values all sellers concurrently with :func:`tip_fed.grpc.value_sellers`,
binding each seller's id to its certificate (``ClientTLS(bind_seller_id=True)``): a seller that
answers for another seller's id is refused.

Keys, certificates, seller data and logs live in a :class:`~simulations.processes.PrivateRun`
(owner-only temporary directory). When the exchange ends, fails, is interrupted with Ctrl-C or
the buyer is killed outright, every seller process is stopped and the directory deleted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tip_fed.config import TipConfig
from tip_fed.grpc import ClientTLS, SellerEndpoint, value_sellers, wait_until_healthy
from tip_fed.grpc.server import MiB
from tip_fed.protocol import Buyer, Valuation
from tip_fed.tls import CertPaths, create_ca, issue_cert

from simulations.market import Market
from simulations.processes import PrivateRun, ProcessGroup

READY = r"ready on 127\.0\.0\.1:(?P<port>\d+) "


def seller_command(config: TipConfig, seller_id: str, data: Path, server: CertPaths, ca: CertPaths) -> list[str]:
    """The ``tip-fed seller serve`` command line of one seller (mTLS, free port on 127.0.0.1)."""
    return [
        sys.executable, "-m", "tip_fed.cli", "seller", "serve",
        "--data", str(data), "--seller-id", seller_id, "--host", "127.0.0.1", "--port", "0",
        "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(ca.cert),
        "--max-queries-per-session", str(config.protocol.query_budget),
        "--max-message-mb", str(config.grpc.max_message_mb),
        "--exact-per-sample",  # a simulation's sellers hold no one's private data
        "--max-exact", "-1", "--total-max-exact", "-1",
    ]


def exchange_grpc(config: TipConfig, market: Market, buyer: Buyer, progress: bool) -> Valuation:
    """Start one seller service per seller, value them all from the buyer client, stop them all.

    Sellers that cannot be valued (unreachable, past the deadline, refusing) are listed in
    ``valuation.missing``; the reason for each is in ``valuation.manifest["transport"]["failures"]``.
    """
    from simulations.runner import max_samples, write_seller_files

    settings = config.grpc
    with PrivateRun("tip-fed-grpc-") as run, ProcessGroup(run.root / "logs", reaper=run.reaper) as group:
        root = run.root
        files = write_seller_files(market, root / "data")
        ca = create_ca(root / "tls")
        client = issue_cert(ca, root / "tls", "buyer", client=True)
        tls = ClientTLS(ca.cert, client.cert, client.key, bind_seller_id=True)
        certs = {sid: issue_cert(ca, root / "tls", f"seller-{i}", seller_id=sid) for i, sid in enumerate(files)}

        children = {sid: group.start(sid, seller_command(config, sid, path, certs[sid], ca))
                    for sid, path in files.items()}
        endpoints = []
        for sid, child in children.items():
            port = group.wait_for(child, READY, settings.startup_timeout_s)["port"]
            endpoints.append(SellerEndpoint(sid, f"127.0.0.1:{port}"))
        for endpoint in endpoints:
            wait_until_healthy(endpoint, tls=tls, timeout_s=settings.startup_timeout_s)

        offer = buyer.offer(max_samples=max_samples(market))
        replies, failures = value_sellers(
            endpoints, offer, tls=tls, timeout_s=settings.timeout_s, retries=settings.retries,
            max_message_bytes=settings.max_message_mb * MiB,
        )
        valuation = buyer.settle(list(replies.values()), expected=list(market.sellers))
        valuation.manifest["transport"] = {
            "runtime": "grpc", "security": "mtls", "seller_identity": "certificate", "failures": failures,
        }
        return valuation
