"""A seller as a native gRPC service: ``tip.v1.Seller`` (Value, Health) around :class:`~tip_fed.protocol.Seller`.

The service only carries bytes: every check of the Offer is the protocol Seller's. What this
module adds is what a network service needs: mutual TLS by default (server-only TLS and plaintext
are explicit opt-outs), who sent each Offer passed to the Seller (:class:`Caller`: the privacy
ledger charges the client certificate subject, else the one identity all unauthenticated buyers
share; the network address only tells callers' sessions and Offers in flight apart), a message
limit derived from the largest Offer the seller's resource budget could accept, a bound on
concurrent calls and on request bytes in flight and on each buyer's Offers at once (excess calls
are refused with RESOURCE_EXHAUSTED, never queued without bound), TipErrors mapped to gRPC status
codes with the error message as details (never a traceback), and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn, TypedDict, Unpack

import grpc
from google.protobuf.message import DecodeError

from tip_fed.config import GrpcConfig
from tip_fed.errors import (
    BudgetExceededError,
    CodecError,
    ConfigError,
    FingerprintMismatchError,
    InsecureParametersError,
    ModelNotHeldError,
    ProtocolError,
    SessionError,
    TipError,
    VersionMismatchError,
)
from tip_fed.protocol import PROTOCOL_VERSION, Seller, SellerPolicy
from tip_fed.protocol.records import RawRecords, load_seller_data
from tip_fed.protocol.resources import (
    MESSAGE_COPIES,
    MiB,
    PeerSlots,
    ResourceBudget,
    ResourceLimitError,
    max_offer_bytes,
)
from tip_fed.tls import read_tls_file
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

log = logging.getLogger("tip_fed.grpc.server")

#: The buyer's default message limit (its Offers go out, Replies come in); a seller service
#: derives its own from its resource budget (:func:`seller_message_limit`).
DEFAULT_MAX_MESSAGE_BYTES = GrpcConfig().max_message_mb * MiB
#: Handler threads beyond the seller's concurrent Offers, so Health and refusals keep answering
#: while ``max_sessions`` Offers are scored.
_SPARE_THREADS = 2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Seller"].full_name

# Most specific first: the precondition errors are ProtocolError subclasses.
_STATUS: tuple[tuple[type[TipError], grpc.StatusCode], ...] = (
    (BudgetExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FingerprintMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    # details start with ModelNotHeldError.MARKER: the buyer resends the Offer with its weights
    (ModelNotHeldError, grpc.StatusCode.FAILED_PRECONDITION),
    (VersionMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (InsecureParametersError, grpc.StatusCode.FAILED_PRECONDITION),
    (SessionError, grpc.StatusCode.FAILED_PRECONDITION),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: TipError) -> grpc.StatusCode:
    """gRPC status code for an error the seller raised on an Offer (INVALID_ARGUMENT by default)."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Send and receive limits for both ends; an Offer carries the model and the encrypted query."""
    if max_message_bytes < 4 * MiB:
        raise ConfigError(f"max message size {max_message_bytes} bytes is below gRPC's 4 MiB default; raise it")
    if max_message_bytes > (1 << 31) - 1:
        raise ConfigError("max message size must be below 2 GiB, the largest message gRPC can carry")
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def seller_message_limit(budget: ResourceBudget) -> int:
    """Default message limit of a seller service: the largest Offer its budget could accept
    (at least gRPC's 4 MiB default, so small budgets still hear Health and refusals)."""
    return max(4 * MiB, max_offer_bytes(budget))


@dataclass(frozen=True)
class Caller:
    """Who sent a call, in its two roles.

    ``peer`` tells callers apart: the client certificate's subject under mutual TLS, else the
    network address without the port (a reconnect from another port is the same peer). It keys
    what only separates one caller's state from another's: the Offers each may have in at once
    (``max-offers-per-peer``), a session's query budget and commitment, and the models it uploaded.
    ``authenticated``: the peer is a certificate subject verified against the seller's client CA,
    which the privacy ledger charges; an address is not, and the ledger charges the one identity
    every unauthenticated buyer shares instead. An address is no identity: a host has many
    (127.0.0.0/8, an IPv6 /64), so a budget per address would be a budget per address a buyer binds.
    """

    peer: str
    authenticated: bool


def caller_of(context: grpc.ServicerContext, verified: bool) -> Caller:
    """The :class:`Caller` of a call; ``verified``: the server requires client certificates signed
    by its client CA (mutual TLS), so a certificate subject in the call is an identity."""
    if verified:
        auth = context.auth_context()
        for key in ("x509_subject", "x509_common_name"):
            values = auth.get(key)
            if values:
                return Caller("x509:" + values[0].decode("utf-8", "replace"), True)
    peer = context.peer()
    return Caller(peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer, False)


