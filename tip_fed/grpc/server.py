"""A seller as a native gRPC service: ``tip.v1.Seller`` (Value, Health) around :class:`~tip_fed.protocol.Seller`.

The service only carries bytes: every check of the Offer is the protocol Seller's. What this
module adds is what a network service needs: TLS (server-authenticated, or mutual with a client
CA) unless the operator explicitly opts out, message limits large enough for ciphertext payloads
(grpcio refuses anything above 4 MiB by default), TipErrors mapped to gRPC status codes with the
error message as details (never a traceback), and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from tip_fed.errors import (
    BudgetExceededError,
    CodecError,
    ConfigError,
    FingerprintMismatchError,
    InsecureParametersError,
    ProtocolError,
    SessionError,
    TipError,
    VersionMismatchError,
)
from tip_fed.protocol import PROTOCOL_VERSION, Seller, SellerPolicy
from tip_fed.protocol.data import load_dataset
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

log = logging.getLogger("tip_fed.grpc.server")

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 512 * MiB
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Seller"].full_name

# Most specific first: the precondition errors are ProtocolError subclasses.
_STATUS: tuple[tuple[type[TipError], grpc.StatusCode], ...] = (
    (BudgetExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FingerprintMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
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


@dataclass(frozen=True)
class ServerTLS:
    """PEM files for the server side: its certificate and key, and optionally a CA for client certificates.

    With ``client_ca`` set, only buyers holding a certificate signed by that CA can connect (mTLS).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """grpcio server credentials; ConfigError naming the file that cannot be read."""
        key, cert = _read(self.key, "--tls-key"), _read(self.cert, "--tls-cert")
        ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} file {path}: {exc.strerror}; create files with 'tip-fed tls init DIR'"
        ) from exc


class SellerService:
    """The ``tip.v1.Seller`` handlers. One Offer is scored at a time: a Seller keeps per-session budgets."""

    def __init__(self, seller: Seller):
        self.seller = seller
        self._lock = threading.Lock()

    def value(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Answer a ValueRequest (raw bytes, so malformed input is ours to report, not grpcio's)."""
        try:
            offer = pb.ValueRequest.FromString(request).offer.SerializeToString()
        except DecodeError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid tip.v1 ValueRequest: {exc}")
        try:
            with self._lock:
                reply = self.seller.respond(offer)
        except TipError as exc:
            code = status_for(exc)
            log.warning("refused an offer from %s: %s: %s", context.peer(), code.name, exc)
            self._abort(context, code, str(exc))
        except Exception:  # noqa: BLE001 - the traceback stays in the seller's log, never on the wire
            log.exception("internal error while answering an offer from %s", context.peer())
            self._abort(context, grpc.StatusCode.INTERNAL, f"seller {self.seller.seller_id} failed internally; see its log")
        log.info("answered an offer from %s (%d bytes in, %d bytes out)", context.peer(), len(request), len(reply))
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


def start_server(
    seller: Seller,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTLS | None = None,
    insecure: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    workers: int = 4,
) -> RunningServer:
    """Start serving ``seller``. TLS is required unless ``insecure=True`` is passed explicitly."""
    if tls is None and not insecure:
        raise ConfigError("a seller service needs TLS: pass --tls-cert and --tls-key (see 'tip-fed tls init'), "
                          "or --insecure to serve in plaintext on a trusted network")
    if tls is not None and insecure:
        raise ConfigError("--insecure and TLS files were both given; choose one")
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 0-65535 (0 picks a free port)")
    # No SO_REUSEPORT: a second seller on the same port must fail, not silently share connections.
    options = [*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    server.add_generic_rpc_handlers((SellerService(seller).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:
        bound = 0
        log.debug("bind failed: %s", exc)
    if not bound:
        raise ConfigError(f"cannot listen on {address}: the port is in use or the host is not an address of this "
                          "machine; pick another --port (0 picks a free one) or --host")
    server.start()
    security = "insecure" if tls is None else ("mtls" if tls.client_ca else "tls")
    return RunningServer(server, host, bound, security)


def serve_until_signal(running: RunningServer, *, grace_s: float = 5.0,
                       on_stop: Callable[[str], None] | None = None) -> None:
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
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTLS | None = None,
    insecure: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    announce: Callable[[RunningServer, Seller], None] | None = None,
) -> None:
    """Load a seller's dataset file and serve it until SIGTERM/SIGINT (what ``tip-fed seller serve`` runs).

    ``seller_id`` defaults to the file stem, so ``digits-4.safetensors`` serves seller ``digits-4``.
    """
    path = Path(data)
    seller = Seller(seller_id or path.stem, load_dataset(path), policy=policy)
    running = start_server(seller, host=host, port=port, tls=tls, insecure=insecure, max_message_bytes=max_message_bytes)
    if announce:
        announce(running, seller)
    serve_until_signal(running, on_stop=lambda why: log.info("%s: stopping seller %s", why, seller.seller_id))
