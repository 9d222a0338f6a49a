"""The buyer's side of the native gRPC runtime: send one Offer to many seller services at once.

A valuation round must finish for the sellers that answer even when others are down, hang or
refuse, so :func:`value_sellers` never raises for one seller's failure: it returns the replies it
got and, for every other seller, a one-line reason. Each call has a deadline. Only UNAVAILABLE
(the seller could not be reached, or went away) is retried, with exponential backoff: a seller that
was slow past the deadline or refused the Offer has spent that session's query budget and would
refuse a second copy, so retrying it only delays the round.

Seller identity comes from the authenticated peer, not from what a reply says. With
``ClientTLS(bind_seller_id=True)`` the buyer dials each seller with the seller's id as the TLS
target name (:func:`tip_fed.tls.seller_name`), so the handshake succeeds only with a peer holding a
certificate the CA issued for that seller id; and any Reply (or Health answer) whose seller id
is not the one dialed is refused with :class:`~tip_fed.errors.SellerIdentityError`, whatever the
transport security.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tip_fed.errors import (
    ConfigError,
    ModelNotHeldError,
    ProtocolError,
    SellerIdentityError,
    SellerUnavailableError,
    TipError,
)
from tip_fed.grpc.server import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, channel_options
from tip_fed.protocol.model_cache import strip_weights
from tip_fed.tls import read_tls_file, seller_name
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class SellerEndpoint:
    """Where a seller listens. ``name`` is the seller id the buyer expects to answer there.

    ``root_ca`` (optional) is the only CA trusted for this seller, instead of ``ClientTLS.root_ca``:
    when each seller runs its own CA, pinning it per endpoint stops one seller's CA from
    certifying another seller's id.
    """

    name: str
    address: str
    root_ca: str | Path | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.address or ":" not in self.address:
            raise ConfigError(f"seller endpoint {self.name!r} needs an address like host:port, got {self.address!r}")


@dataclass(frozen=True)
class ClientTLS:
    """PEM files for the buyer: the CA that signed the sellers' certificates, and a client
    certificate and key when sellers require mutual TLS.

    ``bind_seller_id=True`` accepts a seller only if its certificate names the seller id the
    buyer expects at that endpoint (``tip_fed.tls.issue_cert(..., seller_id=...)``); without it
    any certificate from the CA valid for the address is accepted.
    """

    root_ca: str | Path
    cert: str | Path | None = None
    key: str | Path | None = None
    bind_seller_id: bool = False

    def target_name(self, endpoint: SellerEndpoint) -> str | None:
        """The name the seller's certificate must carry: its seller id when bound, else the address's host."""
        return seller_name(endpoint.name) if self.bind_seller_id else None

    def credentials(self) -> grpc.ChannelCredentials:
        """grpcio channel credentials; ConfigError naming a file that cannot be read."""
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs its key and the key its certificate; give both or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=read_tls_file(self.root_ca),
            private_key=read_tls_file(self.key) if self.key else None,
            certificate_chain=read_tls_file(self.cert) if self.cert else None,
        )


@dataclass
class OfferSent:
    """What the buyer sent one seller in a round: Value request bytes (every attempt counted) and
    whether the model's weights went out (False: the seller answered the Offer by reference)."""

    offer_bytes: int = 0
    weights_shipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """For a run manifest."""
        return asdict(self)


def open_channel(
    address: str,
    *,
    tls: ClientTLS | None,
    insecure: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    target_name: str | None = None,
) -> grpc.Channel:
    """A channel to one seller: TLS unless ``insecure=True`` is passed explicitly.

    ``target_name`` replaces the address's host as the name the server certificate must carry.
    """
    if tls is None and not insecure:
        raise ConfigError(
            "connecting to sellers needs TLS: pass tls=ClientTLS(root_ca=...) "
            "or insecure=True for plaintext on a trusted network"
        )
    options: list[tuple[str, int | str]] = [*channel_options(max_message_bytes)]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if target_name:
        options.append(("grpc.ssl_target_name_override", target_name))
    return grpc.secure_channel(address, tls.credentials(), options=options)