@dataclass(frozen=True)
class ServerTLS:
    """PEM files for the server side: its certificate and key, and optionally a CA for client certificates.

    With ``client_ca`` set, only buyers holding a certificate signed by that CA can connect (mTLS,
    the default of :func:`start_server`); without it any client may connect, which
    :func:`start_server` accepts only with ``server_tls_only=True``.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """grpcio server credentials; ConfigError naming the file that cannot be read."""
        key, cert = read_tls_file(self.key, "--tls-key"), read_tls_file(self.cert, "--tls-cert")
        ca = read_tls_file(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class SellerService:
    """The ``tip.v1.Seller`` handlers. The Seller costs, validates and locks per Offer; the service
    bounds the request bytes it holds at once and the Offers each buyer has in at once."""

    def __init__(self, seller: Seller, *, verified: bool = False):
        self.seller = seller
        self._verified = verified  # mutual TLS: client certificates are identities
        self._lock = threading.Lock()
        self._held = 0  # bytes of requests being handled now, times the copies made of them
        self._limit = seller.policy.budget.in_flight_memory_mb * MiB
        self._peers = PeerSlots(seller.policy.budget)

    def value(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Answer a ValueRequest (raw bytes, so malformed input is ours to report, not grpcio's).

        A buyer's Offer beyond ``max_offers_per_peer`` is refused before anything else, so one
        buyer's flood cannot queue ahead of the others (scoring runs one Offer at a time)."""
        caller = caller_of(context, self._verified)
        peer = caller.peer
        try:
            self._peers.admit(peer)
        except ResourceLimitError as exc:
            log.warning("refused an offer from %s: RESOURCE_EXHAUSTED: %s", peer, exc)
            self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            return self._admitted(request, caller, context)
        finally:
            self._peers.release(peer)

    def _admitted(self, request: bytes, caller: Caller, context: grpc.ServicerContext) -> bytes:
        peer = caller.peer
        held = len(request) * MESSAGE_COPIES
        with self._lock:
            over = self._held + held > self._limit
            if not over:
                self._held += held
        if over:
            exc = ResourceLimitError(
                f"requests being handled already hold about {self._held / MiB:.0f} MiB; this one needs "
                f"{held / MiB:.0f} MiB more", "in_flight_memory_mb")
            log.warning("refused an offer from %s: RESOURCE_EXHAUSTED: %s", peer, exc)
            self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            return self._value(request, caller, context)
        finally:
            with self._lock:
                self._held -= held

    def _value(self, request: bytes, caller: Caller, context: grpc.ServicerContext) -> bytes:
        peer = caller.peer
        try:
            offer = pb.ValueRequest.FromString(request).offer.SerializeToString()
        except DecodeError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid tip.v1 ValueRequest: "
                                                                   f"{exc}")
        try:
            reply = self.seller.respond(offer, peer=peer, authenticated=caller.authenticated)
        except TipError as exc:
            code = status_for(exc)
            level = logging.INFO if isinstance(exc, ModelNotHeldError) else logging.WARNING  # the usual first step
            log.log(level, "refused an offer from %s: %s: %s", peer, code.name, exc)
            self._abort(context, code, str(exc))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException:  # a Rust panic (pyo3 PanicException) is no Exception: the call must not hang
            log.exception("internal error while answering an offer from %s", peer)
            self._abort(
                context, grpc.StatusCode.INTERNAL, f"seller {self.seller.seller_id} failed internally; see its log"
            )
        log.info("answered an offer from %s (%d bytes in, %d bytes out)", peer, len(request), len(reply))
        return pb.ValueResponse(reply=pb.Reply.FromString(reply)).SerializeToString()

    def health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        """Liveness plus what a buyer needs to plan the Offer (protocol version, id, sample count)."""
        return pb.HealthResponse(
            protocol_version=PROTOCOL_VERSION, seller_id=self.seller.seller_id, n_samples=self.seller.n_samples
        )

    @staticmethod
    def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
        context.abort(code, details[:4000])
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers for the service; Value keeps raw bytes in and out (see :meth:`value`)."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Value": grpc.unary_unary_rpc_method_handler(self.value),
                "Health": grpc.unary_unary_rpc_method_handler(
                    self.health,
                    request_deserializer=pb.HealthRequest.FromString,
                    response_serializer=pb.HealthResponse.SerializeToString,
                ),
            },
        )


@dataclass
class RunningServer:
    """A started server and the port it is bound to (useful with port 0)."""

    server: grpc.Server
    host: str
    port: int
    security: str

    @property
    def address(self) -> str:
        """``host:port`` as a buyer would dial it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, let running ones finish for up to ``grace_s``, then close."""
        self.server.stop(grace_s).wait()


class Listen(TypedDict, total=False):
    """Where and how a seller service listens: :func:`start_server`'s options, which :func:`serve` passes on."""

    host: str
    port: int
    tls: ServerTLS | None
    insecure: bool
    server_tls_only: bool
    max_message_bytes: int | None


