"""Native gRPC runtime: value sellers at ``tip-fed seller serve`` endpoints, and start such a fleet locally.

:func:`value_grpc` is the buyer's side against any endpoints (one Offer to every seller
concurrently with :func:`tip_fed.grpc.value_sellers`, then settle). :func:`local_seller_fleet`
runs the native gRPC deployment on one machine: one ``tip-fed seller serve`` process per seller
data file, each listening on 127.0.0.1 on a port it picks itself (reported in its ready line); a
throwaway CA issues each seller a server certificate naming its seller id, and the buyer a client
certificate, so the fleet's :class:`ClientTLS` binds every seller id to its certificate (a seller
answering for another seller's id is refused).

Keys, certificates and logs live in a :class:`~tip_fed.runtimes.processes.PrivateRun`
(owner-only temporary directory). When the block ends, fails, is interrupted with Ctrl-C or the
buyer is killed outright, every seller process is stopped and the directory deleted.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tip_fed.config import GrpcConfig
from tip_fed.console import ANSWERED, count, counted, phase
from tip_fed.grpc import (
    ClientTLS,
    OfferSent,
    SellerEndpoint,
    value_sellers,
    wait_until_healthy,
)
from tip_fed.protocol import Buyer, Valuation
from tip_fed.protocol.resources import MiB
from tip_fed.runtimes.processes import PrivateRun, ProcessGroup
from tip_fed.tls import CertPaths, create_ca, issue_cert

READY = r"ready on 127\.0\.0\.1:(?P<port>\d+) "


def value_grpc(buyer: Buyer, endpoints: Sequence[SellerEndpoint], tls: ClientTLS | None, settings: GrpcConfig,
               max_samples: int, *, insecure: bool = False, by_reference: bool = True,
               progress: bool = False) -> Valuation:
    """Send one Offer to every endpoint, settle the Replies; every endpoint's name is an expected seller.

    Sellers that cannot be valued (unreachable, past ``settings.timeout_s``, refusing) are listed in
    ``valuation.missing``; the reason for each is in ``valuation.manifest["transport"]["failures"]``.
    ``tls=None`` needs ``insecure=True`` (plaintext, for a trusted network only). With
    ``by_reference`` the Offer names the model by fingerprint and only sellers that do not hold it
    get its weights; ``manifest["transport"]["offers"]`` says per seller how many bytes went out
    and whether they carried the weights. With ``progress`` the answers are counted as they arrive.
    """
    offer = buyer.offer(max_samples=max_samples)
    sent: dict[str, OfferSent] = {}
    phase(f"the Offer out to {len(endpoints)} sellers at once", enabled=progress)
    with count(ANSWERED, len(endpoints), enabled=progress) as answered:
        replies, failures = value_sellers(
            endpoints, offer, tls=tls, insecure=insecure, timeout_s=settings.timeout_s, retries=settings.retries,
            max_message_bytes=settings.max_message_mb * MiB, by_reference=by_reference, sent=sent,
            on_answer=lambda _name: answered.update(),
        )
    phase(f"settling {len(replies)} Replies", enabled=progress)
    valuation = buyer.settle(list(replies.values()), expected=[e.name for e in endpoints])
    valuation.manifest["transport"] = {
        "runtime": "grpc",
        "security": "insecure" if tls is None else ("mtls" if tls.cert else "tls"),
        "seller_identity": "certificate" if tls is not None and tls.bind_seller_id else "address",
        "failures": failures,
        "offers": {name: s.to_dict() for name, s in sent.items()},
    }
    return valuation


@dataclass(frozen=True)
class SellerFleet:
    """Running local seller services: where they listen and how the buyer connects to them."""

    endpoints: list[SellerEndpoint]
    tls: ClientTLS
    pids: dict[str, int]  # seller id -> PID of its ``tip-fed seller serve`` process


def seller_command(seller_id: str, data: Path, server: CertPaths, ca: CertPaths, settings: GrpcConfig,
                   query_budget: int, seller_args: Sequence[str] = ()) -> list[str]:
    """The ``tip-fed seller serve`` command line of one seller (mTLS, free port on 127.0.0.1)."""
    return [
        sys.executable, "-m", "tip_fed.cli", "seller", "serve",
        "--data", str(data), "--seller-id", seller_id, "--host", "127.0.0.1", "--port", "0",
        "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(ca.cert),
        "--max-queries-per-session", str(query_budget), "--max-message-mb", str(settings.max_message_mb),
        *seller_args,
    ]


@contextmanager
def local_seller_fleet(files: Mapping[str, Path], *, settings: GrpcConfig | None = None, query_budget: int = 1,
                       seller_args: Sequence[str] = (), run: PrivateRun | None = None,
                       progress: bool = False) -> Iterator[SellerFleet]:
    """Start one ``tip-fed seller serve`` per seller data file (seller id -> file) on 127.0.0.1 over
    mutual TLS, wait until every one is healthy, yield the fleet, stop every process on exit.

    ``seller_args`` are further ``seller serve`` flags every seller gets (its privacy policy, say
    ``--exact-per-sample``); ``run`` is a private run whose directory holds the CA and logs (a new
    one when None).
    """
    settings = settings or GrpcConfig()
    with ExitStack() as stack:
        if run is None:
            run = stack.enter_context(PrivateRun("tip-fed-grpc-"))
        group = stack.enter_context(ProcessGroup(run.root / "logs", reaper=run.reaper))
        phase(f"starting {len(files)} 'tip-fed seller serve' processes on 127.0.0.1 (mutual TLS)", enabled=progress)
        ca = create_ca(run.root / "tls")
        client = issue_cert(ca, run.root / "tls", "buyer", client=True)
        tls = ClientTLS(ca.cert, client.cert, client.key, bind_seller_id=True)
        certs = {sid: issue_cert(ca, run.root / "tls", f"seller-{i}", seller_id=sid) for i, sid in enumerate(files)}
        children = {sid: group.start(sid, seller_command(sid, Path(path), certs[sid], ca, settings, query_budget,
                                                         seller_args))
                    for sid, path in files.items()}
        endpoints = []
        for sid, child in counted(children.items(), "sellers listening", enabled=progress):
            port = group.wait_for(child, READY, settings.startup_timeout_s)["port"]
            endpoints.append(SellerEndpoint(sid, f"127.0.0.1:{port}"))
        for endpoint in counted(endpoints, "sellers healthy", enabled=progress):
            wait_until_healthy(endpoint, tls=tls, timeout_s=settings.startup_timeout_s)
        yield SellerFleet(endpoints, tls, {sid: child.pid for sid, child in children.items()})