def _channel(
    endpoint: SellerEndpoint, tls: ClientTLS | None, insecure: bool, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> grpc.Channel:
    """A channel to ``endpoint`` that authenticates the seller id when ``tls`` binds it."""
    if tls is not None and endpoint.root_ca is not None:
        tls = replace(tls, root_ca=endpoint.root_ca)
    return open_channel(
        endpoint.address,
        tls=tls,
        insecure=insecure,
        max_message_bytes=max_message_bytes,
        target_name=tls.target_name(endpoint) if tls else None,
    )


def check_identity(endpoint: SellerEndpoint, claimed: str) -> None:
    """SellerIdentityError unless the seller at ``endpoint`` speaks for the seller id it was dialed as."""
    if claimed != endpoint.name:
        raise SellerIdentityError(
            f"the seller dialed as {endpoint.name!r} at {endpoint.address} answered as {claimed[:64]!r}; "
            "its answer is refused (a seller answers only for its own id; check the endpoint list and "
            "that each seller's certificate names its own id)"
        )


def describe(err: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, e.g. ``RESOURCE_EXHAUSTED: seller s1 already answered ...``."""
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


def not_held(err: grpc.RpcError) -> bool:
    """True when a seller refused an Offer by reference because it lacks the model (resend with weights)."""
    return (
        isinstance(err, grpc.Call)
        and err.code() == grpc.StatusCode.FAILED_PRECONDITION
        and (err.details() or "").startswith(ModelNotHeldError.MARKER)
    )


def health(
    endpoint: SellerEndpoint, *, tls: ClientTLS | None, insecure: bool = False, timeout_s: float = 5.0
) -> pb.HealthResponse:
    """One Health call; SellerUnavailableError with the reason if it fails."""
    with _channel(endpoint, tls, insecure) as channel:
        call = channel.unary_unary(
            f"/{SERVICE_NAME}/Health",
            request_serializer=pb.HealthRequest.SerializeToString,
            response_deserializer=pb.HealthResponse.FromString,
        )
        try:
            return call(pb.HealthRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise SellerUnavailableError(f"seller {endpoint.name} at {endpoint.address}: {describe(exc)}") from exc


def wait_until_healthy(
    endpoint: SellerEndpoint, *, tls: ClientTLS | None, insecure: bool = False, timeout_s: float = 60.0
) -> pb.HealthResponse:
    """Poll Health until the seller answers as ``endpoint.name``; SellerUnavailableError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = health(
                endpoint, tls=tls, insecure=insecure, timeout_s=max(0.5, min(5.0, deadline - time.monotonic()))
            )
        except SellerUnavailableError as exc:
            if time.monotonic() >= deadline:
                raise SellerUnavailableError(f"{exc}; not healthy after {timeout_s:g} s") from exc
            time.sleep(0.2)
            continue
        check_identity(endpoint, reply.seller_id)
        return reply


def value_sellers(
    endpoints: Sequence[SellerEndpoint],
    offer: bytes,
    *,
    tls: ClientTLS | None = None,
    insecure: bool = False,
    timeout_s: float = 300.0,
    retries: int = 2,
    backoff_s: float = 0.5,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    before_call: Callable[[SellerEndpoint], None] | None = None,
    by_reference: bool = True,
    sent: dict[str, OfferSent] | None = None,
    on_answer: Callable[[str], None] | None = None,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Send ``offer`` to every seller concurrently; return ``(replies, failures)`` keyed by endpoint name.

    ``replies`` holds Reply bytes for :meth:`tip_fed.protocol.Buyer.settle`; ``failures`` one reason
    per seller that gave none (unreachable, deadline of ``timeout_s`` per call exceeded, refused).
    ``before_call`` runs in the worker thread just before each endpoint's first attempt (progress
    reporting, fault injection in tests). A reply whose seller id is not the endpoint's name is
    refused (a failure, never a reply).

    With ``by_reference`` (the default) each seller first gets the Offer without the model's
    weights (:func:`~tip_fed.protocol.model_cache.strip_weights`); only a seller that answers
    :class:`~tip_fed.errors.ModelNotHeldError` gets the full Offer, in the same session. ``sent``,
    when given, is filled with an :class:`OfferSent` per seller (bytes sent, weights shipped or not).
    ``on_answer`` runs in the calling thread with each endpoint's name as soon as its call is over,
    answered or failed (progress counting).
    """
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise ConfigError(f"seller endpoint names must be unique, got {names}")
    if timeout_s <= 0 or retries < 0 or backoff_s < 0:
        raise ConfigError("timeout_s must be > 0, retries and backoff_s >= 0")
    if not endpoints:
        return {}, {}
    try:
        parsed = pb.Offer.FromString(offer)
    except DecodeError as exc:
        raise ProtocolError(
            f"the offer to send is not a valid tip.v1 Offer: {exc}; pass the bytes of Buyer.offer()"
        ) from exc
    request = pb.ValueRequest(offer=parsed).SerializeToString()
    ships_weights = bool(parsed.model.weights)
    reference = (
        pb.ValueRequest(offer=pb.Offer.FromString(strip_weights(offer))).SerializeToString()
        if by_reference and ships_weights
        else None
    )
    del parsed
    channels = {e.name: _channel(e, tls, insecure, max_message_bytes) for e in endpoints}
    counts = {e.name: OfferSent() for e in endpoints}

    def send(endpoint: SellerEndpoint, data: bytes) -> bytes:
        call = channels[endpoint.name].unary_unary(f"/{SERVICE_NAME}/Value")
        for attempt in range(retries + 1):
            counts[endpoint.name].offer_bytes += len(data)
            try:
                reply = pb.ValueResponse.FromString(call(data, timeout=timeout_s)).reply
                check_identity(endpoint, reply.seller_id)
                return reply.SerializeToString()
            except DecodeError as exc:
                raise SellerUnavailableError(f"{endpoint.address} sent a malformed ValueResponse: {exc}") from exc
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if data is reference and not_held(exc):
                    raise ModelNotHeldError(endpoint.name, "") from exc
                if code not in RETRYABLE or attempt == retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise SellerUnavailableError(f"{endpoint.address}{tries}: {describe(exc)}") from exc
                time.sleep(backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def one(endpoint: SellerEndpoint) -> bytes:
        if before_call:
            before_call(endpoint)
        if reference is not None:
            try:
                return send(endpoint, reference)
            except ModelNotHeldError:
                pass  # the seller lacks the model: the same session's Offer with its weights follows
        counts[endpoint.name].weights_shipped = ships_weights
        return send(endpoint, request)

    replies: dict[str, bytes] = {}
    failures: dict[str, str] = {}
    pool = futures.ThreadPoolExecutor(max_workers=min(32, len(endpoints)), thread_name_prefix="tip-value")
    try:
        jobs = {pool.submit(one, e): e for e in endpoints}
        for job in futures.as_completed(jobs):
            name = jobs[job].name
            try:
                replies[name] = job.result()
            except TipError as exc:  # unreachable, refused, or answering for another seller
                failures[name] = str(exc)
            if on_answer:
                on_answer(name)
    finally:
        # Closing first cancels calls still in flight, so Ctrl-C does not wait out their deadlines.
        for channel in channels.values():
            channel.close()
        pool.shutdown(wait=True, cancel_futures=True)
    if sent is not None:
        sent.update(counts)
    return {n: replies[n] for n in names if n in replies}, {n: failures[n] for n in names if n in failures}