def start_server(
    seller: Seller,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTLS | None = None,
    insecure: bool = False,
    server_tls_only: bool = False,
    max_message_bytes: int | None = None,
) -> RunningServer:
    """Start serving ``seller`` over mutual TLS (server-only TLS or plaintext only when asked).

    ``max_message_bytes`` defaults to :func:`seller_message_limit` of the seller's budget.
    ``budget.max_sessions`` + 2 handler threads read and answer calls (a call's message is read
    by its thread, so at most that many messages are held); up to ``budget.max_calls`` calls wait
    for a thread, and grpcio refuses any call beyond that with RESOURCE_EXHAUSTED.
    """
    _check_security(tls, insecure, server_tls_only)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 0-65535 (0 picks a free port)")
    budget = seller.policy.budget
    limit = seller_message_limit(budget) if max_message_bytes is None else max_message_bytes
    # No SO_REUSEPORT: a second seller on the same port must fail, not silently share connections.
    options = [*channel_options(limit), ("grpc.so_reuseport", 0)]
    threads = budget.max_sessions + _SPARE_THREADS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=options,
        maximum_concurrent_rpcs=max(budget.max_calls, threads),
    )
    verified = tls is not None and tls.client_ca is not None
    server.add_generic_rpc_handlers((SellerService(seller, verified=verified).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:
        bound = 0
        log.debug("bind failed: %s", exc)
    if not bound:
        raise ConfigError(
            f"cannot listen on {address}: the port is in use or the host is not an address of this "
            "machine; pick another --port (0 picks a free one) or --host"
        )
    server.start()
    security = "insecure" if tls is None else ("mtls" if tls.client_ca else "tls")
    return RunningServer(server, host, bound, security)


def _check_security(tls: ServerTLS | None, insecure: bool, server_tls_only: bool) -> None:
    """Mutual TLS unless one explicit opt-out says otherwise."""
    if tls is None and not insecure:
        raise ConfigError(
            "a seller service needs TLS: pass --tls-cert, --tls-key and --tls-client-ca (mutual TLS; "
            "'tip-fed tls init DIR' makes the files), or --insecure to serve in plaintext on a "
            "trusted network"
        )
    if tls is not None and insecure:
        raise ConfigError("--insecure and TLS files were both given; choose one")
    if tls is not None and tls.client_ca is None and not server_tls_only:
        raise ConfigError(
            "a seller service requires client certificates by default (mutual TLS): pass "
            "--tls-client-ca with the CA that signed your buyers' certificates ('tip-fed tls init "
            "DIR' on the buyer's side makes DIR/ca.crt and a client certificate DIR/buyer.crt), or "
            "--server-tls-only to accept any client that trusts your certificate"
        )
    if server_tls_only and (tls is None or tls.client_ca is not None):
        raise ConfigError("--server-tls-only needs --tls-cert and --tls-key and no --tls-client-ca")


def serve_until_signal(
    running: RunningServer, *, grace_s: float = 5.0, on_stop: Callable[[str], None] | None = None
) -> None:
    """Block until SIGTERM or SIGINT, then stop gracefully (main thread only)."""
    stopping = threading.Event()
    names: list[str] = []

    def _handle(signum: int, frame: FrameType | None) -> None:
        names.append(signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, _handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stopping.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if on_stop:
            on_stop(names[0] if names else "exit")
        running.stop(grace_s)


def serve(
    data: str | Path,
    *,
    seller_id: str | None = None,
    policy: SellerPolicy | None = None,
    fields: Sequence[str] | None = None,
    announce: Callable[[RunningServer, Seller], None] | None = None,
    **listen: Unpack[Listen],
) -> None:
    """Load a seller's data file and serve it until SIGTERM/SIGINT (what ``tip-fed seller serve`` runs).

    The file is a tensor dataset (``.safetensors``) or raw records (``.csv``, ``.parquet``, ``.jsonl``,
    ``.txt``; see :func:`~tip_fed.protocol.records.load_seller_data`) that each Offer's input format
    encodes, restricted to ``fields`` (None offers every field of the file: a buyer's format may read
    any of them). ``seller_id`` defaults to the file stem, so ``digits-4.safetensors`` serves seller
    ``digits-4``. ``listen`` is where and how, as :func:`start_server` takes it.

    The privacy ledger is a file (:meth:`SellerPolicy.beside`: ``policy.ledger``, else beside the data),
    read at start: a ledger that cannot be written stops the seller before it listens, and a restarted
    seller keeps refusing what its buyers already spent.
    """
    # before loading the data
    _check_security(listen.get("tls"), listen.get("insecure", False), listen.get("server_tls_only", False))
    path = Path(data)
    records = load_seller_data(path, fields)
    seller = Seller(seller_id or path.stem, records, policy=(policy or SellerPolicy()).beside(path))
    if isinstance(records, RawRecords):
        log.info("seller %s offers the fields %s of %s%s", seller.seller_id, sorted(records.fields), path.name,
                 "" if fields is not None else " (every field of the file; pass --fields to sell fewer)")
    running = start_server(seller, **listen)
    if announce:
        announce(running, seller)
    serve_until_signal(running, on_stop=lambda why: log.info("%s: stopping seller %s", why, seller.seller_id))
